"""The single background event loop and :class:`OperationRef`.

Every network operation of the SDK is one coroutine run on a private event
loop in a daemon thread. Sync callers block on a
:class:`concurrent.futures.Future`; async callers await the same future
wrapped for their own loop. So there is one implementation, it works in a
Jupyter kernel (whose loop is already running) and inside any user loop, and
HTTP connections are owned by exactly one loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
import time
from collections.abc import Awaitable, Coroutine, Generator, Iterable
from typing import Any, Generic, TypeVar, overload

T = TypeVar("T")

__all__ = ["OperationRef", "result", "wait"]


class _BackgroundLoop:
    """Owns the event loop thread; restarted in a forked child."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._pid: int | None = None

    def get(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None or self._pid != os.getpid():
                self._start()
            assert self._loop is not None
            return self._loop

    def _start(self) -> None:
        loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(ready.set)
            loop.run_forever()

        thread = threading.Thread(target=run, name="hutch-loop", daemon=True)
        thread.start()
        ready.wait()
        self._loop, self._thread, self._pid = loop, thread, os.getpid()

    def in_loop_thread(self) -> bool:
        return self._thread is not None and threading.current_thread() is self._thread


_background = _BackgroundLoop()


def loop() -> asyncio.AbstractEventLoop:
    """The SDK's background loop, started on first use."""
    return _background.get()


def submit(coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
    """Schedules ``coro`` on the background loop."""
    return asyncio.run_coroutine_threadsafe(coro, loop())


def run_sync(coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
    """Runs ``coro`` on the background loop and blocks for its result."""
    return OperationRef(submit(coro)).result(timeout)


def in_loop_thread() -> bool:
    return _background.in_loop_thread()


class OperationRef(Generic[T]):
    """A running operation: ``.result(timeout)`` from sync code, ``await`` from async code.

    The operation starts when the ref is created; neither form is needed for it
    to make progress. Both forms raise the operation's exception.
    Never call ``.result()`` inside a running event loop: it blocks that loop.
    """

    __slots__ = ("_future",)

    def __init__(self, future: concurrent.futures.Future[T]) -> None:
        self._future = future

    @classmethod
    def from_coroutine(cls, coro: Coroutine[Any, Any, T]) -> OperationRef[T]:
        return cls(submit(coro))

    @classmethod
    def completed(cls, value: T) -> OperationRef[T]:
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        future.set_result(value)
        return cls(future)

    def result(self, timeout: float | None = None) -> T:
        """Blocks until the operation is done and returns its value.

        Raises:
            TimeoutError: ``timeout`` seconds passed first (the operation goes on).
        """
        if in_loop_thread() and not self._future.done():
            raise RuntimeError("OperationRef.result() called on the SDK's own event loop; await it instead")
        try:
            return self._future.result(timeout)
        except concurrent.futures.TimeoutError:
            if self._future.done():
                raise
            raise TimeoutError(f"operation not done after {timeout} s") from None

    def done(self) -> bool:
        """Whether the operation finished (with a value, an error, or cancelled)."""
        return self._future.done()

    def cancel(self) -> bool:
        """Cancels the operation if it has not finished; returns whether it was cancelled."""
        return self._future.cancel()

    def exception(self, timeout: float | None = None) -> BaseException | None:
        return self._future.exception(timeout)

    def add_done_callback(self, fn: Any) -> None:
        self._future.add_done_callback(lambda _f: fn(self))

    def __await__(self) -> Generator[Any, None, T]:
        return asyncio.wrap_future(self._future).__await__()

    def __repr__(self) -> str:
        state = "done" if self._future.done() else "running"
        return f"<{type(self).__name__} {state}>"


def _as_future(item: Any) -> concurrent.futures.Future[Any]:
    if isinstance(item, OperationRef):
        return item._future
    future = getattr(item, "_future", None)
    if isinstance(future, concurrent.futures.Future):
        return future
    raise TypeError(f"expected an OperationRef, got {type(item).__name__}")


@overload
def result(refs: OperationRef[T], timeout: float | None = None) -> T: ...
@overload
def result(refs: Iterable[OperationRef[T]], timeout: float | None = None) -> list[T]: ...
def result(refs: Any, timeout: float | None = None) -> Any:
    """The value of one ref, or the values of many refs in order.

    ``timeout`` bounds the whole call, not each ref.
    """
    if isinstance(refs, OperationRef):
        return refs.result(timeout)
    items = list(refs)
    deadline = None if timeout is None else time.monotonic() + timeout
    values = []
    for item in items:
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        values.append(item.result(remaining))
    return values


def wait(
    refs: Iterable[OperationRef[Any]],
    num_returns: int | None = None,
    timeout: float | None = None,
) -> tuple[list[OperationRef[Any]], list[OperationRef[Any]]]:
    """Waits until ``num_returns`` refs (default: all) are done or ``timeout`` passes.

    Returns ``(done, pending)``, each in the order the refs were given. Failed
    refs count as done; their errors are raised by ``.result()``.
    """
    items = list(refs)
    want = len(items) if num_returns is None else max(0, min(num_returns, len(items)))
    by_future = {id(_as_future(item)): item for item in items}
    futures = [_as_future(item) for item in items]
    deadline = None if timeout is None else time.monotonic() + timeout
    done_ids: set[int] = {id(f) for f in futures if f.done()}
    while len(done_ids) < want:
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            break
        pending_futures = [f for f in futures if id(f) not in done_ids]
        finished, _ = concurrent.futures.wait(
            pending_futures, timeout=remaining, return_when=concurrent.futures.FIRST_COMPLETED
        )
        if not finished:
            break
        done_ids.update(id(f) for f in finished)
    done = [by_future[id(f)] for f in futures if id(f) in done_ids]
    if num_returns is not None and len(done) > want:
        done = done[:want]
    kept = {id(item) for item in done}
    pending = [item for item in items if id(item) not in kept]
    return done, pending


async def gather_refs(refs: Iterable[Awaitable[T]]) -> list[T]:
    """Awaits many refs from async code."""
    return list(await asyncio.gather(*refs))
