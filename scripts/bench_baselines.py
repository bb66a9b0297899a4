"""The same workload without threadbound: hand-written Ray, LangGraph, a thread pool.

Every system runs N tasks of three steps (code -> test -> review); each step makes one
call of the same simulated model (``tokens`` tokens, optional GIL-holding ``cpu_ms``)
and every token reaches the client that submitted the task. Each runner returns the
wall time for all N tasks and the tokens the client received.

Kept minimal on purpose: these are the floors and the alternatives, not products.
"""

from __future__ import annotations

import asyncio
import os
import queue
import sqlite3
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from threadbound.agents import Agent
from threadbound.agents.models.simulated import SimulatedModel, SimulatedModelConfig

ROLES = ("code", "test", "review")


def settle(max_s: float = 5.0, busy_pct: float = 15.0) -> float:
    """Wait until the machine is quiet (under ``busy_pct`` of all cores busy over 0.2 s), for
    at most ``max_s``; the seconds waited. Called by every timed run just before its clock
    starts, whatever the system: what a run starts before its clock (a pool's or a
    relay's actor processes) and what the run before it stopped (processes Ray reaps) would
    otherwise land in whichever run comes next, and on 2 cores that moved single ratios by
    a third."""
    import psutil

    start = time.monotonic()
    while time.monotonic() - start < max_s and psutil.cpu_percent(interval=0.2) >= busy_pct:
        pass
    return time.monotonic() - start


def model(tokens: int, cpu_ms: float) -> SimulatedModel:
    return SimulatedModel(SimulatedModelConfig(tokens=tokens, cpu_ms=cpu_ms))


def _prompt(goal: str, role: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"{role}: {goal}"}]


class BenchAgent(Agent):
    """threadbound's side of the workload: one model call, tokens streamed."""

    def step(self, ctx):
        text = yield from ctx.ask(_prompt(ctx.goal, ctx.role))
        return len(text)


class PacedAgent(Agent):
    """For the capacity figure: streams ``inputs["tokens"]`` tokens at ``inputs["rate"]``
    per second (on a fixed schedule, so a late token does not slow the rest), each token
    the wall-clock time it was made at; ``inputs["hold_s"]`` keeps the slot a while after."""

    def step(self, ctx):
        n, rate = int(ctx.inputs.get("tokens", 1)), float(ctx.inputs.get("rate", 0))
        start = time.monotonic()
        for i in range(n):
            if rate:
                wait = start + i / rate - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
            yield f"{time.time():.4f} "
        if ctx.inputs.get("hold_s"):
            time.sleep(float(ctx.inputs["hold_s"]))
        return n


# -- hand-written Ray ------------------------------------------------------------------

def _ray_actor_class():
    import ray

    @ray.remote(max_concurrency=1)
    class StepActor:
        def __init__(self, tokens: int, cpu_ms: float) -> None:
            self.model = model(tokens, cpu_ms)

        def ping(self) -> int:
            return os.getpid()

        def run(self, goal: str, role: str):
            for tok in self.model.stream(_prompt(goal, role), agent=role):
                yield tok  # one Ray object per token, as a streaming generator

        def call(self, goal: str, role: str) -> list[str]:
            return list(self.model.stream(_prompt(goal, role), agent=role))  # the step's tokens in one reply

    return StepActor


async def _ray_task(actors: list[Any], goal: str) -> int:
    got = 0
    for actor, role in zip(actors, ROLES):
        gen = actor.run.options(num_returns="streaming").remote(goal, role)
        async for ref in gen:
            await ref
            got += 1
    return got


def run_ray_warm(n: int, concurrency: int, tokens: int, cpu_ms: float) -> dict[str, Any]:
    """The floor: 3 warm actors per running task, reused across tasks."""
    import ray

    cls = _ray_actor_class()
    groups = [[cls.remote(tokens, cpu_ms) for _ in ROLES] for _ in range(concurrency)]
    ray.get([a.ping.remote() for g in groups for a in g])

    async def main() -> int:
        free: asyncio.Queue = asyncio.Queue()
        for g in groups:
            free.put_nowait(g)

        async def one(i: int) -> int:
            g = await free.get()
            try:
                return await _ray_task(g, f"task {i}")
            finally:
                free.put_nowait(g)

        return sum(await asyncio.gather(*(one(i) for i in range(n))))

    settle()
    t0 = time.perf_counter()
    got = asyncio.run(main())
    wall = time.perf_counter() - t0
    for g in groups:
        for a in g:
            ray.kill(a)
    return {"wall_s": wall, "tokens": got}


def _relay_actor_class():
    import ray

    @ray.remote(max_concurrency=1000)
    class Relay:
        """The least a supervisor can be: it runs each task's steps on warm actors and keeps
        their events in memory; clients long-poll it (no durability, caps or deadlines)."""

        def __init__(self, groups: list[list[Any]], plain: bool = False) -> None:
            self.plain = plain  # each step one plain call (its tokens in the reply), not a streaming one
            self.free: asyncio.Queue = asyncio.Queue()
            for g in groups:
                self.free.put_nowait(g)
            self.events: dict[str, list[int]] = {}
            self.done: set[str] = set()
            self.news = asyncio.Event()
            self.runs: set[asyncio.Task] = set()

        async def submit(self, task_id: str) -> None:
            self.events[task_id] = []
            run = asyncio.get_running_loop().create_task(self._run(task_id))
            self.runs.add(run)
            run.add_done_callback(self.runs.discard)

        async def _run(self, task_id: str) -> None:
            g = await self.free.get()
            try:
                for actor, role in zip(g, ROLES):
                    if self.plain:
                        self.events[task_id].extend(1 for _ in await actor.call.remote(task_id, role))
                        self._notify()
                        continue
                    gen = actor.run.options(num_returns="streaming").remote(task_id, role)
                    async for ref in gen:
                        await ref
                        self.events[task_id].append(1)
                        self._notify()
            finally:
                self.free.put_nowait(g)
            self.done.add(task_id)
            self._notify()

        def _notify(self) -> None:
            self.news.set()
            self.news = asyncio.Event()

        async def read(self, cursors: dict[str, int], wait_s: float) -> dict[str, tuple[int, bool]]:
            def answer() -> dict[str, tuple[int, bool]]:
                return {t: (len(self.events[t]) - off, t in self.done) for t, off in cursors.items()
                        if len(self.events[t]) > off or t in self.done}

            if not answer():
                try:
                    await asyncio.wait_for(self.news.wait(), wait_s)
                    await asyncio.sleep(0.002)  # the rest of a burst, as threadbound's read does
                except asyncio.TimeoutError:
                    pass
            return answer()

    return Relay


def run_ray_relay(n: int, concurrency: int, tokens: int, cpu_ms: float, *, plain: bool = False) -> dict[str, Any]:
    """The floor of any design in which one actor (a supervisor) stands between the
    client and the agents' actors: the client submits to it and long-polls it for the
    tasks' events, as threadbound's clients do, and it relays the agents' streams
    (``plain``: each step is one plain call whose reply holds its tokens, the way
    threadbound sends a step that ends before its first batch is due)."""
    import ray

    cls = _ray_actor_class()
    groups = [[cls.remote(tokens, cpu_ms) for _ in ROLES] for _ in range(concurrency)]
    ray.get([a.ping.remote() for g in groups for a in g])
    relay = _relay_actor_class().remote(groups, plain)
    ray.get(relay.read.remote({}, 0.0))

    async def main() -> int:
        ids = [f"task {i}" for i in range(n)]
        await asyncio.gather(*(relay.submit.remote(t) for t in ids))
        cursors, got = dict.fromkeys(ids, 0), 0
        while cursors:
            for t, (new, done) in (await relay.read.remote(cursors, 10.0)).items():
                cursors[t] += new
                got += new
                if done:
                    del cursors[t]
        return got

    settle()
    t0 = time.perf_counter()
    got = asyncio.run(main())
    wall = time.perf_counter() - t0
    ray.kill(relay)
    for g in groups:
        for a in g:
            ray.kill(a)
    return {"wall_s": wall, "tokens": got}


def run_ray_fresh(n: int, concurrency: int, tokens: int, cpu_ms: float) -> dict[str, Any]:
    """For context: three new actors per task (a process start each)."""
    import ray

    cls = _ray_actor_class()

    async def main() -> int:
        sem = asyncio.Semaphore(concurrency)

        async def one(i: int) -> int:
            async with sem:
                actors = [cls.remote(tokens, cpu_ms) for _ in ROLES]
                try:
                    return await _ray_task(actors, f"task {i}")
                finally:
                    for a in actors:
                        ray.kill(a)

        return sum(await asyncio.gather(*(one(i) for i in range(n))))

    t0 = time.perf_counter()
    got = asyncio.run(main())
    return {"wall_s": time.perf_counter() - t0, "tokens": got}


# -- LangGraph -------------------------------------------------------------------------

def langgraph_available() -> bool:
    try:
        import langgraph  # noqa: F401
        import langgraph.checkpoint.sqlite  # noqa: F401
    except ImportError:
        return False
    return True


def run_langgraph(n: int, concurrency: int, tokens: int, cpu_ms: float, *, durable: bool = True) -> dict[str, Any]:
    """A 3-node StateGraph, SQLite checkpointer with ``durability="sync"``, tokens through
    ``stream_mode="custom"``; ``concurrency`` threads each run one task at a time."""
    from typing import TypedDict

    from langgraph.checkpoint.sqlite import SqliteSaver
    from langgraph.config import get_stream_writer
    from langgraph.graph import END, START, StateGraph

    m = model(tokens, cpu_ms)

    class State(TypedDict):
        goal: str
        outputs: dict

    def node(role: str):
        def run(state: State) -> dict:
            write = get_stream_writer()
            parts = []
            for tok in m.stream(_prompt(state["goal"], role), agent=role):
                write(tok)
                parts.append(tok)
            return {"outputs": {**state["outputs"], role: len("".join(parts))}}
        return run

    g = StateGraph(State)
    prev = START
    for role in ROLES:
        g.add_node(role, node(role))
        g.add_edge(prev, role)
        prev = role
    g.add_edge(prev, END)
    path = os.path.join(tempfile.mkdtemp(prefix="bench-langgraph-"), "checkpoints.sqlite")
    conn = sqlite3.connect(path, check_same_thread=False)
    saver = SqliteSaver(conn) if durable else None
    graph = g.compile(checkpointer=saver)

    def one(i: int) -> int:
        got = 0
        cfg = {"configurable": {"thread_id": f"t{i}"}}
        kwargs = {"durability": "sync"} if durable else {}
        for _ in graph.stream({"goal": f"task {i}", "outputs": {}}, cfg, stream_mode="custom", **kwargs):
            got += 1
        return got

    settle()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as ex:
        got = sum(ex.map(one, range(n)))
    wall = time.perf_counter() - t0
    conn.close()
    return {"wall_s": wall, "tokens": got}


# -- a thread pool ---------------------------------------------------------------------

def run_threads(n: int, concurrency: int, tokens: int, cpu_ms: float) -> dict[str, Any]:
    """In-process, no isolation, no durability: tokens go to the client through a queue."""
    m = model(tokens, cpu_ms)
    out: queue.SimpleQueue = queue.SimpleQueue()

    def one(i: int) -> None:
        for role in ROLES:
            for tok in m.stream(_prompt(f"task {i}", role), agent=role):
                out.put(tok)

    settle()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as ex:
        futures = [ex.submit(one, i) for i in range(n)]
        got = 0
        while not all(f.done() for f in futures) or not out.empty():
            try:
                out.get(timeout=0.01)
                got += 1
            except queue.Empty:
                pass
    return {"wall_s": time.perf_counter() - t0, "tokens": got}
