"""The pool: admission, supervision, deadlines, streaming, config, CLI.

Public names::

    # Running tasks
    AgentPool, TaskHandle, Task, TaskResult, TaskSummary, Event
    # Configuration
    RuntimeConfig
    # Errors
    ThreadboundError, ConfigError, InvalidTask, UnknownRole, AgentNotLoadable,
    TaskNotFound, PoolClosed, ResultTimeout, TaskError, TaskFailed, TaskTimedOut, TaskCancelled,
    InputNotExpected, InvalidInput
"""

from typing import TYPE_CHECKING

from ._lazy import lazy_names

# Loaded on first use (PEP 562): an agent actor imports this package for its own few
# modules, and should not pay for the config and client ones (a third of its start).
_WHERE = {
    "RuntimeConfig": "config", "AgentPool": "pool", "TaskHandle": "handle",
    "Event": "task", "Task": "task", "TaskResult": "task", "TaskSummary": "task",
    **{name: "errors" for name in (
        "AgentNotLoadable", "ConfigError", "InputNotExpected", "InvalidInput", "InvalidTask", "PoolClosed", "ResultTimeout", "TaskCancelled",
        "TaskError", "TaskFailed", "TaskNotFound", "TaskTimedOut", "ThreadboundError", "UnknownRole")},
}

if TYPE_CHECKING:
    from .config import RuntimeConfig
    from .errors import (
        AgentNotLoadable, ConfigError, InputNotExpected, InvalidInput, InvalidTask, PoolClosed, ResultTimeout, TaskCancelled,
        TaskError, TaskFailed, TaskNotFound, TaskTimedOut, ThreadboundError, UnknownRole,
    )
    from .handle import TaskHandle
    from .pool import AgentPool
    from .task import Event, Task, TaskResult, TaskSummary


__getattr__, __dir__ = lazy_names(__name__, _WHERE, globals())


__all__ = [
    # Running tasks
    "AgentPool", "TaskHandle", "Task", "TaskResult", "TaskSummary", "Event",
    # Configuration
    "RuntimeConfig",
    # Errors
    "ThreadboundError", "ConfigError", "InvalidTask", "UnknownRole", "AgentNotLoadable",
    "TaskNotFound", "PoolClosed", "ResultTimeout", "TaskError", "TaskFailed", "TaskTimedOut",
    "TaskCancelled", "InputNotExpected", "InvalidInput",
]
