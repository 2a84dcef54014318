"""Many sandboxes at once: sync with refs and hutch.wait, and async with gather."""

import asyncio
import os
import time

import hutch

IMAGE = os.environ.get("HUTCH_EXAMPLE_IMAGE", "host")
N = 10

# Sync: every call returns at once; collect the results afterwards.
start = time.monotonic()
with hutch.Session(hutch.SandboxDefaults(image=IMAGE, tags={"example": "parallel"})) as session:
    processes = [session.sandbox().exec(["sh", "-c", f"echo sandbox {i}"]) for i in range(N)]
    done, pending = hutch.wait(processes, num_returns=N, timeout=120)
    print(
        f"sync: {len(done)} done in {time.monotonic() - start:.2f} s:",
        [p.result().stdout.strip() for p in done][:3],
        "...",
    )


# Async: the same objects are awaitable.
async def main() -> None:
    async def one(i: int) -> str:
        async with hutch.Sandbox(image=IMAGE, tags={"example": "parallel"}) as sandbox:
            return (await sandbox.exec(["echo", f"async {i}"])).stdout.strip()

    start = time.monotonic()
    outputs = await asyncio.gather(*(one(i) for i in range(N)))
    print(f"async: {len(outputs)} in {time.monotonic() - start:.2f} s:", outputs[:3], "...")


asyncio.run(main())
