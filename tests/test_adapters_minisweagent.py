"""MiniSweAgent on a real pool: mini-swe-agent's loop with its bash actions in threadbound's
sandbox on the task's copy and its model on the task's model config (a local
OpenAI-compatible server over real HTTP)."""

import os

import psutil
import pytest
from adapters_roles import Swe
from openai_server import OpenAITestServer
from conftest import eventually, pool_settings

from threadbound.agents.adapters._common import MINI_SWE_AGENT
from threadbound.runtime import AgentPool, RuntimeConfig, Task, TaskFailed, TaskTimedOut

pytestmark = [
    pytest.mark.skipif(MINI_SWE_AGENT.problem("swe") is not None,
                       reason="mini-swe-agent is an optional extra: pip install -e '.[mini-swe-agent]'"),
    pytest.mark.usefixtures("ray_session"), pytest.mark.timeout(180),
]

BUGGY = "def add(a, b):\n    return a - b\n"
TESTS = "from calc import add\n\n\ndef test_add():\n    assert add(2, 3) == 5\n"


def bash(thought, command):
    return {"text": f"THOUGHT: {thought}\n\n```mswea_bash_command\n{command}\n```"}


def workspace(tmp_path):
    ws = tmp_path / "project"
    ws.mkdir()
    (ws / "calc.py").write_text(BUGGY)
    (ws / "test_calc.py").write_text(TESTS)
    return ws


def pool(name, model, **overrides):
    overrides = {"step_timeout_s": 90, "task_timeout_s": 150, **overrides}  # imports + sandboxed pytest: slow on a busy machine
    return AgentPool(RuntimeConfig.from_mapping(pool_settings(name, model=model, **overrides)),
                     agents={"swe": Swe})


def test_mini_swe_agent_fixes_a_bug_with_bash_in_the_sandbox_and_the_tests_pass(pool_name, tmp_path):
    # Given: a buggy project and a model that looks, fixes with sed, runs the tests, submits
    ws = workspace(tmp_path)
    turns = [bash("look", "cat calc.py"),
             bash("fix", "sed -i 's/a - b/a + b/' calc.py && python -m pytest -q -p no:cacheprovider"),
             bash("done", "echo COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT && echo fixed add")]
    with OpenAITestServer(turns=turns) as srv:
        p = pool(pool_name, {"backend": "openai", "base_url": srv.url, "api_key": "k-test", "model": "m"})
        try:
            # When: the task runs the mini-swe-agent role, then the built-in tester on its copy
            handle = p.submit(Task(goal="add() subtracts; make the tests pass", workspace=ws,
                                   agents=["swe", "tester"], max_rounds=1))
            result = handle.result(timeout=120)
            events = list(handle.stream())
        finally:
            p.shutdown()
    # Then: the task succeeded and its tester ran the fixed copy's tests
    assert result.ok and result.outputs["tester"]["passed"] == 1
    out = result.outputs["swe"]
    assert out["exit_status"] == "Submitted" and out["submission"] == "fixed add\n"
    assert out["changed"] == ["calc.py"] and out["commands"] == 3 and out["model_calls"] == 3
    assert [m["role"] for m in out["trajectory"][:3]] == ["system", "user", "assistant"]
    # ... the user's own directory is untouched (the agent edited the task's copy)
    assert (ws / "calc.py").read_text() == BUGGY
    # ... its model calls went to the configured server with the config's key
    assert len(srv.requests) == 3
    assert all(r["body"]["model"] == "m" and r["auth"] == "Bearer k-test" for r in srv.requests)
    # ... and a client saw it work: tokens, then each command as a call, a sandbox run and a result
    swe = [e for e in events if e.agent == "swe"]
    kinds = [e.kind for e in swe]
    assert "tokens" in kinds and kinds.count("tool_call") == 3 and kinds.count("sandbox") == 3
    first_call = kinds.index("tool_call")
    assert kinds[first_call:first_call + 3] == ["tool_call", "sandbox", "tool_result"]
    assert kinds.index("tokens") < first_call
    results = [e.data for e in swe if e.kind == "tool_result"]
    assert "return a - b" in results[0]["output"] and "1 passed" in results[1]["output"]
    assert all(e.data["isolation"] == "required" for e in swe if e.kind == "sandbox")
    tokens = "".join(e.data["text"] for e in swe if e.kind == "tokens")
    assert "mswea_bash_command" in tokens and "sed -i" in tokens


def test_a_command_the_model_sends_cannot_reach_the_users_directory_or_other_copies(pool_name, tmp_path):
    # Given: a model whose commands try to write into the user's own workspace and read the copies
    ws = workspace(tmp_path)
    turns = [bash("escape", f"echo pwned > {ws}/pwned.txt; echo rc=$?; ls {ws}"),
             bash("done", "echo COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT")]
    with OpenAITestServer(turns=turns) as srv:
        p = pool(pool_name, {"backend": "openai", "base_url": srv.url, "model": "m"})
        try:
            handle = p.submit(Task(goal="escape", workspace=ws, agents=["swe"], max_rounds=1))
            result = handle.result(timeout=120)
            events = list(handle.stream())
        finally:
            p.shutdown()
    # Then: nothing reached the user's directory (hidden in the sandbox), nor the copy
    assert not (ws / "pwned.txt").exists()
    assert result.ok and result.outputs["swe"]["changed"] == []
    first = next(e.data for e in events if e.kind == "tool_result")
    assert "rc=" in first["output"] and "calc.py" not in first["output"]


def test_mini_swe_agent_stops_at_the_tasks_cost_budget(pool_name, tmp_path):
    # Given: a model that never submits (it lists files forever) and a budget of ~100 tokens
    ws = workspace(tmp_path)
    looping = "THOUGHT: " + "let me look again " * 5 + "\n```mswea_bash_command\nls\n```"
    model = {"backend": "simulated", "answers": {"swe": looping}}
    levels = {1: {"max_tokens": 30, "price_per_1k_tokens": 1.0}}
    p = pool(pool_name, model, reasoning={"level": 1, "levels": levels})
    try:
        handle = p.submit(Task(goal="loop", workspace=ws, agents=["swe"], max_rounds=1, cost_budget=0.1))
        # When / Then: the step stops when the budget is spent; the task fails saying so
        with pytest.raises(TaskFailed, match="cost budget"):
            handle.result(timeout=120)
        events = list(handle.stream())
    finally:
        p.shutdown()
    ended = [e for e in events if e.kind == "step_failed"]
    assert ended and ended[0].data["error_class"] != "transient"
    assert "BudgetExhausted" in ended[0].data["error"]
    assert sum(e.data.get("tokens", 0) for e in ended) <= 100
    assert sum(e.data.get("cost", 0) for e in events if e.kind in ("step_finished", "step_failed")) <= 0.1 + 1e-9
    assert [e.kind for e in events].count("tool_call") >= 2  # it did work until then


def sleepers(marker):
    return [p for p in psutil.process_iter(["cmdline"]) if marker in " ".join(p.info["cmdline"] or [])]


def test_a_command_that_never_ends_is_stopped_with_its_step_at_the_deadline_and_leaves_no_process(
        pool_name, tmp_path):
    # Given: a model whose command would run for an hour (longer than its own command limit too)
    ws = workspace(tmp_path)
    marker = f"{3000 + os.getpid() % 500}.25"
    with OpenAITestServer(turns=[bash("wait", f"sleep {marker}")]) as srv:
        p = pool(pool_name, {"backend": "openai", "base_url": srv.url, "model": "m"}, step_timeout_s=12,
                 retry={"max_attempts": 1})
        try:
            handle = p.submit(Task(goal="wait", workspace=ws, agents=["swe"], max_rounds=1,
                                   inputs={"swe": {"command_timeout_s": 3600}}))
            assert eventually(lambda: sleepers("sleep " + marker), 60)  # the command runs, in the sandbox
            # When / Then: the step deadline ends the step, its actor and the command with it
            with pytest.raises((TaskFailed, TaskTimedOut)):
                handle.result(timeout=150)
            events = list(handle.stream())
        finally:
            p.shutdown()
    kinds = [e.kind for e in events]
    assert kinds.index("tokens") < kinds.index("tool_call") < kinds.index("step_timed_out")
    assert "sleep " + marker in next(e.data["partial"] for e in events if e.kind == "step_timed_out")
    assert eventually(lambda: not sleepers("sleep " + marker), 30)
