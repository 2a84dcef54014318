"""A command running in a sandbox: live output, stdin, exit."""

from __future__ import annotations

import asyncio
import codecs
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from typing import Any, Literal

import httpx

from . import _loop
from ._daemon import DaemonClient
from ._loop import OperationRef
from .exceptions import HutchConnectionError, SandboxError, SandboxExecutionError, SandboxTimeoutError
from .types import OutputChunk, ProcessResult

__all__ = ["Process", "StreamReader", "StdinWriter"]

# How often a dropped output stream is resumed before giving up.
_MAX_RESUMES = 8


class _Output:
    """Output of one process as it arrives. Mutated only on the background loop.

    The lists only grow, so other threads may read items below their length
    without a lock (appends are atomic under the GIL).
    """

    def __init__(self) -> None:
        self.combined: list[OutputChunk] = []
        self.by_stream: dict[str, list[bytes]] = {"stdout": [], "stderr": []}
        self.closed = False
        self.error: BaseException | None = None
        self.exit: dict[str, Any] | None = None
        self.dropped = 0
        self._cond: asyncio.Condition | None = None

    def _condition(self) -> asyncio.Condition:
        if self._cond is None:
            self._cond = asyncio.Condition()
        return self._cond

    async def append(self, stream: str, data: bytes) -> None:
        if stream not in self.by_stream:
            stream = "stdout"
        self.combined.append(OutputChunk(stream, data))  # type: ignore[arg-type]
        self.by_stream[stream].append(data)
        cond = self._condition()
        async with cond:
            cond.notify_all()

    async def close(self, error: BaseException | None = None) -> None:
        self.error = error
        self.closed = True
        cond = self._condition()
        async with cond:
            cond.notify_all()

    async def item(self, items: list[Any], index: int) -> Any:
        """The item at ``index`` once it exists, or ``None`` when the output ended before it."""
        cond = self._condition()
        async with cond:
            await cond.wait_for(lambda: len(items) > index or self.closed)
        if len(items) > index:
            return items[index]
        if self.error is not None:
            raise self.error
        return None

    async def wait_closed(self) -> None:
        cond = self._condition()
        async with cond:
            await cond.wait_for(lambda: self.closed)


def _sync_item(output: _Output, items: list[Any], index: int) -> Any:
    # Read `closed` before the length: it is set after the last append.
    closed = output.closed
    if index < len(items):
        return items[index]
    if closed and output.error is None:
        return None
    return _loop.run_sync(output.item(items, index))


async def _async_item(output: _Output, items: list[Any], index: int) -> Any:
    closed = output.closed
    if index < len(items):
        return items[index]
    if closed and output.error is None:
        return None
    if _loop.in_loop_thread():
        return await output.item(items, index)
    return await asyncio.wrap_future(_loop.submit(output.item(items, index)))


class StreamReader:
    """One output stream of a process (``stdout`` or ``stderr``), read live.

    ``for line in reader`` and ``async for line in reader`` yield text lines
    (newline kept) as the process writes them; :meth:`iter_bytes` and
    :meth:`aiter_bytes` yield raw chunks. Every iteration starts at the first
    byte: output is kept for the :class:`ProcessResult`.
    """

    def __init__(self, output: _Output, stream: Literal["stdout", "stderr"]) -> None:
        self._output = output
        self._stream = stream

    @property
    def name(self) -> str:
        return self._stream

    def iter_bytes(self) -> Iterator[bytes]:
        items = self._output.by_stream[self._stream]
        index = 0
        while True:
            chunk = _sync_item(self._output, items, index)
            if chunk is None:
                return
            index += 1
            yield chunk

    async def aiter_bytes(self) -> AsyncIterator[bytes]:
        items = self._output.by_stream[self._stream]
        index = 0
        while True:
            chunk = await _async_item(self._output, items, index)
            if chunk is None:
                return
            index += 1
            yield chunk

    def __iter__(self) -> Iterator[str]:
        splitter = _LineSplitter()
        for chunk in self.iter_bytes():
            yield from splitter.feed(chunk)
        yield from splitter.finish()

    async def __aiter__(self) -> AsyncIterator[str]:
        splitter = _LineSplitter()
        async for chunk in self.aiter_bytes():
            for line in splitter.feed(chunk):
                yield line
        for line in splitter.finish():
            yield line

    def read(self) -> str:
        """Waits for the process to end and returns the whole stream as text."""
        return b"".join(self.iter_bytes()).decode("utf-8", errors="replace")


class _LineSplitter:
    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""

    def feed(self, chunk: bytes) -> list[str]:
        text = self._pending + self._decoder.decode(chunk)
        lines = text.splitlines(keepends=True)
        if lines and not lines[-1].endswith(("\n", "\r")):
            self._pending = lines.pop()
        else:
            self._pending = ""
        return lines

    def finish(self) -> list[str]:
        text = self._pending + self._decoder.decode(b"", final=True)
        self._pending = ""
        return [text] if text else []


class StdinWriter:
    """The stdin pipe of a process started with ``stdin=True``.

    Each :meth:`write` returns an :class:`OperationRef` that completes once the
    bytes are in the process's pipe: calling ``.result()`` (or awaiting) before
    the next write is the backpressure. Writes are applied in call order.
    """

    def __init__(self, process: Process, enabled: bool) -> None:
        self._process = process
        self._enabled = enabled
        self._lock: asyncio.Lock | None = None
        self._closed = False

    def _check(self) -> None:
        if not self._enabled:
            raise SandboxError("stdin is closed for this process; pass stdin=True to exec()")

    async def _locked(self, fn: Callable[[DaemonClient, int], Awaitable[Any]]) -> Any:
        if self._lock is None:
            self._lock = asyncio.Lock()
        daemon, pid = await self._process._started()
        async with self._lock:
            return await fn(daemon, pid)

    def write(self, data: bytes | bytearray | memoryview | str, *, close: bool = False) -> OperationRef[int]:
        """Writes ``data`` (text is UTF-8 encoded); the ref's value is the byte count.

        ``close=True`` closes stdin after these bytes, in the same request.
        """
        self._check()
        payload = data.encode("utf-8") if isinstance(data, str) else bytes(data)
        if close:
            self._closed = True

        async def run() -> int:
            async def send(daemon: DaemonClient, pid: int) -> int:
                reply = await daemon.write_stdin(pid, payload, close)
                return int(reply.get("bytes_written", len(payload)))

            return int(await self._locked(send))

        return OperationRef.from_coroutine(run())

    def writeline(self, line: str | bytes) -> OperationRef[int]:
        """Writes ``line`` followed by a newline."""
        if isinstance(line, str):
            return self.write(line + "\n")
        return self.write(bytes(line) + b"\n")

    def close(self) -> OperationRef[None]:
        """Closes stdin after every earlier write: the process reads end-of-file."""
        self._check()
        self._closed = True

        async def run() -> None:
            async def send(daemon: DaemonClient, pid: int) -> None:
                await daemon.close_stdin(pid)

            await self._locked(send)

        return OperationRef.from_coroutine(run())

    @property
    def closed(self) -> bool:
        return self._closed


class Process(OperationRef[ProcessResult]):
    """A command started by :meth:`Sandbox.exec`; an ``OperationRef[ProcessResult]``.

    ``stdout``/``stderr`` stream live; ``stdin`` writes to it when it was
    started with ``stdin=True``. ``.result()``/``await`` give the
    :class:`ProcessResult` and raise :class:`SandboxExecutionError` for a
    non-zero exit when ``check=True``, and :class:`SandboxTimeoutError` when
    ``timeout_seconds`` elapsed.
    """

    __slots__ = ("_command", "_output", "stdout", "stderr", "stdin", "_check", "_pid_future", "_sandbox_id")

    def __init__(
        self,
        connect: Callable[[], Awaitable[DaemonClient]],
        command: Sequence[str],
        *,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        user: str | None = None,
        check: bool = False,
        timeout_seconds: float | None = None,
        stdin: bool = False,
        sandbox_id: str | None = None,
    ) -> None:
        self._command = tuple(command)
        self._output = _Output()
        self._check = check
        self._sandbox_id = sandbox_id
        self._pid_future: asyncio.Future[tuple[DaemonClient, int]] | None = None
        self.stdout = StreamReader(self._output, "stdout")
        self.stderr = StreamReader(self._output, "stderr")
        self.stdin = StdinWriter(self, stdin)
        timeout_ms = None if timeout_seconds is None else max(1, int(timeout_seconds * 1000))
        super().__init__(
            _loop.submit(self._run(connect, cwd=cwd, env=env, user=user, stdin=stdin, timeout_ms=timeout_ms))
        )

    def _pid_slot(self) -> asyncio.Future[tuple[DaemonClient, int]]:
        if self._pid_future is None:
            self._pid_future = asyncio.get_running_loop().create_future()
        return self._pid_future

    async def _started(self) -> tuple[DaemonClient, int]:
        return await asyncio.shield(self._pid_slot())

    async def _run(
        self,
        connect: Callable[[], Awaitable[DaemonClient]],
        *,
        cwd: str | None,
        env: Mapping[str, str] | None,
        user: str | None,
        stdin: bool,
        timeout_ms: int | None,
    ) -> ProcessResult:
        slot = self._pid_slot()
        try:
            daemon = await connect()
            if daemon.sandbox_id is not None:
                self._sandbox_id = daemon.sandbox_id
            info = await daemon.start_process(
                self._command, env=env, working_dir=cwd, user=user, stdin=stdin, timeout_ms=timeout_ms
            )
            pid = int(info["pid"])
        except BaseException as e:
            if not slot.done():
                slot.set_exception(e)
                slot.exception()  # Marks it retrieved: nobody may ever write to stdin.
            await self._output.close(e)
            raise
        slot.set_result((daemon, pid))
        try:
            await self._follow(daemon, pid)
        except BaseException as e:
            await self._output.close(e)
            raise
        await self._output.close()
        return self._finish()

    async def _follow(self, daemon: DaemonClient, pid: int) -> None:
        offset = 0
        failures = 0
        while True:
            try:
                async for event, payload in daemon.output_events(pid, offset):
                    failures = 0
                    if event == "output":
                        data: bytes = payload["bytes"]
                        start = int(payload.get("offset", offset))
                        if start < offset:  # Replayed bytes after a resume.
                            data = data[offset - start :]
                            start = offset
                        offset = start + len(data)
                        if data:
                            await self._output.append(str(payload.get("stream", "stdout")), data)
                    elif event == "dropped":
                        self._output.dropped += int(payload.get("bytes", 0))
                        offset = int(payload.get("offset", offset)) + int(payload.get("bytes", 0))
                    elif event == "exit":
                        self._output.exit = payload
                        return
            except (HutchConnectionError, httpx.TransportError):
                failures += 1
                if failures > _MAX_RESUMES:
                    raise
            else:
                # The stream ended without an exit: a proxy cut it. Resume.
                failures += 1
                if failures > _MAX_RESUMES:
                    raise HutchConnectionError("process output stream keeps ending before the exit")
            await asyncio.sleep(min(0.05 * failures, 1.0))

    def _finish(self) -> ProcessResult:
        exit_info = self._output.exit or {}
        signal = exit_info.get("signal")
        code = exit_info.get("exit_code")
        returncode = int(code) if code is not None else -int(signal or 0)
        result = ProcessResult(
            returncode=returncode,
            stdout_bytes=b"".join(self._output.by_stream["stdout"]),
            stderr_bytes=b"".join(self._output.by_stream["stderr"]),
            command=self._command,
            signal=int(signal) if signal is not None else None,
            timed_out=bool(exit_info.get("timed_out", False)),
            dropped_bytes=self._output.dropped,
        )
        if result.timed_out:
            raise SandboxTimeoutError(
                f"command {list(self._command)!r} timed out", result=result, sandbox_id=self._sandbox_id
            )
        if self._check and returncode != 0:
            raise SandboxExecutionError(
                f"command {list(self._command)!r} exited with {returncode}: {result.stderr[-500:]}",
                result=result,
                sandbox_id=self._sandbox_id,
            )
        return result

    @property
    def command(self) -> tuple[str, ...]:
        return self._command

    @property
    def returncode(self) -> int | None:
        """The exit code (``-N`` for signal ``N``) once known locally, else ``None``."""
        exit_info = self._output.exit
        if exit_info is None:
            return None
        if exit_info.get("exit_code") is not None:
            return int(exit_info["exit_code"])
        return -int(exit_info.get("signal") or 0)

    def poll(self) -> int | None:
        """The exit code if the process has ended, without waiting."""
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        """Blocks until the process exits and returns its exit code (no ``check``)."""
        _loop.run_sync(self._output.wait_closed(), timeout)
        if self._output.exit is None and self._output.error is not None:
            raise self._output.error
        code = self.returncode
        assert code is not None
        return code

    async def wait_async(self) -> int:
        """Async form of :meth:`wait`."""
        await asyncio.wrap_future(_loop.submit(self._output.wait_closed()))
        if self._output.exit is None and self._output.error is not None:
            raise self._output.error
        code = self.returncode
        assert code is not None
        return code

    @property
    def pid(self) -> int | None:
        """The pid inside the sandbox once started."""
        future = self._pid_future
        if future is None or not future.done() or future.cancelled() or future.exception() is not None:
            return None
        return future.result()[1]

    def iter_output(self) -> Iterator[OutputChunk]:
        """Yields stdout and stderr chunks interleaved exactly as they were written."""
        index = 0
        while True:
            chunk = _sync_item(self._output, self._output.combined, index)
            if chunk is None:
                return
            index += 1
            yield chunk

    async def aiter_output(self) -> AsyncIterator[OutputChunk]:
        """Async form of :meth:`iter_output`."""
        index = 0
        while True:
            chunk = await _async_item(self._output, self._output.combined, index)
            if chunk is None:
                return
            index += 1
            yield chunk

    def kill(self) -> OperationRef[None]:
        """Sends SIGKILL to the process group."""

        async def run() -> None:
            daemon, pid = await self._started()
            await daemon.kill(pid)

        return OperationRef.from_coroutine(run())

    def cancel(self) -> OperationRef[None]:  # type: ignore[override]
        """Kills the process; the result then reports signal 9 (``returncode == -9``)."""
        return self.kill()

    def send_signal(self, signal: str | int) -> OperationRef[None]:
        """Sends ``signal`` (``"SIGTERM"``, ``15``...) to the process."""

        async def run() -> None:
            daemon, pid = await self._started()
            await daemon.signal(pid, signal)

        return OperationRef.from_coroutine(run())

    def __repr__(self) -> str:
        return f"<Process {list(self._command)!r} returncode={self.returncode}>"
