"""A model of what a pool of N supervisor shards on M nodes carries, from measured costs.

    python scripts/shards_model.py                        # the table of docs/clusters.md (What N shards on M nodes carry)
    python scripts/shards_model.py --bench shards.json    # with the figures of a bench run
    python scripts/bench_cluster.py --json shards.json    # (makes that file)

The inputs are per-event and per-step CPU costs measured on this machine (``bench.py
--cluster`` for the shards and the allocator, ``bench.py --capacity`` for the agents and
the client); the model multiplies them out, takes the smallest of the ceilings and names
it. It is arithmetic on measured figures, not a measurement of 100 nodes: its assumptions
are printed with it.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass

SHARDS = (1, 2, 4, 8, 16, 32)
NODES = (1, 3, 10, 30, 100)


@dataclass
class Inputs:
    """Measured costs (CPU of one core, microseconds) and the assumed node and workload.

    The defaults are this machine's figures of 2026-12-07, nothing else running:
    ``python scripts/bench.py --capacity --levels 512,1000,2000 --agents-per-actor 50``
    (1000 agents: supervisor 74 us, agents 162 us, Ray 16 us, client 41 us per event, 4,043 events/s,
    agent RSS 2,783 MB) and ``python scripts/bench.py --cluster`` (3 shards: a shard's CPU
    per step 2,200-2,750 us, the allocator's 467 us per step at 0.50 calls per step)."""

    shard_us_per_event: float = 80.0  # a shard's CPU per delivered event (capacity workload: 74-84)
    shard_us_per_step: float = 2600.0  # a shard's CPU per step (admit, bind, run, commit, release; 3 shards)
    allocator_us_per_step: float = 467.0  # the allocator's CPU per step, with shards > 1
    allocator_calls_per_step: float = 0.5  # shard -> allocator calls per step (syncs and listens)
    agents_us_per_event: float = 162.0  # agent processes' CPU per event (threaded actors, k = 50)
    ray_us_per_event: float = 16.0  # Ray's own processes (raylet, GCS, ...) per event
    client_us_per_event: float = 41.0  # one client following every task, per event
    events_per_agent_s: float = 4.0  # events a model-bound agent streaming 20 tokens/s makes (batched)
    steps_per_agent_s: float = 0.05  # ASSUMED: steps an agent ends a second (a step of ~20 s of model time)
    agent_mb: float = 2.8  # resident MB per agent at k = 50 (process memory / agents)
    node_cores: float = 2.0  # cores per node (this machine)
    node_gib: float = 24.0  # memory per node
    busy: float = 0.7  # the share of a core a process may use before delays grow


def ceilings(n: int, m: int, x: Inputs) -> dict[str, float]:
    """Agents each ceiling allows for N shards on M nodes (the smallest wins):

    * ``shards``: each shard is one process, so one core at most (``busy`` of it), and
      no more shards run at once than the nodes have cores;
    * ``CPU``: the shards, the agents, Ray's own processes and the allocator together use
      at most ``busy`` of every core of the M nodes;
    * ``memory``: the agent processes use at most 80% of the M nodes' memory;
    * ``allocator``: one actor for the whole pool (N > 1), one core at most."""
    core = x.busy * 1e6  # us of CPU a process may use a second
    shard_us = x.events_per_agent_s * x.shard_us_per_event + x.steps_per_agent_s * x.shard_us_per_step
    alloc_us = x.steps_per_agent_s * x.allocator_us_per_step if n > 1 else 0.0
    all_us = shard_us + alloc_us + x.events_per_agent_s * (x.agents_us_per_event + x.ray_us_per_event)
    out = {
        "shards": min(n, m * x.node_cores) * core / shard_us,
        "CPU": m * x.node_cores * core / all_us,
        "memory": m * x.node_gib * 1024 * 0.8 / x.agent_mb,
    }
    if n > 1:
        out["allocator"] = core / alloc_us
    return out


def client_events_s(x: Inputs) -> float:
    """Events/s one client following every task can read (a gateway is such a client)."""
    return x.busy * 1e6 / x.client_us_per_event


def table(x: Inputs) -> list[str]:
    rows = ["| shards \\ nodes | " + " | ".join(f"M={m}" for m in NODES) + " |",
            "|---|" + "---|" * len(NODES)]
    for n in SHARDS:
        cells = []
        for m in NODES:
            c = ceilings(n, m, x)
            bound = min(c, key=c.get)
            agents = c[bound]
            cells.append(f"{_round(agents):,} agents, {_round(agents * x.events_per_agent_s):,} ev/s ({bound})")
        rows.append(f"| N={n} | " + " | ".join(cells) + " |")
    return rows


def _round(v: float) -> int:
    if v >= 10_000:
        return int(round(v, -3))
    if v >= 1_000:
        return int(round(v, -2))
    return int(round(v, -1)) if v >= 100 else int(v)


def from_bench(path: str, x: Inputs) -> Inputs:
    """Take the shard and allocator costs from a ``bench_cluster.py --json`` file: the
    median over shards of the largest pool measured."""
    with open(path) as fh:
        found = json.load(fh)
    pools = found["pools"]
    many = [p for p in pools if p["shards"] > 1] or pools
    biggest = max(many, key=lambda p: p["shards"])
    per = sorted(biggest["per_shard"], key=lambda s: s["us_per_step"])
    x.shard_us_per_step = per[len(per) // 2]["us_per_step"]
    if biggest["shards"] > 1:
        x.allocator_us_per_step = biggest["allocator_us_per_step"]
        x.allocator_calls_per_step = biggest["allocator_calls_per_step"]
    return x


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bench", default=None, help="a bench_cluster.py --json file to take the shard costs from")
    args = ap.parse_args(argv)
    x = Inputs()
    if args.bench:
        try:
            x = from_bench(args.bench, x)
        except (OSError, KeyError, ValueError) as exc:
            ap.error(f"--bench: cannot read {args.bench!r} as bench_cluster.py --json output ({exc})")
    print("inputs: " + ", ".join(f"{k}={v:g}" for k, v in asdict(x).items()))
    print(f"one client (or one gateway) following every task reads at most {_round(client_events_s(x)):,} events/s")
    print("\n".join(table(x)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
