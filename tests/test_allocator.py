"""The global caps of a pool of several supervisor shards (``runtime.supervisor.allocator``).

Two or three plain ``Supervisor`` shards on one loop share one ``Allocator``, in-process
through :class:`InProcessAllocator` (``sync.options(...).remote(...)`` gives an awaitable,
as an actor handle's ObjectRef is; a restart loses the allocator's state and fails the
calls in flight, as Ray does for a dead actor), and one fake actor factory, so the most
agents running at once across all shards is read from its records. The last test runs
the allocator as a real Ray actor and kills it mid-run.
"""

from __future__ import annotations

import asyncio
import logging
import random

import pytest
from fake_actors import FakeActors
from ray.exceptions import ActorDiedError, ActorUnavailableError
from supervisor_harness import BLOBS, LIMIT_S, SEED, config, fakes, submit, until  # noqa: F401

from threadbound.agents.events import NORMAL, PAUSED
from threadbound.runtime.supervisor.allocator import Allocator, Share, allocator_name
from threadbound.runtime.supervisor.clock import FakeClock
from threadbound.runtime.supervisor.core import Supervisor
from threadbound.runtime.supervisor.places import PREWARM
from threadbound.runtime.task import ADMITTED, SUCCEEDED


class _Method:
    def __init__(self, call):
        self._call = call

    def options(self, **opts):
        return self

    def remote(self, *args):
        return self._call(*args)


class InProcessAllocator:
    """The allocator actor in this process. ``restart()``: Ray restarted it (its state is
    gone, calls in flight fail with ``ActorDiedError``); ``down``: it is restarting (calls
    fail with ``ActorUnavailableError``); ``gate[shard]``: an ``asyncio.Event`` a shard's
    calls wait for before they reach it (a slow link)."""

    def __init__(self, max_agents: int, shards: int) -> None:
        self.max_agents, self.shards = max_agents, shards
        self.impl = Allocator(max_agents, shards)
        self.down = False
        self.restarts = 0
        self.gate: dict[int, asyncio.Event] = {}
        self.calls: list[tuple[int, int]] = []  # (shard, wait_s > 0) of every call that reached it
        self._inflight: set[asyncio.Task] = set()
        self.sync = _Method(self._sync)

    def _sync(self, shard, incarnation, seq, held, wanted, wait_s=0.0):
        return asyncio.ensure_future(self._deliver(shard, incarnation, seq, dict(held), list(wanted), wait_s))

    async def _deliver(self, shard, *args):
        gate = self.gate.get(shard)
        if gate is not None:
            await gate.wait()
        if self.down:
            raise ActorUnavailableError("the allocator is restarting", None)
        self.calls.append((shard, args[-1] > 0))
        call = asyncio.ensure_future(self.impl.sync(shard, *args))
        self._inflight.add(call)
        try:
            return await asyncio.shield(call)
        except asyncio.CancelledError:
            if call.cancelled():  # the allocator died under it
                raise ActorDiedError() from None
            call.cancel()
            raise
        finally:
            self._inflight.discard(call)

    def restart(self) -> None:
        """Ray restarted the actor: a fresh allocator, the calls in flight failed."""
        for call in list(self._inflight):
            call.cancel()
        self.impl = Allocator(self.max_agents, self.shards)
        self.restarts += 1


def shard_actors(fakes: FakeActors, k: int, life: int = 0):
    """Shard ``k``'s actor factory: its slots' names carry the shard (and its life), so the
    shards' slot tables share the fakes without their names meeting."""
    return lambda name: fakes(f"{name}@s{k}.{life}")


def make_shard(fakes, cfg, k, allocator, record, life=0, clock=None) -> Supervisor:
    sup = Supervisor(cfg, BLOBS, make_actor=shard_actors(fakes, k, life), clock=clock or fakes.clock,
                     rng=random.Random(SEED + k), shard=k, allocator=allocator)
    launch = sup.life.launch

    def recorded(task_id, slots):
        record.launch(sup, task_id)
        launch(task_id, slots)

    sup.life.launch = recorded
    record.shards[k] = sup
    return sup


class Record:
    """Every launch across the shards, in order, with the agents bound in all shards then."""

    def __init__(self, alloc=None) -> None:
        self.alloc = alloc
        self.shards: dict[int, Supervisor] = {}
        self.launches: list[str] = []
        self.calls_at: dict[str, int] = {}  # task id -> calls the allocator had had when it launched
        self.most_bound = 0

    def bound(self) -> int:
        return sum(1 for sup in self.shards.values() for s in sup.slots.slots if s.owner not in (None, PREWARM))

    def launch(self, sup: Supervisor, task_id: str) -> None:
        self.launches.append(task_id)
        if isinstance(self.alloc, InProcessAllocator):
            self.calls_at[task_id] = len(self.alloc.calls)
        self.most_bound = max(self.most_bound, self.bound())


def run_shards(fakes, body, *, shards=3, allocator=None, **overrides):
    """Run ``body(shards, allocator, record)`` with ``shards`` supervisors sharing one
    allocator, then check: the pool's caps held across all shards at every launch, no
    shard's task beyond max_agents_per_task, shutdown left no actor alive and no budget held."""
    cfg = config(**overrides)

    async def main():
        alloc = allocator or InProcessAllocator(cfg.max_agents, shards)
        record = Record(alloc)
        for k in range(shards):
            make_shard(fakes, cfg, k, alloc, record)
        try:
            out = await asyncio.wait_for(body(record.shards, alloc, record), LIMIT_S)
        finally:
            for sup in list(record.shards.values()):
                await sup.shutdown(grace_s=0)
        assert fakes.violations == []
        assert record.most_bound <= cfg.max_agents, f"{record.most_bound} agents bound across the shards"
        assert fakes.max_running_total <= cfg.max_agents
        assert all(n <= cfg.max_agents_per_task for n in fakes.max_running.values())
        assert fakes.alive() == 0, "shutdown left agent actors alive"
        assert alloc.impl.in_use() == 0, f"shutdown left budget held: {alloc.impl.held}"
        return out

    return asyncio.run(main())


def until_set(release: asyncio.Event):
    """An agent script that holds its step until ``release`` is set."""
    async def blocks(call):
        await release.wait()
        return "done"

    return blocks


async def wait_all(sups, ids):
    for k, task_id in ids:
        await sups[k].wait(task_id, None)


def status(sups, k, task_id):
    return sups[k].tasks[task_id].status


# -- the allocator alone ------------------------------------------------------------------


def test_an_old_or_overtaken_call_never_rolls_the_books_back():
    async def main():
        a = Allocator(max_agents=2, shards=1)
        # Given shard 0 holding t1 (call 2 of its life started at 5.0)
        assert (await a.sync(0, (5.0, "new"), 2, {"t1": 1}, []))["held"] == {"t1": 1}
        # When an earlier call of that life, or a call of its previous life, arrives late
        assert (await a.sync(0, (5.0, "new"), 1, {"t1": 1, "t0": 1}, []))["stale"]
        assert (await a.sync(0, (1.0, "old"), 9, {"t0": 2}, []))["latest"] == ((5.0, "new"), 2)
        # Then the books keep what the newest call said
        assert a.held == {0: {"t1": 1}} and a.stale == 2

    asyncio.run(main())


def test_a_restarted_allocator_grants_nothing_until_every_shard_has_reported():
    async def main():
        a = Allocator(max_agents=2, shards=2)
        assert (await a.sync(0, (1.0, "a"), 1, {"t1": 1}, [("t2", 1, 0, 2.0)]))["held"] == {"t1": 1}
        assert not a.ready()
        # shard 1 holds one agent the fresh allocator had not heard of: t2 must still wait
        assert (await a.sync(1, (1.0, "b"), 1, {"u1": 1}, []))["held"] == {"u1": 1}
        assert a.held[0] == {"t1": 1} and a.in_use() == 2

    asyncio.run(main())


def test_a_shard_sends_the_head_of_its_queue_in_order_however_tasks_come_and_go():
    share = Share(None, 0, max_agents=4, incarnation=(0.0, "x"), on_grant=lambda: None,
                  submitted_at=lambda task_id: float(task_id[1:]))
    rng = random.Random(SEED)
    expect: dict[str, tuple[int, int, int]] = {}  # task id -> (-priority, order, agents)
    for order in range(400):
        op = rng.random()
        if op < 0.6 or not expect:
            task_id, prio, n = f"t{order}", rng.choice([0, 0, 0, 2]), rng.randint(1, 3)
            share.want(task_id, n, prio, order)
            expect[task_id] = (-prio, order, n)
        elif op < 0.8:  # ended or cancelled while waiting
            task_id = rng.choice(sorted(expect))
            share.withdraw(task_id)
            del expect[task_id]
        else:  # granted (what the allocator's answer does), then released and queued again
            task_id = min(expect, key=expect.get)
            share._apply({"held": {task_id: expect[task_id][2]}}, {})
            share.bound(task_id)
            share.drop(task_id)
            share.want(task_id, expect[task_id][2], -expect[task_id][0], order)
            expect[task_id] = (expect[task_id][0], order, expect[task_id][2])
        head = sorted(expect, key=expect.get)[:4]
        assert share._wanted() == [(t, expect[t][2], -expect[t][0], float(t[1:])) for t in head]
    for task_id in list(expect):
        share.withdraw(task_id)
    assert share._wanted() == [] and share._order == [], "entries of tasks no longer waiting are never cut off"


# -- shards sharing one allocator -----------------------------------------------------------


def test_caps_hold_across_three_shards_under_load(fakes):
    async def body(sups, alloc, record):
        ids = []
        for i in range(36):
            k = i % 3
            agents = ["a", "b"] if i % 2 else ["a"]
            ids.append((k, await submit(sups[k], agents, goal=f"t{i}", after={})))
        await wait_all(sups, ids)
        assert all(status(sups, k, t) == SUCCEEDED for k, t in ids)
        return record, ids

    async def slow(call):
        for _ in range(3):
            await asyncio.sleep(0.001)
        return call.role

    fakes.default = slow
    record, ids = run_shards(fakes, body, shards=3, max_agents=3, max_agents_per_task=2)
    assert len(record.launches) == 36
    assert fakes.max_running_total == 3, "the load never filled the pool: the test would prove nothing"
    assert record.most_bound == 3


def test_tasks_across_shards_start_by_priority_then_submission(fakes):
    async def body(sups, alloc, record):
        release = asyncio.Event()
        blocks = until_set(release)
        fakes.scripts["c"] = blocks
        blocker = await submit(sups[0], ["c"])
        await until(lambda: status(sups, 0, blocker) == "running", "the blocker runs")
        # Submitted in this order, across shards: only the high-priority one overtakes.
        order = [(1, 0), (0, 0), (2, 5), (1, 0), (2, 0), (0, 3)]
        ids = [(k, await submit(sups[k], ["a"], goal=f"w{i}", priority=p)) for i, (k, p) in enumerate(order)]
        heads = {ids[2][1], ids[5][1], ids[0][1]}  # each shard's first in its own order
        await until(lambda: {w[0] for ws in alloc.impl.wanted.values() for w in ws} == heads,
                    "the allocator knows the head of every shard's queue")
        assert record.launches == [blocker], "nothing may start while the pool's one agent is busy"
        release.set()
        await wait_all(sups, ids)
        expected = [ids[2], ids[5], ids[0], ids[1], ids[3], ids[4]]
        assert record.launches[1:] == [t for _, t in expected]

    run_shards(fakes, body, shards=3, max_agents=1, max_agents_per_task=1)


def test_an_agent_freed_in_one_shard_admits_the_task_waiting_in_another(fakes):
    async def body(sups, alloc, record):
        release = asyncio.Event()
        blocks = until_set(release)
        fakes.scripts["c"] = blocks
        busy = await submit(sups[0], ["c", "a"], after={})
        await until(lambda: status(sups, 0, busy) == "running", "shard 0's task runs")
        waiting = await submit(sups[1], ["a"])
        await until(lambda: alloc.impl.wanted.get(1) and set(alloc.impl._listening) == {0, 1},
                    "shard 1 waits for budget; both shards listen")
        calls = len(alloc.calls)
        for _ in range(50):  # the loop turns; nothing changes, so nobody calls
            await asyncio.sleep(0)
        assert len(alloc.calls) == calls, "a waiting shard must listen, not poll"
        assert ADMITTED not in [row[1] for row in sups[1].tasks[waiting].events]
        release.set()
        await sups[1].wait(waiting, None)
        assert record.launches == [busy, waiting]
        assert status(sups, 1, waiting) == SUCCEEDED
        # Shard 0 said it released; shard 1 heard of it in the listen it had out, calling nothing.
        between = alloc.calls[calls:record.calls_at[waiting]]
        assert between and all(shard == 0 for shard, _ in between), between
        stats = (await sups[1].stats())["allocator"]
        assert stats["grants"] == 1 and stats["waited_s"] > 0

    run_shards(fakes, body, shards=2, max_agents=2, max_agents_per_task=2)


def test_a_restarted_allocator_relearns_what_each_shard_holds_without_exceeding_the_cap(fakes):
    async def body(sups, alloc, record):
        release = asyncio.Event()
        blocks = until_set(release)
        fakes.scripts["c"] = blocks
        held0 = await submit(sups[0], ["c"])
        held1 = await submit(sups[1], ["c"])
        await until(lambda: alloc.impl.in_use() == 2 and set(alloc.impl._listening) == {0, 1},
                    "each shard holds one agent, and listens")
        first = sorted([held0, held1])
        # When the allocator restarts empty and shard 1's calls are slow to reach it
        alloc.gate[1] = asyncio.Event()
        alloc.restart()
        new = await submit(sups[0], ["a"])
        await until(lambda: 0 in alloc.impl.held and alloc.impl.wanted.get(0), "shard 0 reported again")
        for _ in range(50):
            await asyncio.sleep(0)
        # Then shard 0's new task waits: the fresh allocator has not heard from shard 1
        assert sorted(record.launches) == first
        alloc.gate[1].set()
        await until(lambda: 1 in alloc.impl.held, "shard 1 reported again")
        assert alloc.impl.held == {0: {held0: 1}, 1: {held1: 1}}
        assert sorted(record.launches) == first, "the pool's two agents are busy"
        release.set()
        await wait_all(sups, [(0, held0), (1, held1), (0, new)])
        assert sorted(record.launches[:2]) == first and record.launches[2:] == [new]
        assert (await sups[1].stats())["allocator"]["failures"] >= 1

    run_shards(fakes, body, shards=2, max_agents=2, max_agents_per_task=1)


def test_an_allocator_that_does_not_answer_stops_new_tasks_only_and_is_caught_up_with(fakes, caplog):
    async def body(sups, alloc, record):
        release = asyncio.Event()
        blocks = until_set(release)
        fakes.scripts["c"] = blocks
        running = await submit(sups[0], ["c"])
        await until(lambda: status(sups, 0, running) == "running" and set(alloc.impl._listening) == {0, 1},
                    "a task runs; both shards listen")
        # When the allocator goes away (restarting, its calls failing)
        alloc.down = True
        alloc.restart()
        new = await submit(sups[1], ["a"])
        await until(lambda: sups[1].capacity.share.stats["failures"] >= 3, "shard 1 retried")
        # Then what runs goes on, nothing new starts
        release.set()
        await sups[0].wait(running, None)
        assert status(sups, 0, running) == SUCCEEDED
        assert record.launches == [running]
        # And once it is back, both shards say what they hold and the waiting task runs
        alloc.down = False
        await sups[1].wait(new, None)
        assert status(sups, 1, new) == SUCCEEDED and record.launches == [running, new]
        stats = (await sups[1].stats())["allocator"]
        assert stats["available"] and stats["grants"] == 1

    with caplog.at_level(logging.WARNING, logger="threadbound.allocator"):
        run_shards(fakes, body, shards=2, max_agents=1, max_agents_per_task=1)
    gone = [r for r in caplog.records if "does not answer" in r.getMessage()]
    back = [r for r in caplog.records if "answers again" in r.getMessage()]
    assert len(gone) == 2 and len(back) == 2, "each shard logs the outage once, and the return once"


def test_a_paused_shard_takes_no_budget_from_the_others(fakes):
    async def body(sups, alloc, record):
        # Given shard 0 paused (its health) with a task queued first
        sups[0].health.monitor.restore(PAUSED)
        sups[0].life.pump()
        first = await submit(sups[0], ["a"])
        await until(lambda: 0 in alloc.impl.held and alloc.impl.wanted.get(0) == [], "shard 0 says it wants nothing")
        # When shard 1 queues one after it, then shard 0 is well again
        second = await submit(sups[1], ["a"])
        await sups[1].wait(second, None)
        assert record.launches == [second], "a paused shard's task must not hold the pool's budget"
        sups[0].health.monitor.restore(NORMAL)
        sups[0].life.pump()
        await sups[0].wait(first, None)
        assert record.launches == [second, first]
        assert sups[0].capacity.share.stats["grants"] == 1

    run_shards(fakes, body, shards=2, max_agents=1, max_agents_per_task=1)


def _die(sup: Supervisor) -> list:
    """The shard's process dies: no call of it reaches the allocator any more, its runs stop,
    and its agent actors die with it (as Ray kills the actors a dead owner created)."""
    share = sup.capacity.share
    share._closed = True
    share._loop_task.cancel()
    sup._ticker.cancel()
    runners = [ts.run.runner for ts in sup.tasks.values() if ts.run.runner is not None]
    for r in runners:
        r.cancel()
    return runners


@pytest.mark.parametrize("clock_behind", [False, True], ids=["same-clock", "its-new-node-clock-behind"])
def test_a_dead_shard_keeps_its_budget_until_it_is_back_and_says_what_it_holds(fakes, clock_behind):
    cfg = config(max_agents=2, max_agents_per_task=2)

    async def body(sups, alloc, record):
        blocks = until_set(asyncio.Event())  # (never set: it runs until the shard stops it)
        fakes.scripts["c"] = blocks
        old = sups[1]
        lost = await submit(old, ["c", "b"], after={})
        await until(lambda: status(sups, 1, lost) == "running" and alloc.impl.in_use() == 2, "shard 1 holds all")
        # When shard 1 dies
        await asyncio.gather(*_die(old), return_exceptions=True)
        await old.slots.shutdown()
        waiting = await submit(sups[0], ["a"])
        await until(lambda: alloc.impl.wanted.get(0), "shard 0 asks")
        for _ in range(50):
            await asyncio.sleep(0)
        # Then its budget stays held: shard 0's task waits
        assert alloc.impl.held[1] == {lost: 2}
        assert record.launches == [lost]
        # When shard 1 comes back (a new life, holding nothing yet) the budget is free again
        # (on a node whose wall clock may be an hour behind the one it ran on)
        clock = FakeClock(wall_start=fakes.clock.time() - 3600) if clock_behind else None
        make_shard(fakes, cfg, 1, alloc, record, life=1, clock=clock)
        await sups[0].wait(waiting, None)
        assert status(sups, 0, waiting) == SUCCEEDED
        assert record.launches == [lost, waiting]

    run_shards(fakes, body, shards=2, max_agents=2, max_agents_per_task=2)


def test_shutdown_gives_every_agent_back(fakes):
    async def body(sups, alloc, record):
        release = asyncio.Event()
        blocks = until_set(release)
        fakes.scripts["c"] = blocks
        t = await submit(sups[0], ["c"])
        await until(lambda: alloc.impl.held.get(0) == {t: 1}, "shard 0 holds an agent")
        await record.shards.pop(0).shutdown(grace_s=0)
        assert alloc.impl.held[0] == {}

    run_shards(fakes, body, shards=2, max_agents=1, max_agents_per_task=1)


def test_one_shard_pools_never_call_an_allocator(fakes):
    from supervisor_harness import run

    async def body(sup):
        assert sup.capacity.share is None
        t = await submit(sup, ["a"])
        await sup.wait(t, None)
        return await sup.stats()

    assert run(fakes, body)["allocator"] is None


# -- the allocator as a Ray actor ---------------------------------------------------------


def test_caps_hold_while_ray_restarts_a_killed_allocator(ray_session, fakes):
    ray = ray_session
    cfg = config(max_agents=2, max_agents_per_task=1, name="alloc-ray")
    actor_cls = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)(Allocator)
    handle = actor_cls.options(name=allocator_name(cfg.name), namespace="threadbound-tests").remote(2, 2)

    async def main():
        record = Record()
        sups = [make_shard(fakes, cfg, k, handle, record) for k in range(2)]
        release = asyncio.Event()

        async def first_ones(call):
            await release.wait()
            return "done"

        fakes.scripts["c"] = first_ones
        try:
            ids = []
            for i in range(4):  # one running in each shard, one waiting in each
                k = i % 2
                ids.append((k, await submit(sups[k], ["c"], goal=f"held {i}")))
                if i < 2:
                    await until(lambda: len(record.launches) == i + 1, f"shard {k}'s first task runs")
            before = await handle.describe.remote()
            assert before["in_use"] == 2
            # When Ray restarts the allocator mid-run
            ray.kill(handle, no_restart=False)
            more = [(i % 2, await submit(sups[i % 2], ["a"], goal=f"more {i}")) for i in range(10)]
            # Then once Ray has restarted it, it relearns what both shards hold before granting
            relearned = None
            for _ in range(600):
                relearned = await handle.describe.remote()
                if relearned["ready"] and relearned["calls"] >= 2:
                    break
                await asyncio.sleep(0.05)
            assert relearned["held"] == {0: {ids[0][1]: 1}, 1: {ids[1][1]: 1}}, relearned
            assert len(record.launches) == 2, "a task started while the pool's two agents were busy"
            release.set()
            await asyncio.wait_for(wait_all(sups, ids + more), 60)
            assert all(status(sups, k, t) == SUCCEEDED for k, t in ids + more)
            after = await handle.describe.remote()
            assert after["most_in_use"] <= 2 and after["ready"]
            # (Ray retries the shards' calls across the restart, so a shard may or may not see one
            # fail: the new process, relearning both shards' holdings above, is the proof)
            assert after["pid"] != before["pid"], "Ray did not restart the allocator"
        finally:
            for sup in sups:
                await sup.shutdown(grace_s=0)
        assert (await handle.describe.remote())["in_use"] == 0
        return record

    try:
        record = asyncio.run(main())
    finally:
        ray.kill(handle, no_restart=True)
    assert len(record.launches) == 14
    assert record.most_bound <= 2 and fakes.max_running_total <= 2
    assert fakes.violations == [] and fakes.alive() == 0


def test_shards_whose_allocator_is_not_there_start_nothing_until_it_is(ray_session, fakes):
    """Fails closed: without the pool's allocator a shard does not keep the caps by
    itself (two shards would run twice max_agents); it starts nothing until the
    allocator is registered under its name, then runs everything under the one cap."""
    from threadbound.runtime.actors import find_allocator

    ray = ray_session
    cfg = config(max_agents=2, max_agents_per_task=1, name="alloc-late", shards=2)
    actor_cls = ray.remote(num_cpus=0)(Allocator)
    handle = None

    async def main():
        nonlocal handle
        record = Record()
        # Given two shards whose allocator (looked up by name, as a Ray-started shard does) is not there
        sups = [make_shard(fakes, cfg, k, find_allocator(cfg), record) for k in range(2)]
        try:
            ids = [(i % 2, await submit(sups[i % 2], ["a"], goal=f"t{i}")) for i in range(6)]
            # When they have looked for it several times
            await until(lambda: all(s.capacity.share.stats["failures"] >= 3 for s in sups), "the shards retried")
            # Then no task started, in either shard
            assert record.launches == [] and fakes.steps == []
            assert all(not s.capacity.share.available for s in sups)
            # When the allocator is registered under the pool's name
            handle = actor_cls.options(name=allocator_name(cfg.name), namespace=cfg.ray.namespace).remote(2, 2)
            # Then every task runs, never more than the pool's two agents at once
            await asyncio.wait_for(wait_all(sups, ids), 60)
            assert all(status(sups, k, t) == SUCCEEDED for k, t in ids)
        finally:
            for sup in sups:
                await sup.shutdown(grace_s=0)
        return record

    try:
        record = asyncio.run(main())
    finally:
        if handle is not None:
            ray.kill(handle, no_restart=True)
    assert len(record.launches) == 6 and record.most_bound <= 2 and fakes.max_running_total <= 2
    assert fakes.violations == []
