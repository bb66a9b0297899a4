"""What a crash test needs around a pool: clients that follow streams across a crash,
a way to kill busy agent actors, and the execution counter of scripted agents.

Used by tests/test_resume.py and scripts/resume_chaos.py.
"""

from __future__ import annotations

import collections
import os
import signal
import threading
import time


class Reader(threading.Thread):
    """A client following one task's stream across a crash, as a user's loop would.

    Keeps every event and when it arrived; an error ends the thread and stays in ``error``.
    """

    def __init__(self, handle) -> None:
        super().__init__(daemon=True)
        self.handle, self.events, self.arrivals, self.error = handle, [], [], None

    def run(self) -> None:
        try:
            for ev in self.handle.stream():
                self.events.append(ev)
                self.arrivals.append(time.time())
        except BaseException as exc:  # noqa: BLE001 - reported by the caller
            self.error = exc


def follow(handles) -> list[Reader]:
    """One started :class:`Reader` per handle."""
    readers = [Reader(h) for h in handles]
    for r in readers:
        r.start()
    return readers


def kill_busy_agents(pool, n: int, *, spacing_s: float = 0.6, timeout_s: float = 60) -> int:
    """SIGKILL the process of a busy agent actor ``n`` times; returns how many were killed."""
    killed = 0
    deadline = time.monotonic() + timeout_s
    while killed < n and time.monotonic() < deadline:
        busy = [s for s in pool.stats()["slots"] if s["busy"] and s["pid"]]
        if busy:
            os.kill(busy[0]["pid"], signal.SIGKILL)
            killed += 1
            time.sleep(spacing_s)
        time.sleep(0.05)
    return killed


def runs(mark: str) -> collections.Counter:
    """How many times each idempotency key ran (scripted agents' ``mark`` directory)."""
    with open(os.path.join(mark, "runs.log")) as fh:
        return collections.Counter(line.strip() for line in fh)
