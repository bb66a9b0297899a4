"""Hooks: how observers (metrics, the structured log, a user's own) watch the supervisor.

The supervisor's core (the event log, the step path, the rounds) calls these hooks at
fixed points and knows none of their implementations. A hook subclasses :class:`Hook`
and overrides what it needs; every method is a no-op by default. A hook that raises
is logged and skipped: it never breaks the pool. That is why what the pool depends on
is not a hook: the journal (a failed write must stop a commit, not be passed over) and
the health monitor (whose transitions the supervisor acts on) are called directly.

Order: hooks run in the order they were added. ``after_step`` may be a coroutine
function; the step path awaits it. Events reach hooks a batch at a time
(:meth:`Hook.on_events`: the events appended together, for one or more tasks).

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
    from threadbound.agents.events import Row

    from .task_state import TaskRecord

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
    again once answered; counts as ok); ``input`` (the task's own input was at fault:
    never retried, not counted by health); or the retry policy's class of the failure
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

    def on_submit(self, task: "TaskRecord") -> None:
        """A task was accepted (before its first event)."""

    def on_events(self, batch: "list[tuple[TaskRecord, Row]]") -> None:
        """Events were appended, together: ``(task, row)`` pairs, in order. By default
        each goes to :meth:`on_event`; override this to handle a batch at once."""
        for task, row in batch:
            self.on_event(task, row)

    def on_event(self, task: "TaskRecord", row: "Row") -> None:
        """An event was appended to ``task``'s log (``row``: offset, kind, agent, data, ts)."""

    def before_step(self, task: "TaskRecord", step: StepInfo) -> None:
        """A step attempt was just sent to its actor (its ``step_started`` event is in
        the log; nothing it streams has been read yet). The call goes out first so the
        actor starts while the supervisor logs it."""

    def on_commit(self, task: "TaskRecord", role: str, output: Any, state: Any, requests: list[str]) -> None:
        """A step's result is about to become the task's (before its ``step_finished``)."""

    def after_step(self, task: "TaskRecord", step: StepInfo, outcome: Outcome) -> Any:
        """A step attempt ended (committed or not); may be ``async``."""

    def on_transition(self, transition: Transition) -> None:
        """The pool's health mode changed."""

    def on_snapshot(self, cost: dict[str, Any]) -> None:
        """A snapshot was written (``seq``, ``bytes``, ``copy_ms``, ``write_ms``, ...)."""

    def on_tick(self) -> None:
        """Called every ``health.check_interval_s``: refresh what is read on a timer."""


_METHODS = ("on_submit", "on_events", "before_step", "on_commit", "after_step", "on_transition",
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
            kind = type(hook)
            if name == "on_events":  # overriding either on_events or on_event counts
                does = kind.on_events is not Hook.on_events or kind.on_event is not Hook.on_event
            else:
                does = getattr(kind, name) is not getattr(Hook, name)
            if does:  # call only what does something (events come per token batch)
                self._overridden.setdefault(name, []).append(getattr(hook, name))
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

    def on_submit(self, task: "TaskRecord") -> None:
        self._call("on_submit", task)

    def on_events(self, batch: "list[tuple[TaskRecord, Row]]") -> None:
        self._call("on_events", batch)

    def before_step(self, task: "TaskRecord", step: StepInfo) -> None:
        self._call("before_step", task, step)

    def on_commit(self, task: "TaskRecord", role: str, output: Any, state: Any, requests: list[str]) -> None:
        self._call("on_commit", task, role, output, state, requests)

    async def after_step(self, task: "TaskRecord", step: StepInfo, outcome: Outcome) -> None:
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

    def on_tick(self) -> None:
        self._call("on_tick")
