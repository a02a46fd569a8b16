"""Forward hooks that collect named intermediate outputs, so model code stays plain."""

from __future__ import annotations

from collections.abc import Iterable

from torch import Tensor, nn


class FeatureHooks:
    """``with FeatureHooks(model, ["layer2"]) as feats: model(x)`` fills ``feats`` by path."""

    def __init__(self, model: nn.Module, paths: Iterable[str]):
        self.model = model
        self.paths = tuple(paths)
        self.features: dict[str, Tensor] = {}
        self._handles = []

    def __enter__(self) -> dict[str, Tensor]:
        modules = dict(self.model.named_modules())
        for path in self.paths:
            if path not in modules:
                top = ", ".join(n for n, _ in self.model.named_children())
                raise ValueError(f"no module at path {path!r} in {type(self.model).__name__}; "
                                 f"top-level modules: {top}")
            self._handles.append(modules[path].register_forward_hook(self._store(path)))
        return self.features

    def _store(self, path: str):
        def hook(module, inputs, output):
            self.features[path] = output

        return hook

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def find_classifier(model: nn.Module) -> tuple[str, nn.Linear]:
    """The model's final linear layer: ``model.classifier`` if it is one, else the last Linear."""
    head = getattr(model, "classifier", None)
    if isinstance(head, nn.Linear):
        return "classifier", head
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear output layer")
    return linears[-1]
