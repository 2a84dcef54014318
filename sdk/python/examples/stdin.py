"""Talk to a running process through its stdin."""

import os

import hutch

IMAGE = os.environ.get("HUTCH_EXAMPLE_IMAGE", "host")

with hutch.Sandbox.run(image=IMAGE, tags={"example": "stdin"}) as sandbox:
    process = sandbox.exec(
        ["python3", "-u", "-c", "import sys\nfor l in sys.stdin: print(l.strip().upper())"], stdin=True
    )
    replies = iter(process.stdout)
    for word in ["alpha", "beta", "gamma"]:
        process.stdin.writeline(word).result()  # .result(): wait until it is in the pipe
        print(word, "->", next(replies).strip())
    process.stdin.close().result()
    print("exit code:", process.wait())
