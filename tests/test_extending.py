"""docs/extending.md is a working example: its files, written into a directory outside the
repository, give a user's own dataset, model and method that kdlab finds through
--config-dir and hydra.searchpath, in single runs, `kdlab methods` and a sweep."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

from helpers.cli import cli

DOC = Path(__file__).resolve().parents[1] / "docs" / "extending.md"


def example_files() -> dict[str, str]:
    """Every code block of the doc whose first line is ``# file: PATH``."""
    files = {}
    for block in re.findall(r"```[a-z]*\n(.*?)```", DOC.read_text(), flags=re.S):
        first, _, body = block.partition("\n")
        if first.startswith("# file: "):
            files[first[len("# file: "):].strip()] = body
    return files


def test_the_documented_example_runs_from_a_directory_of_its_own(tmp_path):
    project = tmp_path / "my_project"
    files = example_files()
    assert {"my_kd/data.py", "my_kd/models.py", "my_kd/methods.py", "conf/dataset/wine.yaml",
            "conf/method/confident_kd.yaml", "run.sh"} <= set(files)
    for name, body in files.items():
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        (project / name).write_text(body)
    env = {"KDLAB_CACHE_DIR": str(tmp_path / "cache")}
    outputs = []
    for line in files["run.sh"].splitlines():
        args = shlex.split(line)
        assert args[0] == "kdlab"
        out = cli(*args[1:], cwd=project, env=env)
        assert out.returncode == 0, (line, out.stderr[-2000:])
        outputs.append(out)
    # kdlab methods lists the user's method next to kdlab's
    listed = outputs[0].stdout
    assert "confident_kd" in listed and "teacher's confidence" in listed and "  kd " in listed
    # a single run with --config-dir: the user's dataset, its default pair, the user's method
    one = json.loads((project / "runs" / "one" / "results.json").read_text())
    assert (one["dataset"], one["method"]) == ("wine", "confident_kd")
    assert one["student"] == {"name": "tiny_mlp", "arch": "TinyMLP",
                              "params": 13 * 16 + 16 + 16 * 3 + 3}
    assert one["teachers"][0]["name"] == "wide_mlp" and one["teachers"][0]["test"]["acc"] > 0.8
    # 178 examples: test 45 (25%), meta ceil(0.15 * 133) = 20, val ceil(0.15 / 0.85 * 113) = 20
    assert one["split_sizes"] == {"train": 93, "meta": 20, "val": 20, "test": 45}
    # hydra.searchpath in a single run
    two = json.loads((project / "runs" / "two" / "results.json").read_text())
    assert (two["dataset"], two["method"], two["student"]["name"]) == ("wine", "kd", "tiny_mlp")
    # a sweep, and its report
    sweep = project / "runs" / "sweep"
    results = [json.loads(p.read_text()) for p in sweep.glob("*/results.json")]
    assert sorted((r["method"], r["seed"]) for r in results) == [
        ("confident_kd", 0), ("confident_kd", 1), ("kd", 0), ("kd", 1)]
    assert "| confident_kd" in (sweep / "report.md").read_text()
