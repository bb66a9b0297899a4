"""The client's one implementation, in asyncio, under ``AgentPool`` and ``TaskHandle``.

Every call awaits the supervisor's Ray ObjectRef on the caller's event loop; the sync
methods run the same coroutines on one private event loop per process (a daemon thread,
started on first use). Streams of one pool on one event loop share a follower: a single
``read_many`` long-poll carries every open cursor. Calls that may be repeated ride out a
supervisor restart.

Here: the call layer (:class:`_Client`, the background loop, :func:`_sync`) and the
per-loop registry through which the pool submits and opens streams; the followers and
their streams are in :mod:`.streams`, the burst submitter in :mod:`.submitter`.
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

from .errors import InvalidTask, PoolClosed
from .streams import _Follower, _Stream
from .submitter import _Submitter
from .task import result_or_raise

log = logging.getLogger("threadbound.pool")

_RECONNECT_S = 120.0  # how long a call waits for a restarting supervisor
_RETRY_S = 0.5  # pause between two tries while the supervisor restarts
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


_result = result_or_raise  # (the pool's name for it)
