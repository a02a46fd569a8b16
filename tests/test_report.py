"""`kdlab report` on a real multirun (basic launcher, with failing jobs), checked against the
runs' own results.json; grouping, metrics and plots in-process on hand-made run dirs."""

from __future__ import annotations

import csv
import json
import shutil
import statistics
from pathlib import Path

import pytest
import yaml
from helpers.cli import cli
from helpers.methods import REPORT_PROBE_DRAWN
from helpers.runs import METHOD_TARGETS, write_run

from kdlab import report
from kdlab.cli import report_main

TINY = ["trainer=cpu", "trainer.max_epochs=1", "trainer.enable_progress_bar=false",
        "num_threads=1", "teacher.max_epochs=1"]
METRICS = ("test.acc", "test.ece", "test_last.acc", "test_last.ece")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """method=ce,kd x seed=0,1 x noise.rate=0,2: the 4 jobs with rate 2 fail, 4 finish;
    plus an unfinished run (a job killed before training: only Hydra's .hydra/ exists)."""
    root = tmp_path_factory.mktemp("report")
    sweep_dir = root / "sweep"
    env = {"KDLAB_CACHE_DIR": str(root / "cache")}
    train = cli("train", "-m", "method=ce,kd", "seed=0,1", "noise.rate=0,2", *TINY,
                f"hydra.sweep.dir={sweep_dir}", cwd=root, env=env)
    (first,) = sweep_dir.glob("method=ce,noise.rate=0,seed=0,*")
    shutil.copytree(first / ".hydra", sweep_dir / "unfinished" / ".hydra")
    printed = cli("report", str(sweep_dir), cwd=root)
    assert printed.returncode == 0, printed.stderr
    return sweep_dir, train, printed


def runs_by_status(sweep_dir: Path) -> tuple[list[Path], list[Path]]:
    jobs = sorted(d for d in sweep_dir.iterdir() if d.is_dir() and d.name.startswith("method="))
    return ([d for d in jobs if (d / "results.json").exists()],
            [d for d in jobs if (d / "failed.json").exists()])


def test_basic_launcher_multirun_runs_every_job(sweep):
    sweep_dir, train, _ = sweep
    finished, failed = runs_by_status(sweep_dir)
    assert len(finished) == 4 and len(failed) == 4
    # a failing job stops neither the sweep nor the other jobs; the sweep reports it
    assert train.returncode != 0 and "noise.rate must be in [0, 1]" in train.stderr
    for d in failed:
        assert "noise.rate=2" in d.name
        error = json.loads((d / "failed.json").read_text())["error"]
        assert "noise.rate must be in [0, 1]" in error
    for d in finished:
        results = json.loads((d / "results.json").read_text())
        assert "noise.rate=0" in d.name.split(",") and results["method"] in d.name
        assert len(results["teachers"]) == (results["method"] == "kd")


def test_report_numbers_match_the_runs_results(sweep):
    sweep_dir, _, printed = sweep
    finished, _ = runs_by_status(sweep_dir)
    results = [json.loads((d / "results.json").read_text()) for d in finished]
    rows = list(csv.DictReader((sweep_dir / "report.csv").open()))
    # default grouping: method + the overrides that vary (noise.rate), never the seed
    assert list(rows[0])[:4] == ["method", "noise.rate", "n", "seeds"]
    assert [(r["method"], r["noise.rate"], r["n"], r["seeds"]) for r in rows] == [
        ("ce", "0", "2", "0,1"), ("kd", "0", "2", "0,1")]
    md = (sweep_dir / "report.md").read_text()
    for row in rows:
        group = [r for r in results if r["method"] == row["method"]]
        for metric in METRICS:
            split, name = metric.split(".")
            values = [r[split][name] for r in group]
            mean, std = statistics.fmean(values), statistics.stdev(values)
            assert float(row[f"{metric}_mean"]) == pytest.approx(mean, rel=1e-12, abs=1e-15)
            assert float(row[f"{metric}_std"]) == pytest.approx(std, rel=1e-12, abs=1e-15)
            assert f"{mean:.4f} ± {std:.4f}" in md
        teacher = [r["teachers"][0]["test"]["acc"] for r in group if r["teachers"]]
        if row["method"] == "kd":
            assert float(row["teacher.acc_mean"]) == pytest.approx(statistics.fmean(teacher))
        else:
            assert row["teacher.acc_mean"] == "" and row["teacher.acc_n"] == "0"
    header = next(line for line in printed.stdout.splitlines() if line.startswith("| method"))
    assert [c.strip() for c in header.strip("|").split("|")][:5] == [
        "method", "noise.rate", "n", "seeds", "test acc (best)"]


def test_failed_and_unfinished_runs_are_listed_not_averaged(sweep):
    sweep_dir, _, _ = sweep
    _, failed = runs_by_status(sweep_dir)
    md = (sweep_dir / "report.md").read_text()
    table, listed = md.split("## Failed or unfinished runs")
    assert "4 finished runs in 2 groups; 5 failed or unfinished" in table
    for d in failed:
        line = next(line for line in listed.splitlines() if line.startswith(f"| {d.name} "))
        assert "| failed " in line and "noise.rate must be in [0, 1], got 2.0" in line
    line = next(line for line in listed.splitlines() if line.startswith("| unfinished "))
    assert "| unfinished " in line


def test_report_files(sweep):
    sweep_dir, _, printed = sweep
    for name in ("report_acc_vs_ece.png", "report_reliability.png"):
        assert (sweep_dir / name).stat().st_size > 10_000
    assert not (sweep_dir / "report_mixing.png").exists()  # no ALM-KD run here
    assert f"wrote {sweep_dir / 'report.md'}" in printed.stdout


def test_by_metric_and_out(sweep, tmp_path):
    sweep_dir, _, _ = sweep
    finished, _ = runs_by_status(sweep_dir)
    report_main([str(sweep_dir), "--by", "method", "--metric",
                 "val.acc,nll,teacher.acc,teacher.agreement", "--out", str(tmp_path / "out")])
    rows = list(csv.DictReader((tmp_path / "out" / "report.csv").open()))
    assert list(rows[0])[:3] == ["method", "n", "seeds"]
    assert [r["method"] for r in rows] == ["ce", "kd"]
    for row in rows:
        group = [json.loads((d / "results.json").read_text()) for d in finished]
        group = [r for r in group if r["method"] == row["method"]]
        assert float(row["val.acc_mean"]) == pytest.approx(
            statistics.fmean(r["val"]["acc"] for r in group))
        assert float(row["nll_mean"]) == pytest.approx(
            statistics.fmean(r["test"]["nll"] for r in group))
        agreement = [r["teachers"][0]["agreement"] for r in group if r["teachers"]]
        if agreement:  # the documented teacher.agreement is the first teacher's agreement
            assert float(row["teacher.agreement_mean"]) == pytest.approx(
                statistics.fmean(agreement))
    with pytest.raises(SystemExit) as e:
        report_main([str(sweep_dir), "--by", "noise.rat"])
    assert e.value.code == 2


def test_a_misspelled_metric_is_an_error_naming_the_right_one(sweep, tmp_path, capsys):
    sweep_dir, _, _ = sweep
    with pytest.raises(SystemExit) as e:
        report_main([str(sweep_dir), "--metric", "test.accc", "--out", str(tmp_path)])
    assert e.value.code == 2
    assert "--metric test.accc: no finished run has it; did you mean test.acc?" in \
        capsys.readouterr().err


# -- in-process, hand-made run directories ----------------------------------------------------


def fake_run(d: Path, method: str, rate: float, seed: int, acc: float, lr: float = 0.05,
             mixing: tuple[float, float] | None = None) -> None:
    """A run directory as train.py leaves it (config.yaml + results.json), without Hydra."""
    d.mkdir(parents=True)
    config = {"seed": seed, "method": {"_target_": METHOD_TARGETS[method]},
              "noise": {"type": "symmetric", "rate": rate}, "optimizer": {"lr": lr},
              "paths": {"data_dir": str(d)}, "choices": {"method": method}}
    (d / "config.yaml").write_text(yaml.safe_dump(config))
    results = {"status": "finished", "method": method, "seed": seed,
               "test": {"acc": acc, "ece": 0.1 * acc}, "test_last": {"acc": acc, "ece": 0.1},
               "teachers": [{"name": "cnn", "test": {"acc": 0.9}, "agreement": 0.8}],
               "reliability": {"n_bins": 3, "count": [1, 2, 3], "confidence": [0.1, 1.0, 2.5],
                               "correct": [0, 1, 3]}}
    if mixing:
        results["mixing"] = {"label_weight_clean": mixing[0], "label_weight_noisy": mixing[1]}
    (d / "results.json").write_text(json.dumps(results))


def test_grouping_mixing_plot_and_mixed_config_note(tmp_path, capsys):
    runs = tmp_path / "runs"
    fake_run(runs / "a0", "alm_kd", 0.4, 0, 0.80, mixing=(0.9, 0.2))
    fake_run(runs / "a1", "alm_kd", 0.4, 1, 0.84, mixing=(0.8, 0.3))
    fake_run(runs / "k0", "kd", 0.4, 0, 0.70)
    fake_run(runs / "k1", "kd", 0.4, 1, 0.72, lr=0.1)  # differs from k0 beyond the seed
    (runs / "k2").mkdir()
    (runs / "k2" / "config.yaml").write_text(yaml.safe_dump({"seed": 2}))
    (runs / "k2" / "failed.json").write_text(json.dumps({"status": "interrupted",
                                                         "error": "KeyboardInterrupt: "}))
    report_main([str(runs), "--by", "method,noise.rate"])
    rows = {r["method"]: r for r in csv.DictReader((runs / "report.csv").open())}
    assert rows["alm_kd"]["noise.rate"] == "0.4" and rows["alm_kd"]["n"] == "2"
    assert float(rows["alm_kd"]["test.acc_mean"]) == pytest.approx(0.82)
    assert float(rows["alm_kd"]["test.acc_std"]) == pytest.approx(statistics.stdev([0.8, 0.84]))
    assert float(rows["kd"]["teacher.acc_mean"]) == pytest.approx(0.9)
    md = (runs / "report.md").read_text()
    assert "mixes runs whose configs differ in optimizer.lr" in md
    assert "| k2    | interrupted |" in md, md
    for plot in ("report_acc_vs_ece.png", "report_reliability.png", "report_mixing.png"):
        assert (runs / plot).stat().st_size > 1000
    assert "| alm_kd   | 0.4          | 2   | 0,1     |" in capsys.readouterr().out
    # the pooled reliability bins of a group add up its runs' bins
    alm = [r for r in report.find_runs([runs]) if r.value("method") == "alm_kd"]
    assert report.pooled_reliability(alm)["count"] == [2.0, 4.0, 6.0]


def test_keys_that_do_not_change_the_experiment_never_split_a_group(tmp_path):
    """A job resumed with resume=true, another logger, other threads or data paths: still
    one group per method, without a note about differing configs."""
    runs = tmp_path / "runs"
    extras = {0: ["resume=true", "logger=[csv,wandb]", "num_threads=1"],
              1: ["trainer.enable_progress_bar=false", "paths.data_dir=/elsewhere"]}
    for seed, extra in extras.items():
        d = runs / f"kd-{seed}"
        fake_run(d, "kd", 0.4, seed, 0.7 + seed / 10)
        config = yaml.safe_load((d / "config.yaml").read_text())
        config.update(resume=seed == 0, logger={"csv": {}, **({"wandb": {}} if seed else {})})
        (d / "config.yaml").write_text(yaml.safe_dump(config))
        (d / ".hydra").mkdir()
        (d / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(
            ["method=kd", "noise=symmetric", "noise.rate=0.4", f"seed={seed}", *extra]))
    report_main([str(runs)])
    rows = list(csv.DictReader((runs / "report.csv").open()))
    assert [(r["method"], r["n"], r["seeds"]) for r in rows] == [("kd", "2", "0,1")]
    assert list(rows[0])[:3] == ["method", "n", "seeds"]
    assert float(rows[0]["test.acc_mean"]) == pytest.approx(0.75)
    assert "mixes runs" not in (runs / "report.md").read_text()


def test_no_runs_is_an_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        report_main([str(tmp_path)])
    assert e.value.code == 2 and "no run directories" in capsys.readouterr().err


def test_a_method_declares_its_own_columns_and_plots(tmp_path, capsys):
    """ReportProbe (tests/helpers/methods.py) names probe.score: it joins the default table
    under its header, its figure gets each group's mean and std, its run files the page."""
    runs = tmp_path / "runs"
    for name, seed, score in (("p0", 0, 0.25), ("p1", 1, 0.75), ("k0", 0, None)):
        method = "report_probe" if score is not None else "kd"
        target = "helpers.methods.ReportProbe" if score is not None else METHOD_TARGETS["kd"]
        d = write_run(runs / name, {"seed": seed, "choices": {"method": method},
                                    "method": {"_target_": target}},
                      {"status": "finished", "method": method, "seed": seed,
                       "test": {"acc": 0.5, "ece": 0.1}, "test_last": {"acc": 0.5, "ece": 0.1},
                       "teachers": [{"name": "cnn", "test": {"acc": 0.9}}],
                       **({"probe": {"score": score}} if score else {})})
        if score is not None:
            (d / "probe.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    REPORT_PROBE_DRAWN.clear()
    report_main([str(runs), "--html"])
    std = (2 * 0.25 ** 2) ** 0.5  # sample std of 0.25, 0.75: sqrt(((-.25)^2 + .25^2) / 1)
    md = (runs / "report.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| method"))
    assert header.split("|")[-2].strip() == "probe score"
    assert f"| 0.5000 ± {std:.4f} " in md and "![report_probe](report_probe.png)" in md
    rows = {r["method"]: r for r in csv.DictReader((runs / "report.csv").open())}
    assert float(rows["report_probe"]["probe.score_mean"]) == pytest.approx(0.5)
    assert rows["kd"]["probe.score_mean"] == ""
    ((groups, path),) = REPORT_PROBE_DRAWN  # drawn once, over the groups that have a score
    assert path == runs / "report_probe.png"
    assert [(g.label, g.mean, g.std) for g in groups] == [
        ("method=report_probe", {"probe.score": 0.5}, {"probe.score": pytest.approx(std)})]
    page = (runs / "report.html").read_text()
    assert "the probe&#x27;s score per group" in page
    assert "<h2>probe figures, run by run</h2>" in page and page.count("(seed ") == 2
    capsys.readouterr()
    # --metric names the columns: the declared key only when asked for
    report_main([str(runs), "--metric", "test.acc", "--out", str(tmp_path / "asked")])
    asked = next(csv.reader((tmp_path / "asked" / "report.csv").open()))
    assert asked == ["method", "n", "seeds", "test.acc_mean", "test.acc_std", "test.acc_n"]
