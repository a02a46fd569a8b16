"""Under load: a multirun of 8 tiny jobs, 2 at a time, one of them failing."""

import json


def test_eight_jobs_two_parallel_one_failing(tmp_path, kdlab_cli):
    sweep = tmp_path / "sweep"
    fractions = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 1.5]  # 1.5 is invalid
    out = kdlab_cli("train", "-m", "method=ce", "student=mlp", "trainer=cpu",
                    "trainer.max_epochs=1", "trainer.enable_progress_bar=false",
                    "dataset.meta_fraction=" + ",".join(map(str, fractions)),
                    "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                    f"hydra.sweep.dir={sweep}", cwd=tmp_path, cache=tmp_path / "cache",
                    check=False)
    assert out.returncode != 0  # the sweep reports its failed job...
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and (p / ".hydra").is_dir())
    assert len(jobs) == 8
    finished = [j for j in jobs if (j / "results.json").exists()]
    failed = [j for j in jobs if (j / "failed.json").exists()]
    assert len(finished) == 7 and len(failed) == 1  # ...and the other seven all finished
    assert "meta_fraction" in json.loads((failed[0] / "failed.json").read_text())["error"]
    n_train = 1437  # digits train+meta part
    for job in finished:
        results = json.loads((job / "results.json").read_text())
        fraction = float(job.name.split("meta_fraction=")[1].split(",")[0])
        meta = results["split_sizes"]["meta"]
        assert abs(meta - fraction * n_train) <= 1
        assert results["split_sizes"]["train"] + meta == n_train
        assert results["method"] == "ce" and 0 <= results["test"]["acc"] <= 1
