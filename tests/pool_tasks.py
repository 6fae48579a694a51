"""Task functions for tests/test_pool.py: real work a spawned worker imports by name.

Each task takes a payload dict and writes what it did to ``payload["out"]`` (a file per task),
so the test can see which process ran it and when.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path


def record(payload: dict) -> None:
    """Write this process's pid and the payload's ``value`` squared, after ``sleep`` seconds."""
    time.sleep(float(payload.get("sleep", 0.0)))
    Path(payload["out"]).write_text(json.dumps({"pid": os.getpid(), "square": payload["value"] ** 2}))


def fail(payload: dict) -> None:
    """Raise, the way a broken cell raises."""
    raise ValueError(f"task {payload['value']} refuses to run")


def die(payload: dict) -> None:
    """End the worker process at once, as the kernel's OOM killer or a native crash would."""
    os._exit(int(payload.get("code", 7)))


def dispatch(payload: dict) -> None:
    """Run the task named by ``payload["task"]``: one worker function for mixed test grids."""
    {"record": record, "fail": fail, "die": die}[payload["task"]](payload)
