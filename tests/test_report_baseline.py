"""`kdlab report --baseline METHOD`: every group's difference from the baseline group with the
same other keys, with a 95 % interval over seeds (paired by seed, or Welch), checked against
numbers worked out by hand in this file; the marks, the files, and the errors."""

from __future__ import annotations

import csv
import math
import statistics

import pytest
from helpers.runs import write_run
from scipy import stats

from kdlab.cli import report_main

# Student's t, 0.975 quantile, 2 degrees of freedom, in closed form: the cdf with 2 df is
# 1/2 + t / (2 sqrt(2 + t^2)), so t / sqrt(2 + t^2) = 0.95.
T_2DF = math.sqrt(2 * 0.95 ** 2 / (1 - 0.95 ** 2))  # 4.3026527...

# (method, noise rate) -> {seed: test accuracy}
KD = {0: 0.70, 1: 0.72, 2: 0.71}
ACCURACY = {
    ("kd", 0.4): KD,                                   # the baseline
    ("alm_kd", 0.4): {0: 0.73, 1: 0.76, 2: 0.76},     # paired: d = 0.03, 0.04, 0.05
    ("ce", 0.4): {0: 0.71, 1: 0.70, 2: 0.75, 3: 0.99},  # paired over 0-2: d = .01, -.02, .04
    ("dml", 0.4): {5: 0.80, 6: 0.82, 7: 0.84},        # no shared seed: Welch
    ("pskd", 0.4): {0: 0.74, 9: 0.70},                # one shared seed: Welch
    ("ce", 0.2): {0: 0.90, 1: 0.91},                  # no kd at rate 0.2: no difference
}


@pytest.fixture
def runs(tmp_path):
    root = tmp_path / "runs"
    for (method, rate), by_seed in ACCURACY.items():
        for seed, acc in by_seed.items():
            write_run(root / f"{method}-{rate}-{seed}",
                      {"seed": seed, "choices": {"method": method},
                       "noise": {"type": "symmetric", "rate": rate}},
                      {"status": "finished", "method": method, "seed": seed,
                       "test": {"acc": acc, "ece": 0.1}, "test_last": {"acc": acc, "ece": 0.1},
                       "teachers": []})
    return root


def rows_of(path):
    return {(r["method"], r["noise.rate"]): r for r in csv.DictReader(path.open())}


def test_differences_against_a_hand_computation(runs):
    report_main([str(runs), "--by", "method,noise.rate", "--metric", "test.acc",
                 "--baseline", "kd"])
    rows = rows_of(runs / "report.csv")

    # alm_kd: paired over seeds 0, 1, 2; d = 0.03, 0.04, 0.05: mean 0.04, sd 0.01
    alm = rows[("alm_kd", "0.4")]
    half = T_2DF * 0.01 / math.sqrt(3)
    assert float(alm["test.acc_diff"]) == pytest.approx(0.04, rel=1e-9)
    assert float(alm["test.acc_diff_lo"]) == pytest.approx(0.04 - half, rel=1e-9)
    assert float(alm["test.acc_diff_hi"]) == pytest.approx(0.04 + half, rel=1e-9)
    assert float(alm["test.acc_diff_lo"]) == pytest.approx(0.0151586, abs=1e-7)
    assert (alm["test.acc_diff_paired"], alm["test.acc_diff_n"]) == ("True", "3")
    assert float(alm["test.acc_diff_df"]) == 2

    # ce: paired over the shared seeds 0, 1, 2 only (its seed 3 has no partner)
    ce = rows[("ce", "0.4")]
    d = [0.71 - 0.70, 0.70 - 0.72, 0.75 - 0.71]
    half = T_2DF * statistics.stdev(d) / math.sqrt(3)
    assert float(ce["test.acc_diff"]) == pytest.approx(0.01, rel=1e-9)
    assert float(ce["test.acc_diff_lo"]) == pytest.approx(0.01 - half, rel=1e-9)
    assert float(ce["test.acc_diff_hi"]) == pytest.approx(0.01 + half, rel=1e-9)
    assert float(ce["test.acc_diff_hi"]) == pytest.approx(0.0845241, abs=1e-7)
    assert (ce["test.acc_diff_paired"], ce["test.acc_diff_n"]) == ("True", "3")

    # dml: no shared seed, Welch: diff 0.82 - 0.71; variances 4e-4 and 1e-4, 3 runs each:
    # se^2 = 5e-4 / 3, df = (5e-4)^2 / ((4e-4^2 + 1e-4^2) / 2) = 50 / 17
    dml = rows[("dml", "0.4")]
    df = 50 / 17
    half = stats.t.ppf(0.975, df) * math.sqrt(5e-4 / 3)
    assert float(dml["test.acc_diff"]) == pytest.approx(0.11, rel=1e-9)
    assert float(dml["test.acc_diff_df"]) == pytest.approx(df, rel=1e-9)
    assert float(dml["test.acc_diff_lo"]) == pytest.approx(0.11 - half, rel=1e-9)
    assert float(dml["test.acc_diff_hi"]) == pytest.approx(0.11 + half, rel=1e-9)
    assert float(dml["test.acc_diff_lo"]) == pytest.approx(0.0684460, abs=1e-7)
    assert (dml["test.acc_diff_paired"], dml["test.acc_diff_n"]) == ("False", "3")

    # pskd shares one seed with kd (0): too few pairs, Welch over all runs
    pskd = rows[("pskd", "0.4")]
    var_a, var_b = statistics.variance([0.74, 0.70]) / 2, statistics.variance(KD.values()) / 3
    df = (var_a + var_b) ** 2 / (var_a ** 2 / 1 + var_b ** 2 / 2)
    half = stats.t.ppf(0.975, df) * math.sqrt(var_a + var_b)
    assert float(pskd["test.acc_diff"]) == pytest.approx(0.01, rel=1e-9)
    assert float(pskd["test.acc_diff_lo"]) == pytest.approx(0.01 - half, rel=1e-9)
    assert (pskd["test.acc_diff_paired"], pskd["test.acc_diff_n"]) == ("False", "2")

    # the baseline itself and a row whose noise rate has no kd group: empty
    for key in (("kd", "0.4"), ("ce", "0.2")):
        assert rows[key]["test.acc_diff"] == rows[key]["test.acc_diff_lo"] == ""


def test_the_table_marks_the_resolved_differences(runs, capsys):
    report_main([str(runs), "--by", "method,noise.rate", "--metric", "test.acc,test.ece",
                 "--baseline", "kd", "--html"])
    md = (runs / "report.md").read_text()
    table = md.split("## Difference from the baseline `method=kd`")[1]
    lines = {tuple(c.strip() for c in line.strip("|").split("|")[:2]): line
             for line in table.splitlines() if line.startswith("| ")}
    header = next(line for line in table.splitlines() if line.startswith("| method"))
    assert "Δ test acc (best)" in header and "Δ test ECE (best)" in header
    assert "+0.0400 [+0.0152, +0.0648]* (paired, n=3)" in lines[("alm_kd", "0.4")]
    assert "+0.0100 [-0.0645, +0.0845] (paired, n=3)" in lines[("ce", "0.4")]
    assert "+0.1100 [+0.0684, +0.1516]* (Welch, n=3)" in lines[("dml", "0.4")]
    assert "*" not in lines[("ce", "0.4")] + lines[("pskd", "0.4")]
    assert "| baseline " in lines[("kd", "0.4")]
    cells = [c.strip() for c in lines[("ce", "0.2")].strip().strip("|").split("|")]
    assert cells[-2:] == ["", ""]  # no kd group at noise rate 0.2
    # equal ECE everywhere: a zero difference with no spread is not resolved
    assert "+0.0000 [+0.0000, +0.0000] (paired, n=3)" in lines[("alm_kd", "0.4")]
    assert "- `*`: the interval excludes 0" in table
    assert "same noise.rate" in table and "paired: over the seeds both groups have" in table
    html = (runs / "report.html").read_text()
    assert "Difference from the baseline <code>method=kd</code>" in html
    assert "+0.0400 [+0.0152, +0.0648]* (paired, n=3)" in html
    assert "## Difference from the baseline" in capsys.readouterr().out


def test_without_baseline_there_is_no_difference(runs):
    report_main([str(runs), "--by", "method,noise.rate", "--metric", "test.acc"])
    assert "Difference from the baseline" not in (runs / "report.md").read_text()
    assert "test.acc_diff" not in next(csv.reader((runs / "report.csv").open()))


@pytest.mark.parametrize("argv,message", [
    (["--baseline", "dkd"], "--baseline dkd: no finished run has method=dkd (methods: alm_kd, "
                            "ce, dml, kd, pskd)"),
    (["--by", "noise.rate", "--baseline", "kd"], "--baseline compares methods, but the grouping "
                                                 "keys (noise.rate) leave out method"),
])
def test_a_baseline_that_cannot_be_used_is_one_line(runs, tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        report_main([str(runs), "--out", str(out), *argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert err.startswith("kdlab report: error: ") and message in err
    assert not out.exists()  # nothing written
