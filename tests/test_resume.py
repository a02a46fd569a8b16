"""Exact resume: a run stopped in the middle of an epoch -- by SIGKILL in a real process, or
by an error in-process -- and continued with resume=true ends with the same results.json
numbers as the uninterrupted run, and its metrics log covers every epoch once."""

from __future__ import annotations

import csv
import json
import shlex
import sys
from pathlib import Path

import pytest
from helpers.callbacks import Interrupted
from helpers.cli import cli, kdlab_process

from kdlab.config import compose
from kdlab.pipeline import run

TESTS = Path(__file__).resolve().parent
# 1149 train examples / batch 64 = 17 steps per epoch: step 30 is in the middle of epoch 1
COMMON = ["trainer=cpu", "trainer.enable_progress_bar=false", "trainer.max_epochs=3", "seed=4",
          "teacher.max_epochs=2", "num_threads=1"]
METHODS = {
    "kd": ["method=kd"],
    # the global RNG inside the step: dropout masks must be the same after a resume
    "kd, dropout student": ["method=kd", "student=mlp", "student.dropout=0.5"],
    "alm_kd": ["method=alm_kd", "method.meta_start=1", "method.meta_every=1",
               "noise=symmetric", "noise.rate=0.3"],
    "pskd": ["method=pskd"],
}
STOP = "+callbacks.stop={_target_: helpers.callbacks.StopAt, kill: %s}"


def check_same_results(run_dir: Path, reference: dict) -> None:
    results = json.loads((run_dir / "results.json").read_text())
    for key in ("test", "test_last", "val", "best_epoch", "selection"):
        assert results[key] == reference[key], key
    if "mixing" in reference:
        assert results["mixing"] == reference["mixing"]
    rows = list(csv.DictReader((run_dir / "logs" / "metrics.csv").open()))
    # one val point per epoch (counted from 1), one row of each final test
    assert sorted(int(r["epoch"]) for r in rows if r.get("val/acc")) == [1, 2, 3]
    assert [int(r["epoch"]) for r in rows if r.get("test/acc") or r.get("test_last/acc")] == [
        3, 3]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("resume-cache")
    return {"KDLAB_CACHE_DIR": str(cache), "PYTHONPATH": str(TESTS)}


@pytest.mark.parametrize("method", ["kd", "kd, dropout student", "pskd"])
def test_interrupted_then_resumed_reproduces_the_run(method, tmp_path, env, monkeypatch):
    monkeypatch.setenv("KDLAB_CACHE_DIR", env["KDLAB_CACHE_DIR"])
    args = [*COMMON, *METHODS[method], STOP % "false"]
    reference = run(compose(args), tmp_path / "reference")
    run_dir = tmp_path / "stopped"
    monkeypatch.setenv("KDLAB_TEST_STOP_AT_STEP", "30")
    with pytest.raises(Interrupted):
        run(compose(args), run_dir)
    monkeypatch.delenv("KDLAB_TEST_STOP_AT_STEP")
    assert (run_dir / "checkpoints" / "last.ckpt").exists()
    assert json.loads((run_dir / "failed.json").read_text())["status"] == "failed"
    # without resume=true the unfinished directory is refused; with another config too
    refused = cli("train", *args, f"hydra.run.dir={run_dir}", cwd=tmp_path, env=env)
    assert refused.returncode == 1 and "resume=true" in refused.stderr
    other = cli("train", *args, "seed=5", "resume=true", f"hydra.run.dir={run_dir}",
                cwd=tmp_path, env=env)
    assert other.returncode == 1 and "differs in: seed" in other.stderr
    resumed = cli("train", *args, "resume=true", f"hydra.run.dir={run_dir}", cwd=tmp_path,
                  env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not (run_dir / "failed.json").exists()
    check_same_results(run_dir, reference)


def test_sigkill_mid_epoch_then_resume_reproduces_the_run(tmp_path, env, monkeypatch):
    """A real SIGKILL (ALM-KD: the most method state) in a process of its own."""
    monkeypatch.setenv("KDLAB_CACHE_DIR", env["KDLAB_CACHE_DIR"])
    args = [*COMMON, *METHODS["alm_kd"], STOP % "true"]
    reference = run(compose(args), tmp_path / "reference")
    run_dir = tmp_path / "killed"
    killed = kdlab_process("train", *args, f"hydra.run.dir={run_dir}", cwd=tmp_path,
                           env={**env, "KDLAB_TEST_STOP_AT_STEP": "30"})
    assert killed.returncode == -9
    assert (run_dir / "checkpoints" / "last.ckpt").exists()
    assert not (run_dir / "results.json").exists()
    resumed = cli("train", *args, "resume=true", f"hydra.run.dir={run_dir}", cwd=tmp_path,
                  env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    check_same_results(run_dir, reference)


def test_a_run_stopped_after_its_last_epoch_resumes_into_the_same_results(tmp_path,
                                                                          monkeypatch):
    """Stopped between the last checkpoint and results.json (e.g. while testing): resuming
    trains nothing, tests, and keeps every row of the metrics log (whose train/ and val/
    columns the resumed process never logs)."""
    monkeypatch.setenv("KDLAB_CACHE_DIR", str(tmp_path / "cache"))
    args = ["method=ce", "trainer=cpu", "trainer.enable_progress_bar=false",
            "trainer.max_epochs=2", "num_threads=1"]
    reference = run(compose(args), tmp_path / "run")
    log = tmp_path / "run" / "logs" / "metrics.csv"
    rows = list(csv.DictReader(log.open()))
    (tmp_path / "run" / "results.json").unlink()
    again = run(compose([*args, "resume=true"]), tmp_path / "run")
    for key in ("test", "test_last", "val", "best_epoch", "epochs", "selection"):
        assert again[key] == reference[key], key
    after = list(csv.DictReader(log.open()))
    assert [r for r in after if r.get("train/loss_epoch")] == [
        r for r in rows if r.get("train/loss_epoch")]
    # the final tests once each: the selected epoch (test/) and the last (test_last/)
    assert sum(1 for r in after if r.get("test/acc")) == 1
    assert sum(1 for r in after if r.get("test_last/acc")) == 1
    assert not list(log.parent.glob("metrics.before-resume.csv"))


# -- a sweep -----------------------------------------------------------------------------------

SWEEP = ["method=ce,kd", "seed=0,1", "trainer=cpu", "trainer.max_epochs=2",
         "teacher.max_epochs=1"]


def read_csv(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(path.open()))


@pytest.fixture
def ctrl_c(monkeypatch):
    """``ctrl_c["method"] = NAME``: the next student of that method with seed 0 gets a Ctrl-C
    at step 25 (in epoch 2, after epoch 1's checkpoint), as a user stopping it would;
    Lightning's own SIGINT handling is undone after."""
    import signal

    from helpers.callbacks import StopAt

    import kdlab.train

    build = kdlab.train.build_trainer

    def build_with_ctrl_c(cfg, output_dir, callbacks):
        if cfg.choices.method == armed["method"] and cfg.seed == 0:
            armed["method"] = None
            callbacks = [*callbacks, StopAt(step=25, ctrl_c=True)]
        return build(cfg, output_dir, callbacks)

    armed = {"method": None}
    monkeypatch.setattr(kdlab.train, "build_trainer", build_with_ctrl_c)
    handler = signal.getsignal(signal.SIGINT)
    yield armed
    signal.signal(signal.SIGINT, handler)


def test_a_run_stopped_by_ctrl_c_says_how_to_continue_it(tmp_path, ctrl_c):
    run_dir = tmp_path / "outputs" / "ce"
    args = ["method=ce", "trainer=cpu", "trainer.max_epochs=2", "num_threads=1",
            "trainer.enable_progress_bar=false", "hydra.run.dir=outputs/ce"]
    ctrl_c["method"] = "ce"
    stopped = cli("train", *args, cwd=tmp_path)
    assert stopped.returncode == 130
    assert stopped.stderr.splitlines()[-2:] == [
        "kdlab: interrupted: outputs/ce", "kdlab: continue this run with: sh outputs/ce/resume.sh"]
    assert json.loads((run_dir / "failed.json").read_text())["status"] == "interrupted"
    *_, cd, command = (run_dir / "resume.sh").read_text().splitlines()
    assert shlex.split(cd) == ["cd", str(tmp_path), "||", "exit", "1"]
    assert shlex.split(command)[2:] == ["train", *args[:-1], f'hydra.run.dir="{run_dir}"',
                                        "resume=true"]
    resumed = cli(*shlex.split(command)[2:], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((run_dir / "results.json").read_text())["status"] == "finished"
    assert "resuming from" in (run_dir / "train.log").read_text()


def test_a_sweep_stopped_mid_way_and_resumed_reports_as_if_never_stopped(tmp_path, env,
                                                                        ctrl_c):
    """method=ce,kd x seed=0,1, stopped by Ctrl-C in the third job (kd, seed 0: after its
    first epoch's checkpoint); that job continued on its own with the resume.sh it wrote,
    the rest with the sweep's command + resume=true: the same directories, and the report of
    the uninterrupted sweep (run with other non-experiment settings: logger, threads)."""
    run_env = {**env, "KDLAB_CACHE_DIR": str(tmp_path / "cache")}
    reference_dir = tmp_path / "reference"
    reference = cli("train", "-m", *SWEEP, "logger=csv", "trainer.enable_progress_bar=false",
                    "num_threads=1", f"hydra.sweep.dir={reference_dir}", cwd=tmp_path,
                    env=run_env)
    assert reference.returncode == 0, reference.stderr[-3000:]
    names = sorted(d.name for d in reference_dir.iterdir() if d.is_dir())
    assert names == [f"method={m},seed={s},teacher.max_epochs=1,trainer.max_epochs=2,"
                     "trainer=cpu" for m in ("ce", "kd") for s in (0, 1)]

    ctrl_c["method"] = "kd"
    stopped = cli("train", "-m", *SWEEP, cwd=tmp_path, env=run_env)  # multirun/<date>/<time>
    assert stopped.returncode == 130
    (sweep,) = (tmp_path / "multirun").glob("*/*")
    jobs = {name: sweep / name for name in names}
    ce0, ce1, kd0, kd1 = jobs.values()
    assert (ce0 / "results.json").exists() and (ce1 / "results.json").exists()
    assert not kd1.exists()  # never started
    assert not (kd0 / "results.json").exists() and (kd0 / "checkpoints" / "last.ckpt").exists()
    assert json.loads((kd0 / "failed.json").read_text())["status"] == "interrupted"
    hint = stopped.stderr.splitlines()[-1]
    assert hint.startswith("kdlab: continue the sweep") and "resume=true" in hint

    # one job on its own: the command it wrote (sweep job directory names hold = and ,)
    script = (kd0 / "resume.sh").read_text().splitlines()
    cd, command = shlex.split(script[-2]), shlex.split(script[-1])
    assert cd[:2] == ["cd", str(tmp_path)] and command[0] == "exec"
    assert command[1] == str(Path(sys.executable).with_name("kdlab")) and command[2] == "train"
    assert command[-2:] == [f'hydra.run.dir="{kd0}"', "resume=true"]
    without = cli(*[a for a in command[2:] if a != "resume=true"], cwd=tmp_path, env=run_env)
    assert without.returncode == 1  # refused, pointing to the script
    assert without.error_lines == [f"kdlab: error: {kd0} holds an unfinished run "
                                   f"(checkpoints/last.ckpt); continue it with sh "
                                   f"{kd0 / 'resume.sh'} or choose another hydra.run.dir"]
    alone = cli(*command[2:], cwd=Path(cd[1]), env=run_env)
    assert alone.returncode == 0, alone.stderr[-3000:]
    assert "resuming from" in (kd0 / "train.log").read_text()
    done = (kd0 / "results.json").read_bytes()
    again = cli(*command[2:], cwd=tmp_path, env=run_env)  # finished: skipped, not touched
    assert again.returncode == 0 and f"kdlab: already finished: {kd0}, skipped" in again.stdout
    assert (kd0 / "results.json").read_bytes() == done

    # the rest: the sweep's own command + resume=true (overrides in any order) finds the
    # sweep and skips the finished jobs
    finished = {d: (d / "results.json").read_bytes() for d in (ce0, ce1, kd0)}
    reordered = ["seed=1,0", "method=kd,ce", *SWEEP[2:][::-1]]
    resumed = cli("train", "-m", *reordered, "resume=true", cwd=tmp_path, env=run_env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"kdlab: resuming the sweep in multirun/{sweep.parent.name}/{sweep.name}" in \
        resumed.stderr
    for d, before in finished.items():
        assert f"already finished: {d}, skipped" in resumed.stdout
        assert (d / "results.json").read_bytes() == before
    assert sorted(d.name for d in sweep.iterdir() if d.is_dir()) == names
    assert (kd1 / "results.json").exists()

    for d in (reference_dir, sweep):
        assert cli("report", str(d), cwd=tmp_path).returncode == 0
    assert read_csv(sweep / "report.csv") == read_csv(reference_dir / "report.csv")
    assert list(read_csv(sweep / "report.csv")[0])[:3] == ["method", "n", "seeds"]

    # extended with a seed: only the new job runs
    extended = cli("train", "-m", "method=ce", "seed=0,1,2", *SWEEP[2:], "resume=true",
                   f"hydra.sweep.dir={sweep}", cwd=tmp_path, env=run_env)
    assert extended.returncode == 0, extended.stderr[-3000:]
    assert extended.stdout.count("already finished:") == 2
    assert (sweep / names[0].replace("seed=0", "seed=2") / "results.json").exists()
