"""What one Ray actor call costs when its actor was idle a moment before.

A pool of one agent per actor (``agents_per_actor: 1``) sends a task's code -> test ->
review steps to three processes in turn: each wakes for one step, then sleeps through the
other two. This script measures Ray's own CPU per call for that pattern against actors
kept busy, with nothing of threadbound in between: 4 callers, each making its calls one
after another with a request and a reply of a short step's size, either

- ``busy``: each caller to one actor of its own (4 processes, never idle), or
- ``in turn``: each caller to its own 3 actors in turn (12 processes, as a pool of
  4 tasks of three agents at a time).

Runs alternate (``--repeat`` pairs) and each prints the callers' and the actors' CPU per
call; the last line gives the median ratio of ``in turn`` to ``busy``.

    python scripts/ray_call_cost.py [--calls 3000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from local_ray import isolate  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=3000, help="calls per run (a multiple of 4)")
    ap.add_argument("--repeat", type=int, default=3, help="pairs of runs, taking turns")
    args = ap.parse_args(argv)
    if args.calls < 4 or args.repeat < 1:
        ap.error("--calls must be 4 or more and --repeat 1 or more")
    isolate("ray-call-cost")
    import psutil
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        @ray.remote(max_concurrency=5)  # a threaded actor, as a pool's agent actor is
        class Echo:
            def pid(self) -> int:
                return os.getpid()

            def step(self, request: bytes) -> bytes:
                return request[:300]

        actors = [Echo.remote() for _ in range(12)]
        procs = [psutil.Process(p) for p in ray.get([a.pid.remote() for a in actors])]
        me = psutil.Process()
        request = b"x" * 600

        def cpu(ps: list) -> float:
            return sum(sum(p.cpu_times()[:2]) for p in ps)

        def run(groups: list[list]) -> tuple[float, float, float]:
            async def caller(group: list) -> None:
                for i in range(args.calls // 4):
                    await group[i % len(group)].step.options(name=f"step/{i}").remote(request)

            async def all_callers() -> None:
                await asyncio.gather(*(caller(g) for g in groups))

            c0, a0, t0 = cpu([me]), cpu(procs), time.perf_counter()
            asyncio.run(all_callers())
            wall = time.perf_counter() - t0
            n = args.calls // 4 * 4
            return n / wall, (cpu([me]) - c0) * 1e6 / n, (cpu(procs) - a0) * 1e6 / n

        run([actors[k:k + 1] for k in range(4)])  # warm up every process once
        run([actors[3 * k:3 * k + 3] for k in range(4)])
        ratios = []
        for _ in range(args.repeat):
            busy = run([actors[k:k + 1] for k in range(4)])
            turn = run([actors[3 * k:3 * k + 3] for k in range(4)])
            for label, (rate, caller_us, actor_us) in (("busy", busy), ("in turn", turn)):
                print(f"{label:8s} {rate:6.0f} calls/s   callers {caller_us:5.0f} us/call   "
                      f"actors {actor_us:5.0f} us/call", flush=True)
            ratios.append((turn[1] + turn[2]) / (busy[1] + busy[2]))
        print(f"Ray CPU per call (callers + actors), 12 actors in turn / 4 kept busy: median "
              f"{statistics.median(ratios):.2f}x {[round(r, 2) for r in ratios]}")
    finally:
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
