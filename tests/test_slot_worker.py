"""The inside of an agent actor, run in-process: batching, errors, state, non-streaming."""

import threading
import time

import cloudpickle
import pytest

from threadbound.agents import Agent, SimulatedModelConfig, TransientError
from threadbound.agents.host import ERROR, RESULT, SlotWorker, StepRequest, _TokenBatcher


class Words(Agent):
    def __init__(self):
        self.n = 0

    def get_state(self):
        return self.n

    def set_state(self, state):
        self.n = state

    def step(self, ctx):
        text = yield from ctx.ask([{"role": "user", "content": ctx.goal}])
        ctx.emit("note", {"len": len(text)})
        self.n += 1
        return {"text": text, "n": self.n}


class Boom(Agent):
    def step(self, ctx):
        yield "partial "
        raise TransientError("try later", retry_after_s=1.5)


def request(cls, **kw):
    base = dict(binding="t1/x/1", agent_blob=cloudpickle.dumps(cls), task_id="t1", role="x",
                goal="one two three four five", workspace=None, round=1, attempt=1,
                idempotency_key="t1:1:x:1", inputs={}, outputs={}, feedback=[], level=2,
                streaming=True, model_config=SimulatedModelConfig(answers={"x": "a b c d e f g"}),
                token_batch_size=3, token_interval_s=3600.0)
    base.update(kw)
    return StepRequest(**base)


def run(worker, req):
    return [ev for batch in worker.run_step(req) for ev in batch]


def test_tokens_are_batched_and_joined_text_is_exact():
    events = run(SlotWorker("agent/0"), request(Words))
    tokens = [d for k, d in events if k == "tokens"]
    assert all(t["n"] <= 3 for t in tokens)
    assert "".join(t["text"] for t in tokens) == "a b c d e f g"
    kinds = [k for k, _ in events]
    assert kinds.index("note") > max(i for i, k in enumerate(kinds) if k == "tokens")
    assert kinds[-1] == RESULT and events[-1][1]["output"]["text"] == "a b c d e f g"


def test_pending_tokens_are_flushed_on_time_while_the_agent_is_busy():
    class Stall(Agent):
        def step(self, ctx):
            yield "x "
            yield "y "
            time.sleep(0.5)  # busy (or stuck): what it streamed must not wait for it
            return "done"

    batches = list(SlotWorker("agent/0").run_step(request(Stall, token_batch_size=100, token_interval_s=0.05)))
    assert batches[0] == [("tokens", {"text": "x y ", "n": 2})]  # out before the step ended
    assert batches[-1][-1][0] == RESULT


def test_non_streaming_yields_one_message_and_no_tokens():
    events = run(SlotWorker("agent/0"), request(Words, streaming=False))
    assert [k for k, _ in events if k in ("tokens", "message")] == ["message"]
    assert dict(events)["message"]["text"] == "a b c d e f g"


def test_state_is_restored_on_a_new_binding_and_kept_within_one():
    w = SlotWorker("agent/0")
    assert run(w, request(Words))[-1][1]["state"] == 1
    assert run(w, request(Words))[-1][1]["state"] == 2  # same binding: same instance
    fresh = run(w, request(Words, binding="t1/x/2", state=10, has_state=True))
    assert fresh[-1][1]["state"] == 11 and w.bindings == 2


def test_agent_failure_becomes_data_after_partial_output():
    events = run(SlotWorker("agent/0"), request(Boom))
    assert events[0] == ("tokens", {"text": "partial ", "n": 1})
    kind, err = events[-1]
    assert kind == ERROR and err["transient"] and err["retry_after_s"] == 1.5
    assert "try later" in err["message"]


def test_yielding_a_non_string_is_a_clear_error():
    class Bad(Agent):
        def step(self, ctx):
            yield 42

    kind, err = run(SlotWorker("agent/0"), request(Bad))[-1]
    assert kind == ERROR and "yielded int" in err["message"]


def test_release_leaves_the_slot_clean():
    w = SlotWorker("agent/0")
    run(w, request(Words))
    w.release()
    assert w.agent is None and w.binding is None


def test_batcher_flushes_on_size_and_interval():
    now = [0.0]
    b = _TokenBatcher(batch_size=10, interval_s=0.05, clock=lambda: now[0])
    assert b.add("a")  # first token: flush immediately
    b.take()
    assert not b.add("b")
    now[0] = 0.06
    assert b.add("c")
    assert b.take() == ("tokens", {"text": "bc", "n": 2})


@pytest.mark.parametrize("kind", ["error", "transient"])
def test_simulated_faults_raise_typed_errors(kind):
    from threadbound.agents import ModelError, SimulatedModel, TransientModelError

    m = SimulatedModel(SimulatedModelConfig(faults=[{"kind": kind, "agent": "x", "attempt": 1}]))
    with pytest.raises(TransientModelError if kind == "transient" else ModelError):
        list(m.stream([], agent="x", attempt=1))
    assert list(m.stream([], agent="x", attempt=2))  # other attempts are untouched


_RELEASE = threading.Event()  # lets the stuck agent below go


class Where(Agent):
    def step(self, ctx):
        yield "x "
        return threading.current_thread().name


class Stuck(Agent):
    def step(self, ctx):
        yield "x "
        _RELEASE.wait(30)  # ignores its stop until the test lets it go
        return "late"


def test_steps_one_after_another_reuse_the_agent_thread_but_never_a_stuck_ones():
    w = SlotWorker("agent/0")
    # Given two steps that end, one after the other
    a = run(w, request(Where, task_id="t1"))[-1][1]["output"]
    b = run(w, request(Where, task_id="t2", binding="t2/x/1", idempotency_key="t2:1:x:1"))[-1][1]["output"]
    # Then the second ran on the first one's thread, named for each step as it ran
    assert (a, b, w._drivers.started) == ("x/t1", "x/t2", 1)
    # Given a step whose agent does not stop when asked
    stuck = w.run_step(request(Stuck, task_id="t3", binding="t3/x/1", idempotency_key="t3:1:x:1"))
    assert next(stuck) == [("tokens", {"text": "x ", "n": 1})]
    assert w.stop(0, "t3:1:x:1")
    # When the next step comes (its place given up on the stuck one, as the supervisor does)
    stuck.close()
    c = run(w, request(Where, task_id="t4", binding="t4/x/1", idempotency_key="t4:1:x:1"))[-1][1]["output"]
    # Then it gets a thread of its own: the stuck one is still inside its agent's code
    assert (c, w._drivers.started) == ("x/t4", 2)
    _RELEASE.set()


def test_a_step_that_ends_before_its_first_batch_is_due_is_one_call():
    # Given an actor whose agent answers at once (the simulated model, no pacing)
    worker = SlotWorker("agent/0")
    # When its step is started
    first = worker.start_step(request(Words, token_batch_size=32))
    # Then the start call's reply is the whole step, its outcome last: nothing goes on the stream
    assert [k for k, _ in first] == ["tokens", "note", RESULT]
    assert first[0][1]["text"] == "a b c d e f g" and first[-1][1]["output"]["n"] == 1
    assert worker._steps == {} and worker._running == {}


def test_a_longer_step_replies_with_its_first_token_and_streams_the_rest_on_the_actors_stream():
    class Slow(Agent):
        def step(self, ctx):
            yield "first "
            time.sleep(0.3)  # e.g. a model between two tokens
            yield "second "
            return "done"

    # Given an actor with one place, and its one event stream
    worker = SlotWorker("agent/0")
    stream = worker.events()
    # When a step that pauses after its first token is started
    t0 = time.monotonic()
    first = worker.start_step(request(Slow, token_batch_size=100, token_interval_s=0.05))
    replied_after = time.monotonic() - t0
    # Then the reply carries that token at once, without waiting for the step
    assert first == [("tokens", {"text": "first ", "n": 1})] and replied_after < 0.25
    # And the rest, outcome last, comes on the actor's stream under the step's key
    rest = []
    while not rest or rest[-1][0] != RESULT:
        for key, batch in next(stream):
            assert key == "t1:1:x:1"
            rest.extend(batch)
    assert rest[0] == ("tokens", {"text": "second ", "n": 1}) and rest[-1][1]["output"] == "done"
    assert worker._steps == {} and worker._running == {}


def test_on_the_actors_stream_a_full_batch_goes_out_without_waiting_for_the_turn(tmp_path):
    class Burst(Agent):
        def step(self, ctx):
            yield "first "
            time.sleep(0.2)  # the start call has replied with the first token
            for i in range(12):
                yield f"{i} "
            time.sleep(1.0)  # busy: a full batch must not wait for this, nor for the turn
            open(ctx.inputs["worked"], "w").close()
            return "done"

    worked = tmp_path / "worked"
    worker = SlotWorker("agent/0")
    stream = worker.events()
    # Given a step on the actor's stream whose turn is long (token_interval_s = 10 s)
    first = worker.start_step(request(Burst, token_batch_size=4, token_interval_s=10.0, inputs={"worked": str(worked)}))
    assert first == [("tokens", {"text": "first ", "n": 1})]
    # When it makes 12 tokens at once, then works a second
    got = []
    while sum(d["n"] for k, d in got if k == "tokens") < 12:
        for _, batch in next(stream):
            got.extend(batch)
    # Then they came in batches of the batch size while it still worked (not at its turn or its end)
    assert not worked.exists()
    assert [d["n"] for k, d in got if k == "tokens"] == [4, 4, 4]
    rest = []
    while not rest or rest[-1][0] != RESULT:
        for _, batch in next(stream):
            rest.extend(batch)
    assert rest[-1][1]["output"] == "done" and worked.exists()
