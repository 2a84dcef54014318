"""Hutch: run untrusted code in sandboxes on a self-hosted Hutch server.

Quick start::

    import hutch

    with hutch.Sandbox.run(image="host") as sandbox:
        result = sandbox.exec(["echo", "hello"]).result()
        print(result.stdout)

Every network call returns an :class:`OperationRef` (``.result()`` from sync
code, ``await`` from async code) or a :class:`Process`, which is one too.
"""

from ._loop import OperationRef, result, wait
from .config import Config, configure, get_config
from .defaults import SandboxDefaults
from .exceptions import (
    AuthenticationError,
    FunctionError,
    FunctionSerializationError,
    HutchConnectionError,
    HutchError,
    SandboxError,
    SandboxExecutionError,
    SandboxFailedError,
    SandboxFileError,
    SandboxNotFoundError,
    SandboxNotRunningError,
    SandboxTerminatedError,
    SandboxTimeoutError,
)
from .process import Process, StdinWriter, StreamReader
from .sandbox import Sandbox
from .session import RemoteFunction, Serialization, Session
from .types import FileInfo, NetworkOptions, OutputChunk, ProcessResult, Resources, SandboxInfo, SandboxStatus

__version__ = "0.1.0"

__all__ = [
    "AuthenticationError",
    "Config",
    "FileInfo",
    "FunctionError",
    "FunctionSerializationError",
    "HutchConnectionError",
    "HutchError",
    "NetworkOptions",
    "OperationRef",
    "OutputChunk",
    "Process",
    "ProcessResult",
    "RemoteFunction",
    "Resources",
    "Sandbox",
    "SandboxDefaults",
    "SandboxError",
    "SandboxExecutionError",
    "SandboxFailedError",
    "SandboxFileError",
    "SandboxInfo",
    "SandboxNotFoundError",
    "SandboxNotRunningError",
    "SandboxStatus",
    "SandboxTerminatedError",
    "SandboxTimeoutError",
    "Serialization",
    "Session",
    "StdinWriter",
    "StreamReader",
    "configure",
    "get_config",
    "result",
    "wait",
]
