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

from .config import RuntimeConfig
from .errors import (
    AgentNotLoadable, ConfigError, InvalidTask, PoolClosed, ResultTimeout, TaskCancelled,
    TaskError, TaskFailed, TaskNotFound, TaskTimedOut, ThreadboundError, UnknownRole,
)
from .pool import AgentPool, TaskHandle
from .task import Event, Task, TaskResult, TaskSummary

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
