"""Quick start: create a sandbox, run a command, read a file, stop it.

Run `hutch up` first; the SDK finds it through HUTCH_URL/HUTCH_API_KEY or the
local data dir.
"""

import os

import hutch

IMAGE = os.environ.get("HUTCH_EXAMPLE_IMAGE", "host")

with hutch.Sandbox.run(image=IMAGE, tags={"example": "quickstart"}) as sandbox:
    result = sandbox.exec(["python3", "-c", "print('hello from', __import__('platform').node())"]).result()
    print(result.stdout, end="")

    sandbox.write_file("/tmp/greeting.txt", "hi there\n").result()
    print(sandbox.read_file("/tmp/greeting.txt").result().decode(), end="")
    print("status:", sandbox.get_status())
# Leaving the block stopped the sandbox.
