"""threadbound side by side with hand-written Ray, LangGraph and a thread pool.

    python scripts/bench.py --quick            # a few minutes, smaller N
    python scripts/bench.py                    # the full run (under 15 minutes)
    python scripts/bench.py --quick --write    # also BENCHMARKS.md, bench-results/bench.json (+ .png)
    python scripts/bench.py --cluster          # supervisor shards: 1, 2, 3 shards on a 3-node local Ray
    python scripts/bench.py --capacity         # only the capacity levels (--levels, --seconds, --agents-per-actor)
    python scripts/bench.py --speed            # only the speed ratios (--repeat runs taking turns) and the journal's floor

The workload: N tasks, each code -> test -> review in sequence (an explicit
``after`` chain, the same in every system), each step one call of the same simulated
model (``--tokens`` per step, no latency: the numbers measure the runtimes;
``--cpu-ms`` adds GIL-holding work per step). Every system delivers every token to the
client that submitted the task. Same machine, same process run; results are ratios
against the baselines measured here, never absolute promises. The issue's speed ratios
(per-step cost against the Ray floor, tasks/s against LangGraph at 1 and 4 tasks at a
time) are also printed as the median of ``--repeat`` runs in which the two sides take
turns, since one run on a busy 2-core machine can be off by a third. Every timed run
starts its clock once the machine is quiet (``bench_baselines.settle``).

The warm-actor floor has the client drive the agents' actors itself. Any runtime with a
supervisor between the client and the agents (threadbound, LangGraph's server, Ray Serve)
adds a hop; the "relay actor" row measures that hop alone (an actor that runs the steps
and answers long-polls, nothing else), so threadbound's own cost is the gap above it.

Figures of threadbound alone: tasks/s with agent processes recycled every few tasks
against recycling off; a round of code, then test and review in parallel, with 200 ms
steps, against two steps' time; and capacity (``--capacity`` runs only that part;
scripts/bench_capacity.py): agents streaming 20 tokens/s each, 64 -> 2000 of them,
until the p95 delay a client sees passes 250 ms, with the CPU of one event in each
process and the memory of the agent processes.

LangGraph rows need ``pip install -e '.[bench]'``; without it they are skipped.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import textwrap
import time
from typing import Any, Callable

import bench_baselines as base
import bench_capacity
from local_ray import SCRIPTS as HERE
from local_ray import isolate

from threadbound.runtime.task import sequential

ROLES = base.ROLES
# The bench's three steps run one after another in every system (the pool's default graph
# for roles other than the built-in coder/tester/reviewer is list order too; this says so).
CHAIN = sequential(ROLES)
RELAY = "ray, one relay actor (no logic)"


class Bench:
    def __init__(self, scratch: str) -> None:
        self.snapshots = os.path.join(scratch, "snapshots")
        self.n_pools = 0
        self.rows: list[dict[str, Any]] = []

    # -- threadbound ------------------------------------------------------------------

    def pool(self, concurrency: int, tokens: int, cpu_ms: float, *, snapshots: bool = True,
             interval_s: float = 5.0, batched: bool = True, latency_ms: float = 0.0,
             roles: tuple[str, ...] = ROLES, name: str | None = None, recycle_after: int | None = None,
             agent: type | None = None, **settings_over: Any):
        """A pool for ``concurrency`` tasks of ``roles`` at a time (3 agents each); any
        other config field may be set through ``settings_over``."""
        from threadbound.runtime import AgentPool, RuntimeConfig

        self.n_pools += 1
        settings: dict[str, Any] = {
            "name": name or f"bench{self.n_pools}", "max_agents": 3 * concurrency,
            "max_agents_per_task": 3, "prewarm": True, "default_agents": list(roles),
            "model": {"backend": "simulated", "tokens": tokens, "cpu_ms": cpu_ms, "latency_ms": latency_ms},
            "snapshot_dir": self.snapshots, "snapshot_interval_s": interval_s,
            "snapshots": {"enabled": snapshots}, "step_timeout_s": 600, "task_timeout_s": 3600,
            "keep_finished_tasks": 100_000, "recycle_after": recycle_after or 1_000_000,
            "metrics": {"port": 0}, **settings_over}
        if not batched:
            settings.update(token_batch_size=1, token_interval_ms=0)
        cls = agent or base.BenchAgent
        return AgentPool(RuntimeConfig.from_mapping(settings), agents={r: cls for r in {*ROLES, *roles}})

    def run_threadbound(self, n: int, concurrency: int, tokens: int, cpu_ms: float, **kw) -> dict[str, Any]:
        """N tasks of ``roles`` one after another (code -> test -> review by default), all
        submitted at once; the pool runs ``concurrency`` of them at a time."""
        from threadbound.runtime import Task

        roles = tuple(kw.get("roles", ROLES))
        chain = sequential(roles)
        pool = self.pool(concurrency, tokens, cpu_ms, **kw)
        try:
            async def main() -> int:
                async def one(i: int) -> int:
                    h = await pool.asubmit(Task(goal=f"task {i}", agents=roles, after=chain))
                    got = 0
                    async for ev in h.astream():
                        if ev.kind == "tokens":
                            got += ev.data["n"]
                        elif ev.kind == "message":
                            got += 1
                    return got

                return sum(await asyncio.gather(*(one(i) for i in range(n))))

            base.settle()
            t0 = time.perf_counter()
            got = asyncio.run(main())
            wall = time.perf_counter() - t0
            stats = pool.stats()
            return {"wall_s": wall, "tokens": got, "replacements": stats["replacements"],
                    "recycles": stats["recycles"]}
        finally:
            pool.shutdown(grace_s=0)

    # -- recording --------------------------------------------------------------------

    def record(self, figure: str, system: str, res: dict[str, Any], n: int, concurrency: int, **extra) -> dict:
        row = {"figure": figure, "system": system, "n": n, "concurrency": concurrency,
               "tasks_per_s": n / res["wall_s"], "step_ms": res["wall_s"] * 1000 / (3 * n) * concurrency,
               "wall_s": res["wall_s"], "tokens": res["tokens"], **extra}
        self.rows.append(row)
        more = "".join(f"  {k} {v}" for k, v in extra.items())
        print(f"  {figure:<14} {system:<34} n={n:<5} c={concurrency:<3} {row['tasks_per_s']:>9.1f} tasks/s "
              f"{row['step_ms']:>8.2f} ms/step  {res['tokens']:>8} tokens{more}", flush=True)
        return row

    def systems(self, lg: bool) -> dict[str, Callable[..., dict[str, Any]]]:
        s: dict[str, Callable[..., dict[str, Any]]] = {
            "threadbound": self.run_threadbound,
            "threadbound, snapshot every step": lambda *a: self.run_threadbound(*a, interval_s=0.001),
            "ray, warm actors (floor)": base.run_ray_warm,
            "threads (no isolation)": base.run_threads,
        }
        if lg:
            s["langgraph + sqlite (sync)"] = base.run_langgraph
        return s


def resume_time(bench: Bench, tasks: int) -> dict[str, float]:
    """SIGKILL a driver with ``tasks`` unfinished tasks; time AgentPool.resume to the
    first ``resumed`` event (joining the running Ray, so Ray's own start is excluded)."""
    import ray

    from threadbound.runtime import AgentPool

    name = "bench-resume"
    code = textwrap.dedent(f"""
        import bench_baselines as base
        from threadbound.runtime import AgentPool, RuntimeConfig, Task
        from threadbound.runtime.task import sequential
        cfg = RuntimeConfig.from_mapping({{"name": {name!r}, "max_agents": 12, "max_agents_per_task": 3,
            "default_agents": list(base.ROLES), "snapshot_dir": {bench.snapshots!r},
            "model": {{"backend": "simulated", "tokens": 20, "latency_ms": 200}}}})
        pool = AgentPool(cfg, agents={{r: base.BenchAgent for r in base.ROLES}})
        for i in range({tasks}):
            pool.submit(Task(goal=f"task {{i}}", after=sequential(base.ROLES)))
        print("submitted", flush=True)
        import time; time.sleep(3600)
    """)
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert child.stdout.readline().strip() == "submitted"
        time.sleep(1.0)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    t0 = time.perf_counter()
    pool = AgentPool.resume(bench.snapshots, name=name, agents={r: base.BenchAgent for r in ROLES})
    attached = time.perf_counter() - t0
    first = pool.unfinished()[0]
    for ev in first.stream():
        if ev.kind == "resumed":
            break
    seen = time.perf_counter() - t0
    unfinished = len(pool.resumed["tasks"])
    pool.shutdown(grace_s=0)
    return {"resume_s": seen, "attach_s": attached, "unfinished": unfinished}


def first_token(bench: Bench, n: int) -> dict[str, float]:
    """Median time from submit (or call) to the first token at the client, one task at a time."""
    import ray

    from threadbound.runtime import Task

    pool = bench.pool(1, 5, 0.0, roles=("code",), name="bench-ttft")
    ours = []
    try:
        for i in range(n):
            t0 = time.perf_counter()
            h = pool.submit(Task(goal=f"task {i}", agents=["code"]))
            first = None
            for ev in h.stream():
                if ev.kind == "tokens" and first is None:
                    first = time.perf_counter() - t0
            ours.append(first)
    finally:
        pool.shutdown(grace_s=0)
    actor = base._ray_actor_class().remote(5, 0.0)
    ray.get(actor.ping.remote())
    floor = []
    for i in range(n):
        t0 = time.perf_counter()
        gen = actor.run.options(num_returns="streaming").remote(f"task {i}", "code")
        ray.get(next(gen))
        floor.append(time.perf_counter() - t0)
        for ref in gen:
            ray.get(ref)
    ray.kill(actor)
    return {"threadbound_ms": statistics.median(ours) * 1000, "ray_ms": statistics.median(floor) * 1000}


def memory(bench: Bench, n: int) -> dict[str, float]:
    import psutil

    from threadbound.runtime import Task

    pool = bench.pool(4, 50, 0.0, name="bench-memory")
    try:
        sup = psutil.Process(pool.info()["pid"])
        warm = [pool.submit(Task(goal=f"warm {i}", after=CHAIN)) for i in range(20)]
        for h in warm:
            h.result(timeout=600)
        before = sup.memory_info().rss
        handles = [pool.submit(Task(goal=f"task {i}", after=CHAIN)) for i in range(n)]
        for h in handles:
            h.result(timeout=600)
        after = sup.memory_info().rss
        slots = [psutil.Process(s["pid"]).memory_info().rss for s in pool.stats()["slots"] if s["pid"]]
        return {"agent_rss_mb": statistics.median(slots) / 2**20, "supervisor_rss_mb": after / 2**20,
                "supervisor_growth_mb": (after - before) / 2**20, "tasks": n,
                "per_task_kb": (after - before) / 1024 / n}
    finally:
        pool.shutdown(grace_s=0)


def recycling(bench: Bench, n: int, concurrency: int, tokens: int, every: int) -> None:
    """Rows: tasks/s with recycling off, then with a process replaced every ``every`` tasks."""
    for label, after in (("recycling off", None), (f"recycle_after={every}", every)):
        res = bench.run_threadbound(n, concurrency, tokens, 0.0, recycle_after=after)
        bench.record("recycling", f"threadbound, {label}", res, n, concurrency, recycled=res["recycles"])


GRAPH = {"test": ["code"], "review": ["code"]}  # code, then test and review together


def parallel_round(bench: Bench, n: int, step_ms: float = 200.0) -> dict[str, float]:
    """Medians, one task at a time, of: a one-step task; a round of code, then test and
    review in parallel; the same three as a chain. Every step waits ``step_ms`` (the
    simulated model's latency) and streams 5 tokens."""
    from threadbound.runtime import Task

    pool = bench.pool(1, 5, 0.0, latency_ms=step_ms, name="bench-graph")
    walls: dict[str, list[float]] = {"step": [], "round": [], "chain": []}
    specs = {"step": {"agents": ["code"]}, "round": {"agents": ROLES, "after": GRAPH},
             "chain": {"agents": ROLES, "after": CHAIN}}
    try:
        for i in range(n):
            for kind, spec in specs.items():
                t0 = time.perf_counter()
                pool.submit(Task(goal=f"{kind} {i}", **spec)).result(timeout=120)
                walls[kind].append(time.perf_counter() - t0)
    finally:
        pool.shutdown(grace_s=0)
    out = {f"{k}_ms": statistics.median(v) * 1000 for k, v in walls.items()}
    out["ratio"] = out["round_ms"] / (2 * out["step_ms"])
    out["chain_ratio"] = out["chain_ms"] / (2 * out["step_ms"])
    return out


def metrics_cost(bench: Bench, n: int, repeats: int) -> dict[str, float]:
    """Per-step cost at c=1 with metrics recorded and served vs not recorded at all;
    on and off runs alternate so that drift on the machine hits both alike."""
    from threadbound.runtime.metrics.server import DEFAULT_PORT, choose_port

    on, off = [], []
    for _ in range(repeats):
        # 9464 or the next free port above it (never an ephemeral one, which Ray's processes are handed)
        port, _ = choose_port(DEFAULT_PORT, "127.0.0.1", chosen=False)
        on.append(bench.run_threadbound(n, 1, 1, 0.0, metrics={"port": port})["wall_s"] / (3 * n))
        off.append(bench.run_threadbound(n, 1, 1, 0.0, metrics={"enabled": False})["wall_s"] / (3 * n))
    on_s, off_s = statistics.median(on), statistics.median(off)
    return {"on_us": on_s * 1e6, "off_us": off_s * 1e6, "ratio": on_s / off_s, "repeats": repeats,
            "hook_us": metrics_work_per_step_us()}


def metrics_work_per_step_us(n: int = 20_000) -> float:
    """What the metrics hook does for one step, timed directly (the A/B of whole runs
    above is noisier than the effect): a step's events, its end and a journal write."""
    from threadbound.agents.events import Row
    from threadbound.runtime.metrics import PoolMetrics, View
    from threadbound.runtime.supervisor.hooks import Outcome, StepInfo
    from threadbound.runtime.supervisor.metrics_hook import MetricsHook

    metrics = PoolMetrics("bench", ray_mirror=True)
    hook = MetricsHook(metrics, View, time.monotonic)

    class _Task:
        id, level = "t1", 2

    info = StepInfo("t1", "code", 1, 1, 2, True, started=time.monotonic())
    info.first_token = info.started + 0.001
    rows = [Row(0, "step_started", "code", {"slot": "agent/0"}, 0.0), Row(1, "tokens", "code", {"n": 1, "text": "x"}, 0.0),
            Row(2, "step_finished", "code", {}, 0.0), Row(3, "level", None, {"level": 2}, 0.0)]
    batch = [(_Task, row) for row in rows]  # the supervisor hands hooks a batch at a time
    t0 = time.perf_counter()
    for _ in range(n):
        hook.on_events(batch)
        hook.after_step(_Task, info, Outcome("ok"))
        metrics.journal_write(0.0001)
    return (time.perf_counter() - t0) / n * 1e6


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def headline(bench: Bench, repeats: int, lg: bool, tokens: int, n4: int, n1: int) -> dict[str, Any]:
    """The issue's three speed ratios, each the median of ``repeats`` runs in which the
    systems compared take turns (a machine that slows down for a while slows both sides
    of one ratio, not one side of all of them)."""
    pairs: dict[str, list[float]] = {"step_vs_floor": [], "relay_vs_floor": [], "plain_relay_vs_floor": [],
                                     "c4_vs_langgraph": [], "c4_k3_vs_langgraph": [], "c1_vs_langgraph": []}
    for _ in range(repeats):
        tb = bench.run_threadbound(n1, 1, 1, 0.0)
        floor = base.run_ray_warm(n1, 1, 1, 0.0)
        relay = base.run_ray_relay(n1, 1, 1, 0.0)
        plain = base.run_ray_relay(n1, 1, 1, 0.0, plain=True)
        pairs["step_vs_floor"].append(tb["wall_s"] / floor["wall_s"])  # same n: a ratio of per-step costs
        pairs["relay_vs_floor"].append(relay["wall_s"] / floor["wall_s"])
        pairs["plain_relay_vs_floor"].append(plain["wall_s"] / floor["wall_s"])
        if lg:
            a, b = bench.run_threadbound(n4, 4, tokens, 0.0), base.run_langgraph(n4, 4, tokens, 0.0)
            pairs["c4_vs_langgraph"].append(b["wall_s"] / a["wall_s"])  # same n: a ratio of tasks/s
            # For context, not a target: a task's three agents sharing one process (agents_per_actor 3),
            # against the same LangGraph run: 4 warm processes instead of 12 woken in turn.
            a3 = bench.run_threadbound(n4, 4, tokens, 0.0, agents_per_actor=3)
            pairs["c4_k3_vs_langgraph"].append(b["wall_s"] / a3["wall_s"])
            a, b = bench.run_threadbound(n1, 1, tokens, 0.0), base.run_langgraph(n1, 1, tokens, 0.0)
            pairs["c1_vs_langgraph"].append(b["wall_s"] / a["wall_s"])
    out = {k: {"median": statistics.median(v), "runs": [round(x, 3) for x in v]} for k, v in pairs.items() if v}
    out["repeats"] = repeats
    return out


def journal_floor_ms(directory: str, n: int = 200, size: int = 300) -> dict[str, float]:
    """What one committed step cannot go below on this disk: appending a journal-sized
    frame and ``fdatasync``-ing it (the journal does this before a step counts), ``n``
    times in ``directory`` (the bench's snapshot directory); median and p90 in ms."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "fsync-probe")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    times = []
    try:
        for _ in range(n):
            t0 = time.perf_counter()
            os.write(fd, b"x" * size)
            os.fdatasync(fd)
            times.append((time.perf_counter() - t0) * 1000)
    finally:
        os.close(fd)
        os.unlink(path)
    return {"median_ms": statistics.median(times), "p90_ms": _pct(times, 0.9), "n": n}


def per_step_vs_relay(hl: dict[str, Any], relay: str = "relay_vs_floor") -> list[float]:
    """The per-step target's ratio, run by run: each run's threadbound/floor over the same
    run's relay/floor (``relay``: which relay's row), empty when the headline has not both."""
    if "step_vs_floor" not in hl or relay not in hl:
        return []
    return [a / b for a, b in zip(hl["step_vs_floor"]["runs"], hl[relay]["runs"])]


def speed_lines(hl: dict[str, Any], jf: dict[str, float] | None, relay_step_ms: float | None) -> list[str]:
    """The speed ratios as the issue states them: the per-step cost against the bare relay
    (each run's threadbound/floor over the same run's relay/floor), the LangGraph ratios,
    and what the journal's fdatasync alone adds to a relay step."""
    out = []
    per = per_step_vs_relay(hl)
    if per:
        out.append(f"per-step cost at c=1, threadbound / bare relay: median {statistics.median(per):.2f}x "
                   f"{[round(x, 2) for x in per]} (target <= 1.2x)")
    per = per_step_vs_relay(hl, "plain_relay_vs_floor")
    if per:
        out.append(f"  for context, against a relay whose steps are one plain call each (as threadbound sends a "
                   f"short step): median {statistics.median(per):.2f}x {[round(x, 2) for x in per]}")
    for key, label, target in (("c4_vs_langgraph", "tasks/s at c=4 vs LangGraph + SQLite", ">= 1.0x"),
                               ("c1_vs_langgraph", "tasks/s at c=1 vs LangGraph + SQLite", ">= 0.5x")):
        if key in hl:
            out.append(f"{label}: median {hl[key]['median']:.2f}x {hl[key]['runs']} (target {target})")
    if "c4_k3_vs_langgraph" in hl:
        k3 = hl["c4_k3_vs_langgraph"]
        out.append(f"  for context, tasks/s at c=4 with agents_per_actor 3 (a task's agents in one process) vs the "
                   f"same LangGraph runs: median {k3['median']:.2f}x {k3['runs']}")
    if jf is not None:
        line = (f"journal floor: append + fdatasync of a {300}-byte frame in the snapshot directory, median "
                f"{jf['median_ms']:.2f} ms, p90 {jf['p90_ms']:.2f} ms ({jf['n']} writes)")
        if relay_step_ms:
            line += (f"; a relay step of {relay_step_ms:.2f} ms plus one such write is "
                     f"{(relay_step_ms + jf['median_ms']) / relay_step_ms:.2f}x the relay (median write)")
        out.append(line)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller N; a few minutes")
    ap.add_argument("--tokens", type=int, default=50, help="tokens per step")
    ap.add_argument("--cpu-ms", type=float, default=20.0, help="GIL-holding work per step, CPU-bound figure")
    ap.add_argument("--repeat", type=int, default=3, help="runs of the headline ratios (median printed)")
    ap.add_argument("--write", action="store_true", help="write BENCHMARKS.md and bench-results/")
    ap.add_argument("--cluster", action="store_true",
                    help="only the shards part: 1, 2 and 3 supervisor shards on a 3-node local Ray (scripts/bench_cluster.py)")
    ap.add_argument("--capacity", action="store_true",
                    help="only the capacity levels (agents streaming 20 tokens/s, one client following all)")
    ap.add_argument("--speed", action="store_true",
                    help="only the speed ratios (per-step vs the bare relay, tasks/s vs LangGraph; --repeat runs "
                         "taking turns) and the journal's fdatasync floor")
    bench_capacity.add_arguments(ap)
    args = ap.parse_args()
    bench_capacity.check_arguments(args)  # before Ray starts
    if args.cluster:
        import bench_cluster

        return bench_cluster.main(["--tasks", "200", "--streams", "20", "--tokens", "100"] if args.quick else [])
    scratch = isolate("bench")
    import ray

    t_ray = time.perf_counter()
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    ray_start_s = time.perf_counter() - t_ray
    bench = Bench(scratch)
    lg = base.langgraph_available()
    if not lg:
        print("LangGraph not installed: its rows are skipped (pip install -e '.[bench]')")
    q = args.quick
    n = 40 if q else 200
    conc = (1, 4) if q else (1, 4, 10)
    results: dict[str, Any] = {"ray_start_s": ray_start_s}
    if args.capacity:
        try:
            results["capacity"] = bench_capacity.run(args, scratch)
        finally:
            ray.shutdown()
        if args.write:  # BENCHMARKS.md is the full run's: this part alone goes to a file of its own
            bench_capacity.write_json(results["capacity"], os.path.join(HERE, "..", "bench-results"))
        return 0
    if args.speed:
        try:
            print(f"\n[headline] the speed ratios, each the median of {args.repeat} runs taking turns", flush=True)
            hl = headline(bench, args.repeat, lg, args.tokens, n, 30 if q else 100)
            relay = base.run_ray_relay(30, 1, 1, 0.0)
            jf = journal_floor_ms(bench.snapshots)
            for line in speed_lines(hl, jf, relay["wall_s"] * 1000 / (3 * 30)):
                print("  " + line, flush=True)
        finally:
            ray.shutdown()
        return 0
    try:
        print(f"\n[throughput] {args.tokens} tokens per step, no CPU work")
        for c in conc:
            for system, run in bench.systems(lg).items():
                if system.startswith("threadbound, snapshot") and c != 4:
                    continue
                bench.record("throughput", system, run(n // (2 if c == 1 else 1), c, args.tokens, 0.0),
                             n // (2 if c == 1 else 1), c)
            if c == 4:
                bench.record("throughput", "ray, fresh actors per task", base.run_ray_fresh(8, c, args.tokens, 0.0), 8, c)

        print(f"\n[cpu-bound] {args.tokens} tokens and {args.cpu_ms:g} ms of GIL-holding work per step, c=4")
        nc = 20 if q else 60
        for system, run in bench.systems(lg).items():
            if "snapshot every step" in system:
                continue
            bench.record("cpu-bound", system, run(nc, 4, args.tokens, args.cpu_ms), nc, 4)

        print("\n[overhead] 1 token per step, c=1: per-step cost of each runtime")
        no = 30 if q else 100
        bench.record("overhead", "threadbound", bench.run_threadbound(no, 1, 1, 0.0), no, 1)
        bench.record("overhead", "threadbound, no snapshots/journal",
                     bench.run_threadbound(no, 1, 1, 0.0, snapshots=False), no, 1)
        bench.record("overhead", "ray, warm actors (floor)", base.run_ray_warm(no, 1, 1, 0.0), no, 1)
        bench.record("overhead", RELAY, base.run_ray_relay(no, 1, 1, 0.0), no, 1)
        if lg:
            bench.record("overhead", "langgraph + sqlite (sync)", base.run_langgraph(no, 1, 1, 0.0), no, 1)
            bench.record("overhead", "langgraph, no checkpointer",
                         base.run_langgraph(no, 1, 1, 0.0, durable=False), no, 1)

        print(f"\n[headline] the speed ratios, each the median of {args.repeat} runs taking turns")
        results["headline"] = hl = headline(bench, args.repeat, lg, args.tokens, n, no)
        for key, label in (("step_vs_floor", "per-step cost at c=1 vs the warm-actor Ray floor"),
                           ("relay_vs_floor", "per-step cost at c=1 of a bare relay actor vs the same floor"),
                           ("c4_vs_langgraph", "tasks/s at c=4 vs LangGraph + SQLite"),
                           ("c4_k3_vs_langgraph", "tasks/s at c=4 with agents_per_actor 3 vs LangGraph + SQLite"),
                           ("c1_vs_langgraph", "tasks/s at c=1 vs LangGraph + SQLite")):
            if key in hl:
                print(f"  {label}: {hl[key]['median']:.2f}x (runs {hl[key]['runs']})")
        results["journal_floor"] = jf = journal_floor_ms(bench.snapshots)
        relay = _get(bench.rows, "overhead", RELAY)
        for line in speed_lines(hl, jf, relay["step_ms"] if relay else None):
            print("  " + line)

        print("\n[metrics] per-step cost at c=1 with metrics (and their endpoint) on vs off, runs interleaved")
        results["metrics_cost"] = mc = metrics_cost(bench, no, 3 if q else 5)
        print(f"  on {mc['on_us']:.0f} us/step, off {mc['off_us']:.0f} us/step: {mc['ratio']:.3f}x; the metrics' "
              f"own work per step {mc['hook_us']:.1f} us")

        print("\n[queued] c=4, all tasks submitted at once")
        for nq in ((10, 100) if q else (10, 100, 1000)):
            bench.record("queued", "threadbound", bench.run_threadbound(nq, 4, args.tokens, 0.0), nq, 4)
            bench.record("queued", "ray, warm actors (floor)", base.run_ray_warm(nq, 4, args.tokens, 0.0), nq, 4)

        every = 10 if q else 20
        print(f"\n[recycling] c=4, {args.tokens} tokens per step: agent processes replaced every {every} tasks "
              "vs never")
        recycling(bench, 60 if q else 200, 4, args.tokens, every)

        print("\n[graph] one task at a time, every step 200 ms: code, then test and review in parallel")
        results["graph"] = g = parallel_round(bench, 3 if q else 10)
        print(f"  one step {g['step_ms']:.0f} ms; round (code, then test + review) {g['round_ms']:.0f} ms "
              f"= {g['ratio']:.2f}x two steps; the same three in a chain {g['chain_ms']:.0f} ms "
              f"= {g['chain_ratio']:.2f}x")

        if q and args.levels is None:
            args.levels = (16, 64)
        if q and args.seconds is None:
            args.seconds = 5.0
        results["capacity"] = bench_capacity.run(args, scratch)

        print("\n[tokens] one step streaming many tokens to one client")
        nt = 20_000 if q else 100_000
        for label, kw in (("batched", {}), ("unbatched", {"batched": False})):
            nt_ = nt if label == "batched" else nt // 10
            res = bench.run_threadbound(1, 1, nt_, 0.0, roles=("code",), **kw)
            results[f"tokens_per_s_{label}"] = nt_ / res["wall_s"]
            print(f"  threadbound {label:<10} {nt_ / res['wall_s']:>12,.0f} tokens/s")
        res = base.run_ray_warm(1, 1, nt // 10, 0.0)
        results["tokens_per_s_ray_object_per_token"] = (nt // 10) * 3 / res["wall_s"]
        print(f"  ray, one object per token {results['tokens_per_s_ray_object_per_token']:>12,.0f} tokens/s")

        results["first_token"] = first_token(bench, 10 if q else 30)
        ft = results["first_token"]
        print(f"  time to first token: threadbound {ft['threadbound_ms']:.1f} ms from submit, "
              f"ray {ft['ray_ms']:.1f} ms from the call: {ft['threadbound_ms'] - ft['ray_ms']:+.1f} ms added")

        print("\n[snapshots] cost with tasks in flight (scripts/snapshot_cost.py)")
        import snapshot_cost

        results["snapshots"] = []
        for ns in ((10, 100) if q else (10, 100, 1000)):
            r = snapshot_cost.measure(ns, bench.snapshots, rounds=3 if q else 5)
            results["snapshots"].append(r)
            print(f"  {ns:>5} tasks: {r['bytes']:>9.0f} bytes, {r['copy_ms']:.2f} ms on the loop, "
                  f"{r['write_ms']:.1f} ms on the snapshot thread, worst delivery gap during snapshots "
                  f"{r['stall_ms']:.1f} ms")

        print("\n[resume] SIGKILL a driver with 100 tasks in the pool, then AgentPool.resume")
        results["resume"] = resume_time(bench, 100)
        r = results["resume"]
        print(f"  first resumed event {r['resume_s']:.2f}s after AgentPool.resume() was called "
              f"({r['unfinished']} unfinished tasks; Ray start-up on this machine: {ray_start_s:.1f}s)")

        print("\n[memory]")
        results["memory"] = memory(bench, 200 if q else 1000)
        m = results["memory"]
        print(f"  agent actor RSS {m['agent_rss_mb']:.0f} MB; supervisor {m['supervisor_rss_mb']:.0f} MB, "
              f"+{m['supervisor_growth_mb']:.1f} MB over {m['tasks']} tasks ({m['per_task_kb']:.1f} KB/task, "
              "event logs kept: keep_finished_tasks)")
    finally:
        ray.shutdown()

    # The gateway's figures need a Ray and a gateway process of their own: a child run.
    print("\n[gateway] SSE and WebSocket against the in-process client (scripts/bench_gateway.py)", flush=True)
    subprocess.run([sys.executable, os.path.join(HERE, "bench_gateway.py"), *(["--quick"] if q else [])],
                   check=False, timeout=900)

    lines = ratios(bench.rows, results)
    print("\n[ratios]")
    for line in lines:
        print("  " + line)
    if args.write:
        write(bench.rows, results, lines, " ".join(["python", "scripts/bench.py", *sys.argv[1:]]))
    return 0


def _get(rows: list[dict], figure: str, system: str, c: int | None = None, n: int | None = None) -> dict | None:
    for r in rows:
        if r["figure"] == figure and r["system"] == system and (c is None or r["concurrency"] == c) \
                and (n is None or r["n"] == n):
            return r
    return None


def ratios(rows: list[dict], results: dict[str, Any]) -> list[str]:
    out = []
    hl = results.get("headline")
    if hl:
        per = per_step_vs_relay(hl)  # the per-step target: see run_ray_relay
        if per:
            out.append(f"per-step cost at c=1, threadbound / a bare relay actor (no logic, no durability), each "
                       f"run against its own relay: median {statistics.median(per):.2f}x of {hl['repeats']} runs "
                       f"taking turns {[round(x, 2) for x in per]} (target <= 1.2x)")
        targets = {"c4_vs_langgraph": ("token-streaming tasks/s at c=4, threadbound / langgraph+sqlite", ">= 1x"),
                   "c1_vs_langgraph": ("token-streaming tasks/s at c=1, threadbound / langgraph+sqlite", ">= 0.5x")}
        for key, (label, target) in targets.items():
            if key in hl:
                out.append(f"{label}: median {hl[key]['median']:.2f}x of {hl['repeats']} runs taking turns "
                           f"{hl[key]['runs']} (target {target})")
        if "c4_k3_vs_langgraph" in hl:
            k3 = hl["c4_k3_vs_langgraph"]
            out.append(f"for context, token-streaming tasks/s at c=4 with agents_per_actor 3 (a task's agents in one "
                       f"process), threadbound / the same langgraph+sqlite runs: median {k3['median']:.2f}x "
                       f"{k3['runs']}")
        for key, label in (("step_vs_floor", "threadbound"),
                           ("relay_vs_floor", "a bare relay actor (the least any design with a supervisor "
                                              "between client and agents costs here)")):
            if key in hl:
                out.append(f"for context, per-step cost at c=1 of {label} / the warm-actor Ray floor: "
                           f"median {hl[key]['median']:.2f}x {hl[key]['runs']}")
    tb, floor = _get(rows, "overhead", "threadbound"), _get(rows, "overhead", "ray, warm actors (floor)")
    # The three ratios with targets are given once: as the headline's medians when it ran.
    if tb and floor and not hl:
        out.append(f"per-step cost at c=1: threadbound {tb['step_ms'] * 1000:.0f} us vs ray floor "
                   f"{floor['step_ms'] * 1000:.0f} us = {tb['step_ms'] / floor['step_ms']:.2f}x (target <= 1.3x)")
    mc = results.get("metrics_cost")
    if mc:
        out.append(f"per-step cost with metrics on vs off (c=1, median of {mc['repeats']} interleaved runs): "
                   f"{mc['on_us']:.0f} us vs {mc['off_us']:.0f} us = {mc['ratio']:.3f}x (target <= 1.05x); "
                   f"the metrics' own work per step, timed directly: {mc['hook_us']:.1f} us = "
                   f"{mc['hook_us'] / mc['off_us'] * 100:.2f}% of a step")
    off = _get(rows, "overhead", "threadbound, no snapshots/journal")
    lgs, lgn = _get(rows, "overhead", "langgraph + sqlite (sync)"), _get(rows, "overhead", "langgraph, no checkpointer")
    if tb and off:
        line = f"durable cost per committed step: threadbound {tb['step_ms'] - off['step_ms']:+.2f} ms"
        if lgs and lgn:
            line += (f", langgraph+sqlite sync {lgs['step_ms'] - lgn['step_ms']:+.2f} ms "
                     f"(target: threadbound <= langgraph)")
        out.append(line)
    a, b = _get(rows, "throughput", "threadbound", 4), _get(rows, "throughput", "langgraph + sqlite (sync)", 4)
    f = _get(rows, "throughput", "ray, warm actors (floor)", 4)
    if a and b and not hl:
        out.append(f"token-streaming tasks/s at c=4: threadbound {a['tasks_per_s']:.1f} vs langgraph "
                   f"{b['tasks_per_s']:.1f} = {a['tasks_per_s'] / b['tasks_per_s']:.2f}x (target >= 1x)")
    if a and f:
        out.append(f"tasks/s at c=4 vs hand-written ray (one object per token): "
                   f"{a['tasks_per_s'] / f['tasks_per_s']:.2f}x")
    a, b = _get(rows, "throughput", "threadbound", 1), _get(rows, "throughput", "langgraph + sqlite (sync)", 1)
    if a and b and not hl:
        out.append(f"token-streaming tasks/s at c=1: threadbound {a['tasks_per_s']:.1f} vs langgraph "
                   f"{b['tasks_per_s']:.1f} = {a['tasks_per_s'] / b['tasks_per_s']:.2f}x (target >= 0.5x)")
    off = [r for r in rows if r["figure"] == "recycling" and r["system"].endswith("recycling off")]
    on = [r for r in rows if r["figure"] == "recycling" and "recycle_after=" in r["system"]]
    if off and on:
        a, b = on[0], off[0]
        out.append(f"tasks/s at c=4 with {a['system'].split(', ')[1]}: {a['tasks_per_s']:.1f} vs recycling off "
                   f"{b['tasks_per_s']:.1f} = {a['tasks_per_s'] / b['tasks_per_s']:.2f}x "
                   f"({a['recycled']} recycles begun during the run)")
    if "graph" in results:
        g = results["graph"]
        out.append(f"round of code, then test + review in parallel, 200 ms steps: {g['round_ms']:.0f} ms = "
                   f"{g['ratio']:.2f}x two steps ({g['step_ms']:.0f} ms each; target <= 1.15x); as a chain "
                   f"{g['chain_ratio']:.2f}x")
    for cap in results.get("capacity", {}).get("series", ()):
        out.extend(bench_capacity.ratio_lines(cap))
    a, b = _get(rows, "cpu-bound", "threadbound"), _get(rows, "cpu-bound", "langgraph + sqlite (sync)")
    if a and b:
        out.append(f"cpu-bound tasks/s at c=4: threadbound {a['tasks_per_s']:.1f} vs langgraph "
                   f"{b['tasks_per_s']:.1f} = {a['tasks_per_s'] / b['tasks_per_s']:.2f}x (target >= 1.8x on 2 cores)")
    if "tokens_per_s_batched" in results:
        out.append(f"tokens/s to one client, batched: {results['tokens_per_s_batched']:,.0f} (target >= 50,000); "
                   f"unbatched {results['tokens_per_s_unbatched']:,.0f}")
    if "first_token" in results:
        ft = results["first_token"]
        out.append(f"time to first token added by threadbound: {ft['threadbound_ms'] - ft['ray_ms']:+.1f} ms "
                   f"({ft['threadbound_ms']:.1f} ms from submit vs {ft['ray_ms']:.1f} ms for a bare Ray call)")
    for s in results.get("snapshots", []):
        if s["tasks"] == 100:
            out.append(f"snapshot of 100 tasks: {s['copy_ms'] + s['write_ms']:.1f} ms in all, {s['copy_ms']:.2f} ms "
                       f"on the event loop (target <= 50 ms); worst event-delivery gap during snapshots "
                       f"{s['stall_ms']:.0f} ms (token interval 50 ms)")
    if "memory" in results:
        m = results["memory"]
        out.append(f"memory: {m['agent_rss_mb']:.0f} MB RSS per agent actor; supervisor +{m['supervisor_growth_mb']:.1f} MB "
                   f"over {m['tasks']} tasks ({m['per_task_kb']:.0f} KB per finished task it remembers)")
    if "resume" in results:
        r = results["resume"]
        out.append(f"resume after SIGKILL: {r['resume_s']:.2f}s to the first resumed event, Ray start-up "
                   f"{results['ray_start_s']:.1f}s (target: <= Ray start-up + 2 s)")
    return out


def write(rows: list[dict], results: dict[str, Any], lines: list[str], command: str) -> None:
    root = os.path.join(HERE, "..")
    out_dir = os.path.join(root, "bench-results")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "bench.json"), "w") as fh:
        json.dump({"rows": rows, "results": results, "ratios": lines}, fh, indent=1, default=str)
    import psutil

    machine = (f"{psutil.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB, "
               f"{platform.system()} {platform.machine()}, Python {platform.python_version()}")
    try:
        import ray

        machine += f", Ray {ray.__version__}"
        from importlib.metadata import version

        machine += f", LangGraph {version('langgraph')}"
    except Exception:
        pass
    md = ["# Benchmarks\n", f"Generated by `{command}` on {time.strftime('%Y-%m-%d')} ({machine}).",
          "Regenerate with the same command; do not edit by hand. On this 2-core machine, runs differ by",
          "up to about 30% from one another: compare the ratios, not the absolute figures.\n",
          "| figure | system | tasks | concurrency | tasks/s | ms per step |", "|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['figure']} | {r['system']} | {r['n']} | {r['concurrency']} | {r['tasks_per_s']:.1f} "
                  f"| {r['step_ms']:.2f} |")
    md += ["", "Ratios and targets:", ""] + [f"- {line}" for line in lines]
    if results.get("capacity"):
        md += [""] + bench_capacity.markdown(results["capacity"])
    with open(os.path.join(root, "BENCHMARKS.md"), "w") as fh:
        fh.write("\n".join(md) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        for system in sorted({r["system"] for r in rows if r["figure"] == "throughput"}):
            pts = sorted((r["concurrency"], r["tasks_per_s"]) for r in rows
                         if r["figure"] == "throughput" and r["system"] == system)
            if len(pts) > 1:
                ax.plot(*zip(*pts), marker="o", label=system)
        ax.set_xlabel("tasks at a time")
        ax.set_ylabel("tasks/s")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "scaling.png"), dpi=110)
    except ImportError:
        pass
    print(f"\nwrote BENCHMARKS.md and {out_dir}/bench.json")


if __name__ == "__main__":
    sys.exit(main())
