"""The supervisor's behaviour without Ray: admission and caps, the agent graph, rounds,
deadlines, retries, cancellation and hooks, in milliseconds.

The supervisor runs as the plain class on one asyncio loop, with fake agent actors
(``tests/fake_actors.py``) whose steps are scripted per role, an injected clock and a
seeded random. Assertions are about the order of events and counts -- which steps
overlapped, which actors were killed, how many were alive at once -- never about how
many seconds passed. Real Ray is covered by test_pool_*.py.
"""

from __future__ import annotations

import asyncio
import logging
import random

import pytest
from fake_actors import DEAD, ActorCrash, hangs
from supervisor_harness import (  # noqa: F401  (fakes: a fixture)
    BLOBS, SEED, config, fakes, first, index, kinds, log, result, run, submit, until,
)

from threadbound.agents.errors import AgentError, TransientError
from threadbound.runtime.errors import InvalidTask
from threadbound.runtime.supervisor.hooks import Hook
from threadbound.runtime.supervisor.retry import backoff_s
from threadbound.runtime.task import Task

class Admitted(Hook):
    """Records the order in which tasks were admitted."""

    def __init__(self) -> None:
        self.order: list[str] = []

    def on_event(self, task, row) -> None:
        if row[1] == "admitted":
            self.order.append(task.id)


def gated(gate: asyncio.Event):
    """A script that holds its slot while ``inputs["block"]`` until ``gate`` is set."""
    async def script(call):
        if call.inputs.get("block"):
            await gate.wait()
        return f"{call.role}@{call.round}"
    return script


# -- admission ----------------------------------------------------------------------------


def test_tasks_beyond_the_caps_wait_in_the_queue_and_all_succeed(fakes):
    # Given a pool of 3 actors, at most 2 per task, and tasks of 2 and 1 parallel roles
    async def step(call):
        await asyncio.sleep(0.002)
        return call.role

    fakes.default = step
    order = Admitted()

    async def body(sup):
        # When six tasks arrive at once
        ids = []
        for i in range(6):
            if i % 2 == 0:
                ids.append(await submit(sup, ["a", "b"], after={}))
            else:
                ids.append(await submit(sup, ["c"]))
        # Then the first two hold all 3 actors and the others wait, pending, not failed
        statuses = [sup.tasks[t].status for t in ids]
        assert statuses == ["admitted"] * 2 + ["pending"] * 4
        assert (await sup.stats())["queue_depth"] == 4
        results = [await result(sup, t) for t in ids]
        assert [r.status for r in results] == ["succeeded"] * 6
        assert order.order == ids  # first come, first served
        for t in ids[::2]:  # the two roles of a wide task did run at the same time
            assert fakes.max_running[t] == 2
        assert [len(first(sup, t, "admitted")["slots"]) for t in ids] == [2, 1] * 3

    run(fakes, body, hooks=[order], max_agents=3, max_agents_per_task=2)
    assert fakes.max_alive == 3 and fakes.max_running_total == 3


def test_the_cap_holds_while_killed_actors_are_replaced(fakes):
    # Given actors that take a while to die once killed and to start
    fakes.linger_pings, fakes.start_delay_s = 2, 0.002

    async def step(call):
        if call.inputs.get("hang") and call.attempt == 1:
            await call.hang()
        return call.role

    fakes.default = step

    async def body(sup):
        # When the steps of two tasks time out (their actors are killed and replaced)
        # while more tasks queue for the same two actors
        ids = [await submit(sup, ["a"], inputs={"hang": True}, step_timeout_s=0.02) for _ in range(2)]
        ids += [await submit(sup, ["b"]) for _ in range(2)]
        results = [await result(sup, t) for t in ids]
        # Then every task succeeds, and never were more than 2 actors alive
        assert [r.status for r in results] == ["succeeded"] * 4
        assert len(fakes.kills) == 2 and len(fakes.deaths) == 2
        assert (await sup.stats())["replacements"] == 2

    run(fakes, body, max_agents=2, max_agents_per_task=1)
    assert fakes.max_alive == 2 and len(fakes.actors) == 4


def test_queued_tasks_are_admitted_first_come_first_served(fakes):
    gate = asyncio.Event()
    fakes.default = gated(gate)
    order = Admitted()

    async def body(sup):
        blocker = await submit(sup, ["a"], inputs={"block": True})
        queued = [await submit(sup, ["a"]) for _ in range(3)]
        await until(lambda: fakes.of(blocker), "the blocker's step started")
        assert [sup.tasks[t].status for t in queued] == ["pending"] * 3
        gate.set()
        for t in queued:
            assert (await result(sup, t)).ok
        assert order.order == [blocker, *queued]
        assert [s.task_id for s in fakes.steps] == [blocker, *queued]

    run(fakes, body, hooks=[order], max_agents=1, max_agents_per_task=1)


def test_higher_priority_is_admitted_first_and_equal_priorities_keep_their_order(fakes):
    gate = asyncio.Event()
    fakes.default = gated(gate)
    order = Admitted()

    async def body(sup):
        blocker = await submit(sup, ["a"], inputs={"block": True})
        low = await submit(sup, ["a"], priority=0)
        high = await submit(sup, ["a"], priority=5)
        mid = await submit(sup, ["a"], priority=1)
        high2 = await submit(sup, ["a"], priority=5)
        gate.set()
        for t in (low, high, mid, high2):
            assert (await result(sup, t)).ok
        assert order.order == [blocker, high, high2, mid, low]

    run(fakes, body, hooks=[order], max_agents=1, max_agents_per_task=1)


def test_a_queued_wide_task_is_not_overtaken_by_a_narrow_one_behind_it(fakes):
    gate = asyncio.Event()
    fakes.default = gated(gate)
    order = Admitted()

    async def body(sup):
        blocker = await submit(sup, ["a"], inputs={"block": True})
        wide = await submit(sup, ["a", "b"], after={})
        narrow = await submit(sup, ["c"])
        # One actor is free and the narrow task would fit it, but the wide one is first
        assert sup.slots.free_count() == 1
        assert sup.tasks[narrow].status == "pending"
        gate.set()
        assert (await result(sup, narrow)).ok and (await result(sup, wide)).ok
        assert order.order == [blocker, wide, narrow]

    run(fakes, body, hooks=[order], max_agents=2, max_agents_per_task=2)


# -- the agent graph ----------------------------------------------------------------------


def test_tester_and_reviewer_run_together_after_the_coder(fakes):
    started: dict[int, set] = {1: set(), 2: set()}
    together = {1: asyncio.Event(), 2: asyncio.Event()}

    async def check(call):
        started[call.round].add(call.role)
        if started[call.round] == {"tester", "reviewer"}:
            together[call.round].set()
        # Run one after the other, each would wait here for the other in vain.
        await asyncio.wait_for(together[call.round].wait(), 2)
        if call.role == "reviewer" and call.round == 1:
            call.request_round("reviewer: rename x")
        return f"{call.role}@{call.round}"

    fakes.script("tester", check)
    fakes.script("reviewer", check)

    async def body(sup):
        tid = await submit(sup, ["coder", "tester", "reviewer"],
                           after={"tester": ["coder"], "reviewer": ["coder"]})
        res = await result(sup, tid)
        assert res.status == "succeeded" and res.rounds == 2
        assert res.outputs == {"coder": "coder@2", "tester": "tester@2", "reviewer": "reviewer@2"}
        for rnd in (1, 2):
            coder, tester, reviewer = (fakes.one(tid, r, rnd) for r in ("coder", "tester", "reviewer"))
            assert coder.end < tester.start and coder.end < reviewer.start
            assert tester.overlaps(reviewer)
            assert index(sup, tid, "step_finished", "coder", round=rnd) < min(
                index(sup, tid, "step_started", "tester", round=rnd),
                index(sup, tid, "step_started", "reviewer", round=rnd))
            assert first(sup, tid, "step_started", "coder", round=rnd)["running"] == ["coder"]
            for role in ("tester", "reviewer"):
                assert first(sup, tid, "step_started", role, round=rnd)["running"] == ["reviewer", "tester"]
        assert fakes.max_running[tid] == 2
        # each step is a Ray task named <role>/<task id>
        assert {s.ray_task_name for s in fakes.of(tid)} == {f"{r}/{tid}" for r in ("coder", "tester", "reviewer")}

    run(fakes, body)


def test_a_step_sees_the_outputs_of_the_roles_it_comes_after_not_of_those_beside_it(fakes):
    async def step(call):
        if call.role == "tester" and call.round == 1:
            call.request_round("tests fail")
        return f"{call.role}@{call.round}"

    fakes.default = step

    async def body(sup):
        tid = await submit(sup, ["coder", "tester", "reviewer"],
                           after={"tester": ["coder"], "reviewer": ["coder"]})
        assert (await result(sup, tid)).ok
        # Round 1: this round's coder output; nothing of the role running alongside
        assert fakes.one(tid, "coder", 1).outputs == {}
        assert fakes.one(tid, "tester", 1).outputs == {"coder": "coder@1"}
        assert fakes.one(tid, "reviewer", 1).outputs == {"coder": "coder@1"}
        # Round 2: this round's coder output, the others' as the round began
        before = {"coder": "coder@1", "tester": "tester@1", "reviewer": "reviewer@1"}
        assert fakes.one(tid, "coder", 2).outputs == before
        assert fakes.one(tid, "tester", 2).outputs == {**before, "coder": "coder@2"}
        assert fakes.one(tid, "reviewer", 2).outputs == {**before, "coder": "coder@2"}
        assert [s.feedback for s in fakes.of(tid) if s.round == 2] == [["tests fail"]] * 3
        assert first(sup, tid, "round_started", None, round=2)["feedback"] == ["tests fail"]

    run(fakes, body)


def test_without_after_roles_run_one_after_another_in_list_order(fakes):
    async def body(sup):
        tid = await submit(sup, ["c", "a", "b"])
        assert (await result(sup, tid)).ok
        c, a, b = (fakes.one(tid, r) for r in ("c", "a", "b"))
        assert fakes.order(tid) == ["c", "a", "b"]
        assert c.end < a.start and a.end < b.start
        assert fakes.max_running[tid] == 1
        assert a.outputs == {"c": "c@1"} and b.outputs == {"c": "c@1", "a": "a@1"}
        for role in ("c", "a", "b"):
            assert first(sup, tid, "step_started", role)["running"] == [role]

    run(fakes, body)


def test_independent_roles_run_at_once_up_to_the_per_task_cap_and_the_rest_wait(fakes):
    started = {r: asyncio.Event() for r in "abc"}

    async def step(call):
        started[call.role].set()
        if call.role == "a":
            await asyncio.wait_for(started["b"].wait(), 2)  # a still runs when b starts
        if call.role == "b":
            await asyncio.wait_for(started["c"].wait(), 2)  # b still runs when c starts
        return f"{call.role}@{call.round}"

    fakes.default = step

    async def body(sup):
        tid = await submit(sup, ["a", "b", "c"], after={})
        assert (await result(sup, tid)).ok
        a, b, c = (fakes.one(tid, r) for r in ("a", "b", "c"))
        assert a.overlaps(b) and b.overlaps(c)
        assert a.end < c.start  # c waited for a slot: it queued, it did not fail
        assert fakes.max_running[tid] == 2
        assert c.actor == a.actor  # it got the actor a was done with
        assert len(first(sup, tid, "admitted")["slots"]) == 2
        assert not {"step_failed", "retrying"} & set(kinds(sup, tid))
        # a had committed when c started, but c does not come after a
        assert c.outputs == {}

    run(fakes, body, max_agents=3, max_agents_per_task=2)


@pytest.mark.parametrize("agents, after, names", [
    (["coder", "tester"], {"tester": ["ghost"]}, "'ghost'"),
    (["coder", "tester"], {"ghost": ["coder"]}, "'ghost'"),
    (["a", "b", "c"], {"a": ["b"], "b": ["c"], "c": ["a"]}, "a -> b -> c -> a"),
    (["a", "b"], {"a": ["a"]}, "'a' comes after itself"),
], ids=["unknown-dependency", "unknown-role", "cycle", "self"])
def test_a_bad_graph_is_refused_naming_the_roles(fakes, agents, after, names):
    async def body(sup):
        with pytest.raises(InvalidTask, match=names) as err:
            await submit(sup, agents, after=after)
        assert err.value.field == "after"
        assert sup.tasks == {}

    run(fakes, body)
    assert fakes.actors == []


# -- rounds -------------------------------------------------------------------------------


def test_a_task_whose_agents_keep_asking_for_rounds_fails_after_max_rounds(fakes):
    async def step(call):
        call.request_round(f"again after round {call.round}")
        return call.round

    fakes.script("a", step)

    async def body(sup):
        tid = await submit(sup, ["a", "b"], after={}, max_rounds=3)
        res = await result(sup, tid)
        assert res.status == "failed" and res.reason == "rounds" and res.rounds == 3
        assert "no success after 3 round(s)" in res.error and "again after round 3" in res.error
        assert [s.round for s in fakes.of(tid, "a")] == [1, 2, 3]
        assert [s.round for s in fakes.of(tid, "b")] == [1, 2, 3]  # a request of a, a round for all
        assert [d["round"] for k, _, d in log(sup, tid, None) if k == "round_started"] == [1, 2, 3]
        assert fakes.one(tid, "b", round=3).feedback == ["again after round 2"]

    run(fakes, body)


# -- deadlines ----------------------------------------------------------------------------


def test_a_hanging_step_times_out_its_actor_is_replaced_and_it_is_retried(fakes):
    async def step(call):
        if call.attempt == 1:
            call.tokens("partial ")
            await call.hang()
        return "done"

    fakes.script("a", step)

    async def body(sup):
        tid = await submit(sup, ["a"], step_timeout_s=0.03)
        res = await result(sup, tid)
        assert res.status == "succeeded" and res.outputs == {"a": "done"}
        assert [(k, d["attempt"]) for k, _, d in log(sup, tid, "a")] == [
            ("step_started", 1), ("tokens", 1), ("step_timed_out", 1), ("retrying", 2),
            ("step_started", 2), ("step_finished", 2)]
        timed_out = first(sup, tid, "step_timed_out", "a")
        assert timed_out["partial"] == "partial " and timed_out["limit_s"] == 0.03
        assert first(sup, tid, "retrying", "a")["reason"] == "timeout"
        one, two = fakes.one(tid, "a", attempt=1), fakes.one(tid, "a", attempt=2)
        assert one.how == "killed" and fakes.actor(one.actor).killed
        assert fakes.actor(one.actor).state == DEAD
        assert two.actor != one.actor and two.pid != one.pid
        assert first(sup, tid, "step_started", "a", attempt=2)["pid"] == two.pid
        assert (await sup.stats())["replacements"] == 1

    run(fakes, body)


def test_the_step_deadline_counts_the_whole_step_not_the_gaps_between_tokens(fakes):
    # Given a step that streams forever, each token a second later on the pool's clock
    async def step(call):
        while True:
            call.tokens("t", clock_s=1.0)
            await asyncio.sleep(0)

    fakes.script("a", step)

    async def body(sup):
        tid = await submit(sup, ["a"], step_timeout_s=5)
        res = await result(sup, tid)
        # Then it is stopped when its 5 s are up, with the 5 tokens it streamed
        assert res.status == "timed_out" and res.reason == "step_timeout"
        timed_out = first(sup, tid, "step_timed_out", "a")
        # (the pool's clock also moves with real time, which adds a little to the 5 s of tokens)
        assert timed_out["partial"] == "ttttt" and 5.0 <= timed_out["elapsed_s"] < 5.1
        assert kinds(sup, tid, "a") == ["step_started"] + ["tokens"] * 5 + ["step_timed_out"]
        assert "exceeded its step timeout of 5.000s" in res.error
        await until(lambda: fakes.one(tid, "a").how == "killed", "the step's actor was killed")

    run(fakes, body, retry={"max_attempts": 1})


def test_the_task_timeout_ends_every_running_step_of_the_task(fakes):
    fakes.script("a", hangs)
    fakes.script("b", hangs)

    async def body(sup):
        tid = await submit(sup, ["a", "b"], after={}, task_timeout_s=0.05)
        res = await result(sup, tid)
        assert res.status == "timed_out" and res.reason == "timeout"
        assert first(sup, tid, "timed_out", None)["limit_s"] == 0.05
        a, b = fakes.one(tid, "a"), fakes.one(tid, "b")
        assert a.overlaps(b)
        await until(lambda: a.how == b.how == "killed", "both steps' actors were killed")
        assert fakes.actor(a.actor).killed and fakes.actor(b.actor).killed
        assert not {"step_finished", "step_timed_out", "retrying"} & set(kinds(sup, tid))
        # the pool goes on with fresh actors
        nxt = await submit(sup, ["c"])
        assert (await result(sup, nxt)).ok
        assert fakes.one(nxt, "c").actor not in (a.actor, b.actor)

    run(fakes, body, max_agents=2, max_agents_per_task=2)


# -- retries ------------------------------------------------------------------------------


def test_a_transient_error_is_retried_as_the_next_attempt_on_the_same_actor(fakes):
    async def step(call):
        if call.attempt == 1:
            call.tokens("x ")
            call.emit("progress", {"i": 1})
            raise TransientError("service busy")
        call.tokens("y ")
        return "done"

    fakes.script("a", step)

    async def body(sup):
        tid = await submit(sup, ["a"])
        res = await result(sup, tid)
        assert res.ok and res.outputs == {"a": "done"}
        # every event of the step carries its attempt; the retry announces the next one
        assert [(k, d["attempt"]) for k, _, d in log(sup, tid, "a")] == [
            ("step_started", 1), ("tokens", 1), ("progress", 1), ("step_failed", 1), ("retrying", 2),
            ("step_started", 2), ("tokens", 2), ("step_finished", 2)]
        failed = first(sup, tid, "step_failed", "a")
        assert failed["transient"] is True and failed["error_class"] == "transient"
        assert failed["error"] == "TransientError: service busy"
        retrying = first(sup, tid, "retrying", "a")
        # the backoff comes from the injected random
        policy = sup.cfg.retry.for_class("transient")
        assert retrying["reason"] == "transient"
        assert retrying["delay_s"] == round(backoff_s(policy, 1, random.Random(SEED)), 3)
        # the actor reported how its step ended: it is kept, not killed
        one, two = fakes.one(tid, "a", attempt=1), fakes.one(tid, "a", attempt=2)
        assert one.actor == two.actor and fakes.kills == []

    run(fakes, body)


def test_a_non_retryable_error_fails_the_task_at_once(fakes):
    async def step(call):
        raise AgentError("bad input")

    fakes.script("a", step)

    async def body(sup):
        tid = await submit(sup, ["a"])
        res = await result(sup, tid)
        assert res.status == "failed" and res.reason == "step_failed"
        assert "AgentError: bad input" in res.error and "attempt(s)" not in res.error
        assert kinds(sup, tid, "a") == ["step_started", "step_failed"]
        assert len(fakes.of(tid)) == 1 and fakes.kills == []

    run(fakes, body)


def test_a_transient_error_fails_the_task_once_its_attempts_are_used_up(fakes):
    async def step(call):
        raise TransientError("still busy")

    fakes.script("a", step)

    async def body(sup):
        tid = await submit(sup, ["a"])
        res = await result(sup, tid)
        assert res.status == "failed" and res.reason == "step_failed"
        assert res.error.endswith("after 2 attempt(s)")
        assert [s.attempt for s in fakes.of(tid)] == [1, 2]
        assert kinds(sup, tid, "a") == ["step_started", "step_failed", "retrying", "step_started", "step_failed"]

    run(fakes, body, retry={"max_attempts": 2, "backoff_s": 0.001})


def test_a_crashed_actor_is_replaced_and_the_step_retried_on_the_new_one(fakes):
    async def step(call):
        if call.attempt == 1:
            call.tokens("half ")
            raise ActorCrash()
        return "done"

    fakes.script("a", step)

    async def body(sup):
        tid = await submit(sup, ["a"])
        res = await result(sup, tid)
        assert res.ok and res.outputs == {"a": "done"}
        assert [(k, d["attempt"]) for k, _, d in log(sup, tid, "a")] == [
            ("step_started", 1), ("tokens", 1), ("agent_crashed", 1), ("retrying", 2),
            ("step_started", 2), ("step_finished", 2)]
        assert "ActorDiedError" in first(sup, tid, "agent_crashed", "a")["error"]
        assert first(sup, tid, "retrying", "a")["reason"] == "crash"
        one, two = fakes.one(tid, "a", attempt=1), fakes.one(tid, "a", attempt=2)
        assert one.how == "crash" and fakes.actor(one.actor).state == DEAD
        assert two.actor != one.actor

    run(fakes, body)


def test_an_actor_that_cannot_start_is_a_crash_of_the_step_and_is_retried(fakes):
    class DeadOnArrival(type(fakes)):
        def __call__(self, name):
            actor = super().__call__(name)
            if len(self.actors) == 1:  # the first process dies before it answers
                actor.state = DEAD
            return actor

    fakes.__class__ = DeadOnArrival

    async def body(sup):
        tid = await submit(sup, ["a"])
        res = await result(sup, tid)
        assert res.ok and res.reason is None
        assert [(k, d["attempt"]) for k, _, d in log(sup, tid, "a") if k != "tokens"] == [
            ("agent_crashed", 1), ("retrying", 2), ("step_started", 2), ("step_finished", 2)]
        assert "could not start" in first(sup, tid, "agent_crashed", "a")["error"]

    run(fakes, body, max_agents=1, max_agents_per_task=1)


def test_when_one_parallel_step_fails_for_good_the_other_is_stopped(fakes):
    b_started = asyncio.Event()

    async def a(call):
        await b_started.wait()
        raise AgentError("broken")

    async def b(call):
        b_started.set()
        await call.hang()

    fakes.script("a", a)
    fakes.script("b", b)

    async def body(sup):
        tid = await submit(sup, ["a", "b"], after={})
        res = await result(sup, tid)
        assert res.status == "failed" and res.reason == "step_failed"
        assert "agent 'a'" in res.error and "AgentError: broken" in res.error
        rec = fakes.one(tid, "b")
        await until(lambda: rec.how == "killed", "b's actor was killed")
        assert fakes.actor(rec.actor).killed
        assert not fakes.actor(fakes.one(tid, "a").actor).killed  # a reported its end
        assert "step_finished" not in kinds(sup, tid)

    run(fakes, body)


# -- cancellation -------------------------------------------------------------------------


def test_cancel_ends_every_running_step_of_the_task(fakes):
    fakes.default = hangs

    async def body(sup):
        tid = await submit(sup, ["a", "b"], after={})
        await until(lambda: len(fakes.of(tid)) == 2, "both steps started")
        assert await sup.cancel(tid) == "cancelled"
        res = await result(sup, tid)
        assert res.status == "cancelled" and res.reason == "cancelled" and not res.ok
        assert kinds(sup, tid)[-1] == "cancelled"
        await until(lambda: all(s.how == "killed" for s in fakes.of(tid)), "both actors killed")
        assert all(fakes.actor(s.actor).killed for s in fakes.of(tid))
        assert fakes.running[tid] == 0

    run(fakes, body)


def test_cancel_of_a_queued_task_ends_it_without_running_it(fakes):
    gate = asyncio.Event()
    fakes.default = gated(gate)

    async def body(sup):
        blocker = await submit(sup, ["a"], inputs={"block": True})
        queued = await submit(sup, ["a"])
        after = await submit(sup, ["b"])
        assert await sup.cancel(queued) == "cancelled"
        assert (await result(sup, queued)).reason == "cancelled"
        gate.set()
        assert (await result(sup, blocker)).ok and (await result(sup, after)).ok
        assert fakes.of(queued) == []
        assert kinds(sup, queued) == ["pending", "cancelled"]

    run(fakes, body, max_agents=1, max_agents_per_task=1)


# -- idempotent submit ----------------------------------------------------------------------


def test_a_submit_retried_with_the_same_key_returns_the_first_task_and_runs_it_once(fakes):
    async def body(sup):
        # Given a task submitted with an idempotency key
        task = Task(goal="make the tests pass", agents=["a"], idempotency_key="req-1")
        first_id, created = await sup.submit(task)
        # When the same submit arrives again, while it runs and after it ended
        again = await asyncio.gather(sup.submit(task), sup.submit(task))
        await result(sup, first_id)
        late = await sup.submit(task)
        # Then every retry names the first task, and only one task ever ran
        assert created is True
        assert again == [(first_id, False)] * 2 and late == (first_id, False)
        assert list(sup.tasks) == [first_id]
        assert len(fakes.of(first_id)) == 1
        # And another key makes another task
        other, created = await sup.submit(Task(goal="make the tests pass", agents=["a"], idempotency_key="req-2"))
        assert created and other != first_id

    run(fakes, body)


def test_a_key_reused_for_a_different_task_is_refused_naming_the_key_and_the_task(fakes):
    async def body(sup):
        first_id, _ = await sup.submit(Task(goal="one thing", agents=["a"], idempotency_key="k"))
        with pytest.raises(InvalidTask) as err:
            await sup.submit(Task(goal="another thing", agents=["a"], idempotency_key="k"))
        assert err.value.field == "idempotency_key" and first_id in str(err.value)
        assert list(sup.tasks) == [first_id]

    run(fakes, body)


def test_a_key_is_forgotten_with_its_task(fakes):
    async def body(sup):
        task = Task(goal="make the tests pass", agents=["a"], idempotency_key="k")
        first_id, _ = await sup.submit(task)
        await result(sup, first_id)
        for _ in range(2):  # keep_finished_tasks=1: these push the first task out
            await result(sup, await submit(sup, ["a"]))
        assert first_id not in sup.tasks
        second_id, created = await sup.submit(task)
        assert created and second_id != first_id

    run(fakes, body, keep_finished_tasks=1)


@pytest.mark.parametrize("key", ["", "x" * 256, "line\nbreak", 7])
def test_a_bad_idempotency_key_is_refused_naming_the_field(fakes, key):
    async def body(sup):
        with pytest.raises(InvalidTask) as err:
            await sup.submit(Task(goal="g", agents=["a"], idempotency_key=key))
        assert err.value.field == "idempotency_key"

    run(fakes, body)


# -- hooks --------------------------------------------------------------------------------


class Recorder(Hook):
    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.rows: list[tuple] = []

    def on_submit(self, task) -> None:
        self.calls.append(("on_submit", len(task.events)))

    def on_event(self, task, row) -> None:
        self.rows.append(row)
        self.calls.append(("on_event", row[1], row[2]))

    def before_step(self, task, step) -> None:
        self.calls.append(("before_step", step.role, step.attempt))

    async def after_step(self, task, step, outcome) -> None:
        self.calls.append(("after_step", step.role, step.attempt, outcome.kind))

    def on_commit(self, task, role, output, state, requests) -> None:
        self.calls.append(("on_commit", role, output))


class Broken(Hook):
    """Raises from every hook it has; counts how often it was called."""

    def __init__(self) -> None:
        self.calls = 0

    def _boom(self, *args) -> None:
        self.calls += 1
        raise RuntimeError("hook bug")

    on_submit = on_event = before_step = on_commit = _boom

    async def after_step(self, task, step, outcome) -> None:
        self._boom()


async def flaky(call):
    """Fails its first attempt with a transient error, then streams a token and succeeds."""
    if call.attempt == 1:
        raise TransientError("busy")
    call.tokens("ok ")
    return "done"


def test_hooks_see_submit_events_steps_and_commits_in_order(fakes):
    fakes.script("a", flaky)
    rec = Recorder()

    async def body(sup):
        tid = await submit(sup, ["a"])
        assert (await result(sup, tid)).ok
        assert rec.rows == sup.tasks[tid].events  # every event, in log order
        assert rec.calls == [
            ("on_submit", 0),
            ("on_event", "pending", None), ("on_event", "admitted", None), ("on_event", "running", None),
            ("on_event", "level", None), ("on_event", "round_started", None),
            ("on_event", "step_started", "a"), ("before_step", "a", 1),
            ("on_event", "step_failed", "a"), ("after_step", "a", 1, "transient"),
            ("on_event", "retrying", "a"),
            ("on_event", "step_started", "a"), ("before_step", "a", 2), ("on_event", "tokens", "a"),
            ("after_step", "a", 2, "ok"), ("on_commit", "a", "done"), ("on_event", "step_finished", "a"),
            ("on_event", "succeeded", None),
        ]

    run(fakes, body, hooks=[rec])


def test_a_step_is_sent_to_its_actor_before_the_supervisor_logs_it(fakes):
    # Given a hook that notes, at each step_started event and at each before_step, how
    # many step calls the actors have had
    class Sent(Hook):
        def __init__(self) -> None:
            self.seen: list[tuple[str, int]] = []

        def on_event(self, task, row) -> None:
            if row.kind == "step_started":
                self.seen.append(("step_started", sum(a.steps for a in fakes.actors)))

        def before_step(self, task, step) -> None:
            self.seen.append(("before_step", sum(a.steps for a in fakes.actors)))

    sent = Sent()

    async def body(sup):
        # When a task of two steps in a row runs
        tid = await submit(sup, ["a", "b"], after={"b": ["a"]})
        assert (await result(sup, tid)).ok

    run(fakes, body, hooks=[sent])
    # Then each step's call was out before its event was logged and its hook called (the
    # actor starts while the supervisor does its bookkeeping), event first, hook second
    assert sent.seen == [("step_started", 1), ("before_step", 1), ("step_started", 2), ("before_step", 2)]


def test_a_hook_that_raises_is_logged_and_the_pool_goes_on(fakes, caplog):
    fakes.script("a", flaky)
    broken, rec = Broken(), Recorder()

    async def body(sup):
        tid = await submit(sup, ["a", "b"], after={"b": ["a"]})
        res = await result(sup, tid)
        assert res.ok and res.outputs == {"a": "done", "b": "b@1"}
        assert broken.calls > 0
        assert (await sup.stats())["hook_failures"] == broken.calls
        assert rec.rows == sup.tasks[tid].events  # hooks after the broken one still hear everything

    with caplog.at_level(logging.ERROR, logger="threadbound.hooks"):
        run(fakes, body, hooks=[broken, rec])
    assert any("the pool goes on" in r.getMessage() for r in caplog.records)


# -- more of the same, at the edges -------------------------------------------------------


def test_a_step_that_times_out_is_retried_while_its_sibling_runs_on_undisturbed(fakes):
    # Given a task whose role b starts 3 s (on the pool's clock) after a, because c runs first
    b_started, b_may_end = asyncio.Event(), asyncio.Event()

    async def a(call):
        if call.attempt == 1:
            await b_started.wait()
            call.tokens("slow ", clock_s=3.0)  # 6 s since a started: a's 5 s are up, not b's
            await call.hang()
        b_may_end.set()
        return "a done"

    async def c(call):
        call.tokens("c ", clock_s=3.0)
        return "c done"

    async def b(call):
        b_started.set()
        await asyncio.wait_for(b_may_end.wait(), 2)  # b runs while a times out and retries
        return "b done"

    fakes.script("a", a)
    fakes.script("b", b)
    fakes.script("c", c)

    async def body(sup):
        tid = await submit(sup, ["a", "c", "b"], after={"b": ["c"]}, step_timeout_s=5)
        res = await result(sup, tid)
        assert res.ok and res.outputs == {"a": "a done", "b": "b done", "c": "c done"}
        assert kinds(sup, tid, "a") == ["step_started", "tokens", "step_timed_out", "retrying",
                                        "step_started", "step_finished"]
        b_rec = fakes.one(tid, "b")
        assert b_rec.how == "ok" and not fakes.actor(b_rec.actor).killed
        assert fakes.kills == [fakes.one(tid, "a", attempt=1).actor]
        assert kinds(sup, tid, "b") == ["step_started", "step_finished"]

    run(fakes, body)


def test_one_actor_per_task_runs_the_graph_one_role_at_a_time(fakes):
    async def body(sup):
        tid = await submit(sup, ["coder", "tester", "reviewer"],
                           after={"tester": ["coder"], "reviewer": ["coder"]})
        assert (await result(sup, tid)).ok
        assert fakes.order(tid) == ["coder", "tester", "reviewer"]
        assert fakes.max_running[tid] == 1
        assert len({s.actor for s in fakes.of(tid)}) == 1

    run(fakes, body, max_agents=2, max_agents_per_task=1)


def test_cancel_during_a_retry_backoff_cancels_the_task(fakes):
    async def step(call):
        raise TransientError("busy", retry_after_s=30)  # the retry waits 30 s

    fakes.script("a", step)

    async def body(sup):
        tid = await submit(sup, ["a"])
        await until(lambda: "retrying" in kinds(sup, tid), "the retry was scheduled")
        assert first(sup, tid, "retrying", "a")["delay_s"] == 30
        assert await sup.cancel(tid) == "cancelled"
        assert (await result(sup, tid)).reason == "cancelled"
        assert len(fakes.of(tid)) == 1

    run(fakes, body)


def test_shutdown_cancels_running_and_queued_tasks_and_kills_every_actor(fakes):
    fakes.default = hangs

    async def body(sup):
        running = await submit(sup, ["a", "b"], after={})
        queued = await submit(sup, ["c"])
        await until(lambda: len(fakes.of(running)) == 2, "both steps started")
        await sup.shutdown(grace_s=0)
        for tid in (running, queued):
            res = await result(sup, tid)
            assert res.status == "cancelled" and res.reason == "shutdown"
        assert fakes.alive() == 0
        assert {s.how for s in fakes.of(running)} == {"killed"}

    run(fakes, body, max_agents=2, max_agents_per_task=2)


@pytest.mark.parametrize("key", ["kind", "attempt"])
def test_an_agent_event_may_carry_any_field_name(fakes, key):
    async def step(call):
        call.emit("tool_call", {key: "shell", "cmd": "ls"})  # what ctx.emit(...) sends
        return "done"

    fakes.script("a", step)

    async def body(sup):
        tid = await submit(sup, ["a"])
        res = await result(sup, tid)
        assert (res.status, res.reason, res.error) == ("succeeded", None, None)
        assert "tool_call" in kinds(sup, tid, "a")

    run(fakes, body)
