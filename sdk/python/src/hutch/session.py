"""Sessions: many sandboxes sharing defaults, cleaned up together, and remote functions."""

from __future__ import annotations

import asyncio
import enum
import functools
import threading
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Generic, TypeVar

from . import _cleanup, _functions
from ._loop import OperationRef
from .config import Config, get_config
from .defaults import SandboxDefaults
from .exceptions import FunctionError, HutchError
from .sandbox import Sandbox
from .types import NetworkOptions, Resources

__all__ = ["Session", "RemoteFunction", "Serialization"]

R = TypeVar("R")

SESSION_TAG = "hutch-session"
FUNCTION_TAG = "hutch-function"


class Serialization(str, enum.Enum):
    """How a remote function's arguments, captured values and result travel."""

    JSON = "json"
    PICKLE = "pickle"


class Session:
    """A group of sandboxes sharing frozen :class:`SandboxDefaults`.

    Every sandbox of the session is tagged ``hutch-session=<session id>``;
    :meth:`close` (or leaving the ``with`` block) stops them all, and so do
    interpreter exit and SIGINT/SIGTERM for sessions still open.
    """

    def __init__(
        self,
        defaults: SandboxDefaults | None = None,
        *,
        config: Config | None = None,
        max_concurrency: int = 64,
    ) -> None:
        self.id = uuid.uuid4().hex[:16]
        self._config = config or get_config()
        self._defaults = (defaults or SandboxDefaults()).with_overrides(tags={SESSION_TAG: self.id})
        self._lock = threading.Lock()
        self._sandboxes: dict[int, Sandbox] = {}
        self._closed = False
        self._max_concurrency = max_concurrency
        self._semaphore: asyncio.Semaphore | None = None
        _cleanup.install()

    @property
    def defaults(self) -> SandboxDefaults:
        return self._defaults

    @property
    def config(self) -> Config:
        return self._config

    @property
    def sandbox_count(self) -> int:
        """Sandboxes of this session not stopped through it yet."""
        with self._lock:
            return len(self._sandboxes)

    def _check_open(self) -> None:
        if self._closed:
            raise HutchError("the session is closed")

    def _track(self, sandbox: Sandbox) -> Sandbox:
        sandbox._session = self
        sandbox._stop_on_exit = True
        with self._lock:
            self._sandboxes[id(sandbox)] = sandbox
        return sandbox

    def _forget(self, sandbox: Sandbox) -> None:
        with self._lock:
            self._sandboxes.pop(id(sandbox), None)

    def sandbox(self, *command: str | Sequence[str], **overrides: Any) -> Sandbox:
        """A sandbox with the session's defaults and ``overrides``; it starts on first use.

        Takes the keyword arguments of :class:`Sandbox` (``files``,
        ``image``, ``tags`` merged with the session's, ...).
        """
        self._check_open()
        files = overrides.pop("files", None)
        stop_on_exit = overrides.pop("stop_on_exit", True)
        del stop_on_exit  # A session's sandboxes are always cleaned up with it.
        if "resources" in overrides:
            overrides["resources"] = Resources.coerce(overrides["resources"])
        if "network" in overrides:
            overrides["network"] = NetworkOptions.coerce(overrides["network"])
        defaults = self._defaults.with_overrides(**overrides)
        return self._track(Sandbox(*command, defaults=defaults, files=files, config=self._config))

    def adopt(self, sandbox: Sandbox) -> Sandbox:
        """Makes an existing sandbox part of the session: it is stopped with it."""
        self._check_open()
        if sandbox.id is not None:
            _cleanup.register(sandbox)
        return self._track(sandbox)

    def from_id(self, sandbox_id: str) -> OperationRef[Sandbox]:
        """Fetches a sandbox by id and adopts it."""

        async def run() -> Sandbox:
            sandbox = await Sandbox.from_id(sandbox_id, config=self._config)
            return self.adopt(sandbox)

        return OperationRef.from_coroutine(run())

    def list(self, *, include_stopped: bool = False) -> OperationRef[list[Sandbox]]:
        """The server's sandboxes tagged with this session."""
        return Sandbox.list(tags={SESSION_TAG: self.id}, include_stopped=include_stopped, config=self._config)

    def function(
        self,
        *,
        serialization: Serialization | str = Serialization.JSON,
        python: str = "python3",
        **overrides: Any,
    ) -> Callable[[Callable[..., R]], RemoteFunction[R]]:
        """Decorator: run a function in a fresh sandbox of this session per call.

        ``serialization`` is ``"json"`` (default) or ``"pickle"``;
        ``python`` is the interpreter in the sandbox; other keywords override
        the session's sandbox defaults (``image``, ``resources``, ``env``...).
        """
        mode = Serialization(serialization).value

        def decorate(fn: Callable[..., R]) -> RemoteFunction[R]:
            return RemoteFunction(self, fn, serialization=mode, python=python, overrides=overrides)

        return decorate

    def _gate(self) -> asyncio.Semaphore:
        if self._semaphore is None:
            self._semaphore = asyncio.Semaphore(self._max_concurrency)
        return self._semaphore

    def close(self) -> OperationRef[None]:
        """Stops every sandbox of the session (concurrently); the session takes no new ones."""
        self._closed = True
        with self._lock:
            sandboxes = list(self._sandboxes.values())

        async def run() -> None:
            refs = [sandbox.stop(graceful_shutdown_seconds=0, missing_ok=True) for sandbox in sandboxes]
            results = await asyncio.gather(*(asyncio.wrap_future(r._future) for r in refs), return_exceptions=True)
            errors = [r for r in results if isinstance(r, BaseException)]
            with self._lock:
                for sandbox in sandboxes:
                    self._sandboxes.pop(id(sandbox), None)
            if errors:
                raise errors[0]

        return OperationRef.from_coroutine(run())

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close().result()

    async def __aenter__(self) -> Session:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"<Session {self.id} sandboxes={self.sandbox_count}>"


class RemoteFunction(Generic[R]):
    """A function that runs in a sandbox: ``remote``, ``map``; ``local`` and ``__call__`` run here."""

    def __init__(
        self,
        session: Session,
        fn: Callable[..., R],
        *,
        serialization: str,
        python: str,
        overrides: Mapping[str, Any],
    ) -> None:
        self._session = session
        self._fn = fn
        self._serialization = serialization
        self._python = python
        self._overrides = dict(overrides)
        functools.update_wrapper(self, fn)
        # Fails at decoration time for lambdas and functions without source.
        _functions.function_source(fn)

    @property
    def serialization(self) -> str:
        return self._serialization

    def local(self, *args: Any, **kwargs: Any) -> R:
        """Calls the function here, in this process."""
        return self._fn(*args, **kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> R:
        """Calls the function locally, like :meth:`local` (use :meth:`remote` for a sandbox)."""
        return self._fn(*args, **kwargs)

    def remote(self, *args: Any, **kwargs: Any) -> OperationRef[R]:
        """Runs the function in a new sandbox; the ref's value is its return value.

        Raises:
            FunctionSerializationError: at once, when the function, its
                captured values or the arguments cannot be serialized.
        """
        self._session._check_open()
        payload = _functions.build_payload(self._fn, args, kwargs, self._serialization)
        return OperationRef.from_coroutine(self._run(payload))

    def map(self, items: Iterable[Any]) -> list[OperationRef[R]]:
        """One :meth:`remote` call per item, all in parallel. A tuple item is spread as arguments."""
        refs = []
        for item in items:
            args = item if isinstance(item, tuple) else (item,)
            refs.append(self.remote(*args))
        return refs

    async def _run(self, payload: bytes) -> R:
        name = self._fn.__name__
        overrides = dict(self._overrides)
        tags = dict(overrides.pop("tags", {}) or {})
        tags.setdefault(FUNCTION_TAG, name[:63])
        async with self._session._gate():
            sandbox = self._session.sandbox(tags=tags, **overrides)
            try:
                process = sandbox.exec([self._python, "-c", _functions.BOOTSTRAP], stdin=True)
                await process.stdin.write(payload, close=True)
                outcome = await process
                if not outcome.stdout_bytes:
                    raise FunctionError(
                        f"{name}: the sandbox's Python ended with {outcome.returncode} and wrote no result: "
                        f"{outcome.stderr[-2000:]}",
                        remote_traceback=outcome.stderr or None,
                    )
                return _functions.parse_result(outcome.stdout_bytes, self._serialization, name)  # type: ignore[no-any-return]
            finally:
                await sandbox.stop(graceful_shutdown_seconds=0, missing_ok=True)

    def __repr__(self) -> str:
        return f"<RemoteFunction {self._fn.__qualname__} ({self._serialization})>"
