"""A real 2-process CPU DDP run (gloo) through the console script: ranks agree on weights,
method state and metrics, and only rank 0 writes results."""

import json
from pathlib import Path

import pytest
from helpers.cli import kdlab_process

TESTS = Path(__file__).resolve().parent
METHODS = {
    # KD's loss plus method state that DDP must keep equal: a meta pass at epoch 1, where
    # every rank updates the rows of its chunks and the table is merged
    "alm_kd": ["method=alm_kd", "method.meta_start=1", "method.meta_every=1",
               "noise=symmetric", "noise.rate=0.3"],
    # a controller update after every step: hypergradients averaged over the ranks
    "tgeo_kd": ["method=tgeo_kd"],
}


@pytest.mark.parametrize("method", list(METHODS))
def test_two_process_cpu_ddp(method, tmp_path):
    run_dir = tmp_path / "ddp"
    out = kdlab_process("train", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
                        "trainer.max_epochs=2", "+trainer.limit_train_batches=4",
                        "trainer.enable_progress_bar=false",
                        *METHODS[method], "dataset.batch_size=32", "seed=5",
                        "teacher.max_epochs=2",
                        "+callbacks.digest={_target_: helpers.callbacks.RankDigest}",
                        f"hydra.run.dir={run_dir}", cwd=tmp_path,
                        env={"KDLAB_CACHE_DIR": str(tmp_path / "cache"),
                             "PYTHONPATH": str(TESTS)})
    assert out.returncode == 0, out.stderr[-3000:]
    ranks = [json.loads((run_dir / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]
    # weights, BN statistics and method state (ALM-KD's table, TGeo-KD's controller and its
    # optimiser state) after training, per rank
    assert ranks[0]["state_sha256"] == ranks[1]["state_sha256"]
    assert ranks[0]["val"] == ranks[1]["val"] and "val/acc" in ranks[0]["val"]
    results = json.loads((run_dir / "results.json").read_text())
    if method == "alm_kd":
        assert results["mixing"]["meta_passes"] == 1
    # the val split was sharded over the ranks and the metric synced: 144 examples in all
    assert results["split_sizes"]["val"] == 144
    assert sorted(p.name for p in run_dir.glob("checkpoints/*.ckpt")) == ["best.ckpt",
                                                                          "last.ckpt"]
    # no stray run directories from the re-launched rank
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "multirun").exists()
