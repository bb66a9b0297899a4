"""The root of every threadbound error, and the errors an agent or model raises.

These live in ``agents`` because agents depend on nothing else of ours; the
runtime's own errors (``threadbound.runtime.errors``) subclass the same root.

Every error here survives ``pickle.loads(pickle.dumps(err))``: Ray moves
exceptions between processes, and keyword-only fields would otherwise be lost.
"""

from __future__ import annotations

from typing import Any


def _rebuild(cls: type, message: str, state: dict[str, Any]) -> "ThreadboundError":
    err = cls.__new__(cls)
    Exception.__init__(err, message)
    err.__dict__.update(state)
    return err


class ThreadboundError(Exception):
    """Root of all threadbound errors.

    Carries structured fields about what it concerns: ``task_id``, ``agent``,
    ``limit`` (seconds or count) and ``elapsed`` (seconds), any of which may be None.

    Examples:
        >>> import pickle
        >>> err = ThreadboundError("boom", task_id="t00001")
        >>> pickle.loads(pickle.dumps(err)).task_id
        't00001'
    """

    def __init__(
        self,
        message: str,
        *,
        task_id: str | None = None,
        agent: str | None = None,
        limit: float | None = None,
        elapsed: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.task_id = task_id
        self.agent = agent
        self.limit = limit
        self.elapsed = elapsed

    def __reduce__(self):  # keep keyword fields across process boundaries
        return (_rebuild, (type(self), self.message, dict(self.__dict__)))

    def __str__(self) -> str:
        return self.message


class AgentError(ThreadboundError):
    """An agent's step failed. Not retried unless it is a :class:`TransientError`."""


class TaskInputError(AgentError):
    """A step failed because of what its task was given (no workspace, a workspace that
    does not exist, bad ``inputs``): the submitter's to fix, not a fault of the pool. Not
    retried, and not counted by the pool's health (a submitter cannot degrade or pause the
    pool by sending bad tasks)."""


class TransientError(AgentError):
    """A failure worth retrying (rate limit, overloaded server, dropped connection).

    ``retry_after_s`` is a hint from the failing service (e.g. a Retry-After header).
    """

    def __init__(self, message: str, *, retry_after_s: float | None = None, **fields: Any) -> None:
        super().__init__(message, **fields)
        self.retry_after_s = retry_after_s


class BudgetExhausted(AgentError):
    """The task's cost budget has no tokens left for another model call; not retried."""


class ModelError(AgentError):
    """A model backend failed in a way retrying will not fix (bad request, bad config)."""


class TransientModelError(TransientError):
    """A model backend failed in a way that may pass (429, 5xx, connect/read timeout)."""


class RateLimitError(TransientModelError):
    """The model service said "too many requests" (HTTP 429); ``retry_after_s`` is its hint.

    Retried under the ``rate_limit`` class of the retry policy, never sooner than the hint.
    """
