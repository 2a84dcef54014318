"""OperationRef, configuration, defaults, typed options and error mapping."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from pathlib import Path

import pytest

import hutch
from hutch import _loop
from hutch.exceptions import error_from_response


async def _sleep_then(value: int, delay: float) -> int:
    await asyncio.sleep(delay)
    return value


async def _fail() -> None:
    raise hutch.SandboxError("nope", sandbox_id="x")


def test_operation_ref_gives_the_value_sync_and_async() -> None:
    ref = _loop.OperationRef.from_coroutine(_sleep_then(7, 0.01))
    assert ref.result(timeout=5) == 7
    assert ref.done()

    async def main() -> int:
        return await _loop.OperationRef.from_coroutine(_sleep_then(8, 0.01))

    assert asyncio.run(main()) == 8


def test_operation_ref_raises_the_same_error_both_ways() -> None:
    with pytest.raises(hutch.SandboxError):
        _loop.OperationRef.from_coroutine(_fail()).result()

    async def main() -> None:
        await _loop.OperationRef.from_coroutine(_fail())

    with pytest.raises(hutch.SandboxError):
        asyncio.run(main())


def test_result_timeout_leaves_the_operation_running() -> None:
    ref = _loop.OperationRef.from_coroutine(_sleep_then(1, 0.3))
    with pytest.raises(TimeoutError):
        ref.result(timeout=0.01)
    assert ref.result(timeout=5) == 1


def test_the_background_loop_is_one_thread_shared_by_every_caller() -> None:
    loops = []

    def use() -> None:
        loops.append(_loop.loop())

    threads = [threading.Thread(target=use) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len({id(loop) for loop in loops}) == 1


def test_module_level_wait_and_result() -> None:
    refs = [_loop.OperationRef.from_coroutine(_sleep_then(i, 0.05 * i)) for i in range(4)]
    done, pending = hutch.wait(refs, num_returns=2, timeout=5)
    assert len(done) == 2 and len(pending) == 2
    assert set(done).isdisjoint(pending)
    assert hutch.result(refs, timeout=5) == [0, 1, 2, 3]
    done, pending = hutch.wait(refs)
    assert (len(done), pending) == (4, [])


def test_wait_returns_what_is_done_at_the_timeout() -> None:
    slow = _loop.OperationRef.from_coroutine(_sleep_then(1, 5))
    fast = _loop.OperationRef.from_coroutine(_sleep_then(2, 0))
    start = time.monotonic()
    done, pending = hutch.wait([slow, fast], timeout=0.2)
    assert time.monotonic() - start < 2
    assert done == [fast] and pending == [slow]
    slow.cancel()


def test_configuration_comes_from_arguments_then_env_then_data_dir(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    data = tmp_path / "hutch"
    data.mkdir()
    (data / "admin.key").write_text("key-from-file\n")
    monkeypatch.setenv("HUTCH_DATA_DIR", str(data))
    config = hutch.Config.resolve()
    assert (config.url, config.api_key, config.namespace) == ("http://127.0.0.1:8900", "key-from-file", "default")

    monkeypatch.setenv("HUTCH_URL", "http://server:1/")
    monkeypatch.setenv("HUTCH_API_KEY", "key-from-env")
    monkeypatch.setenv("HUTCH_NAMESPACE", "team")
    config = hutch.Config.resolve()
    assert (config.url, config.api_key, config.namespace) == ("http://server:1", "key-from-env", "team")

    config = hutch.configure(url="http://explicit:2", api_key="explicit", namespace="ns")
    assert hutch.get_config() is config
    assert (config.url, config.api_key, config.namespace) == ("http://explicit:2", "explicit", "ns")


def test_defaults_are_frozen_and_merge_tags_and_env() -> None:
    base = hutch.SandboxDefaults(image="img", tags={"a": "1"}, env={"X": "1"}, resources={"cpus": 1})
    derived = base.with_overrides(tags={"b": "2"}, env={"X": "2"}, image=None, timeout_seconds=30)
    assert dict(derived.tags) == {"a": "1", "b": "2"}
    assert dict(derived.env) == {"X": "2"}
    assert derived.image == "img" and derived.timeout_seconds == 30
    assert dict(base.tags) == {"a": "1"}
    assert base.resources == hutch.Resources(cpus=1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        base.image = "other"  # type: ignore[misc]
    with pytest.raises(TypeError):
        base.tags["c"] = "3"  # type: ignore[index]
    with pytest.raises(TypeError):
        base.with_overrides(colour="blue")


def test_typed_options_accept_plain_dicts() -> None:
    assert hutch.Resources.coerce({"memory_mb": 128}) == hutch.Resources(memory_mb=128)
    assert hutch.NetworkOptions.coerce({"egress": "internet"}) == hutch.NetworkOptions("internet")
    assert hutch.NetworkOptions.coerce("none") == hutch.NetworkOptions("none")
    assert hutch.Resources(cpus=0.5, pids=10).to_wire() == {"cpus": 0.5, "pids": 10}
    with pytest.raises(TypeError):
        hutch.Resources.coerce(3)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("status", "code", "extra", "kwargs", "expected"),
    [
        (401, "unauthenticated", {}, {}, hutch.AuthenticationError),
        (403, "forbidden", {}, {}, hutch.AuthenticationError),
        (404, "sandbox_not_found", {}, {"sandbox_id": "s"}, hutch.SandboxNotFoundError),
        (409, "sandbox_not_running", {"state": "creating"}, {"sandbox_id": "s"}, hutch.SandboxNotRunningError),
        (409, "sandbox_not_running", {"state": "failed"}, {"sandbox_id": "s"}, hutch.SandboxFailedError),
        (409, "sandbox_not_running", {"state": "terminated"}, {"sandbox_id": "s"}, hutch.SandboxTerminatedError),
        (404, "file_not_found", {}, {"sandbox_id": "s", "path": "/p"}, hutch.SandboxFileError),
        (409, "is_a_directory", {}, {"sandbox_id": "s", "path": "/p"}, hutch.SandboxFileError),
        (502, "sandbox_unreachable", {}, {"sandbox_id": "s"}, hutch.SandboxError),
        (503, "shutting_down", {}, {}, hutch.HutchError),
    ],
)
def test_server_error_codes_map_onto_exceptions(
    status: int, code: str, extra: dict[str, str], kwargs: dict[str, str], expected: type[Exception]
) -> None:
    error = error_from_response(status, {"error": {"code": code, "message": "m", **extra}}, **kwargs)
    assert type(error) is expected
    assert isinstance(error, hutch.HutchError)
    assert (error.code, error.status) == (code, status)


def test_exception_hierarchy() -> None:
    assert issubclass(hutch.SandboxTerminatedError, hutch.SandboxNotRunningError)
    assert issubclass(hutch.SandboxFailedError, hutch.SandboxNotRunningError)
    for cls in (
        hutch.SandboxNotRunningError,
        hutch.SandboxTimeoutError,
        hutch.SandboxNotFoundError,
        hutch.SandboxExecutionError,
        hutch.SandboxFileError,
    ):
        assert issubclass(cls, hutch.SandboxError)
    assert issubclass(hutch.FunctionSerializationError, hutch.FunctionError)
    assert issubclass(hutch.FunctionError, hutch.HutchError)
    assert issubclass(hutch.AuthenticationError, hutch.HutchError)
