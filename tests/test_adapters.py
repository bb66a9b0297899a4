"""What the three adapters share: a missing extra is refused before Ray with the pip line,
the Agents SDK's `agents` module is found from the repository's root, and a task picks a
role's graph or agent by name, never by import path."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from threadbound.agents import StepContext
from threadbound.agents.adapters import LangGraphRole, MiniSweAgent, OpenAIAgentsRole
from threadbound.agents.errors import TaskInputError

ROOT = Path(__file__).resolve().parent.parent

MISSING = """
import json, sys
sys.modules[{module!r}] = None            # the extra is not installed: its import fails
import ray
from threadbound.agents.adapters import {cls}
from threadbound.runtime import AgentPool, ConfigError, RuntimeConfig
try:
    AgentPool(RuntimeConfig(name="nox", metrics={{"port": 0}}), agents={{"helper": {cls}}})
except ConfigError as exc:
    print(json.dumps({{"error": str(exc), "problems": exc.problems, "ray": ray.is_initialized()}}))
"""


@pytest.mark.parametrize("cls, module, extra", [
    ("MiniSweAgent", "minisweagent", "mini-swe-agent"),
    ("OpenAIAgentsRole", "agents", "openai-agents"),
    ("LangGraphRole", "langgraph", "langgraph"),
])
def test_a_role_whose_extra_is_missing_is_a_config_error_naming_it_and_the_pip_line_before_ray(cls, module, extra):
    # Given: a process where the framework cannot be imported (run from the repository's root,
    # where the repository's own agents/ folder is on sys.path too)
    proc = subprocess.run([sys.executable, "-c", MISSING.format(module=module, cls=cls)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    # When / Then: making the pool raises ConfigError for agents.helper, before Ray starts
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["ray"] is False
    assert got["problems"][0][0] == "agents.helper"
    assert "role 'helper'" in got["error"] and f"pip install -e '.[{extra}]'" in got["error"]


STEP_WITHOUT = """
import sys
sys.modules["minisweagent"] = None
from threadbound.agents import StepContext
from threadbound.agents.adapters import AdapterNotInstalled, MiniSweAgent
try:
    MiniSweAgent().step(StepContext(task_id="t1", role="swe", goal="g", workspace="."))
except AdapterNotInstalled as exc:
    print(exc.agent, "|", exc)
"""


def test_a_step_on_a_node_without_the_extra_fails_naming_the_role_and_the_pip_line():
    proc = subprocess.run([sys.executable, "-c", STEP_WITHOUT], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    agent, message = proc.stdout.strip().split(" | ", 1)
    assert agent == "swe" and "pip install -e '.[mini-swe-agent]'" in message


SDK_FROM_ROOT = """
import sys
import agents as wrong                 # from the root, this is the repository's folder
from threadbound.agents.adapters import import_openai_agents
sdk = import_openai_agents()
print(wrong.__file__)
print(sdk.__file__, hasattr(sdk, "Runner"))
import agents
print(agents is sdk)
"""


def test_the_agents_sdk_is_found_from_the_repository_root_even_after_our_folder_was_imported_as_agents():
    from threadbound.agents.adapters._common import OPENAI_AGENTS

    if OPENAI_AGENTS.problem("x"):
        pytest.skip("the OpenAI Agents SDK is an optional extra: pip install -e '.[openai-agents]'")
    proc = subprocess.run([sys.executable, "-c", SDK_FROM_ROOT], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    wrong, sdk, same = proc.stdout.strip().splitlines()
    assert Path(wrong).resolve() == ROOT / "agents" / "__init__.py"
    assert sdk.endswith(os.path.join("agents", "__init__.py True")) and not sdk.startswith(str(ROOT))
    assert same == "True"


# -- a task picks among the role's own; it never names code ----------------------------------------

def _step(role, ctx):
    out = role.step(ctx)
    if hasattr(out, "__next__"):
        try:
            while True:
                next(out)
        except StopIteration as stop:
            return stop.value
    return out


class Graphs(LangGraphRole):
    graph = "adapters_roles:talker"
    graphs = {"talker": "adapters_roles:talker"}


class Agents(OpenAIAgentsRole):
    agent = "adapters_roles:poet"


@pytest.mark.parametrize("role, inputs, field", [
    (Graphs, {"g": {"graph": "os:system"}}, "inputs.g.graph"),
    (Graphs, {"g": {"graph": "this:s"}}, "inputs.g.graph"),
    (Agents, {"g": {"agent": "this:s"}}, "inputs.g.agent"),
    (Graphs, {"g": {"grpah": "talker"}}, "did you mean `graph`"),
    (MiniSweAgent, {"g": {"step_limit": 0}}, "inputs.g.step_limit"),
    (MiniSweAgent, {"g": {"agent": {"output_path": "/etc/passwd"}}}, "inputs.g.agent.output_path"),
    (MiniSweAgent, {"g": "fast"}, "inputs.g must be a mapping"),
])
def test_a_task_cannot_name_code_to_import_or_bad_settings(role, inputs, field, tmp_path, monkeypatch):
    # Given: a hostile or mistaken task input
    if role.installation_problem("g"):
        pytest.skip(role.installation_problem("g"))
    sys.modules.pop("this", None)  # `this` prints the Zen of Python when imported: a witness
    (tmp_path / "ws").mkdir()
    ctx = StepContext(task_id="t-hostile", role="g", goal="g", workspace=str(tmp_path / "ws"), inputs=inputs)
    monkeypatch.setenv("THREADBOUND_WORKSPACES", str(tmp_path / "copies"))
    # When / Then: the step refuses it as the task's input error, naming the field
    with pytest.raises(TaskInputError) as err:
        _step(role(), ctx)
    assert field in str(err.value)
    assert not (tmp_path / "copies").exists()  # refused before the task's copy was made
    assert "this" not in sys.modules


def test_the_adapters_surface_is_pinned():
    import threadbound.agents.adapters as adapters

    assert adapters.__all__ == [
        "MiniSweAgent", "OpenAIAgentsRole", "LangGraphRole", "chat_model", "import_openai_agents",
        "TOOL_CALL", "TOOL_RESULT", "NODE_UPDATE", "AGENT_UPDATED", "AdapterNotInstalled"]
    from threadbound.agents.events import RESERVED_KINDS

    assert not {adapters.TOOL_CALL, adapters.TOOL_RESULT, adapters.NODE_UPDATE, adapters.AGENT_UPDATED} & RESERVED_KINDS


def test_adapter_errors_survive_pickling():
    import pickle

    from threadbound.agents.adapters import AdapterNotInstalled

    err = pickle.loads(pickle.dumps(AdapterNotInstalled("no", task_id="t1", agent="swe")))
    assert (err.task_id, err.agent, str(err)) == ("t1", "swe", "no")



def test_every_role_copies_the_workspace_the_same_way_leaving_the_pools_secrets_out():
    # The copy that leaves the pool's snapshot store and key out (the gateway's workspace
    # rule) is made in one place; an adapter with a copy function of its own would not.
    from threadbound.agents import builtin, tool_coder
    from threadbound.agents.adapters import _minisweagent

    assert _minisweagent.workspace_of is builtin.workspace_of
    assert tool_coder.workspace_of is builtin.workspace_of
