"""Frozen defaults applied to every sandbox a :class:`~hutch.Session` creates."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

from .types import NetworkOptions, Resources

__all__ = ["SandboxDefaults"]


@dataclasses.dataclass(frozen=True)
class SandboxDefaults:
    """Settings shared by many sandboxes. Explicit arguments win; ``tags`` and ``env`` merge.

    Attributes:
        image: ``"host"`` or an OCI reference; ``None`` lets the server choose.
        resources: CPU, memory, disk and pid limits.
        env: Environment of every process.
        tags: Labels to find sandboxes by (``Sandbox.list(tags=...)``).
        timeout_seconds: Absolute lifetime (server default 3600, max 86400).
        idle_timeout_seconds: Stop after this long without API or proxy traffic.
        network: ``NetworkOptions(egress="none" | "internet")``.
        ports: Sandbox ports reachable through the proxy.
        working_dir: Working directory of processes.
        user: User processes run as (``name``, ``uid`` or ``uid:gid``).
    """

    image: str | None = None
    resources: Resources | None = None
    env: Mapping[str, str] = dataclasses.field(default_factory=dict)
    tags: Mapping[str, str] = dataclasses.field(default_factory=dict)
    timeout_seconds: float | None = None
    idle_timeout_seconds: float | None = None
    network: NetworkOptions | None = None
    ports: tuple[int, ...] = ()
    working_dir: str | None = None
    user: str | None = None

    def __post_init__(self) -> None:
        # Plain dicts are accepted; store immutable forms so a frozen defaults
        # object cannot be changed through a shared dict.
        object.__setattr__(self, "resources", Resources.coerce(self.resources))
        object.__setattr__(self, "network", NetworkOptions.coerce(self.network))
        object.__setattr__(self, "env", MappingProxyType({str(k): str(v) for k, v in dict(self.env).items()}))
        object.__setattr__(self, "tags", MappingProxyType({str(k): str(v) for k, v in dict(self.tags).items()}))
        object.__setattr__(self, "ports", tuple(int(p) for p in self.ports))

    def with_overrides(self, **overrides: Any) -> SandboxDefaults:
        """A copy with ``overrides`` applied; ``tags`` and ``env`` are merged, not replaced.

        ``None`` values are ignored, so callers may pass their optional
        arguments straight through.
        """
        fields = {f.name for f in dataclasses.fields(self)}
        unknown = set(overrides) - fields
        if unknown:
            raise TypeError(f"unknown sandbox settings: {', '.join(sorted(unknown))}")
        changes: dict[str, Any] = {}
        for key, value in overrides.items():
            if value is None:
                continue
            if key in ("tags", "env"):
                merged = dict(getattr(self, key))
                merged.update(value)
                changes[key] = merged
            elif key == "ports":
                changes[key] = tuple(value)
            else:
                changes[key] = value
        return dataclasses.replace(self, **changes)

    def to_create_body(self, command: Sequence[str] = ()) -> dict[str, Any]:
        """The ``CreateSandbox`` JSON body for these settings."""
        body: dict[str, Any] = {}
        if self.image is not None:
            body["image"] = self.image
        if command:
            body["command"] = list(command)
        if self.env:
            body["env"] = dict(self.env)
        if self.working_dir is not None:
            body["working_dir"] = self.working_dir
        if self.user is not None:
            body["user"] = self.user
        if self.resources is not None and self.resources.to_wire():
            body["resources"] = self.resources.to_wire()
        if self.network is not None:
            body["network"] = self.network.to_wire()
        if self.ports:
            body["ports"] = list(self.ports)
        if self.timeout_seconds is not None:
            body["timeout_secs"] = max(1, int(self.timeout_seconds))
        if self.idle_timeout_seconds is not None:
            body["idle_timeout_secs"] = max(1, int(self.idle_timeout_seconds))
        if self.tags:
            body["tags"] = dict(self.tags)
        return body
