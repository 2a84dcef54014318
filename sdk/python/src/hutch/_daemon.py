"""Client of sandboxd's HTTP API (docs/sandboxd-api.md).

The server forwards ``…/sandboxes/{id}/daemon/{path}`` verbatim to the
sandbox's sandboxd, so the same client talks to sandboxd directly (tests,
``prefix=""``) or through the server (``prefix=…/daemon``).
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import httpx

from ._http import CHUNK_SIZE, Transport, iter_sse, quote_segment
from .exceptions import HutchConnectionError, HutchError
from .types import FileInfo


class DaemonClient:
    """Process and file calls against one sandbox's sandboxd."""

    def __init__(self, transport: Transport, prefix: str, sandbox_id: str | None) -> None:
        self.transport = transport
        self.prefix = prefix.rstrip("/")
        self.sandbox_id = sandbox_id

    def _path(self, path: str) -> str:
        return f"{self.prefix}{path}"

    async def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        kwargs.setdefault("sandbox_id", self.sandbox_id)
        return await self.transport.json(method, self._path(path), **kwargs)

    # -- processes ----------------------------------------------------------

    async def start_process(
        self,
        command: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        working_dir: str | None = None,
        user: str | None = None,
        stdin: bool = False,
        timeout_ms: int | None = None,
        tag: str | None = None,
    ) -> dict[str, Any]:
        """``POST /processes``: starts ``command`` and returns its ``ProcessInfo``."""
        if not command:
            raise ValueError("command must not be empty")
        body: dict[str, Any] = {
            "command": command[0],
            "args": list(command[1:]),
            "env": dict(env or {}),
            "stdin": "pipe" if stdin else "closed",
        }
        if working_dir is not None:
            body["working_dir"] = working_dir
        if user is not None:
            body["user"] = user
        if timeout_ms is not None:
            body["timeout_ms"] = timeout_ms
        if tag is not None:
            body["tag"] = tag
        info: dict[str, Any] = await self._json("POST", "/processes", json_body=body)
        return info

    async def exec_once(self, command: Sequence[str], **body: Any) -> dict[str, Any]:
        """``POST /exec``: runs ``command`` to completion in one round trip."""
        payload = {"command": command[0], "args": list(command[1:]), **{k: v for k, v in body.items() if v is not None}}
        result: dict[str, Any] = await self._json("POST", "/exec", json_body=payload, timeout=None)
        return result

    async def process_info(self, pid: int | str) -> dict[str, Any]:
        info: dict[str, Any] = await self._json("GET", f"/processes/{quote_segment(str(pid))}")
        return info

    async def wait_process(self, pid: int | str, timeout_ms: int | None = None) -> dict[str, Any]:
        info: dict[str, Any] = await self._json(
            "GET",
            f"/processes/{quote_segment(str(pid))}/wait",
            params={"timeout_ms": timeout_ms},
            timeout=None,
        )
        return info

    async def kill(self, pid: int | str) -> None:
        await self._json("POST", f"/processes/{quote_segment(str(pid))}/kill")

    async def signal(self, pid: int | str, signal: str | int, group: bool = False) -> dict[str, Any]:
        info: dict[str, Any] = await self._json(
            "POST", f"/processes/{quote_segment(str(pid))}/signal", json_body={"signal": signal, "group": group}
        )
        return info

    async def write_stdin(self, pid: int | str, data: bytes, close: bool = False) -> dict[str, Any]:
        """Returns once the bytes are in the process's stdin pipe (that is the backpressure)."""
        reply: dict[str, Any] = await self._json(
            "POST",
            f"/processes/{quote_segment(str(pid))}/stdin",
            params={"close": True} if close else None,
            content=data,
            headers={"Content-Type": "application/octet-stream"},
            timeout=None,
        )
        return reply

    async def close_stdin(self, pid: int | str) -> dict[str, Any]:
        info: dict[str, Any] = await self._json("POST", f"/processes/{quote_segment(str(pid))}/stdin/close")
        return info

    async def output_events(self, pid: int | str, offset: int) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """Follows ``/output/stream`` from ``offset``: ``("output", chunk)``, ``("dropped", …)``, ``("exit", …)``.

        Output chunks carry ``bytes`` (decoded) besides the wire fields. The
        iterator ends after ``exit``, or early if the connection drops (the
        caller resumes from the next offset).
        """
        path = self._path(f"/processes/{quote_segment(str(pid))}/output/stream")
        async with self.transport.stream("GET", path, params={"offset": offset}, sandbox_id=self.sandbox_id) as resp:
            async for event, data in iter_sse(resp):
                try:
                    payload = json.loads(data)
                except ValueError:
                    continue
                if event == "output":
                    payload["bytes"] = base64.b64decode(payload.get("data", ""))
                yield event, payload
                if event == "exit":
                    return

    # -- files --------------------------------------------------------------

    async def read_file(self, path: str) -> AsyncIterator[bytes]:
        """Streams the file's bytes in chunks; nothing is held whole."""
        async with self.transport.stream(
            "GET", self._path("/files"), params={"path": path}, sandbox_id=self.sandbox_id, file_path=path
        ) as resp:
            try:
                async for chunk in resp.aiter_bytes(CHUNK_SIZE):
                    yield chunk
            except httpx.TransportError as e:
                raise HutchConnectionError(f"reading {path}: connection lost: {e}") from e

    async def write_file(self, path: str, body: AsyncIterator[bytes] | bytes, mode: int | None = None) -> FileInfo:
        """``PUT /files``: uploads ``body`` (streamed when it is an async iterator)."""
        params: dict[str, Any] = {"path": path}
        if mode is not None:
            params["mode"] = format(mode, "o")
        data = await self._json(
            "PUT",
            "/files",
            params=params,
            content=body,
            headers={"Content-Type": "application/octet-stream"},
            file_path=path,
            timeout=None,
        )
        return FileInfo.from_wire(data)

    async def list_files(self, path: str) -> list[FileInfo]:
        data = await self._json("GET", "/files/list", params={"path": path}, file_path=path)
        return [FileInfo.from_wire(entry) for entry in data.get("entries", [])]

    async def stat(self, path: str) -> FileInfo:
        return FileInfo.from_wire(await self._json("GET", "/files/stat", params={"path": path}, file_path=path))

    async def remove(self, path: str, recursive: bool = False) -> None:
        await self._json("DELETE", "/files", params={"path": path, "recursive": recursive}, file_path=path)

    async def mkdir(self, path: str, mode: int | None = None) -> FileInfo:
        params: dict[str, Any] = {"path": path}
        if mode is not None:
            params["mode"] = format(mode, "o")
        return FileInfo.from_wire(await self._json("POST", "/files/mkdir", params=params, file_path=path))

    async def health(self) -> bool:
        try:
            await self._json("GET", "/health")
        except HutchError:
            return False
        return True


def abspath_in_sandbox(path: str | os.PathLike[str]) -> str:
    """sandboxd takes absolute paths only; relative ones are taken from ``/``."""
    text = os.fspath(path)
    return text if text.startswith("/") else "/" + text
