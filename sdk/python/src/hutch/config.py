"""Where the SDK finds the Hutch server and the API key.

Resolution order for each setting: an explicit argument, then the
environment (``HUTCH_URL``, ``HUTCH_API_KEY``, ``HUTCH_NAMESPACE``), then the
local ``hutch up`` data dir (``HUTCH_DATA_DIR``, else ``/var/lib/hutch`` as
root or ``~/.local/share/hutch``), whose ``admin.key`` holds the admin key.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from pathlib import Path

from .exceptions import AuthenticationError

__all__ = ["Config", "configure", "get_config"]

DEFAULT_URL = "http://127.0.0.1:8900"
DEFAULT_NAMESPACE = "default"


@dataclasses.dataclass(frozen=True)
class Config:
    """Connection settings. Build one with :meth:`Config.resolve` to apply the fallbacks.

    Attributes:
        url: Base URL of the REST API, e.g. ``http://127.0.0.1:8900``.
        api_key: Bearer key; ``None`` sends no ``Authorization`` header.
        namespace: Namespace every sandbox call is made in.
        request_timeout: Seconds to wait for an answer to a plain request.
            Streams (process output, file transfers) have no read timeout.
    """

    url: str = DEFAULT_URL
    api_key: str | None = None
    namespace: str = DEFAULT_NAMESPACE
    request_timeout: float = 90.0

    @classmethod
    def resolve(
        cls,
        url: str | None = None,
        api_key: str | None = None,
        namespace: str | None = None,
        *,
        request_timeout: float | None = None,
    ) -> Config:
        """Fills every setting not given from the environment, then the local data dir."""
        env = os.environ
        resolved_url = url or env.get("HUTCH_URL") or None
        resolved_key = api_key or env.get("HUTCH_API_KEY") or None
        data_dir = _local_data_dir()
        if resolved_key is None and data_dir is not None:
            resolved_key = _read_first_line(data_dir / "admin.key")
        if resolved_url is None and data_dir is not None:
            resolved_url = _read_first_line(data_dir / "api.url")
        return cls(
            url=(resolved_url or DEFAULT_URL).rstrip("/"),
            api_key=resolved_key,
            namespace=namespace or env.get("HUTCH_NAMESPACE") or DEFAULT_NAMESPACE,
            request_timeout=request_timeout if request_timeout is not None else 90.0,
        )

    def require_key(self) -> str:
        """The API key, or :class:`AuthenticationError` naming where it was looked for."""
        if self.api_key is None:
            raise AuthenticationError(
                "no API key: set HUTCH_API_KEY, pass api_key=, or run `hutch up` "
                "on this machine (its admin.key is read from the data dir)"
            )
        return self.api_key


def _local_data_dir() -> Path | None:
    explicit = os.environ.get("HUTCH_DATA_DIR")
    candidates: list[Path] = []
    if explicit:
        candidates.append(Path(explicit))
    else:
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            candidates.append(Path("/var/lib/hutch"))
        xdg = os.environ.get("XDG_DATA_HOME")
        base = Path(xdg) if xdg else Path.home() / ".local" / "share"
        candidates.append(base / "hutch")
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    return None


def _read_first_line(path: Path) -> str | None:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return None
    line = text.strip().splitlines()[0].strip() if text.strip() else ""
    return line or None


_lock = threading.Lock()
_default: Config | None = None


def configure(
    url: str | None = None,
    api_key: str | None = None,
    namespace: str | None = None,
    *,
    request_timeout: float | None = None,
) -> Config:
    """Sets the process-wide default configuration and returns it.

    Settings not given are resolved as described in the module docstring.
    """
    global _default
    config = Config.resolve(url, api_key, namespace, request_timeout=request_timeout)
    with _lock:
        _default = config
    return config


def get_config() -> Config:
    """The process-wide default configuration, resolved on first use."""
    global _default
    with _lock:
        if _default is None:
            _default = Config.resolve()
        return _default
