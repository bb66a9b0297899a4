"""The public surface changes only on purpose."""

import threadbound.agents
import threadbound.runtime
import threadbound.snapshots


def test_runtime_exports():
    assert sorted(threadbound.runtime.__all__) == sorted([
        "AgentPool", "TaskHandle", "Task", "TaskResult", "TaskSummary", "Event", "RuntimeConfig",
        "ThreadboundError", "ConfigError", "InvalidTask", "UnknownRole", "AgentNotLoadable",
        "TaskNotFound", "PoolClosed", "ResultTimeout", "TaskError", "TaskFailed", "TaskTimedOut",
        "TaskCancelled", "InputNotExpected", "InvalidInput",
    ])


def test_agents_exports():
    assert sorted(threadbound.agents.__all__) == sorted([
        "Agent", "StepContext", "Interrupt", "Model", "SimulatedModel", "SimulatedModelConfig", "build_model",
        "ThreadboundError", "AgentError", "TransientError", "ModelError", "TransientModelError", "RateLimitError",
        "BudgetExhausted",
    ])


def test_snapshots_exports():
    assert sorted(threadbound.snapshots.__all__) == sorted([
        "SnapshotLocation", "Loaded", "Store", "LocalStore", "FsspecStore", "open_store", "load_key",
        "SnapshotError", "SnapshotCorrupt", "UnsupportedFormat", "NoSnapshot", "LeaseHeld", "HistoryExists",
    ])


def test_gateway_and_client_exports():
    import threadbound.client
    import threadbound.runtime.gateway

    assert sorted(threadbound.runtime.gateway.__all__) == sorted([
        "Gateway", "GatewaySettings", "create_app", "Tokens", "GatewayClient", "AsyncGatewayClient", "GatewayError",
    ])
    assert sorted(threadbound.client.__all__) == sorted(["GatewayClient", "AsyncGatewayClient", "GatewayError"])
    # one implementation under two names
    assert threadbound.client.GatewayClient is threadbound.runtime.gateway.GatewayClient


def test_every_export_resolves():
    for mod in (threadbound.runtime, threadbound.agents, threadbound.snapshots):
        for name in mod.__all__:
            assert getattr(mod, name) is not None


def test_a_person_in_the_loop_is_part_of_the_handle_and_the_context():
    from threadbound.agents import StepContext
    from threadbound.runtime import TaskHandle
    from threadbound.runtime.gateway import AsyncGatewayClient, GatewayClient

    for name in ("respond", "arespond", "approve", "reject", "send", "asend"):
        assert callable(getattr(TaskHandle, name)), name
    for client in (GatewayClient, AsyncGatewayClient):
        for name in ("respond", "approve", "reject", "send"):
            assert callable(getattr(client, name)), name
    assert callable(StepContext.interrupt) and "inbox" in StepContext.__dataclass_fields__


def test_what_the_gateway_and_the_cli_ask_of_a_pool_is_public():
    from threadbound.runtime import AgentPool

    for name in ("handle", "task", "tasks", "atasks", "asummary", "await_result", "acancel", "stats", "health",
                 "ahealth", "metrics_text", "ametrics_text", "info"):
        assert callable(getattr(AgentPool, name)), name


def test_the_gateway_the_cli_and_the_scripts_use_no_private_name_of_a_pool_or_a_handle():
    # Given: the private names of AgentPool and TaskHandle (methods, and attributes set in __init__)
    import ast
    import inspect
    from pathlib import Path

    from threadbound.runtime import AgentPool, TaskHandle

    private = set()
    for cls in (AgentPool, TaskHandle):
        source = ast.parse(inspect.getsource(cls))
        private |= {n for n in dir(cls) if n.startswith("_") and not n.startswith("__")}
        private |= {node.attr for node in ast.walk(source) if isinstance(node, ast.Attribute)
                    and isinstance(node.value, ast.Name) and node.value.id == "self"
                    and node.attr.startswith("_") and not node.attr.startswith("__")}
    # When: every attribute read in those folders is looked at
    root = Path(__file__).resolve().parent.parent
    files = [*(root / "runtime" / "gateway").rglob("*.py"), *(root / "runtime" / "cli").rglob("*.py"),
             *(root / "scripts").rglob("*.py")]
    found = [f"{path.relative_to(root)}:{node.lineno}: {ast.unparse(node)}"
             for path in files for node in ast.walk(ast.parse(path.read_text()))
             if isinstance(node, ast.Attribute) and node.attr in private
             and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))]
    # Then: none reaches into one (what they need is a public, documented method)
    assert found == []
