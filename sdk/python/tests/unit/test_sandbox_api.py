"""The Sandbox lifecycle against the REST contract (docs/platform-api.md), with a mocked server."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
import respx

import hutch
from hutch import Sandbox, SandboxDefaults, SandboxStatus

BASE = "http://hutch.test/v1/namespaces/default/sandboxes"


def sandbox_json(sandbox_id: str = "a" * 32, state: str = "pending", **extra: object) -> dict[str, object]:
    body: dict[str, object] = {"id": sandbox_id, "namespace": "default", "state": state, "reason": None, "tags": {}}
    body.update(extra)
    return body


def error_json(code: str, message: str = "boom", **extra: object) -> dict[str, object]:
    return {"error": {"code": code, "message": message, **extra}}


@respx.mock
def test_run_posts_the_create_body_with_defaults_and_returns_without_waiting(api: hutch.Config) -> None:
    route = respx.post(BASE).mock(return_value=httpx.Response(201, json=sandbox_json()))
    defaults = SandboxDefaults(image="python:3.12-slim", tags={"team": "a"}, env={"A": "1"}, timeout_seconds=60)

    sandbox = Sandbox.run(
        "python3",
        "-m",
        "http.server",
        resources={"cpus": 2, "memory_mb": 256},
        tags={"job": "x"},
        env={"B": "2"},
        network="internet",
        defaults=defaults,
    )

    assert sandbox.id == "a" * 32
    assert sandbox.status == SandboxStatus.PENDING
    request = route.calls.last.request
    assert request.headers["Authorization"] == "Bearer test-key"
    assert len(request.headers["Idempotency-Key"]) == 32
    assert json.loads(request.content) == {
        "image": "python:3.12-slim",
        "command": ["python3", "-m", "http.server"],
        "env": {"A": "1", "B": "2"},
        "resources": {"cpus": 2, "memory_mb": 256},
        "network": {"egress": "internet"},
        "timeout_secs": 60,
        "tags": {"team": "a", "job": "x"},
    }


@respx.mock
def test_a_sandbox_is_created_lazily_on_first_use_and_only_once(api: hutch.Config) -> None:
    create = respx.post(BASE).mock(return_value=httpx.Response(201, json=sandbox_json()))
    respx.get(f"{BASE}/{'a' * 32}").mock(return_value=httpx.Response(200, json=sandbox_json(state="running")))
    sandbox = Sandbox(image="host")
    assert create.call_count == 0
    assert sandbox.id is None

    assert sandbox.wait(timeout=5) is sandbox
    sandbox.start().result()
    assert create.call_count == 1
    assert sandbox.status == SandboxStatus.RUNNING


@respx.mock
def test_wait_until_complete_follows_states_and_maps_terminal_ones(api: hutch.Config) -> None:
    sid = "b" * 32
    respx.post(BASE).mock(return_value=httpx.Response(201, json=sandbox_json(sid)))
    respx.get(f"{BASE}/{sid}").mock(
        side_effect=[
            httpx.Response(200, json=sandbox_json(sid, "creating")),
            httpx.Response(200, json=sandbox_json(sid, "running")),
            httpx.Response(200, json=sandbox_json(sid, "failed", reason="exited", exit_code=3)),
        ]
    )
    sandbox = Sandbox.run("false")
    with pytest.raises(hutch.SandboxFailedError) as caught:
        sandbox.wait_until_complete(timeout=10).result()
    assert caught.value.sandbox_id == sid
    assert caught.value.reason == "exited"
    assert "exit code 3" in str(caught.value)


@respx.mock
def test_termination_raises_only_when_asked(api: hutch.Config) -> None:
    sid = "c" * 32
    respx.post(BASE).mock(return_value=httpx.Response(201, json=sandbox_json(sid)))
    respx.get(f"{BASE}/{sid}").mock(
        return_value=httpx.Response(200, json=sandbox_json(sid, "terminated", reason="timeout"))
    )
    sandbox = Sandbox.run()
    info = sandbox.wait_until_complete(raise_on_termination=False).result()
    assert info.state == SandboxStatus.TERMINATED and info.reason == "timeout"
    with pytest.raises(hutch.SandboxTerminatedError):
        sandbox.wait_until_complete().result()
    with pytest.raises(hutch.SandboxTerminatedError):
        sandbox.wait()


@respx.mock
def test_wait_until_complete_times_out(api: hutch.Config) -> None:
    sid = "d" * 32
    respx.post(BASE).mock(return_value=httpx.Response(201, json=sandbox_json(sid)))
    respx.get(f"{BASE}/{sid}").mock(return_value=httpx.Response(200, json=sandbox_json(sid, "running")))
    sandbox = Sandbox.run()
    with pytest.raises(hutch.SandboxTimeoutError):
        sandbox.wait_until_complete(timeout=0.2).result()


@respx.mock
def test_context_manager_stops_the_sandbox_with_its_grace(api: hutch.Config) -> None:
    sid = "e" * 32
    respx.post(BASE).mock(return_value=httpx.Response(201, json=sandbox_json(sid)))
    stop = respx.post(f"{BASE}/{sid}/stop").mock(return_value=httpx.Response(202, json=sandbox_json(sid, "running")))
    with Sandbox(image="host") as sandbox:
        assert sandbox.id == sid
    assert json.loads(stop.calls.last.request.content) == {"grace_secs": 10}


def test_stopping_a_sandbox_never_started_sends_nothing(api: hutch.Config) -> None:
    with respx.mock(assert_all_called=False) as mock:
        route = mock.route()
        Sandbox(image="host").stop().result()
        assert route.call_count == 0


@respx.mock
def test_stop_missing_ok_and_static_delete(api: hutch.Config) -> None:
    sid = "f" * 32
    respx.post(BASE).mock(return_value=httpx.Response(201, json=sandbox_json(sid)))
    respx.post(f"{BASE}/{sid}/stop").mock(return_value=httpx.Response(404, json=error_json("sandbox_not_found")))
    respx.delete(f"{BASE}/{sid}").mock(return_value=httpx.Response(404, json=error_json("sandbox_not_found")))
    sandbox = Sandbox.run()
    sandbox.stop(missing_ok=True).result()
    with pytest.raises(hutch.SandboxNotFoundError) as caught:
        sandbox.stop().result()
    assert caught.value.sandbox_id == sid
    Sandbox.delete(sid, missing_ok=True).result()
    with pytest.raises(hutch.SandboxNotFoundError):
        Sandbox.delete(sid).result()


@respx.mock
def test_list_follows_cursors_and_filters_by_tag_and_state(api: hutch.Config) -> None:
    route = respx.get(BASE).mock(
        side_effect=[
            httpx.Response(200, json={"sandboxes": [sandbox_json("1" * 32, "running")], "next_cursor": "page2"}),
            httpx.Response(200, json={"sandboxes": [sandbox_json("2" * 32, "running")], "next_cursor": None}),
        ]
    )
    found = Sandbox.list(tags={"job": "x"}, status="running").result()
    assert [s.id for s in found] == ["1" * 32, "2" * 32]
    first, second = (call.request.url for call in route.calls)
    assert first.params.get_list("tag") == ["job=x"]
    assert first.params["state"] == "running"
    assert first.params["include_stopped"] == "false"
    assert second.params["cursor"] == "page2"


@respx.mock
def test_from_id_and_get_status(api: hutch.Config) -> None:
    sid = "9" * 32
    respx.get(f"{BASE}/{sid}").mock(return_value=httpx.Response(200, json=sandbox_json(sid, "running")))
    sandbox = Sandbox.from_id(sid).result()
    assert sandbox.status == SandboxStatus.RUNNING
    assert sandbox.get_status() == SandboxStatus.RUNNING
    respx.get(f"{BASE}/{'0' * 32}").mock(return_value=httpx.Response(404, json=error_json("sandbox_not_found")))
    with pytest.raises(hutch.SandboxNotFoundError):
        Sandbox.from_id("0" * 32).result()


def test_get_status_of_an_unstarted_sandbox_raises(api: hutch.Config) -> None:
    with pytest.raises(hutch.SandboxNotRunningError):
        Sandbox(image="host").get_status()


@respx.mock
def test_exec_goes_through_the_daemon_route_and_streams_output(api: hutch.Config) -> None:
    sid = "7" * 32
    daemon = f"{BASE}/{sid}/daemon"
    respx.post(BASE).mock(return_value=httpx.Response(201, json=sandbox_json(sid)))
    start = respx.post(f"{daemon}/processes").mock(return_value=httpx.Response(201, json={"pid": 42}))
    sse = (
        'event: output\ndata: {"stream":"stdout","offset":0,"data":"aGkK"}\n\n'
        ": keep-alive\n\n"
        'event: output\ndata: {"stream":"stderr","offset":3,"data":"b29wcwo="}\n\n'
        'event: exit\ndata: {"exit_code":2,"signal":null,"timed_out":false}\n\n'
    )
    stream = respx.get(f"{daemon}/processes/42/output/stream").mock(
        return_value=httpx.Response(200, text=sse, headers={"Content-Type": "text/event-stream"})
    )
    sandbox = Sandbox.run()
    process = sandbox.exec(["sh", "-c", "echo hi; echo oops >&2; exit 2"], cwd="/w", env={"K": "V"}, timeout_seconds=5)
    result = process.result(timeout=10)
    assert (result.returncode, result.stdout, result.stderr) == (2, "hi\n", "oops\n")
    assert [(c.stream, c.data) for c in process.iter_output()] == [("stdout", b"hi\n"), ("stderr", b"oops\n")]
    assert json.loads(start.calls.last.request.content) == {
        "command": "sh",
        "args": ["-c", "echo hi; echo oops >&2; exit 2"],
        "env": {"K": "V"},
        "stdin": "closed",
        "working_dir": "/w",
        "timeout_ms": 5000,
    }
    assert stream.calls.last.request.url.params["offset"] == "0"

    with pytest.raises(hutch.SandboxExecutionError) as caught:
        sandbox.exec("exit 2", check=True).result()
    assert caught.value.result.returncode == 2
    assert caught.value.result.stderr == "oops\n"


@respx.mock
def test_a_dropped_output_stream_is_resumed_at_the_next_offset(api: hutch.Config) -> None:
    sid = "6" * 32
    daemon = f"{BASE}/{sid}/daemon"
    respx.post(BASE).mock(return_value=httpx.Response(201, json=sandbox_json(sid)))
    respx.post(f"{daemon}/processes").mock(return_value=httpx.Response(201, json={"pid": 5}))
    stream = respx.get(f"{daemon}/processes/5/output/stream").mock(
        side_effect=[
            httpx.Response(200, text='event: output\ndata: {"stream":"stdout","offset":0,"data":"YWJj"}\n\n'),
            httpx.Response(
                200,
                text='event: output\ndata: {"stream":"stdout","offset":1,"data":"YmNk"}\n\n'
                'event: exit\ndata: {"exit_code":0,"signal":null,"timed_out":false}\n\n',
            ),
        ]
    )
    result = Sandbox.run().exec(["x"]).result(timeout=10)
    assert result.stdout == "abcd"
    assert stream.calls[1].request.url.params["offset"] == "3"


@respx.mock
def test_daemon_calls_on_a_stopped_sandbox_raise_by_state(api: hutch.Config) -> None:
    sid = "5" * 32
    daemon = f"{BASE}/{sid}/daemon"
    respx.post(BASE).mock(return_value=httpx.Response(201, json=sandbox_json(sid)))
    respx.post(f"{daemon}/processes").mock(
        return_value=httpx.Response(409, json=error_json("sandbox_not_running", state="terminated", reason="stopped"))
    )
    respx.get(f"{daemon}/files").mock(
        return_value=httpx.Response(409, json=error_json("sandbox_not_running", state="failed", reason="oom"))
    )
    sandbox = Sandbox.run()
    with pytest.raises(hutch.SandboxTerminatedError) as caught:
        sandbox.exec(["true"]).result()
    assert (caught.value.state, caught.value.reason, caught.value.sandbox_id) == ("terminated", "stopped", sid)
    with pytest.raises(hutch.SandboxFailedError):
        sandbox.read_file("/x").result()


@respx.mock
def test_file_errors_name_the_path(api: hutch.Config) -> None:
    sid = "4" * 32
    daemon = f"{BASE}/{sid}/daemon"
    respx.post(BASE).mock(return_value=httpx.Response(201, json=sandbox_json(sid)))
    respx.get(f"{daemon}/files").mock(return_value=httpx.Response(404, json=error_json("file_not_found")))
    respx.get(f"{daemon}/files/list").mock(return_value=httpx.Response(409, json=error_json("not_a_directory")))
    sandbox = Sandbox.run(working_dir="/work")
    with pytest.raises(hutch.SandboxFileError) as caught:
        sandbox.read_file("missing.txt").result()
    assert caught.value.path == "/work/missing.txt"
    assert caught.value.code == "file_not_found"
    with pytest.raises(hutch.SandboxFileError):
        sandbox.list_files("/etc/passwd").result()


def test_unreachable_server_raises_connection_error() -> None:
    hutch.configure(url="http://127.0.0.1:9", api_key="k")
    with pytest.raises(hutch.HutchConnectionError):
        Sandbox.run()


@respx.mock
def test_bad_key_raises_authentication_error(api: hutch.Config) -> None:
    respx.post(BASE).mock(return_value=httpx.Response(401, json=error_json("unauthenticated")))
    with pytest.raises(hutch.AuthenticationError) as caught:
        Sandbox.run()
    assert caught.value.status == 401


@respx.mock
def test_async_usage_inside_a_running_loop(api: hutch.Config) -> None:
    respx.post(BASE).mock(side_effect=[httpx.Response(201, json=sandbox_json(str(i) * 32)) for i in range(10)])
    respx.get(url__regex=rf"{BASE}/\d+").mock(
        side_effect=lambda request: httpx.Response(
            200, json=sandbox_json(request.url.path.rsplit("/", 1)[1], "running")
        )
    )
    respx.post(url__regex=rf"{BASE}/\d+/stop").mock(return_value=httpx.Response(202, json=sandbox_json()))

    async def main() -> list[str]:
        async def one() -> str:
            async with Sandbox(image="host") as sandbox:
                await sandbox
                assert sandbox.status == SandboxStatus.RUNNING
                return sandbox.id or ""

        return await asyncio.gather(*(one() for _ in range(10)))

    ids = asyncio.run(main())
    assert sorted(ids) == sorted(str(i) * 32 for i in range(10))


@respx.mock
def test_stopping_a_sandbox_whose_creation_failed_is_a_no_op(api: hutch.Config) -> None:
    respx.post(BASE).mock(return_value=httpx.Response(400, json=error_json("invalid_field", "cpus")))
    sandbox = Sandbox(resources={"cpus": -1})
    with pytest.raises(hutch.HutchError):
        sandbox.start().result()
    sandbox.stop().result()


@respx.mock
def test_the_sync_api_works_inside_a_running_event_loop_as_in_jupyter(api: hutch.Config) -> None:
    sid = "3" * 32
    daemon = f"{BASE}/{sid}/daemon"
    respx.post(BASE).mock(return_value=httpx.Response(201, json=sandbox_json(sid)))
    respx.post(f"{daemon}/processes").mock(return_value=httpx.Response(201, json={"pid": 1}))
    respx.get(f"{daemon}/processes/1/output/stream").mock(
        return_value=httpx.Response(
            200,
            text='event: output\ndata: {"stream":"stdout","offset":0,"data":"b2sK"}\n\n'
            'event: exit\ndata: {"exit_code":0,"signal":null,"timed_out":false}\n\n',
        )
    )

    async def cell() -> str:
        # A notebook cell runs synchronously inside the kernel's running loop.
        sandbox = Sandbox.run()
        return sandbox.exec(["echo", "ok"]).result(timeout=10).stdout

    assert asyncio.run(cell()) == "ok\n"
