"""A person in the loop, as the supervisor serves it: answers to a task's input
requests (an agent's ``ctx.interrupt``, or the approval before apply), messages sent
to a running task, and how long a task may wait for a person.

A task whose run stopped to wait holds no slot (its run state is
:attr:`~.task_state.RunState.PARKED`); an answer queues it again, and the step that
asked runs again from its beginning with the answer. The first answer to a request
wins; a late one is refused saying so. A task waits at most its ``wait_timeout_s`` (on
the wall clock, so the wait goes on across a restart of the supervisor), then ends
``timed_out``.
"""

from __future__ import annotations

import json
import math
from typing import Any, Awaitable, Callable

from threadbound.agents import events as ev

from ..config import RuntimeConfig
from ..errors import InputNotExpected, InvalidInput
from ..task import MAX_SECONDS, TERMINAL, TIMED_OUT, WAITING
from .attempt import plain
from .clock import Clock
from .rounds import decision
from .shard import TaskShard
from .task_state import RunState, TaskRecord

MAX_INPUT_BYTES = 64 * 1024  # a response or a message, as JSON


def check_input(name: str, value: Any) -> None:
    """A response or a message: plain data (it is an event), at most MAX_INPUT_BYTES as JSON."""
    if not plain(value):
        raise InvalidInput(name, f"must be plain data (text, numbers, true/false, null, lists, maps with "
                                 f"text keys), got {type(value).__name__}")
    try:
        size = len(json.dumps(value, allow_nan=False))
    except ValueError:
        raise InvalidInput(name, "holds a number that is not finite (Infinity or NaN); JSON has none") from None
    if size > MAX_INPUT_BYTES:
        raise InvalidInput(name, f"is {size} bytes as JSON; at most {MAX_INPUT_BYTES} are taken (send a path "
                                 "or a link for more)")


def open_requests(ts: TaskRecord) -> str:
    """``#1 from reviewer, #2 from the approval``: the task's open input requests."""
    return ", ".join(f"#{r} from {a['role'] or 'the approval'}" for r, a in sorted(ts.asks.items()))


def answered_since_wait(ts: TaskRecord) -> bool:
    """A request the task began waiting for has been answered since (it should run)."""
    return any(r not in ts.asks for r in ts.waiting_for)


class PersonInTheLoop:
    """Answers, messages and wait timers for the tasks of one shard.

    ``requeue(ts)`` queues a parked task again; ``finish(ts, status, **data)`` ends a
    task; ``barrier()`` returns once what was recorded is durable.
    """

    def __init__(self, cfg: RuntimeConfig, shard: TaskShard, clock: Clock, *,
                 requeue: Callable[[TaskRecord], None], finish: Callable[..., None],
                 barrier: Callable[[], Awaitable[None]]) -> None:
        self.cfg, self.shard, self.clock = cfg, shard, clock
        self.requeue, self.finish, self.barrier = requeue, finish, barrier

    async def respond(self, task_id: str, value: Any, request: int | None = None) -> int:
        """Answer the task's open input request (the only one, or ``request``); returns
        the offset of the ``input_received`` event. The first answer wins; a late one,
        or one to a task not waiting, raises :class:`InputNotExpected`."""
        ts = self.shard.get(task_id)
        rid = self._open_request(ts, request)
        ask = ts.asks[rid]
        check_input("value", value)
        if ask["role"] is None and decision(value) is None:
            raise InvalidInput("value", f"request #{rid} of task {ts.id} asks to approve a change; answer true "
                               '(approve), false or {"approve": false, "reason": "..."} (reject), or a text: '
                               f"feedback for another round; got {value!r:.80}", task_id=ts.id)
        self.shard.emit(ts, ev.INPUT_RECEIVED, ask["role"], request=rid, round=ask["round"], value=value)
        offset = len(ts.events) - 1
        if ts.status == WAITING and ts.run.state is RunState.PARKED:  # its run had stopped: queue it again
            self.disarm(ts)
            self.requeue(ts)
        await self.barrier()  # answered = on disk
        return offset

    async def send(self, task_id: str, message: Any) -> int:
        """Append ``message`` to the task's inbox (a ``message_received`` event); every
        later step of its agents sees it in ``ctx.inbox``. Returns the event's offset."""
        ts = self.shard.get(task_id)
        if ts.status in TERMINAL:
            raise InputNotExpected(f"task {ts.id} has ended ({ts.status}); messages reach only tasks that have "
                                   "not ended", task_id=ts.id)
        check_input("message", message)
        self.shard.emit(ts, ev.MESSAGE_RECEIVED, None, n=len(ts.inbox), message=message)
        offset = len(ts.events) - 1
        await self.barrier()
        return offset

    def _open_request(self, ts: TaskRecord, request: int | None) -> int:
        """The request a response is for, or :class:`InputNotExpected` saying why none is."""
        def late(rid: int) -> InputNotExpected:
            err = InputNotExpected(
                f"request #{rid} of task {ts.id} was already answered (input_received at offset "
                f"{ts.answered[rid]}); the first response wins, this one was not delivered"
                + (f" (the task has since ended: {ts.status})" if ts.status in TERMINAL else ""), task_id=ts.id)
            err.request = rid
            return err

        if request is not None and (isinstance(request, bool) or not isinstance(request, int)):
            raise InvalidInput("request", f"must be a request number (1, 2, ...), got {request!r:.40}",
                               task_id=ts.id)
        if request is not None and request in ts.answered:
            raise late(request)
        if request is None and not ts.asks and ts.answered:
            raise late(max(ts.answered))
        if ts.status in TERMINAL:
            raise InputNotExpected(f"task {ts.id} has ended ({ts.status}); nothing waits for input", task_id=ts.id)
        if request is not None:
            if request not in ts.asks:
                raise InputNotExpected(f"task {ts.id} has no request #{request} "
                                       f"(open: {', '.join(f'#{r}' for r in sorted(ts.asks)) or 'none'})",
                                       task_id=ts.id)
            return request
        if not ts.asks:
            raise InputNotExpected(f"task {ts.id} has not asked for input (it is {ts.status}); answer it when it "
                                   "waits (status waiting, after an input_requested event)", task_id=ts.id)
        if len(ts.asks) > 1:
            raise InputNotExpected(f"task {ts.id} waits for {len(ts.asks)} answers ({open_requests(ts)}); say "
                                   "which one with request=N (threadbound respond --request N)", task_id=ts.id)
        return next(iter(ts.asks))

    # -- how long a task waits ------------------------------------------------------------

    def limit(self, ts: TaskRecord) -> float:
        """The task's wait_timeout_s, in seconds; one it should never have been given (too
        large for a float, not finite, past MAX_SECONDS) counts as the config's."""
        fallback = float(self.cfg.wait_timeout_s)
        try:
            value = float(ts.spec.wait_timeout_s or fallback)
        except (OverflowError, TypeError, ValueError):
            return fallback
        return value if math.isfinite(value) and 0 < value <= MAX_SECONDS else fallback

    def arm(self, ts: TaskRecord) -> None:
        """End the waiting task ``timed_out`` when its wait_timeout_s passes (wall clock:
        the wait goes on across a restart of the supervisor)."""
        self.disarm(ts)
        now = self.clock.time()
        since = ts.waiting_since or now
        ts.run.wait_timer = self.clock.call_later(max(0.0, since + self.limit(ts) - now), self._expired, ts.id)

    def disarm(self, ts: TaskRecord) -> None:
        timer, ts.run.wait_timer = ts.run.wait_timer, None
        if timer is not None:
            timer.cancel()

    def _expired(self, task_id: str) -> None:
        ts = self.shard.tasks.get(task_id)
        if ts is None or ts.status != WAITING or ts.run.state is not RunState.PARKED:
            return
        ts.run.wait_timer = None
        limit = self.limit(ts)
        self.finish(ts, TIMED_OUT, reason="wait_timeout", limit_s=limit,
                    error=f"task {ts.id} waited {limit:g}s for a person's input ({open_requests(ts) or 'none open'}) "
                          "and got none (wait_timeout_s); answer sooner, or give the task a longer wait_timeout_s")
