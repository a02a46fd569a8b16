"""scripts/reproduce_cifar100.py: the plan and its GPU-hour estimate (dry run), then a tiny
real reproduction against a local CIFAR-100 server (one pair, two methods, two seeds, one
epoch, resnet8 for teacher and student), its table checked against the runs' results.json,
and a resumed run after an interruption."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers.cifar import LocalServer, make_cifar100
from helpers.cli import cli
from helpers.scripts import loaded_script

TINY_RUN = ["trainer=cpu", "trainer.enable_progress_bar=false", "num_threads=1",
            "dataset.batch_size=16", "+trainer.limit_train_batches=2"]


@pytest.fixture(scope="module")
def script():
    yield from loaded_script("reproduce_cifar100")


def test_dry_run_plans_the_readme_table_and_estimates_its_gpu_hours(script, tmp_path,
                                                                    monkeypatch, capsys):
    flops = {"wrn_40_2": 6e8, "resnet56": 2.5e8, "resnet110": 5e8, "resnet32x4": 2.2e9,
             "vgg13": 4.6e8, "wrn_16_2": 2e8, "wrn_40_1": 1.7e8, "resnet20": 8e7,
             "resnet32": 1.4e8, "resnet8x4": 3.5e8, "vgg8": 1.4e8, "shufflenetv2": 9e7}
    monkeypatch.setattr(script, "forward_flops", lambda arch: flops[arch])
    assert script.main(["--dry-run", "--out", str(tmp_path / "out")], kdlab=None) == 0
    out = capsys.readouterr().out
    assert not (tmp_path / "out").exists()
    assert "total: 5 teacher runs + 63 student runs; 0 finished (skipped), 0 to resume, " \
           "68 new" in out
    # the estimate, from the stated assumption: 240 epochs of 45,000 training images at
    # 25 TFLOP/s but at least 12 ms per step of 64, + 5,000 validation images; the test set
    # twice at the end
    rate, steps = 25e12, 45_000 // 64
    hours = 0.0
    for teacher, student in [("wrn_40_2", "wrn_16_2"), ("wrn_40_2", "wrn_40_1"),
                             ("resnet56", "resnet20"), ("resnet110", "resnet32"),
                             ("resnet32x4", "resnet8x4"), ("vgg13", "vgg8"),
                             ("resnet32x4", "shufflenetv2")]:
        for method in ("ce", "kd", "dkd"):
            reads = 0 if method == "ce" else flops[teacher]
            epoch = max(45_000 * (3 * flops[student] + reads) / rate, steps * 0.012) \
                + 5_000 * flops[student] / rate
            hours += 3 * (240 * epoch + 20_000 * (flops[student] + reads) / rate) / 3600
    for teacher in ("wrn_40_2", "resnet56", "resnet110", "resnet32x4", "vgg13"):
        epoch = max(45_000 * 3 * flops[teacher] / rate, steps * 0.012) \
            + 5_000 * flops[teacher] / rate
        hours += (240 * epoch + 20_000 * flops[teacher] / rate) / 3600
    assert f"estimated {hours:.1f} GPU hours to go" in out
    assert "assumption per epoch: 45,000 training images of 32x32 at 25 TFLOP/s" in out
    commands = [line.strip() for line in out.splitlines() if line.startswith("  kdlab train")]
    assert len(commands) == 8  # the teachers in one multirun, then one per pair
    assert commands[0].startswith("kdlab train -m experiment=cifar100_teacher_wrn_40_2,"
                                  "cifar100_teacher_resnet56,")
    assert "experiment=cifar100_resnet32x4_resnet8x4 method=ce,kd,dkd seed=0,1,2 " \
           "resume=true teacher.ckpt=" in out


@pytest.fixture(scope="module")
def tiny(script, tmp_path_factory):
    """One pair x ce,kd x seeds 0,1, one epoch of resnet8 <- resnet8 on generated CIFAR."""
    root = tmp_path_factory.mktemp("reproduce")
    served = root / "served"
    served.mkdir()
    md5, _ = make_cifar100(served, n_train=80, n_test=40, n_classes=2)
    server = LocalServer(served)
    env = {"KDLAB_CACHE_DIR": str(root / "cache")}
    calls = []

    def kdlab(args: list[str]) -> int:
        calls.append(list(args))
        return cli(*args, cwd=root, env=env).returncode

    argv = ["--out", str(root / "out"), "--pairs", "resnet32x4-resnet8x4", "--methods",
            "ce,kd", "--seeds", "0,1", "--epochs", "1", "--data-dir", str(root / "data"),
            "--teacher-arch", "resnet8", "--student-arch", "resnet8", "--", *TINY_RUN,
            f"+dataset.url={server.url('cifar-100-python.tar.gz')}", f"+dataset.md5={md5}"]
    try:
        code = script.main(argv, kdlab=kdlab)
    finally:
        server.close()
    return SimpleNamespace(root=root, out=root / "out", argv=argv, code=code, calls=calls,
                           env=env, requests=list(server.requests))


def results_of(folder: Path) -> dict:
    return json.loads((folder / "results.json").read_text())


def test_tiny_reproduction_writes_the_table_of_its_runs(tiny):
    assert tiny.code == 0
    assert tiny.requests == ["/cifar-100-python.tar.gz"]  # downloaded once, into --data-dir
    assert (tiny.root / "data" / "cifar100" / "cifar-100-python" / "train").is_file()
    trains = [c for c in tiny.calls if c[0] == "train"]
    assert len(trains) == 2 and all(c[1] == "-m" and "resume=true" in c for c in trains)
    pair = tiny.out / "pairs" / "cifar100_resnet32x4_resnet8x4"
    teacher = results_of(tiny.out / "teachers" / "cifar100_teacher_resnet32x4")
    assert (teacher["method"], teacher["student"]["name"], teacher["epochs"]) == (
        "ce", "resnet8", 1)
    runs = {(m, s): results_of(pair / f"{m}-seed{s}") for m in ("ce", "kd") for s in (0, 1)}
    for (method, seed), results in runs.items():
        assert (results["method"], results["seed"], results["student"]["name"]) == (
            method, seed, "resnet8")
    for seed in (0, 1):  # KD read the teacher trained above
        (t,) = runs[("kd", seed)]["teachers"]
        assert t["name"] == "resnet8" and Path(t["ckpt"]) == (
            tiny.out / "teachers" / "cifar100_teacher_resnet32x4" / "checkpoints" / "best.ckpt")

    table = (tiny.out / "table.md").read_text().splitlines()
    head = [c.strip() for c in table[0].strip("|").split("|")]
    (row,) = [line for line in table if line.startswith("| resnet32x4 -> resnet8x4 |")]
    cells = dict(zip(head, [c.strip() for c in row.strip("|").split("|")], strict=True))
    assert cells["published KD"] == "73.33" and cells["published teacher"] == "79.42"
    assert cells["kdlab teacher"] == f"{100 * teacher['test']['acc']:.2f}"
    for method, column in (("ce", "kdlab CE"), ("kd", "kdlab KD")):
        accs = [100 * runs[(method, s)]["test"]["acc"] for s in (0, 1)]
        assert cells[column] == f"{statistics.fmean(accs):.2f} ± {statistics.stdev(accs):.2f}"
    assert cells["seeds"] == "0,1"
    assert "teachers replaced by resnet8; students replaced by resnet8" in "\n".join(table)
    for part in ("pairs", "teachers"):
        assert (tiny.out / part / "report.md").is_file()
        assert (tiny.out / part / "report.html").is_file()


def test_finished_runs_are_skipped_and_an_interrupted_one_resumed(script, tiny, capsys):
    pair = tiny.out / "pairs" / "cifar100_resnet32x4_resnet8x4"
    interrupted = pair / "kd-seed1"
    before = results_of(interrupted)
    (interrupted / "results.json").unlink()  # as if stopped after its last checkpoint
    untouched = (pair / "ce-seed0" / "results.json").stat().st_mtime_ns
    capsys.readouterr()
    assert script.main([*tiny.argv[:tiny.argv.index("--")], "--dry-run"], kdlab=None) == 0
    plan = capsys.readouterr().out
    assert "4 finished (skipped), 1 to resume, 0 new" in plan
    calls = []

    def kdlab(args: list[str]) -> int:
        calls.append(list(args))
        return cli(*args, cwd=tiny.root, env=tiny.env).returncode

    assert script.main(tiny.argv, kdlab=kdlab) == 0
    (train,) = [c for c in calls if c[0] == "train"]
    assert "method=kd" in train and "seed=1" in train and "resume=true" in train
    after = results_of(interrupted)
    assert after["test"] == before["test"] and after["epochs"] == before["epochs"]
    assert (pair / "ce-seed0" / "results.json").stat().st_mtime_ns == untouched
