"""Upload and download files, streamed in chunks: memory stays flat for any size."""

import hashlib
import os
import tempfile
from pathlib import Path

import hutch

IMAGE = os.environ.get("HUTCH_EXAMPLE_IMAGE", "host")

with tempfile.TemporaryDirectory() as tmp, hutch.Sandbox.run(image=IMAGE, tags={"example": "files"}) as sandbox:
    local = Path(tmp) / "data.bin"
    local.write_bytes(os.urandom(8 << 20))

    info = sandbox.write_file("/tmp/in/data.bin", local).result()  # a Path is streamed from disk
    print("uploaded", info.size, "bytes to", info.path)

    sandbox.exec("sha256sum /tmp/in/data.bin | cut -d' ' -f1 > /tmp/in/sum", check=True).result()
    remote_sum = sandbox.read_file("/tmp/in/sum").result().decode().strip()
    print("checksums match:", remote_sum == hashlib.sha256(local.read_bytes()).hexdigest())

    back = Path(tmp) / "back.bin"
    count = sandbox.read_file("/tmp/in/data.bin", dest=back).result()  # streamed to disk
    print("downloaded", count, "bytes")

    for entry in sandbox.list_files("/tmp/in").result():
        print(f"{entry.kind:4} {entry.size:>9} {entry.name}")
