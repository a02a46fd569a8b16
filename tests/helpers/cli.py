"""Running the ``kdlab`` command: in-process through ``kdlab.cli.main`` (fast: no ~7 s
interpreter start-up), or as a real subprocess (for what only a fresh process shows)."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.startswith("kdlab: error:")]


@contextlib.contextmanager
def _environment(cwd: Path, env: dict[str, str]):
    old_cwd, old_env, old_argv, old_path = Path.cwd(), dict(os.environ), list(sys.argv), \
        list(sys.path)
    os.chdir(cwd)
    os.environ.update(env)
    try:
        yield
    finally:
        os.chdir(old_cwd)
        os.environ.clear()
        os.environ.update(old_env)
        sys.argv = old_argv
        sys.path[:] = old_path


def cli(*args: str, cwd: Path, env: dict[str, str] | None = None) -> Result:
    """``kdlab ARGS`` in this process; SystemExit becomes the return code."""
    from kdlab.cli import main

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with _environment(Path(cwd), {"WANDB_MODE": "disabled", **(env or {})}), \
            contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        sys.argv = ["kdlab", *args]
        try:
            main()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return Result(code, out.getvalue(), err.getvalue())


def kdlab_process(*args: str, cwd: Path, env: dict[str, str] | None = None,
                  timeout: int = 900) -> Result:
    """The installed ``kdlab`` console script in a subprocess."""
    full_env = {**os.environ, "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "0", **(env or {})}
    exe = Path(sys.executable).with_name("kdlab")
    out = subprocess.run([str(exe), *args], cwd=cwd, env=full_env, capture_output=True,
                         text=True, timeout=timeout)
    return Result(out.returncode, out.stdout, out.stderr)


def popen_kdlab(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    full_env = {**os.environ, "WANDB_MODE": "disabled", **(env or {})}
    exe = Path(sys.executable).with_name("kdlab")
    return subprocess.Popen([str(exe), *args], cwd=cwd, env=full_env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
