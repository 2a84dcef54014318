"""Remote function shipping: the payload built here runs through the real bootstrap in a local python3."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest

import hutch
from hutch import _functions

SCALE = 10
OFFSETS = {"a": 1, "b": 2}


def helper(x: int) -> int:
    return x * SCALE


def uses_globals_helpers_and_modules(x: int) -> dict[str, Any]:
    return {
        "scaled": helper(x),
        "offset": OFFSETS["b"],
        "root": math.sqrt(x),
        "cwd_is_str": isinstance(os.getcwd(), str),
    }


def raises(message: str) -> None:
    raise ValueError(message)


def returns_a_set() -> Any:
    return {1, 2}


@dataclasses.dataclass
class Point:
    x: int
    y: int


def uses_pickled_values(pairs: OrderedDict[str, int]) -> Any:
    return (sorted(pairs.items()), b"raw-bytes")


def run_in_local_python(payload: bytes, tmp_path: Path, python: str = sys.executable) -> bytes:
    """What the sandbox does, with this machine's Python standing in for the sandbox's."""
    done = subprocess.run([python, "-c", _functions.BOOTSTRAP], input=payload, capture_output=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    return done.stdout


def roundtrip(fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any], serialization: str, tmp_path: Path) -> Any:
    payload = _functions.build_payload(fn, args, kwargs, serialization)
    return _functions.parse_result(run_in_local_python(payload, tmp_path), serialization, fn.__name__)


def test_json_function_captures_globals_helpers_and_modules(tmp_path: Path) -> None:
    value = roundtrip(uses_globals_helpers_and_modules, (16,), {}, "json", tmp_path)
    assert value == {"scaled": 160, "offset": 2, "root": 4.0, "cwd_is_str": True}


def test_closures_are_captured(tmp_path: Path) -> None:
    factor = 3
    prefix = "n="

    def decorated_elsewhere(x: int) -> str:
        return prefix + str(x * factor)

    assert roundtrip(decorated_elsewhere, (5,), {}, "json", tmp_path) == "n=15"


def test_decorators_are_stripped(tmp_path: Path) -> None:
    session = hutch.Session(config=hutch.Config(url="http://unused.test", api_key="k"))

    @session.function()
    def add(x: int, y: int = 0) -> int:
        return x + y

    assert add.local(1, y=2) == 3
    assert add(2, 2) == 4
    payload = json.loads(_functions.build_payload(add.__wrapped__, (1,), {"y": 5}, "json"))
    assert payload["source"].startswith("def add(")
    assert roundtrip(add.__wrapped__, (1,), {"y": 5}, "json", tmp_path) == 6


def test_pickle_carries_non_json_values_both_ways(tmp_path: Path) -> None:
    value = roundtrip(uses_pickled_values, (OrderedDict(b=2, a=1),), {}, "pickle", tmp_path)
    assert value == ([("a", 1), ("b", 2)], b"raw-bytes")


def test_remote_exceptions_carry_type_and_traceback(tmp_path: Path) -> None:
    with pytest.raises(hutch.FunctionError) as caught:
        roundtrip(raises, ("bad input",), {}, "json", tmp_path)
    assert caught.value.remote_type == "ValueError"
    assert "bad input" in str(caught.value)
    assert caught.value.remote_traceback and "raise ValueError" in caught.value.remote_traceback
    assert not isinstance(caught.value, hutch.FunctionSerializationError)


def test_a_result_json_cannot_carry_raises_serialization_error(tmp_path: Path) -> None:
    with pytest.raises(hutch.FunctionSerializationError):
        roundtrip(returns_a_set, (), {}, "json", tmp_path)
    assert roundtrip(returns_a_set, (), {}, "pickle", tmp_path) == {1, 2}


def test_arguments_json_cannot_carry_fail_before_anything_runs() -> None:
    with pytest.raises(hutch.FunctionSerializationError):
        _functions.build_payload(helper, (Point(1, 2),), {}, "json")
    with pytest.raises(hutch.FunctionSerializationError):
        _functions.build_payload(lambda: 1, (), {}, "json")


def test_remote_rejects_unserializable_arguments_at_call_time() -> None:
    session = hutch.Session(config=hutch.Config(url="http://unused.test", api_key="k"))

    @session.function()
    def f(x: Any) -> Any:
        return x

    with pytest.raises(hutch.FunctionSerializationError):
        f.remote(object())
    assert session.sandbox_count == 0


def chatty(x: int) -> int:
    print("progress to stdout")
    print("and to stderr", file=sys.stderr)
    return x + 1


def test_prints_of_the_function_do_not_mix_with_its_result(tmp_path: Path) -> None:
    payload = _functions.build_payload(chatty, (1,), {}, "json")
    done = subprocess.run([sys.executable, "-c", _functions.BOOTSTRAP], input=payload, capture_output=True)
    assert _functions.parse_result(done.stdout, "json", "chatty") == 2
    assert b"progress to stdout" in done.stderr and b"and to stderr" in done.stderr
