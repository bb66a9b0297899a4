"""The pool: admission, supervision, deadlines, streaming, config, CLI.

Public names::

    # Running tasks
    AgentPool, TaskHandle, Task, TaskResult, TaskSummary, Event
    # Configuration
    RuntimeConfig
    # Errors
    ThreadboundError, ConfigError, InvalidTask, UnknownRole, AgentNotLoadable,
    TaskNotFound, PoolClosed, ResultTimeout, TaskError, TaskFailed, TaskTimedOut, TaskCancelled
"""

from typing import TYPE_CHECKING, Any

# Loaded on first use (PEP 562): an agent actor imports this package for its own few
# modules, and should not pay for the config and client ones (a third of its start).
_WHERE = {
    "RuntimeConfig": "config", "AgentPool": "pool", "TaskHandle": "pool",
    "Event": "task", "Task": "task", "TaskResult": "task", "TaskSummary": "task",
    **{name: "errors" for name in (
        "AgentNotLoadable", "ConfigError", "InvalidTask", "PoolClosed", "ResultTimeout", "TaskCancelled",
        "TaskError", "TaskFailed", "TaskNotFound", "TaskTimedOut", "ThreadboundError", "UnknownRole")},
}

if TYPE_CHECKING:
    from .config import RuntimeConfig
    from .errors import (
        AgentNotLoadable, ConfigError, InvalidTask, PoolClosed, ResultTimeout, TaskCancelled,
        TaskError, TaskFailed, TaskNotFound, TaskTimedOut, ThreadboundError, UnknownRole,
    )
    from .pool import AgentPool, TaskHandle
    from .task import Event, Task, TaskResult, TaskSummary


def __getattr__(name: str) -> Any:
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"{__name__}.{where}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__all__ = [
    # Running tasks
    "AgentPool", "TaskHandle", "Task", "TaskResult", "TaskSummary", "Event",
    # Configuration
    "RuntimeConfig",
    # Errors
    "ThreadboundError", "ConfigError", "InvalidTask", "UnknownRole", "AgentNotLoadable",
    "TaskNotFound", "PoolClosed", "ResultTimeout", "TaskError", "TaskFailed", "TaskTimedOut",
    "TaskCancelled",
]
