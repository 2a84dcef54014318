"""Stops this process's sandboxes at interpreter exit and on SIGINT/SIGTERM.

Sandboxes register themselves once created (unless ``stop_on_exit=False``)
and unregister once stopped. At exit every registered sandbox is stopped
concurrently within a bounded time. On the first SIGINT/SIGTERM the same
happens before the previous handler runs (SIGINT then raises
KeyboardInterrupt as usual); a second signal during that cleanup exits at
once. Inside a Jupyter kernel only SIGTERM is hooked: SIGINT interrupts a
cell there.
"""

from __future__ import annotations

import atexit
import os
import signal
import sys
import threading
import weakref
from typing import TYPE_CHECKING, Any

from . import _loop

if TYPE_CHECKING:
    from .sandbox import Sandbox

# Bound on the whole cleanup: a server that does not answer must not keep
# the interpreter from exiting.
CLEANUP_TIMEOUT_SECONDS = 10.0

_lock = threading.Lock()
_registry: dict[int, weakref.ref[Sandbox]] = {}
_installed = False
_cleaning = False
_previous_handlers: dict[int, Any] = {}


def register(sandbox: Sandbox) -> None:
    """Stops ``sandbox`` at exit unless it is unregistered first."""
    with _lock:
        _registry[id(sandbox)] = weakref.ref(sandbox)
    install()


def unregister(sandbox: Sandbox) -> None:
    with _lock:
        _registry.pop(id(sandbox), None)


def registered() -> list[Sandbox]:
    with _lock:
        refs = list(_registry.values())
    return [s for s in (r() for r in refs) if s is not None]


def stop_all(timeout: float = CLEANUP_TIMEOUT_SECONDS) -> None:
    """Stops every registered sandbox, concurrently, within ``timeout`` seconds."""
    sandboxes = registered()
    if not sandboxes:
        return
    refs = []
    for sandbox in sandboxes:
        try:
            refs.append(sandbox.stop(graceful_shutdown_seconds=0, missing_ok=True))
        except Exception:  # noqa: BLE001 - cleanup must go on for the others.
            continue
    _loop.wait(refs, timeout=timeout)


def _at_exit() -> None:
    global _cleaning
    _cleaning = True
    try:
        stop_all()
    except Exception:  # noqa: BLE001 - never fail interpreter shutdown.
        pass


def _on_signal(signum: int, frame: Any) -> None:
    global _cleaning
    if _cleaning:
        # Second signal: the user does not want to wait for the cleanup.
        os._exit(128 + signum)
    _cleaning = True
    try:
        stop_all()
    finally:
        _cleaning = False
    previous = _previous_handlers.get(signum)
    if callable(previous):
        previous(signum, frame)
        return
    if previous == signal.SIG_IGN:
        return
    # SIG_DFL (or unknown): die of the signal as if we had not caught it.
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


_signals_installed = False


def install() -> None:
    """Sets the exit and signal hooks once; signal hooks need the main thread."""
    global _installed, _signals_installed
    with _lock:
        first = not _installed
        _installed = True
        # Signal handlers can only be set from the main thread; a later
        # registration from it installs them if an earlier one could not.
        want_signals = not _signals_installed and threading.current_thread() is threading.main_thread()
        if want_signals:
            _signals_installed = True
    if first:
        atexit.register(_at_exit)
    if not want_signals:
        return
    signals = [signal.SIGTERM]
    # In a Jupyter kernel SIGINT means "interrupt this cell", not "quit":
    # stopping every sandbox then would be a surprise.
    if "ipykernel" not in sys.modules:
        signals.append(signal.SIGINT)
    for signum in signals:
        try:
            previous = signal.getsignal(signum)
            signal.signal(signum, _on_signal)
        except (ValueError, OSError):
            continue
        _previous_handlers[signum] = previous
