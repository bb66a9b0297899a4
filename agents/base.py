"""The Agent contract: what runs inside an agent actor for one role of a task.

An agent is bound to one actor ("slot") for the length of its task. The pool makes
a fresh instance for every binding, calls :meth:`Agent.step` once per round, and
after every successful step records :meth:`Agent.get_state` as the agent's
committed state. If the actor is replaced (timeout, crash, recycling) the new
instance receives that committed state through :meth:`Agent.set_state`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Generator, Iterator

from .errors import BudgetExhausted
from .models.base import Model, count_tokens


from .events import RESERVED_KINDS  # noqa: E402,F401  (the runtime's kinds; refused in emit)


class Interrupt(BaseException):
    """Raised by :meth:`StepContext.interrupt` to end a step that waits for a person.

    A ``BaseException`` (like ``KeyboardInterrupt``), so an agent's ``except Exception``
    does not swallow it by accident; let it propagate."""

    def __init__(self, payload: Any, index: int) -> None:
        super().__init__(f"waiting for input #{index}")
        self.payload = payload
        self.index = index


class Stopped(BaseException):
    """Raised inside a step the pool asked to stop (its deadline passed), at the step's next
    token, :meth:`StepContext.ask` or :meth:`StepContext.emit`.

    A ``BaseException``, so an agent's ``except Exception`` does not swallow it. An agent
    that does not stop within the grace period has its actor killed."""


@dataclass
class StepContext:
    """Everything one step of one agent may see, plus the ways it talks back.

    Attributes:
        task_id: the task this step belongs to.
        role: the agent's role name (``coder``, ``tester``, ... or your own).
        goal: the task's goal text.
        workspace: the task's workspace directory, or None.
        round: the current round, from 1.
        attempt: the attempt of this step, from 1 (retries increase it).
        idempotency_key: stable for this task, round, role and attempt; use it to
            make external side effects idempotent.
        inputs: the task's ``inputs`` mapping.
        outputs: committed outputs of this task's agents, by role: this round's for
            the roles this one comes after (``Task.after``), the previous round's for
            the others (roles running alongside it are not waited for).
        feedback: what agents asked for when they requested this round, or [].
        level: reasoning level 1-4 (1 whenever the pool is degraded).
        streaming: False when the pool runs non-streaming, by config or because it
            is degraded: tokens are then collected into one final ``message`` event,
            and ``ask`` calls the model without streaming.
        model: the configured model backend.
        model_options: what the level sets for model calls (``model``,
            ``max_tokens``, ``temperature``); ``ask`` passes them on.
        tokens_used: tokens the model has answered this step (the task's cost).
        tokens_left: what is left of the task's cost budget, in tokens at this step's
            level (None: no budget). ``ask`` caps each answer to it and raises
            :class:`BudgetExhausted` when nothing is left.
        inbox: messages sent to the task (``handle.send``) since this role's previous
            committed step, oldest first ([] if none). A step that fails and runs
            again sees them again; a committed step's messages are not shown twice.
        sandbox: how the pool isolates commands an agent runs on the workspace
            (a ``threadbound.agents.sandbox.SandboxSettings``; None: the defaults,
            ``isolation: required``). Pass it to ``sandbox.run``.
        sink: where :meth:`emit` puts events (set by the runtime; a list by default,
            handy in tests).
    """

    task_id: str
    role: str
    goal: str
    workspace: str | None = None
    round: int = 1
    attempt: int = 1
    idempotency_key: str = ""
    inputs: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, Any] = field(default_factory=dict)
    feedback: list[str] = field(default_factory=list)
    level: int = 2
    streaming: bool = True
    model: Model | None = None
    model_options: dict[str, Any] = field(default_factory=dict)
    tokens_used: int = 0
    tokens_left: int | None = None
    inbox: list[Any] = field(default_factory=list)
    sandbox: Any = None
    sink: Any = field(default_factory=list, repr=False)
    answers: list[Any] = field(default_factory=list, repr=False)  # the answers to this step's interrupts so far
    _round_requests: list[str] = field(default_factory=list, repr=False)
    _asked: int = field(default=0, repr=False)

    def interrupt(self, payload: Any = None) -> Any:
        """Ask a person and wait for the answer; returns it.

        The first time, the step ends here: the task's status becomes ``waiting`` with
        an ``input_requested`` event carrying ``payload`` (plain data: a question, a
        diff to approve...), and its agent actors are released while it waits. When
        the answer arrives (``handle.respond``, ``threadbound respond``), **the step
        runs again from its beginning** -- same round, attempt and ``idempotency_key``,
        the agent's last committed state -- and this call returns the answer instead
        of stopping. So the code before an interrupt runs twice: make its side effects
        idempotent (``ctx.idempotency_key`` is the same both times), or move them after
        the interrupt. A step may interrupt several times; each call is matched to its
        answer by its order within the step.

        Do not catch :class:`Interrupt`: it is how the step stops.

        Examples:
            >>> ctx = StepContext(task_id="t1", role="coder", goal="g", answers=["yes"])
            >>> ctx.interrupt({"question": "ship it?"})
            'yes'
        """
        index = self._asked
        self._asked += 1
        if index < len(self.answers):
            return self.answers[index]
        raise Interrupt(payload, index)

    def emit(self, kind: str, data: Any = None) -> None:
        """Write a custom event to the task's stream (e.g. tool output).

        Events reach clients in order with the tokens the step yields, as soon as
        they are emitted (pending tokens are flushed first). A dict ``data`` arrives as
        the event's data, with ``attempt`` set to this step's attempt; anything else
        arrives as ``{"value": data}``.

        Examples:
            >>> ctx = StepContext(task_id="t1", role="coder", goal="g")
            >>> ctx.emit("tool_output", {"cmd": "ls", "stdout": "a.py"})
        """
        self._check_stop()
        if not isinstance(kind, str) or not kind:
            raise ValueError("event kind must be a non-empty string")
        if kind in RESERVED_KINDS:
            raise ValueError(f"event kind {kind!r} is reserved by the runtime; pick another name")
        self.sink.append((kind, data))

    def ask(self, messages: list[dict[str, str]], **options: Any) -> Generator[str, None, str]:
        """Call the task's model: yields tokens as they come and returns the whole text.

        Use it with ``yield from`` inside a generator step, so tokens stream to clients::

            text = yield from ctx.ask([{"role": "user", "content": ctx.goal}])

        When the pool runs non-streaming the model is called without streaming and the
        whole answer is yielded once.
        """
        self._check_stop()
        if self.model is None:
            raise RuntimeError("this step has no model configured")
        opts = {
            "agent": self.role, "task_id": self.task_id, "level": self.level,
            "round": self.round, "attempt": self.attempt, "goal": self.goal,
            "stream": self.streaming, **self.model_options, **options,
        }
        if self.tokens_left is not None:
            left = self.tokens_left - self.tokens_used
            if left <= 0:
                raise BudgetExhausted(
                    f"task {self.task_id} has spent its cost budget ({self.tokens_used} tokens this step); "
                    "raise the task's cost_budget to let it go on", task_id=self.task_id, agent=self.role)
            opts["max_tokens"] = min(opts.get("max_tokens") or left, left)
        if not self.streaming:
            text = self.model.complete(messages, **opts)
            self.tokens_used += count_tokens(text)
            yield text
            return text
        parts: list[str] = []
        for tok in self.model.stream(messages, **opts):
            self._check_stop()
            parts.append(tok)
            self.tokens_used += 1
            yield tok
        return "".join(parts)

    def _check_stop(self) -> None:
        """Raise :class:`Stopped` once the pool asked this step to stop (the runtime's sink
        carries the flag; a plain list, as in tests, never stops)."""
        stop = getattr(self.sink, "stop", None)
        if stop is not None and stop.is_set():
            raise Stopped(f"step of {self.role!r} in task {self.task_id} was asked to stop (its deadline passed)")

    def request_round(self, feedback: str) -> None:
        """Ask for another round (e.g. tests failed), with feedback for the next one.

        When the round ends and rounds remain, every agent runs again with
        ``ctx.feedback`` set; when none remain the task fails with that feedback.
        """
        self._round_requests.append(str(feedback))


class Agent:
    """Base class for a role. Subclass it and implement :meth:`step`.

    ``step`` either returns its output, or is a generator that yields tokens
    (``str``) as it produces them and returns its output at the end. Outputs must
    be picklable; plain data (str, numbers, lists, dicts) shows in event streams.

    Examples:
        >>> class Echo(Agent):
        ...     def step(self, ctx):
        ...         for word in ctx.goal.split():
        ...             yield word + " "
        ...         return {"echoed": ctx.goal}
        >>> ctx = StepContext(task_id="t1", role="echo", goal="hello world")
        >>> list(Echo().step(ctx))
        ['hello ', 'world ']
    """

    def step(self, ctx: StepContext) -> Any | Iterator[str]:
        raise NotImplementedError(f"{type(self).__name__}.step() is not implemented")

    def get_state(self) -> Any:
        """Return this agent's state to commit after a successful step (default: None).

        Return plain data, never handles, locks or open files.
        """
        return None

    def set_state(self, state: Any) -> None:
        """Restore state committed by an earlier instance of this role (default: ignore)."""
