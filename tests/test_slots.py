"""Recycling agent processes off the tasks' path, with the agent cap held throughout.

The first tests drive the slot table alone, with fake actors whose starts the test
lets finish one by one, so the order of kills, starts and reservations is exact. The
last one runs a real pool on the session's Ray and watches Ray's own actor list.
"""

import asyncio
import itertools
import threading
import time

import psutil
import pytest
from conftest import eventually, make_pool
from ray.exceptions import RayActorError
from ray.util.state import list_actors

from threadbound.runtime import Task
from threadbound.runtime.supervisor import slot_actors as slots_mod
from threadbound.runtime.supervisor.clock import FakeClock
from threadbound.runtime.supervisor.slots import SlotTable

_pids = itertools.count(1000)


class FakeRay:
    """Actors as Ray keeps them: one live actor per name, killed on request; a start
    completes when the test opens the gate (or at once, with ``gate=None``)."""

    def __init__(self) -> None:
        self.live: dict[str, "FakeActor"] = {}
        self.peak = 0
        self.log: list[tuple[str, str]] = []
        self.gate: asyncio.Event | None = None

    def make(self, name: str) -> "FakeActor":
        if name in self.live:
            raise ValueError(f"actor name {name!r} is taken")
        actor = self.live[name] = FakeActor(self, name)
        self.peak = max(self.peak, len(self.live))
        self.log.append(("start", name))
        return actor

    def kill(self, actor: "FakeActor", no_restart: bool = True) -> None:
        if self.live.get(actor.name) is actor:
            del self.live[actor.name]
            self.log.append(("kill", actor.name))
        actor.dead = True


class FakeActor:
    def __init__(self, world: FakeRay, name: str) -> None:
        self.world, self.name, self.dead, self.up = world, name, False, False
        self.pid = next(_pids)
        self.ping = self  # handle.ping.remote()

    def remote(self):
        return self._ping()

    async def _ping(self):
        await asyncio.sleep(0)
        if self.dead:
            raise RayActorError()
        if not self.up and self.world.gate is not None:
            await self.world.gate.wait()
        self.up = True
        return {"pid": self.pid}


@pytest.fixture
def world(monkeypatch):
    w = FakeRay()
    monkeypatch.setattr(slots_mod.ray, "kill", w.kill)
    return w


def table(world: FakeRay, n: int, recycle_after: int) -> SlotTable:
    return SlotTable(n, recycle_after, world.make, slot_name=lambda i: f"agent/{i}")


async def warm(t: SlotTable) -> None:
    """Start every slot's process, as ``prewarm`` does."""
    held = t.reserve("prewarm", t.free_count())
    for s in held:
        await t.wait_ready(s)
        s.owner, s.uses = None, 0


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def names(slots):
    return [s.name for s in slots]


def test_tasks_take_warm_slots_while_a_due_slot_is_recycled_in_the_background(world):
    async def main():
        # Given three warm slots, and agent/0 at its last task before recycling
        t = table(world, 3, recycle_after=2)
        await warm(t)
        for i in range(2):
            assert names(t.reserve(f"t{i}", 1)) == ["agent/0"]
            world.gate = asyncio.Event()  # from now on, a start waits for the test
            t.release(t.slots[0])
        await settle()
        # Then agent/0 is being replaced, its old process confirmed dead first
        assert t.slots[0].replacing and world.log[-2:] == [("kill", "agent/0"), ("start", "agent/0")]
        # When tasks come meanwhile, they get the warm slots and start at once
        a, b = t.reserve("t2", 1), t.reserve("t3", 1)
        assert names(a) == ["agent/1"] and names(b) == ["agent/2"]
        await asyncio.wait_for(t.wait_ready(a[0]), 1)
        # ...and only a task that finds no other free slot takes the one being recycled
        assert t.reserve("t4", 2) is None
        c = t.reserve("t4", 1)
        assert names(c) == ["agent/0"] and t.reserved_replacing == 1
        waiting = asyncio.ensure_future(t.wait_ready(c[0]))
        await settle()
        assert not waiting.done()
        world.gate.set()
        await asyncio.wait_for(waiting, 1)
        # And there were never more processes than slots
        assert world.peak == 3 and t.recycles == 1 and t.slots[0].generation == 2

    asyncio.run(main())


def test_one_slot_is_recycled_at_a_time_and_a_due_slot_serves_until_its_turn(world):
    async def main():
        # Given two slots that both reach recycle_after in the same moment
        t = table(world, 2, recycle_after=1)
        await warm(t)
        world.gate = asyncio.Event()
        both = t.reserve("t0", 2)
        for s in both:
            t.release(s)
        await settle()
        # Then one is recycled and the other stays warm and usable
        assert [s.replacing for s in t.slots] == [True, False]
        again = t.reserve("t1", 1)
        assert names(again) == ["agent/1"] and not again[0].replacing
        t.release(again[0])  # still agent/0's turn: agent/1 serves on
        await settle()
        assert [s.replacing for s in t.slots] == [True, False] and t.recycles == 1
        # When agent/0's new process is up, agent/1 (free and due) follows
        first, world.gate = world.gate, asyncio.Event()
        first.set()
        await asyncio.wait_for(t.wait_ready(t.slots[0]), 1)
        await settle()
        assert [s.replacing for s in t.slots] == [False, True] and t.recycles == 2
        world.gate.set()
        await asyncio.wait_for(t.wait_ready(t.slots[1]), 1)
        assert world.log[-4:] == [("kill", "agent/0"), ("start", "agent/0"), ("kill", "agent/1"), ("start", "agent/1")]
        assert world.peak == 2 and [s.uses for s in t.slots] == [0, 0]

    asyncio.run(main())


def test_a_slot_below_recycle_after_is_never_recycled(world):
    async def main():
        t = table(world, 2, recycle_after=3)
        await warm(t)
        for i in range(2):
            for s in t.reserve(f"t{i}", 2):
                t.release(s)
        await settle()
        assert t.recycles == 0 and not any(s.replacing for s in t.slots)
        assert [s.uses for s in t.slots] == [2, 2]

    asyncio.run(main())


def test_shutdown_in_the_middle_of_a_recycle_leaves_no_process(world):
    async def main():
        t = table(world, 2, recycle_after=1)
        await warm(t)
        world.gate = asyncio.Event()  # the new process never answers
        t.release(t.reserve("t0", 1)[0])
        await settle()
        assert t.slots[0].replacing and "agent/0" in world.live
        await t.shutdown()
        assert world.live == {}
        t.release(t.slots[1])  # a late release after shutdown starts nothing
        await settle()
        assert world.live == {}

    asyncio.run(main())


# -- stopping actors left idle (idle_actor_ttl_s) ------------------------------------------

def idle_table(world: FakeRay, n: int, ttl: float | None) -> tuple[SlotTable, FakeClock]:
    clock = FakeClock()
    return SlotTable(n, 100, world.make, slot_name=lambda i: f"agent/{i}", clock=clock, idle_ttl_s=ttl), clock


def test_an_actor_idle_for_idle_ttl_is_stopped_and_started_again_when_a_task_needs_it(world):
    async def main():
        # Given two warm actors and a ttl of 60 s; agent/0 serves a task that ends 30 s in
        t, clock = idle_table(world, 2, ttl=60)
        await warm(t)
        (a,) = t.reserve("t0", 1)
        assert a.name == "agent/0"
        clock.advance(30)
        t.release(a)
        # When 50 s have passed, neither has been idle 60 s: nothing stops
        clock.advance(20)
        assert t.trim_idle() == 0
        # When 65 s have passed, agent/1 (idle since it started) stops; agent/0 (35 s) stays
        clock.advance(15)
        assert t.trim_idle() == 1
        await asyncio.wait_for(t.wait_ready(t.slots[1]), 1)
        assert list(world.live) == ["agent/0"] and t.slots[1].handle is None and t.slots[1].pid is None
        assert t.counts()["actors"]["alive"] == 1 and t.stopped_idle == 1 and t.free_count() == 2
        # ...and a later tick does not stop it twice
        assert t.trim_idle() == 0
        # When a task needs both places, the warm one is taken and the stopped one starts again
        both = t.reserve("t1", 2)
        assert names(both) == ["agent/0", "agent/1"]
        for s in both:
            await asyncio.wait_for(t.wait_ready(s), 1)
        assert set(world.live) == {"agent/0", "agent/1"} and t.slots[1].generation == 2
        assert world.log[-2:] == [("kill", "agent/1"), ("start", "agent/1")] and world.peak == 2
        # ...and actors bound to a task are never stopped, however long it runs
        clock.advance(1000)
        assert t.trim_idle() == 0 and set(world.live) == {"agent/0", "agent/1"}

    asyncio.run(main())


def test_with_no_idle_ttl_actors_stay_warm_for_good(world):
    async def main():
        t, clock = idle_table(world, 2, ttl=None)
        await warm(t)
        clock.advance(10 ** 6)
        assert t.trim_idle() == 0 and set(world.live) == {"agent/0", "agent/1"} and t.stopped_idle == 0

    asyncio.run(main())


def test_a_task_that_reserves_an_actor_while_it_stops_gets_a_fresh_process(world):
    async def main():
        # Given one actor, idle past the ttl and being stopped
        t, clock = idle_table(world, 1, ttl=5)
        await warm(t)
        clock.advance(6)
        assert t.trim_idle() == 1 and t.slots[0].replacing
        # When a task reserves its place meanwhile (the only one: a last pick)
        (s,) = t.reserve("t0", 1)
        await asyncio.wait_for(t.wait_ready(s), 1)
        # Then the old process was gone before a fresh one started, and the task has it
        assert world.log[-2:] == [("kill", "agent/0"), ("start", "agent/0")] and s.handle is not None
        assert s.owner == "t0" and s.generation == 2 and world.peak == 1 and t.reserved_replacing == 1

    asyncio.run(main())


# -- on a real Ray -----------------------------------------------------------------------

def live_agent_actors(prefix):
    rows = list_actors(filters=[("class_name", "=", "SlotWorker")], limit=10_000, raise_on_missing_output=False)
    return [a for a in rows if a.name.startswith(prefix) and a.state != "DEAD"]


@pytest.mark.usefixtures("ray_session")
@pytest.mark.timeout(240)
def test_tasks_keep_running_on_warm_slots_while_processes_are_recycled(pool_name):
    # Given a pool of 3 agents whose processes are replaced after every 2 tasks
    pool = make_pool(pool_name, max_agents=3, max_agents_per_task=1, recycle_after=2)
    live, seen_recycling_beside_work, stop = [], [0], threading.Event()

    def sample():
        while not stop.is_set():
            live.append(len(live_agent_actors(f"{pool_name}/agent/")))
            slots = pool.stats()["slots"]
            if any(s["recycling"] for s in slots) and any(s["owner"] and not s["replacing"] for s in slots):
                seen_recycling_beside_work[0] += 1
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        # When 40 one-step tasks are queued at once
        handles = [pool.submit(Task(goal=f"task {i}", agents=["a"], inputs={"a": {"tokens": 2, "sleep_s": 0.1}}))
                   for i in range(40)]
        results = [h.result(timeout=180) for h in handles]
        steps = sorted((e.ts, e.data["slot"], e.data["pid"]) for h in handles for e in h.stream()
                       if e.kind == "step_started")
        stats = pool.stats()
    finally:
        stop.set()
        sampler.join()
        pool.shutdown()
    # Then every task succeeded and processes were recycled, each after at least 2 tasks
    assert all(r.ok for r in results)
    assert stats["replacements"] >= 2
    served: dict[tuple[str, int], int] = {}
    for _, slot, pid in steps:
        served[(slot, pid)] = served.get((slot, pid), 0) + 1
    for slot in {s for s, _ in served}:
        pids = [pid for _, s, pid in steps if s == slot]
        retired = list(dict.fromkeys(pids))[:-1]  # every process of the slot but its last
        assert all(served[(slot, pid)] >= 2 for pid in retired)
    # ...while a slot was recycled, tasks went on starting on the other slots: between the
    # last step on a retired process and the first on its successor, other slots started steps
    gaps = []
    for slot in {s for s, _ in served}:
        order = [(i, pid) for i, (_, s, pid) in enumerate(steps) if s == slot]
        for (i, old), (j, new) in zip(order, order[1:]):
            if old != new:
                gaps.append(j - i - 1)
    assert gaps and max(gaps) >= 1
    assert seen_recycling_beside_work[0] >= 1
    # ...and never were there more than 3 agent processes
    assert len(live) > 5 and max(live) <= 3


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.usefixtures("ray_session")
@pytest.mark.timeout(180)
def test_a_pool_stops_actors_left_idle_and_starts_one_again_for_the_next_task(pool_name):
    # Given a pool whose agent actors stop once they have had no task for 1 s
    pool = make_pool(pool_name, max_agents=2, max_agents_per_task=1, idle_actor_ttl_s="1s",
                     health={"check_interval_s": 0.2})
    try:
        def run_one(i):
            h = pool.submit(Task(goal=f"task {i}", agents=["a"], inputs={"a": {"tokens": 2}}))
            assert h.result(timeout=60).ok
            return [e.data["pid"] for e in h.stream() if e.kind == "step_started"][0]

        first = run_one(0)
        assert pool.stats()["actors"]["alive"] == 1
        # When it has had no task for longer than that
        assert eventually(lambda: pool.stats()["actors"]["alive"] == 0, timeout_s=60)
        # Then the actor is stopped: its process is gone and Ray lists no agent actor alive
        assert pool.stats()["stopped_idle"] >= 1
        assert eventually(lambda: _gone(first), timeout_s=30)
        assert eventually(lambda: not live_agent_actors(f"{pool_name}/agent/"), timeout_s=30)
        # And the next task starts an agent actor again, in a new process, and succeeds
        second = run_one(1)
        assert second != first
    finally:
        pool.shutdown()
