"""Fake agent actors for unit tests of the supervisor without Ray.

:class:`FakeActors` is the ``make_actor`` factory a :class:`Supervisor` takes. Each
:class:`FakeActor` behaves like a slot actor seen from the supervisor's side:

* ``await handle.ping.remote()`` returns ``{"pid": ...}`` (and fails once it is dead);
* ``handle.start_step.options(name=...).remote(req)`` starts the role's *script*; its
  reply (``.future()``, as a Ray ObjectRef's) is the step's first batch, a list of
  ``(kind, data)`` events (with ``per_actor`` > 1 it is empty, as the host's is: the
  supervisor does not wait for it); the request and every batch cross as bytes
  (``agents.wire``), as between the supervisor and a real actor; the batches after the
  reply come on the actor's one stream,
  ``handle.events.remote()``, an async iterator as Ray's ObjectRefGenerator is: each
  ``__anext__()`` gives an awaitable yielding ``[(idempotency key, batch)]``. A step's
  last batch holds ``("__result__", {...})`` or ``("__error__", {...})`` with exactly the
  fields ``agents/host.py`` sends (its ``_error_data`` builds the error);
* with ``FakeActors(per_actor=k)`` it hosts up to k steps at once, one per place
  (``req.place``); ``handle.stop.remote(place, key)`` asks the step on that place to stop
  (a script that checks, ``await call.hang(stoppable=True)``, then ends with the error
  the host sends for a stopped step; one that does not is killed by the slot table);
* killing it (through :attr:`FakeActors.ray`, which tests put in place of the ``ray``
  module the slot table uses) stops its step at once, like a killed process: its
  stream then raises ``ActorDiedError``, as does a reply not yet given.

A script is ``async def script(call: StepCall) -> output``, chosen per role. It can
stream tokens (``call.tokens``), emit custom events, ask for a round, sleep, hang
until killed (``await call.hang()``), wait on a test's ``asyncio.Event``, raise an
agent error (``TransientError``, ``AgentError``, ...: it becomes an ``__error__``
batch) or raise :class:`ActorCrash` (the process dies; the stream breaks with a Ray
actor error).

The factory records what a test asserts on: every step's start and end in one
sequence (so "ran at the same time" is an overlap of intervals, not of wall-clock
times), the most steps of one task running at once, and how many actors were alive
at once (an actor counts as alive from its creation until the slot table's kill is
confirmed by a failing ping).
"""

from __future__ import annotations

import asyncio
import itertools
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from ray.exceptions import ActorDiedError

from threadbound.agents.base import Interrupt, Stopped
from threadbound.agents.host import ERROR, INTERRUPT, RESULT, StepRequest, _error_data
from threadbound.agents.wire import pack, unpack
from threadbound.runtime.supervisor.clock import FakeClock

Script = Callable[["StepCall"], Awaitable[Any]]

ALIVE, DYING, DEAD = "alive", "dying", "dead"


class ActorCrash(Exception):
    """Raised by a script: the actor's process dies in the middle of the step."""


@dataclass
class StepRecord:
    """One step attempt as the actor saw it; ``start`` and ``end`` are sequence numbers."""

    task_id: str
    role: str
    round: int
    attempt: int
    actor: str  # the actor's unique id (``agent/0#3``), not its slot name
    pid: int
    ray_task_name: str
    outputs: dict[str, Any]
    feedback: list[str]
    running_in_task: int  # steps of the task running in actors as this one started (itself included)
    start: int
    end: int | None = None
    how: str | None = None  # ok, error, crash, killed

    def overlaps(self, other: "StepRecord") -> bool:
        mine = self.end if self.end is not None else float("inf")
        theirs = other.end if other.end is not None else float("inf")
        return self.start < theirs and other.start < mine


class _Ref:
    """What awaiting one item of a step's stream gives: a batch of events."""

    def __init__(self, batch: list[tuple[str, Any]]) -> None:
        self.batch = batch

    def __await__(self):
        if False:  # pragma: no cover  (makes this a generator: awaiting it takes no loop turn)
            yield
        return self.batch


class StepCall:
    """What a script sees and does: the request, and the ways to talk back."""

    def __init__(self, actor: "FakeActor", req: StepRequest, ray_task_name: str) -> None:
        self.actor = actor
        self.req = req
        self.ray_task_name = ray_task_name
        self.queue: asyncio.Queue = asyncio.Queue()  # until the reply: (batch | None for "died", clock seconds)
        self.replied = False  # the first batch went as the reply: the rest go on the actor's stream
        self.pending: list[tuple[str, Any]] = []
        self.round_requests: list[str] = []
        self.tokens_used = 0
        self.asked = 0
        self.stop = asyncio.Event()  # the supervisor asked this step to stop (its deadline)

    # what the request says
    @property
    def role(self) -> str:
        return self.req.role

    @property
    def round(self) -> int:
        return self.req.round

    @property
    def attempt(self) -> int:
        return self.req.attempt

    @property
    def outputs(self) -> dict[str, Any]:
        return self.req.outputs

    @property
    def inputs(self) -> dict[str, Any]:
        return self.req.inputs

    # talking back
    def send(self, events: list[tuple[str, Any]], clock_s: float = 0.0) -> None:
        """Put a batch on the stream; delivering it moves the fake clock by ``clock_s``
        (a step that takes that long to produce it)."""
        item = (self.pending + list(events), clock_s)
        self.pending = []
        if self.replied:
            self.actor.stream.put_nowait((self.req.idempotency_key, item))
        else:
            self.queue.put_nowait(item)

    def died(self) -> None:
        """The process is gone: a reply not yet given fails (the actor's stream breaks too)."""
        if not self.replied:
            self.queue.put_nowait((None, 0.0))

    def tokens(self, text: str, n: int = 1, *, clock_s: float = 0.0, flush: bool = True) -> None:
        """Stream ``n`` tokens as one batch (``flush=False``: they go with the next batch)."""
        self.tokens_used += n
        event = ("tokens", {"text": text, "n": n})
        if flush:
            self.send([event], clock_s)
        else:
            self.pending.append(event)

    def emit(self, kind: str, data: Any = None, *, clock_s: float = 0.0) -> None:
        self.send([(kind, data)], clock_s)

    def request_round(self, feedback: str) -> None:
        self.round_requests.append(str(feedback))

    def interrupt(self, payload: Any = None) -> Any:
        """``ctx.interrupt``: this step's next answer if it has one, else the step stops and
        waits for a person (it runs again from its beginning with the answer)."""
        index, self.asked = self.asked, self.asked + 1
        if index < len(self.req.answers):
            return self.req.answers[index]
        raise Interrupt(payload, index)

    async def sleep(self, seconds: float = 0.0) -> None:
        await asyncio.sleep(seconds)

    async def hang(self, stoppable: bool = False) -> None:
        """Never return (until the actor is killed); ``stoppable``: end with ``Stopped``
        when the supervisor asks the step to stop, as an agent checking its context does."""
        if stoppable:
            await self.stop.wait()
            raise Stopped("asked to stop")
        await asyncio.Event().wait()


class _Reply:
    """What ``start_step`` returns: ``future()`` gives the step's first batch (an asyncio
    future here, which ``asyncio.wrap_future`` takes as it is)."""

    def __init__(self, call: StepCall, clock: FakeClock) -> None:
        self.call, self.clock = call, clock

    def future(self) -> asyncio.Future:
        fut = asyncio.get_running_loop().create_future()
        self.task = asyncio.get_running_loop().create_task(self._first(fut))
        return fut

    async def _first(self, fut: asyncio.Future) -> None:
        call = self.call
        batch, clock_s = await call.queue.get()
        if batch is None:
            fut.set_exception(ActorDiedError())
            return
        if not any(kind in (RESULT, ERROR, INTERRUPT) for kind, _ in batch):
            call.replied = True  # what it sent meanwhile, and all it sends later, go on the stream
            while not call.queue.empty():
                item = call.queue.get_nowait()
                if item[0] is not None:
                    call.actor.stream.put_nowait((call.req.idempotency_key, item))
        fut.set_result(pack(batch))  # bytes, as the host's actor sends them (agents.wire)
        if clock_s:  # after the reply is in: the supervisor reads it before the timers this fires
            self.clock.advance(clock_s)


class _Stream:
    """The actor's one event stream (an ObjectRefGenerator): ``__anext__()`` -> awaitable
    ``[(key, batch)]``; raises ``ActorDiedError`` once the actor is gone."""

    def __init__(self, actor: "FakeActor", clock: FakeClock) -> None:
        self.actor = actor
        self.clock = clock

    def __aiter__(self) -> "_Stream":
        return self

    async def __anext__(self) -> _Ref:
        actor = self.actor
        if actor.broken:
            raise ActorDiedError()
        for _ in range(3):  # as Ray's messages come: what the one before woke (a deadline, say) runs first
            await asyncio.sleep(0)
        item = await actor.stream.get()
        if item is None:
            actor.broken = True
            raise ActorDiedError()
        key, (batch, clock_s) = item
        if clock_s:
            self.clock.advance(clock_s)
        return _Ref(pack([(key, batch)]))


class _Method:
    def __init__(self, call: Callable[..., Any]) -> None:
        self._call = call

    def remote(self, *args: Any) -> Any:
        return self._call(*args)

    def options(self, **opts: Any) -> "_Method":
        return _Method(lambda *args: self._call(*args, **opts))


class FakeActor:
    """One fake slot actor (one "process")."""

    def __init__(self, owner: "FakeActors", name: str, uid: str, pid: int) -> None:
        self.owner = owner
        self.name = name
        self.uid = uid
        self.pid = pid
        self.state = ALIVE
        self.killed = False  # the slot table killed it (rather than it dying on its own)
        self.pings_left: int | None = None  # while dying: pings it still answers
        self.running: dict[int, tuple[asyncio.Task, StepCall]] = {}  # place -> its step
        self.stops: list[tuple[int, str]] = []  # (place, key) of every stop asked
        self.steps = 0
        self.bound: set[str] = set()  # bindings whose agent class this process was sent
        self.started = False
        self.stream: asyncio.Queue = asyncio.Queue()  # (key, (batch, clock seconds)), None: the process is gone
        self.broken = False
        self.ping = _Method(self._ping)
        self.start_step = _Method(self._start_step)
        self.events = _Method(self._events)
        self.stop = _Method(self._stop)

    def __repr__(self) -> str:
        return f"<FakeActor {self.uid} pid={self.pid} {self.state}>"

    # -- the actor's methods ------------------------------------------------------------

    async def _ping(self) -> dict[str, Any]:
        if not self.started:  # the first ping answers once the process is up
            self.started = True
            if self.owner.start_delay_s:
                await asyncio.sleep(self.owner.start_delay_s)
        if self.state == DYING:
            if self.pings_left:
                self.pings_left -= 1
            else:
                self._dead()
        if self.state == DEAD:
            raise ActorDiedError()
        return {"slot": self.name, "pid": self.pid, "binding": None, "bindings": self.steps}

    def _events(self, name: str | None = None) -> _Stream:
        return _Stream(self, self.owner.clock)

    def _start_step(self, data: bytes, name: str | None = None) -> _Reply:
        req: StepRequest = unpack(data)
        owner = self.owner
        call = StepCall(self, req, name or "")
        reply = _Reply(call, owner.clock)
        call.replied = owner.per_actor > 1  # several places: the reply is empty, every batch on the stream
        if self.state != ALIVE:
            owner.violations.append(f"step {name} sent to {self.uid}, which is {self.state}")
            call.died()
            return reply
        busy = {p for p, (t, _) in self.running.items() if not t.done()}
        if req.place in busy:
            owner.violations.append(f"two steps at once on place {req.place} of {self.uid}: {name}")
        if len(busy) >= owner.per_actor:
            owner.violations.append(f"more than {owner.per_actor} steps at once on {self.uid}: {name}")
        if not 0 <= req.place < owner.per_actor:
            owner.violations.append(f"step {name} sent to place {req.place} of {self.uid}")
        if req.agent_blob is None:  # the class comes once per binding on a process
            if req.binding not in self.bound:
                owner.violations.append(f"step {name} of a new binding on {self.uid} carries no agent class")
        elif owner.blobs is not None and owner.blobs.get(req.role) != req.agent_blob:
            owner.violations.append(f"step {name} carries another role's agent class")
        else:
            self.bound.add(req.binding)
        self.steps += 1
        self.running[req.place] = (asyncio.get_running_loop().create_task(self._body(call), name=f"fake/{name}"),
                                   call)
        return reply

    async def _stop(self, place: int, key: str) -> bool:
        if self.state == DEAD:
            raise ActorDiedError()
        self.stops.append((place, key))
        step = self.running.get(place)
        if step is None or step[0].done() or step[1].req.idempotency_key != key:
            return False
        step[1].stop.set()
        return True

    async def _body(self, call: StepCall) -> None:
        owner, req = self.owner, call.req
        rec = owner._started(self, call)
        started = time.monotonic()
        try:
            output = await owner.script_for(req.role)(call)
        except Stopped as stop:  # asked to stop and did: the host reports it as data
            owner._ended(rec, "stopped")
            call.send([(ERROR, {**_error_data(stop, "", started), "tokens": call.tokens_used})])
        except ActorCrash:
            owner._ended(rec, "crash")
            self._dead()
            call.died()
            self.stream.put_nowait(None)
            for step, other in self.running.values():  # the process is gone: its other steps with it
                if other is not call and not step.done():
                    step.cancel()
        except Interrupt as stop:  # not a failure: the step waits for a person
            owner._ended(rec, "interrupt")
            call.send([(INTERRUPT, {"payload": stop.payload, "index": stop.index,
                                    "elapsed_s": time.monotonic() - started, "tokens": call.tokens_used})])
        except asyncio.CancelledError:  # killed: the process is gone mid-step
            owner._ended(rec, "killed")
            call.died()
            raise
        except Exception as exc:  # the agent raised: the worker reports it as data
            owner._ended(rec, "error")
            call.send([(ERROR, {**_error_data(exc, traceback.format_exc(limit=5), started),
                                "tokens": call.tokens_used})])
        else:
            owner._ended(rec, "ok")
            call.send([(RESULT, {"output": output, "state": {"steps": self.steps},
                                 "round_requests": list(call.round_requests),
                                 "elapsed_s": time.monotonic() - started, "tokens": call.tokens_used})])

    # -- what happens to the process ----------------------------------------------------

    def kill(self) -> None:
        """``ray.kill(handle, no_restart=True)``: the step stops now; the actor is confirmed
        dead after it has answered ``FakeActors.linger_pings`` more pings."""
        self.owner.kills.append(self.uid)
        self.killed = True
        if self.state == ALIVE:
            self.state, self.pings_left = DYING, self.owner.linger_pings
        self.stream.put_nowait(None)
        for step, _ in self.running.values():
            if not step.done():
                step.cancel()

    def _dead(self) -> None:
        if self.state != DEAD:
            self.state = DEAD
            self.owner.deaths.append(self.uid)


class _FakeRay:
    """Stands in for the ``ray`` module inside ``runtime/supervisor/slot_actors.py`` (``kill``, ``get_actor``)."""

    def __init__(self, owner: "FakeActors") -> None:
        self.owner = owner

    def kill(self, handle: Any, *, no_restart: bool = True) -> None:
        if not isinstance(handle, FakeActor):
            raise ValueError(f"ray.kill() only supported for actors; got {type(handle)}")
        handle.kill()

    def get_actor(self, name: str, namespace: str | None = None) -> FakeActor:
        for a in self.owner.actors:
            if a.name == name and a.state != DEAD:
                return a
        raise ValueError(f"Failed to look up actor with name '{name}'")


@dataclass
class FakeActors:
    """The ``make_actor`` factory: scripted steps per role, and what happened, recorded.

    ``linger_pings``: pings a killed actor still answers before it counts as dead (its
    name stays taken and it counts against the cap until then). ``start_delay_s``: how
    long a new actor takes to answer its first ping (a process start).
    """

    scripts: dict[str, Script] = field(default_factory=dict)
    default: Script | None = None
    blobs: dict[str, bytes] | None = None  # role -> the agent blob its requests must carry
    linger_pings: int = 0
    start_delay_s: float = 0.0
    per_actor: int = 1  # steps one actor may run at once (agents_per_actor)
    clock: FakeClock = field(default_factory=FakeClock)

    def __post_init__(self) -> None:
        self.actors: list[FakeActor] = []
        self.kills: list[str] = []  # uid of every actor the slot table killed, in order
        self.deaths: list[str] = []  # uid of every actor confirmed dead, in order
        self.steps: list[StepRecord] = []
        self.violations: list[str] = []
        self.max_alive = 0
        self.max_running: dict[str, int] = {}  # task id -> most steps running at once
        self.running: dict[str, int] = {}  # task id -> steps running now
        self.max_running_total = 0  # most steps of all tasks running at once
        self.clashes = 0  # actors created under the name of one not yet confirmed dead
        self.ray = _FakeRay(self)
        self._seq = itertools.count()
        self._pids = itertools.count(4000)

    # -- the factory ------------------------------------------------------------------

    def procs(self, task_id: str) -> list[str]:
        """The actors (uids) the steps of ``task_id`` ran on, in order."""
        return [s.actor for s in self.of(task_id)]

    def __call__(self, name: str) -> FakeActor:
        if any(a.name == name and a.state != DEAD for a in self.actors):
            self.clashes += 1
            raise ValueError(f"The name {name} is already taken by a live actor")  # as Ray does
        actor = FakeActor(self, name, f"{name}#{len(self.actors)}", next(self._pids))
        self.actors.append(actor)
        self.max_alive = max(self.max_alive, self.alive())
        return actor

    def script(self, role: str, fn: Script) -> Script:
        self.scripts[role] = fn
        return fn

    def script_for(self, role: str) -> Script:
        fn = self.scripts.get(role, self.default)
        return fn if fn is not None else returns_role

    # -- what tests read ----------------------------------------------------------------

    def alive(self) -> int:
        return sum(1 for a in self.actors if a.state != DEAD)

    def actor(self, uid: str) -> FakeActor:
        return next(a for a in self.actors if a.uid == uid)

    def of(self, task_id: str | None = None, role: str | None = None) -> list[StepRecord]:
        return [s for s in self.steps if (task_id is None or s.task_id == task_id)
                and (role is None or s.role == role)]

    def one(self, task_id: str, role: str, round: int = 1, attempt: int = 1) -> StepRecord:
        found = [s for s in self.of(task_id, role) if s.round == round and s.attempt == attempt]
        assert len(found) == 1, f"expected one step {role} r{round} a{attempt} of {task_id}, got {found}"
        return found[0]

    def order(self, task_id: str) -> list[str]:
        """The roles of a task in the order their steps started."""
        return [s.role for s in self.of(task_id)]

    # -- bookkeeping --------------------------------------------------------------------

    def _started(self, actor: FakeActor, call: StepCall) -> StepRecord:
        req = call.req
        now = self.running[req.task_id] = self.running.get(req.task_id, 0) + 1
        self.max_running[req.task_id] = max(self.max_running.get(req.task_id, 0), now)
        self.max_running_total = max(self.max_running_total, sum(self.running.values()))
        rec = StepRecord(req.task_id, req.role, req.round, req.attempt, actor.uid, actor.pid,
                         call.ray_task_name, dict(req.outputs), list(req.feedback), now, next(self._seq))
        self.steps.append(rec)
        return rec

    def _ended(self, rec: StepRecord, how: str) -> None:
        rec.end, rec.how = next(self._seq), how
        self.running[rec.task_id] -= 1


async def hangs(call: StepCall) -> Any:
    """A script whose step never ends (until its actor is killed)."""
    await call.hang()


async def returns_role(call: StepCall) -> Any:
    """The default script: one token, then an output naming the role and round."""
    call.tokens(f"{call.role}{call.round} ")
    await asyncio.sleep(0)
    return f"{call.role}@{call.round}"


def fails_once(tokens: int = 3, clock_s: float = 0.25) -> Script:
    """A script that streams ``tokens`` tokens (their batch arriving ``clock_s`` into the
    step), fails its first attempt with a TransientError and succeeds on the next."""
    from threadbound.agents.errors import TransientError

    calls = {"n": 0}

    async def script(call: StepCall) -> str:
        call.tokens("x", tokens, clock_s=clock_s)
        calls["n"] += 1
        if calls["n"] == 1:
            raise TransientError("try again")
        return "done"

    return script

