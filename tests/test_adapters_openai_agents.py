"""OpenAIAgentsRole on a real pool: an Agents SDK agent run with Runner.run_streamed on the
task's model config (a local OpenAI-compatible server streaming text and tool_calls deltas,
or any threadbound backend), its text deltas as tokens and its tool calls as events."""

import pytest
from adapters_roles import Calc
from openai_server import OpenAITestServer
from conftest import pool_settings

from threadbound.agents.adapters._common import OPENAI_AGENTS
from threadbound.runtime import AgentPool, RuntimeConfig, Task, TaskFailed, TaskTimedOut

pytestmark = [
    pytest.mark.skipif(OPENAI_AGENTS.problem("calc") is not None,
                       reason="the OpenAI Agents SDK is an optional extra: pip install -e '.[openai-agents]'"),
    pytest.mark.timeout(180),
]


def pool(name, model, **overrides):
    return AgentPool(RuntimeConfig.from_mapping(pool_settings(
        name, model=model, **{"step_timeout_s": 60, "task_timeout_s": 150, **overrides})), agents={"calc": Calc})


@pytest.mark.usefixtures("ray_session")
def test_an_agents_sdk_agent_calls_its_tool_and_streams_its_answer_through_the_pool(pool_name):
    # Given: a server whose model calls the agent's `add` tool, then answers with the sum
    turns = [{"tool_calls": [{"name": "add", "arguments": {"a": 2, "b": 3}}]}, {"text": "the sum is 5"}]
    with OpenAITestServer(turns=turns) as srv:
        p = pool(pool_name, {"backend": "openai", "base_url": srv.url, "api_key": "k-test", "model": "m",
                             "temperature": 0.0})
        try:
            # When: a task runs the role
            handle = p.submit(Task(goal="what is 2 + 3?", agents=["calc"], max_rounds=1))
            result = handle.result(timeout=120)
            events = [e for e in handle.stream() if e.agent == "calc"]
        finally:
            p.shutdown()
    # Then: the tool call and its output are events, before the answer's tokens
    kinds = [e.kind for e in events]
    call = next(e.data for e in events if e.kind == "tool_call")
    output = next(e.data for e in events if e.kind == "tool_result")
    assert (call["name"], call["arguments"]) == ("add", {"a": 2, "b": 3})
    assert (output["name"], output["id"], output["output"]) == ("add", call["id"], "5")
    assert kinds.index("tool_call") < kinds.index("tool_result") < kinds.index("tokens")
    assert "".join(e.data["text"] for e in events if e.kind == "tokens") == "the sum is 5 "
    out = result.outputs["calc"]
    assert out["final_output"] == "the sum is 5 " and out["tool_calls"] == 1 and out["last_agent"] == "calculator"
    # ... both model calls went to the configured server, with the level's model and the agent's tool
    assert len(srv.requests) == 2 and {r["body"]["model"] for r in srv.requests} == {"m"}
    assert [t["function"]["name"] for t in srv.requests[0]["body"]["tools"]] == ["add"]
    assert srv.requests[1]["body"]["messages"][-1]["role"] == "tool"
    # ... and the step's tokens are the server's count of what it answered
    finished = next(e for e in events if e.kind == "step_finished")
    assert finished.data["tokens"] >= 4


@pytest.mark.usefixtures("ray_session")
def test_a_rate_limited_server_is_a_rate_limit_error_with_its_retry_after_and_is_retried(pool_name):
    with OpenAITestServer(turns=[{"status": 429, "retry_after": "1"}]) as srv:
        p = pool(pool_name, {"backend": "openai", "base_url": srv.url, "model": "m"})
        try:
            handle = p.submit(Task(goal="2 + 3?", agents=["calc"], max_rounds=1))
            with pytest.raises(TaskFailed):
                handle.result(timeout=120)
            events = list(handle.stream())
        finally:
            p.shutdown()
    failed = [e.data for e in events if e.kind == "step_failed"]
    assert failed[0]["error_class"] == "rate_limit" and failed[0]["retry_after_s"] == 1.0
    assert "RateLimitError" in failed[0]["error"] and "429" in failed[0]["error"]
    assert [e.kind for e in events].count("retrying") == 1 and len(srv.requests) == 2


@pytest.mark.usefixtures("ray_session")
def test_any_threadbound_backend_drives_an_agents_sdk_agent_and_a_task_picks_the_agent_by_name(pool_name):
    # Given: the simulated backend (no server at all) and the role's second agent, picked by name
    p = pool(pool_name, {"backend": "simulated", "answers": {"calc": "roses are red, tests are green"}})
    try:
        handle = p.submit(Task(goal="a line of verse", agents=["calc"], max_rounds=1,
                               inputs={"calc": {"agent": "poet"}}))
        result = handle.result(timeout=120)
        events = [e for e in handle.stream() if e.agent == "calc"]
    finally:
        p.shutdown()
    assert result.outputs["calc"]["last_agent"] == "poet"
    assert result.outputs["calc"]["final_output"] == "roses are red, tests are green"
    assert "".join(e.data["text"] for e in events if e.kind == "tokens") == "roses are red, tests are green"


@pytest.mark.usefixtures("ray_session")
def test_an_agent_stuck_in_a_tool_is_stopped_at_the_step_deadline_with_its_tokens_kept(pool_name):
    turns = [{"text": "let me wait", "tool_calls": [{"name": "wait_forever", "arguments": {}}]}]
    with OpenAITestServer(turns=turns) as srv:
        p = pool(pool_name, {"backend": "openai", "base_url": srv.url, "model": "m"}, step_timeout_s=10,
                 retry={"max_attempts": 1})
        try:
            handle = p.submit(Task(goal="wait", agents=["calc"], max_rounds=1, inputs={"calc": {"agent": "sleeper"}}))
            with pytest.raises((TaskFailed, TaskTimedOut)):
                handle.result(timeout=120)
            events = list(handle.stream())
        finally:
            p.shutdown()
    kinds = [e.kind for e in events]
    assert kinds.index("tokens") < kinds.index("tool_call") < kinds.index("step_timed_out")
    assert "tool_result" not in kinds
    assert "let me wait" in next(e.data["partial"] for e in events if e.kind == "step_timed_out")


@pytest.mark.usefixtures("ray_session")
def test_a_run_that_would_spend_more_than_the_tasks_budget_is_stopped_within_it(pool_name):
    # Given: a budget of 20 tokens at level 1 (at most 15 an answer), and a two-turn run whose
    # answers are 10 and (cut to) 15 tokens long
    first = " ".join(f"a{i}" for i in range(10))
    second = " ".join(f"b{i}" for i in range(60))
    turns = [{"text": first, "tool_calls": [{"name": "add", "arguments": {"a": 1, "b": 1}}]}, {"text": second}]
    with OpenAITestServer(turns=turns) as srv:
        p = pool(pool_name, {"backend": "openai", "base_url": srv.url, "model": "m"}, retry={"max_attempts": 1},
                 reasoning={"level": 1, "levels": {1: {"max_tokens": 15, "price_per_1k_tokens": 1.0}}})
        try:
            handle = p.submit(Task(goal="add", agents=["calc"], max_rounds=1, cost_budget=0.02))
            # When / Then: the step stops when the budget is spent, mid-answer; the task fails saying so
            with pytest.raises(TaskFailed, match="cost budget"):
                handle.result(timeout=120)
            events = list(handle.stream())
        finally:
            p.shutdown()
    assert srv.requests[0]["body"]["max_tokens"] == 15 and len(srv.requests) == 2
    failed = next(e.data for e in events if e.kind == "step_failed")
    assert "BudgetExhausted" in failed["error"] and failed["tokens"] <= 20 and failed["cost"] <= 0.02
    streamed = "".join(e.data["text"] for e in events if e.kind == "tokens").split()
    assert streamed[:10] == first.split() and 0 < len(streamed) - 10 <= 10


def test_the_sdks_tracing_is_off_so_nothing_is_exported():
    from threadbound.agents.adapters import import_openai_agents

    sdk = import_openai_agents()
    assert type(sdk.trace("a run")).__name__ == "NoOpTrace"
