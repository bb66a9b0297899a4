"""Free ports for tests, from a range nobody is handed a port of without asking for it.

A port found free by binding port 0 is one of the OS's ephemeral range, which the OS
hands to every process that binds port 0 or connects out: a Ray started next has dozens
of those, and CI once saw a Ray worker listening on the port a run had picked a moment
before. Ray's workers also take ports of their own range (10002-19999 by default). The
ports here lie between the two, picked at random so that two test processes at once
rarely look at the same ones, and bound once to see that they are free.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

RAY_WORKER_PORTS = range(10002, 20000)  # ray start's --min-worker-port .. --max-worker-port defaults


def ephemeral() -> range:
    """The OS's ephemeral port range (Linux's default when it cannot be read)."""
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    return range(low, high + 1)


def free_ports(n: int = 1, host: str = "127.0.0.1") -> list[int]:
    """``n`` different ports nothing listens on now, none of them ephemeral or Ray's."""
    low = RAY_WORKER_PORTS.stop
    high = min(ephemeral().start, 65536)
    if high - low < 100:  # a machine whose ephemeral range starts low: no quiet range, take the OS's
        held = [socket.socket() for _ in range(n)]
        try:
            for s in held:
                s.bind((host, 0))
            return [s.getsockname()[1] for s in held]
        finally:
            for s in held:
                s.close()
    found: list[int] = []
    start = random.randrange(low, high)
    for k in range(high - low):
        port = low + (start - low + k) % (high - low)
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        found.append(port)
        if len(found) == n:
            return found
    raise RuntimeError(f"no {n} free ports between {low} and {high}")


def free_port(host: str = "127.0.0.1") -> int:
    """One port nothing listens on now (see :func:`free_ports`)."""
    return free_ports(1, host)[0]
