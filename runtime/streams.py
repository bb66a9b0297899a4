"""Following tasks' event logs: the streams of one pool on one event loop share a follower,
and a single ``read_many`` long-poll carries every open cursor (see :mod:`.client`, which
opens them through its per-loop registry)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Callable

from threadbound.agents.events import Row
from threadbound.agents.wire import unpack

from .errors import PoolClosed, TaskNotFound
from .task import TERMINAL, Event

if TYPE_CHECKING:
    from .client import _Client

_POLL_S = 10.0  # longest a single long-poll read waits inside the supervisor
_JOIN_S = 0.01  # after a stream opens, how long the follower waits for others opening with it...
_JOIN_MAX_S = 0.1  # ... at most, when they keep coming
_PACE_S = 0.01  # a follower sends at most one long-poll per this long (news piles up meanwhile)
_MAX_BUFFERED = 10_000  # events read for a stream but not taken: past this, it is left out of polls


class _Stream:
    """One open stream of a task on a follower: the next offset it wants, and the events
    read for it but not taken yet. Used on the follower's event loop only."""

    def __init__(self, follower: "_Follower", task_id: str, offset: int) -> None:
        self.follower = follower
        self.task_id = task_id
        self.offset = offset
        self.events: list[Event] = []
        self.over = False  # nothing more will come: the terminal event was read, or an error
        self.error: BaseException | None = None
        self._ready = asyncio.Event()

    @property
    def full(self) -> bool:
        """Too many events wait to be taken: left out of polls until its reader catches up."""
        return len(self.events) >= _MAX_BUFFERED

    def put(self, events: list[Event]) -> None:
        """Events that continue this stream exactly at ``offset``."""
        self.events.extend(events)
        self.offset = events[-1].offset + 1
        self._ready.set()
        if events[-1].terminal:
            self.end()

    def end(self, error: BaseException | None = None) -> None:
        """Nothing more comes; the reader gets what is buffered, then ``error`` (if any)."""
        self.over, self.error = True, error
        self.follower.forget(self)
        self._ready.set()

    async def take(self) -> list[Event] | None:
        """Every event waiting (at least one), or None once the stream is over."""
        while not self.events and not self.over:
            self._ready.clear()
            await self._ready.wait()
        if self.events:
            was_full = self.full
            events, self.events = self.events, []
            if was_full:
                self.follower.wake()  # back into the polls
            return events
        if self.error is not None:
            raise self.error
        return None

    def close(self) -> None:
        """The reader stopped (it may stop early): stop reading for it."""
        self.over = True
        self.follower.forget(self)


class _Follower:
    """Follows every open stream of one pool on one event loop with a single long-poll.

    The poller sends ``read_many`` with the cursors of all open streams; the supervisor
    answers once any of those tasks has news, for all of them. When a stream opens
    while a poll is in flight, that call is abandoned (its answer dropped, the
    supervisor's side cancelled) and a new one carries every cursor, so a new stream
    never waits for another's poll to time out. A ``TaskNotFound`` ends only the
    streams of that task; any other error ends them all. The poller stops when no
    stream is open.
    """

    def __init__(self, client: _Client, on_idle: Callable[["_Follower"], None]) -> None:
        self.client = client
        self.loop = asyncio.get_running_loop()
        self.streams: dict[_Stream, None] = {}  # insertion-ordered set
        self.by_task: dict[str, list[_Stream]] = {}  # task id -> its open streams (an answer is read by task)
        self._woken = asyncio.Event()
        self._poller: asyncio.Task | None = None
        self._on_idle = on_idle

    def open(self, task_id: str, offset: int) -> _Stream:
        stream = _Stream(self, task_id, offset)
        self.streams[stream] = None
        self.by_task.setdefault(task_id, []).append(stream)
        self.wake()
        if self._poller is None:
            self._poller = self.loop.create_task(self._poll(), name=f"threadbound/follow/{self.client.key}")
        return stream

    def forget(self, stream: _Stream) -> None:
        if stream in self.streams:
            del self.streams[stream]
            same = self.by_task.get(stream.task_id)
            if same is not None:
                same.remove(stream)
                if not same:
                    del self.by_task[stream.task_id]
            if not self.streams:
                self.wake()  # the poller drops its call and stops

    def wake(self) -> None:
        """Make the poller send a new call (streams joined, left or were drained)."""
        self._woken.set()

    async def _poll(self) -> None:
        call: asyncio.Task | None = None
        woken: asyncio.Task | None = None
        sent = float("-inf")
        try:
            while self.streams:
                pause = sent + _PACE_S - self.loop.time()
                if pause > 0:
                    await self._pause(pause)
                self._woken.clear()
                polled = [s for s in self.streams if not s.full]
                cursors: dict[str, int] = {}
                for s in polled:  # two streams of one task: read from the lower offset
                    cursors[s.task_id] = min(s.offset, cursors.get(s.task_id, s.offset))
                woken = self.loop.create_task(self._woken.wait())
                call = self.loop.create_task(self.client.call("read_many", cursors, _POLL_S)) if cursors else None
                sent = self.loop.time()
                await asyncio.wait([t for t in (woken, call) if t is not None], return_when=asyncio.FIRST_COMPLETED)
                _drop(woken)
                if call is None or not call.done():
                    _drop(call)  # abandoned: the next call carries every cursor
                    await self._settle()
                    continue
                try:
                    answer = unpack(call.result())  # packed by the supervisor (agents.wire)
                except TaskNotFound as exc:
                    for s in [s for s in polled if s.task_id == exc.task_id] or polled:
                        s.end(exc)
                    continue
                except Exception as exc:  # the pool is gone: every stream learns it
                    for s in list(self.streams):
                        s.end(exc)
                    continue
                await self._deliver(polled, answer)
        finally:
            _drop(call)
            _drop(woken)
            self._poller = None
            for s in list(self.streams):  # the poller was cancelled: its event loop is closing
                s.end(PoolClosed(f"stopped following task {s.task_id}: this client's event loop is closing",
                                 task_id=s.task_id))
            self._on_idle(self)

    async def _pause(self, pause: float) -> None:
        """Let news pile up for ``pause`` seconds before the next poll: a busy pool answers
        every poll at once, and one call then carries what would have taken several.
        A stream that opens (or drains) ends the pause: it is not kept waiting."""
        try:
            await asyncio.wait_for(self._woken.wait(), pause)
        except asyncio.TimeoutError:
            pass

    async def _settle(self) -> None:
        """Streams opened together share the next call: wait until none has joined for
        ``_JOIN_S`` (``_JOIN_MAX_S`` at most)."""
        deadline = self.loop.time() + _JOIN_MAX_S
        while self.streams and self.loop.time() < deadline:
            self._woken.clear()
            try:
                await asyncio.wait_for(self._woken.wait(), _JOIN_S)
            except asyncio.TimeoutError:
                return

    async def _deliver(self, polled: list[_Stream], answer: dict[str, tuple[list[Row], str]]) -> None:
        """Hand each polled stream the rows from its own offset on (rows start at the
        lowest cursor of their task, so nothing is skipped). Only the tasks in the answer
        are looked at: a poll that follows a thousand tasks costs what changed."""
        ended = []
        for task_id, (rows, status) in answer.items():
            for s in list(self.by_task.get(task_id, ())):
                if s.full or (rows and s.offset < rows[0][0]):
                    # left out of this poll (a stream opened since, from an earlier
                    # offset, or one too full): the next poll serves it
                    continue
                events = [_event(task_id, row) for row in rows if row[0] >= s.offset]
                if events:
                    s.put(events)
                elif status in TERMINAL:
                    ended.append(s)
        for s in ended:
            # Ended with nothing new: either its last events are not yet durable (they
            # come), or the stream asked past the end (nothing ever comes: stop it).
            try:
                summary = await self.client.call("task_summary", s.task_id)
            except Exception as exc:  # e.g. forgotten meanwhile (TaskNotFound)
                s.end(exc)
                continue
            if s in self.streams and s.offset >= summary.events:
                s.end()


def _drop(task: asyncio.Task | None) -> None:
    """Cancel a task whose result nobody wants (and mark a failure of it as seen)."""
    if task is None:
        return
    if task.done():
        if not task.cancelled():
            task.exception()
    else:
        task.cancel()


def _event(task_id: str, row: Row | tuple) -> Event:
    """An event of the task from a row as the supervisor sends it: ``(offset, kind,
    agent, data, ts)``, a plain tuple or a Row."""
    offset, kind, agent, data, ts = row
    return Event(task_id=task_id, offset=offset, kind=kind, agent=agent, data=data, ts=ts)
