"""Degradation, recovery, reasoning levels, budgets and retries on a real local Ray.

Faults come from the simulated model's fault injection: every model call of a task
whose goal contains FAIL fails. The health windows are seconds long here so the
test sees a pool degrade and recover in a few seconds; hysteresis, flapping and the
pause are tested on the supervisor's own clock (tests/test_supervisor_clock.py).
"""


import pytest
from conftest import eventually, make_pool
from openai_server import OpenAITestServer

from threadbound.runtime import Task, TaskFailed

pytestmark = pytest.mark.usefixtures("ray_session")

FAIL = {"kind": "error", "goal_contains": "FAIL"}


def health(**overrides):
    return {"enabled": True, "window_s": 3, "healthy_period_s": 2, "min_steps": 3, "error_rate": 0.5,
            "check_interval_s": 0.1, "pause": False, **overrides}


def model(**overrides):
    return {"backend": "simulated", "tokens": 60, "faults": [FAIL], **overrides}


def kinds(events):
    return [e.kind for e in events]


def by_kind(events, kind):
    return [e for e in events if e.kind == kind]


def fail_burst(pool, n):
    handles = [pool.submit(Task(goal=f"FAIL {i}", agents=["ask"])) for i in range(n)]
    for h in handles:
        with pytest.raises(TaskFailed):
            h.result(timeout=30)
    return handles


def mode_is(pool, mode, timeout_s=20):
    return eventually(lambda: pool.health()["mode"] == mode, timeout_s, 0.1)


def test_a_burst_of_failures_degrades_the_pool_streaming_stops_and_it_recovers():
    pool = make_pool("burst", health=health(), model=model(tokens_per_s=40), retry={"max_attempts": 1},
                     max_agents=4, prewarm=True)  # slow holds two slots, strict one: one (warm) for the burst
    try:
        # Given a task streaming slowly, and a task that opted out of degradation
        slow = pool.submit(Task(goal="slow", agents=["ask", "ask2"]))
        strict = pool.submit(Task(goal="strict", agents=["ask"], degrade=False))
        stream = slow.stream()
        seen = []
        for ev in stream:
            seen.append(ev)
            if ev.kind == "tokens":
                break
        # When a burst of failures hits the pool
        burst = fail_burst(pool, 3)
        first_failure = min(by_kind(list(h.stream()), "step_failed")[0].ts for h in burst)
        # Then it degrades within the window
        assert mode_is(pool, "degraded")
        h = pool.health()
        entered = h["transitions"][0]
        assert (entered["from"], entered["to"]) == ("normal", "degraded")
        # (the strict task's step may have ended well inside the window: the rate is 50-100%)
        assert len(entered["reasons"]) == 1 and entered["reasons"][0].startswith("error_rate ")
        assert entered["reasons"][0].endswith(" >= 50%")
        assert entered["at"] >= first_failure  # the failures came first, then the transition
        assert h["signals"]["error_rate"]["over"] and h["signals"]["error_rate"]["threshold"] == 0.5

        # and streaming stops: after the health event the slow task gets no more tokens,
        # the rest of its running step comes as one message, its next step runs at level 1
        seen += list(stream)
        assert slow.result(timeout=30).ok
        cut = kinds(seen).index("health")
        assert seen[cut].data["mode"] == "degraded" and seen[cut].data["streaming"] is False
        after = seen[cut:]
        assert "tokens" not in kinds(after)
        assert [e.data.get("degraded") for e in by_kind(after, "message")][0] is True
        second = by_kind(seen, "step_started")[-1]
        assert (second.data["level"], second.data["streaming"]) == (1, False)
        out = slow.result().outputs["ask2"]  # the step that ran degraded after the cut
        assert (out["text"], out["level"], out["streaming"]) == (by_kind(after, "message")[-1].data["text"], 1, False)
        assert abs(out["tokens_used"] - 60) <= 5  # a whole answer's tokens are counted roughly

        # and the task that opted out fails instead of degrading, as does a new one
        with pytest.raises(TaskFailed, match="opted out of degradation"):
            strict.result(timeout=30)
        assert list(strict.stream())[-1].data["reason"] == "degraded"
        late = pool.submit(Task(goal="strict too", agents=["ask"], degrade=False))
        with pytest.raises(TaskFailed, match="opted out"):
            late.result(timeout=10)

        # When the faults stop, it recovers after the window and the healthy period
        assert mode_is(pool, "normal", 15)
        assert [(t["from"], t["to"]) for t in pool.health()["transitions"]] == [
            ("normal", "degraded"), ("degraded", "normal")]
        # and streams again at the task's own level
        events = list(pool.submit(Task(goal="after", agents=["ask"])).stream())
        assert kinds(events)[-1] == "succeeded" and by_kind(events, "tokens")
        assert by_kind(events, "step_started")[0].data["level"] == 2
    finally:
        pool.shutdown()


def test_a_level_four_task_under_a_small_budget_is_pushed_down_and_never_overspends():
    # default prices: level 2 answers at most 2048 tokens at 0.5 per 1k; level 1 512 at 0.1
    pool = make_pool("budget", model=model(tokens=3000), max_rounds=1)
    try:
        # Given a level-4 task whose estimate only fits at level 2
        h = pool.submit(Task(goal="big", agents=["ask", "ask2"], level=4, cost_budget=4.0, inputs={"asks": 3}))
        events = list(h.stream())
        levels = by_kind(events, "level")
        assert (levels[0].data["level"], levels[0].data["requested"]) == (2, 4)
        assert "cost budget 4" in levels[0].data["reasons"][-1]
        # the first step spends 3 full answers at level 2 (3.07); the second does not fit there
        assert levels[1].data["level"] == 1 and "cost budget" in levels[1].data["reasons"][0]
        steps = by_kind(events, "step_finished")
        assert [s.data["level"] for s in steps] == [2, 1]
        assert [s.data["tokens"] for s in steps] == [3 * 2048, 3 * 512]
        assert sum(s.data["cost"] for s in steps) <= 4.0
        assert h.result(timeout=10).ok

        # A task whose budget runs out fails before it is exceeded: its last level-1 step is
        # cut to the tokens left, and the next one is refused
        h = pool.submit(Task(goal="bigger", agents=["ask", "ask2", "ask3"], level=4, cost_budget=3.2,
                             inputs={"asks": 3}))
        with pytest.raises(TaskFailed, match="cost budget"):
            h.result(timeout=30)
        events = list(h.stream())
        assert [s.data["tokens"] for s in by_kind(events, "step_finished")] == [3 * 2048, 512 + 512 + 256]
        assert sum(e.data.get("cost", 0) for e in events if e.kind in ("step_finished", "step_failed")) <= 3.2 + 1e-9
    finally:
        pool.shutdown()


def test_level_auto_is_chosen_from_the_goal_and_workspace_and_shown_with_why(tmp_path):
    for i in range(40):
        (tmp_path / f"m{i}.py").write_text("x = 1\n" * 2000)
    pool = make_pool("auto", model=model(tokens=3, faults=[]),
                     reasoning={"level": "auto", "max_level": 3, "levels": {1: {"max_rounds": 1}}})
    try:
        small = list(pool.submit(Task(goal="fix the typo", agents=["ask"])).stream())
        big = list(pool.submit(Task(goal="refactor the async parser to remove the race", workspace=tmp_path,
                                    agents=["ask"])).stream())
        (lv_small,), (lv_big,) = by_kind(small, "level"), by_kind(big, "level")
        assert lv_small.data["level"] == 1 and lv_small.data["requested"] == "auto"
        assert lv_big.data["level"] == 3 and lv_big.data["reasons"][-1] == "max_level 3 caps level 4"
        assert "40 files" in lv_big.data["reasons"][0]
        assert by_kind(big, "step_finished")[0].data["level"] == 3
        # a level's rounds budget holds: level 1 here allows one round
        wants_more = pool.submit(Task(goal="fix the typo", agents=["a"], inputs={"a": {"rounds": 2}}))
        with pytest.raises(TaskFailed, match="no success after 1 round"):
            wants_more.result(timeout=30)
    finally:
        pool.shutdown()


def test_retry_after_is_honoured_and_each_error_class_has_its_own_attempts():
    faults = [{"kind": "rate_limit", "goal_contains": "LIMIT", "attempt": a, "retry_after_s": 1.2} for a in (1, 2)]
    faults.append({"kind": "error", "goal_contains": "BAD"})
    pool = make_pool("retry-after", model=model(tokens=3, faults=faults),
                     retry={"max_attempts": 1, "backoff_s": 0.01, "max_backoff_s": 0.02,
                            "classes": {"rate_limit": {"max_attempts": 3}}})
    try:
        h = pool.submit(Task(goal="LIMIT", agents=["ask"]))
        assert h.result(timeout=30).ok
        events = list(h.stream())
        failed, retries, started = (by_kind(events, k) for k in ("step_failed", "retrying", "step_started"))
        assert [f.data["error_class"] for f in failed] == ["rate_limit", "rate_limit"]
        assert [r.data["delay_s"] for r in retries] == [1.2, 1.2]  # not the 0.02 s backoff cap
        assert all(started[i + 1].ts - failed[i].ts >= 1.2 for i in range(2))
        # A bad request is not retried: it fails at once
        bad = pool.submit(Task(goal="BAD", agents=["ask"]))
        with pytest.raises(TaskFailed, match="simulated model failure"):
            bad.result(timeout=10)
        assert not by_kind(list(bad.stream()), "retrying")
    finally:
        pool.shutdown()


def test_a_real_429_with_retry_after_is_waited_out_then_the_step_succeeds():
    with OpenAITestServer() as server:
        pool = make_pool("http-429", model={"backend": "openai", "base_url": server.url, "api_key": "k",
                                            "model": "rate-limit-once"},
                         retry={"backoff_s": 0.01, "max_backoff_s": 0.02})
        try:
            h = pool.submit(Task(goal="hello", agents=["ask"]))
            assert h.result(timeout=30).ok
            events = list(h.stream())
            (failed,), (retry,) = by_kind(events, "step_failed"), by_kind(events, "retrying")
            assert failed.data["error_class"] == "rate_limit" and failed.data["retry_after_s"] == 1.0
            assert retry.data["delay_s"] == 1.0
            assert by_kind(events, "step_started")[1].ts - failed.ts >= 1.0
            assert [r["body"]["max_tokens"] for r in server.requests] == [2048, 2048]  # level 2's cap
        finally:
            pool.shutdown()


def test_memory_pressure_degrades_and_a_resumed_pool_keeps_its_mode(capsys):
    from threadbound.runtime import cli
    from threadbound.runtime.supervisor.core import Supervisor

    # Any real node uses more than 0.1 % of its memory: this pool is under "pressure" at once
    pool = make_pool("memory", health=health(memory_percent=0.1, healthy_period_s=60))
    cfg = pool.config
    try:
        assert mode_is(pool, "degraded")
        (t,) = pool.health()["transitions"]
        assert t["reasons"][0].startswith("memory_percent")
        events = list(pool.submit(Task(goal="under pressure", agents=["ask"])).stream())
        assert by_kind(events, "step_started")[0].data["streaming"] is False and by_kind(events, "message")
        # `threadbound health` shows the same to an operator
        assert cli.main(["health", "--name", "memory"]) == 0
        out = capsys.readouterr().out
        assert out.startswith("pool memory: degraded") and "recovers after" in out
        assert [line.split()[1] for line in out.splitlines() if line.startswith("  !")] == ["memory_percent"]
    finally:
        pool.shutdown()
    # A supervisor resuming this history starts degraded: it must earn its way back
    sup = Supervisor(cfg, {}, make_actor=lambda name: None, resume=True)
    try:
        assert sup.health.mode == "degraded"
    finally:
        sup.durable.lease.release()
