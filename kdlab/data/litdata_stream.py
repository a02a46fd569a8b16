"""LitData's ``StreamingDataset`` whose items are kdlab examples (``encoded.encoded_example``),
and its ``StreamingDataLoader`` counting the trainer's epochs: a module of its own because it
imports LitData, the optional ``kdlab[streaming]`` extra, and its classes must be importable
by name in loader workers."""

from __future__ import annotations

from collections.abc import Callable

from litdata import StreamingDataLoader, StreamingDataset

from .encoded import encoded_example
from .image_views import ViewSpec


class EncodedImageStream(StreamingDataset):
    """Items ``{id, label, jpeg}`` of chunks from ``kdlab data prepare`` -> each item's view
    (``view_spec``, decoded in the loader's workers) or, with ``view_spec`` None, its
    encoded bytes (decoded on the device)."""

    def __init__(self, *args, view_spec: ViewSpec | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.view_spec = view_spec

    def __getitem__(self, index):
        item = super().__getitem__(index)
        # LitData counts epochs from 1 (its loader's first pass), kdlab from 0
        return encoded_example(int(item["id"]), item["jpeg"], self.view_spec,
                               self.current_epoch - 1)


class EpochStreamingDataLoader(StreamingDataLoader):
    """LitData's StreamingDataLoader whose epochs are the trainer's (``epoch_of()``, from 0):
    LitData counts the loader's passes, and Lightning restores the loader's state only from a
    checkpoint taken inside an epoch; kdlab's are taken at epoch ends, after which a resumed
    run must stream the next epoch's order, not the first one's. A pass that LitData resumes
    from a mid-epoch state (``restore``) keeps its own count."""

    def __init__(self, *args, epoch_of: Callable[[], int], **kwargs):
        super().__init__(*args, **kwargs)
        self.epoch_of = epoch_of

    def __iter__(self):
        if not self.restore:
            self.current_epoch = int(self.epoch_of())  # LitData's __iter__ adds 1
        yield from super().__iter__()
