"""Capacity: how many streaming agents one pool carries, and what one event costs.

    python scripts/bench.py --capacity                      # this part only (also in the full run)
    python scripts/bench_capacity.py --levels 64,128 --seconds 5
    python scripts/bench_capacity.py --agents-per-actor 50  # needs a threadbound with agents_per_actor

The workload: one-agent tasks whose agent yields a token every 50 ms (20 tokens/s) for
``--seconds`` (10 by default), with the pool's default token batching; all tasks of a
level are submitted at once and one client follows every one of them (``astream`` on
one event loop: the client's single ``read_many`` long-poll). Levels step up 64 -> 128
-> 256 -> 512 -> 1000 -> 2000 agents until the client delay (arrival at the client minus
the event's stamp, taken by the supervisor when it appended the event) passes
``--limit-ms`` (250) at p95. Each level is a pool of its own with ``max_agents`` = the
level and ``max_agents_per_task`` 1, its agent processes started before the clock runs.

Printed per level: client delay p50/p95; events/s and tokens/s delivered; CPU of the
supervisor, the client (this process), the agent processes and Ray's own processes
(% of one core, read with psutil over the window in which every agent streams); CPU
per delivered event for the supervisor and for all of them together (us/event); the
resident memory of all agent processes; and the checks: every task succeeded, every
agent's tokens arrived once each and in order, every task's offsets without a gap or
a repeat.

With ``agents_per_actor`` (a config field of newer pools: several agents per agent
process, each on a thread) the levels run at k = ``--agents-per-actor`` and again at
k = 1 "as far as memory allows" (stopping when the agent processes would need more
than ``--memory-gib``), side by side. Where the field does not exist, only k = 1 runs
and asking for k > 1 is an error.

Each level at k > 1 is followed by the same level on the bare Ray plane
(``scripts/capacity_floor.py``: the same agents, k to a process, one Ray call per flush,
nothing of threadbound), and the pool's CPU per event is printed as a multiple of the
bare plane's: the absolute figures move with this machine's speed (by up to 2x within
minutes), the ratio to a floor measured a few seconds apart much less.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import sys
import time
from typing import Any

from threadbound.agents import Agent

LEVELS = (64, 128, 256, 512, 1000, 2000)
RATE = 20.0  # tokens per second per agent
LIMIT_MS = 250.0  # p95 client delay a level may reach
MEMORY_GIB = 20.0  # agent processes of one level may take at most this much (projected)
DEFAULT_K = 50  # agents per actor when the field exists and --agents-per-actor is not given
LAGGING_MS = 1000.0  # agent stamp p50 beyond which a level says the agents fell behind
AGENT_MB_GUESS = 110.0  # resident MB of one agent process before one has been measured


class StreamingAgent(Agent):
    """Yields ``inputs["tokens"]`` tokens, one every ``inputs["interval_s"]`` on a fixed
    schedule (a late token does not delay the rest); each token is ``<index>:<wall time> ``
    so the client can check order, gaps and repeats and read the agent's own stamp."""

    def step(self, ctx):
        n, interval = int(ctx.inputs["tokens"]), float(ctx.inputs["interval_s"])
        start = time.monotonic()
        for i in range(n):
            wait = start + i * interval - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            yield f"{i}:{time.time():.4f} "
        return n


def has_agents_per_actor() -> bool:
    """Whether this threadbound's RuntimeConfig has the ``agents_per_actor`` field."""
    from threadbound.runtime import RuntimeConfig

    return "agents_per_actor" in RuntimeConfig.model_fields


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def _cpu(procs: dict[int, Any]) -> dict[int, float]:
    """user + system CPU seconds of each process still alive."""
    out = {}
    for pid, p in procs.items():
        try:
            t = p.cpu_times()
            out[pid] = t.user + t.system
        except Exception:  # gone (a recycled or killed process): its CPU is not counted
            pass
    return out


def _rss(procs: dict[int, Any]) -> int:
    """Resident bytes of the processes still alive."""
    total = 0
    for p in procs.values():
        try:
            total += p.memory_info().rss
        except Exception:  # gone: not counted
            pass
    return total


def _ray_processes(exclude: set[int]) -> dict[int, Any]:
    """Ray's own processes (GCS, raylet, dashboard, idle workers, ...): the descendants
    of this process when it started the local Ray, less the pool's. Empty when this
    process joined a Ray someone else started."""
    import psutil

    out = {}
    for p in psutil.Process().children(recursive=True):
        if p.pid not in exclude:
            out[p.pid] = p
    return out


def _agent_pids(stats: dict[str, Any]) -> set[int]:
    pids = {s["pid"] for s in stats.get("slots", ()) if s.get("pid")}
    for a in stats.get("actors", ()) or ():  # pools with several agents per actor may list actors apart
        if isinstance(a, dict) and a.get("pid"):
            pids.add(a["pid"])
    return pids


def make_pool(scratch: str, n: int, k: int | None, *, name: str, seconds: float, **over: Any):
    from threadbound.runtime import AgentPool, RuntimeConfig

    settings: dict[str, Any] = {
        "name": name, "max_agents": n, "max_agents_per_task": 1, "prewarm": True,
        "default_agents": ["stream"], "snapshot_dir": os.path.join(scratch, "snapshots"),
        "step_timeout_s": max(600.0, seconds * 20), "task_timeout_s": max(3600.0, seconds * 40),
        "keep_finished_tasks": 100_000, "metrics": {"port": 0}, **over}
    if k is not None:  # a level smaller than k fits one actor (agents_per_actor may not exceed max_agents)
        settings["agents_per_actor"] = min(k, n)
    return AgentPool(RuntimeConfig.from_mapping(settings), agents={"stream": StreamingAgent})


def run_level(scratch: str, n: int, *, seconds: float, rate: float = RATE, k: int | None = None,
              name: str | None = None, profile: Any = None, **over: Any) -> dict[str, Any]:
    """One level: ``n`` one-agent tasks streaming ``rate`` tokens/s for ``seconds``, all
    followed by this process; the row of figures and checks (see the module docstring).
    ``profile(supervisor_pid)``, if given, is called once every agent streams (e.g. to
    start py-spy on the supervisor)."""
    import psutil

    from threadbound.runtime import Task

    tokens = max(1, int(round(rate * seconds)))
    t_setup = time.perf_counter()
    pool = make_pool(scratch, n, k, name=name or f"capacity-{n}-k{k or 1}", seconds=seconds, **over)
    try:
        setup_s = time.perf_counter() - t_setup
        sup_pid = pool.info()["pid"]
        agents = _agent_pids(pool.stats())
        me = psutil.Process()
        procs: dict[str, dict[int, Any]] = {
            "supervisor": {sup_pid: psutil.Process(sup_pid)}, "client": {me.pid: me},
            "agents": {pid: psutil.Process(pid) for pid in agents}}
        procs["ray"] = _ray_processes({sup_pid, me.pid, *agents})
        first: dict[int, float] = {}  # task index -> arrival of its first token
        ended: list[float] = []
        marks: dict[str, Any] = {}

        async def main() -> list[dict[str, Any]]:
            all_streaming = asyncio.Event()
            one_ended = asyncio.Event()

            async def one(i: int) -> dict[str, Any]:
                h = await pool.asubmit(Task(goal=f"stream {i}", agents=["stream"],
                                            inputs={"tokens": tokens, "interval_s": 1.0 / rate}))
                seen: list[tuple[float, float, float, int]] = []  # (stamp, arrival, agent's stamp, n)
                offsets: list[int] = []
                order: list[int] = []
                status = None
                async for ev in h.astream():
                    now = time.time()
                    offsets.append(ev.offset)
                    if ev.kind == "tokens":
                        parts = ev.data["text"].split()
                        order.extend(int(p.split(":", 1)[0]) for p in parts)
                        seen.append((ev.ts, now, float(parts[-1].split(":", 1)[1]), ev.data["n"]))
                        if i not in first:
                            first[i] = now
                            if len(first) == n:
                                all_streaming.set()
                    elif ev.terminal:
                        status = ev.kind
                ended.append(time.time())
                one_ended.set()
                return {"seen": seen, "offsets": offsets, "order": order, "status": status}

            async def sampler() -> None:
                # The window: from when every agent has streamed a token to when the first
                # one ends (all stream at once in it); CPU is read at both ends.
                done = asyncio.ensure_future(one_ended.wait())
                streaming = asyncio.ensure_future(all_streaming.wait())
                await asyncio.wait([done, streaming], return_when=asyncio.FIRST_COMPLETED)
                if streaming.done() and not done.done():
                    marks["a"] = (time.time(), {k_: _cpu(p) for k_, p in procs.items()})
                    if profile is not None:
                        profile(sup_pid)
                    await done
                    marks["b"] = (time.time(), {k_: _cpu(p) for k_, p in procs.items()})
                streaming.cancel()
                done.cancel()

            marks["start"] = (time.time(), {k_: _cpu(p) for k_, p in procs.items()})
            watch = asyncio.ensure_future(sampler())
            out = await asyncio.gather(*(one(i) for i in range(n)))
            await watch
            marks["end"] = (time.time(), {k_: _cpu(p) for k_, p in procs.items()})
            return out

        reads0 = pool.stats()["reads"]
        got = asyncio.run(main())
        reads = pool.stats()["reads"] - reads0  # long-polls the client made for all its tasks
        rss_agents = _rss(procs["agents"])
    finally:
        pool.shutdown(grace_s=0)

    return summarize(n, k or 1, seconds=seconds, rate=rate, tokens=tokens, setup_s=setup_s, procs=procs,
                     marks=marks, got=got, rss_agents=rss_agents, reads=reads)


def summarize(n: int, k: int, *, seconds: float, rate: float, tokens: int, setup_s: float,
              procs: dict[str, dict[int, Any]], marks: dict[str, Any], got: list[dict[str, Any]],
              rss_agents: int, reads: int) -> dict[str, Any]:
    """A level's row from what it recorded: CPU read at ``marks`` ("a"/"b": the window in
    which every agent streamed; "start"/"end": the whole run) for each part of ``procs``,
    and per task what its client saw (``seen``: (stamp, arrival, agent's stamp, tokens)
    per token event; ``offsets``; ``order``; ``status``)."""
    together = "a" in marks and "b" in marks and marks["b"][0] > marks["a"][0]
    a, b = (marks["a"], marks["b"]) if together else (marks["start"], marks["end"])
    t_a, t_b = a[0], b[0]
    span = max(t_b - t_a, 1e-6)
    inside = [e for r in got for e in r["seen"] if t_a <= e[1] <= t_b]
    events_in = len(inside)  # token events delivered in the window (the few others are not counted)
    delays = [(arr - ts) * 1000 for ts, arr, _, _ in inside]
    cpu = {}
    for part in procs:
        before, after = a[1][part], b[1][part]
        cpu[part] = sum(after[pid] - before.get(pid, after[pid]) for pid in after)
    total_cpu = sum(cpu.values())
    checked = [check_stream(r, tokens) for r in got]
    ok_status = sum(1 for c in checked if c["succeeded"])
    in_order = sum(1 for c in checked if c["in_order"])
    no_repeat = sum(1 for c in checked if c["no_repeat"])
    row = {
        "agents": n, "k": k, "processes": len(procs["agents"]), "seconds": seconds, "rate": rate,
        "setup_s": setup_s, "together": together, "window_s": span,
        "p50_ms": _pct(delays, 0.5), "p95_ms": _pct(delays, 0.95),
        "agent_p50_ms": _pct([(arr - stamp) * 1000 for _, arr, stamp, _ in inside], 0.5),
        "events_per_s": events_in / span, "tokens_per_s": sum(e[3] for e in inside) / span,
        "cpu": {part: c / span for part, c in cpu.items()},  # share of one core
        "total_cpu": total_cpu / span,
        "supervisor_us_per_event": cpu["supervisor"] / max(events_in, 1) * 1e6,
        "client_us_per_event": cpu["client"] / max(events_in, 1) * 1e6,
        "agents_us_per_event": cpu["agents"] / max(events_in, 1) * 1e6,
        "ray_us_per_event": cpu["ray"] / max(events_in, 1) * 1e6,
        "all_us_per_event": total_cpu / max(events_in, 1) * 1e6,
        "agent_rss_mb": rss_agents / 2**20,
        "agent_rss_mb_per_process": rss_agents / 2**20 / max(1, len(procs["agents"])),
        "ray_processes": len(procs["ray"]),
        "reads": reads, "reads_per_s": reads / max(1e-6, marks["end"][0] - marks["start"][0]),
        "succeeded": ok_status, "in_order": in_order, "no_repeat": no_repeat,
        "tokens_expected": n * tokens, "tokens_delivered": sum(len(r["order"]) for r in got),
    }
    row["checks_ok"] = (ok_status == n and in_order == n and no_repeat == n
                        and row["tokens_delivered"] == row["tokens_expected"])
    return row


def check_stream(got: dict[str, Any], tokens: int) -> dict[str, bool]:
    """What one followed task must show: it succeeded; its agent's token indexes are
    0 .. tokens-1, each once, in order; its events' offsets run from 0 without a gap or
    a repeat."""
    offsets = got["offsets"]
    return {"succeeded": got["status"] == "succeeded", "in_order": got["order"] == list(range(tokens)),
            "no_repeat": offsets == list(range(len(offsets)))}


def describe(row: dict[str, Any]) -> str:
    c = row["cpu"]
    checks = ("all succeeded, every token once and in order" if row["checks_ok"] else
              f"CHECKS FAILED: {row['succeeded']}/{row['agents']} succeeded, {row['in_order']} in order, "
              f"{row['no_repeat']} without gap or repeat, {row['tokens_delivered']}/{row['tokens_expected']} tokens")
    return (f"  {row['agents']:>5} agents k={row['k']:<3} delay p50 {row['p50_ms']:7.1f} ms p95 {row['p95_ms']:7.1f} ms "
            f"(agent stamp p50 {row['agent_p50_ms']:7.1f} ms); {row['events_per_s']:7.0f} events/s "
            f"{row['tokens_per_s']:7.0f} tokens/s; {row['reads_per_s']:.0f} long-polls/s for all {row['agents']} tasks\n"
            f"        CPU (% of a core): supervisor {c['supervisor']:.0%}, client {c['client']:.0%}, "
            f"agents {c['agents']:.0%} ({row['processes']} processes), ray {c['ray']:.0%} "
            f"({row['ray_processes']} processes), all {row['total_cpu']:.0%}\n"
            f"        CPU per event: supervisor {row['supervisor_us_per_event']:.0f} us, client "
            f"{row['client_us_per_event']:.0f} us, agents {row['agents_us_per_event']:.0f} us, ray "
            f"{row['ray_us_per_event']:.0f} us, all {row['all_us_per_event']:.0f} us; agent RSS "
            f"{row['agent_rss_mb']:.0f} MB ({row['agent_rss_mb_per_process']:.0f} MB/process)\n"
            f"        {checks}" + ("" if row["together"] else
                                   "; the agents never all streamed at once (the machine is short): whole run counted")
            + ("" if not row["agent_p50_ms"] > LAGGING_MS else
               f"; the agents themselves fell behind their schedule (their stamps lag {row['agent_p50_ms'] / 1000:.1f} s "
               "at p50: the machine is short of CPU for them)"))


def describe_floor(row: dict[str, Any]) -> str:
    """The bare plane's line under a level: its delay and CPU per event, and the pool's
    CPU per event as a multiple of it."""
    f = row["floor"]
    checks = "" if f["checks_ok"] else " CHECKS FAILED on the bare plane"
    return (f"        bare Ray plane, same level, no threadbound: delay p95 {f['p95_ms']:.1f} ms; CPU per event: "
            f"supervisor {f['supervisor_us_per_event']:.0f} us, client {f['client_us_per_event']:.0f} us, agents "
            f"{f['agents_us_per_event']:.0f} us, ray {f['ray_us_per_event']:.0f} us, all {f['all_us_per_event']:.0f} us"
            f"{checks}\n        the pool's CPU per event: {floor_ratio(row):.2f}x the bare plane's (all processes), "
            f"{floor_ratio(row, 'supervisor'):.2f}x (supervisor)")


def floor_ratio(row: dict[str, Any], part: str = "all") -> float:
    """The pool's CPU per event (``part``: all processes, or one of them) over the bare
    plane's at the same level."""
    return row[f"{part}_us_per_event"] / max(row["floor"][f"{part}_us_per_event"], 1e-9)


def series(scratch: str, levels: tuple[int, ...], *, seconds: float, k: int | None, limit_ms: float = LIMIT_MS,
           memory_gib: float = MEMORY_GIB, rate: float = RATE, floor: bool = False, **over: Any) -> dict[str, Any]:
    """Step through ``levels`` at ``k`` agents per actor (None: the field is not set)
    until the p95 delay passes ``limit_ms``, a check fails, or the agent processes would
    need more than ``memory_gib`` (or more than the memory available less 2 GiB).

    With ``floor``, each level runs a second time right after on the bare Ray plane
    (``capacity_floor``: the same agents, ``k`` to a process, nothing of threadbound),
    kept as the row's ``"floor"``: what the same work costs at the least."""
    import psutil

    rows: list[dict[str, Any]] = []
    out: dict[str, Any] = {"k": k or 1, "limit_ms": limit_ms, "seconds": seconds, "rate": rate, "levels": rows}
    per_process_mb = AGENT_MB_GUESS
    for n in levels:
        processes = math.ceil(n / (k or 1))
        need_gib = processes * per_process_mb / 1024
        avail_gib = psutil.virtual_memory().available / 2**30
        if need_gib > memory_gib or need_gib > avail_gib - 2:
            out["stopped"] = (f"{n} agents at k={k or 1} would take {processes} processes, ~{need_gib:.1f} GiB "
                              f"(limit {memory_gib:g} GiB, {avail_gib:.1f} GiB available)")
            break
        row = run_level(scratch, n, seconds=seconds, rate=rate, k=k, **over)
        rows.append(row)
        print(describe(row), flush=True)
        if floor:
            import capacity_floor

            row["floor"] = capacity_floor.floor_level(n, seconds=seconds, k=k or 1, rate=rate)
            print(describe_floor(row), flush=True)
        if row["agent_rss_mb_per_process"] > 0:
            per_process_mb = row["agent_rss_mb_per_process"]
        if not row["checks_ok"]:
            out["stopped"] = f"at {n} agents a check failed"
            break
        if row["p95_ms"] > limit_ms:
            out["stopped"] = f"at {n} agents the p95 delay passed {limit_ms:g} ms"
            break
    else:
        out["stopped"] = f"every level up to {levels[-1] if levels else 0} agents held"
    ok = [r for r in rows if r["checks_ok"] and r["p95_ms"] <= limit_ms]
    out["agents"] = ok[-1]["agents"] if ok else 0
    return out


def capacity(scratch: str, levels: tuple[int, ...] = LEVELS, *, seconds: float = 10.0, k: int | None = None,
             limit_ms: float = LIMIT_MS, memory_gib: float = MEMORY_GIB, floor: bool = True,
             **over: Any) -> dict[str, Any]:
    """The capacity figure: the levels at ``k`` agents per actor (default ``DEFAULT_K``
    when the pool has the field) and at k = 1 side by side; only k = 1 without the field.
    With ``floor``, each level at k > 1 is followed by the bare Ray plane's run of it.

    Returns ``{"series": [...], "field": bool}``, each series as :func:`series` returns it.
    """
    field = has_agents_per_actor()
    if k is not None and k != 1 and not field:
        raise SystemExit(f"--agents-per-actor {k}: this threadbound's RuntimeConfig has no agents_per_actor "
                         "field (one agent per process only); run without --agents-per-actor")
    runs: list[dict[str, Any]] = []
    if field:
        kk = k if k is not None else DEFAULT_K
        ks = [kk] if kk == 1 else [kk, 1]
    else:
        print("  (this threadbound has no agents_per_actor: one agent per process, k = 1 only)", flush=True)
        ks = [None]
    for kk in ks:
        print(f"\n  agents_per_actor = {kk or 1}" + (" (as far as memory allows)" if kk in (1, None) else ""),
              flush=True)
        s = series(scratch, levels, seconds=seconds, k=kk, limit_ms=limit_ms, memory_gib=memory_gib,
                   floor=floor and kk not in (1, None), **over)
        print(f"  {s['stopped']}", flush=True)
        runs.append(s)
    out = {"series": runs, "field": field}
    if len(runs) > 1:
        print("\n" + "\n".join(side_by_side(runs)), flush=True)
    return out


def side_by_side(runs: list[dict[str, Any]]) -> list[str]:
    """A table: per level, p95 delay, us/event (supervisor, all) and agent RSS of each series."""
    head = "| agents | " + " | ".join(f"k={s['k']}: p95 ms, sup us/ev, all us/ev, agent RSS MB" for s in runs) + " |"
    lines = [head, "|---" * (1 + len(runs)) + "|"]
    levels = sorted({r["agents"] for s in runs for r in s["levels"]})
    for n in levels:
        cells = []
        for s in runs:
            r = next((r for r in s["levels"] if r["agents"] == n), None)
            cells.append("-" if r is None else f"{r['p95_ms']:.0f}, {r['supervisor_us_per_event']:.0f}, "
                                               f"{r['all_us_per_event']:.0f}, {r['agent_rss_mb']:.0f}")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return lines


def ratio_lines(s: dict[str, Any]) -> list[str]:
    """The capacity targets of one series, for the bench's ratio lines."""
    rows = s["levels"]
    if not rows:
        return [f"capacity at k={s['k']}: no level ran ({s.get('stopped')})"]
    top = max(rows, key=lambda r: r["agents"])
    best = next((r for r in rows if r["agents"] == s["agents"]), None)
    line = (f"capacity at agents_per_actor={s['k']}: {s['agents']} agents streaming {s['rate']:g} tokens/s with "
            f"client delay p95 <= {s['limit_ms']:g} ms (target: 1000 at k>1; {s['stopped']})")
    if best is not None:
        line += (f"; there: supervisor {best['supervisor_us_per_event']:.0f} us/event (target <= 100), all "
                 f"processes {best['all_us_per_event']:.0f} us/event (target <= 300), p95 {best['p95_ms']:.0f} ms")
    if top is not best:
        line += f"; at {top['agents']} agents p95 {top['p95_ms']:.0f} ms"
    lines = [line]
    for r in (best, top) if top is not best else (top,):
        if r is not None and "floor" in r:
            f = r["floor"]
            lines.append(f"capacity CPU per event at {r['agents']} agents, k={s['k']}, against the bare Ray plane "
                         f"in the same run: {floor_ratio(r):.2f}x (pool {r['all_us_per_event']:.0f} us, bare "
                         f"{f['all_us_per_event']:.0f} us; supervisor {r['supervisor_us_per_event']:.0f} vs "
                         f"{f['supervisor_us_per_event']:.0f} us; bare p95 {f['p95_ms']:.0f} ms)")
    return lines


def markdown(cap: dict[str, Any]) -> list[str]:
    """The capacity tables for BENCHMARKS.md."""
    md = []
    for s in cap["series"]:
        md += [f"Capacity at agents_per_actor={s['k']}: agents streaming {s['rate']:g} tokens/s each for "
               f"{s['seconds']:g} s, default token batching, one client following all; delay = arrival at the "
               f"client minus the supervisor's stamp ({s['stopped']}). CPU in % of one core, us per delivered "
               "event.", "",
               "| agents | p50 ms | p95 ms | events/s | supervisor | client | agents | ray | all "
               "| sup us/ev | all us/ev | agent RSS MB | checks |",
               "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in s["levels"]:
            c = r["cpu"]
            md.append(f"| {r['agents']} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} | {r['events_per_s']:.0f} | "
                      f"{c['supervisor']:.0%} | {c['client']:.0%} | {c['agents']:.0%} | {c['ray']:.0%} | "
                      f"{r['total_cpu']:.0%} | {r['supervisor_us_per_event']:.0f} | {r['all_us_per_event']:.0f} | "
                      f"{r['agent_rss_mb']:.0f} | {'ok' if r['checks_ok'] else 'FAILED'} |")
        md.append("")
        bare = [r for r in s["levels"] if "floor" in r]
        if bare:
            md += ["The same levels on the bare Ray plane (scripts/capacity_floor.py: the same agents, "
                   f"{s['k']} to a process, one call per flush to one log actor, no threadbound), each run right "
                   "after the pool's:", "",
                   "| agents | bare p95 ms | bare sup us/ev | bare all us/ev | pool/bare all us/ev | checks |",
                   "|---|---|---|---|---|---|"]
            for r in bare:
                f = r["floor"]
                md.append(f"| {r['agents']} | {f['p95_ms']:.1f} | {f['supervisor_us_per_event']:.0f} | "
                          f"{f['all_us_per_event']:.0f} | {floor_ratio(r):.2f}x | "
                          f"{'ok' if f['checks_ok'] else 'FAILED'} |")
            md.append("")
    if len(cap["series"]) > 1:
        md += ["Side by side (p95 ms, supervisor us/event, all us/event, agent RSS MB):", ""]
        md += side_by_side(cap["series"]) + [""]
    return md


def write_json(cap: dict[str, Any], out_dir: str) -> str:
    import json

    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "capacity.json")
    with open(path, "w") as fh:
        json.dump(cap, fh, indent=1, default=str)
    print(f"\nwrote {path}")
    return path


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--levels", type=_levels, default=None,
                    help=f"agents per level, comma-separated (default {','.join(map(str, LEVELS))})")
    ap.add_argument("--seconds", type=float, default=None, help="how long every agent streams (default 10)")
    ap.add_argument("--agents-per-actor", type=int, default=None, metavar="K",
                    help=f"agents per agent process (needs the agents_per_actor config field; default {DEFAULT_K} "
                         "where it exists, plus k=1 side by side)")
    ap.add_argument("--limit-ms", type=float, default=LIMIT_MS, help="p95 client delay that ends the levels")
    ap.add_argument("--memory-gib", type=float, default=MEMORY_GIB,
                    help="most (projected) memory the agent processes of one level may take")


def _levels(text: str) -> tuple[int, ...]:
    """``--levels`` as argparse's ``type`` (argparse puts the flag's name before the message)."""
    try:
        levels = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of agent counts "
                                         "(e.g. 64,128)") from None
    if not levels or any(n < 1 for n in levels):
        raise argparse.ArgumentTypeError(f"{text!r}: every level must be a number of agents >= 1")
    return levels


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse bad values before Ray starts."""
    if args.seconds is not None and not (0 < args.seconds <= 3600):
        raise SystemExit(f"--seconds: must be > 0 and <= 3600, got {args.seconds}")
    if args.agents_per_actor is not None:
        if args.agents_per_actor < 1:
            raise SystemExit(f"--agents-per-actor: must be >= 1, got {args.agents_per_actor}")
        if args.agents_per_actor > 1 and not has_agents_per_actor():
            raise SystemExit(f"--agents-per-actor {args.agents_per_actor}: this threadbound's RuntimeConfig has no "
                             "agents_per_actor field (one agent per process only); run without the flag")


def run(args: argparse.Namespace, scratch: str) -> dict[str, Any]:
    print(f"\n[capacity] agents streaming {RATE:g} tokens/s each for {args.seconds or 10:g} s, one client "
          f"following all; levels until the p95 client delay passes {args.limit_ms:g} ms", flush=True)
    return capacity(scratch, args.levels or LEVELS, seconds=args.seconds or 10.0, k=args.agents_per_actor,
                    limit_ms=args.limit_ms, memory_gib=args.memory_gib)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap)
    args = ap.parse_args()
    check_arguments(args)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from local_ray import isolate

    scratch = isolate("bench-capacity")
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        run(args, scratch)
    finally:
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
