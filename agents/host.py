"""The inside of an agent actor ("slot"): binds agents, runs their steps, batches tokens.

:class:`SlotWorker` is a plain class; ``runtime.actors`` wraps it with ``ray.remote`` as
a threaded actor (whose ``start_step`` and ``events`` take and give their requests and
batches as bytes, :mod:`threadbound.agents.wire`). It has ``agents_per_actor`` *places*
(one by default: one agent in its own process), one agent each; the supervisor sends a
place one step at a time.
Each step's agent code runs on a helper thread of its own, so tokens are flushed on time
(a thread whose step ended is kept for the process's next step: starting one costs
0.1-0.3 ms, on every step's path; one whose agent never stopped is never used again).
One binding = one fresh agent instance for one role of one task, on one place; its state
is restored from the committed state the supervisor sends.

How a step's events leave the actor: :meth:`SlotWorker.start_step` starts it and returns
its first batch, a list of ``(kind, data)`` events (its first tokens at once, or the
whole step, outcome included, if it ends that soon: a short step is one Ray call); the
batches after that go on the actor's one stream, :meth:`SlotWorker.events`, together
with the other places'. A step's last batch carries its outcome (``__result__``,
``__error__`` or ``__interrupt__``), so partial output is never lost.
:meth:`SlotWorker.run_step` runs one step in-process as a generator of its batches (for
tests and scripts that drive a worker without Ray).

What the places of one process share (the agent classes unpickled, the model clients)
sits behind a lock; what an agent owns (its instance, its context) is its place's alone.
:meth:`SlotWorker.stop` asks a place's running step to stop (its deadline passed): the
agent's thread raises :class:`~threadbound.agents.base.Stopped` at its next token,
``ctx.ask`` or ``ctx.emit``.
"""

from __future__ import annotations

import inspect
import os
import queue
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterator

import cloudpickle

from threadbound.agents.base import Agent, Interrupt, StepContext, Stopped
from threadbound.agents.errors import RateLimitError, TaskInputError, TransientError
from threadbound.agents.models import build_model

RESULT = "__result__"
ERROR = "__error__"
INTERRUPT = "__interrupt__"  # the step stopped at ctx.interrupt: it waits for a person


@dataclass
class StepRequest:
    """What the supervisor sends for one step (plain, picklable data only)."""

    binding: str
    agent_blob: bytes | None  # the agent's class, with the first step of a binding on a process only
    task_id: str
    role: str
    goal: str
    workspace: str | None
    round: int
    attempt: int
    idempotency_key: str
    inputs: dict[str, Any]
    outputs: dict[str, Any]
    feedback: list[str]
    level: int
    streaming: bool
    model_config: Any
    token_batch_size: int
    token_interval_s: float
    state: Any = None
    has_state: bool = False
    model_options: dict[str, Any] = field(default_factory=dict)
    tokens_left: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    sandbox: Any = None  # SandboxSettings: how the pool isolates commands the agent runs
    answers: list[Any] = field(default_factory=list)  # answers to this step's interrupts so far
    inbox: list[Any] = field(default_factory=list)  # messages since the role's last committed step
    place: int = 0  # which of the actor's places (agents_per_actor > 1) the step runs on


class _TokenBatcher:
    """Groups tokens: the first token goes out at once; later ones wait until
    ``batch_size`` tokens are pending or ``interval_s`` has passed since the last flush."""

    def __init__(self, batch_size: int, interval_s: float, clock=time.monotonic) -> None:
        self.batch_size = batch_size
        self.interval_s = interval_s
        self.clock = clock
        self.parts: list[str] = []
        self.last_flush = float("-inf")

    def add(self, token: str) -> bool:
        """Add a token; True when the pending tokens should be flushed now."""
        self.parts.append(token)
        return self.due()

    def due(self) -> bool:
        return bool(self.parts) and (
            len(self.parts) >= self.batch_size or self.clock() - self.last_flush >= self.interval_s)

    def wait_s(self) -> float | None:
        """How long until pending tokens are due by time (None: nothing pending)."""
        if not self.parts:
            return None
        return max(0.0, self.interval_s - (self.clock() - self.last_flush))

    def take(self) -> tuple[str, Any] | None:
        if not self.parts:
            return None
        text, n = "".join(self.parts), len(self.parts)
        self.parts = []
        self.last_flush = self.clock()
        return ("tokens", {"text": text, "n": n})


_DONE = object()


class _Sink(deque):
    """Where the agent's thread puts tokens and events; wakes the streaming side.

    Until its first batch is out, every put wakes the step's own start call. Once the step
    is on the actor's shared stream (:meth:`share`, :meth:`SlotWorker.events`) a token does
    not wake the stream: it is paced and collects every place's tokens on each turn, so
    the cost of a wake-up is paid per turn, not per token; ``batch_size`` pending tokens,
    an event and a step's end wake it.
    """

    def __init__(self, batch_size: int = 1) -> None:
        super().__init__()
        self.paced = False
        self.batch_size = batch_size  # paced: this many tokens pending wake the stream after all
        self.unsent = 0  # tokens put since the stream last took them (approximate: two threads)
        self.wake = threading.Event()  # its own until the step joins the actor's stream (share)
        self.stop = threading.Event()  # the supervisor asked the step to stop (read by StepContext too)

    def share(self, wake: threading.Event, paced: bool) -> None:
        """From now on wake the actor's one stream (:meth:`SlotWorker.events`); ``paced``:
        a token does not wake it (tokens ride its next turn) unless ``batch_size`` of them
        are pending."""
        self.paced, self.wake = paced, wake

    def append(self, item: Any) -> None:  # also used by StepContext.emit
        super().append(item)
        if self.paced and isinstance(item, str):
            self.unsent += 1
            if self.unsent < self.batch_size:
                return
        if not self.wake.is_set():
            self.wake.set()


class _Drivers:
    """The helper threads a process runs its steps' agent code on. A thread whose step
    ended waits for the next step (starting a thread costs 0.1-0.3 ms, and a step's first
    token waits for it); a thread whose agent is stuck is never handed another step, so a
    step always gets a thread that is free."""

    def __init__(self) -> None:
        self._idle: list[queue.SimpleQueue] = []  # the inboxes of threads waiting for a step
        self._lock = threading.Lock()
        self.started = 0  # threads started (for tests: reuse is visible)

    def run(self, name: str, agent: Agent, ctx: StepContext, sink: "_Sink", outcome: dict[str, Any]) -> None:
        with self._lock:
            inbox = self._idle.pop() if self._idle else None
            if inbox is None:
                self.started += 1
        if inbox is None:
            inbox = queue.SimpleQueue()
            threading.Thread(target=self._serve, args=(inbox,), name=name, daemon=True).start()
        inbox.put((name, agent, ctx, sink, outcome))

    def _serve(self, inbox: queue.SimpleQueue) -> None:
        me = threading.current_thread()
        while True:
            name, agent, ctx, sink, outcome = inbox.get()
            me.name = name  # as a thread of its own would be named: <role>/<task id>
            _drive(agent, ctx, sink, outcome, lambda: self._back(inbox))
            del name, agent, ctx, sink, outcome  # an idle thread holds no agent (released agents go at once)

    def _back(self, inbox: queue.SimpleQueue) -> None:
        with self._lock:
            self._idle.append(inbox)


def _drive(agent: Agent, ctx: StepContext, sink: _Sink, outcome: dict[str, Any],
           ended: Any = None) -> None:
    """Run one step on the agent's thread, feeding every token and event into ``sink``;
    ``ended()`` is called once the agent's code is done, just before the step's end is
    put in ``sink`` (so its thread is free for the next step as soon as that starts)."""
    try:
        result = agent.step(ctx)
        if inspect.isgenerator(result):
            while True:
                try:
                    item = next(result)
                except StopIteration as stop:
                    outcome["output"] = stop.value
                    break
                if sink.stop.is_set():  # checked at every token: the step's deadline passed
                    result.close()  # its finally blocks run here, on its own thread
                    raise Stopped(f"step of {ctx.role!r} in task {ctx.task_id} was asked to stop "
                                  "(its deadline passed)")
                if isinstance(item, str):
                    sink.append(item)
                elif item is not None:
                    raise TypeError(
                        f"agent {ctx.role!r} yielded {type(item).__name__}; a step yields "
                        "str tokens (use ctx.emit(kind, data) for other events)")
        else:
            outcome["output"] = result
        outcome["state"] = agent.get_state()
    except Interrupt as stop:  # not a failure: the step waits for a person
        outcome["interrupt"] = stop
    except BaseException as exc:  # the agent's failure becomes data, never a lost stream
        outcome["error"] = exc
        outcome["traceback"] = traceback.format_exc(limit=20)
    finally:
        if ended is not None:
            ended()
        sink.append(_DONE)


class SlotWorker:
    """One agent actor's worth of logic: ``places`` agents at most, one step per place at
    a time (the supervisor sends no second step to a busy place)."""

    def __init__(self, slot_name: str, places: int = 1) -> None:
        self.slot_name = slot_name
        self.places = places
        self._bound: dict[int, tuple[str, Agent]] = {}  # place -> (binding, its agent)
        self._running: dict[int, tuple[str, _Sink]] = {}  # place -> (idempotency key, sink) of its step now
        self.bindings = 0
        self._lock = threading.Lock()  # guards what the places share: the caches, the counters
        self._classes: dict[bytes, type] = {}
        self._models: dict[str, Any] = {}
        self._steps: dict[str, _Step] = {}  # idempotency key -> a step started by start_step
        self._wake: threading.Event | None = None  # wakes events(): some step has something
        self._drivers = _Drivers()  # the threads steps' agent code runs on

    @property
    def binding(self) -> str | None:
        """The binding on place 0 (what a one-agent actor reports)."""
        got = self._bound.get(0)
        return got[0] if got else None

    @property
    def agent(self) -> Agent | None:
        got = self._bound.get(0)
        return got[1] if got else None

    def ping(self) -> dict[str, Any]:
        return {"slot": self.slot_name, "pid": os.getpid(), "binding": self.binding, "bindings": self.bindings,
                "places": self.places, "bound": len(self._bound)}

    def release(self, place: int | None = None) -> int:
        """Drop the bound agent of ``place`` (all places: None) so it is clean for its next binding.

        No ``gc.collect()`` here: a full collection in a Ray worker costs tens of
        milliseconds, which would be paid on every binding. Reference counting frees an
        agent at once; cycles go with the process when it is recycled."""
        if place is None:
            self._bound.clear()
        else:
            self._bound.pop(place, None)
        return self.bindings

    def stop(self, place: int, key: str) -> bool:
        """Ask the step running on ``place`` with idempotency key ``key`` to stop (its
        deadline passed); False if no such step runs (it ended meanwhile)."""
        running = self._running.get(place)
        if running is None or running[0] != key:
            return False
        running[1].stop.set()
        running[1].wake.set()
        return True

    def _class(self, blob: bytes) -> type:
        with self._lock:
            cls = self._classes.get(blob)
            if cls is None:
                cls = self._classes[blob] = cloudpickle.loads(blob)
            return cls

    def _bind(self, req: StepRequest) -> Agent:
        got = self._bound.get(req.place)
        if got is not None and got[0] == req.binding:
            return got[1]
        self.release(req.place)
        if req.agent_blob is None:  # the supervisor believed this process had the binding
            raise RuntimeError(f"actor {self.slot_name} has no agent for binding {req.binding} and was sent "
                               "no agent class; the step runs again on a fresh binding")
        agent = self._class(req.agent_blob)()
        if req.has_state:
            agent.set_state(req.state)
        self._bound[req.place] = (req.binding, agent)
        with self._lock:
            self.bindings += 1
        return agent

    def _model(self, config: Any):
        if config is None:
            return None
        key = config.model_dump_json() if hasattr(config, "model_dump_json") else repr(config)
        with self._lock:  # one client per config in the process, built once even when places race
            model = self._models.get(key)
            if model is None:
                model = self._models[key] = build_model(config)
            return model

    def _open(self, req: StepRequest) -> "_Step":
        """Bind the step's agent and build its context; a failure becomes the step's error."""
        step = _Step(req, _Sink(req.token_batch_size))
        try:
            agent = self._bind(req)
            step.ctx = StepContext(
                task_id=req.task_id, role=req.role, goal=req.goal, workspace=req.workspace,
                round=req.round, attempt=req.attempt, idempotency_key=req.idempotency_key,
                inputs=req.inputs, outputs=req.outputs, feedback=list(req.feedback),
                level=req.level, streaming=req.streaming, model=self._model(req.model_config),
                model_options=dict(req.model_options), tokens_left=req.tokens_left,
                sandbox=req.sandbox, sink=step.sink, answers=list(req.answers), inbox=list(req.inbox),
            )
        except BaseException as exc:
            step.outcome.update(error=exc, traceback=traceback.format_exc(limit=20))
            step.sink.append(_DONE)
            return step
        self._running[req.place] = (req.idempotency_key, step.sink)
        self._drivers.run(f"{req.role}/{req.task_id}", agent, step.ctx, step.sink, step.outcome)
        return step

    def _close(self, step: "_Step") -> None:
        place = step.req.place
        if self._running.get(place, (None,))[0] == step.req.idempotency_key:
            del self._running[place]
        if isinstance(step.outcome.get("error"), Stopped):
            # Stopped midway, its agent may hold half-done state: the next step of the role
            # gets a fresh instance from the committed state, as a killed actor's would.
            got = self._bound.get(place)
            if got is not None and got[0] == step.req.binding:
                del self._bound[place]

    def run_step(self, req: StepRequest) -> Iterator[list[tuple[str, Any]]]:
        """Run one step of the bound agent in-process, yielding batches of events, outcome
        last (the pool's supervisor uses :meth:`start_step` and :meth:`events` instead).

        The agent runs on a helper thread (one per place with a step in flight) so that
        pending tokens are flushed on time even while the agent is busy or stuck; a
        stuck agent's tokens so far are thus never lost.
        """
        step = self._open(req)
        try:
            while not step.done:
                step.sink.wake.wait(step.batcher.wait_s())
                step.sink.wake.clear()
                out = step.pump()
                if out:
                    yield out
        finally:
            self._close(step)

    # -- one event stream for all the places (agents_per_actor > 1) ------------------------

    def start_step(self, req: StepRequest) -> list[tuple[str, Any]]:
        """Start a step on its place. On an actor of one place, return its first batch:
        its first tokens or event, or all of it, outcome included, when it ends that soon
        (a short step is then one call, with no message on the stream at all). On an
        actor of several places, return ``[]`` at once: all the step's batches go on the
        stream, paced with the other places' (a reply per step would add a message per
        step, and a step's batches would wait for it). What follows the reply comes
        through :meth:`events`, in one message per flush for all the places."""
        with self._lock:
            if self._wake is None:
                self._wake = threading.Event()
        step = self._open(req)  # a wake of its own until its first batch is out: nothing is paced yet
        if self.places > 1:
            self._stream(step)
            return []
        while True:
            step.sink.wake.wait(step.batcher.wait_s())
            step.sink.wake.clear()
            out = step.pump()
            if out or step.done:
                break
        if step.done:
            self._close(step)
            return out
        self._stream(step)
        return out

    def _stream(self, step: "_Step") -> None:
        """The step's batches from now on go on the actor's stream, paced with the other places'."""
        with self._lock:
            step.sink.share(self._wake, paced=step.req.token_interval_s > 0)
            self._steps[step.req.idempotency_key] = step
        self._wake.set()  # what the agent put in its sink meanwhile is the stream's now

    def events(self) -> Iterator[list[tuple[str, list[tuple[str, Any]]]]]:
        """The actor's one event stream: each item is ``[(idempotency key, batch), ...]``
        with the pending events of every step that has some, flushed together (a step's
        batches keep their order; its last batch carries its outcome, as with
        :meth:`run_step`). Runs as long as the actor does."""
        with self._lock:
            if self._wake is None:
                self._wake = threading.Event()
        wake = self._wake
        turn = float("-inf")
        while True:
            with self._lock:
                steps = list(self._steps.items())
            if not steps:  # idle: sleep until a step starts
                wake.wait()
            else:  # tokens wait for the next turn; an event or a step's end cuts the wait short
                pace = _pace([st for _, st in steps])  # 0: unpaced, every token wakes the stream
                wake.wait(max(0.0, turn + pace - time.monotonic()) if pace > 0 else None)
            wake.clear()
            turn = time.monotonic()
            with self._lock:
                steps = list(self._steps.items())
            out = []
            for key, st in steps:
                got = st.pump()
                if got:
                    out.append((key, got))
                if st.done:
                    with self._lock:
                        self._steps.pop(key, None)
                    self._close(st)
            if out:
                yield out


# The shared stream's turn: each step's token interval while few steps stream, stretched
# as more do (the seeds' adaptive batching), so an actor of many busy agents sends fewer,
# fuller batches and a quiet agent's token still goes out within its token interval.
PACE_STEPS = 8        # steps streaming at once before the turn grows
PACE_MAX_FACTOR = 5   # the turn is at most this many token intervals


def _pace(steps: list["_Step"]) -> float:
    """How long a turn of the shared stream lasts with ``steps`` open on the actor.

    Examples:
        >>> from types import SimpleNamespace as S
        >>> one = S(req=S(token_interval_s=0.05))
        >>> _pace([one]), _pace([one] * 16), _pace([one] * 500)
        (0.05, 0.1, 0.25)
    """
    base = min(st.req.token_interval_s for st in steps)
    return base * min(PACE_MAX_FACTOR, max(1.0, len(steps) / PACE_STEPS))


class _Step:
    """One step's pending events on the host: its sink, batcher and outcome."""

    def __init__(self, req: StepRequest, sink: "_Sink") -> None:
        self.req = req
        self.sink = sink
        self.batcher = _TokenBatcher(req.token_batch_size, req.token_interval_s)
        self.collected: list[str] = []  # non-streaming: tokens become one final message
        self.outcome: dict[str, Any] = {}
        self.started = time.monotonic()
        self.ctx: StepContext | None = None
        self.done = False

    def pump(self) -> list[tuple[str, Any]]:
        """What is due to go out now: token batches and events in order, the outcome last."""
        req, batcher, sink, outcome, started = self.req, self.batcher, self.sink, self.outcome, self.started
        out: list[tuple[str, Any]] = []
        done = False
        sink.unsent = 0
        while sink:
            item = sink.popleft()
            if item is _DONE:
                done = True
            elif not isinstance(item, str):  # a custom event: tokens before it go first
                tok = batcher.take()
                if tok:
                    out.append(tok)
                out.append(item)
            elif not req.streaming:
                self.collected.append(item)
            else:
                batcher.add(item)
                if len(batcher.parts) >= batcher.batch_size:
                    out.append(batcher.take())
        if batcher.due() or done:
            tok = batcher.take()
            if tok:
                out.append(tok)
        if done:
            self.done = True
            tokens = self.ctx.tokens_used if self.ctx is not None else 0
            if self.collected:
                out.append(("message", {"text": "".join(self.collected)}))
            if "interrupt" in outcome:
                stop = outcome["interrupt"]
                out.append((INTERRUPT, {"payload": stop.payload, "index": stop.index,
                                        "elapsed_s": time.monotonic() - started, "tokens": tokens}))
            elif "error" in outcome:
                data = _error_data(outcome["error"], outcome["traceback"], started)
                out.append((ERROR, {**data, "tokens": tokens} if self.ctx is not None else data))
            else:
                out.append((RESULT, {
                    "output": outcome.get("output"), "state": outcome.get("state"),
                    "round_requests": list(self.ctx._round_requests),
                    "elapsed_s": time.monotonic() - started, "tokens": tokens,
                }))
        return out


def _error_data(exc: BaseException, tb: str, started: float) -> dict[str, Any]:
    return {
        "type": type(exc).__name__,
        "message": str(exc) or type(exc).__name__,
        "transient": isinstance(exc, TransientError),
        "error_class": error_class(exc),
        "retry_after_s": getattr(exc, "retry_after_s", None),
        "traceback": tb,
        "elapsed_s": time.monotonic() - started,
    }


def error_class(exc: BaseException) -> str | None:
    """The retry policy's class of an agent's error; None: a plain error, not retryable;
    ``input``: the task's own input was at fault (not retried, not a fault of the pool)."""
    if isinstance(exc, TaskInputError):
        return "input"
    if isinstance(exc, RateLimitError):
        return "rate_limit"
    if isinstance(exc, TransientError):
        return "transient"
    return None
