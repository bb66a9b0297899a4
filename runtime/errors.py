"""Every error the runtime raises, under one root: :class:`ThreadboundError`.

Each carries the task, agent, limit and elapsed time it is about (where they
apply) and a message that says what to do. All survive pickling, because Ray
moves them between processes.
"""

from __future__ import annotations

from typing import Any

from threadbound.agents.errors import AgentError, ThreadboundError, TransientError


class ConfigError(ThreadboundError, ValueError):
    """A configuration file, mapping or override is invalid.

    ``source`` names the file (or ``<config>`` / the environment variable) and
    ``problems`` lists ``(field_path, what_is_wrong)`` pairs; the message shows them all.
    """

    def __init__(self, source: str, problems: list[tuple[str, str]]) -> None:
        lines = [f"{source}: invalid configuration"]
        lines += [f"  {path or '<root>'}: {msg}" for path, msg in problems]
        super().__init__("\n".join(lines))
        self.source = source
        self.problems = list(problems)


class InvalidTask(ThreadboundError, ValueError):
    """A submitted task is invalid; ``field`` names the offending field."""

    def __init__(self, field: str, problem: str, **fields: Any) -> None:
        super().__init__(f"invalid task: {field}: {problem}", **fields)
        self.field = field


class UnknownRole(InvalidTask):
    """A task names an agent role the pool does not know."""

    def __init__(self, role: str, known: list[str], **fields: Any) -> None:
        super().__init__(
            "agents",
            f"unknown role {role!r}; known roles: {', '.join(sorted(known)) or '(none)'}. "
            "Register it with AgentPool(..., agents={'%s': YourAgent}) or under `agents:` "
            "in the config." % role,
            agent=role,
            **fields,
        )
        self.role = role


class AgentNotLoadable(ThreadboundError, ValueError):
    """An agent class cannot be imported, is not an Agent, or cannot be pickled."""


class TaskNotFound(ThreadboundError, KeyError):
    """No task with that id is known to this pool."""


class PoolClosed(ThreadboundError, RuntimeError):
    """The pool (its supervisor) has shut down or is shutting down."""


class InputNotExpected(ThreadboundError, RuntimeError):
    """A response or message the task cannot take: it is not waiting for input, the
    request was already answered (the first response wins), or it has ended.
    ``request`` names the request it was for, when there was one."""

    request: int | None = None


class InvalidInput(ThreadboundError, ValueError):
    """A response or message that is not what the task can take; ``field`` names it."""

    def __init__(self, field: str, problem: str, **fields: Any) -> None:
        super().__init__(f"invalid {field}: {problem}", **fields)
        self.field = field


class ResultTimeout(ThreadboundError, TimeoutError):
    """Waiting for a task's result took longer than the caller allowed.

    The task itself keeps running; wait again or cancel it.
    """


class TaskError(ThreadboundError):
    """A task ended without succeeding. ``result`` holds its :class:`TaskResult`."""

    result: Any = None


class TaskFailed(TaskError):
    """A task failed: a step failed for good, or its rounds ran out."""


class TaskTimedOut(TaskError, TimeoutError):
    """A task (or one of its steps, after all retries) ran past its deadline."""


class TaskCancelled(TaskError):
    """A task was cancelled; ``reason`` says why (cancelled, shutdown, ...)."""

    reason: str = "cancelled"


__all__ = [
    "ThreadboundError", "ConfigError", "InvalidTask", "UnknownRole", "AgentNotLoadable",
    "TaskNotFound", "PoolClosed", "InputNotExpected", "InvalidInput", "ResultTimeout", "TaskError", "TaskFailed",
    "TaskTimedOut", "TaskCancelled", "AgentError", "TransientError",
]
