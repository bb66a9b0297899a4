"""Deadlines, crashes, retries and cancellation on a real local Ray."""

import time

import psutil
import pytest
from conftest import eventually, make_pool

from threadbound.runtime import TaskCancelled, TaskFailed, TaskTimedOut, Task

pytestmark = pytest.mark.usefixtures("ray_session")


@pytest.fixture(scope="module")
def pool(ray_session):
    p = make_pool("faults", step_timeout_s=1.5, max_agents=3, max_agents_per_task=2)
    yield p
    p.shutdown()


def by_kind(events, kind):
    return [e for e in events if e.kind == kind]


def test_hung_step_is_killed_replaced_and_retried_within_deadline_plus_2s(pool):
    handle = pool.submit(Task(goal="hang once", agents=["a"], inputs={"a": {"tokens": 4, "hang_on": [1]}}))
    events = list(handle.stream())
    started = by_kind(events, "step_started")
    (timed_out,) = by_kind(events, "step_timed_out")
    assert timed_out.ts - started[0].ts <= 1.5 + 2.0
    assert timed_out.data["partial"] == "a0 a1 a2 a3 "  # what streamed before the hang is kept
    assert by_kind(events, "retrying")[0].data["reason"] == "timeout"
    assert started[1].data["pid"] != started[0].data["pid"]  # a new process took over
    assert not psutil.pid_exists(started[0].data["pid"]) or eventually(
        lambda: not psutil.pid_exists(started[0].data["pid"]), 5)
    assert events[-1].kind == "succeeded"


def test_step_that_always_hangs_times_out_the_task_with_a_clear_error(pool):
    handle = pool.submit(Task(goal="hang always", agents=["a"], inputs={"a": {"hang_on": [1, 2]}}))
    with pytest.raises(TaskTimedOut) as err:
        handle.result(timeout=30)
    assert "exceeded its step timeout of 1.500s" in str(err.value) and "after 2 attempt" in str(err.value)
    assert err.value.result.status == "timed_out"


def test_crashed_agent_is_reported_replaced_and_its_state_restored(pool):
    handle = pool.submit(Task(goal="crash", agents=["a", "b"], inputs={"b": {"rounds": 2, "crash_on": [1]}},
                              max_rounds=2))
    events = list(handle.stream())
    crashes = by_kind(events, "agent_crashed")
    assert crashes and crashes[0].agent == "b"
    assert events[-1].kind == "succeeded"
    # b committed once in round 1 (on attempt 2), then again in round 2: its state
    # survived the crash of attempt 1 of round 2 through get_state/set_state.
    assert handle.result().outputs["b"]["calls"] == 2


def test_transient_errors_are_retried_and_other_errors_fail_fast(pool):
    ok = pool.submit(Task(goal="flaky", agents=["a"], inputs={"a": {"transient_on": [1]}}))
    assert ok.result(timeout=30).outputs["a"]["attempt"] == 2
    bad = pool.submit(Task(goal="broken", agents=["a"], inputs={"a": {"error_on": [1, 2]}}))
    with pytest.raises(TaskFailed, match="ValueError: bad thing"):
        bad.result(timeout=30)
    events = list(bad.stream())
    assert not by_kind(events, "retrying")
    assert "Traceback" in by_kind(events, "step_failed")[0].data["traceback"]


def test_hung_task_does_not_delay_others(pool):
    hung = pool.submit(Task(goal="hang", agents=["a"], inputs={"a": {"hang_on": [1, 2]}}))
    quick = pool.submit(Task(goal="quick", agents=["a"]))
    assert quick.result(timeout=30).ok
    assert hung.status in ("running", "admitted")
    hung.cancel()


def test_task_deadline_ends_a_long_task(pool):
    handle = pool.submit(Task(goal="slow", agents=["a", "b"], task_timeout_s=1.0, step_timeout_s=30,
                              inputs={"a": {"sleep_s": 30}}))
    with pytest.raises(TaskTimedOut, match="exceeded its timeout of 1.000s"):
        handle.result(timeout=30)
    assert list(handle.stream())[-1].kind == "timed_out"


def test_cancel_mid_stream_ends_the_task_before_cancel_returns_and_frees_the_slots(pool):
    handle = pool.submit(Task(goal="stream", agents=["a"], inputs={"a": {"tokens": 1000, "token_sleep_s": 0.01}}))
    seen = []
    for event in handle.stream():
        seen.append(event)
        if event.kind == "tokens" and len(seen) > 6:
            break
    pid = by_kind(seen, "step_started")[0].data["pid"]
    t0 = time.time()
    assert handle.cancel() == "cancelled"
    returned = time.time()
    rest = list(handle.stream(from_offset=seen[-1].offset + 1))
    assert rest[-1].kind == "cancelled" and rest[-1].data["reason"] == "cancelled"
    # the order, not a duration: the task had ended (its final event written) when cancel returned
    assert t0 <= rest[-1].ts <= returned
    with pytest.raises(TaskCancelled):
        handle.result(timeout=5)
    assert eventually(lambda: not psutil.pid_exists(pid), 10)
    assert eventually(lambda: all(s["owner"] != handle.task_id for s in pool.stats()["slots"]), 10)


def test_cancel_a_queued_task(ray_session):
    p = make_pool("queued", max_agents=1, max_agents_per_task=1)
    try:
        blocker = p.submit(Task(goal="block", agents=["a"], inputs={"a": {"sleep_s": 2}}))
        waiting = p.submit(Task(goal="wait", agents=["a"]))
        assert waiting.status == "pending"
        assert waiting.cancel() == "cancelled"
        assert [e.kind for e in waiting.stream()] == ["pending", "cancelled"]
        assert blocker.result(timeout=30).ok
    finally:
        p.shutdown()
