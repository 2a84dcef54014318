"""Exceptions raised by the Hutch SDK.

Every exception derives from :class:`HutchError`. Errors the server or a
sandbox's daemon reports carry the stable ``code`` of the wire error
(``{"error": {"code", "message"}}``) and the HTTP ``status``, so a caller can
branch on them without parsing messages.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .types import ProcessResult

__all__ = [
    "HutchError",
    "HutchConnectionError",
    "AuthenticationError",
    "SandboxError",
    "SandboxNotRunningError",
    "SandboxTimeoutError",
    "SandboxTerminatedError",
    "SandboxFailedError",
    "SandboxNotFoundError",
    "SandboxExecutionError",
    "SandboxFileError",
    "FunctionError",
    "FunctionSerializationError",
]


class HutchError(Exception):
    """Base class of every error of the SDK.

    ``code`` and ``status`` are set when the error came from an HTTP answer.
    """

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        status: int | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.status = status
        self.details: dict[str, Any] = details or {}


class HutchConnectionError(HutchError):
    """The server (or a sandbox's daemon) could not be reached."""


class AuthenticationError(HutchError):
    """The API key is missing, unknown, or not allowed to do this (401/403)."""


class SandboxError(HutchError):
    """An error about one sandbox. ``sandbox_id`` names it when known."""

    def __init__(self, message: str, *, sandbox_id: str | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.sandbox_id = sandbox_id


class SandboxNotRunningError(SandboxError):
    """The sandbox is not running (yet, or any more).

    ``state`` and ``reason`` are the sandbox's state when the server said so.
    """

    def __init__(
        self,
        message: str,
        *,
        state: str | None = None,
        reason: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(message, **kwargs)
        self.state = state
        self.reason = reason


class SandboxTerminatedError(SandboxNotRunningError):
    """The sandbox was stopped: ``stopped``, ``deleted``, ``timeout``, ``idle_timeout`` or ``namespace_deleted``."""


class SandboxFailedError(SandboxNotRunningError):
    """The sandbox failed: image pull, start, OOM, lost node, or its command exited non-zero."""


class SandboxTimeoutError(SandboxError):
    """A deadline passed: waiting for a sandbox, or a command's ``timeout_seconds``.

    ``result`` holds what the command produced when a command timed out.
    """

    def __init__(self, message: str, *, result: ProcessResult | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.result = result


class SandboxNotFoundError(SandboxError):
    """No sandbox with this id exists in the namespace (or it was forgotten)."""


class SandboxExecutionError(SandboxError):
    """A command run with ``check=True`` exited non-zero; ``result`` holds its output."""

    def __init__(self, message: str, *, result: ProcessResult, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.result = result


class SandboxFileError(SandboxError):
    """A file operation failed; ``path`` is the path inside the sandbox."""

    def __init__(self, message: str, *, path: str | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.path = path


class FunctionError(HutchError):
    """A remote function raised; ``remote_type`` and ``remote_traceback`` describe it."""

    def __init__(
        self,
        message: str,
        *,
        remote_type: str | None = None,
        remote_traceback: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(message, **kwargs)
        self.remote_type = remote_type
        self.remote_traceback = remote_traceback

    def __str__(self) -> str:
        if self.remote_traceback:
            return f"{self.message}\n\nRemote traceback:\n{self.remote_traceback}"
        return self.message


class FunctionSerializationError(FunctionError):
    """A function, its arguments or its result could not be serialized."""


# Wire error codes that name a file problem in a daemon answer.
_FILE_CODES = frozenset(
    {
        "file_not_found",
        "not_a_directory",
        "is_a_directory",
        "already_exists",
        "directory_not_empty",
        "permission_denied",
        "invalid_path",
        "range_not_satisfiable",
    }
)

_TERMINATED_STATES = frozenset({"terminated", "completed"})


def error_from_response(
    status: int,
    body: Any,
    *,
    sandbox_id: str | None = None,
    path: str | None = None,
) -> HutchError:
    """Maps an error answer onto the exception hierarchy.

    ``body`` is the decoded JSON body (or anything else when it was not JSON).
    ``path`` marks a file operation, so file codes become :class:`SandboxFileError`.
    """
    error: dict[str, Any] = {}
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        error = body["error"]
    code = error.get("code") if isinstance(error.get("code"), str) else None
    message = str(error.get("message") or f"HTTP {status}")
    kwargs: dict[str, Any] = {"code": code, "status": status, "details": error}

    if status in (401, 403) or code in ("unauthenticated", "forbidden"):
        return AuthenticationError(message, **kwargs)
    if code == "sandbox_not_found" or (status == 404 and sandbox_id and path is None and code in (None, "not_found")):
        return SandboxNotFoundError(message, sandbox_id=sandbox_id, **kwargs)
    if code == "sandbox_not_running":
        state = error.get("state")
        reason = error.get("reason")
        cls: type[SandboxNotRunningError] = SandboxNotRunningError
        if state == "failed":
            cls = SandboxFailedError
        elif state in _TERMINATED_STATES:
            cls = SandboxTerminatedError
        return cls(message, sandbox_id=sandbox_id, state=state, reason=reason, **kwargs)
    if path is not None and (code in _FILE_CODES or (status == 404 and code == "not_found")):
        return SandboxFileError(message, path=path, sandbox_id=sandbox_id, **kwargs)
    if sandbox_id is not None:
        return SandboxError(message, sandbox_id=sandbox_id, **kwargs)
    return HutchError(message, **kwargs)
