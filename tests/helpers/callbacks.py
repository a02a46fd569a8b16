"""Lightning callbacks that tests add to real runs (``+callbacks.NAME={_target_: ...}``)."""

from __future__ import annotations

import hashlib
import os
import signal
from pathlib import Path

import pytorch_lightning as pl
import torch

from kdlab.io import atomic_torch_save, atomic_write_json


class RankDigest(pl.Callback):
    """After fit, each DDP rank writes a digest of its weights and method state and its last
    validation metrics into <run dir>/ranks/rankR.json: they must agree across ranks."""

    def on_fit_end(self, trainer, pl_module) -> None:
        digest = hashlib.sha256()
        for name, tensor in sorted(pl_module.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        val = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        path = Path(trainer.default_root_dir) / "ranks" / f"rank{trainer.global_rank}.json"
        atomic_write_json(path, {"rank": trainer.global_rank, "state_sha256": digest.hexdigest(),
                                 "val": val})


class Interrupted(Exception):
    pass


class StopAt(pl.Callback):
    """Stop training at training step ``step`` (after its optimiser step), as a failure
    would: SIGKILL this process when ``kill``, a Ctrl-C (KeyboardInterrupt) when ``ctrl_c``,
    else raise :class:`Interrupted`. The step may also come from the environment
    (KDLAB_TEST_STOP_AT_STEP), so that the stopped run and its resumption share one config;
    without either the callback does nothing."""

    def __init__(self, step: int | None = None, kill: bool = False, ctrl_c: bool = False):
        env = os.environ.get("KDLAB_TEST_STOP_AT_STEP")
        self.step = int(step) if step is not None else (int(env) if env else None)
        self.kill, self.ctrl_c = kill, ctrl_c

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.step is not None and trainer.global_step >= self.step:
            if self.kill:
                os.kill(os.getpid(), signal.SIGKILL)
            if self.ctrl_c:
                raise KeyboardInterrupt
            raise Interrupted(f"stopped at step {trainer.global_step}")


class ScriptedVal(pl.Callback):
    """Makes the module log a scripted value for some val metrics (one value per epoch:
    ``acc=[0.5, 0.9, ...]`` for ``val/acc``) instead of the measured one, so that a run's val
    history ties as a test wants; and saves the student's weights after every epoch to
    <run dir>/scripted/epoch<N>.pt (N from 1), to compare with best.ckpt."""

    def __init__(self, **script: list[float]):
        self.script = {f"val/{name}": list(values) for name, values in script.items()}

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        """Runs before the module's hook, which logs what ``val_metrics.compute()`` gives."""
        if trainer.sanity_checking:
            return
        metrics, epoch = pl_module.val_metrics, trainer.current_epoch
        measured = type(metrics).compute.__get__(metrics)

        def scripted():
            values = measured()
            values.update({k: torch.tensor(v[epoch]) for k, v in self.script.items()})
            return values

        metrics.compute = scripted  # for this validation only (see on_validation_end)

    def on_validation_end(self, trainer, pl_module) -> None:
        pl_module.val_metrics.__dict__.pop("compute", None)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        path = Path(trainer.default_root_dir) / "scripted" / f"epoch{trainer.current_epoch + 1}.pt"
        atomic_torch_save(pl_module.student.state_dict(), path)


class SeenIds(pl.Callback):
    """Each DDP rank writes the ids of the training examples it saw, per epoch, into
    <run dir>/ranks/ids_rankR.json ({epoch: [ids in order]}) at the end of fit."""

    def __init__(self):
        self.seen: dict[int, list[int]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.seen.setdefault(trainer.current_epoch, []).extend(batch["id"].tolist())

    def on_fit_end(self, trainer, pl_module) -> None:
        path = Path(trainer.default_root_dir) / "ranks" / f"ids_rank{trainer.global_rank}.json"
        atomic_write_json(path, {str(e): ids for e, ids in self.seen.items()})
