"""Fixtures of the datamodule tests."""

from __future__ import annotations

import pytest
from helpers.cifar import LocalServer


@pytest.fixture
def server(tmp_path, request):
    """An HTTP server on 127.0.0.1 serving ``server.directory`` (empty at first), which
    records the paths it was asked for (tests/helpers/cifar.py)."""
    served = tmp_path / "served"
    served.mkdir()
    srv = LocalServer(served)
    request.addfinalizer(srv.close)
    return srv
