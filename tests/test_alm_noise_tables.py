"""scripts/alm_noise_experiment.py's tables: ALM-KD minus each row, paired by seed with a 95 %
t interval, checked against a hand computation; --tables-from rebuilds the outputs of earlier
records without running anything."""

from __future__ import annotations

import json

import pytest
from helpers.scripts import loaded_script

T_975_2 = 4.302652729911275  # Student's t, 0.975 quantile, 2 degrees of freedom


@pytest.fixture
def script():
    yield from loaded_script("alm_noise_experiment")


def record(row: str, teachers: str, seed: int, acc: float, ece: float) -> dict:
    return {"setting": "fashion_mnist-sym0.4", "teachers": teachers, "row": row, "seed": seed,
            "test": {"acc": acc, "ece": ece, "nll": 0.3}, "val": {"acc": acc},
            "best_epoch": 15, "mixing": None, "wall_time_s": 1.0, "teacher_test": []}


RECORDS = [
    *(record("alm_kd", "clean", s, a, e) for s, a, e in
      ((0, 0.910, 0.010), (1, 0.905, 0.012), (2, 0.912, 0.011))),
    *(record("kd", "clean", s, a, e) for s, a, e in
      ((0, 0.900, 0.020), (1, 0.904, 0.010), (2, 0.905, 0.011))),
    # a row without a teacher is compared with ALM-KD too; a single seed gives no interval
    record("ce", "-", 0, 0.880, 0.300),
]


def test_alm_kd_minus_each_row_is_the_paired_t_interval(script):
    lines = script.differences(RECORDS).splitlines()
    # by hand: acc differences 1.0, 0.1, 0.7 points; mean 0.6, sd 0.458258, se sd / sqrt(3)
    mean, sd = 0.6, (((1.0 - 0.6) ** 2 + (0.1 - 0.6) ** 2 + (0.7 - 0.6) ** 2) / 2) ** 0.5
    half = T_975_2 * sd / 3 ** 0.5
    acc = f"+0.60 [{mean - half:+.2f}, {mean + half:+.2f}]"
    assert acc == "+0.60 [-0.54, +1.74]"  # includes 0: not resolved, no star
    # ECE: -1.0, +0.2, 0.0 points
    e = [-1.0, 0.2, 0.0]
    m = sum(e) / 3
    half = T_975_2 * (sum((x - m) ** 2 for x in e) / 2) ** 0.5 / 3 ** 0.5
    ece = f"{m:+.2f} [{m - half:+.2f}, {m + half:+.2f}]"
    # one shared seed: not paired, the means' difference alone (ALM-KD 90.9 / 1.1 vs 88 / 30)
    assert lines[2:] == ["| fashion_mnist-sym0.4 | clean | ce | 1 | +2.90 | -28.90 |",
                         f"| fashion_mnist-sym0.4 | clean | kd | 3 | {acc} | {ece} |"]


def test_a_resolved_difference_is_starred(script):
    shifted = [record("kd", "clean", r["seed"], r["test"]["acc"] - 0.01, r["test"]["ece"])
               for r in RECORDS if r["row"] == "alm_kd"]
    kd_line = script.differences([*RECORDS[:3], *shifted]).splitlines()[-1]
    # every seed 1 point apart: zero spread, the interval is the point and excludes 0
    assert "| kd | 3 | +1.00 [+1.00, +1.00] * | +0.00 [+0.00, +0.00] |" in kd_line


def test_tables_from_earlier_records_run_nothing(script, tmp_path):
    source = tmp_path / "a.json"
    source.write_text(json.dumps(RECORDS))
    # twice: two experiments' records share their CE runs, which count once
    script.main(["--tables-from", str(source), str(source), "--out", str(tmp_path / "out"),
                 "--tag", "t"])
    text = (tmp_path / "out" / "alm_noise_t.md").read_text()
    assert "| fashion_mnist-sym0.4 | clean      | alm_kd | 3   |" in text
    assert "| fashion_mnist-sym0.4 | clean | ce | 1 | +2.90 | -28.90 |" in text
    assert "ALM-KD minus each row" in text and "+0.60 [-0.54, +1.74]" in text
    # the records stay in their own files: not written a second time
    assert not (tmp_path / "out" / "alm_noise_t.json").exists()
    assert (tmp_path / "out" / "alm_noise_t.png").stat().st_size > 0


def test_the_readme_table_bolds_the_best_mean_of_each_line(script):
    line = script.wide_table(RECORDS).splitlines()[-1]
    # by hand: CE one seed 88.0 / 30.0; KD 90.0, 90.4, 90.5 (sd sqrt(0.07)) / ECE 2, 1, 1.1;
    # ALM-KD 91.0, 90.5, 91.2 (sd sqrt(0.13)) / ECE 1.0, 1.2, 1.1; no AUROC recorded
    assert line == ("| clean labels | fashion_mnist-sym0.4 | 88.00 / 30.0 |  | "
                    "90.30 ± 0.26 / 1.4 |  |  |  |  | **90.90** ± 0.36 / 1.1 | |")
