"""Shards: what each supervisor shard costs per step and per event, on a 3-node local Ray.

    python scripts/bench.py --cluster            # this part (--quick: fewer tasks)
    python scripts/bench_cluster.py --shards 1,2,3

One ``ray.cluster_utils.Cluster`` of three nodes on this machine, every node
head-eligible (the ``threadbound-supervisor`` resource), so the shards of a pool land on
different nodes. For a pool of 1, 2 and 3 shards in turn, two workloads:

* **steps**: ``--tasks`` one-agent tasks of one token each, all submitted at once, one
  client following them all: the cost of admitting, binding, running and committing a
  step, with the least streaming;
* **events**: ``--streams`` one-agent tasks each streaming ``--tokens`` tokens (one event
  per token: ``token_batch_size: 1``), all at once: the cost of one streamed event.

Measured per pool: tasks/s (steps) and events/s (events) at the client; each shard's
CPU (psutil, its process, over the workload) per step and per event it carried; the
allocator's CPU per step and the allocator calls per step (the only messages between
shards: a shard never calls another, it syncs its budget with the allocator). The nodes
share this machine's two cores, so more shards do not run faster here: what this
measures is what one shard costs, which ``docs/clusters.md`` turns into a model of N
shards on M machines.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from typing import Any

import psutil

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from local_ray import isolate  # noqa: E402

from threadbound.agents import Agent  # noqa: E402


class Streamer(Agent):
    """Yields ``inputs["tokens"]`` tokens as fast as it can (each one event at batch size 1)."""

    def step(self, ctx):
        for i in range(int(ctx.inputs.get("tokens", 1))):
            yield f"{i} "
        return {"n": int(ctx.inputs.get("tokens", 1))}


def _cpu(pid: int | None) -> float:
    if pid is None:
        return 0.0
    try:
        t = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return 0.0
    return t.user + t.system


def _shards(pool: Any) -> list[dict[str, Any]]:
    stats = pool.stats()
    return stats.get("shards") or [{**stats, "shard": 0, "pid": pool.info()["pid"]}]


def _allocator_pid(pool: Any) -> int | None:
    import ray

    from threadbound.runtime.supervisor.allocator import allocator_name

    try:
        handle = ray.get_actor(allocator_name(pool.name), namespace=pool.config.ray.namespace)
        return ray.get(handle.describe.remote(), timeout=10).get("pid")
    except Exception:
        return None


def _syncs(shards: list[dict[str, Any]]) -> int:
    """Calls from the shards to the allocator so far (syncs with news, and listens)."""
    return sum(int((s.get("allocator") or {}).get("calls", 0)) for s in shards)


def _measure(pool: Any, tasks: list[Any]) -> dict[str, Any]:
    """Run ``tasks`` (all submitted at once, one client following them all); the costs."""
    before = _shards(pool)
    pids = {int(s["shard"]): s.get("pid") for s in before}
    alloc_pid = _allocator_pid(pool) if len(before) > 1 else None
    cpu0 = {k: _cpu(p) for k, p in pids.items()}
    alloc0 = _cpu(alloc_pid)
    syncs0 = _syncs(before)

    async def main() -> dict[str, int]:
        handles = await asyncio.gather(*(pool.asubmit(t) for t in tasks))

        async def follow(h: Any) -> tuple[str, int]:
            n = 0
            async for _ in h.astream():
                n += 1
            return h.task_id, n

        return dict(await asyncio.gather(*(follow(h) for h in handles)))

    t0 = time.perf_counter()
    events = asyncio.run(main())
    wall = time.perf_counter() - t0
    cpu1 = {k: _cpu(p) for k, p in pids.items()}
    after = _shards(pool)
    per_shard_events: dict[int, int] = {}
    per_shard_tasks: dict[int, int] = {}
    from threadbound.runtime.supervisor.shard import shard_of

    for task_id, n in events.items():
        k = shard_of(task_id)
        per_shard_events[k] = per_shard_events.get(k, 0) + n
        per_shard_tasks[k] = per_shard_tasks.get(k, 0) + 1
    statuses = [t.status for t in pool.tasks()]
    return {
        "wall_s": wall, "tasks": len(tasks), "events": sum(events.values()),
        "ok": statuses.count("succeeded"),
        "shards": [{"shard": k, "pid": pids[k], "cpu_s": cpu1[k] - cpu0[k], "tasks": per_shard_tasks.get(k, 0),
                    "events": per_shard_events.get(k, 0)} for k in sorted(pids)],
        "allocator_cpu_s": _cpu(alloc_pid) - alloc0 if alloc_pid else 0.0,
        "allocator_calls": _syncs(after) - syncs0,
    }


def run(shard_counts: tuple[int, ...], n_tasks: int, n_streams: int, tokens: int) -> dict[str, Any]:
    scratch = isolate("bench-shards")
    import ray
    from ray.cluster_utils import Cluster

    from threadbound.runtime import AgentPool, RuntimeConfig, Task

    found: dict[str, Any] = {"nodes": 3, "tasks": n_tasks, "streams": n_streams, "tokens": tokens, "pools": []}
    print(f"\n[shards] a 3-node local Ray (the nodes share this machine's {psutil.cpu_count()} cores); "
          f"steps: {n_tasks} one-token tasks; events: {n_streams} tasks x {tokens} tokens, one event each",
          flush=True)
    cluster = Cluster(initialize_head=True, head_node_args=dict(
        num_cpus=2, resources={"threadbound-supervisor": 1}, include_dashboard=False))
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=2, resources={"threadbound-supervisor": 1})
        ray.init(address=cluster.address, namespace="bench-shards", logging_level="ERROR", log_to_driver=False)
        cluster.wait_for_nodes()
        for n in shard_counts:
            cfg = RuntimeConfig.from_mapping(dict(
                name=f"bench-s{n}", shards=n, max_agents=24, max_agents_per_task=1, agents_per_actor=4,
                prewarm=True, token_batch_size=1, snapshot_dir=os.path.join(scratch, "snapshots"),
                health={"enabled": False}, metrics={"port": 0}, log={"enabled": False},
                keep_finished_tasks=max(1000, 2 * (n_tasks + n_streams))))
            with AgentPool(cfg, agents={"streamer": Streamer}) as pool:
                _measure(pool, [Task(goal="warm", agents=["streamer"], inputs={"tokens": 1}) for _ in range(24)])
                steps = _measure(pool, [Task(goal=f"step {i}", agents=["streamer"], inputs={"tokens": 1})
                                        for i in range(n_tasks)])
                streams = _measure(pool, [Task(goal=f"stream {i}", agents=["streamer"], inputs={"tokens": tokens})
                                          for i in range(n_streams)])
                nodes = sorted({s.get("node") for s in _shards(pool)} - {None})
            row = _row(n, steps, streams, nodes)
            found["pools"].append(row)
            _print(row)
    finally:
        ray.shutdown()
        cluster.shutdown()
    return found


def _row(n: int, steps: dict[str, Any], streams: dict[str, Any], nodes: list[str]) -> dict[str, Any]:
    per = []
    for s_step, s_ev in zip(steps["shards"], streams["shards"]):
        per.append({
            "shard": s_step["shard"],
            "us_per_step": 1e6 * s_step["cpu_s"] / max(1, s_step["tasks"]),
            "us_per_event": 1e6 * s_ev["cpu_s"] / max(1, s_ev["events"]),
            "steps": s_step["tasks"], "events": s_ev["events"]})
    return {"shards": n, "nodes_used": len(nodes), "tasks_per_s": steps["tasks"] / steps["wall_s"],
            "events_per_s": streams["events"] / streams["wall_s"], "per_shard": per,
            "allocator_us_per_step": 1e6 * steps["allocator_cpu_s"] / steps["tasks"],
            "allocator_calls_per_step": steps["allocator_calls"] / steps["tasks"],
            "all_ok": steps["ok"] + streams["ok"] >= steps["tasks"] + streams["tasks"]}


def _print(row: dict[str, Any]) -> None:
    shards = ", ".join(f"s{p['shard']} {p['us_per_step']:.0f} us/step {p['us_per_event']:.0f} us/event"
                       for p in row["per_shard"])
    where = f" on {row['nodes_used']} node(s)" if row["nodes_used"] else ""
    print(f"  {row['shards']} shard(s){where}: {row['tasks_per_s']:.1f} tasks/s, "
          f"{row['events_per_s']:,.0f} events/s; supervisor CPU per shard: {shards}; allocator "
          f"{row['allocator_us_per_step']:.0f} us/step, {row['allocator_calls_per_step']:.2f} calls/step; "
          f"every task succeeded: {row['all_ok']}", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", default="1,2,3", help="shard counts to run, comma-separated (default 1,2,3)")
    ap.add_argument("--tasks", type=int, default=600, help="one-token tasks of the steps workload")
    ap.add_argument("--streams", type=int, default=60, help="tasks of the events workload")
    ap.add_argument("--tokens", type=int, default=200, help="tokens (events) per task of the events workload")
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    args = ap.parse_args(argv)
    try:
        counts = tuple(int(x) for x in args.shards.split(","))
    except ValueError:
        ap.error(f"--shards: a comma-separated list of whole numbers, got {args.shards!r}")
    if any(c < 1 or c > 64 for c in counts):
        ap.error("--shards: each count between 1 and 64")
    for flag in ("tasks", "streams", "tokens"):
        if getattr(args, flag) < 1:
            ap.error(f"--{flag}: must be at least 1")
    found = run(counts, args.tasks, args.streams, args.tokens)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(found, fh, indent=1)
    return 0 if all(p["all_ok"] for p in found["pools"]) else 1


if __name__ == "__main__":
    sys.exit(main())
