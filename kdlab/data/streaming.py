"""``dataset=streaming``: the chunks ``kdlab data prepare SOURCE OUT`` wrote (``prepare.py``),
read with LitData from a local directory or an object store (``s3://``, ``gs://``,
``azure://``, ``r2://``; ``local:/dir`` reads a local copy the way an object store is read).

Why LitData: it is Lightning's own streaming engine (kdlab runs on Lightning), maintained,
and brings what ImageNet-scale training needs without kdlab code for it: ``optimize``
writes chunks in parallel and resumes an interrupted write; ``StreamingDataset`` reads local
or object-store chunks (downloaded into ``cache_dir`` as they are needed, the cache bounded
by ``max_cache_size``), shards them over DDP ranks and loader workers (each example of a
split goes to exactly one rank and worker per epoch; ``drop_last`` on the train split trims
the remainder so every rank runs the same number of full batches), shuffles from (seed,
epoch), and ``StreamingDataLoader`` has a ``state_dict`` that Lightning saves in every
checkpoint and restores on resume (the next epoch after an epoch-end checkpoint starts where
the uninterrupted run's did). WebDataset (tar shards) was the alternative: it shards by
file and has no loader state to resume from, so an exact resume and a per-example split of
held-out ids would be kdlab's own code.

The splits by id (``encoded.py``) become LitData subsets (``StreamingDataset.subset``, the
ids of the split in id order): the train split is streamed shuffled, meta/val/test in order.
Holding ids out cuts the chunks into pieces that the shuffle visits in any order; from an
object store, make the cache (``max_cache_size``, LitData's default: most of the free disk)
big enough for the dataset so that each chunk is downloaded once. ``examples`` reads single
items by id (random access: a chunk is fetched whole the first time).

Before anything runs, ``check`` reads OUT/kdlab.json and refuses (one line) a directory
that is not a finished prepare, chunks of another format or version, and chunks whose item
count differs from the manifest's.
"""

from __future__ import annotations

import json
import logging
import tempfile
import warnings
from pathlib import Path
from typing import Any

from torch import Tensor
from torch.utils.data import DataLoader

from .download import DatasetError, _one_line
from .encoded import Catalog, EncodedBatch, EncodedImageDataModule, IdSplit, digest_of
from .image_views import ViewSpec
from .prepare import FORMAT, IN_PROGRESS, MANIFEST, VERSION


def is_url(location: str) -> bool:
    """An object-store URL (``s3://...``) or LitData's ``local:`` one, as opposed to a path."""
    return "://" in location or location.startswith("local:")


def read_manifest(location: str, cache_dir: Path, key: str) -> dict[str, Any]:
    """OUT/kdlab.json of the prepared chunks at ``location`` (a path, or a URL: downloaded
    into ``cache_dir``), checked; ``key`` names the setting in errors."""
    prepare_hint = f"prepare them with: kdlab data prepare SOURCE {location}"
    if is_url(location):
        from litdata.streaming.downloader import get_downloader

        cache_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
            local = Path(tmp) / MANIFEST
            try:
                get_downloader(location, tmp, []).download_file(
                    f"{location.rstrip('/')}/{MANIFEST}", str(local))
                text = local.read_text()
            except Exception as e:  # the store's own errors: missing object, credentials
                raise DatasetError(f"{key}: cannot read {location.rstrip('/')}/{MANIFEST} "
                                   f"({type(e).__name__}: {_one_line(e)}); is it the OUT of "
                                   f"kdlab data prepare, uploaded whole?") from None
    else:
        folder = Path(location).expanduser()
        if not (folder / MANIFEST).is_file():
            if not folder.is_dir():
                problem = "does not exist"
            elif (folder / IN_PROGRESS).is_file():
                problem = "holds an unfinished prepare: run the same kdlab data prepare again"
                prepare_hint = "to finish it"
            elif (folder / "index.json").is_file():
                problem = ("holds LitData chunks that kdlab data prepare did not write (no "
                           f"{MANIFEST})")
            else:
                problem = f"holds no prepared chunks (no {MANIFEST})"
            raise DatasetError(f"{key} {location} {problem}; {prepare_hint}")
        text = (folder / MANIFEST).read_text()
    try:
        manifest = json.loads(text)
        found = (manifest.get("format"), manifest.get("version"))
    except (ValueError, AttributeError):
        raise DatasetError(f"{key}: {location}/{MANIFEST} is damaged (not a JSON object); "
                           f"{prepare_hint}") from None
    if found != (FORMAT, VERSION):
        raise DatasetError(f"{key} {location} holds chunks of format {found[0]} version "
                           f"{found[1]}; this kdlab reads {FORMAT} version {VERSION}: "
                           f"{prepare_hint} (again, into a new OUT)")
    n = manifest.get("num_examples")
    if not (isinstance(n, int) and len(manifest.get("labels", ())) == n
            == len(manifest.get("files", ())) and manifest.get("classes")):
        raise DatasetError(f"{key}: {location}/{MANIFEST} is incomplete (labels, files, "
                           f"classes); {prepare_hint}")
    return manifest


class _EvalDropLastNotice(logging.Filter):
    """LitData warns when a distributed stream keeps its last items (drop_last=False): right
    for training, where every rank must step the same number of times; kdlab's evaluation
    streams keep them on purpose (every example evaluated once; no collective per step)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "disabled the `drop_last` option" not in record.getMessage()


def quiet_litdata() -> None:
    """LitData's INFO lines (cache sizes, mmap) stay out of the run's log, and Lightning's
    warning about an IterableDataset with a length does not apply (LitData computes it per
    rank and worker)."""
    logging.getLogger("litdata").setLevel(logging.WARNING)
    dataset_log = logging.getLogger("litdata.streaming.dataset")
    if not any(isinstance(f, _EvalDropLastNotice) for f in dataset_log.filters):
        dataset_log.addFilter(_EvalDropLastNotice())
    warnings.filterwarnings("ignore", message="Your `IterableDataset` has `__len__` defined")


def require_litdata(what: str) -> None:
    """LitData is the optional extra ``kdlab[streaming]``: a clear line when it is missing."""
    try:
        import litdata  # noqa: F401
    except ImportError:
        raise DatasetError(f"{what} needs LitData: pip install 'kdlab[streaming]' (or pip "
                           "install litdata)") from None


class StreamingDataModule(EncodedImageDataModule):
    name = "streaming"
    source_kind = ("prepared chunks: the OUT of `kdlab data prepare SOURCE OUT` (a directory "
                   "or its object-store URL)")

    def __init__(self, cache_dir: str | None = None, max_cache_size: str | int | None = None,
                 **kwargs):
        require_litdata("dataset=streaming")
        quiet_litdata()
        super().__init__(**kwargs)
        self.cache_dir = Path(cache_dir or Path(tempfile.gettempdir()) / "kdlab-streaming")
        self.max_cache_size = max_cache_size
        self._readers: dict[str, ChunkReader] = {}

    def location(self, source: str) -> str:
        return self.path if source == "train" else str(self.test_path)

    def stream_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {"cache_dir": str(self.cache_dir / "chunks"), "seed": self.seed}
        if self.max_cache_size is not None:
            options["max_cache_size"] = self.max_cache_size
        return options

    def read_catalog(self, source: str) -> Catalog:
        key = "dataset.path" if source == "train" else "dataset.test_path"
        location = self.location(source)
        manifest = read_manifest(location, self.cache_dir / "manifests", key)
        reader = open_stream(location, self.stream_options())
        # all of the chunks' items (len() would count this rank's share)
        items = sum(end - start for start, end in reader.region_of_interest)
        if items != manifest["num_examples"]:
            raise DatasetError(f"{key} {location}: its chunks hold {items} items, its "
                               f"{MANIFEST} {manifest['num_examples']}: copy OUT whole, or "
                               "prepare it again")
        return Catalog(location, tuple(manifest["classes"]), _int64(manifest["labels"]),
                       tuple(manifest["files"]), str(manifest["source"]),
                       # a finished OUT is never written again (prepare refuses it)
                       digest_of(location, manifest["source"], manifest["num_examples"],
                                 manifest["num_chunks"]))

    def reader(self, source: str) -> ChunkReader:
        if source not in self._readers:
            self.catalog(source)  # checked first
            self._readers[source] = ChunkReader(self.location(source), self.stream_options())
        return self._readers[source]

    def make_loader(self, split: IdSplit, spec: ViewSpec | None, batch_size: int,
                    shuffle: bool, drop_last: bool, collate: EncodedBatch) -> DataLoader:
        """The train split streamed by LitData (shuffled, sharded, ``drop_last``); the
        evaluation splits read by id in order (``EncodedImageDataModule.make_loader``: every
        example once over the ranks, whatever the batch size; LitData would hand a rank
        whole batches only)."""
        if not shuffle:
            return super().make_loader(split, spec, batch_size, shuffle, drop_last, collate)
        from .litdata_stream import EpochStreamingDataLoader

        # built now (Lightning calls train_dataloader once DDP is set up): LitData reads the
        # ranks from torch.distributed when the dataset is built
        stream = open_stream(self.location(split.source), self.stream_options(), spec=spec,
                             shuffle=True, drop_last=drop_last).subset(sorted(split.ids.tolist()))
        return EpochStreamingDataLoader(stream, batch_size=batch_size,
                                        num_workers=self.num_workers, collate_fn=collate,
                                        epoch_of=self.trainer_epoch)

    def trainer_epoch(self) -> int:
        return self.trainer.current_epoch if self.trainer is not None else 0


def open_stream(location: str, options: dict[str, Any], spec: ViewSpec | None = None,
                shuffle: bool = False, drop_last: bool = False):
    """A LitData stream of all the chunks at ``location`` (``subset`` narrows it)."""
    from .litdata_stream import EncodedImageStream

    try:
        return EncodedImageStream(location, shuffle=shuffle, drop_last=drop_last,
                                  view_spec=spec, **options)
    except Exception as e:  # LitData's own: no index.json, no access
        raise DatasetError(f"cannot open the chunks at {location} ({type(e).__name__}: "
                           f"{_one_line(e)}); prepare them with kdlab data prepare SOURCE "
                           "OUT") from None


class ChunkReader:
    """``read(id)``: the encoded bytes of item ``id`` of the chunks at ``location`` (random
    access; the stream is opened in the process that reads, e.g. each loader worker)."""

    def __init__(self, location: str, options: dict[str, Any]):
        self.location, self.options = location, options
        self._stream = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_stream": None}

    def __call__(self, example_id: int) -> Tensor:
        if self._stream is None:
            self._stream = open_stream(self.location, self.options)
        return self._stream[example_id]["encoded"]


def _int64(values: list[int]):
    import numpy as np

    return np.asarray(values, dtype=np.int64)
