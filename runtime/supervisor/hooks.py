"""Hooks: how durability, health, cost and metrics attach to the supervisor.

The supervisor's core (admission, the step path, the rounds) calls these hooks at
fixed points and knows none of their implementations. A hook subclasses :class:`Hook`
and overrides what it needs; every method is a no-op by default. A hook that raises
is logged and skipped: it never breaks the pool.

Order: hooks run in the order they were added. ``after_step`` may be a coroutine
function; the step path awaits it. Making a commit durable is not a hook's business
(a hook's failure is swallowed, a failed commit must not be): the step path awaits
the supervisor's commit barrier for that.

Examples:
    >>> class CountSteps(Hook):
    ...     def __init__(self):
    ...         self.ended = 0
    ...     def after_step(self, task, step, outcome):
    ...         self.ended += 1
    >>> hooks = Hooks([CountSteps()])
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable

if TYPE_CHECKING:
    from .task_state import TaskState

log = logging.getLogger("threadbound.hooks")


@dataclass(frozen=True)
class Transition:
    """The pool's health mode changed (``runtime.supervisor.health``): when (wall time), from, to, why."""

    at: float
    old: str
    new: str
    reasons: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"at": self.at, "from": self.old, "to": self.new, "reasons": list(self.reasons)}


@dataclass
class StepInfo:
    """One attempt of one step, as hooks see it."""

    task_id: str
    role: str
    round: int
    attempt: int
    level: int
    streaming: bool
    degraded: bool = False
    slot: str | None = None
    started: float = 0.0  # the supervisor's clock
    first_token: float | None = None  # when the first token arrived (None: none yet)


@dataclass
class Outcome:
    """How a step attempt ended.

    ``kind``: ``ok``; ``interrupt`` (the step asked a person and stopped: it runs
    again once answered; counts as ok); or the retry policy's class of the failure
    (``error``, ``rate_limit``, ``transient``, ``timeout``, ``crash``). ``signal``: what else the
    health monitor hears of it (``timeout``, ``actor_death``, ``stream_failure``).
    ``exhausted``: a failure after which no attempt follows; ``retryable``: its class
    is one the retry policy retries (so ``exhausted`` and ``retryable``: retries ran out).
    """

    kind: str
    data: dict[str, Any] = field(default_factory=dict)
    signal: str | None = None
    exhausted: bool = False
    retryable: bool = False
    elapsed_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.kind in ("ok", "interrupt")


class Hook:
    """Base class of a supervisor hook; override what you need (all no-ops)."""

    def on_submit(self, task: "TaskState") -> None:
        """A task was accepted (before its first event)."""

    def on_event(self, task: "TaskState", row: tuple) -> None:
        """An event was appended to ``task``'s log (``row``: offset, kind, agent, data, ts)."""

    def before_step(self, task: "TaskState", step: StepInfo) -> None:
        """A step attempt is about to be sent to its actor."""

    def on_commit(self, task: "TaskState", role: str, output: Any, state: Any, requests: list[str]) -> None:
        """A step's result is about to become the task's (before its ``step_finished``)."""

    def after_step(self, task: "TaskState", step: StepInfo, outcome: Outcome) -> Any:
        """A step attempt ended (committed or not); may be ``async``."""

    def on_transition(self, transition: Transition) -> None:
        """The pool's health mode changed."""

    def on_snapshot(self, cost: dict[str, Any]) -> None:
        """A snapshot was written (``seq``, ``bytes``, ``copy_ms``, ``write_ms``, ...)."""

    def on_tick(self, supervisor: Any) -> None:
        """Called every ``health.check_interval_s``: refresh what is read on a timer."""


_METHODS = ("on_submit", "on_event", "before_step", "on_commit", "after_step", "on_transition",
            "on_snapshot", "on_tick")


class Hooks:
    """The supervisor's list of hooks; calls each, logging (not raising) what fails."""

    def __init__(self, hooks: Iterable[Hook] = ()) -> None:
        self.hooks: list[Hook] = []
        self.failures = 0
        self._overridden: dict[str, list[Any]] = {}  # method name -> bound methods that do something
        for hook in hooks:
            self.add(hook)

    def add(self, hook: Hook) -> Hook:
        self.hooks.append(hook)
        for name in _METHODS:
            fn = getattr(hook, name)
            if getattr(fn, "__func__", None) is not getattr(Hook, name):  # on_event runs per token batch:
                self._overridden.setdefault(name, []).append(fn)            # call only what does something
        return hook

    def _call(self, name: str, *args: Any) -> list[Any]:
        results = []
        for fn in self._overridden.get(name, ()):
            try:
                results.append(fn(*args))
            except Exception:
                self.failures += 1
                log.exception("hook %s.%s failed; the pool goes on", type(fn.__self__).__name__, name)
        return results

    def on_submit(self, task: "TaskState") -> None:
        self._call("on_submit", task)

    def on_event(self, task: "TaskState", row: tuple) -> None:
        self._call("on_event", task, row)

    def before_step(self, task: "TaskState", step: StepInfo) -> None:
        self._call("before_step", task, step)

    def on_commit(self, task: "TaskState", role: str, output: Any, state: Any, requests: list[str]) -> None:
        self._call("on_commit", task, role, output, state, requests)

    async def after_step(self, task: "TaskState", step: StepInfo, outcome: Outcome) -> None:
        for result in self._call("after_step", task, step, outcome):
            if inspect.isawaitable(result):
                try:
                    await result
                except Exception:
                    self.failures += 1
                    log.exception("hook after_step failed; the pool goes on")

    def on_transition(self, transition: Transition) -> None:
        self._call("on_transition", transition)

    def on_snapshot(self, cost: dict[str, Any]) -> None:
        self._call("on_snapshot", cost)

    def on_tick(self, supervisor: Any) -> None:
        self._call("on_tick", supervisor)
