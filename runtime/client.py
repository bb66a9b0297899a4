"""The client's one implementation, in asyncio, under ``AgentPool`` and ``TaskHandle``.

Every call awaits the supervisor's Ray ObjectRef on the caller's event loop; the sync
methods run the same coroutines on one private event loop per process (a daemon thread,
started on first use). Streams of one pool on one event loop share a follower: a single
``read_many`` long-poll carries every open cursor. Calls that may be repeated ride out a
supervisor restart.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
import weakref
from typing import Any, Callable, Coroutine, TypeVar

import ray
from ray.exceptions import RayActorError, RayTaskError

from threadbound.agents.errors import ThreadboundError
from threadbound.agents.events import Row

from .errors import InvalidTask, PoolClosed, TaskNotFound
from .task import TERMINAL, Event, result_or_raise

log = logging.getLogger("threadbound.pool")

_POLL_S = 10.0  # longest a single long-poll read waits inside the supervisor
_RECONNECT_S = 120.0  # how long a call waits for a restarting supervisor
_RETRY_S = 0.5  # pause between two tries while the supervisor restarts
_JOIN_S = 0.01  # after a stream opens, how long the follower waits for others opening with it...
_JOIN_MAX_S = 0.1  # ... at most, when they keep coming
_PACE_S = 0.01  # a follower sends at most one long-poll per this long (news piles up meanwhile)
_SUBMIT_MAX = 256  # tasks per submit_many call
_MAX_BUFFERED = 10_000  # events read for a stream but not taken: past this, it is left out of polls
# Supervisor calls that only wait: one the client gives up on is cancelled there too
# (never one that changes state: cut short, it could leave that change half done).
_WAITS = frozenset({"read", "read_many", "wait"})

_T = TypeVar("_T")


def _unwrap(exc: BaseException, pool: str = "?") -> BaseException:
    """Ray wraps errors raised in actors; hand the user our own error back."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, ThreadboundError):
        return cause
    if isinstance(exc, RayActorError):
        return PoolClosed(f"pool {pool!r}: its supervisor is gone (shut down, or crashed and not restarted)")
    return exc


class _Client:
    """How this process calls one pool's supervisor: ``await client.call("stats")``.

    A call that may be repeated (every one but ``submit``) rides out a supervisor
    restart: while the pool's name still resolves (Ray restarting the actor, which
    resumes from its snapshots), it is sent again to what the name resolves to, for up
    to ``_RECONNECT_S``. ``name`` is ``(pool name, namespace)``, or None for a bare handle.
    """

    def __init__(self, handle: Any, name: tuple[str, str] | None) -> None:
        self.handle = handle
        self.name = name

    @property
    def key(self) -> Any:
        """Which pool this is (its followers are shared by this key)."""
        return self.name if self.name is not None else self.handle

    def copy(self) -> "_Client":
        return _Client(self.handle, self.name)

    async def call(self, method: str, *args: Any, retry: bool = True) -> Any:
        """``handle.<method>.remote(*args)``, awaited; our own errors come back unwrapped."""
        pool = self.name[0] if self.name else "?"
        deadline = time.monotonic() + _RECONNECT_S
        warned = False
        while True:
            ref = getattr(self.handle, method).remote(*args)
            try:
                return await ref
            except asyncio.CancelledError:
                if method in _WAITS:  # e.g. an abandoned long-poll: free the supervisor's side too
                    _cancel_quietly(ref)
                raise
            except (RayTaskError, RayActorError) as exc:
                if not (retry and isinstance(exc, RayActorError)) or time.monotonic() > deadline:
                    raise _unwrap(exc, pool) from None
                handle = await asyncio.to_thread(self._resolve)
                if handle is None:
                    raise _unwrap(exc, pool) from None
                self.handle = handle
                if not warned:
                    log.warning("pool %r: supervisor unavailable (%s); waiting for Ray to restart it",
                                pool, type(exc).__name__)
                    warned = True
                await asyncio.sleep(_RETRY_S)

    def _resolve(self) -> Any:
        """The supervisor the pool's name resolves to now, or None."""
        if self.name is None:
            return None
        try:
            return ray.get_actor(self.name[0], namespace=self.name[1])
        except ValueError:
            return None


def _cancel_quietly(ref: Any) -> None:
    try:
        ray.cancel(ref)
    except Exception:  # already finished, or Ray is going away: nothing to free
        pass


_loop_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None
_loop_thread: threading.Thread | None = None
_loop_pid: int | None = None


def _background_loop() -> asyncio.AbstractEventLoop:
    """This process's private event loop for sync callers, on a daemon thread started on
    first use (again in a forked child, which has no copy of the thread)."""
    global _loop, _loop_thread, _loop_pid
    with _loop_lock:
        if _loop is None or _loop_pid != os.getpid():
            _loop = asyncio.new_event_loop()
            _loop_thread = threading.Thread(target=_loop.run_forever, name="threadbound-client", daemon=True)
            _loop_thread.start()
            _loop_pid = os.getpid()
        return _loop


def _sync(coro: Coroutine[Any, Any, _T]) -> _T:
    """Run ``coro`` on the background loop and wait for it; an interrupt (Ctrl-C) cancels it."""
    loop = _background_loop()
    if threading.current_thread() is _loop_thread:
        coro.close()
        raise RuntimeError("a sync threadbound call was made on the client's own event loop; await the "
                           "async method instead")
    future = asyncio.run_coroutine_threadsafe(coro, loop)
    try:
        return future.result()
    except BaseException:
        future.cancel()  # a no-op once it has ended; after Ctrl-C it stops the call
        raise


def _check_offset(offset: Any) -> None:
    # Checked here: a bad cursor must fail its own stream, not the poll it would share.
    if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
        raise InvalidTask("from_offset", f"must be an integer >= 0, got {offset!r}")


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
                    answer = call.result()
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


class _Submitter:
    """Sends the tasks one event loop submits to one pool in the same turn of the loop
    in one ``submit_many`` call (a burst of submits is one round trip and one write to
    disk, not one each). Tasks with an idempotency key go in calls of their own: only
    those may be sent again across a supervisor restart. It lives while it has tasks to
    send (a later pool of the same name gets a new one, never an old handle)."""

    def __init__(self, client: _Client, on_idle: Callable[["_Submitter"], None]) -> None:
        self.client = client
        self.pending: list[tuple[Any, asyncio.Future]] = []
        self.sending: set[asyncio.Task] = set()
        self._on_idle = on_idle

    def submit(self, task: Any) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        if not self.pending:
            loop.call_soon(self._flush, loop)
        self.pending.append((task, fut))
        return fut

    def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        batch, self.pending = self.pending, []
        for retry in (True, False):
            group = [p for p in batch if (p[0].idempotency_key is not None) is retry]
            for i in range(0, len(group), _SUBMIT_MAX):
                send = loop.create_task(self._send(group[i:i + _SUBMIT_MAX], retry))
                self.sending.add(send)
                send.add_done_callback(self._sent)

    def _sent(self, send: asyncio.Task) -> None:
        self.sending.discard(send)
        if not self.sending and not self.pending:
            self._on_idle(self)

    async def _send(self, group: list[tuple[Any, asyncio.Future]], retry: bool) -> None:
        try:
            answers = await self.client.call("submit_many", [task for task, _ in group], retry=retry)
        except BaseException as exc:  # (cancelled too: the loop is closing) every caller learns it
            for _, fut in group:
                if not fut.done():
                    fut.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        for (_, fut), answer in zip(group, answers):
            if fut.done():
                continue  # its caller stopped waiting
            if isinstance(answer, BaseException):
                fut.set_exception(answer)
            else:
                fut.set_result(tuple(answer))


_E = TypeVar("_E")
_per_loop_lock = threading.Lock()
_followers: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[Any, _Follower]]" = (
    weakref.WeakKeyDictionary())
_submitters: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[Any, _Submitter]]" = (
    weakref.WeakKeyDictionary())


def _per_loop(registry: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[Any, _E]]", key: Any,
              make: Callable[[Callable[[_E], None]], _E]) -> _E:
    """The running event loop's entry for ``key`` in ``registry``; none: ``make(idle)``
    makes one, which calls ``idle(itself)`` once it has nothing left to do (it is then
    dropped, and the next caller gets a new one)."""
    loop = asyncio.get_running_loop()
    with _per_loop_lock:
        mine = registry.setdefault(loop, {})
        entry = mine.get(key)
        if entry is None:
            def idle(done: _E) -> None:
                with _per_loop_lock:
                    if mine.get(key) is done:
                        del mine[key]

            entry = mine[key] = make(idle)
    return entry


async def submit(client: _Client, task: Any) -> tuple[str, bool]:
    """Submit ``task`` along with the others this event loop submits through ``client``
    in the same turn: its ``(task id, created)``; an error that refused it is raised
    here, for it alone."""
    # Keyed by the client object (registered only while busy, so its id is not reused).
    submitter = _per_loop(_submitters, id(client), lambda idle: _Submitter(client, idle))
    return await submitter.submit(task)


def _open_stream(client: _Client, task_id: str, offset: int) -> _Stream:
    """A stream on the follower of ``client``'s pool on the running event loop."""
    follower = _per_loop(_followers, client.key, lambda idle: _Follower(client.copy(), idle))
    return follower.open(task_id, offset)


async def _aopen_stream(client: _Client, task_id: str, offset: int) -> _Stream:
    return _open_stream(client, task_id, offset)


def _event(task_id: str, row: Row | tuple) -> Event:
    """An event of the task from a row as the supervisor sends it: ``(offset, kind,
    agent, data, ts)``, a plain tuple or a Row."""
    offset, kind, agent, data, ts = row
    return Event(task_id=task_id, offset=offset, kind=kind, agent=agent, data=data, ts=ts)


_result = result_or_raise  # (the pool's name for it)
