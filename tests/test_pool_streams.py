"""Event streams on a real local Ray: order, replay, reconnect, two clients, asyncio."""

import asyncio

import pytest
from conftest import eventually, make_pool

from threadbound.runtime import Task

pytestmark = pytest.mark.usefixtures("ray_session")


@pytest.fixture(scope="module")
def pool(ray_session):
    p = make_pool("streams")
    yield p
    p.shutdown()


def kinds(events):
    return [e.kind for e in events]


def test_stream_shows_every_event_in_order_and_result_has_outputs(pool):
    handle = pool.submit(Task(goal="hello", agents=["a", "b"], inputs={"*": {"tokens": 9, "emit": 2}}))
    events = list(handle.stream())
    assert [e.offset for e in events] == list(range(len(events)))
    assert kinds(events)[:5] == ["pending", "admitted", "running", "level", "round_started"]
    assert events[3].data["level"] == 2 and events[3].data["reasons"] == ["fixed: level 2 from config"]
    assert events[-1].kind == "succeeded" and events[-1].terminal
    for role in ("a", "b"):
        text = "".join(e.data["text"] for e in events if e.kind == "tokens" and e.agent == role)
        assert text == "".join(f"{role}{i} " for i in range(9))
        assert [e.data["i"] for e in events if e.kind == "progress" and e.agent == role] == [0, 1]
    result = handle.result(timeout=30)
    assert result.ok and result.outputs["a"]["role"] == "a" and result.outputs["b"]["calls"] == 1
    assert handle.status == "succeeded"


def test_tokens_are_batched_not_one_event_each(pool):
    handle = pool.submit(Task(goal="many tokens", agents=["a"], inputs={"a": {"tokens": 200}}))
    batches = [e for e in handle.stream() if e.kind == "tokens"]
    assert sum(e.data["n"] for e in batches) == 200
    assert len(batches) <= 200 // 4 + 2  # token_batch_size is 4 in these pools


def test_reconnect_from_offset_misses_nothing_and_repeats_nothing(pool):
    handle = pool.submit(Task(goal="long", agents=["a", "b", "c"],
                              inputs={"*": {"tokens": 12, "token_sleep_s": 0.01}}))
    first = []
    for event in handle.stream():
        first.append(event)
        if len(first) == 7:
            break  # the client drops mid-run
    rest = list(pool.task(handle.task_id).stream(from_offset=first[-1].offset + 1))
    full = list(handle.stream())
    assert first + rest == full
    assert [e.offset for e in first + rest] == list(range(len(full)))


def test_two_clients_on_one_supervisor_see_identical_sequences(pool):
    other = make_pool("streams")  # same name: attaches to the same supervisor
    try:
        handle = pool.submit(Task(goal="shared", agents=["a", "b"], inputs={"*": {"tokens": 20}}))
        theirs = list(other.task(handle.task_id).stream())
        ours = list(handle.stream())
        assert theirs == ours and ours[-1].kind == "succeeded"
        assert handle.task_id in {t.task_id for t in other.tasks()}
    finally:
        other.close()


def test_asyncio_users_get_the_same_api(pool):
    async def main():
        handle = await pool.asubmit(Task(goal="async", agents=["a"], inputs={"a": {"tokens": 5}}))
        events = [e async for e in handle.astream()]
        result = await handle.aresult(timeout=30)
        return events, result

    events, result = asyncio.run(main())
    assert events[-1].kind == "succeeded" and result.ok


def test_agents_that_ask_for_rounds_get_feedback(pool):
    handle = pool.submit(Task(goal="iterate", agents=["a", "b"], inputs={"b": {"rounds": 2}}))
    result = handle.result(timeout=30)
    assert result.rounds == 2
    assert result.outputs["a"]["feedback"] == ["b wants round 2"]
    assert result.outputs["a"]["calls"] == 2  # the same agent, its state kept across rounds


def test_rounds_running_out_fail_the_task_with_the_feedback(pool):
    from threadbound.runtime import TaskFailed

    handle = pool.submit(Task(goal="never done", agents=["a"], max_rounds=2, inputs={"a": {"rounds": 5}}))
    with pytest.raises(TaskFailed, match="no success after 2 round"):
        handle.result(timeout=30)


def test_step_calls_are_named_role_slash_task_for_the_dashboard_and_polls_are_not_listed(pool):
    from ray.util.state import list_tasks

    def listed(name):
        return list_tasks(filters=[("name", "=", name)], raise_on_missing_output=False)

    handle = pool.submit(Task(goal="named", agents=["a", "b"]))
    assert len(list(handle.stream())) > 3  # followed by long-polls (read_many)
    handle.result(timeout=30)  # and waited for (wait)
    name = f"a/{handle.task_id}"
    found = eventually(lambda: listed(name))
    assert {t.name for t in found} == {name}
    # The same client's later call is listed, so the polls before it would be by now: Ray's
    # bounded task table keeps the steps, not the clients' polls.
    pool.stats()
    assert eventually(lambda: listed("_Supervisor.stats"))
    assert not [t for m in ("read_many", "read", "wait") for t in listed(f"_Supervisor.{m}")]


def test_non_streaming_pool_sends_one_message_per_step(ray_session):
    p = make_pool("nostream", streaming=False, max_agents=1, max_agents_per_task=1)
    try:
        events = list(p.submit(Task(goal="quiet", agents=["a"], inputs={"a": {"tokens": 6}})).stream())
        assert "tokens" not in kinds(events)
        (msg,) = [e for e in events if e.kind == "message"]
        assert msg.data["text"] == "a0 a1 a2 a3 a4 a5 "
    finally:
        p.shutdown()


def test_a_short_step_is_one_call_and_a_long_one_streams_the_rest_on_its_actors_stream(pool):
    # Given a task of three short steps (their tokens made at once)
    before = pool.stats()["step_messages"]
    short = pool.submit(Task(goal="short", agents=["a", "b", "c"], inputs={"*": {"tokens": 5}}))
    events = list(short.stream())
    after = pool.stats()["step_messages"]
    # Then each step was started by one call, whose reply brought its events
    assert after["replies"] - before["replies"] == 3
    assert sum(e.data["n"] for e in events if e.kind == "tokens") == 15
    # Given a step that makes its tokens 30 ms apart
    long = pool.submit(Task(goal="long", agents=["a"], inputs={"a": {"tokens": 10, "token_sleep_s": 0.03}}))
    events = list(long.stream())
    later = pool.stats()["step_messages"]
    # Then its first token came in the start call's reply and the rest on its actor's stream,
    # every token once and in order
    assert later["replies"] - after["replies"] == 1 and later["stream"] - after["stream"] >= 2
    assert "".join(e.data["text"] for e in events if e.kind == "tokens") == "".join(f"a{i} " for i in range(10))
    assert events[-1].kind == "succeeded"
