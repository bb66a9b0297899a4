"""The uid a root pool's sandboxed run drops to, one per run going on in this process (a
seat), and the copy handed to it."""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager

from .settings import SandboxSettings


def _chown_tree(root: str, uid: int, gid: int, limit: int = 100_000) -> None:
    """Give the sandbox's uid the copy (a root pool's runs do not run as root).

    Iterative (no recursion limit on a deep tree an earlier run left), bounded, and
    never through a link (``lchown``; directories entered only if not links).
    """
    os.lchown(root, uid, gid)
    stack, seen = [root], 0
    while stack and seen < limit:
        try:
            with os.scandir(stack.pop()) as it:
                for e in it:
                    seen += 1
                    try:
                        os.lchown(e.path, uid, gid)
                        if e.is_dir(follow_symlinks=False):
                            stack.append(e.path)
                    except OSError:
                        pass
        except OSError:
            continue


# Seats of this process's runs going on now: several agents share one actor process when
# agents_per_actor > 1, and two runs at once must never share a uid. A run takes the lowest
# free seat for its length; the uid is derived from the process and the seat.
_SEATS_PER_PROCESS = 1024
_seats: set[int] = set()
_seats_lock = threading.Lock()


@contextmanager
def _seat():
    with _seats_lock:
        seat = next(i for i in range(_SEATS_PER_PROCESS + 1) if i not in _seats)
        if seat == _SEATS_PER_PROCESS:
            raise RuntimeError(f"more than {_SEATS_PER_PROCESS} sandboxed runs at once in one process")
        _seats.add(seat)
    try:
        yield seat
    finally:
        with _seats_lock:
            _seats.discard(seat)


def sandbox_uid(settings: SandboxSettings, seat: int = 0) -> int:
    """The uid a root pool's run drops to: ``settings.uid`` when set, else one of this
    process's own (from its pid) and of the run's seat in it, so two runs at once in one
    process (agents sharing an actor) never share a uid. Stays below 2**32 - 1."""
    if settings.uid is not None:
        return settings.uid
    return 100_000 + (os.getpid() % 4_190_000) * _SEATS_PER_PROCESS + seat % _SEATS_PER_PROCESS
