"""HTTP plumbing shared by the REST client and the daemon client.

Everything here runs on the SDK's background loop (see ``_loop``); an
``httpx.AsyncClient`` is bound to the loop it was created on, so clients are
cached per loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any
from urllib.parse import quote

import httpx

from .config import Config
from .exceptions import HutchConnectionError, HutchError, error_from_response

USER_AGENT = "hutch-python/0.1.0"
# Bytes per chunk when streaming files in either direction: large enough to
# keep syscalls cheap, small enough that memory stays flat.
CHUNK_SIZE = 1 << 20


class Transport:
    """One connection pool to a base URL, with error mapping."""

    def __init__(self, base_url: str, api_key: str | None, request_timeout: float) -> None:
        headers = {"User-Agent": USER_AGENT}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self.base_url = base_url.rstrip("/")
        self.request_timeout = request_timeout
        self.client = httpx.AsyncClient(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx.Timeout(request_timeout, connect=15.0),
            limits=httpx.Limits(max_connections=1000, max_keepalive_connections=64),
        )

    async def request(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        params: Mapping[str, Any] | Sequence[tuple[str, Any]] | None = None,
        content: Any = None,
        headers: Mapping[str, str] | None = None,
        sandbox_id: str | None = None,
        file_path: str | None = None,
        allow_status: tuple[int, ...] = (),
        timeout: float | None | object = ...,
    ) -> httpx.Response:
        """Sends a request and reads the whole answer; error answers raise mapped exceptions."""
        kwargs: dict[str, Any] = {}
        if timeout is not ...:
            kwargs["timeout"] = timeout
        try:
            response = await self.client.request(
                method,
                path,
                json=json_body,
                params=_clean_params(params),
                content=content,
                headers=headers,
                **kwargs,
            )
        except httpx.TimeoutException as e:
            raise HutchConnectionError(f"{method} {path}: timed out ({e.__class__.__name__})") from e
        except httpx.TransportError as e:
            raise HutchConnectionError(f"{method} {path}: cannot reach {self.base_url}: {e}") from e
        if response.status_code >= 400 and response.status_code not in allow_status:
            raise _error(response, sandbox_id=sandbox_id, file_path=file_path)
        return response

    async def json(self, method: str, path: str, **kwargs: Any) -> Any:
        response = await self.request(method, path, **kwargs)
        if response.status_code == 204 or not response.content:
            return None
        try:
            return response.json()
        except ValueError as e:
            raise HutchError(f"{method} {path}: answer is not JSON", status=response.status_code) from e

    @contextlib.asynccontextmanager
    async def stream(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | Sequence[tuple[str, Any]] | None = None,
        content: Any = None,
        headers: Mapping[str, str] | None = None,
        sandbox_id: str | None = None,
        file_path: str | None = None,
    ) -> AsyncIterator[httpx.Response]:
        """Opens a streaming answer (no read timeout); error answers raise before yielding."""
        request = self.client.build_request(
            method,
            path,
            params=_clean_params(params),
            content=content,
            headers=headers,
            timeout=httpx.Timeout(None, connect=15.0),
        )
        try:
            response = await self.client.send(request, stream=True)
        except httpx.TransportError as e:
            raise HutchConnectionError(f"{method} {path}: cannot reach {self.base_url}: {e}") from e
        try:
            if response.status_code >= 400:
                await response.aread()
                raise _error(response, sandbox_id=sandbox_id, file_path=file_path)
            yield response
        finally:
            await response.aclose()

    async def aclose(self) -> None:
        await self.client.aclose()


def _clean_params(params: Mapping[str, Any] | Sequence[tuple[str, Any]] | None) -> list[tuple[str, Any]] | None:
    """Drops ``None`` values and spells booleans as sandboxd and the server parse them."""
    if params is None:
        return None
    pairs = list(params.items()) if isinstance(params, Mapping) else list(params)
    cleaned: list[tuple[str, Any]] = []
    for key, value in pairs:
        if value is None:
            continue
        cleaned.append((key, ("true" if value else "false") if isinstance(value, bool) else value))
    return cleaned


def _error(response: httpx.Response, *, sandbox_id: str | None, file_path: str | None) -> HutchError:
    try:
        body = json.loads(response.content) if response.content else None
    except ValueError:
        body = None
    return error_from_response(response.status_code, body, sandbox_id=sandbox_id, path=file_path)


_transports: dict[tuple[int, str, str | None, float], Transport] = {}


def transport_for(config: Config) -> Transport:
    """The cached transport for ``config`` on the running (background) loop."""
    loop_id = id(asyncio.get_running_loop())
    key = (loop_id, config.url, config.api_key, config.request_timeout)
    transport = _transports.get(key)
    if transport is None:
        transport = Transport(config.url, config.api_key, config.request_timeout)
        _transports[key] = transport
    return transport


def quote_segment(value: str) -> str:
    return quote(value, safe="")


async def iter_sse(response: httpx.Response) -> AsyncIterator[tuple[str, str]]:
    """Yields ``(event, data)`` pairs from a server-sent events answer."""
    event = "message"
    data: list[str] = []
    async for line in response.aiter_lines():
        if line == "":
            if data:
                yield event, "\n".join(data)
            event, data = "message", []
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if field == "event":
            event = value
        elif field == "data":
            data.append(value)
    if data:
        yield event, "\n".join(data)
