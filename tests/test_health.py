"""The health monitor, level choice and retry policy as plain objects, on an injected clock.

These run in milliseconds; tests/test_degradation.py proves the same behaviour on
real Ray with the simulated model's injected faults.
"""

import random

import pytest

from threadbound.runtime.config import HealthConfig, ReasoningConfig, RetryConfig, RuntimeConfig
from threadbound.runtime.supervisor.health import (
    ACTOR_DEATH, DEGRADED, NORMAL, PAUSED, RETRY_EXHAUSTED, STEP_FAILED, STEP_OK, HealthMonitor,
)
from threadbound.runtime.supervisor.levels import WorkspaceSize, choose, fit_step, step_cost, workspace_size
from threadbound.runtime.supervisor.retry import backoff_s


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def monitor(memory=10.0, **health):
    clock = Clock()
    mem = [memory]
    cfg = HealthConfig(**{"window_s": 10, "healthy_period_s": 5, "min_steps": 4, **health})
    return HealthMonitor(cfg, clock=clock, memory=lambda: mem[0], wall=clock), clock, mem


def modes(m):
    return [(t.old, t.new) for t in m.transitions]


def test_a_burst_of_step_failures_degrades_once_min_steps_have_run():
    m, clock, _ = monitor()
    for _ in range(3):
        m.record(STEP_FAILED)
        assert m.evaluate() is None  # three failures: below min_steps, no verdict yet
    m.record(STEP_FAILED)
    t = m.evaluate()
    assert (t.old, t.new) == (NORMAL, DEGRADED) and t.reasons == ("error_rate 100% >= 50%",)


def test_successes_keep_an_occasional_failure_below_the_error_rate():
    m, clock, _ = monitor()
    for i in range(40):
        clock.now = i * 0.5
        m.record(STEP_FAILED if i % 3 == 2 else STEP_OK)  # a third fail: under 50 %
        assert m.evaluate() is None
    assert m.mode == NORMAL


def test_it_recovers_only_after_the_window_clears_and_a_healthy_period_passes():
    m, clock, _ = monitor()
    for _ in range(4):
        m.record(STEP_FAILED)
    m.evaluate()
    recovered_at = None
    while recovered_at is None and clock.now < 60:
        clock.now += 0.5
        if m.evaluate() is not None:
            recovered_at = clock.now
    # failures leave the 10 s window at t=10; then 5 s of health are required
    assert m.mode == NORMAL and 15.0 <= recovered_at <= 15.5
    assert modes(m) == [(NORMAL, DEGRADED), (DEGRADED, NORMAL)]


def test_flapping_input_does_not_flap_the_mode():
    m, clock, _ = monitor(healthy_period_s=8)
    # 60 s of failure bursts every 6 s with healthy steps in between: each burst crosses the
    # threshold, each quiet spell is shorter than the healthy period
    for i in range(120):
        clock.now = i * 0.5
        burst = (i % 12) < 4
        m.record(STEP_FAILED if burst else STEP_OK)
        m.evaluate()
    for _ in range(60):  # then the faults stop
        clock.now += 0.5
        m.record(STEP_OK)
        m.evaluate()
    assert modes(m) == [(NORMAL, DEGRADED), (DEGRADED, NORMAL)]


def test_level_one_failing_too_pauses_admission_and_recovery_is_one_mode_at_a_time():
    m, clock, _ = monitor()
    for _ in range(4):
        m.record(STEP_FAILED)
    m.evaluate()
    for _ in range(3):
        m.record(STEP_FAILED, degraded=True)
    assert m.evaluate() is None  # not enough level-1 steps yet
    m.record(STEP_FAILED, degraded=True)
    t = m.evaluate()
    assert t.new == PAUSED and t.reasons[0].startswith("level 1 fails too: error_rate")
    while m.mode != NORMAL and clock.now < 100:
        clock.now += 0.5
        m.evaluate()
    assert modes(m) == [(NORMAL, DEGRADED), (DEGRADED, PAUSED), (PAUSED, DEGRADED), (DEGRADED, NORMAL)]


def test_no_pause_when_pause_is_off():
    m, _, _ = monitor(pause=False)
    for _ in range(4):
        m.record(STEP_FAILED)
    m.evaluate()
    for _ in range(8):
        m.record(STEP_FAILED, degraded=True)
        m.evaluate()
    assert m.mode == DEGRADED


def test_counted_signals_and_memory_pressure_each_degrade():
    m, _, _ = monitor(actor_deaths=2)
    m.record(ACTOR_DEATH)
    assert m.evaluate() is None
    m.record(ACTOR_DEATH)
    assert m.evaluate().reasons == ("actor_deaths 2 >= 2",)

    m, _, _ = monitor(retry_exhausted=1)
    m.record(RETRY_EXHAUSTED)
    assert m.evaluate().new == DEGRADED

    m, clock, mem = monitor(memory=95.0, memory_percent=90)
    t = m.evaluate()
    assert t.new == DEGRADED and t.reasons == ("memory_percent 95.0% >= 90",)
    mem[0] = 40.0
    for _ in range(40):
        clock.now += 0.5
        m.evaluate()
    assert m.mode == NORMAL


def test_health_report_lists_every_signal_with_its_threshold():
    m, _, _ = monitor(timeouts=7)
    m.record(STEP_OK)
    report = m.report()
    assert report["mode"] == NORMAL and report["steps_in_window"] == 1
    assert set(report["signals"]) == {"error_rate", "timeouts", "actor_deaths", "stream_failures",
                                      "retry_exhausted", "memory_percent"}
    assert report["signals"]["timeouts"] == {"value": 0, "threshold": 7, "over": False}


def test_a_disabled_monitor_never_changes_mode():
    m, _, _ = monitor(enabled=False)
    for _ in range(20):
        m.record(STEP_FAILED)
    assert m.evaluate() is None and m.mode == NORMAL


# -- reasoning levels ---------------------------------------------------------------

def pick(goal, size=WorkspaceSize(), requested="auto", budget=None, agents=3, rounds=None, **reasoning):
    cfg = ReasoningConfig(**reasoning)
    return choose(cfg, requested, goal, size, n_agents=agents, max_rounds=rounds, default_rounds=3, budget=budget)


def test_auto_scores_small_tasks_low_and_big_ones_high_deterministically():
    small = pick("fix the typo in the greeting")
    big = pick("refactor the async protocol parser for concurrency and fix the race and the deadlock "
               "in the distributed scheduler", WorkspaceSize(files=120, bytes=2_000_000))
    assert small.level == 1 and big.level == 4
    assert "score" in small.reasons[0] and "keywords none" in small.reasons[0]
    assert pick("refactor the parser", WorkspaceSize(30, 40_000)) == pick("refactor the parser", WorkspaceSize(30, 40_000))


def test_auto_thresholds_are_configurable():
    goal = "refactor the parser"  # 2 keywords = 3 points, 3 words
    assert pick(goal).level == 2
    assert pick(goal, auto={"thresholds": [10, 20, 30]}).level == 1


def test_max_level_caps_fixed_and_scored_levels():
    c = pick("x", requested=4, max_level=2)
    assert c.level == 2 and c.reasons[-1] == "max_level 2 caps level 4"


def test_a_cost_budget_pushes_a_level_four_task_down_until_its_estimate_fits():
    # default prices: a step at level 4 is 8192 tokens x 8/1k = 65.5; level 3 8.19; level 2 1.024
    c = pick("x", requested=4, budget=4.0, agents=1)  # 3 rounds
    assert c.level == 2 and c.estimate == pytest.approx(1.024 * 3)
    assert "cost budget 4" in c.reasons[-1]
    assert pick("x", requested=4, budget=1000.0, agents=1).level == 4


def test_per_step_fit_uses_what_was_really_spent():
    cfg = ReasoningConfig()
    assert fit_step(cfg, 3, spent=0.0, budget=10.0) == 3
    assert fit_step(cfg, 3, spent=4.0, budget=10.0) == 2
    assert fit_step(cfg, 3, spent=10.0 - step_cost(cfg, 1) / 2, budget=10.0) is None


def test_workspace_size_skips_caches_and_hidden_directories(tmp_path):
    (tmp_path / "a.py").write_text("x" * 100)
    for d in (".git", "__pycache__", "node_modules"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "big").write_text("x" * 10_000)
    assert workspace_size(str(tmp_path)) == WorkspaceSize(files=1, bytes=100)


# -- retries ------------------------------------------------------------------------

def test_retry_after_is_honoured_even_past_max_backoff_but_not_without_bound():
    policy = RetryConfig(backoff_s=0.1, max_backoff_s=1, max_retry_after_s=30)
    rng = random.Random(0)
    assert backoff_s(policy, 1, rng, retry_after_s=7.5) == 7.5
    assert backoff_s(policy, 1, rng, retry_after_s=3600) == 30
    assert all(backoff_s(policy, 5, rng) <= 1 for _ in range(100))


def test_each_error_class_has_its_own_attempts_and_backoff():
    cfg = RuntimeConfig(retry={"max_attempts": 2, "classes": {"rate_limit": {"max_attempts": 6, "backoff_s": 2}}})
    assert cfg.retry.for_class("rate_limit").max_attempts == 6
    assert cfg.retry.for_class("rate_limit").backoff_s == 2.0
    assert cfg.retry.for_class("timeout").max_attempts == 2
