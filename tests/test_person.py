"""A person in the loop, on a real local Ray: an agent asks and waits holding no actor,
a person answers (once), input reaches running tasks, a wait is bounded, and all of it
survives a supervisor crash."""

from __future__ import annotations

import os
import signal

import pytest
import ray
from conftest import eventually, pool_settings
from scripted_agents import Listener, Questioner, Scripted

from threadbound.runtime import AgentPool, InputNotExpected, InvalidInput, RuntimeConfig, Task

pytestmark = pytest.mark.timeout(120)

ROLES = {"q": Questioner, "q2": Questioner, "l": Listener, "m": Listener, "a": Scripted}


def person_pool(name: str, **overrides) -> AgentPool:
    return AgentPool(RuntimeConfig.from_mapping(pool_settings(name, **overrides)), agents=ROLES)


@pytest.fixture
def pool(ray_session, pool_name):
    p = person_pool(pool_name)
    yield p
    p.shutdown()


def wait_for(handle, kind: str, after: int = 0):
    """The first event of ``kind`` from ``after`` on (following live)."""
    for event in handle.stream(from_offset=after):
        if event.kind == kind:
            return event
        assert not event.terminal, f"task ended {event.kind} before any {kind}: {event.data}"
    raise AssertionError(f"no {kind}")


def upto(handle, last: int) -> list:
    """The task's events up to offset ``last`` (without following it further)."""
    out = []
    for event in handle.stream():
        out.append(event)
        if event.offset >= last:
            return out
    return out


def task_slots(pool, task_id: str) -> list[str]:
    return [s["name"] for s in pool.stats()["slots"] if s.get("owner") == task_id]


def test_an_agent_asks_waits_without_actors_and_its_step_reruns_with_the_answer(pool, tmp_path):
    # Given: an agent whose step has a side effect, then asks a question
    spec = {"q": {"questions": [{"question": "which database?"}], "mark": str(tmp_path)}, "a": {}}
    handle = pool.submit(Task(goal="g", agents=["a", "q"], after={"q": ["a"]}, inputs=spec))
    # When: it asks
    asked = wait_for(handle, "input_requested")
    waiting = wait_for(handle, "waiting", asked.offset)
    # Then: the question is in the event; the task waits and holds no agent actor
    assert (asked.agent, asked.data["request"], asked.data["payload"]) == ("q", 1, {"question": "which database?"})
    assert waiting.data["requests"] == [1]
    assert handle.status == "waiting"
    assert eventually(lambda: task_slots(pool, handle.task_id) == [], 5)
    # When: a person answers
    offset = handle.respond("postgres")
    result = handle.result(timeout=60)
    # Then: the step ran again from its beginning and ctx.interrupt returned the answer
    assert result.outputs["q"]["answers"] == ["postgres"]
    events = list(handle.stream())
    assert events[offset].kind == "input_received" and events[offset].data["value"] == "postgres"
    order = [e.kind for e in events if e.kind in ("input_requested", "waiting", "input_received", "step_finished",
                                                   "succeeded") and e.agent in ("q", None)]
    assert order == ["input_requested", "waiting", "input_received", "step_finished", "succeeded"]
    # And: the re-entry used the same idempotency key, so the keyed side effect happened once
    runs = (tmp_path / "runs.log").read_text().split()
    assert len(runs) == 2 and runs[0] == runs[1] == result.outputs["q"]["key"]
    assert len(os.listdir(tmp_path / "effects")) == 1
    # And: the agent that came before was not run again
    assert [e.agent for e in events if e.kind == "step_finished"] == ["a", "q"]


def test_the_first_answer_wins_and_a_late_one_names_its_request(pool):
    handle = pool.submit(Task(goal="g", agents=["q"], inputs={"q": {"questions": ["one?", "two?"]}}))
    # A task that has not asked yet cannot be answered
    first = wait_for(handle, "input_requested")
    # When: two answers race for request 1 (each names it: an answer without a number goes
    # to whatever is open when it lands, which may already be request 2)
    handle.respond("first", request=first.data["request"])
    with pytest.raises(InputNotExpected) as late:
        handle.respond("second", request=first.data["request"])
    # Then: the second names the request it was late for
    assert late.value.request == 1 and "#1" in str(late.value) and "already answered" in str(late.value)
    second = wait_for(handle, "input_requested", first.offset + 1)
    assert second.data["request"] == 2 and second.data["payload"] == "two?"
    with pytest.raises(InputNotExpected, match="#1"):
        handle.respond("again", request=1)
    handle.respond("yes", request=2)
    assert handle.result(timeout=60).outputs["q"]["answers"] == ["first", "yes"]
    # And: a finished task takes no answer and no message
    with pytest.raises(InputNotExpected, match="has ended"):
        handle.send("hello")
    with pytest.raises(InputNotExpected, match="already answered"):
        handle.respond("x", request=2)


def test_bad_answers_and_answers_nobody_asked_for_are_refused(pool):
    handle = pool.submit(Task(goal="g", agents=["a"], inputs={"a": {"sleep_s": 2}}))
    wait_for(handle, "step_started")
    with pytest.raises(InputNotExpected, match="has not asked for input"):
        handle.respond("unasked")
    with pytest.raises(InvalidInput, match="plain data"):
        handle.send(object())
    with pytest.raises(InvalidInput, match="bytes as JSON"):
        handle.send("x" * 70_000)
    assert handle.result(timeout=60).ok


def test_two_roles_ask_at_once_and_each_is_answered_by_its_number(pool):
    handle = pool.submit(Task(goal="g", agents=["q", "q2"], after={},
                              inputs={"q": {"questions": ["q?"]}, "q2": {"questions": ["q2?"]}}))
    waiting = wait_for(handle, "waiting")
    assert waiting.data["requests"] == [1, 2]
    with pytest.raises(InputNotExpected, match="waits for 2 answers"):
        handle.respond("which one?")
    asked = {e.data["request"]: e.agent for e in upto(handle, waiting.offset) if e.kind == "input_requested"}
    by_role = {role: rid for rid, role in asked.items()}
    handle.respond("for q2", request=by_role["q2"])
    handle.respond("for q", request=by_role["q"])
    result = handle.result(timeout=60)
    assert result.outputs["q"]["answers"] == ["for q"] and result.outputs["q2"]["answers"] == ["for q2"]


def test_a_waiting_task_can_be_cancelled(pool):
    handle = pool.submit(Task(goal="g", agents=["q"]))
    wait_for(handle, "waiting")
    assert handle.cancel() == "cancelled"
    with pytest.raises(InputNotExpected, match="has ended"):
        handle.respond("too late")


def test_a_message_sent_while_an_agent_streams_reaches_the_next_steps_once(pool):
    # Given: l streams slowly; m comes after l
    spec = {"l": {"tokens": 8, "token_sleep_s": 0.15}, "m": {"tokens": 1}}
    handle = pool.submit(Task(goal="g", agents=["l", "m"], inputs=spec))
    wait_for(handle, "tokens")
    # When: messages arrive while l streams
    handle.send("again")
    handle.send({"hint": "use the cache"})
    result = handle.result(timeout=60)
    events = list(handle.stream())
    got = [e.data["message"] for e in events if e.kind == "message_received"]
    # Then: in order, durable events; l's running step did not see them, m's next step did
    assert got == ["again", {"hint": "use the cache"}]
    outs = [(e.agent, e.data["round"], e.data["output"]["inbox"]) for e in events if e.kind == "step_finished"]
    assert outs[:2] == [("l", 1, []), ("m", 1, ["again", {"hint": "use the cache"}])]
    # And: m asked for round 2 because of "again"; there l sees the messages it had not
    # seen yet (those since its previous step), and m sees nothing new
    assert outs[2:] == [("l", 2, ["again", {"hint": "use the cache"}]), ("m", 2, [])]
    assert result.rounds == 2


def test_waiting_and_messages_survive_a_supervisor_crash(ray_session, pool_name, tmp_path):
    pool = person_pool(pool_name)
    try:
        spec = {"q": {"questions": ["ship it?"], "mark": str(tmp_path)}, "l": {"tokens": 1}}
        handle = pool.submit(Task(goal="g", agents=["q", "l"], inputs=spec))
        wait_for(handle, "waiting")
        handle.send("after the crash, read me")
        # When: the supervisor is SIGKILLed while the task waits, and Ray restarts it
        pid = ray.get(pool._sup.info.remote())["pid"]
        os.kill(pid, signal.SIGKILL)
        assert eventually(lambda: _restarted(pool, pid), 60)
        # Then: it is still waiting, and takes the answer sent after the restart
        assert handle.status == "waiting"
        handle.respond("yes")
        result = handle.result(timeout=60)
        assert result.outputs["q"]["answers"] == ["yes"]
        assert result.outputs["l"]["inbox"] == ["after the crash, read me"]
        assert len(os.listdir(tmp_path / "effects")) == 1
        events = list(handle.stream())
        assert [e.offset for e in events] == list(range(len(events)))
        assert sum(e.kind == "input_requested" for e in events) == 1
    finally:
        pool.shutdown()


def _restarted(pool, old_pid) -> bool:
    try:
        return ray.get(pool._sup.info.remote(), timeout=5)["pid"] != old_pid
    except Exception:
        return False


def test_approval_approve_applies_reject_fails_and_text_is_another_round(pool, tmp_path):
    def task(ws, **extra):
        (ws / "app.py").write_text("old\n")
        return Task(goal="g", workspace=str(ws), agents=["a"],
                    inputs={"approve": True, "apply": True, **extra})

    approve_ws, reject_ws, again_ws = (tmp_path / n for n in ("approve", "reject", "again"))
    for ws in (approve_ws, reject_ws, again_ws):
        ws.mkdir()
    pool.register("a", "scripted_agents:Approver")
    proposal = {"proposal": {"app.py": "new\n"}}
    approved = pool.submit(task(approve_ws, **proposal))
    rejected = pool.submit(task(reject_ws, **proposal))
    again = pool.submit(task(again_ws, **proposal))
    # Then: each waits with the change as its payload, and nothing is applied yet
    for handle in (approved, rejected, again):
        asked = wait_for(handle, "input_requested")
        assert asked.agent is None and asked.data["payload"]["kind"] == "approval"
        assert asked.data["payload"]["files"] == ["app.py"]
        wait_for(handle, "waiting", asked.offset)
    assert (approve_ws / "app.py").read_text() == "old\n"
    with pytest.raises(InvalidInput, match="approve"):
        approved.respond({"maybe": 1})
    approved.approve()
    rejected.reject("not this way")
    again.respond("rename it first")
    # approve: applied and succeeded
    res = approved.result(timeout=60)
    assert res.ok and res.applied == ["app.py"] and (approve_ws / "app.py").read_text() == "new\n"
    # reject: failed with the person's reason, nothing applied
    from threadbound.runtime import TaskFailed

    with pytest.raises(TaskFailed) as failed:
        rejected.result(timeout=60)
    assert failed.value.result.reason == "rejected" and "not this way" in failed.value.result.error
    assert (reject_ws / "app.py").read_text() == "old\n"
    # text: another round with it as feedback, then asked again
    answered = wait_for(again, "input_received")
    started = wait_for(again, "round_started", answered.offset)
    assert started.data["round"] == 2 and any("rename it first" in f for f in started.data["feedback"])
    second = wait_for(again, "input_requested", started.offset)
    assert second.data["request"] == 2
    again.approve()
    assert again.result(timeout=60).rounds == 2
