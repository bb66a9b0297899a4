"""What an agent process costs while it does nothing.

A pool keeps its agent actors warm between steps: ``ceil(max_agents / agents_per_actor)``
Ray worker processes. This script starts ``--actors`` idle threaded actors (as a pool's
agent actors are: 1 + 4 threads with ``agents_per_actor: 1``), lets them settle, and then
reads, for ``--seconds``, how often each of their threads woke up (voluntary context
switches, from ``/proc/<pid>/task/*/status``) and the CPU they used. Nothing of
threadbound runs in them: this is Ray's own floor.

    python scripts/idle_cost.py [--actors 20] [--seconds 10] [--restarts 5]

It prints the threads that woke, per process (wake-ups/s and CPU ms/s), the CPU of all
the actors together in % of one core, and what that is per event at the capacity
workload's 1,000 agents (``--events-per-s``, 4,000 as ``scripts/bench.py --capacity``
measures them; 1,000 agents at ``agents_per_actor: 50`` are 20 processes).

Then what giving an idle process back costs: a pool of one agent with
``idle_actor_ttl_s: 1s`` runs a one-step task on its warm actor, waits until the
actor has been stopped, and runs one again (``--restarts`` pairs); it prints both
tasks' time from submit to result.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import Counter

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from local_ray import isolate  # noqa: E402


def thread_counts(pids: list[int]) -> tuple[Counter, Counter]:
    """Voluntary context switches and CPU seconds of every thread of ``pids``, summed by
    thread name (a thread that ended meanwhile drops out)."""
    hz = os.sysconf("SC_CLK_TCK")
    wakes: Counter = Counter()
    cpu: Counter = Counter()
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/status") as f:
                    status = f.read()
                with open(f"/proc/{pid}/task/{tid}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
            name = fields.get("Name", "?").strip()
            wakes[name] += int(fields.get("voluntary_ctxt_switches", "0"))
            after = stat[stat.rindex(")") + 2:].split()  # utime, stime: fields 14 and 15 of stat
            cpu[name] += (int(after[11]) + int(after[12])) / hz
    return wakes, cpu


def restart_cost(scratch: str, pairs: int) -> tuple[list[float], list[float]]:
    """Milliseconds from submit to result of a one-step task on a warm actor, and of one
    whose actor ``idle_actor_ttl_s`` had stopped, ``pairs`` of each taking turns."""
    import bench_baselines as base

    from threadbound.runtime import AgentPool, RuntimeConfig, Task

    pool = AgentPool(RuntimeConfig.from_mapping({
        "name": "idle-cost", "max_agents": 1, "max_agents_per_task": 1, "prewarm": True, "default_agents": ["code"],
        "idle_actor_ttl_s": "1s", "health": {"check_interval_s": 0.1}, "metrics": {"port": 0},
        "model": {"backend": "simulated", "tokens": 5}, "snapshot_dir": os.path.join(scratch, "snapshots")}),
        agents={"code": base.BenchAgent})

    def one() -> float:
        t0 = time.perf_counter()
        pool.submit(Task(goal="one step", agents=["code"])).result(timeout=120)
        return (time.perf_counter() - t0) * 1000

    warm, cold = [], []
    try:
        for _ in range(pairs):
            warm.append(one())  # its actor served the task before: warm
            deadline = time.monotonic() + 60
            while pool.stats()["actors"]["alive"]:
                if time.monotonic() > deadline:
                    raise RuntimeError("the idle actor was not stopped within 60 s")
                time.sleep(0.05)
            cold.append(one())  # a process starts first
    finally:
        pool.shutdown()
    return warm, cold


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--actors", type=int, default=20, help="idle actors to start (default 20)")
    ap.add_argument("--seconds", type=float, default=10.0, help="how long to watch them (default 10)")
    ap.add_argument("--events-per-s", type=float, default=4000.0,
                    help="events/s to spread their CPU over (default 4000, 1,000 agents at capacity)")
    ap.add_argument("--restarts", type=int, default=5,
                    help="pairs of tasks, warm and after a stop (default 5; 0: none)")
    args = ap.parse_args(argv)
    if (not 1 <= args.actors <= 500 or not 0 < args.seconds <= 600 or not args.events_per_s > 0
            or not 0 <= args.restarts <= 100):
        ap.error("--actors must be between 1 and 500, --seconds between 0 and 600, --events-per-s above 0, "
                 "--restarts between 0 and 100")
    if not os.path.isdir("/proc/self/task"):
        ap.error("this script reads /proc/<pid>/task: it runs on Linux only")
    scratch = isolate("idle-cost")
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        @ray.remote(num_cpus=0, max_concurrency=5)  # a threaded actor, as a pool's agent actor is
        class Idle:
            def pid(self) -> int:
                return os.getpid()

        actors = [Idle.remote() for _ in range(args.actors)]
        pids = ray.get([a.pid.remote() for a in actors])
        time.sleep(2.0)  # past start-up
        w0, c0 = thread_counts(pids)
        time.sleep(args.seconds)
        w1, c1 = thread_counts(pids)
        n, s = len(pids), args.seconds
        print(f"{n} idle threaded actors watched for {s:g} s; per process:")
        rows = sorted(w1, key=lambda k: -(w1[k] - w0.get(k, 0)))
        for name in rows:
            wakes = (w1[name] - w0.get(name, 0)) / n / s
            if wakes >= 0.5:
                print(f"  thread {name:<16} {wakes:7.1f} wake-ups/s  {(c1[name] - c0.get(name, 0)) * 1000 / n / s:6.2f}"
                      " ms CPU/s")
        total = sum(c1.values()) - sum(c0.values())
        share = total / s * 100
        print(f"all {n}: {share:.1f}% of a core ({share / n:.2f}% each), "
              f"{total / s / args.events_per_s * 1e6:.0f} us per event at {args.events_per_s:g} events/s")
        for a in actors:
            ray.kill(a)
        if args.restarts:
            warm, cold = restart_cost(scratch, args.restarts)
            print(f"a one-step task, submit to result: on a warm actor median {statistics.median(warm):.0f} ms "
                  f"{[round(x) for x in warm]}; after idle_actor_ttl_s stopped its actor median "
                  f"{statistics.median(cold):.0f} ms {[round(x) for x in cold]}")
    finally:
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
