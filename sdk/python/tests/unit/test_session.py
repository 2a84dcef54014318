"""Sessions against a mocked server; cleanup at exit and on signals against a tiny recording server."""

from __future__ import annotations

import http.server
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import respx

import hutch
from hutch.session import SESSION_TAG

BASE = "http://hutch.test/v1/namespaces/default/sandboxes"


def created(request: httpx.Request) -> httpx.Response:
    body = json.loads(request.content)
    created.count += 1  # type: ignore[attr-defined]
    sid = f"{created.count:032d}"  # type: ignore[attr-defined]
    return httpx.Response(201, json={"id": sid, "state": "pending", "tags": body.get("tags", {})})


@respx.mock
def test_session_sandboxes_share_defaults_start_lazily_and_stop_on_close(api: hutch.Config) -> None:
    created.count = 0  # type: ignore[attr-defined]
    create = respx.post(BASE).mock(side_effect=created)
    stop = respx.post(url__regex=rf"{BASE}/\d+/stop").mock(
        return_value=httpx.Response(202, json={"id": "x", "state": "running"})
    )
    defaults = hutch.SandboxDefaults(image="host", tags={"team": "a"})
    with hutch.Session(defaults) as session:
        first = session.sandbox(tags={"role": "first"})
        second = session.sandbox()
        unused = session.sandbox()
        assert create.call_count == 0
        first.start().result()
        second.start().result()
        assert session.sandbox_count == 3
        tags = json.loads(create.calls[0].request.content)["tags"]
        assert tags == {"team": "a", SESSION_TAG: session.id, "role": "first"}
        assert json.loads(create.calls[0].request.content)["image"] == "host"
    assert stop.call_count == 2  # The unused sandbox was never created, so nothing to stop.
    assert session.sandbox_count == 0
    assert unused.id is None
    with pytest.raises(hutch.HutchError):
        session.sandbox()


@respx.mock
def test_session_list_filters_by_the_session_tag_and_adopt(api: hutch.Config) -> None:
    route = respx.get(BASE).mock(return_value=httpx.Response(200, json={"sandboxes": [], "next_cursor": None}))
    sid = "3" * 32
    respx.get(f"{BASE}/{sid}").mock(return_value=httpx.Response(200, json={"id": sid, "state": "running"}))
    stop = respx.post(f"{BASE}/{sid}/stop").mock(return_value=httpx.Response(202, json={"id": sid, "state": "running"}))
    session = hutch.Session()
    assert session.list().result() == []
    assert route.calls.last.request.url.params["tag"] == f"{SESSION_TAG}={session.id}"
    adopted = session.from_id(sid).result()
    assert adopted.id == sid and session.sandbox_count == 1
    session.close().result()
    assert stop.call_count == 1


class _Recorder(http.server.BaseHTTPRequestHandler):
    """A stand-in server that creates sandboxes and records which ones were stopped."""

    stopped: list[str] = []
    created = 0
    lock = threading.Lock()

    def log_message(self, *args: object) -> None:
        pass

    def _reply(self, status: int, body: object) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming.
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        parts = self.path.strip("/").split("/")
        with self.lock:
            if parts[-1] == "sandboxes":
                type(self).created += 1
                sid = f"{type(self).created:032d}"
                self._reply(201, {"id": sid, "state": "pending"})
            elif parts[-1] == "stop":
                type(self).stopped.append(parts[-2])
                self._reply(202, {"id": parts[-2], "state": "running"})
            else:
                self._reply(404, {"error": {"code": "not_found", "message": "no"}})


@pytest.fixture
def recorder() -> Iterator[tuple[str, type[_Recorder]]]:
    handler = type("Recorder", (_Recorder,), {"stopped": [], "created": 0})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler
    finally:
        server.shutdown()
        server.server_close()


SCRIPT = textwrap.dedent(
    """
    import os, sys, time, hutch
    hutch.configure(url=sys.argv[1], api_key="k")
    session = hutch.Session()
    for _ in range(3):
        session.sandbox().start().result()
    hutch.Sandbox.run()
    hutch.Sandbox.run(stop_on_exit=False)
    print("ready", flush=True)
    if sys.argv[2] == "exit":
        sys.exit(0)
    time.sleep(60)
    """
)


@pytest.mark.parametrize("how", ["exit", "SIGTERM", "SIGINT"])
def test_open_sandboxes_are_stopped_when_the_process_ends(
    recorder: tuple[str, type[_Recorder]], how: str, tmp_path: Path
) -> None:
    url, handler = recorder
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    child = subprocess.Popen(
        [sys.executable, str(script), url, "exit" if how == "exit" else "wait"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        if how != "exit":
            child.send_signal(getattr(signal, how))
        code = child.wait(timeout=30)
    finally:
        child.kill()
    # Four of the five sandboxes belong to the process; one asked to outlive it.
    assert sorted(handler.stopped) == [f"{i:032d}" for i in range(1, 5)]
    if how == "SIGTERM":
        assert code == -signal.SIGTERM
    elif how == "SIGINT":
        assert code != 0


def test_a_second_signal_exits_at_once(tmp_path: Path) -> None:
    # A server that accepts connections but never answers: cleanup would hang
    # until its bound, so only the second signal can end the process quickly.
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    script = tmp_path / "script.py"
    script.write_text(
        textwrap.dedent(
            """
            import sys, time, hutch
            from hutch import _cleanup, sandbox
            hutch.configure(url=sys.argv[1], api_key="k")
            sb = hutch.Sandbox()
            sb._id = "1" * 32
            sb._start_future = __import__("concurrent.futures").futures.Future()
            sb._start_future.set_result(sb)
            _cleanup.register(sb)
            print("ready", flush=True)
            time.sleep(60)
            """
        )
    )
    child = subprocess.Popen([sys.executable, str(script), url], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        child.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        child.send_signal(signal.SIGTERM)
        start = time.monotonic()
        code = child.wait(timeout=5)
        assert time.monotonic() - start < 5
        assert code == 128 + signal.SIGTERM
    finally:
        child.kill()
        listener.close()
