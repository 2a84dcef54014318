"""Typed options and results. Options are frozen dataclasses; plain dicts are accepted too."""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from typing import Any, Literal

__all__ = [
    "Resources",
    "NetworkOptions",
    "SandboxStatus",
    "SandboxInfo",
    "FileInfo",
    "ProcessResult",
    "OutputChunk",
]


@dataclasses.dataclass(frozen=True)
class Resources:
    """Limits of one sandbox. ``None`` leaves the server's default (1 cpu, 512 MiB, 1 GiB, 512 pids)."""

    cpus: float | None = None
    memory_mb: int | None = None
    disk_mb: int | None = None
    pids: int | None = None

    @classmethod
    def coerce(cls, value: Resources | Mapping[str, Any] | None) -> Resources | None:
        if value is None or isinstance(value, Resources):
            return value
        if isinstance(value, Mapping):
            return cls(**dict(value))
        raise TypeError(f"resources must be Resources or a dict, not {type(value).__name__}")

    def to_wire(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclasses.dataclass(frozen=True)
class NetworkOptions:
    """Network of one sandbox: ``egress`` is ``"none"`` (default) or ``"internet"``."""

    egress: Literal["none", "internet"] = "none"

    @classmethod
    def coerce(cls, value: NetworkOptions | Mapping[str, Any] | str | None) -> NetworkOptions | None:
        if value is None or isinstance(value, NetworkOptions):
            return value
        if isinstance(value, str):
            return cls(egress=value)  # type: ignore[arg-type]
        if isinstance(value, Mapping):
            return cls(**dict(value))
        raise TypeError(f"network must be NetworkOptions, a dict or a str, not {type(value).__name__}")

    def to_wire(self) -> dict[str, Any]:
        return {"egress": self.egress}


class SandboxStatus(str, enum.Enum):
    """A sandbox's lifecycle state: ``pending → creating → running → completed | failed | terminated``."""

    PENDING = "pending"
    CREATING = "creating"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    TERMINATED = "terminated"

    @property
    def is_terminal(self) -> bool:
        return self in (SandboxStatus.COMPLETED, SandboxStatus.FAILED, SandboxStatus.TERMINATED)

    def __str__(self) -> str:
        return self.value


@dataclasses.dataclass(frozen=True)
class SandboxInfo:
    """What the server says about a sandbox (the REST ``Sandbox`` object)."""

    id: str
    state: SandboxStatus
    namespace: str = "default"
    reason: str | None = None
    exit_code: int | None = None
    image: str | None = None
    tags: dict[str, str] = dataclasses.field(default_factory=dict)
    created_at: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    deadline: str | None = None
    node: str | None = None
    urls: dict[str, str] = dataclasses.field(default_factory=dict)
    raw: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> SandboxInfo:
        state = data.get("state") or "pending"
        try:
            status = SandboxStatus(state)
        except ValueError:
            status = SandboxStatus.PENDING
        return cls(
            id=str(data["id"]),
            state=status,
            namespace=str(data.get("namespace") or "default"),
            reason=data.get("reason"),
            exit_code=data.get("exit_code"),
            image=data.get("image"),
            tags=dict(data.get("tags") or {}),
            created_at=data.get("created_at"),
            started_at=data.get("started_at"),
            finished_at=data.get("finished_at"),
            deadline=data.get("deadline"),
            node=data.get("node"),
            urls={str(k): str(v) for k, v in (data.get("urls") or {}).items()},
            raw=dict(data),
        )


@dataclasses.dataclass(frozen=True)
class FileInfo:
    """A path inside a sandbox (sandboxd's ``FileInfo``)."""

    path: str
    name: str
    kind: Literal["file", "dir", "symlink", "other"]
    size: int
    mode: int
    uid: int = 0
    gid: int = 0
    modified_ms: int = 0
    symlink_target: str | None = None

    @property
    def is_dir(self) -> bool:
        return self.kind == "dir"

    @property
    def is_file(self) -> bool:
        return self.kind == "file"

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> FileInfo:
        return cls(
            path=data["path"],
            name=data.get("name", ""),
            kind=data.get("kind", "other"),
            size=int(data.get("size", 0)),
            mode=int(data.get("mode", 0)),
            uid=int(data.get("uid", 0)),
            gid=int(data.get("gid", 0)),
            modified_ms=int(data.get("modified_ms", 0)),
            symlink_target=data.get("symlink_target"),
        )


@dataclasses.dataclass(frozen=True)
class OutputChunk:
    """Bytes from one stream of a process, in the order the process wrote them."""

    stream: Literal["stdout", "stderr"]
    data: bytes

    @property
    def text(self) -> str:
        return self.data.decode("utf-8", errors="replace")


@dataclasses.dataclass(frozen=True)
class ProcessResult:
    """How a command ended and what it wrote.

    ``returncode`` is the exit code, or ``-N`` when signal ``N`` killed it
    (as :mod:`subprocess` does). ``stdout``/``stderr`` are text (invalid UTF-8
    replaced); ``stdout_bytes``/``stderr_bytes`` are the raw bytes.
    """

    returncode: int
    stdout_bytes: bytes
    stderr_bytes: bytes
    command: tuple[str, ...] = ()
    signal: int | None = None
    timed_out: bool = False
    dropped_bytes: int = 0

    @property
    def stdout(self) -> str:
        return self.stdout_bytes.decode("utf-8", errors="replace")

    @property
    def stderr(self) -> str:
        return self.stderr_bytes.decode("utf-8", errors="replace")

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def __repr__(self) -> str:
        return (
            f"ProcessResult(returncode={self.returncode}, stdout={_preview(self.stdout_bytes)}, "
            f"stderr={_preview(self.stderr_bytes)})"
        )


def _preview(data: bytes, limit: int = 80) -> str:
    text = repr(data[:limit])
    return text + ("..." if len(data) > limit else "")
