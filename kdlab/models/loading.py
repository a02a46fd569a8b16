"""Loading teacher weights: kdlab checkpoints, plain state_dicts, torchvision weights.

Files are always read with ``torch.load(..., weights_only=True)``: a checkpoint holding
pickled objects that could run code is refused unless the user opts in explicitly with
``teacher.allow_pickle=true`` for a file they trust. Shapes are checked strictly and a
mismatch names the tensors that differ.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from ..errors import TeacherLoadError

# Prefixes that wrappers put in front of parameter names: kdlab/Lightning ("student."),
# DataParallel/DDP ("module."), and common training scripts ("model.").
_PREFIXES = ("student.", "module.", "model.", "_orig_mod.")


def read_checkpoint(path: str | Path, allow_pickle: bool = False) -> object:
    """``torch.load`` with ``weights_only`` unless explicitly allowed; one-line errors."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise TeacherLoadError(
            f"teacher checkpoint not found: {path}; give an existing file with "
            "teacher.ckpt=PATH, or teacher.ckpt=auto to train the teacher first")
    try:
        return torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except pickle.UnpicklingError as e:
        if allow_pickle:
            raise TeacherLoadError(f"cannot read checkpoint {path}: {e}") from None
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TeacherLoadError(
            f"refusing to load {path}: it holds pickled objects other than tensors "
            f"({first}); only if you trust the file, set teacher.allow_pickle=true") from None
    except Exception as e:  # truncated / not a torch file
        raise TeacherLoadError(
            f"cannot read checkpoint {path} ({type(e).__name__}: {str(e)[:120]}); the file "
            "is truncated or not a torch checkpoint") from None


def extract_state_dict(obj: object) -> dict[str, Tensor]:
    """The model weights inside a kdlab/Lightning checkpoint or a plain state_dict."""
    if isinstance(obj, Mapping) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise TeacherLoadError("checkpoint holds no state_dict of tensors")
    state = dict(obj)
    # A kdlab checkpoint also holds method state ("method.*"): keep the student's part.
    if any(k.startswith("student.") for k in state):
        state = {k: v for k, v in state.items() if k.startswith("student.")}
    for prefix in _PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def check_compatible(model: nn.Module, state: Mapping[str, Tensor], what: str) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
             for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if not (missing or unexpected or wrong):
        return
    parts = []
    if wrong:
        parts.append("shape mismatch " + "; ".join(wrong[:4]) + (" ..." if len(wrong) > 4 else ""))
    if missing:
        parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
    raise TeacherLoadError(f"{what} does not fit the model: " + "; ".join(parts)
                           + " -- wrong architecture or number of classes?")


def load_weights(model: nn.Module, ckpt: str, allow_pickle: bool = False) -> nn.Module:
    """Load ``ckpt`` into ``model``: a file path, or ``tv:<WeightsEnum.NAME>`` for torchvision."""
    if ckpt.startswith("tv:"):
        import torchvision

        weights = torchvision.models.get_weight(ckpt[3:])
        state = weights.get_state_dict(progress=True, check_hash=True)
        what = f"torchvision weights {ckpt[3:]}"
    else:
        state = extract_state_dict(read_checkpoint(ckpt, allow_pickle))
        what = f"checkpoint {ckpt}"
    check_compatible(model, state, what)
    model.load_state_dict(state, strict=True)
    return model


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode, no gradients: a teacher is never trained."""
    model.eval()
    model.requires_grad_(False)
    return model
