"""Run Python functions in sandboxes: one call, or many in parallel with map."""

import os

import hutch

IMAGE = os.environ.get("HUTCH_EXAMPLE_IMAGE", "host")
BONUS = 1000  # a global the function reads: captured and sent along

with hutch.Session(hutch.SandboxDefaults(image=IMAGE, tags={"example": "functions"})) as session:

    @session.function()
    def score(x: int) -> int:
        return x * x + BONUS

    print("one call:", score.remote(7).result())
    print("map:", hutch.result(score.map(range(10))))
    print("locally:", score.local(7))

    @session.function(serialization="pickle")  # sets, bytes, tuples... travel too
    def unique(values: list[int]) -> set[int]:
        return set(values)

    print("pickle:", unique.remote([1, 2, 2, 3]).result())
