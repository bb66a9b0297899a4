"""Several agents per slot actor (``agents_per_actor`` > 1): the bookkeeping, without Ray.

The supervisor runs as the plain class with fake agent actors (``supervisor_harness``),
each fake actor hosting up to k steps at once, one per place; the slot table's own
rules (prewarm, recycling) are driven with the fake Ray of ``test_slots``. Time moves when
the test moves it. (tests/test_many_agents_ray.py runs the same on a real Ray.)
"""

from __future__ import annotations

import asyncio

import pytest
from supervisor_harness import fakes, first, kinds, result, run, submit, until  # noqa: F401  (fakes: a fixture)
from test_slots import FakeRay, settle

from threadbound.runtime.supervisor import slot_actors as slots_mod
from threadbound.runtime.supervisor.slot_actors import STOP_GRACE_S
from threadbound.runtime.supervisor.slots import SlotTable


def per_actor(fakes, k: int):
    fakes.per_actor = k
    return fakes


# -- caps -----------------------------------------------------------------------------------

def test_six_agents_run_at_once_on_two_processes_and_never_a_seventh(fakes):
    per_actor(fakes, 3)
    gate = asyncio.Event()

    async def held(call):
        call.tokens(f"{call.role} ")
        await gate.wait()
        return call.role

    fakes.default = held

    async def body(sup):
        # Given a pool of 6 agents, 3 per actor, and 5 tasks of 2 parallel agents
        ids = [await submit(sup, ["a", "b"], after={}) for _ in range(5)]
        # When the steps hold
        await until(lambda: sum(fakes.running.values()) == 6, "six steps running")
        await settle()
        # Then six run at once, on two processes, and the fifth task waits
        assert sum(fakes.running.values()) == 6 and fakes.alive() == 2
        assert sorted(s["agents"]["busy"] for s in [await sup.stats()]) == [6]
        stats = await sup.stats()
        assert stats["actors"]["total"] == 2 and stats["actors"]["alive"] == 2
        assert stats["agents"] == {"busy": 6, "bound": 6, "total": 6}
        assert stats["queue_depth"] == 2  # the 4th and 5th task wait for places
        gate.set()
        return [(await result(sup, t)).status for t in ids]

    assert run(fakes, body, max_agents=6, max_agents_per_task=2, agents_per_actor=3) == ["succeeded"] * 5
    assert fakes.max_running_total == 6 and fakes.max_alive == 2
    assert len({s.actor for s in fakes.steps}) == 2  # no process was replaced


def test_a_tasks_agents_may_share_an_actor_when_one_actor_hosts_them_all(fakes):
    per_actor(fakes, 3)

    async def body(sup):
        t = await submit(sup, ["a", "b", "c"], after={})
        return (await result(sup, t)).status, t

    status, t = run(fakes, body, max_agents=3, max_agents_per_task=3, agents_per_actor=3)
    assert status == "succeeded" and len(set(fakes.procs(t))) == 1 and fakes.max_alive == 1


# -- deadlines ----------------------------------------------------------------------------

def test_a_deadline_that_kills_a_shared_actor_retries_the_co_tenants_naming_the_cause(fakes):
    per_actor(fakes, 3)
    b_started = asyncio.Event()

    async def stuck_once(call):  # ignores the stop: its actor has to be killed
        if call.attempt == 1:
            await call.hang()
        return "a done"

    async def co_tenant(call):
        call.tokens("b ")
        if call.attempt == 1:
            b_started.set()
            await call.hang()
        return "b done"

    fakes.script("a", stuck_once)
    fakes.script("b", co_tenant)

    async def body(sup):
        # Given task B, whose coder has committed, running b on the same actor as task A's a
        tb = await submit(sup, ["coder", "b"])
        await until(lambda: fakes.running.get(tb) == 1 and len(fakes.of(tb, "b")) == 1, "b running")
        ta = await submit(sup, ["a"], step_timeout_s=1)
        await until(lambda: fakes.running.get(ta) == 1, "a running")
        shared = fakes.actor(fakes.one(ta, "a").actor)
        assert shared.uid == fakes.one(tb, "b").actor
        # When a passes its step deadline and does not stop within the grace period
        await fakes.clock.elapse(1.01)
        await until(lambda: shared.stops, "a asked to stop")
        assert shared.killed is False
        await fakes.clock.elapse(STOP_GRACE_S + 0.01)
        ra, rb = await result(sup, ta), await result(sup, tb)
        return ta, tb, ra, rb, sup, shared

    ta, tb, ra, rb, sup, shared = run(fakes, body, max_agents=3, max_agents_per_task=2, agents_per_actor=3,
                                      step_timeout_s=60)
    # Then a timed out and was retried; b's attempt crashed, naming a's deadline, and was retried
    assert ra.status == "succeeded" and rb.status == "succeeded"
    crashed = first(sup, tb, "agent_crashed", "b")
    assert crashed["cause"] == f"killed at the step deadline of a/{ta}"
    assert [(s.attempt, s.how) for s in fakes.of(tb, "b")] == [(1, "killed"), (2, "ok")]
    # ...and nothing committed ran again
    assert len(fakes.of(tb, "coder")) == 1
    assert kinds(sup, ta, "a")[:3] == ["step_started", "step_timed_out", "retrying"]
    assert shared.killed and [key for _, key in shared.stops] == [f"{ta}:1:a:1"]


def test_a_step_that_stops_when_asked_spares_its_co_tenants(fakes):
    per_actor(fakes, 2)
    release_b = asyncio.Event()

    async def stoppable_once(call):
        if call.attempt == 1:
            await call.hang(stoppable=True)
        return "a done"

    async def co_tenant(call):
        call.tokens("b ")
        await release_b.wait()
        return "b done"

    fakes.script("a", stoppable_once)
    fakes.script("b", co_tenant)

    async def body(sup):
        tb = await submit(sup, ["b"])
        await until(lambda: fakes.running.get(tb) == 1, "b running")
        ta = await submit(sup, ["a"], step_timeout_s=1)
        await until(lambda: fakes.running.get(ta) == 1, "a running")
        # When a passes its deadline: it is asked to stop, and stops
        await fakes.clock.elapse(1.01)
        await until(lambda: fakes.of(ta, "a")[0].how == "stopped", "a stopped")
        await until(lambda: len(fakes.of(ta, "a")) == 2, "a retried")
        kills_then = list(fakes.kills)
        release_b.set()
        return ta, tb, await result(sup, ta), await result(sup, tb), kills_then

    ta, tb, ra, rb, kills_then = run(fakes, body, max_agents=2, max_agents_per_task=1, agents_per_actor=2,
                                     step_timeout_s=60)
    # Then no actor was killed, and b finished its first attempt
    assert kills_then == [] and ra.status == rb.status == "succeeded"
    assert [(s.attempt, s.how) for s in fakes.of(tb, "b")] == [(1, "ok")]


def test_a_crash_of_a_shared_process_ends_every_agent_on_it_and_they_are_retried(fakes):
    from fake_actors import ActorCrash

    per_actor(fakes, 2)
    both = asyncio.Event()

    async def crashes_once(call):
        if call.attempt == 1:
            await both.wait()
            raise ActorCrash()
        return "a done"

    async def co_tenant(call):
        if call.attempt == 1:
            both.set()
            await call.hang()
        return "b done"

    fakes.script("a", crashes_once)
    fakes.script("b", co_tenant)

    async def body(sup):
        ta = await submit(sup, ["a"])
        tb = await submit(sup, ["b"])
        return ta, tb, await result(sup, ta), await result(sup, tb), sup

    ta, tb, ra, rb, sup = run(fakes, body, max_agents=2, max_agents_per_task=1, agents_per_actor=2)
    assert ra.status == rb.status == "succeeded"
    assert [s.how for s in fakes.of(ta, "a")] == ["crash", "ok"]
    assert [s.how for s in fakes.of(tb, "b")] == ["killed", "ok"]
    assert "cause" not in first(sup, tb, "agent_crashed", "b")  # nobody killed it: it crashed


# -- the slot table: prewarm and recycling ------------------------------------------------

@pytest.fixture
def world(monkeypatch):
    w = FakeRay()
    monkeypatch.setattr(slots_mod.ray, "kill", w.kill)
    return w


def table(world: FakeRay, n: int, k: int, recycle_after: int = 100) -> SlotTable:
    return SlotTable(n, recycle_after, world.make, slot_name=lambda i: f"agent/{i}", per_actor=k)


def test_prewarm_starts_ceil_max_agents_over_k_processes(world):
    async def main():
        t = table(world, 5, 2)
        held = t.reserve("__prewarm__", t.free_count())
        for s in held:
            await t.wait_ready(s)
        assert len(held) == 5 and world.peak == 3 and sorted(world.live) == ["agent/0", "agent/1", "agent/2"]
        assert [s.name for s in t.slots] == ["agent/0.0", "agent/0.1", "agent/1.0", "agent/1.1", "agent/2.0"]
        await t.shutdown()

    asyncio.run(main())


def test_a_shared_actor_is_recycled_only_when_all_its_agents_are_idle(world):
    async def main():
        # Given one actor with two places, due after one task
        t = table(world, 2, 2, recycle_after=1)
        a = t.reserve("A", 1)
        b = t.reserve("B", 1)
        for s in a + b:
            await t.wait_ready(s)
        assert a[0].proc is b[0].proc
        # When B's agent is done while A's is still bound
        t.release(b[0])
        await settle()
        # Then the actor is due but not recycled: A still has an agent on it
        assert t.due(a[0]) and not a[0].replacing and t.recycles == 0 and ("kill", "agent/0") not in world.log
        # When A's agent is done too, it is recycled
        t.release(a[0])
        await settle()
        assert t.recycles == 1 and ("kill", "agent/0") in world.log
        await t.wait_ready(a[0])
        assert a[0].generation == 2 and world.peak == 1
        await t.shutdown()

    asyncio.run(main())


def test_places_spread_over_the_warm_actors(world):
    async def main():
        t = table(world, 4, 2)
        held = t.reserve("__prewarm__", 4)
        for s in held:
            await t.wait_ready(s)
            s.owner = None
        got = [t.reserve(f"t{i}", 1)[0] for i in range(2)]
        assert {s.proc.name for s in got} == {"agent/0", "agent/1"}
        await t.shutdown()

    asyncio.run(main())


def test_top_shows_agents_and_actors_separately():
    import io

    from rich.console import Console

    from threadbound.runtime.cli.top import render

    console = Console(width=160, record=True, file=io.StringIO())
    stats = {"name": "wide", "queue_depth": 0, "max_agents": 8, "busy": 5,
             "agents": {"busy": 5, "bound": 6, "total": 8},
             "actors": {"alive": 2, "replacing": 0, "total": 2, "agents_per_actor": 4}}
    console.print(render(stats, {"mode": "normal", "transitions": []}, []))
    head = console.export_text().splitlines()[0]
    assert "agents busy 5/8" in head and "actors 2/2 (4 agents each)" in head
