"""The SDK against a real `hutch up`: what a user touches, end to end."""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import sys
import textwrap
import time
import tracemalloc
import uuid
from pathlib import Path

import pytest

import hutch
from hutch import Sandbox, SandboxStatus

from .conftest import IMAGE, Platform

MIB = 1 << 20


def test_create_then_exec_at_once(config: hutch.Config) -> None:
    with Sandbox.run(image=IMAGE) as sandbox:
        assert sandbox.status in (SandboxStatus.PENDING, SandboxStatus.CREATING, SandboxStatus.RUNNING)
        result = sandbox.exec(["echo", "hello"]).result(timeout=60)
        assert result.stdout == "hello\n"
        assert sandbox.get_status() == SandboxStatus.RUNNING
    assert sandbox.get_status() in (SandboxStatus.RUNNING, SandboxStatus.TERMINATED)
    info = sandbox.wait_until_complete(timeout=60, raise_on_termination=False).result()
    assert (info.state, info.reason) == (SandboxStatus.TERMINATED, "stopped")


def test_interleaved_output_streams_live(running_sandbox: Sandbox) -> None:
    # The command cannot end before the test has seen its first output and
    # written the flag: that output is live. The pauses order the two pipes.
    process = running_sandbox.exec(
        [
            "sh",
            "-c",
            "for i in 1 2 3; do echo out $i; sleep 0.1; echo err $i >&2; sleep 0.1; done; "
            "while [ ! -e /tmp/go ]; do sleep 0.01; done; echo done",
        ]
    )
    seen = []
    for chunk in process.iter_output():
        if not seen:
            assert process.poll() is None
            running_sandbox.write_file("/tmp/go", b"").result(timeout=30)
        seen.append(f"{chunk.stream}:{chunk.text}")
    assert "".join(seen) == (
        "stdout:out 1\nstderr:err 1\nstdout:out 2\nstderr:err 2\nstdout:out 3\nstderr:err 3\nstdout:done\n"
    )
    assert list(process.stdout) == ["out 1\n", "out 2\n", "out 3\n", "done\n"]


def test_stdin(running_sandbox: Sandbox) -> None:
    process = running_sandbox.exec(["sh", "-c", "while read l; do echo got:$l; done"], stdin=True)
    lines = iter(process.stdout)
    for word in ("a", "b"):
        process.stdin.writeline(word).result(timeout=30)
        assert next(lines) == f"got:{word}\n"
    process.stdin.close().result(timeout=30)
    assert process.wait(timeout=30) == 0


def test_binary_output(running_sandbox: Sandbox) -> None:
    script = "import sys; sys.stdout.buffer.write(bytes(range(256)) * 16)"
    result = running_sandbox.exec(["python3", "-c", script]).result(timeout=60)
    assert result.stdout_bytes == bytes(range(256)) * 16


def test_check_raises_with_the_result(running_sandbox: Sandbox) -> None:
    with pytest.raises(hutch.SandboxExecutionError) as caught:
        running_sandbox.exec("echo out; echo bad >&2; exit 4", check=True).result(timeout=60)
    assert caught.value.result.returncode == 4
    assert caught.value.result.stdout == "out\n"
    assert caught.value.sandbox_id == running_sandbox.id


def test_files_and_commands_together(sandbox_with_files: Sandbox) -> None:
    sandbox = sandbox_with_files
    names = [entry.name for entry in sandbox.list_files("/tmp/data").result(timeout=30)]
    assert names == ["numbers.txt", "script.py"]
    result = sandbox.exec("python3 /tmp/data/script.py < /tmp/data/numbers.txt", check=True).result(timeout=60)
    assert result.stdout == "45\n"
    with pytest.raises(hutch.SandboxFileError) as caught:
        sandbox.read_file("/tmp/data/missing").result(timeout=30)
    assert caught.value.path == "/tmp/data/missing"


def test_a_100_mib_file_round_trips_with_flat_client_memory(running_sandbox: Sandbox, tmp_path: Path) -> None:
    source, back = tmp_path / "source.bin", tmp_path / "back.bin"
    digest = hashlib.sha256()
    block = os.urandom(MIB)
    with source.open("wb") as f:
        for i in range(100):
            chunk = block[i:] + block[:i]
            digest.update(chunk)
            f.write(chunk)
    tracemalloc.start()
    try:
        info = running_sandbox.write_file("/tmp/big.bin", source).result(timeout=300)
        count = running_sandbox.read_file("/tmp/big.bin", dest=back).result(timeout=300)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info.size == count == 100 * MIB
    assert peak < 24 * MIB, f"client memory peaked at {peak / MIB:.1f} MiB"
    check = hashlib.sha256()
    with back.open("rb") as f:
        while chunk := f.read(MIB):
            check.update(chunk)
    assert check.hexdigest() == digest.hexdigest()


def test_main_command_completion_and_failure(config: hutch.Config) -> None:
    ok = Sandbox.run("sh", "-c", "exit 0", image=IMAGE)
    bad = Sandbox.run("sh", "-c", "exit 7", image=IMAGE)
    info = ok.wait_until_complete(timeout=60).result()
    assert (info.state, info.reason, info.exit_code) == (SandboxStatus.COMPLETED, "exited", 0)
    with pytest.raises(hutch.SandboxFailedError) as caught:
        bad.wait_until_complete(timeout=60).result()
    assert caught.value.reason == "exited"


def test_errors_and_their_types(platform: Platform, config: hutch.Config) -> None:
    missing = uuid.uuid4().hex
    with pytest.raises(hutch.SandboxNotFoundError) as caught:
        Sandbox.from_id(missing).result(timeout=30)
    assert caught.value.sandbox_id == missing
    Sandbox.delete(missing, missing_ok=True).result(timeout=30)
    with pytest.raises(hutch.SandboxNotFoundError):
        Sandbox.delete(missing).result(timeout=30)

    with pytest.raises(hutch.AuthenticationError):
        Sandbox.run(image=IMAGE, config=hutch.Config(url=platform.url, api_key="wrong"))

    sandbox = Sandbox.run(image=IMAGE)
    sandbox.wait(timeout=60)
    sandbox.stop(graceful_shutdown_seconds=0).result(timeout=30)
    sandbox.wait_until_complete(timeout=60, raise_on_termination=False).result()
    with pytest.raises(hutch.SandboxNotRunningError) as stopped:
        sandbox.exec(["true"]).result(timeout=60)
    assert stopped.value.state == "terminated"
    assert isinstance(stopped.value, hutch.SandboxTerminatedError)

    with pytest.raises(hutch.HutchError) as invalid:
        Sandbox.run(image=IMAGE, resources={"cpus": -1})
    assert (invalid.value.status, invalid.value.code) == (400, "invalid_field")


def test_list_from_id_and_delete_by_tag(config: hutch.Config) -> None:
    tag = {"cleanup-test": uuid.uuid4().hex}
    created = [Sandbox.run(image=IMAGE, tags=tag, stop_on_exit=False) for _ in range(3)]
    listed = Sandbox.list(tags=tag).result(timeout=30)
    assert sorted(s.id for s in listed) == sorted(s.id for s in created)
    again = Sandbox.from_id(created[0].id or "").result(timeout=30)
    assert again.id == created[0].id
    for sandbox in listed:
        Sandbox.delete(sandbox.id or "").result(timeout=30)
    deadline = time.monotonic() + 60
    while Sandbox.list(tags=tag).result(timeout=30):
        assert time.monotonic() < deadline, "deleted sandboxes still listed"
        time.sleep(0.2)


def test_functions_map_over_20_inputs(config: hutch.Config) -> None:
    offset = 100

    with hutch.Session(hutch.SandboxDefaults(image=IMAGE)) as session:

        @session.function()
        def shifted_square(x: int) -> int:
            return x * x + offset

        @session.function(serialization="pickle")
        def describe(values: set[int]) -> tuple[int, frozenset[int]]:
            return len(values), frozenset(values)

        @session.function()
        def fails() -> None:
            raise RuntimeError("remote failure")

        refs = shifted_square.map(range(20))
        assert hutch.result(refs, timeout=300) == [x * x + offset for x in range(20)]
        assert shifted_square.remote(3).result(timeout=120) == 109
        assert describe.remote({1, 2}).result(timeout=120) == (2, frozenset({1, 2}))
        with pytest.raises(hutch.FunctionError) as caught:
            fails.remote().result(timeout=120)
        assert caught.value.remote_type == "RuntimeError"
        assert session.sandbox_count == 0


def test_async_gather_of_20_sandboxes(config: hutch.Config) -> None:
    async def one(i: int) -> str:
        async with Sandbox(image=IMAGE, tags={"gather": "yes"}) as sandbox:
            result = await sandbox.exec(["sh", "-c", f"echo {i}"])
            return result.stdout.strip()

    async def main() -> list[str]:
        return await asyncio.gather(*(one(i) for i in range(20)))

    assert asyncio.run(main()) == [str(i) for i in range(20)]


def test_session_sandboxes_start_lazily_and_close(config: hutch.Config) -> None:
    session = hutch.Session(hutch.SandboxDefaults(image=IMAGE, tags={"suite": "py"}))
    lazy = session.sandbox()
    used = session.sandbox()
    assert used.exec(["true"]).result(timeout=60).returncode == 0
    assert lazy.id is None
    assert [s.id for s in session.list().result(timeout=30)] == [used.id]
    session.close().result(timeout=60)
    info = used.wait_until_complete(timeout=60, raise_on_termination=False).result()
    assert info.state == SandboxStatus.TERMINATED


def test_cleanup_at_exit_leaves_no_sandbox_running(platform: Platform, tmp_path: Path) -> None:
    tag = uuid.uuid4().hex
    script = tmp_path / "leaves_sandboxes_open.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import hutch
            hutch.configure(url={platform.url!r}, api_key={platform.api_key!r})
            session = hutch.Session(hutch.SandboxDefaults(image={IMAGE!r}, tags={{"exit-test": {tag!r}}}))
            for _ in range(3):
                session.sandbox().exec(["true"]).result(timeout=60)
            hutch.Sandbox.run(image={IMAGE!r}, tags={{"exit-test": {tag!r}}}).wait(timeout=60)
            print("open", flush=True)
            """
        )
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "open"
    hutch.configure(url=platform.url, api_key=platform.api_key)
    deadline = time.monotonic() + 60
    while True:
        alive = [
            s
            for s in Sandbox.list(tags={"exit-test": tag}).result(timeout=30)
            if not (s.status and s.status.is_terminal)
        ]
        if not alive:
            break
        assert time.monotonic() < deadline, f"still running after exit: {alive}"
        time.sleep(0.2)
    everything = Sandbox.list(tags={"exit-test": tag}, include_stopped=True).result(timeout=30)
    assert len(everything) == 4


EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.py"))


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_examples_run(platform: Platform, example: Path) -> None:
    env = {**os.environ, "HUTCH_URL": platform.url, "HUTCH_API_KEY": platform.api_key, "HUTCH_EXAMPLE_IMAGE": IMAGE}
    done = subprocess.run([sys.executable, str(example)], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, f"{example.name} failed:\n{done.stdout}\n{done.stderr}"
    assert done.stdout.strip()
