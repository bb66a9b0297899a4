"""Waits and health on the supervisor's own clock: a task's wait for a person, the pool's
degradation, hysteresis and pause, where minutes pass in a millisecond.

The supervisor runs as the plain class with fake agent actors (``supervisor_harness``);
time moves when the test moves it (``fakes.clock.elapse``: every timer due meanwhile
fires in its turn, the supervisor's health ticks among them). (On a real Ray, tests/test_person.py and tests/test_degradation.py check
the wiring once; the timing lives here.)
"""

from __future__ import annotations

import asyncio

from supervisor_harness import fakes, kinds, log, result, run, submit, until  # noqa: F401  (fakes: a fixture)

from threadbound.agents.errors import AgentError

FAIL = "FAIL"


def health(**overrides) -> dict:
    return {"enabled": True, "window_s": 3, "healthy_period_s": 2, "min_steps": 3, "error_rate": 0.5,
            "check_interval_s": 0.1, "memory_percent": 100, "pause": False, **overrides}


async def fails_on_goal(call):
    """A step that fails when its task's goal says FAIL, and succeeds otherwise."""
    if FAIL in call.req.goal:
        raise AgentError("the model said no")
    call.tokens("ok ")
    return {"level": call.req.level, "streaming": call.req.streaming}


async def asks(call):
    """A step that asks a person, then returns the answers it got."""
    answer = call.interrupt({"question": "which?"})
    return {"answers": [answer]}


async def burst(sup, n: int) -> list[str]:
    ids = [await submit(sup, ["a"], goal=f"{FAIL} {i}") for i in range(n)]
    return [(await result(sup, t)).status for t in ids]


def test_a_wait_ends_after_wait_timeout_s_and_does_not_count_against_the_task_timeout(fakes):
    fakes.script("b", asks)

    async def body(sup):
        # Given a task that may run 3 s but waits for its answer an hour, and one that may wait 1 s
        patient = await submit(sup, ["b"], task_timeout_s=3, wait_timeout_s=3600)
        hasty = await submit(sup, ["b"], wait_timeout_s=1)
        await until(lambda: {sup.tasks[patient].status, sup.tasks[hasty].status} == {"waiting"}, "both wait")
        # When a second and a half passes on the pool's clock
        await fakes.clock.elapse(1.5)
        # Then the hasty one ends timed_out, its reason naming the wait, the patient one waits on
        hurried = await result(sup, hasty)
        assert (hurried.status, hurried.reason) == ("timed_out", "wait_timeout")
        assert "wait_timeout_s" in hurried.error and "#1" in hurried.error
        assert sup.tasks[patient].status == "waiting"
        # When 59 more minutes pass (far past its task_timeout_s of 3 s), then it is answered
        await fakes.clock.elapse(59 * 60)
        assert sup.tasks[patient].status == "waiting"
        await sup.respond(patient, "late but fine")
        # Then it runs again and succeeds: the time it waited did not count as running
        done = await result(sup, patient)
        assert done.ok and done.outputs["b"] == {"answers": ["late but fine"]}
        # And the patient task's wait would have ended at its hour too: nothing else is pending
        assert kinds(sup, patient).count("waiting") == 1

    run(fakes, body)


def test_an_unanswered_wait_ends_at_exactly_its_limit_on_the_pool_clock(fakes):
    fakes.script("b", asks)

    async def body(sup):
        tid = await submit(sup, ["b"], wait_timeout_s=3600)
        await until(lambda: sup.tasks[tid].status == "waiting", "it waits")
        await fakes.clock.elapse(3599)
        await asyncio.sleep(0.01)
        assert sup.tasks[tid].status == "waiting"  # a second before its limit: still waiting
        await fakes.clock.elapse(2)
        res = await result(sup, tid)
        assert (res.status, res.reason) == ("timed_out", "wait_timeout")
        assert log(sup, tid)[-1][2]["limit_s"] == 3600

    run(fakes, body)


def test_a_burst_of_failures_degrades_the_pool_stops_streaming_and_it_recovers(fakes):
    released = asyncio.Event()

    async def slow(call):
        call.tokens("before ")
        await released.wait()  # the pool degrades meanwhile
        for _ in range(5):
            call.tokens("after ")
        return {"level": call.req.level, "streaming": call.req.streaming}

    fakes.script("c", slow)
    fakes.default = fails_on_goal

    async def body(sup):
        # Given a task streaming when a burst of failures hits the pool
        streaming = await submit(sup, ["c", "a"])
        await until(lambda: "tokens" in kinds(sup, streaming), "it streams")
        statuses = await burst(sup, 3)
        assert statuses == ["failed"] * 3
        # Then the pool degrades, and says why
        assert sup.health.mode == "degraded"
        report = await sup.health_report()
        assert [(t["from"], t["to"]) for t in report["transitions"]] == [("normal", "degraded")]
        assert report["transitions"][0]["reasons"][0].startswith("error_rate ")
        # and the rest of the running step comes as one message, the next step at level 1, not streamed
        released.set()
        res = await result(sup, streaming)
        assert res.ok and res.outputs["a"] == {"level": 1, "streaming": False}
        events = log(sup, streaming)
        cut = [k for k, _, _ in events].index("health")
        assert events[cut][2]["mode"] == "degraded" and events[cut][2]["streaming"] is False
        after = events[cut:]
        assert "tokens" not in [k for k, _, _ in after]
        held = [d for k, _, d in after if k == "message"]
        assert held[0]["text"] == "after " * 5 and held[0]["degraded"] is True
        # And a task that opts out of degradation fails at once, saying so
        strict = await submit(sup, ["a"], degrade=False)
        refused = await result(sup, strict)
        assert refused.status == "failed" and refused.reason == "degraded" and "opted out" in refused.error
        # When the window and the healthy period pass with no fault (3 s + 2 s on the pool's clock)
        await fakes.clock.elapse(3.1)
        await asyncio.sleep(0.01)
        assert sup.health.mode == "degraded"  # healthy, but not for healthy_period_s yet
        await fakes.clock.elapse(2.1)
        await until(lambda: sup.health.mode == "normal", "it recovers")
        # Then it recovered once, and streams again at the task's own level
        report = await sup.health_report()
        assert [(t["from"], t["to"]) for t in report["transitions"]] == [("normal", "degraded"),
                                                                          ("degraded", "normal")]
        again = await result(sup, await submit(sup, ["a"]))
        assert again.ok and again.outputs["a"] == {"level": 2, "streaming": True}

    run(fakes, body, health=health(), retry={"max_attempts": 1}, max_agents=4)


def test_flapping_faults_do_not_flap_the_mode(fakes):
    fakes.default = fails_on_goal

    async def body(sup):
        # Failures and successes alternate for six seconds on the pool's clock
        for _ in range(30):
            await burst(sup, 2)
            assert (await result(sup, await submit(sup, ["a"]))).ok
            await fakes.clock.elapse(0.2)
        # Then it stayed degraded throughout, and recovers once, after the faults stop
        assert sup.health.mode == "degraded"
        await fakes.clock.elapse(2.1)  # the last failures leave the window
        await fakes.clock.elapse(3.1)  # and the pool stays healthy for healthy_period_s
        await until(lambda: sup.health.mode == "normal", "it recovers")
        report = await sup.health_report()
        assert [(t["from"], t["to"]) for t in report["transitions"]] == [("normal", "degraded"),
                                                                          ("degraded", "normal")]

    run(fakes, body, health=health(window_s=2, healthy_period_s=3, min_steps=2), retry={"max_attempts": 1})


def test_when_level_one_fails_too_admission_pauses_and_a_queued_task_waits_then_runs(fakes):
    fakes.default = fails_on_goal

    async def body(sup):
        await burst(sup, 2)
        assert sup.health.mode == "degraded"
        await burst(sup, 2)  # these ran at level 1 without streaming, and failed too
        assert sup.health.mode == "paused"
        # A task submitted while paused is accepted and waits
        waiting = await submit(sup, ["a"])
        await asyncio.sleep(0.01)
        assert sup.tasks[waiting].status == "pending" and (await sup.health_report())["queued"] == 1
        # then runs, degraded, once the pool has been healthy long enough
        await fakes.clock.elapse(2.1)
        await fakes.clock.elapse(1.6)
        res = await result(sup, waiting)
        assert res.ok and res.outputs["a"] == {"level": 1, "streaming": False}
        events = kinds(sup, waiting)
        assert events.index("health") < events.index("admitted") and "tokens" not in events
        await fakes.clock.elapse(1.6)
        await until(lambda: sup.health.mode == "normal", "it recovers")
        report = await sup.health_report()
        assert [t["to"] for t in report["transitions"]] == ["degraded", "paused", "degraded", "normal"]

    run(fakes, body, health=health(pause=True, min_steps=2, window_s=2, healthy_period_s=1.5),
        retry={"max_attempts": 1}, max_agents=2, max_agents_per_task=1)


def test_tasks_that_fail_on_their_own_input_never_degrade_or_pause_the_pool(fakes):
    from threadbound.agents.errors import TaskInputError

    async def no_workspace(call):
        if FAIL in call.req.goal:
            raise TaskInputError("the coder needs a workspace; submit the task with workspace=<directory>")
        return "fine"

    fakes.default = no_workspace

    async def body(sup):
        # Given a submitter who sends a dozen tasks that fail on their own input, at once
        bad = [await submit(sup, ["a"], goal=f"{FAIL} {i}") for i in range(12)]
        good = await submit(sup, ["a"])
        # Then each fails, naming the cause, with no retry
        for t in bad:
            res = await result(sup, t)
            assert res.status == "failed" and "needs a workspace" in res.error
            assert kinds(sup, t).count("step_started") == 1
        # and the pool stays normal: a task that is fine runs at once, at its own level
        assert sup.health.mode == "normal" and (await sup.health_report())["transitions"] == []
        assert (await result(sup, good)).ok

    run(fakes, body, health=health(pause=True, min_steps=2))
