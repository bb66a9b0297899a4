"""LangGraphRole on a real pool: message chunks stream as tokens, node updates as events, the
graph's checkpoint is the committed state (a resumed pool continues the graph, no committed
node runs again), and a graph stuck in a node is stopped by the step deadline."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest
from adapters_roles import Stuck, Talk
from conftest import SNAPSHOTS, eventually, pool_settings
from openai_server import OpenAITestServer

from threadbound.agents.adapters._common import LANGGRAPH
from threadbound.runtime import AgentPool, RuntimeConfig, Task, TaskFailed, TaskTimedOut

pytestmark = [
    pytest.mark.skipif(LANGGRAPH.problem("graph") is not None,
                       reason="LangGraph is an optional extra: pip install -e '.[langgraph]'"),
    pytest.mark.usefixtures("ray_session"), pytest.mark.timeout(180),
]


def settings(name, **overrides):
    return pool_settings(name, **{"step_timeout_s": 60, "task_timeout_s": 150, **overrides})


def test_a_graph_streams_its_model_chunks_as_tokens_and_its_node_updates_as_events(pool_name):
    with OpenAITestServer() as srv:
        pool = AgentPool(RuntimeConfig.from_mapping(settings(pool_name, model={
            "backend": "openai", "base_url": srv.url, "model": "m"})), agents={"talk": Talk})
        try:
            handle = pool.submit(Task(goal="say hello", agents=["talk"], max_rounds=1))
            result = handle.result(timeout=120)
            events = list(handle.stream())
        finally:
            pool.shutdown()
    talk = [e for e in events if e.agent == "talk"]
    kinds = [e.kind for e in talk]
    # the model node's chunks came as tokens, before its update; then the plain node's update
    assert "".join(e.data["text"] for e in talk if e.kind == "tokens").startswith(
        "Hello from the test server: say hello")
    updates = [e.data for e in talk if e.kind == "node_update"]
    assert [u["node"] for u in updates] == ["think", "done"]
    assert kinds.index("tokens") < kinds.index("node_update")
    assert updates[0]["update"]["messages"][0]["role"] == "ai"
    out = result.outputs["talk"]
    assert out["values"]["log"] == ["think", "done"] and out["next"] == []
    assert out["values"]["messages"][0] == {"role": "user", "content": "say hello"}
    finished = next(e for e in talk if e.kind == "step_finished")
    assert finished.data["tokens"] == sum(e.data["n"] for e in talk if e.kind == "tokens") > 0


DRIVER = """
import time
from adapters_roles import ThreeRounds
from threadbound.runtime import AgentPool, RuntimeConfig, Task
pool = AgentPool(RuntimeConfig.from_mapping({settings!r}), agents={{"graph": ThreeRounds}})
handle = pool.submit(Task(goal="plan, edit, check", agents=["graph"], max_rounds=3, inputs={{"mark": {mark!r}}}))
print(handle.task_id, flush=True)
time.sleep(3600)
"""


def nodes(mark):
    path = os.path.join(mark, "nodes.log")
    return open(path).read().split() if os.path.exists(path) else []


def test_a_resumed_pool_continues_the_graph_from_its_committed_checkpoint_without_rerunning_a_node(
        pool_name, tmp_path):
    # Given: a pool in a driver process running a graph that pauses after each node (one node a
    # round), killed while the second round's node runs, after the first round committed
    mark = str(tmp_path)
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(DRIVER).format(
        settings=settings(pool_name, snapshot_interval_s=0.5), mark=mark)],
        stdout=subprocess.PIPE, text=True, env={**os.environ})
    try:
        task_id = child.stdout.readline().strip()
        assert task_id
        assert eventually(lambda: "edit-start" in nodes(mark), 90)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    assert nodes(mark) == ["plan", "edit-start"]
    # When: another process resumes the pool and the second node may finish
    pool = AgentPool.resume(SNAPSHOTS, name=pool_name)
    try:
        handle = pool.task(task_id)
        open(os.path.join(mark, "gate"), "w").close()
        result = handle.result(timeout=150)
        events = list(handle.stream())
    finally:
        pool.shutdown()
    # Then: the graph went on from the committed checkpoint: plan never ran again
    ran = nodes(mark)
    assert ran.count("plan") == 1 and ran.count("check") == 1 and ran[-1] == "check"
    assert ran.count("edit") >= 1 and ran.count("edit-start") <= 2  # the step cut short runs again
    out = result.outputs["graph"]
    assert out["values"]["log"] == ["plan", "edit", "check"] and out["next"] == []
    assert any(e.kind == "resumed" for e in events)
    assert [e.data["round"] for e in events if e.kind == "step_finished"] == [1, 2, 3]


def test_a_graph_stuck_in_a_node_is_stopped_at_the_step_deadline_with_its_tokens_kept(pool_name):
    with OpenAITestServer() as srv:
        model = {"backend": "openai", "base_url": srv.url, "model": "m"}
        pool = AgentPool(RuntimeConfig.from_mapping(settings(pool_name, model=model, step_timeout_s=10,
                                                             retry={"max_attempts": 1})),
                         agents={"graph": Stuck})
        try:
            # Given: a graph whose second node never returns
            handle = pool.submit(Task(goal="think then hang", agents=["graph"], max_rounds=1))
            # When / Then: the step deadline ends it, with what it streamed so far
            with pytest.raises((TaskFailed, TaskTimedOut)):
                handle.result(timeout=120)
            events = list(handle.stream())
            kinds = [e.kind for e in events]
            assert kinds.index("tokens") < kinds.index("node_update") < kinds.index("step_timed_out")
            timed_out = next(e for e in events if e.kind == "step_timed_out")
            assert "Hello from the test server: think then hang" in timed_out.data["partial"]
            # ... and the pool goes on: the same role runs another graph the task picks by name
            again = pool.submit(Task(goal="and now", agents=["graph"], max_rounds=1,
                                     inputs={"graph": {"graph": "talker"}}))
            assert again.result(timeout=120).outputs["graph"]["values"]["log"] == ["think", "done"]
        finally:
            pool.shutdown()


def test_the_graphs_model_calls_are_cut_to_the_tasks_budget_and_stop_when_it_is_spent(pool_name):
    # Given: a budget of 20 tokens at level 1 (at most 15 an answer), three model nodes in a row
    with OpenAITestServer(turns=[{"text": " ".join(f"w{i}" for i in range(60))}]) as srv:
        pool = AgentPool(RuntimeConfig.from_mapping(settings(pool_name, retry={"max_attempts": 1}, model={
            "backend": "openai", "base_url": srv.url, "model": "m"}, reasoning={"level": 1, "levels": {
                1: {"max_tokens": 15, "price_per_1k_tokens": 1.0}}})), agents={"graph": Stuck})
        try:
            handle = pool.submit(Task(goal="talk", agents=["graph"], max_rounds=1, cost_budget=0.02,
                                      inputs={"graph": {"graph": "chatty"}}))
            # When / Then: the second call gets what is left, the third none: the task fails saying so
            with pytest.raises(TaskFailed, match="cost budget"):
                handle.result(timeout=120)
            events = list(handle.stream())
        finally:
            pool.shutdown()
    assert [r["body"]["max_tokens"] for r in srv.requests] == [15, 5]
    assert [e.data["node"] for e in events if e.kind == "node_update"] == ["one", "two"]
    failed = next(e.data for e in events if e.kind == "step_failed")
    assert "BudgetExhausted" in failed["error"] and failed["tokens"] == 20 and failed["cost"] <= 0.02


def test_the_committed_graph_state_is_plain_data_and_a_fresh_role_continues_from_it():
    # Given: a graph step whose state holds chat messages, run on its own (no pool)
    import pickle


    from threadbound.agents import SimulatedModel, StepContext

    def run(role, ctx):
        gen = role.step(ctx)
        try:
            while True:
                next(gen)
        except StopIteration as stop:
            return stop.value

    first = Talk()
    run(first, StepContext(task_id="t-plain", role="talk", goal="hi", model=SimulatedModel()))
    state = first.get_state()

    # Then: the committed state is LangGraph's serialized checkpoint (bytes), nothing of LangChain
    def kinds(value):
        if isinstance(value, dict):
            return set().union(*(kinds(v) for v in value.values())) | {dict}
        if isinstance(value, list):
            return set().union(*(kinds(v) for v in value)) | {list}
        return {type(value)}

    assert kinds(state) <= {dict, list, str, bytes}
    # ... and a new instance given it (as after a resume) continues the same thread
    again = Talk()
    again.set_state(pickle.loads(pickle.dumps(state)))
    out = run(again, StepContext(task_id="t-plain", role="talk", goal="hi", round=2, feedback=["more"],
                                 model=SimulatedModel()))
    assert out["values"]["log"] == ["think", "done", "think", "done"]
    assert [m["content"] for m in out["values"]["messages"] if m["role"] == "user"] == ["hi", "more"]
