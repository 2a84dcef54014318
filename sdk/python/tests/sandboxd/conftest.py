"""A real sandboxd (docs/sandboxd-api.md) for the process and file tests.

The daemon runs on this machine, not in a sandbox, so these tests only run
harmless commands and only touch files under their own temp dirs. The binary
comes from HUTCH_SANDBOXD_BIN or HUTCH_SANDBOXD, else from the repo's cargo
target dirs.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

import hutch

REPO = Path(__file__).resolve().parents[4]


def sandboxd_binary() -> Path | None:
    # HUTCH_SANDBOXD is what the repo's scripts/test exports (the static build).
    explicit = os.environ.get("HUTCH_SANDBOXD_BIN") or os.environ.get("HUTCH_SANDBOXD")
    if explicit:
        return Path(explicit)
    roots = [Path(os.environ["CARGO_TARGET_DIR"])] if os.environ.get("CARGO_TARGET_DIR") else []
    roots.append(REPO / "target")
    for root in roots:
        for profile in ("release", "debug"):
            candidate = root / profile / "sandboxd"
            if candidate.is_file():
                return candidate
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if Path(str(item.fspath)).is_relative_to(here):
            item.add_marker(pytest.mark.sandboxd)


@pytest.fixture(scope="session")
def sandboxd_url() -> Iterator[str]:
    binary = sandboxd_binary()
    if binary is None or not binary.is_file():
        pytest.fail(
            "no sandboxd binary: build it (cargo build --release -p hutch-sandboxd) or set "
            "HUTCH_SANDBOXD_BIN, or deselect these tests with -m 'not sandboxd'"
        )
    process = subprocess.Popen(
        [str(binary), "--listen", "tcp:127.0.0.1:0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        match = re.search(r"listening on tcp:(\S+)", line)
        if match is None:
            process.kill()
            pytest.fail(f"sandboxd did not start: {line!r}")
        yield f"http://{match.group(1)}"
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.fixture
def sandbox(sandboxd_url: str) -> hutch.Sandbox:
    """A Sandbox handle whose daemon calls go straight to the test sandboxd."""
    return hutch.Sandbox._attach_daemon(sandboxd_url)
