"""The :class:`Sandbox` handle."""

from __future__ import annotations

import asyncio
import builtins
import concurrent.futures
import os
import posixpath
import threading
import time
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Generator, Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Union

from . import _cleanup, _loop
from ._daemon import DaemonClient
from ._http import CHUNK_SIZE, Transport, quote_segment, transport_for
from ._loop import OperationRef
from .config import Config, get_config
from .defaults import SandboxDefaults
from .exceptions import (
    HutchConnectionError,
    HutchError,
    SandboxError,
    SandboxFailedError,
    SandboxNotFoundError,
    SandboxNotRunningError,
    SandboxTerminatedError,
    SandboxTimeoutError,
)
from .process import Process
from .types import FileInfo, NetworkOptions, Resources, SandboxInfo, SandboxStatus

if TYPE_CHECKING:
    from .session import Session

__all__ = ["Sandbox", "FileContent"]

FileContent = Union[
    bytes, bytearray, memoryview, str, IO[bytes], "os.PathLike[str]", AsyncIterable[bytes], Iterable[bytes]
]
"""What ``write_file`` accepts: bytes, text (UTF-8), a binary file object, a local
``pathlib.Path`` to upload, or an (async) iterable of byte chunks."""

# Polling of the sandbox state: start fast (creation takes milliseconds),
# back off to keep an idle wait cheap.
_POLL_FIRST = 0.02
_POLL_MAX = 0.5
# Tries of the create request when the server cannot be reached.
_CREATE_ATTEMPTS = 3


def _flatten_command(command: Sequence[Any]) -> tuple[str, ...]:
    if len(command) == 1 and isinstance(command[0], (list, tuple)):
        command = command[0]
    return tuple(str(part) for part in command)


def _exec_argv(command: str | Sequence[str]) -> tuple[str, ...]:
    if isinstance(command, str):
        return ("/bin/sh", "-c", command)
    argv = tuple(str(part) for part in command)
    if not argv:
        raise ValueError("command must not be empty")
    return argv


class Sandbox:
    """One sandbox on a Hutch server.

    A sandbox starts on :meth:`start` or on the first operation that needs it
    (``exec``, files, ``wait``); :meth:`run` creates one and returns at once
    (it does not wait for ``running``: the server holds daemon calls until the
    sandbox runs). Use it as a context manager, sync or async, to stop it on
    exit. Sandboxes created by this process are stopped at interpreter exit
    and on SIGINT/SIGTERM unless ``stop_on_exit=False``.

    Args:
        *command: Optional main command (argv, or one list); the sandbox
            completes when it exits, ``failed`` for a non-zero exit.
        image: ``"host"`` (the host's root filesystem, read-only) or an OCI
            reference; the server's default when ``None``.
        resources: :class:`Resources` or a dict (``cpus``, ``memory_mb``,
            ``disk_mb``, ``pids``).
        env: Environment of the main command and of every ``exec``.
        tags: Labels to find the sandbox by; merged with ``defaults.tags``.
        timeout_seconds: Absolute lifetime (server default 3600 s).
        idle_timeout_seconds: Stop after this long without API or proxy traffic.
        network: :class:`NetworkOptions`, a dict, or ``"none"``/``"internet"``.
        ports: Ports reachable through the proxy (``info.urls``).
        working_dir: Working directory; relative file paths start here too.
        user: User of the processes (``name``, ``uid`` or ``uid:gid``).
        files: ``{path: content}`` written once the sandbox runs (see
            :meth:`write_file` for content types). A main ``command`` may
            start before they are written.
        defaults: :class:`SandboxDefaults` that the arguments above override.
        config: Server and key; the process-wide :func:`hutch.configure` default otherwise.
        stop_on_exit: Stop the sandbox when this interpreter exits.
    """

    def __init__(
        self,
        *command: str | Sequence[str],
        image: str | None = None,
        resources: Resources | Mapping[str, Any] | None = None,
        env: Mapping[str, str] | None = None,
        tags: Mapping[str, str] | None = None,
        timeout_seconds: float | None = None,
        idle_timeout_seconds: float | None = None,
        network: NetworkOptions | Mapping[str, Any] | str | None = None,
        ports: Sequence[int] | None = None,
        working_dir: str | None = None,
        user: str | None = None,
        files: Mapping[str, FileContent] | None = None,
        defaults: SandboxDefaults | None = None,
        config: Config | None = None,
        stop_on_exit: bool = True,
    ) -> None:
        self._config = config or get_config()
        base = defaults or SandboxDefaults()
        self._defaults = base.with_overrides(
            image=image,
            resources=Resources.coerce(resources),
            env=env,
            tags=tags,
            timeout_seconds=timeout_seconds,
            idle_timeout_seconds=idle_timeout_seconds,
            network=NetworkOptions.coerce(network),
            ports=ports,
            working_dir=working_dir,
            user=user,
        )
        self._command = _flatten_command(command)
        self._files = dict(files or {})
        self._stop_on_exit = stop_on_exit
        self._idempotency_key = uuid.uuid4().hex
        self._lock = threading.Lock()
        self._start_future: concurrent.futures.Future[Sandbox] | None = None
        self._id: str | None = None
        self._info: SandboxInfo | None = None
        self._stopped = False
        self._session: Session | None = None
        # Set only by tests that talk to a bare sandboxd.
        self._daemon_url: str | None = None
        if stop_on_exit:
            # Hooks go in now, from the caller's thread: creation itself runs
            # on the SDK's loop thread, where signal handlers cannot be set.
            _cleanup.install()

    # -- construction -------------------------------------------------------

    @classmethod
    def run(cls, *command: str | Sequence[str], **kwargs: Any) -> Sandbox:
        """Creates a sandbox (optionally running ``command`` as its main process) and returns it.

        Returns once the server accepted it (state ``pending``); ``exec`` and
        file calls made right away wait on the server until it is running.
        Takes the keyword arguments of :class:`Sandbox`.
        """
        sandbox = cls(*command, **kwargs)
        sandbox.start().result()
        return sandbox

    @classmethod
    def from_id(cls, sandbox_id: str, *, config: Config | None = None) -> OperationRef[Sandbox]:
        """A handle on an existing sandbox. Not stopped at exit by this process."""
        cfg = config or get_config()

        async def fetch() -> Sandbox:
            info = await _get_info(cfg, sandbox_id)
            return cls._from_info(info, cfg)

        return OperationRef.from_coroutine(fetch())

    @classmethod
    def _from_info(cls, info: SandboxInfo, config: Config) -> Sandbox:
        sandbox = cls(config=config, stop_on_exit=False)
        sandbox._id = info.id
        sandbox._info = info
        future: concurrent.futures.Future[Sandbox] = concurrent.futures.Future()
        future.set_result(sandbox)
        sandbox._start_future = future
        return sandbox

    @classmethod
    def _attach_daemon(cls, url: str) -> Sandbox:
        """A sandbox whose daemon calls go straight to a sandboxd at ``url`` (for tests)."""
        sandbox = cls(config=Config(url=url, api_key=None), stop_on_exit=False)
        sandbox._daemon_url = url
        sandbox._id = "direct"
        future: concurrent.futures.Future[Sandbox] = concurrent.futures.Future()
        future.set_result(sandbox)
        sandbox._start_future = future
        return sandbox

    @classmethod
    def list(
        cls,
        *,
        tags: Mapping[str, str] | None = None,
        status: SandboxStatus | str | None = None,
        include_stopped: bool = False,
        config: Config | None = None,
    ) -> OperationRef[builtins.list[Sandbox]]:
        """Sandboxes of the namespace matching every tag and the status, all pages."""
        cfg = config or get_config()

        async def fetch() -> builtins.list[Sandbox]:
            return [cls._from_info(info, cfg) for info in await _list_infos(cfg, tags, status, include_stopped)]

        return OperationRef.from_coroutine(fetch())

    @staticmethod
    def delete(sandbox_id: str, *, missing_ok: bool = False, config: Config | None = None) -> OperationRef[None]:
        """Deletes a sandbox by id: stops it if needed; the server forgets it once terminated."""
        cfg = config or get_config()

        async def run() -> None:
            transport = transport_for(cfg)
            try:
                await transport.request("DELETE", _sandbox_path(cfg, sandbox_id), sandbox_id=sandbox_id)
            except SandboxNotFoundError:
                if not missing_ok:
                    raise

        return OperationRef.from_coroutine(run())

    # -- lifecycle ------------------------------------------------------------

    @property
    def id(self) -> str | None:
        """The sandbox id, ``None`` until it was created."""
        return self._id

    sandbox_id = id

    @property
    def status(self) -> SandboxStatus | None:
        """The last state seen (no request); ``None`` before it was created."""
        return self._info.state if self._info else None

    @property
    def info(self) -> SandboxInfo | None:
        """The last ``Sandbox`` object the server returned."""
        return self._info

    @property
    def session(self) -> Session | None:
        return self._session

    @property
    def config(self) -> Config:
        return self._config

    def start(self) -> OperationRef[Sandbox]:
        """Creates the sandbox if it was not yet; the ref's value is this sandbox."""
        with self._lock:
            if self._start_future is None:
                self._start_future = _loop.submit(self._create())
            return OperationRef(self._start_future)

    async def _ensure_started(self) -> None:
        ref = self.start()
        await asyncio.wrap_future(ref._future)

    async def _create(self) -> Sandbox:
        transport = transport_for(self._config)
        body = self._defaults.to_create_body(self._command)
        attempt = 0
        while True:
            try:
                data = await transport.json(
                    "POST",
                    _sandboxes_path(self._config),
                    json_body=body,
                    headers={"Idempotency-Key": self._idempotency_key},
                )
                break
            except HutchConnectionError:
                # The idempotency key makes a retry safe: a create that did
                # reach the server returns the same sandbox.
                attempt += 1
                if attempt >= _CREATE_ATTEMPTS:
                    raise
                await asyncio.sleep(0.2 * attempt)
        self._info = SandboxInfo.from_wire(data)
        self._id = self._info.id
        if self._stop_on_exit:
            _cleanup.register(self)
        for path, content in self._files.items():
            await self._write_file(path, content, None)
        return self

    def _daemon_client(self) -> DaemonClient:
        if self._daemon_url is not None:
            return DaemonClient(transport_for(self._config), "", self._id)
        assert self._id is not None
        return DaemonClient(
            transport_for(self._config),
            _sandbox_path(self._config, self._id) + "/daemon",
            self._id,
        )

    async def _daemon(self) -> DaemonClient:
        await self._ensure_started()
        return self._daemon_client()

    async def _refresh(self) -> SandboxInfo:
        await self._ensure_started()
        if self._daemon_url is not None:
            raise SandboxError("this handle talks to sandboxd directly and has no server state")
        assert self._id is not None
        self._info = await _get_info(self._config, self._id)
        return self._info

    def refresh(self) -> OperationRef[SandboxInfo]:
        """Fetches the sandbox's current state from the server."""
        return OperationRef.from_coroutine(self._refresh())

    def get_status(self) -> SandboxStatus:
        """Fetches and returns the current state.

        Raises:
            SandboxNotRunningError: the sandbox was never started.
        """
        if self._start_future is None:
            raise SandboxNotRunningError("the sandbox was not started", sandbox_id=None)
        return self.refresh().result().state

    async def _wait_for(self, done: Any, timeout: float | None) -> SandboxInfo:
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = _POLL_FIRST
        while True:
            info = await self._refresh()
            if done(info):
                return info
            if deadline is not None and time.monotonic() >= deadline:
                raise SandboxTimeoutError(
                    f"sandbox {self._id} still {info.state.value} after {timeout} s", sandbox_id=self._id
                )
            sleep = delay if deadline is None else min(delay, max(0.0, deadline - time.monotonic()))
            await asyncio.sleep(sleep)
            delay = min(delay * 2, _POLL_MAX)

    async def _wait_running(self, timeout: float | None) -> Sandbox:
        info = await self._wait_for(lambda i: i.state == SandboxStatus.RUNNING or i.state.is_terminal, timeout)
        if info.state == SandboxStatus.FAILED:
            raise _terminal_error(info)
        if info.state == SandboxStatus.TERMINATED:
            raise _terminal_error(info)
        return self

    def wait(self, timeout: float | None = None) -> Sandbox:
        """Blocks until the sandbox is running (or has already completed); returns it.

        Raises:
            SandboxFailedError, SandboxTerminatedError: it ended before running.
            SandboxTimeoutError: ``timeout`` passed first.
        """
        return _loop.run_sync(self._wait_running(timeout))

    def __await__(self) -> Generator[Any, None, Sandbox]:
        """``await sandbox`` starts it if needed and waits until it is running."""
        return OperationRef.from_coroutine(self._wait_running(None)).__await__()

    def wait_until_complete(
        self, timeout: float | None = None, *, raise_on_termination: bool = True
    ) -> OperationRef[SandboxInfo]:
        """Waits until the sandbox reaches a terminal state and returns its final info.

        Raises:
            SandboxFailedError: it failed (including a main command exiting non-zero).
            SandboxTerminatedError: it was stopped, and ``raise_on_termination`` is true.
            SandboxTimeoutError: ``timeout`` passed first.
        """

        async def run() -> SandboxInfo:
            info = await self._wait_for(lambda i: i.state.is_terminal, timeout)
            if info.state == SandboxStatus.FAILED:
                raise _terminal_error(info)
            if info.state == SandboxStatus.TERMINATED and raise_on_termination:
                raise _terminal_error(info)
            return info

        return OperationRef.from_coroutine(run())

    def stop(self, graceful_shutdown_seconds: float = 10, *, missing_ok: bool = False) -> OperationRef[None]:
        """Asks the server to stop the sandbox (SIGTERM, then SIGKILL after the grace).

        A sandbox that was never started is left alone. ``missing_ok``
        ignores a sandbox the server no longer knows.
        """
        with self._lock:
            never_started = self._start_future is None
        if never_started:
            return OperationRef.completed(None)

        async def run() -> None:
            try:
                await self._ensure_started()
            except HutchError:
                if self._id is None:
                    return  # Creation failed: there is nothing to stop.
                raise
            assert self._id is not None
            transport = transport_for(self._config)
            try:
                data = await transport.json(
                    "POST",
                    _sandbox_path(self._config, self._id) + "/stop",
                    json_body={"grace_secs": max(0, int(graceful_shutdown_seconds))},
                    sandbox_id=self._id,
                )
                if isinstance(data, dict) and "id" in data:
                    self._info = SandboxInfo.from_wire(data)
            except SandboxNotFoundError:
                if not missing_ok:
                    raise
            self._stopped = True
            _cleanup.unregister(self)
            if self._session is not None:
                self._session._forget(self)

        return OperationRef.from_coroutine(run())

    def set_timeout(self, timeout_seconds: float) -> OperationRef[SandboxInfo]:
        """Sets a new absolute deadline, counted from now."""

        async def run() -> SandboxInfo:
            await self._ensure_started()
            assert self._id is not None
            data = await transport_for(self._config).json(
                "POST",
                _sandbox_path(self._config, self._id) + "/timeout",
                json_body={"timeout_secs": max(1, int(timeout_seconds))},
                sandbox_id=self._id,
            )
            self._info = SandboxInfo.from_wire(data)
            return self._info

        return OperationRef.from_coroutine(run())

    # -- processes -----------------------------------------------------------

    def exec(
        self,
        command: str | Sequence[str],
        *,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        user: str | None = None,
        check: bool = False,
        timeout_seconds: float | None = None,
        stdin: bool = False,
    ) -> Process:
        """Starts ``command`` (an argv list, or a string run by ``/bin/sh -c``) and returns at once.

        The :class:`Process` streams output live and is an
        ``OperationRef[ProcessResult]``. With ``check=True`` a non-zero exit
        raises :class:`SandboxExecutionError`; ``timeout_seconds`` kills the
        command and raises :class:`SandboxTimeoutError`; ``stdin=True`` opens
        ``process.stdin``.
        """
        argv = _exec_argv(command)
        return Process(
            self._daemon,
            argv,
            cwd=cwd,
            env=env,
            user=user,
            check=check,
            timeout_seconds=timeout_seconds,
            stdin=stdin,
            sandbox_id=self._id,
        )

    # -- files ---------------------------------------------------------------

    def _abspath(self, path: str | os.PathLike[str]) -> str:
        text = os.fspath(path)
        if text.startswith("/"):
            return text
        return posixpath.join(self._defaults.working_dir or "/", text)

    def read_file(
        self, path: str | os.PathLike[str], *, dest: str | os.PathLike[str] | IO[bytes] | None = None
    ) -> OperationRef[Any]:
        """Reads a file of the sandbox.

        Without ``dest`` the value is the file's bytes. With ``dest`` (a local
        path or a writable binary file object) the bytes are streamed into it
        chunk by chunk, memory stays flat, and the value is the byte count.
        """
        remote = self._abspath(path)

        async def run() -> Any:
            daemon = await self._daemon()
            if dest is None:
                parts = [chunk async for chunk in daemon.read_file(remote)]
                return b"".join(parts)
            return await _download(daemon.read_file(remote), dest)

        return OperationRef.from_coroutine(run())

    def iter_file(self, path: str | os.PathLike[str]) -> AsyncIterator[bytes]:
        """Async iterator over a file's chunks, for async code that processes a stream."""
        remote = self._abspath(path)

        async def chunks() -> AsyncIterator[bytes]:
            daemon = await asyncio.wrap_future(_loop.submit(self._daemon()))
            user_loop = asyncio.get_running_loop()
            # A small bounded queue on the caller's loop: the pump (on the SDK
            # loop) waits for room, so a slow consumer slows the download.
            queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=4)

            async def put(item: Any) -> None:
                await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(queue.put(item), user_loop))

            async def pump() -> None:
                try:
                    async for chunk in daemon.read_file(remote):
                        await put(chunk)
                    await put(None)
                except asyncio.CancelledError:
                    raise
                except BaseException as e:  # noqa: BLE001 - handed to the consumer.
                    await put(e)

            pump_future = _loop.submit(pump())
            try:
                while True:
                    item = await queue.get()
                    if item is None:
                        return
                    if isinstance(item, BaseException):
                        raise item
                    yield item
            finally:
                pump_future.cancel()

        return chunks()

    def write_file(
        self, path: str | os.PathLike[str], content: FileContent, *, mode: int | None = None
    ) -> OperationRef[FileInfo]:
        """Writes a file (parents are created; it appears atomically).

        ``content`` is bytes, text (UTF-8), a binary file object or a local
        ``pathlib.Path`` (streamed in chunks: memory stays flat), or an
        iterable or async iterable of byte chunks. ``mode`` sets the
        permission bits, e.g. ``0o755``.
        """
        return OperationRef.from_coroutine(self._write_file(path, content, mode))

    async def _write_file(self, path: str | os.PathLike[str], content: FileContent, mode: int | None) -> FileInfo:
        remote = self._abspath(path)
        daemon = await self._daemon()
        body = _upload_body(content)
        return await daemon.write_file(remote, body, mode)

    def list_files(self, path: str | os.PathLike[str] = "/") -> OperationRef[builtins.list[FileInfo]]:
        """The entries of a directory, sorted by name."""
        remote = self._abspath(path)

        async def run() -> builtins.list[FileInfo]:
            return await (await self._daemon()).list_files(remote)

        return OperationRef.from_coroutine(run())

    def stat(self, path: str | os.PathLike[str]) -> OperationRef[FileInfo]:
        """Describes a path (symlinks are not followed)."""
        remote = self._abspath(path)

        async def run() -> FileInfo:
            return await (await self._daemon()).stat(remote)

        return OperationRef.from_coroutine(run())

    def remove_file(self, path: str | os.PathLike[str], *, recursive: bool = False) -> OperationRef[None]:
        """Deletes a file, or a directory (``recursive=True`` for a non-empty one)."""
        remote = self._abspath(path)

        async def run() -> None:
            await (await self._daemon()).remove(remote, recursive)

        return OperationRef.from_coroutine(run())

    def make_dir(self, path: str | os.PathLike[str], *, mode: int | None = None) -> OperationRef[FileInfo]:
        """Creates a directory and its parents (``mkdir -p``)."""
        remote = self._abspath(path)

        async def run() -> FileInfo:
            return await (await self._daemon()).mkdir(remote, mode)

        return OperationRef.from_coroutine(run())

    # -- context managers ------------------------------------------------------

    def __enter__(self) -> Sandbox:
        self.start().result()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop(missing_ok=True).result()

    async def __aenter__(self) -> Sandbox:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop(missing_ok=True)

    def __repr__(self) -> str:
        state = self._info.state.value if self._info else "not started"
        return f"<Sandbox {self._id or '?'} {state}>"


# -- helpers -----------------------------------------------------------------------


def _sandboxes_path(config: Config) -> str:
    return f"/v1/namespaces/{quote_segment(config.namespace)}/sandboxes"


def _sandbox_path(config: Config, sandbox_id: str) -> str:
    return f"{_sandboxes_path(config)}/{quote_segment(sandbox_id)}"


async def _get_info(config: Config, sandbox_id: str) -> SandboxInfo:
    transport: Transport = transport_for(config)
    data = await transport.json("GET", _sandbox_path(config, sandbox_id), sandbox_id=sandbox_id)
    return SandboxInfo.from_wire(data)


async def _list_infos(
    config: Config,
    tags: Mapping[str, str] | None,
    status: SandboxStatus | str | None,
    include_stopped: bool,
) -> list[SandboxInfo]:
    transport = transport_for(config)
    params: list[tuple[str, str]] = []
    for key, value in (tags or {}).items():
        params.append(("tag", f"{key}={value}"))
    if status is not None:
        params.append(("state", SandboxStatus(status).value))
    params.append(("include_stopped", "true" if include_stopped else "false"))
    infos: list[SandboxInfo] = []
    cursor: str | None = None
    while True:
        query = list(params) + ([("cursor", cursor)] if cursor else [])
        data = await transport.json("GET", _sandboxes_path(config), params=query)
        infos.extend(SandboxInfo.from_wire(item) for item in data.get("sandboxes", []))
        cursor = data.get("next_cursor")
        if not cursor:
            return infos


def _terminal_error(info: SandboxInfo) -> HutchError:
    detail = f"sandbox {info.id} is {info.state.value}"
    if info.reason:
        detail += f" ({info.reason}"
        if info.exit_code is not None:
            detail += f", exit code {info.exit_code}"
        detail += ")"
    cls = SandboxFailedError if info.state == SandboxStatus.FAILED else SandboxTerminatedError
    return cls(detail, sandbox_id=info.id, state=info.state.value, reason=info.reason)


def _upload_body(content: FileContent) -> Any:
    """The request body for ``content``: bytes as they are, anything large as a chunk stream."""
    if isinstance(content, str):
        return content.encode("utf-8")
    if isinstance(content, (bytes, bytearray, memoryview)):
        return bytes(content)
    if isinstance(content, os.PathLike):
        return _file_chunks(Path(content).open("rb"), close=True)
    if hasattr(content, "read"):
        return _file_chunks(content, close=False)  # type: ignore[arg-type]
    if hasattr(content, "__aiter__"):
        return content
    if hasattr(content, "__iter__"):
        iterator = iter(content)

        async def from_iterable() -> AsyncIterator[bytes]:
            for chunk in iterator:
                yield bytes(chunk)

        return from_iterable()
    raise TypeError(f"cannot upload a {type(content).__name__}")


async def _file_chunks(file: IO[bytes], *, close: bool) -> AsyncIterator[bytes]:
    try:
        while True:
            chunk = await asyncio.to_thread(file.read, CHUNK_SIZE)
            if not chunk:
                return
            if isinstance(chunk, str):
                chunk = chunk.encode("utf-8")
            yield chunk
    finally:
        if close:
            file.close()


async def _download(chunks: AsyncIterator[bytes], dest: str | os.PathLike[str] | IO[bytes]) -> int:
    close = False
    if isinstance(dest, (str, os.PathLike)):
        file: IO[bytes] = Path(dest).open("wb")
        close = True
    else:
        file = dest
    total = 0
    try:
        async for chunk in chunks:
            await asyncio.to_thread(file.write, chunk)
            total += len(chunk)
    finally:
        if close:
            file.close()
    return total
