"""What the HTTP gateway costs: tokens/s and added delivery delay through SSE and
WebSocket against the in-process client, and how many concurrent SSE clients one
gateway holds before the added delay passes 100 ms.

    python scripts/bench_gateway.py            # about a minute
    python scripts/bench_gateway.py --quick    # fewer tokens, fewer client levels

The gateway runs as a real ``threadbound serve`` process attached to a pool this
script starts; the clients run here. Delivery delay = the moment a client has a
``tokens`` event minus the event's own timestamp (taken by the supervisor); "added"
is a client's median delay minus the in-process client's median, both measured on
the same task at the same time. ``main(argv)`` returns the figures as a dict, for
scripts/bench.py.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import signal
import statistics
import subprocess
import sys
import time
from typing import Any

from local_ray import isolate

from threadbound.agents.events import TOKENS

TOKEN = secrets.token_urlsafe(24)
WARMUP_S = 2.0


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


async def _in_process(pool: Any, task_id: str) -> list[tuple[float, float, int]]:
    out = []
    async for ev in pool.handle(task_id).astream(0):
        if ev.kind == TOKENS:
            out.append((time.time(), ev.ts, ev.data.get("n", 1)))
    return out


async def _sse(client: Any, task_id: str) -> list[tuple[float, float, int]]:
    out = []
    async for ev in client.follow(task_id):
        if ev.kind == TOKENS:
            out.append((time.time(), ev.ts, ev.data.get("n", 1)))
    return out


async def _ws(url: str, task_id: str) -> list[tuple[float, float, int]]:
    import websockets

    out = []
    ws_url = url.replace("http://", "ws://") + f"/v1/tasks/{task_id}/stream"
    async with websockets.connect(ws_url, additional_headers={"Authorization": f"Bearer {TOKEN}"},
                                  max_size=None) as ws:
        async for msg in ws:
            ev = json.loads(msg)
            if ev["kind"] == TOKENS:
                out.append((time.time(), ev["ts"], ev["data"].get("n", 1)))
    return out


def _rate(got: list[tuple[float, float, int]], since: float) -> float:
    """Tokens per second from the submit to the last token this client had."""
    tokens = sum(n for *_, n in got)
    return tokens / (got[-1][0] - since) if got else float("nan")


def _delays(got: list[tuple[float, float, int]]) -> list[float]:
    return [(recv - ts) * 1000 for recv, ts, _ in got]


async def _submit(client: Any, tokens: int, pace_s: float) -> str:
    body = {"goal": "bench", "agents": ["a"], "inputs": {"*": {"tokens": tokens, "token_sleep_s": pace_s}}}
    return (await client.submit(body))["task_id"]


async def _throughput(pool: Any, url: str, tokens: int) -> dict[str, float]:
    """One unpaced task of ``tokens`` tokens, read by the three clients at once."""
    from threadbound.client import AsyncGatewayClient

    async with AsyncGatewayClient(url, TOKEN) as submitter, AsyncGatewayClient(url, TOKEN) as reader:
        since = time.time()
        task_id = await _submit(submitter, tokens, 0.0)
        local, sse, ws = await asyncio.gather(_in_process(pool, task_id), _sse(reader, task_id), _ws(url, task_id))
    return {"in_process_tok_s": _rate(local, since), "sse_tok_s": _rate(sse, since), "ws_tok_s": _rate(ws, since),
            "sse_added_ms": statistics.median(_delays(sse)) - statistics.median(_delays(local)),
            "ws_added_ms": statistics.median(_delays(ws)) - statistics.median(_delays(local))}


async def _paced(pool: Any, url: str, clients: int, tokens: int, pace_s: float) -> dict[str, float]:
    """``clients`` SSE readers and one in-process reader of one paced task."""
    from threadbound.client import AsyncGatewayClient

    readers = [AsyncGatewayClient(url, TOKEN, timeout_s=60) for _ in range(clients)]
    try:
        since = time.time()
        task_id = await _submit(readers[0], tokens, pace_s)
        local, *remote = await asyncio.gather(_in_process(pool, task_id), *(_sse(r, task_id) for r in readers))
    finally:
        await asyncio.gather(*(r.aclose() for r in readers))
    # Tokens made while clients were still connecting arrive as a backlog: counted from
    # WARMUP_S after the submit, the figure is the steady delivery delay.
    def steady(got):
        return [row for row in got if row[1] > since + WARMUP_S]

    base = statistics.median(_delays(steady(local)))
    added = [d - base for got in remote for d in _delays(steady(got))]
    return {"clients": clients, "added_median_ms": statistics.median(added), "added_p95_ms": _pct(added, 0.95)}


def _serve(name: str, port: int) -> subprocess.Popen:
    import httpx

    env = {**os.environ, "THREADBOUND_GATEWAY_TOKENS": TOKEN}
    proc = subprocess.Popen([sys.executable, "-m", "threadbound.runtime.cli", "serve", "--name", name,
                             "--port", str(port), "--address", os.environ["RAY_ADDRESS"], "--rate", "100000",
                             "--burst", "100000"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.2)
        if proc.poll() is not None:
            break
    proc.kill()
    raise RuntimeError(f"threadbound serve did not start: {proc.stderr.read().decode()[-2000:]}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    scratch = isolate("bench-gateway")
    import ray

    from scripted_agents import Scripted

    from threadbound.runtime import AgentPool, RuntimeConfig

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    cfg = RuntimeConfig.from_mapping({"name": "benchgw", "max_agents": 4, "max_agents_per_task": 1,
                                      "snapshot_dir": os.path.join(scratch, "snapshots"),
                                      "health": {"enabled": False}})
    pool = AgentPool(cfg, agents={"a": Scripted})
    from gateway_tools import free_port

    port = free_port()
    proc = _serve(cfg.name, port)
    url = f"http://127.0.0.1:{port}"
    results: dict[str, Any] = {}
    try:
        tokens = 2000 if args.quick else 10000
        results["throughput"] = asyncio.run(_throughput(pool, url, tokens))
        t = results["throughput"]
        print(f"tokens/s to one client ({tokens} tokens, unpaced): in-process {t['in_process_tok_s']:.0f}, "
              f"SSE {t['sse_tok_s']:.0f} ({t['sse_tok_s'] / t['in_process_tok_s']:.2f}x), "
              f"WebSocket {t['ws_tok_s']:.0f} ({t['ws_tok_s'] / t['in_process_tok_s']:.2f}x)")
        print(f"added delivery delay (median, vs in-process, same task): SSE {t['sse_added_ms']:.1f} ms, "
              f"WebSocket {t['ws_added_ms']:.1f} ms")
        levels = (1, 50, 200) if args.quick else (1, 50, 100, 200, 400, 800)
        results["capacity"] = []
        holds = 0
        for n in levels:
            row = asyncio.run(_paced(pool, url, n, tokens=120, pace_s=0.05))
            results["capacity"].append(row)
            print(f"{n:>4} SSE clients of a 20 tok/s task: added delay median {row['added_median_ms']:.1f} ms, "
                  f"p95 {row['added_p95_ms']:.1f} ms")
            if row["added_p95_ms"] > 100:
                break
            holds = n
        results["holds_clients"] = holds
        print(f"one gateway holds {holds} concurrent streaming clients with p95 added delay under 100 ms"
              + (" (the most tried)" if holds == levels[-1] else ""))
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
        pool.shutdown(grace_s=1)
        ray.shutdown()
    return results


if __name__ == "__main__":
    main()
