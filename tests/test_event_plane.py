"""The event path's costs, by what it does rather than by the clock: a waiting read is
woken by its own tasks' news only, a read answers with the tasks that changed, rows go
to clients and into snapshots as plain tuples, token events change nothing in a task's
record, and the structured log writes a batch's lines together.

No Ray and no timing: the task shard runs on a plain asyncio loop.
"""

from __future__ import annotations

import asyncio
import json

import cloudpickle
import pytest

from threadbound.agents.events import Row
from threadbound.agents.wire import pack, unpack
from threadbound.runtime.config import RuntimeConfig
from threadbound.runtime.supervisor.clock import SystemClock
from threadbound.runtime.supervisor.hooks import Hook, Hooks
from threadbound.runtime.supervisor.shard import TaskShard
from threadbound.runtime.supervisor.structured_log import StructuredLog
from threadbound.runtime.supervisor.task_state import DURABLE_FIELDS, export_tasks, tasks_from_snapshot
from threadbound.runtime.task import Task

pytestmark = pytest.mark.timeout(60)


def shard_with(n: int) -> tuple[TaskShard, list]:
    shard = TaskShard("p", SystemClock(), Hooks())
    return shard, [shard.new(Task(goal=f"g{i}", agents=["x"]), {}) for i in range(n)]


def test_a_waiting_read_is_woken_by_news_of_its_own_tasks_only():
    async def main():
        shard, (a, b) = shard_with(2)
        # Given a read that waits on task a
        reader = asyncio.ensure_future(shard.read_many({a.id: 0}, wait_s=60))
        await asyncio.sleep(0)
        assert shard.watchers(a.id) == 1 and shard.watchers(b.id) == 0
        # When task b streams
        for i in range(50):
            shard.emit(b, "tokens", "x", text=f"b{i}", n=1)
        await asyncio.sleep(0)
        # Then the read still waits: nothing woke it
        assert not reader.done()
        # and news of its own task answers it, with that task alone
        shard.emit(a, "tokens", "x", text="a0", n=1)
        got = await reader
        assert list(got) == [a.id]
        rows, status = got[a.id]
        assert [r[:4] for r in rows] == [(0, "tokens", "x", {"text": "a0", "n": 1})]
        assert shard.watchers(a.id) == 0  # nothing left behind

    asyncio.run(main())


def test_a_read_of_a_thousand_tasks_answers_with_the_ones_that_changed():
    async def main():
        shard, tasks = shard_with(1000)
        cursors = {ts.id: 0 for ts in tasks}
        reader = asyncio.ensure_future(shard.read_many(cursors, wait_s=60))
        await asyncio.sleep(0)
        shard.append_many([(tasks[7], "tokens", "x", {"text": "t", "n": 1}),
                           (tasks[900], "tokens", "x", {"text": "u", "n": 1})])
        got = await reader
        assert sorted(got) == sorted([tasks[7].id, tasks[900].id])
        assert sum(shard.watchers(ts.id) for ts in tasks) == 0

    asyncio.run(main())


def test_rows_reach_clients_as_plain_tuples_in_the_order_of_the_log():
    async def main():
        shard, (a,) = shard_with(1)
        for i in range(3):
            shard.emit(a, "tokens", "x", text=f"t{i}", n=1)
        got = await shard.read_many({a.id: 1})
        rows, _ = got[a.id]
        assert [type(r) for r in rows] == [tuple, tuple]
        assert [r[0] for r in rows] == [1, 2] and rows[0] == tuple(a.events[1])

    asyncio.run(main())


def test_wait_settled_is_woken_when_its_task_ends():
    async def main():
        shard, (a, b) = shard_with(2)
        waiter = asyncio.ensure_future(shard.wait_settled(a.id, 60))
        await asyncio.sleep(0)
        shard.emit(b, "succeeded", None)
        await asyncio.sleep(0)
        assert not waiter.done()
        shard.emit(a, "succeeded", None)
        assert (await waiter) is a

    asyncio.run(main())


def test_a_snapshot_holds_events_as_plain_tuples_and_resume_reads_them_back_as_rows():
    shard, (a,) = shard_with(1)
    for i in range(3):
        shard.emit(a, "tokens", "x", text=f"t{i}", n=1)
    entries, jobs, _ = export_tasks(shard.tasks)
    for job in jobs:  # (on the snapshot thread in a pool)
        job()
    rec = cloudpickle.loads(entries[0])
    (chunk,) = rec["event_chunks"]
    assert {type(r) for r in cloudpickle.loads(chunk)} == {tuple}
    back = tasks_from_snapshot({"tasks": entries})[a.id]
    assert [type(r) for r in back.events] == [Row] * 3 and back.events == a.events


def test_a_snapshot_pickles_only_the_events_since_the_last_one_and_resume_reads_them_all():
    shard, (a, b) = shard_with(2)
    for i in range(3):
        shard.emit(a, "tokens", "x", text=f"t{i}", n=1)
    for snap in range(2):
        entries, jobs, _ = export_tasks(shard.tasks)
        for job in jobs:
            job()
        if snap == 0:
            for i in range(3, 5):  # a streams on between the two snapshots; b does not change
                shard.emit(a, "tokens", "x", text=f"t{i}", n=1)
    rec = cloudpickle.loads(entries[0])
    # the second snapshot carries the first one's chunk as it was, and a new one for the two that followed
    assert [len(cloudpickle.loads(c)) for c in rec["event_chunks"]] == [3, 2]
    back = tasks_from_snapshot({"tasks": entries})
    assert back[a.id].events == a.events and back[b.id].events == b.events
    # and a resumed task's next snapshot goes on from the chunks it was resumed with
    assert back[a.id].chunked == 5


def test_a_snapshot_of_an_older_format_with_every_event_in_the_record_still_resumes():
    shard, (a,) = shard_with(1)
    shard.emit(a, "tokens", "x", text="t0", n=1)
    rec = {f: getattr(a, f) for f in DURABLE_FIELDS}
    rec["events"] = list(a.events)  # as snapshots before event chunks held them
    back = tasks_from_snapshot({"tasks": [cloudpickle.dumps(rec)]})[a.id]
    assert back.events == a.events and back.chunked == 0


def test_token_events_change_nothing_in_the_task_and_others_still_do():
    shard, (a,) = shard_with(1)
    shard.emit(a, "tokens", "x", text="t", n=1)
    assert a.status == "pending" and a.inflight == {}
    shard.emit(a, "step_started", "x", attempt=1)
    assert a.inflight == {"x": 1}


def test_the_structured_log_writes_a_batchs_lines_together_leaving_tokens_out(tmp_path):
    cfg = RuntimeConfig(name="p", log={"dir": str(tmp_path)})
    hook = StructuredLog(cfg)
    shard, (a,) = shard_with(1)
    calls = []
    add_many = hook._file.add_many
    hook._file.add_many = lambda lines: (calls.append(len(lines)), add_many(lines))
    shard.observers.add(hook)
    shard.append_many([(a, "step_started", "x", {"attempt": 1}), (a, "tokens", "x", {"text": "t", "n": 1}),
                       (a, "tokens", "x", {"text": "u", "n": 1}), (a, "step_finished", "x", {"attempt": 1})])
    hook.close()
    assert calls == [2]
    kinds = [json.loads(line)["kind"] for line in open(hook.path)]
    assert kinds == ["step_started", "step_finished"]


def test_while_the_journal_is_busy_events_wait_for_its_next_frame_and_an_idle_one_writes_soon(tmp_path):
    from threadbound.runtime.supervisor import durability
    from threadbound.runtime.supervisor.clock import FakeClock

    cfg = RuntimeConfig.from_mapping({"name": "main", "snapshot_dir": str(tmp_path), "snapshot_interval_s": 3600})
    gather, gap = durability.GATHER_S, durability.BUSY_GAP_S

    async def main():
        clock = FakeClock(rate=0)  # time moves only when the test moves it
        seen: list[dict] = []
        durable = durability.Durability(cfg, durability.open_location(cfg), lambda m: seen.append(dict(m)), clock)
        export = lambda: ({}, {}, [])  # noqa: E731
        durable.write_now(0, export)
        durable.start(export)
        frames = lambda: durable.stats["journal_frames"]  # noqa: E731
        # Given an idle journal: an event is written once the gathering window passes
        durable.record(["event", 0], {"t1": 1})
        await clock.elapse(gather)
        assert frames() == 1
        # When events keep coming right after that frame
        order = []
        for i in range(1, 4):
            durable.record(["event", i], {"t1": i + 1})
            await clock.elapse(gather)
            order.append(frames())
        # Then they wait for the busy window to end and go out together in one frame
        await clock.elapse(gap)
        order.append(frames())
        assert order == [1, 1, 1, 2] and seen[-1] == {"t1": 4}
        # And a commit does not wait for any window
        durable.record(["commit"], {"t1": 5})
        await durable.flush()
        assert frames() == 3
        # And once the journal has been idle a while, an event is written after the short window again
        await clock.elapse(10 * gap)
        durable.record(["event", 5], {"t1": 6})
        await clock.elapse(gather)
        assert frames() == 4
        await durable.close(export)

    asyncio.run(main())


def test_a_commit_goes_on_before_the_readers_its_frame_wakes(tmp_path):
    from threadbound.runtime.supervisor import durability

    cfg = RuntimeConfig.from_mapping({"name": "main", "snapshot_dir": str(tmp_path), "snapshot_interval_s": 3600})

    async def main():
        loop = asyncio.get_running_loop()
        order: list[str] = []
        woken = loop.create_future()  # a reader waiting for the task's events (as read_many does)

        def on_durable(marks):
            if marks and not woken.done():
                woken.set_result(None)

        durable = durability.Durability(cfg, durability.open_location(cfg), on_durable)
        export = lambda: ({}, {}, [])  # noqa: E731
        durable.write_now(0, export)
        durable.start(export)

        async def reader():
            await woken
            order.append("reader")

        async def commit():
            durable.record(["commit"], {"t1": 1})
            await durable.flush()
            order.append("commit")

        # Given a reader waiting for news; When a step's commit is flushed
        await asyncio.gather(reader(), commit())
        # Then the commit (whose task sends its next step) resumes first, the reader after,
        # and the reader was woken by the same frame
        assert order == ["commit", "reader"] and durable.stats["journal_frames"] == 1
        await durable.close(export)

    asyncio.run(main())


class _ActorStream:
    """An actor's ``events`` stream as Ray gives it: each ``__anext__`` an awaitable
    message ``[(idempotency key, batch), ...]``; the stream ends (the actor died) when
    the test puts None."""

    def __init__(self) -> None:
        self.messages: asyncio.Queue = asyncio.Queue()

    def __aiter__(self):
        return self

    async def __anext__(self):
        message = await self.messages.get()
        if message is None:
            raise StopAsyncIteration

        async def ready():  # bytes, as the actor sends them (agents.wire); a test may put its own
            return message if isinstance(message, bytes) else pack(message)

        return ready()


class _Method:
    def __init__(self, fn) -> None:
        self.fn = fn

    def options(self, **_):
        return self

    def remote(self, *args):
        return self.fn(*args)


class _EmptyReply:
    """A start call's reply with nothing in it yet: the step's events all come on the stream."""

    def future(self):
        fut = asyncio.get_running_loop().create_future()
        fut.set_result(pack([]))
        return fut


class _Handle:
    def __init__(self) -> None:
        self.stream = _ActorStream()
        self.started: list[str] = []
        self.events = _Method(lambda: self.stream)
        self.start_step = _Method(self._start)

    def _start(self, req):
        self.started.append(unpack(req).idempotency_key)
        return _EmptyReply()


class _CountBatches(Hook):
    def __init__(self) -> None:
        self.batches: list[list[tuple[str, str]]] = []

    def on_events(self, batch) -> None:
        self.batches.append([(ts.id, row.data["text"]) for ts, row in batch])


def test_one_append_carries_every_agents_tokens_of_an_actors_message():
    """An actor hosting many agents sends their tokens in one message; the supervisor
    appends them in one batch (observers and the journal hear once), not once per agent,
    and no step's code runs per batch: each step's handler is called as the message is read."""
    from types import SimpleNamespace

    from threadbound.runtime.supervisor.channel import ActorChannel

    async def main():
        shard, tasks = shard_with(3)
        counter = shard.observers.add(_CountBatches())
        handle = _Handle()
        channel = ActorChannel(handle, "agent/0")
        ended: list[str] = []

        def handler(ts):
            def on_batch(batch):
                for kind, data in batch:
                    if kind == "tokens":
                        channel.pending.append((ts, kind, "x", dict(data)))
                    else:
                        ended.append(ts.id)
            return on_batch

        listeners = [channel.start(SimpleNamespace(idempotency_key=ts.id), f"x/{ts.id}", handler(ts), None,
                                   append=shard.append_many) for ts in tasks]
        await asyncio.sleep(0)  # their start calls' replies (empty) are in
        # Given three agents' steps on one actor, when its one message carries all their tokens
        tok = lambda text: ("tokens", {"text": text, "n": 1})  # noqa: E731
        await handle.stream.messages.put([(ts.id, [tok(f"{ts.id}-a"), tok(f"{ts.id}-b")]) for ts in tasks])
        for _ in range(5):
            await asyncio.sleep(0)
        # Then one append carries them all, each task's in its order
        assert counter.batches == [[(ts.id, f"{ts.id}-{x}") for ts in tasks for x in "ab"]]
        assert [[r.data["text"] for r in ts.events] for ts in tasks] == [[f"{ts.id}-a", f"{ts.id}-b"] for ts in tasks]
        # And a step's last batch ends its listening; the others still hear theirs
        await handle.stream.messages.put([(tasks[0].id, [("__result__", {})]), (tasks[1].id, [tok("late")])])
        for _ in range(5):
            await asyncio.sleep(0)
        assert ended == [tasks[0].id] and listeners[0].ended and not listeners[1].ended
        assert len(counter.batches) == 2 and counter.batches[1] == [(tasks[1].id, "late")]
        # And a step given up (detached) gets what follows queued, for whoever reads it after
        listeners[2].detach()
        await handle.stream.messages.put([(tasks[2].id, [("__error__", {"x": 1})])])
        got = await (await listeners[2].__anext__())
        assert got == [("__error__", {"x": 1})] and len(counter.batches) == 2
        # And when the actor dies, a direct listener hears it through its error handler
        errors = []
        listeners[1].on_error = errors.append
        await handle.stream.messages.put(None)
        await channel.task
        assert len(errors) == 1 and type(errors[0]).__name__ == "ActorDiedError"

    asyncio.run(main())


class _LateReply:
    """A start call's reply that a test completes (or fails) when it wants."""

    def __init__(self) -> None:
        self.fut = asyncio.get_running_loop().create_future()

    def future(self):
        return self.fut


class _LateHandle(_Handle):
    def __init__(self) -> None:
        super().__init__()
        self.replies: list[_LateReply] = []

    def _start(self, req):
        self.started.append(unpack(req).idempotency_key)
        self.replies.append(_LateReply())
        return self.replies[-1]


def test_a_steps_reply_comes_before_what_the_stream_brought_first_and_before_its_break():
    """The start call's reply (the step's first batch) and the actor's stream come by two
    ways: a step hears the reply's batch first, whichever arrives first, and a stream that
    breaks before the reply is in loses nothing the reply carried."""
    from types import SimpleNamespace

    from threadbound.runtime.supervisor.channel import ActorChannel

    async def main():
        handle = _LateHandle()
        channel = ActorChannel(handle, "agent/0")
        heard: dict[str, list] = {"a": [], "b": []}

        def on_batch(key):
            return lambda batch: heard[key].extend(data["text"] if kind == "tokens" else kind for kind, data in batch)

        def on_error(key):
            return lambda error: heard[key].append(type(error).__name__)

        for key in "ab":
            channel.start(SimpleNamespace(idempotency_key=key), f"x/{key}", on_batch(key), on_error(key),
                          append=lambda items: None)
        tok = lambda text: ("tokens", {"text": text, "n": 1})  # noqa: E731
        # Given step a's second batch on the stream before its start call's reply is in
        await handle.stream.messages.put([("a", [tok("a2")])])
        for _ in range(5):
            await asyncio.sleep(0)
        assert heard["a"] == []  # held for the reply
        # When the reply comes
        handle.replies[0].fut.set_result(pack([tok("a1")]))
        await asyncio.sleep(0)
        # Then a heard its reply's batch first, then the stream's
        assert heard["a"] == ["a1", "a2"]
        # Given step b's reply not in yet when the actor's stream breaks (its process died)
        await handle.stream.messages.put(None)
        for _ in range(5):
            await asyncio.sleep(0)
        assert heard["b"] == []
        # When the reply comes after all (it was sent before the process died)
        handle.replies[1].fut.set_result(pack([tok("b1")]))
        await asyncio.sleep(0)
        # Then b heard its token, then the error
        assert heard["b"] == ["b1", "ActorDiedError"]

    asyncio.run(main())


# A pickle naming a module the supervisor does not have: unpickling it raises ModuleNotFoundError.
UNREADABLE = b"\x80\x02cno_such_module_here\nThing\nq\x00)\x81q\x01."


def test_a_reply_or_stream_message_the_supervisor_cannot_unpickle_fails_its_steps_instead_of_leaving_them_waiting():
    """What an agent sent that the supervisor cannot unpickle (a class it cannot import) is
    the step's broken stream, a Ray error the attempt retries by policy: no step waits
    for an end that is lost."""
    from types import SimpleNamespace

    from ray.exceptions import RayError

    from threadbound.runtime.supervisor.channel import ActorChannel

    async def main():
        handle = _LateHandle()
        channel = ActorChannel(handle, "agent/0")
        heard: dict[str, list] = {"a": [], "b": []}

        for key in "ab":
            channel.start(SimpleNamespace(idempotency_key=key), f"x/{key}", lambda batch, k=key: heard[k].append(batch),
                          lambda error, k=key: heard[k].append(error), append=lambda items: None)
        # Given step a's reply that cannot be unpickled here
        handle.replies[0].fut.set_result(UNREADABLE)
        await asyncio.sleep(0)
        # Then a hears a Ray error naming why, and nothing else
        (error,) = heard["a"]
        assert isinstance(error, RayError) and "no_such_module_here" in str(error)
        # Given step b's reply in, then a stream message that cannot be unpickled
        handle.replies[1].fut.set_result(pack([]))
        await asyncio.sleep(0)
        await handle.stream.messages.put(UNREADABLE)
        await channel.task
        # Then b hears the stream break with that error, and the channel is closed to new steps
        (error,) = heard["b"]
        assert isinstance(error, RayError) and "no_such_module_here" in str(error)
        assert isinstance(channel.error, RayError)

    asyncio.run(main())
