"""The inside of an actor hosting several agents: places, stop requests, shared caches and
a sandbox uid per run (``agents/host.py``, ``agents/sandbox/seats.py``)."""

from __future__ import annotations

import os
import sys
import threading
import time

import cloudpickle
import pytest

from threadbound.agents import Agent
from threadbound.agents.host import ERROR, RESULT, SlotWorker, StepRequest


def request(cls, place: int, task: str, **kw) -> StepRequest:
    base = dict(binding=f"{task}/x/1", agent_blob=cloudpickle.dumps(cls), task_id=task, role="x", goal="g",
                workspace=None, round=1, attempt=1, idempotency_key=f"{task}:1:x:1", inputs={}, outputs={},
                feedback=[], level=1, streaming=True, model_config=None, token_batch_size=1,
                token_interval_s=0.01, place=place)
    base.update(kw)
    return StepRequest(**base)


class Forever(Agent):
    """Yields a token every few milliseconds until stopped."""

    def step(self, ctx):
        while True:
            time.sleep(0.005)
            yield "t"


class Emits(Agent):
    """A plain (not generator) step that emits events until stopped."""

    def step(self, ctx):
        while True:
            time.sleep(0.005)
            ctx.emit("tick", {})


class Quick(Agent):
    def step(self, ctx):
        yield "hi"
        return "done"


_gate = threading.Barrier(8, timeout=30)


class Together(Agent):
    def step(self, ctx):
        _gate.wait()  # every step is running at the same time, or this times out
        yield ctx.task_id
        return ctx.task_id


def outcome(batches):
    return [e for b in batches for e in b if e[0] in (RESULT, ERROR)][-1]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("cls", [Forever, Emits], ids=["at-a-token", "at-an-emit"])
def test_a_step_asked_to_stop_ends_at_its_next_check_and_the_other_place_goes_on(cls):
    # Given an actor with two places: a step that never ends on place 0, a quick one on place 1
    worker = SlotWorker("agent/0", places=2)
    stuck = worker.run_step(request(cls, 0, "t1"))
    first = next(stuck)  # it runs
    # When the supervisor asks place 0's step to stop (wrong key first: nothing happens)
    assert worker.stop(0, "t9:1:x:1") is False
    assert worker.stop(0, "t1:1:x:1") is True
    kind, data = outcome([first, *stuck])
    # Then it ends as a Stopped error, and place 1 runs a step of its own meanwhile
    assert kind == ERROR and data["type"] == "Stopped"
    assert 0 not in worker._bound  # its next step gets a fresh agent from the committed state
    kind, data = outcome(list(worker.run_step(request(Quick, 1, "t2"))))
    assert kind == RESULT and data["output"] == "done"
    assert worker.stop(0, "t1:1:x:1") is False  # it is over


@pytest.mark.timeout(60)
def test_places_run_steps_at_once_and_share_one_unpickled_class():
    # Given one actor with 8 places, and 8 steps of the same agent class at once
    worker = SlotWorker("agent/0", places=8)
    blob = cloudpickle.dumps(Together)
    results = {}

    def run(i):
        results[i] = outcome(list(worker.run_step(request(Together, i, f"t{i}", agent_blob=blob))))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    # Then each got its own agent and result, and the class was unpickled once
    assert {i: r[1]["output"] for i, r in results.items()} == {i: f"t{i}" for i in range(8)}
    assert len(worker._classes) == 1 and worker.bindings == 8


# -- a uid of its own for every sandboxed run ------------------------------------------------

def test_two_runs_at_once_in_one_process_never_share_a_derived_uid():
    from threadbound.agents.sandbox import seats
    from threadbound.agents.sandbox.settings import SandboxSettings

    with seats._seat() as a, seats._seat() as b:
        ua, ub = seats.sandbox_uid(SandboxSettings(), a), seats.sandbox_uid(SandboxSettings(), b)
    assert a != b and ua != ub and 0 < min(ua, ub) and max(ua, ub) < 2**32 - 1
    with seats._seat() as c:  # a seat is free again once its run ended
        assert c == a


@pytest.mark.skipif(os.geteuid() != 0, reason="a non-root pool's runs keep its own uid (mapped in a user namespace)")
@pytest.mark.timeout(180)
def test_two_concurrent_sandboxed_runs_in_one_actor_get_different_uids(ray_session, tmp_path):
    import ray

    @ray.remote(max_concurrency=3)
    class Host:  # an agent actor hosting two agents, as agents_per_actor: 2 makes it
        def run(self, cwd: str) -> tuple[int, str]:
            from threadbound.agents.sandbox import runner
            from threadbound.agents.sandbox.settings import SandboxSettings

            code = ("import os, time\n"
                    "open('uid', 'w').write(str(os.getuid()))\n"
                    "deadline = time.monotonic() + 60\n"
                    "while not os.path.exists('go') and time.monotonic() < deadline:\n"
                    "    time.sleep(0.02)\n"
                    "print(os.getuid())\n")
            r = runner.run([sys.executable, "-c", code], cwd=cwd, settings=SandboxSettings(isolation="best_effort"))
            return os.getpid(), r.output.strip()

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (b / "go").write_text("")  # the second run does not wait
    host = Host.remote()
    try:
        # Given a run in the actor that waits until told to go
        first = host.run.remote(str(a))
        deadline = time.monotonic() + 120
        while not (a / "uid").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (a / "uid").exists(), ray.get(first)
        # When a second run starts in the same actor while the first still runs
        pid_b, uid_b = ray.get(host.run.remote(str(b)), timeout=120)
        (a / "go").write_text("")
        pid_a, uid_a = ray.get(first, timeout=120)
    finally:
        ray.kill(host)
    # Then they ran in one process, under two different uids, neither root's
    assert pid_a == pid_b
    assert uid_a.isdigit() and uid_b.isdigit() and uid_a != uid_b and "0" not in (uid_a, uid_b)


class Counts(Agent):
    """Streams 0..49 as tokens, a few milliseconds apart."""

    def step(self, ctx):
        for i in range(50):
            time.sleep(0.002)
            yield f"{i},"
        return ctx.task_id


@pytest.mark.timeout(60)
def test_one_event_stream_carries_every_places_tokens_in_order_in_shared_messages():
    # Given an actor with 4 places streaming at once through its one event stream
    worker = SlotWorker("agent/0", places=4)
    stream = worker.events()
    firsts = {f"t{i}:1:x:1": worker.start_step(request(Counts, i, f"t{i}", token_batch_size=8)) for i in range(4)}
    keys = list(firsts)
    # (on an actor of several places a start call replies at once, with nothing: all goes on the stream)
    assert all(first == [] for first in firsts.values())
    texts = {k: "" for k in keys}
    ends, shared, messages = {}, 0, 0
    # When it is read until every step has ended
    while len(ends) < 4:
        item = next(stream)
        time.sleep(0.02)  # a busy reader: what the places stream meanwhile must ride together
        messages += 1
        shared += len(item) > 1
        for key, batch in item:
            for kind, data in batch:
                if kind == "tokens":
                    assert key not in ends
                    texts[key] += data["text"]
                elif kind in (RESULT, ERROR):
                    ends[key] = (kind, data.get("output"))
    # Then every token came once and in order, each step's outcome last, and places shared messages
    expected = "".join(f"{i}," for i in range(50))
    assert texts == {k: expected for k in keys}
    assert ends == {f"t{i}:1:x:1": (RESULT, f"t{i}") for i in range(4)}
    assert shared > 0 and messages < 4 * (50 // 8 + 2)
    assert worker._steps == {} and worker._running == {}


class AsksForever(Agent):
    """A plain step that consumes model answers itself (no token reaches the host) forever."""

    def step(self, ctx):
        while True:
            for _ in ctx.ask([{"role": "user", "content": "go"}]):
                pass


@pytest.mark.timeout(60)
def test_a_step_asked_to_stop_ends_inside_ctx_ask():
    from threadbound.agents.models.simulated import SimulatedModelConfig

    worker = SlotWorker("agent/0", places=2)
    model = SimulatedModelConfig(tokens_per_s=200, tokens=1000)
    got = []
    reader = threading.Thread(target=lambda: got.extend(worker.run_step(request(AsksForever, 0, "t1",
                                                                                model_config=model))))
    reader.start()
    deadline = time.monotonic() + 30
    while 0 not in worker._running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert worker.stop(0, "t1:1:x:1") is True
    reader.join(30)
    kind, data = outcome(got)
    assert kind == ERROR and data["type"] == "Stopped" and "ask" in data["traceback"]
