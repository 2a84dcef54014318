"""Shipping a Python function to a sandbox and its result back.

A function travels as source, not bytecode, so the sandbox's Python need not
match the caller's: its source (decorators removed), the modules and
importable objects it references (re-imported in the sandbox), the source of
other functions and classes of the caller's own code it references, and the
values of the other globals and closure variables it reads. Values, arguments
and the result are encoded as JSON, or with pickle (base64 inside the JSON
payload) when ``serialization="pickle"``.
"""

from __future__ import annotations

import ast
import base64
import builtins
import inspect
import json
import pickle
import sys
import textwrap
import types
from collections.abc import Callable
from typing import Any

from .exceptions import FunctionError, FunctionSerializationError

PAYLOAD_VERSION = 1
# References followed from one function to the functions it calls.
_MAX_HELPER_DEPTH = 8

# Runs inside the sandbox as `python3 -c BOOTSTRAP`: the payload comes on
# stdin and the result document is the only thing written to stdout (the
# function's own prints go to stderr), so no file needs to be writable in the
# image. Kept to the standard library and Python 3.8 syntax so it runs on any
# image with Python.
BOOTSTRAP = r"""
import __future__, base64, importlib, json, linecache, os, pickle, sys, traceback

# Annotations stay unevaluated: the names they use need not exist here.
_FLAGS = __future__.annotations.compiler_flag

def _load(src, filename, ns):
    # Registered with linecache so tracebacks show the function's lines.
    linecache.cache[filename] = (len(src), None, src.splitlines(True), filename)
    exec(compile(src, filename, "exec", _FLAGS, True), ns)

def _main():
    result_fd = os.dup(1)
    os.dup2(2, 1)  # The function's prints go to stderr.
    def finish(text):
        sys.stdout.flush()
        with os.fdopen(result_fd, "wb") as f:
            f.write(text.encode("utf-8"))
    p = json.loads(sys.stdin.buffer.read())
    ser = p["serialization"]
    def dec(v):
        return pickle.loads(base64.b64decode(v)) if ser == "pickle" else v
    def enc(v):
        return base64.b64encode(pickle.dumps(v)).decode("ascii") if ser == "pickle" else v
    def fail(stage, e):
        return {"ok": False, "stage": stage, "type": type(e).__name__, "message": str(e),
                "traceback": traceback.format_exc()}
    ns = {"__name__": "__hutch_remote__", "__builtins__": __builtins__}
    sys.modules["__hutch_remote__"] = type(sys)("__hutch_remote__")
    sys.modules["__hutch_remote__"].__dict__.update(ns)
    ns = sys.modules["__hutch_remote__"].__dict__
    try:
        for alias, module, attr in p["imports"]:
            try:
                value = importlib.import_module(module)
                for part in (attr.split(".") if attr else []):
                    value = getattr(value, part)
                ns[alias] = value
            except Exception:
                pass  # Only an error if the function really uses it.
        for name, value in p["globals"].items():
            ns[name] = dec(value)
        for i, src in enumerate(p["helpers"]):
            _load(src, "<hutch helper %d>" % i, ns)
        _load(p["source"], "<hutch function " + p["name"] + ">", ns)
        fn = ns[p["name"]]
        args = dec(p["args"])
        kwargs = dec(p["kwargs"])
    except BaseException as e:
        out = fail("load", e)
    else:
        try:
            value = fn(*args, **kwargs)
        except BaseException as e:
            out = fail("call", e)
        else:
            try:
                text = json.dumps({"ok": True, "value": enc(value)})
            except BaseException as e:
                out = fail("result", e)
            else:
                finish(text)
                return
    finish(json.dumps(out))

_main()
"""


def function_source(fn: Callable[..., Any]) -> str:
    """The source of ``fn`` as a top-level ``def`` without decorators."""
    if not isinstance(fn, types.FunctionType):
        raise FunctionSerializationError(f"{fn!r} is not a plain Python function")
    if fn.__name__ == "<lambda>":
        raise FunctionSerializationError("lambdas cannot be sent to a sandbox; use a def")
    try:
        source = textwrap.dedent(inspect.getsource(fn))
    except (OSError, TypeError) as e:
        raise FunctionSerializationError(f"source of {fn.__qualname__} is not available: {e}") from e
    return _strip_decorators(source, fn.__name__)


def _strip_decorators(source: str, name: str) -> str:
    try:
        tree = ast.parse(source)
    except SyntaxError as e:
        raise FunctionSerializationError(f"cannot parse the source of {name}: {e}") from e
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == name:
            node.decorator_list = []
            return ast.unparse(node)
    raise FunctionSerializationError(f"definition of {name} not found in its source")


def _code_names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _code_names(const)
    return names


class _Capture:
    def __init__(self, serialization: str) -> None:
        self.serialization = serialization
        self.imports: list[list[str | None]] = []
        self.helpers: list[str] = []
        self.globals: dict[str, Any] = {}
        self._seen: set[str] = set()

    def function(self, fn: types.FunctionType, depth: int) -> None:
        names = _code_names(fn.__code__)
        for name in sorted(names):
            if name in fn.__globals__:
                self.value(name, fn.__globals__[name], fn.__module__, depth)
        if fn.__closure__:
            for name, cell in zip(fn.__code__.co_freevars, fn.__closure__, strict=True):
                try:
                    value = cell.cell_contents
                except ValueError:
                    continue  # An empty cell: the name is bound later.
                self.value(name, value, fn.__module__, depth)

    def value(self, name: str, value: Any, home_module: str, depth: int) -> None:
        if name in self._seen:
            return
        self._seen.add(name)
        if isinstance(value, types.ModuleType):
            self.imports.append([name, value.__name__, None])
            return
        module = getattr(value, "__module__", None)
        qualname = getattr(value, "__qualname__", None)
        if isinstance(value, (types.FunctionType, type)):
            local = module in (home_module, "__main__") or "<locals>" in (qualname or "")
            if not local and module and qualname and "<" not in qualname:
                self.imports.append([name, module, qualname])
                return
            if depth >= _MAX_HELPER_DEPTH:
                raise FunctionSerializationError(f"{name}: helper functions nest too deep")
            source = function_source(value) if isinstance(value, types.FunctionType) else _class_source(value)
            if value.__name__ != name:
                source += f"\n{name} = {value.__name__}"
            if isinstance(value, types.FunctionType):
                self.function(value, depth + 1)
            self.helpers.append(source)
            return
        if isinstance(value, (types.BuiltinFunctionType,)) and module:
            self.imports.append([name, module, getattr(value, "__name__", name)])
            return
        if value is getattr(builtins, name, object()):
            return
        self.globals[name] = encode(value, self.serialization, what=f"global {name!r}")


def _class_source(cls: type) -> str:
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError) as e:
        raise FunctionSerializationError(f"source of class {cls.__qualname__} is not available: {e}") from e
    return _strip_decorators(source, cls.__name__)


def encode(value: Any, serialization: str, *, what: str) -> Any:
    """``value`` as it goes into the JSON payload."""
    if serialization == "json":
        try:
            json.dumps(value)
        except (TypeError, ValueError) as e:
            raise FunctionSerializationError(f"{what} is not JSON-serializable: {e}") from e
        return value
    try:
        data = pickle.dumps(value)
    except Exception as e:  # noqa: BLE001 - pickling fails with many error types.
        try:
            import cloudpickle  # type: ignore[import-not-found,import-untyped,unused-ignore]
        except ImportError:
            raise FunctionSerializationError(f"{what} cannot be pickled: {e}") from e
        try:
            data = cloudpickle.dumps(value)
        except Exception as e2:  # noqa: BLE001
            raise FunctionSerializationError(f"{what} cannot be pickled: {e2}") from e2
    return base64.b64encode(data).decode("ascii")


def decode(value: Any, serialization: str) -> Any:
    if serialization == "json":
        return value
    try:
        return pickle.loads(base64.b64decode(value))
    except Exception as e:  # noqa: BLE001
        raise FunctionSerializationError(f"the result cannot be unpickled here: {e}") from e


def build_payload(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], serialization: str) -> bytes:
    """The JSON document the bootstrap reads. Raises FunctionSerializationError early."""
    if serialization not in ("json", "pickle"):
        raise ValueError(f"serialization must be 'json' or 'pickle', not {serialization!r}")
    source = function_source(fn)
    capture = _Capture(serialization)
    assert isinstance(fn, types.FunctionType)
    capture._seen.add(fn.__name__)
    capture.function(fn, 0)
    if serialization == "json":
        encoded_args: Any = encode(list(args), serialization, what="arguments")
        encoded_kwargs: Any = encode(kwargs, serialization, what="keyword arguments")
    else:
        encoded_args = encode(tuple(args), serialization, what="arguments")
        encoded_kwargs = encode(dict(kwargs), serialization, what="keyword arguments")
    payload = {
        "version": PAYLOAD_VERSION,
        "serialization": serialization,
        "name": fn.__name__,
        "source": source,
        "imports": capture.imports,
        "helpers": capture.helpers,
        "globals": capture.globals,
        "args": encoded_args,
        "kwargs": encoded_kwargs,
        "python": list(sys.version_info[:2]),
    }
    return json.dumps(payload).encode("utf-8")


def parse_result(data: bytes, serialization: str, name: str) -> Any:
    """The function's value from the result document, or the matching exception."""
    try:
        doc = json.loads(data)
    except ValueError as e:
        raise FunctionError(f"{name}: the sandbox wrote an unreadable result") from e
    if doc.get("ok"):
        return decode(doc.get("value"), serialization)
    stage = doc.get("stage")
    message = f"{name} raised {doc.get('type')}: {doc.get('message')}"
    cls = FunctionError
    if stage == "result":
        cls = FunctionSerializationError
        message = f"the result of {name} cannot be serialized: {doc.get('type')}: {doc.get('message')}"
    elif stage == "load":
        message = f"{name} could not be loaded in the sandbox: {doc.get('type')}: {doc.get('message')}"
    raise cls(message, remote_type=doc.get("type"), remote_traceback=doc.get("traceback"))
