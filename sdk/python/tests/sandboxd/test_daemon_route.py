"""Sessions and remote functions through the server's daemon route, with a real sandboxd behind it.

The REST side is mocked (respx): creating a sandbox answers at once, and
``…/sandboxes/{id}/daemon/{path}`` is forwarded, streaming, to the test's
sandboxd exactly as the server forwards it. The integration tests do the
same against a real `hutch up`.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import respx

import hutch

SERVER = "http://hutch.test"
SANDBOXES = f"{SERVER}/v1/namespaces/default/sandboxes"


class _Forwarded(httpx.AsyncByteStream):
    def __init__(self, response: httpx.Response) -> None:
        self._response = response

    async def __aiter__(self) -> Any:
        async for chunk in self._response.aiter_raw():
            yield chunk

    async def aclose(self) -> None:
        await self._response.aclose()


class FakeServer:
    """Records sandboxes created and stopped; forwards daemon calls to sandboxd."""

    def __init__(self, sandboxd_url: str) -> None:
        self.sandboxd_url = sandboxd_url
        self.created: list[dict[str, Any]] = []
        self.stopped: list[str] = []
        self._ids = itertools.count(1)
        self._client: httpx.AsyncClient | None = None

    def create(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        sandbox_id = f"{next(self._ids):032x}"
        self.created.append({"id": sandbox_id, **body})
        return httpx.Response(201, json={"id": sandbox_id, "state": "pending", "tags": body.get("tags", {})})

    def stop(self, request: httpx.Request, sandbox_id: str) -> httpx.Response:
        self.stopped.append(sandbox_id)
        return httpx.Response(202, json={"id": sandbox_id, "state": "running"})

    async def daemon(self, request: httpx.Request, sandbox_id: str, path: str) -> httpx.Response:
        if self._client is None:
            self._client = httpx.AsyncClient(base_url=self.sandboxd_url, timeout=None)
        forwarded = self._client.build_request(
            request.method,
            f"/{path}",
            params=request.url.params,
            headers={k: v for k, v in request.headers.items() if k.lower() not in ("host", "authorization")},
            content=_body(request) if request.method in ("POST", "PUT") else None,
        )
        response = await self._client.send(forwarded, stream=True)
        return httpx.Response(response.status_code, headers=response.headers, stream=_Forwarded(response))


async def _body(request: httpx.Request) -> Any:
    """The request body as it arrives, so uploads stay streamed through the fake server."""
    stream = request.stream
    if isinstance(stream, httpx.AsyncByteStream):
        async for chunk in stream:
            yield chunk
    else:
        yield request.read()


@pytest.fixture
def server(sandboxd_url: str) -> Iterator[FakeServer]:
    fake = FakeServer(sandboxd_url)
    hutch.configure(url=SERVER, api_key="k")
    with respx.mock(assert_all_called=False) as mock:
        mock.route(host="127.0.0.1").pass_through()
        mock.post(SANDBOXES).mock(side_effect=fake.create)
        mock.post(url__regex=rf"{SANDBOXES}/(?P<sandbox_id>\w+)/stop").mock(side_effect=fake.stop)
        mock.route(url__regex=rf"{re.escape(SANDBOXES)}/(?P<sandbox_id>\w+)/daemon/(?P<path>[^?]*)").mock(
            side_effect=fake.daemon
        )
        yield fake


SUFFIX = "!"


def shout(word: str) -> str:
    return word.upper() + SUFFIX


def test_exec_and_files_through_the_route(server: FakeServer) -> None:
    with hutch.Sandbox.run(image="host") as sandbox:
        assert sandbox.exec(["echo", "routed"]).result(timeout=30).stdout == "routed\n"
        process = sandbox.exec(["cat"], stdin=True)
        process.stdin.writeline("through").result(timeout=30)
        process.stdin.close().result(timeout=30)
        assert process.result(timeout=30).stdout == "through\n"
    assert server.stopped == [server.created[0]["id"]]


def test_remote_function_and_map_over_20_inputs(server: FakeServer) -> None:
    factor = 3
    with hutch.Session(hutch.SandboxDefaults(image="host", tags={"suite": "py"})) as session:

        @session.function()
        def work(x: int) -> dict[str, Any]:
            return {"x": x, "y": x * factor, "word": shout("w")}

        results = hutch.result(work.map(range(20)), timeout=120)
        assert results == [{"x": x, "y": 3 * x, "word": "W!"} for x in range(20)]

        @session.function(serialization="pickle")
        def as_set(values: list[int]) -> set[int]:
            return set(values)

        assert as_set.remote([1, 1, 2]).result(timeout=60) == {1, 2}

        @session.function()
        def broken() -> None:
            raise KeyError("missing")

        with pytest.raises(hutch.FunctionError) as caught:
            broken.remote().result(timeout=60)
        assert caught.value.remote_type == "KeyError"
        assert "raise KeyError" in (caught.value.remote_traceback or "")
        assert session.sandbox_count == 0

    assert len(server.created) == 22
    assert sorted(server.stopped) == sorted(s["id"] for s in server.created)
    first = server.created[0]
    assert first["image"] == "host"
    assert first["tags"]["suite"] == "py" and first["tags"]["hutch-function"] == "work"


def test_async_gather_of_20_sandboxes(server: FakeServer) -> None:
    async def one(i: int) -> str:
        async with hutch.Sandbox(image="host") as sandbox:
            return (await sandbox.exec(["echo", str(i)])).stdout.strip()

    async def main() -> list[str]:
        return await asyncio.gather(*(one(i) for i in range(20)))

    assert asyncio.run(main()) == [str(i) for i in range(20)]
    assert len(server.stopped) == 20
