"""Processes against a real sandboxd: live streaming, stdin, binary output, errors, async."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

import hutch


def test_output_streams_live_in_order_before_the_process_ends(sandbox: hutch.Sandbox, tmp_path: Path) -> None:
    flag = tmp_path / "go"
    # The command cannot end before the test has seen its first output and
    # created the flag: that output is live. The pauses order the two pipes.
    process = sandbox.exec(
        [
            "sh",
            "-c",
            f"for i in 1 2 3; do echo out $i; sleep 0.1; echo err $i >&2; sleep 0.1; done; "
            f"while [ ! -e {flag} ]; do sleep 0.01; done; echo done",
        ]
    )
    chunks = []
    for chunk in process.iter_output():
        if not chunks:
            assert process.poll() is None
            flag.touch()
        chunks.append((chunk.stream, chunk.data))
    text = "".join(f"{stream}:{data.decode()}" for stream, data in chunks)
    assert text == ("stdout:out 1\nstderr:err 1\nstdout:out 2\nstderr:err 2\nstdout:out 3\nstderr:err 3\nstdout:done\n")
    result = process.result()
    assert result.stdout == "out 1\nout 2\nout 3\ndone\n"
    assert result.stderr == "err 1\nerr 2\nerr 3\n"
    assert list(process.stdout) == ["out 1\n", "out 2\n", "out 3\n", "done\n"]
    assert list(process.stderr) == ["err 1\n", "err 2\n", "err 3\n"]


def test_lines_are_whole_even_when_written_in_pieces(sandbox: hutch.Sandbox) -> None:
    process = sandbox.exec(["sh", "-c", "printf 'ab'; sleep 0.1; printf 'c\\nd'; sleep 0.1; printf 'e'"])
    assert list(process.stdout) == ["abc\n", "de"]


def test_stdin_is_written_in_order_and_closed(sandbox: hutch.Sandbox) -> None:
    process = sandbox.exec(["cat"], stdin=True)
    process.stdin.write(b"one ")
    process.stdin.write("two\n")
    process.stdin.writeline("three")
    process.stdin.close().result(timeout=10)
    result = process.result(timeout=10)
    assert result.stdout == "one two\nthree\n"


def test_stdin_interacts_with_a_running_process(sandbox: hutch.Sandbox) -> None:
    process = sandbox.exec(["sh", "-c", "while read line; do echo got:$line; done"], stdin=True)
    lines = iter(process.stdout)
    for word in ("a", "b", "c"):
        process.stdin.writeline(word).result(timeout=10)
        assert next(lines) == f"got:{word}\n"
    process.stdin.close().result(timeout=10)
    assert process.wait(timeout=10) == 0


def test_stdin_backpressure_with_large_input(sandbox: hutch.Sandbox) -> None:
    process = sandbox.exec(["sh", "-c", "sleep 0.3; wc -c"], stdin=True)
    block = b"x" * (1 << 20)
    for _ in range(16):
        process.stdin.write(block).result(timeout=30)
    process.stdin.close().result(timeout=30)
    assert process.result(timeout=30).stdout.strip() == str(16 << 20)


def test_stdin_must_be_asked_for(sandbox: hutch.Sandbox) -> None:
    process = sandbox.exec(["true"])
    with pytest.raises(hutch.SandboxError):
        process.stdin.write("x")
    process.result(timeout=10)


def test_binary_output_is_kept_exactly(sandbox: hutch.Sandbox) -> None:
    script = "import sys; sys.stdout.buffer.write(bytes(range(256)) * 4); sys.stderr.buffer.write(b'\\xff\\xfe')"
    result = sandbox.exec(["python3", "-c", script]).result(timeout=20)
    assert result.stdout_bytes == bytes(range(256)) * 4
    assert result.stderr_bytes == b"\xff\xfe"
    assert result.stderr == "\ufffd\ufffd"


def test_check_raises_with_the_result(sandbox: hutch.Sandbox) -> None:
    with pytest.raises(hutch.SandboxExecutionError) as caught:
        sandbox.exec("echo partial; echo why >&2; exit 3", check=True).result(timeout=10)
    assert caught.value.result.returncode == 3
    assert caught.value.result.stdout == "partial\n"
    assert "why" in str(caught.value)
    assert sandbox.exec("exit 3").result(timeout=10).returncode == 3


def test_timeout_kills_and_raises(sandbox: hutch.Sandbox) -> None:
    start = time.monotonic()
    with pytest.raises(hutch.SandboxTimeoutError) as caught:
        sandbox.exec(["sh", "-c", "echo started; sleep 30"], timeout_seconds=0.5).result(timeout=20)
    assert time.monotonic() - start < 10
    assert caught.value.result is not None and caught.value.result.timed_out
    assert caught.value.result.stdout == "started\n"


def test_poll_wait_and_cancel(sandbox: hutch.Sandbox) -> None:
    process = sandbox.exec(["sleep", "30"])
    assert process.poll() is None
    with pytest.raises(TimeoutError):
        process.wait(timeout=0.2)
    process.cancel().result(timeout=10)
    assert process.wait(timeout=10) == -9
    assert process.result().signal == 9
    assert process.pid is not None


def test_a_command_that_cannot_start_raises(sandbox: hutch.Sandbox) -> None:
    process = sandbox.exec(["/nonexistent/binary"])
    with pytest.raises(hutch.SandboxError) as caught:
        process.result(timeout=10)
    assert caught.value.code == "spawn_failed"
    with pytest.raises(hutch.SandboxError):
        list(process.stdout)


def test_environment_and_working_directory(sandbox: hutch.Sandbox, tmp_path: object) -> None:
    result = sandbox.exec(["sh", "-c", "echo $GREETING; pwd"], env={"GREETING": "hi"}, cwd=str(tmp_path)).result()
    assert result.stdout == f"hi\n{tmp_path}\n"


def test_async_streaming_and_gather(sandbox: hutch.Sandbox) -> None:
    async def main() -> tuple[list[str], list[str]]:
        process = sandbox.exec(["sh", "-c", "echo a; sleep 0.1; echo b"])
        lines = [line async for line in process.stdout]
        results = await asyncio.gather(*(sandbox.exec(["echo", str(i)]) for i in range(20)))
        return lines, [r.stdout.strip() for r in results]

    lines, outputs = asyncio.run(main())
    assert lines == ["a\n", "b\n"]
    assert outputs == [str(i) for i in range(20)]


def test_async_stdin(sandbox: hutch.Sandbox) -> None:
    async def main() -> str:
        process = sandbox.exec(["cat"], stdin=True)
        await process.stdin.write("async ")
        await process.stdin.writeline("input")
        await process.stdin.close()
        return (await process).stdout

    assert asyncio.run(main()) == "async input\n"


def test_large_output_streams_completely(sandbox: hutch.Sandbox) -> None:
    # 4 MiB: under sandboxd's default 8 MiB retention, so nothing is dropped.
    result = sandbox.exec(["head", "-c", str(4 << 20), "/dev/zero"]).result(timeout=60)
    assert len(result.stdout_bytes) == 4 << 20
    assert result.dropped_bytes == 0


def test_send_signal(sandbox: hutch.Sandbox) -> None:
    process = sandbox.exec(["sh", "-c", "echo ready; exec sleep 30"])
    assert next(iter(process.stdout)) == "ready\n"
    process.send_signal("SIGTERM").result(timeout=10)
    assert process.wait(timeout=10) == -15
