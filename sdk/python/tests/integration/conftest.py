"""A real `hutch up` for the integration tests, started from HUTCH_BIN.

Every test in this directory carries the ``integration`` marker. scripts/test
deselects them when HUTCH_BIN is unset; when they are selected, a missing or
broken HUTCH_BIN fails them loudly (never a silent skip).

Lifecycle fixtures build on each other: ``sandbox`` (created) →
``running_sandbox`` (waited until running) → ``sandbox_with_files``.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

import hutch

# The image of the test sandboxes: the host's root filesystem (read-only)
# has python3, so no registry is needed.
IMAGE = os.environ.get("HUTCH_TEST_IMAGE", "host")
START_TIMEOUT = 60.0


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if Path(str(item.fspath)).is_relative_to(here):
            item.add_marker(pytest.mark.integration)


@dataclasses.dataclass(frozen=True)
class Platform:
    url: str
    api_key: str
    data_dir: Path
    log: Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def platform() -> Iterator[Platform]:
    binary = os.environ.get("HUTCH_BIN")
    if not binary:
        pytest.fail("integration tests need HUTCH_BIN (a `hutch` binary); deselect them with -m 'not integration'")
    if not Path(binary).is_file():
        pytest.fail(f"HUTCH_BIN={binary} does not exist")
    work = Path(tempfile.mkdtemp(prefix="hutch-py-it-"))
    data_dir = work / "data"
    log = work / "hutch-up.log"
    api_port = _free_port()
    command = [
        binary,
        "up",
        "--data-dir",
        str(data_dir),
        "--listen",
        f"127.0.0.1:{api_port}",
        "--grpc-listen",
        f"127.0.0.1:{_free_port()}",
        "--proxy-listen",
        f"127.0.0.1:{_free_port()}",
        "--no-network",
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("HUTCH_") or k == "HUTCH_SANDBOXD"}
    with log.open("wb") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{api_port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if process.poll() is not None:
                pytest.fail(f"`hutch up` exited with {process.returncode}:\n{log.read_text(errors='replace')}")
            key_file = data_dir / "admin.key"
            try:
                healthy = httpx.get(f"{url}/health", timeout=2).status_code == 200
            except httpx.TransportError:
                healthy = False
            if healthy and key_file.is_file() and key_file.read_text().strip():
                break
            if time.monotonic() > deadline:
                pytest.fail(f"`hutch up` not healthy after {START_TIMEOUT} s:\n{log.read_text(errors='replace')}")
            time.sleep(0.1)
        yield Platform(url=url, api_key=key_file.read_text().strip(), data_dir=data_dir, log=log)
    finally:
        # `hutch up` leaves sandboxes running when it stops (the next start
        # adopts them), so the tests' leftovers are stopped first.
        _stop_every_sandbox(url, data_dir / "admin.key")
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        _remove_unless_mounted(work)


def _stop_every_sandbox(url: str, key_file: Path) -> None:
    """Deletes every sandbox, finished ones too: a finished sandbox stays on
    its node for the retention time, and `hutch up` leaves it there when it
    stops, so only a delete (the server then drops it from the node's desired
    state) removes it before the platform goes away."""
    if not key_file.is_file():
        return
    config = hutch.Config(url=url, api_key=key_file.read_text().strip())
    try:
        left = hutch.Sandbox.list(include_stopped=True, config=config).result(timeout=30)
        hutch.wait([hutch.Sandbox.delete(s.id or "", missing_ok=True, config=config) for s in left], timeout=30)
        deadline = time.monotonic() + 30
        while hutch.Sandbox.list(include_stopped=True, config=config).result(timeout=30):
            if time.monotonic() > deadline:
                print("sandboxes still listed after delete")
                break
            time.sleep(0.2)
    except hutch.HutchError as e:
        print(f"could not delete the tests' sandboxes: {e}")


def _remove_unless_mounted(work: Path) -> None:
    """Deletes the test's temp dir, but never while anything is mounted beneath it.

    rmtree crosses mount points: a sandbox mount left behind (a bind mount of
    the host's root for image "host") must not be walked into.
    """
    prefix = str(work.resolve()) + "/"
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        mounted = [line.split()[4] for line in f if line.split()[4].startswith(prefix)]
    if mounted:
        print(f"leaving {work}: still mounted beneath it: {mounted[:3]}")
        return
    shutil.rmtree(work, ignore_errors=True)


@pytest.fixture
def config(platform: Platform) -> hutch.Config:
    """The default configuration of the SDK, pointing at the test platform."""
    return hutch.configure(url=platform.url, api_key=platform.api_key)


@pytest.fixture
def sandbox(config: hutch.Config, request: pytest.FixtureRequest) -> Iterator[hutch.Sandbox]:
    """A created sandbox (maybe not yet running), stopped after the test."""
    sandbox = hutch.Sandbox.run(image=IMAGE, tags={"test": request.node.name[:200]})
    try:
        yield sandbox
    finally:
        sandbox.stop(graceful_shutdown_seconds=0, missing_ok=True).result(timeout=30)


@pytest.fixture
def running_sandbox(sandbox: hutch.Sandbox) -> hutch.Sandbox:
    return sandbox.wait(timeout=60)


@pytest.fixture
def sandbox_with_files(running_sandbox: hutch.Sandbox) -> hutch.Sandbox:
    running_sandbox.write_file("/tmp/data/numbers.txt", "".join(f"{i}\n" for i in range(10))).result(timeout=30)
    running_sandbox.write_file("/tmp/data/script.py", "import sys\nprint(sum(int(l) for l in sys.stdin))\n").result(
        timeout=30
    )
    return running_sandbox
