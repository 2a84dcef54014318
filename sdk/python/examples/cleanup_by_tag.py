"""Find sandboxes by tag and remove them: for batch jobs and after crashes."""

import os
import time
import uuid

import hutch

IMAGE = os.environ.get("HUTCH_EXAMPLE_IMAGE", "host")
batch = {"batch": uuid.uuid4().hex[:8]}

# Sandboxes meant to outlive this script (stop_on_exit=False).
for _ in range(3):
    hutch.Sandbox.run(image=IMAGE, tags=batch, stop_on_exit=False)

found = hutch.Sandbox.list(tags=batch).result()
print("found", len(found), "sandboxes tagged", batch)
hutch.wait([hutch.Sandbox.delete(s.id) for s in found])
# The server forgets a deleted sandbox once it has stopped.
deadline = time.monotonic() + 60
while hutch.Sandbox.list(tags=batch).result() and time.monotonic() < deadline:
    time.sleep(0.2)
print("deleted; still listed:", len(hutch.Sandbox.list(tags=batch).result()))
