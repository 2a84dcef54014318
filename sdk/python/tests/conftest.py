"""Shared fixtures: configuration isolation for every test."""

from __future__ import annotations

import pytest

import hutch
from hutch import _cleanup
from hutch import config as hutch_config


@pytest.fixture(autouse=True)
def _isolated_config(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """No test reads the developer's HUTCH_* variables or local data dir by accident."""
    for name in ("HUTCH_URL", "HUTCH_API_KEY", "HUTCH_NAMESPACE", "HUTCH_DATA_DIR", "XDG_DATA_HOME"):
        monkeypatch.delenv(name, raising=False)
    empty = tmp_path_factory.mktemp("no-data-dir")
    monkeypatch.setenv("XDG_DATA_HOME", str(empty))
    monkeypatch.setenv("HUTCH_DATA_DIR", str(empty / "absent"))
    monkeypatch.setattr(hutch_config, "_default", None)
    yield
    hutch_config._default = None
    # Sandboxes of a mocked server must not be stopped at interpreter exit.
    with _cleanup._lock:
        _cleanup._registry.clear()


@pytest.fixture
def api() -> hutch.Config:
    """A configuration pointing at the mocked server of the unit tests."""
    return hutch.configure(url="http://hutch.test", api_key="test-key")
