"""Shared test set-up: no network services, a private teacher cache, quiet loggers."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HYDRA_FULL_ERROR", "0")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs one pytest-xdist worker per core: one torch thread each (set before
    # torch is imported; the runs' own subprocesses inherit it)
    os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """Every test run gets its own teacher cache and data dir (never the user's ~/.cache)."""
    root = tmp_path_factory.mktemp("kdlab-home")
    old = {k: os.environ.get(k) for k in ("KDLAB_CACHE_DIR", "KDLAB_DATA_DIR")}
    os.environ["KDLAB_CACHE_DIR"] = str(root / "cache")
    os.environ["KDLAB_DATA_DIR"] = str(root / "data")
    yield root
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def run_kdlab(*args: str, cwd, cache=None, env: dict | None = None, check: bool = True,
              timeout: int = 900):
    """Run the installed ``kdlab`` console script; with ``check``, fail showing its output."""
    import subprocess
    import sys
    from pathlib import Path

    full_env = {**os.environ, "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "0", **(env or {})}
    if cache is not None:
        full_env["KDLAB_CACHE_DIR"] = str(cache)
    exe = Path(sys.executable).with_name("kdlab")
    out = subprocess.run([str(exe), *args], cwd=cwd, env=full_env, capture_output=True,
                         text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise AssertionError(f"kdlab {' '.join(args)} failed:\n{out.stdout[-3000:]}\n"
                             f"{out.stderr[-3000:]}")
    return out


@pytest.fixture(scope="session")
def kdlab_cli():
    """``kdlab_cli("train", "method=ce", cwd=tmp_path, cache=...)`` runs the real CLI."""
    return run_kdlab


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """A teacher cache shared by the tests that use it in one session (teachers are trained
    once), set for the module's tests."""
    path = tmp_path_factory.getbasetemp() / "kdlab_cache"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KDLAB_CACHE_DIR", str(path))
        yield path


# The modules that take longest (a fresh process, a DDP launch or dozens of runs each), longest
# first: `make test` hands whole modules to its two pytest-xdist workers in collection order
# (`--no-loadscope-reorder`: xdist would otherwise order them by their number of tests, which
# puts these few-but-long modules last), and handing out the long ones first lets the two
# workers end together (the rest keep their order).
LONGEST_FIRST = ("tests/methods/test_method_smoke.py", "tests/test_resume.py",
                 "tests/test_sweeps.py", "tests/test_ddp.py", "tests/test_streaming_runs.py",
                 "tests/methods/test_method_state.py", "tests/test_experiments.py",
                 "tests/test_report.py", "tests/test_extending.py",
                 "tests/methods/test_alm_kd.py", "tests/test_cli.py",
                 "tests/methods/test_state_size.py", "tests/test_eval.py",
                 "tests/test_reproduce.py")


def pytest_collection_modifyitems(items):
    rank = {module: i for i, module in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::", 1)[0], len(rank)))


def pytest_terminal_summary(terminalreporter):
    """List the tests marked ``real_parts`` (they need Fashion-MNIST's files or Chromium and
    skip without them) with their outcome, so that a CI log says whether they ran."""
    lines = [f"{outcome.upper()} {report.nodeid}"
             for outcome in ("passed", "failed", "error", "skipped")
             for report in terminalreporter.stats.get(outcome, [])
             if "real_parts" in getattr(report, "keywords", {})]
    if lines:
        terminalreporter.write_sep("-", "tests on real parts")
        for line in sorted(lines, key=lambda s: s.split(" ", 1)[1]):
            terminalreporter.write_line(line)
