"""Files against a real sandboxd: streamed both ways with flat memory, listing, errors."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import tracemalloc
from pathlib import Path

import pytest

import hutch

MIB = 1 << 20


def test_bytes_text_and_file_objects_round_trip(sandbox: hutch.Sandbox, tmp_path: Path) -> None:
    base = tmp_path / "remote"
    sandbox.write_file(f"{base}/a/b/bytes.bin", b"\x00\x01\xff").result()
    sandbox.write_file(f"{base}/text.txt", "héllo\n").result()
    info = sandbox.write_file(f"{base}/script.sh", io.BytesIO(b"#!/bin/sh\necho hi\n"), mode=0o755).result()
    assert info.size == 18 and info.mode == 0o755 and info.is_file
    assert sandbox.read_file(f"{base}/a/b/bytes.bin").result() == b"\x00\x01\xff"
    assert sandbox.read_file(f"{base}/text.txt").result().decode() == "héllo\n"
    assert sandbox.exec([f"{base}/script.sh"]).result().stdout == "hi\n"
    names = [(entry.name, entry.kind) for entry in sandbox.list_files(str(base)).result()]
    assert names == [("a", "dir"), ("script.sh", "file"), ("text.txt", "file")]


def test_a_100_mib_file_round_trips_with_flat_client_memory(sandbox: hutch.Sandbox, tmp_path: Path) -> None:
    source = tmp_path / "source.bin"
    digest = hashlib.sha256()
    with source.open("wb") as f:
        block = os.urandom(MIB)
        for i in range(100):
            chunk = block[i:] + block[:i]
            digest.update(chunk)
            f.write(chunk)
    target = tmp_path / "back.bin"
    remote = str(tmp_path / "remote" / "big.bin")

    tracemalloc.start()
    try:
        info = sandbox.write_file(remote, source).result(timeout=120)
        with target.open("wb") as out:
            count = sandbox.read_file(remote, dest=out).result(timeout=120)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    print(f"peak {peak / MIB:.2f} MiB")
    assert info.size == 100 * MIB
    assert count == 100 * MIB
    assert peak < 24 * MIB, f"client memory peaked at {peak / MIB:.1f} MiB for a 100 MiB file"
    back = hashlib.sha256()
    with target.open("rb") as f:
        while chunk := f.read(MIB):
            back.update(chunk)
    assert back.hexdigest() == digest.hexdigest()


def test_iterables_and_async_iteration(sandbox: hutch.Sandbox, tmp_path: Path) -> None:
    remote = str(tmp_path / "chunks.txt")
    sandbox.write_file(remote, (f"line {i}\n".encode() for i in range(1000))).result()

    async def main() -> bytes:
        parts = [chunk async for chunk in sandbox.iter_file(remote)]
        return b"".join(parts)

    data = asyncio.run(main())
    assert data.count(b"\n") == 1000 and data.startswith(b"line 0\n")


def test_stat_mkdir_remove(sandbox: hutch.Sandbox, tmp_path: Path) -> None:
    directory = str(tmp_path / "d" / "e")
    assert sandbox.make_dir(directory).result().is_dir
    sandbox.write_file(f"{directory}/f", b"x").result()
    assert sandbox.stat(f"{directory}/f").result().size == 1
    with pytest.raises(hutch.SandboxFileError) as caught:
        sandbox.remove_file(directory).result()
    assert caught.value.code == "directory_not_empty"
    sandbox.remove_file(directory, recursive=True).result()
    assert not Path(directory).exists()


def test_file_errors_carry_the_path(sandbox: hutch.Sandbox, tmp_path: Path) -> None:
    missing = str(tmp_path / "missing")
    with pytest.raises(hutch.SandboxFileError) as caught:
        sandbox.read_file(missing).result()
    assert caught.value.path == missing
    assert caught.value.code == "file_not_found"
    with pytest.raises(hutch.SandboxFileError):
        sandbox.list_files(missing).result()
    with pytest.raises(hutch.SandboxFileError):
        sandbox.read_file(str(tmp_path)).result()
