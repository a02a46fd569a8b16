"""Shared test set-up: no network services, a private teacher cache, quiet loggers."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HYDRA_FULL_ERROR", "0")


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
