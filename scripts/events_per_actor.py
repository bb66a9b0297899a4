"""Which costs less with several agents per actor: a streaming call per step, or one event
stream per actor carrying all its agents' batches (``agents_per_actor`` > 1)?

Runs N paced agents (``--rate`` tokens/s each for ``--seconds``) on N/k slot actors of
k places each, straight on the actors (no supervisor), reading the events on one asyncio
loop as the supervisor does, once per way, and prints for each: Ray messages received, the
reader's CPU and the actors' CPU per delivered token batch, and the tokens delivered.

    python scripts/events_per_actor.py --agents 200 --per-actor 50
"""

from __future__ import annotations

import argparse
import asyncio
import time

import cloudpickle
import psutil
import ray

from threadbound.agents import Agent
from threadbound.agents.host import ERROR, RESULT, StepRequest
from threadbound.agents.wire import pack, unpack
from threadbound.runtime.actors import CONTROL_CALLS, SlotActor


class Paced(Agent):
    def step(self, ctx):
        n, gap = ctx.inputs["n"], ctx.inputs["gap"]
        start = time.monotonic()
        for i in range(n):
            delay = start + i * gap - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            yield f"{i} "
        return n


def requests(agents: int, k: int, rate: float, seconds: float, batch: int, interval_s: float):
    blob = cloudpickle.dumps(Paced)
    for i in range(agents):
        yield i // k, StepRequest(
            binding=f"t{i}/a/1", agent_blob=blob, task_id=f"t{i}", role="a", goal="g", workspace=None, round=1,
            attempt=1, idempotency_key=f"t{i}:1:a:1", inputs={"n": int(rate * seconds), "gap": 1.0 / rate},
            outputs={}, feedback=[], level=1, streaming=True, model_config=None, token_batch_size=batch,
            token_interval_s=interval_s, place=i % k)


async def per_step(actors, reqs) -> tuple[int, int, int]:
    messages = batches = tokens = 0

    async def one(actor, req):
        nonlocal messages, batches, tokens
        async for ref in actor.run_step.remote(req):
            messages += 1
            for kind, data in await ref:
                if kind == "tokens":
                    batches += 1
                    tokens += data["n"]

    await asyncio.gather(*(one(actors[a], r) for a, r in reqs))
    return messages, batches, tokens


async def per_actor(actors, reqs) -> tuple[int, int, int]:
    messages = batches = tokens = 0
    left = len(reqs)
    done = asyncio.Event()

    async def read(actor):
        nonlocal messages, batches, tokens, left
        async for ref in actor.events.remote():
            messages += 1
            for _key, batch in unpack(await ref):
                for kind, data in batch:
                    if kind == "tokens":
                        batches += 1
                        tokens += data["n"]
                    elif kind in (RESULT, ERROR):
                        left -= 1
                        if left == 0:
                            done.set()

    readers = [asyncio.ensure_future(read(a)) for a in actors]
    await asyncio.gather(*(actors[a].start_step.remote(pack(r)) for a, r in reqs))
    await done.wait()
    for r in readers:
        r.cancel()
    return messages, batches, tokens


def measure(way, agents, k, args) -> dict:
    n = -(-agents // k)
    actors = [SlotActor.options(max_concurrency=k + CONTROL_CALLS + 1).remote(f"bench/{i}", None, "", k)
              for i in range(n)]
    procs = [psutil.Process(p["pid"]) for p in ray.get([a.ping.remote() for a in actors])]
    reqs = list(requests(agents, k, args.rate, args.seconds, args.batch, args.interval_ms / 1000))
    cpu0 = [sum(p.cpu_times()[:2]) for p in procs]
    me0 = time.process_time()
    t0 = time.monotonic()
    messages, batches, tokens = asyncio.run(way(actors, reqs))
    wall = time.monotonic() - t0
    me = time.process_time() - me0
    them = sum(sum(p.cpu_times()[:2]) - c for p, c in zip(procs, cpu0))
    for a in actors:
        ray.kill(a)
    return {"way": way.__name__, "agents": agents, "per_actor": k, "wall_s": round(wall, 2), "messages": messages,
            "batches": batches, "tokens": tokens, "reader_us_per_batch": round(me / batches * 1e6, 1),
            "actors_us_per_batch": round(them / batches * 1e6, 1),
            "all_us_per_batch": round((me + them) / batches * 1e6, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--agents", type=int, default=200)
    ap.add_argument("--per-actor", type=int, default=50)
    ap.add_argument("--rate", type=float, default=20.0, help="tokens per second per agent")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--batch", type=int, default=32, help="token_batch_size")
    ap.add_argument("--interval-ms", type=float, default=50.0, help="token_interval_ms")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved runs of each way")
    args = ap.parse_args()
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        for _ in range(args.rounds):
            for way in (per_step, per_actor):
                print(measure(way, args.agents, args.per_actor, args), flush=True)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
