"""The capacity workload on the barest Ray event plane: the floor a pool is measured against.

    python scripts/capacity_floor.py --levels 1000 --agents-per-actor 50
    python scripts/bench.py --capacity      # prints this row next to the pool's, same run

The same agents as ``bench_capacity``'s (a token every 50 ms on a fixed schedule, for
``--seconds``), with nothing of threadbound: ``ceil(n / k)`` threaded Ray actors, each
running its ``k`` agents as threads that put tokens in a list under one lock; one flusher
thread per actor that, every turn (the pool's turn for ``k`` agents: 50 ms stretched to at
most 250 ms as ``agents_per_actor`` grows, so both send the same number of events), sends
every agent's pending tokens as one event each, all in one fire-and-forget call to one
async log actor (numbered: Ray does not keep the order of calls to an async actor); the
log actor stamps and appends them, in each sender's order, to per-task lists in memory and
wakes a waiting reader; one client long-polls all tasks in one call per burst.

No durability, no metrics, no retries, no deadlines, no caps, no sandbox: what is left is
the cost of the agents' own wake-ups, Ray's calls and the copying of events. It is the
issue's 90-line probe run at the capacity workload, so the pool's CPU per event can be
quoted as a ratio against it, as the per-step cost is against the bare relay.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import ray

RATE = 20.0
TOKEN_INTERVAL_S = 0.05  # the pool's default token_interval_ms
PACE_STEPS, PACE_MAX_FACTOR = 8, 5  # as agents/host.py stretches the turn of an actor's stream


def pace_s(k: int, interval_s: float = TOKEN_INTERVAL_S) -> float:
    """The flush turn of an actor of ``k`` streaming agents (the pool's rule)."""
    return interval_s * min(PACE_MAX_FACTOR, max(1.0, k / PACE_STEPS))


@ray.remote
class FloorLog:
    """The supervisor's part, bare: per-task event lists and one waiting reader."""

    def __init__(self, n: int) -> None:
        import asyncio

        self.logs: list[list[tuple[float, str, int]]] = [[] for _ in range(n)]
        self.done = [False] * n
        self.news = asyncio.Event()
        # Ray does not keep the order of one caller's calls to an async actor: each
        # sender numbers its flushes and they are applied in that order.
        self.next: dict[int, int] = {}
        self.held: dict[int, dict[int, tuple[list, list]]] = {}

    def pid(self) -> int:
        import os

        return os.getpid()

    async def append(self, sender: int, seq: int, batch: list[tuple[int, str, int]], ended: list[int]) -> None:
        held = self.held.setdefault(sender, {})
        held[seq] = (batch, ended)
        now = time.time()
        due = self.next.get(sender, 0)
        while due in held:
            batch, ended = held.pop(due)
            for task, text, count in batch:
                self.logs[task].append((now, text, count))
            for task in ended:
                self.done[task] = True
            due += 1
        self.next[sender] = due
        self.news.set()

    async def read_many(self, offsets: list[int], wait_s: float) -> tuple[dict[int, list], list[int]]:
        import asyncio

        def news() -> bool:
            return any(off < len(self.logs[t]) or self.done[t] for t, off in enumerate(offsets) if off >= 0)

        if not news():
            self.news.clear()
            try:
                await asyncio.wait_for(self.news.wait(), wait_s)
            except asyncio.TimeoutError:
                pass
        out = {t: self.logs[t][off:] for t, off in enumerate(offsets) if off >= 0 and off < len(self.logs[t])}
        ended = [t for t, off in enumerate(offsets) if off >= 0 and self.done[t]]
        return out, ended


@ray.remote(max_concurrency=4)
class FloorAgents:
    """``k`` agents as threads in one process, flushed together every turn."""

    def pid(self) -> int:
        import os

        return os.getpid()

    def run(self, log: Any, sender: int, tasks: list[int], tokens: int, interval_s: float, turn_s: float) -> int:
        lock = threading.Lock()
        pending: dict[int, list[str]] = {t: [] for t in tasks}
        left = [len(tasks)]
        ended: list[int] = []

        def agent(task: int) -> None:
            start = time.monotonic()
            mine = pending[task]
            for i in range(tokens):
                wait = start + i * interval_s - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                with lock:
                    mine.append(f"{i}:{time.time():.4f} ")
            with lock:
                ended.append(task)
                left[0] -= 1

        threads = [threading.Thread(target=agent, args=(t,), daemon=True) for t in tasks]
        for th in threads:
            th.start()
        sent = seq = 0
        while True:
            time.sleep(turn_s)
            with lock:
                batch = [(t, "".join(p), len(p)) for t, p in pending.items() if p]
                for p in pending.values():
                    p.clear()
                gone, ended[:] = list(ended), []
                last = left[0] == 0
            if batch or gone:
                log.append.remote(sender, seq, batch, gone)
                seq += 1
                sent += len(batch)
            if last:
                return sent


def floor_level(n: int, *, seconds: float, k: int, rate: float = RATE) -> dict[str, Any]:
    """One level on the bare plane; a row as ``bench_capacity.run_level`` makes, with the
    same checks (every agent's tokens once each and in order, offsets without a gap)."""
    import psutil

    from bench_capacity import _cpu, _ray_processes, _rss, summarize

    tokens = max(1, int(round(rate * seconds)))
    k = max(1, min(k, n))
    t0 = time.perf_counter()
    log = FloorLog.options(max_concurrency=1000).remote(n)
    groups = [list(range(i, min(n, i + k))) for i in range(0, n, k)]
    actors = [FloorAgents.remote() for _ in groups]
    try:
        sup_pid = ray.get(log.pid.remote())
        agent_pids = set(ray.get([a.pid.remote() for a in actors]))
        setup_s = time.perf_counter() - t0
        me = psutil.Process()
        procs = {"supervisor": {sup_pid: psutil.Process(sup_pid)}, "client": {me.pid: me},
                 "agents": {pid: psutil.Process(pid) for pid in agent_pids}}
        procs["ray"] = _ray_processes({sup_pid, me.pid, *agent_pids})

        def cpu_now() -> tuple[float, dict[str, dict[int, float]]]:
            return time.time(), {part: _cpu(p) for part, p in procs.items()}

        marks: dict[str, Any] = {"start": cpu_now()}
        runs = [a.run.remote(log, i, g, tokens, 1.0 / rate, pace_s(len(g)))
                for i, (a, g) in enumerate(zip(actors, groups))]
        got: list[dict[str, Any]] = [{"seen": [], "offsets": [], "order": [], "status": None} for _ in range(n)]
        cursors = [0] * n  # -1 once the task ended and everything it sent was read
        reads = 0
        deadline = time.monotonic() + 3 * seconds + 60  # an actor that died would leave its tasks open
        while not all(c < 0 for c in cursors):
            if time.monotonic() > deadline:
                ray.get(runs, timeout=1)  # raises the actors' error, if that is what happened
                raise RuntimeError(f"the bare plane's {n} agents did not all end within {3 * seconds + 60:g} s")
            news, ended = ray.get(log.read_many.remote(cursors, 1.0))
            reads += 1
            now = time.time()
            for t, evs in news.items():
                mine = got[t]
                for ts, text, count in evs:
                    parts = text.split()
                    mine["order"].extend(int(p.split(":", 1)[0]) for p in parts)
                    mine["seen"].append((ts, now, float(parts[-1].split(":", 1)[1]), count))
                    mine["offsets"].append(cursors[t])
                    cursors[t] += 1
            if "a" not in marks and all(g["seen"] for g in got):
                marks["a"] = cpu_now()
            for t in ended:
                if t not in news:  # everything it sent has been read
                    got[t]["status"] = "succeeded"
                    cursors[t] = -1
                    marks.setdefault("b", cpu_now())
        marks["end"] = cpu_now()
        ray.get(runs)
        rss = _rss(procs["agents"])
    finally:
        for a in actors:
            ray.kill(a)
        ray.kill(log)
    return summarize(n, k, seconds=seconds, rate=rate, tokens=tokens, setup_s=setup_s, procs=procs, marks=marks,
                     got=got, rss_agents=rss, reads=reads)


def main() -> int:
    import argparse
    import os
    import sys

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_capacity import _levels, describe
    from local_ray import isolate

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--levels", type=_levels, default=(1000,), help="agents per level, comma-separated (default 1000)")
    ap.add_argument("--seconds", type=float, default=10.0, help="how long every agent streams (default 10)")
    ap.add_argument("--agents-per-actor", type=int, default=50, metavar="K", help="agents per process (default 50)")
    args = ap.parse_args()
    if not 0 < args.seconds <= 3600:  # also refuses nan
        ap.error(f"--seconds: must be > 0 and <= 3600, got {args.seconds}")
    if args.agents_per_actor < 1:
        ap.error(f"--agents-per-actor: must be >= 1, got {args.agents_per_actor}")
    isolate("capacity-floor")
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        for n in args.levels:
            print(describe(floor_level(n, seconds=args.seconds, k=args.agents_per_actor)), flush=True)
    finally:
        ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
