"""What a snapshot costs with 10, 100, 1000 tasks in flight, and whether it stalls streams.

    python scripts/snapshot_cost.py                 # 10, 100 and 1000 tasks
    python scripts/snapshot_cost.py --tasks 100     # just one size
    python scripts/snapshot_cost.py --soak-min 60   # then: disk use over a long run

For each size it submits that many coder/tester/reviewer tasks of scripted agents
(a few run, the rest wait in the queue, all of them in the snapshot), plus one probe
task streaming tokens without pause. It then takes snapshots and prints per snapshot:
the bytes written, the time the supervisor's event loop spent on the consistent copy
(``copy_ms``; the only part on the loop), the time of pickling + writing + pruning on
the snapshot thread (``write_ms``), and the worst gap between two event deliveries at
the probe's client during snapshots next to the worst gap outside them (the stall
a snapshot adds, as a client sees it; target: within one token interval, 50 ms).

``--soak-min`` then keeps a pool busy for a while, idle for the same time, with
snapshots every second, and prints the bytes in the snapshot location per minute:
once tasks finish, it must stay flat.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time

from local_ray import isolate  # also puts tests/ (scripted agents) on the path


def _du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path))


def measure(n: int, snapshots: str, rounds: int = 5) -> dict:
    from scripted_agents import Scripted

    from threadbound.runtime import AgentPool, RuntimeConfig, Task

    cfg = RuntimeConfig.from_mapping({"name": f"cost{n}", "max_agents": 4, "max_agents_per_task": 3,
                                      "snapshot_dir": snapshots, "snapshot_interval_s": 3600,
                                      "task_timeout_s": 3600, "step_timeout_s": 3600})
    pool = AgentPool(cfg, agents={r: Scripted for r in "abcd"})
    try:
        probe = pool.submit(Task(goal="probe", agents=["d"], priority=10,
                                 inputs={"d": {"tokens": 10 ** 7, "token_sleep_s": 0.001}}))
        arrivals: list[float] = []
        stop = threading.Event()

        def follow() -> None:
            for _ in probe.stream():
                arrivals.append(time.perf_counter())
                if stop.is_set():
                    return

        reader = threading.Thread(target=follow, daemon=True)
        reader.start()
        spec = {"tokens": 20, "token_sleep_s": 0.02, "rounds": 3}
        for i in range(n):
            pool.submit(Task(goal=f"task {i}", agents=["a", "b", "c"], inputs={"*": spec}))
        time.sleep(3)  # let the running ones build up event logs
        windows, costs = [], []
        for _ in range(rounds):
            time.sleep(0.5)
            t0 = time.perf_counter()
            costs.append(pool.snapshot())
            windows.append((t0, time.perf_counter()))
        time.sleep(0.5)
        stop.set()
        gaps_in, gaps_out = [], []
        for a, b in zip(arrivals, arrivals[1:]):
            inside = any(lo <= b <= hi + 0.05 for lo, hi in windows)
            (gaps_in if inside else gaps_out).append((b - a) * 1000)
        probe.cancel()
        return {"tasks": n, "bytes": statistics.median(c["bytes"] for c in costs),
                "copy_ms": statistics.median(c["copy_ms"] for c in costs),
                "copy_ms_max": max(c["copy_ms"] for c in costs),
                "write_ms": statistics.median(c["write_ms"] for c in costs),
                "stall_ms": max(gaps_in, default=0.0), "baseline_gap_ms": max(gaps_out, default=0.0),
                "deliveries": len(arrivals)}
    finally:
        pool.shutdown(grace_s=0)


def soak(minutes: float, snapshots: str) -> None:
    from scripted_agents import Scripted

    from threadbound.runtime import AgentPool, RuntimeConfig, Task

    cfg = RuntimeConfig.from_mapping({"name": "soak", "max_agents": 3, "snapshot_dir": snapshots,
                                      "snapshot_interval_s": 1, "keep_finished_tasks": 200})
    where = os.path.join(snapshots, "soak")
    with AgentPool(cfg, agents={r: Scripted for r in "abc"}) as pool:
        start = time.monotonic()
        busy_until = start + minutes * 30
        minute = 0
        while time.monotonic() - start < minutes * 60:
            if time.monotonic() < busy_until:
                hs = [pool.submit(Task(goal="soak", agents=["a", "b", "c"])) for _ in range(5)]
                for h in hs:
                    h.result(timeout=120)
            else:
                time.sleep(1)
            if time.monotonic() - start >= minute * 60:
                phase = "busy" if time.monotonic() < busy_until else "idle"
                print(f"soak minute {minute:>3} ({phase}): {_du(where):>10} bytes in {where}, "
                      f"{len(os.listdir(where))} files, {len(pool.tasks())} tasks remembered", flush=True)
                minute += 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default="10,100,1000")
    ap.add_argument("--soak-min", type=float, default=0)
    args = ap.parse_args()
    scratch = isolate("snapcost")
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    snapshots = os.path.join(scratch, "snapshots")
    try:
        print(f"{'tasks':>6} {'bytes':>10} {'copy_ms':>8} {'(max)':>6} {'write_ms':>9} "
              f"{'stall_ms':>9} {'no-snapshot worst gap_ms':>25}")
        for n in (int(x) for x in args.tasks.split(",")):
            r = measure(n, snapshots)
            print(f"{r['tasks']:>6} {r['bytes']:>10.0f} {r['copy_ms']:>8.2f} {r['copy_ms_max']:>6.2f} "
                  f"{r['write_ms']:>9.1f} {r['stall_ms']:>9.1f} {r['baseline_gap_ms']:>25.1f}", flush=True)
        if args.soak_min:
            soak(args.soak_min, snapshots)
    finally:
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
