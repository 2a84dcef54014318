"""Stream a command's output live, line by line, then get its result."""

import os

import hutch

IMAGE = os.environ.get("HUTCH_EXAMPLE_IMAGE", "host")

with hutch.Sandbox.run(image=IMAGE, tags={"example": "streaming"}) as sandbox:
    process = sandbox.exec(["sh", "-c", "for i in 1 2 3; do echo step $i; echo warn $i >&2; sleep 0.3; done"])
    for chunk in process.iter_output():  # stdout and stderr, in the order written
        print(f"[{chunk.stream}] {chunk.text}", end="")

    result = process.result()
    print("exit code:", result.returncode)

    # Only stdout, as text lines:
    for line in sandbox.exec(["seq", "3"]).stdout:
        print("line:", line.strip())

    # check=True raises with the result attached.
    try:
        sandbox.exec("echo failing >&2; exit 2", check=True).result()
    except hutch.SandboxExecutionError as e:
        print("failed with", e.result.returncode, "stderr:", e.result.stderr.strip())
