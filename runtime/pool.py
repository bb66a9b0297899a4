"""``AgentPool`` and ``TaskHandle``: the thin client side of the supervisor actor.

Several clients (this process, another process, the CLI, the gateway) attach to one
supervisor by its name; all state lives in the supervisor. The calls themselves are
made by ``runtime.client`` (one asyncio implementation; the sync methods run it on a
private event loop), and Ray is joined by ``runtime.connect``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
from typing import Any, AsyncIterator, Iterator, Mapping

import ray
from ray.exceptions import RayActorError, RayTaskError

from threadbound.agents.errors import ThreadboundError

from .config import RayConfig, RuntimeConfig
from .client import _aopen_stream, _check_offset, _Client, _open_stream, _result, _sync, submit
from .connect import _bootstrap, connect_ray  # noqa: F401  (connect_ray: part of this module's API)
from .errors import ConfigError, PoolClosed, ResultTimeout
from .metrics.server import check_port
from .policy import check as check_policy
from .registry import role_blobs
from .task import TERMINAL, Event, Task, TaskResult, TaskSummary

log = logging.getLogger("threadbound.pool")

def _await_gone(name: str, namespace: str, timeout_s: float = 30.0) -> None:
    """Wait until no supervisor named ``name`` lives (a crashed one may take a moment
    to be reaped); refuse if one is alive and answering."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            handle = ray.get_actor(name, namespace=namespace)
        except ValueError:
            return
        try:
            ray.get(handle.info.remote(), timeout=2)
        except (RayActorError, ray.exceptions.GetTimeoutError):
            pass  # dying
        except RayTaskError:
            raise PoolClosed(f"pool {name!r} has a supervisor that cannot serve; stop it with "
                             f"ray.kill(ray.get_actor({name!r}, namespace={namespace!r})) first") from None
        else:
            raise PoolClosed(f"pool {name!r} is running (Ray may have restarted and resumed it already); attach "
                             f"to it with AgentPool.attach({name!r}, namespace={namespace!r}) instead of resuming")
        if time.monotonic() > deadline:
            raise PoolClosed(f"pool {name!r}: the crashed supervisor is still being reaped after {timeout_s:.0f}s")
        time.sleep(0.2)


def _running(name: str, namespace: str) -> bool:
    """A supervisor named ``name`` exists (alive or restarting)."""
    try:
        ray.get_actor(name, namespace=namespace)
    except ValueError:
        return False
    return True


def _stop_ray(owned: bool) -> None:
    if owned:
        ray.shutdown()


# How a client reaches Ray, not how the pool runs: its clients may differ there.
_CLIENT_SIDE = frozenset({"ray.address", "ray.num_cpus"})
_UNSET = "(not set)"


def _leaves(value: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """``(dotted.path, value)`` for every setting in a dumped config."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _leaves(item, f"{path}.{key}" if path else str(key))
    else:
        yield path, value


def _refuse_another_config(config: RuntimeConfig, running: RuntimeConfig) -> None:
    """Raise :class:`ConfigError` naming every setting in which ``config`` differs from
    the config the pool of the same name already runs with."""
    mine, theirs = dict(_leaves(config.model_dump())), dict(_leaves(running.model_dump()))
    differ = [(path, mine.get(path, _UNSET), theirs.get(path, _UNSET)) for path in {**mine, **theirs}
              if path not in _CLIENT_SIDE and mine.get(path, _UNSET) != theirs.get(path, _UNSET)]
    if not differ:
        return

    def show(value: Any) -> str:
        text = value if value is _UNSET else repr(value)
        return text if len(text) <= 60 else text[:57] + "..."

    name, namespace = config.name, config.ray.namespace
    where = "" if namespace == RayConfig().namespace else f", namespace={namespace!r}"
    problems = [(path, f"{show(a)} in this config, {show(b)} in the running pool") for path, a, b in differ]
    problems.append(("name", f"a pool named {name!r} already runs in namespace {namespace!r} with the settings "
                             f"above; use it as it is with AgentPool.attach({name!r}{where}), or stop it "
                             "first, or choose another name"))
    raise ConfigError(f"pool {name!r}", problems)


def _crashed_config(location: str, key_file: str | None) -> RuntimeConfig:
    """The config a crashed pool ran with (from its newest verified manifest), with
    ``snapshot_dir`` and ``name`` pointing at ``location``."""
    from threadbound.snapshots import NoSnapshot, SnapshotLocation, load_key, open_store

    manifest = SnapshotLocation(open_store(location, create=False), load_key(key_file)).newest_verified()
    cfg = RuntimeConfig.from_mapping(manifest.get("config") or {}, source=f"{location} (newest manifest)")
    parent, _, base = location.rstrip("/").rpartition("/")
    if base != cfg.name:
        raise NoSnapshot(location, f"holds the snapshots of pool {cfg.name!r}, but the directory is "
                                   f"named {base!r}; rename it back to {cfg.name!r}")
    return cfg.replace(snapshot_dir=parent or "/")


class TaskHandle:
    """A submitted task: stream its events, wait for its result, cancel it.

    ``stream``, ``result``, ``cancel``, ``respond`` and ``send`` have asyncio twins
    (``astream``, ``aresult``, ``acancel``, ``arespond``, ``asend``); the sync methods
    run the same coroutines on this process's client loop. A supervisor restart is ridden out: a stream continues at the offset after
    the last event it yielded.

    ``created`` is False when ``submit`` returned a task its idempotency key had
    already made (True otherwise, and for handles from ``pool.task``).

    Examples:
        >>> handle = pool.submit(Task(goal="fix it", agents=["coder"]))   # doctest: +SKIP
        >>> for event in handle.stream():                                # doctest: +SKIP
        ...     print(event.offset, event.kind, event.agent, event.data)
        >>> handle.result(timeout=60).outputs["coder"]                    # doctest: +SKIP
    """

    def __init__(self, supervisor: Any, task_id: str, name: tuple[str, str] | None = None) -> None:
        # name = (pool name, namespace): lets calls ride out a supervisor restart
        self._client = _Client(supervisor, name)
        self.task_id = task_id
        self.created = True

    def __repr__(self) -> str:
        return f"TaskHandle({self.task_id!r})"

    @property
    def status(self) -> str:
        """pending, admitted, running, succeeded, failed, cancelled or timed_out."""
        return self.summary().status

    def summary(self) -> TaskSummary:
        """The task's row of ``pool.tasks()``: status, round, event count, error."""
        return _sync(self._client.call("task_summary", self.task_id))

    def stream(self, from_offset: int = 0) -> Iterator[Event]:
        """Every event from ``from_offset`` on, in order, following live until the task ends.

        Reconnecting with the offset after the last one seen continues exactly there.
        Events come from this process's client loop a batch at a time.

        Examples:
            >>> kinds = [e.kind for e in handle.stream()]                # doctest: +SKIP
            >>> kinds[-1]                                                # doctest: +SKIP
            'succeeded'
        """
        _check_offset(from_offset)
        stream = _sync(_aopen_stream(self._client, self.task_id, from_offset))
        try:
            while (events := _sync(stream.take())) is not None:
                for event in events:
                    yield event
                    if event.terminal:
                        return
        finally:
            with contextlib.suppress(RuntimeError):  # the loop is gone (interpreter exit)
                stream.follower.loop.call_soon_threadsafe(stream.close)

    async def astream(self, from_offset: int = 0) -> AsyncIterator[Event]:
        """``stream`` for asyncio: ``async for event in handle.astream(): ...``

        Streams of one pool on one event loop share a single long-poll.
        """
        _check_offset(from_offset)
        stream = _open_stream(self._client, self.task_id, from_offset)
        try:
            while (events := await stream.take()) is not None:
                for event in events:
                    yield event
                    if event.terminal:
                        return
        finally:
            stream.close()

    def result(self, timeout: float | None = None) -> TaskResult:
        """Wait for the task to end and return its result.

        Raises :class:`TaskFailed`, :class:`TaskTimedOut` or :class:`TaskCancelled`
        (each with ``.result``; a cancellation's ``.reason`` says why) if it did not
        succeed, and :class:`ResultTimeout` if ``timeout`` seconds pass first (the task
        keeps running).
        """
        return _sync(self.aresult(timeout))

    async def aresult(self, timeout: float | None = None) -> TaskResult:
        """``result`` for asyncio: ``result = await handle.aresult(timeout=60)``."""
        d = await self._client.call("wait", self.task_id, timeout)
        if d is None:
            raise ResultTimeout(f"task {self.task_id} did not finish within {timeout}s; "
                                "it is still running: wait again or cancel it",
                                task_id=self.task_id, limit=timeout)
        return _result(d)

    # -- a person in the loop ---------------------------------------------------------

    def respond(self, value: Any, request: int | None = None) -> int:
        """Answer the task's question (an agent's ``ctx.interrupt``, or the approval of
        a task submitted with ``inputs={"approve": True}``); returns the offset of the
        ``input_received`` event. The step that asked runs again from its beginning and
        its ``ctx.interrupt`` returns ``value`` (plain data).

        ``request`` names the request (its number, from the ``input_requested`` event)
        when several are open. Raises :class:`InputNotExpected` when the task is not
        waiting for input or the request was already answered (the first answer wins).

        Examples:
            >>> for event in handle.stream():                               # doctest: +SKIP
            ...     if event.kind == "input_requested":
            ...         handle.respond({"use_cache": True})
        """
        return _sync(self.arespond(value, request))

    async def arespond(self, value: Any, request: int | None = None) -> int:
        """``respond`` for asyncio."""
        return await self._client.call("respond", self.task_id, value, request, retry=False)

    def approve(self, request: int | None = None) -> int:
        """Approve the change the task asks about (``inputs={"approve": True}``): it is
        applied (with ``inputs.apply``) and the task succeeds."""
        return self.respond({"approve": True}, request)

    def reject(self, reason: str = "", request: int | None = None) -> int:
        """Reject the change the task asks about: the task ends ``failed`` with ``reason``."""
        return self.respond({"approve": False, "reason": reason}, request)

    def send(self, message: Any) -> int:
        """Send input to the running task: appended to its inbox (a ``message_received``
        event, durable and in order); every later step of its agents sees the messages
        that arrived since that role's previous step in ``ctx.inbox``. Returns the
        event's offset. Raises :class:`InputNotExpected` if the task has ended."""
        return _sync(self.asend(message))

    async def asend(self, message: Any) -> int:
        """``send`` for asyncio."""
        return await self._client.call("send", self.task_id, message, retry=False)

    def cancel(self) -> str:
        """Cancel the task (a running step's actor is killed); returns the final status."""
        return _sync(self.acancel())

    async def acancel(self) -> str:
        """``cancel`` for asyncio: ``status = await handle.acancel()``."""
        return await self._client.call("cancel", self.task_id)


class AgentPool:
    """The pool of agent actors, driven by one supervisor actor.

    Starts Ray if it is not running (or joins ``config.ray.address``), then creates
    the supervisor named ``config.name`` in ``config.ray.namespace``. If a pool of that
    name already runs with the same config, this attaches to it; with another config,
    it raises :class:`ConfigError` naming the settings that differ (attach to a running
    pool as it is with :meth:`attach`).

    Args:
        config: a :class:`RuntimeConfig`; defaults to ``RuntimeConfig.from_env()``.
        agents: extra roles, ``{"role": AgentSubclass or "pkg.mod:Class"}``.

    Examples:
        >>> from threadbound.runtime import AgentPool, RuntimeConfig, Task   # doctest: +SKIP
        >>> with AgentPool(RuntimeConfig(max_agents=4)) as pool:                 # doctest: +SKIP
        ...     print(pool.submit(Task(goal="hello", agents=["coder"])).result().status)
        succeeded
    """

    def __init__(self, config: RuntimeConfig | None = None, *,
                 agents: Mapping[str, Any] | None = None, _resume: bool = False) -> None:
        config = config if config is not None else RuntimeConfig.from_env()
        config = config.with_absolute_paths()
        blobs = role_blobs(config.agents, agents)  # fail on bad roles before touching Ray
        if (config.ray.address is None and not os.environ.get("RAY_ADDRESS") and not ray.is_initialized()
                and config.metrics.enabled):
            # A local Ray of our own is about to start, so no supervisor of ours holds the port yet.
            check_port(config.metrics.port, config.metrics.host)
        owns_ray = connect_ray(config)
        from .actors import SupervisorActor, supervisor_options

        if _resume:
            try:
                _await_gone(config.name, config.ray.namespace)
            except PoolClosed:
                _stop_ray(owns_ray)
                raise
        existed = _running(config.name, config.ray.namespace)
        # get_if_exists: a pool of this name that already runs is attached to, not replaced.
        # ``creator`` tells this client, in ``info``, whether it started the pool or joined it.
        creator = uuid.uuid4().hex
        handle = SupervisorActor.options(**supervisor_options(config)).remote(config, blobs, resume=_resume,
                                                                            creator=creator)
        client = _Client(handle, (config.name, config.ray.namespace))
        try:
            info = _sync(client.call("info"))
        except ThreadboundError:  # e.g. a snapshot location held by another supervisor
            if not existed:  # ours, and it cannot serve; one we found is not ours to kill
                ray.kill(handle, no_restart=True)
            _stop_ray(owns_ray)
            raise
        try:
            _refuse_another_config(config, info["config"])
        except ConfigError:
            _stop_ray(owns_ray)
            raise
        self._connected(client, info, owns_ray, started=info.get("creator") == creator)
        _sync(client.call("register_roles", blobs))
        if self.resumed and self.resumed.get("skipped"):
            log.error("resumed from an older snapshot; newer ones were refused: %s",
                      "; ".join(self.resumed["skipped"]))
        if config.prewarm:
            _sync(client.call("prewarm"))

    def _connected(self, client: _Client, info: dict[str, Any], owns_ray: bool, *, started: bool) -> None:
        self._client = client
        self._owns_ray = owns_ray
        #: True when this client started the pool; False when it joined one that ran already
        #: (``attach``, or a pool of the same name and config): only the client that started
        #: a pool stops it (:meth:`shutdown`), the others leave it running.
        self.started = started
        self.config: RuntimeConfig = info["config"]
        self.name: str = info["name"]
        self.resumed: dict[str, Any] | None = info.get("resumed")
        self._closed = False

    @property
    def _sup(self) -> Any:
        """The supervisor's actor handle (for tests and tools that kill or probe it)."""
        return self._client.handle

    def handle(self, task_id: str) -> "TaskHandle":
        """A handle to the task ``task_id`` made here, without asking the supervisor
        (:meth:`task` asks first); a call on it for a task the pool does not know raises
        :class:`TaskNotFound` then.

        Examples:
            >>> async for event in pool.handle("t00001-ab12").astream(5):   # doctest: +SKIP
            ...     print(event.offset, event.kind)
        """
        return TaskHandle(self._client.handle, task_id, self._client.name)

    def _stop_owned_ray(self) -> None:
        _stop_ray(self._owns_ray)

    @classmethod
    def attach(cls, name: str = "threadbound", *, namespace: str | None = None,
               address: str | None = None) -> "AgentPool":
        """A client of the pool ``name`` that is already running, with that pool's own config.

        Joins Ray as :func:`connect_ray` does unless Ray is initialised here: ``address``,
        else the Ray running on this machine (``RAY_ADDRESS`` or ``ray start``).
        ``namespace`` defaults to ``threadbound``. Raises :class:`PoolClosed` naming the
        pool and the namespace when no such pool runs. ``close()`` (and ``shutdown()``,
        and leaving a ``with`` block) detaches and leaves the pool running: only the client
        that started it stops it; ``shutdown(stop_joined=True)`` stops it for all its clients.

        Examples:
            >>> pool = AgentPool.attach("nightly", address="auto")   # doctest: +SKIP
            >>> [t.status for t in pool.tasks()]                      # doctest: +SKIP
            ['running', 'pending']
        """
        namespace = namespace or RayConfig().namespace
        owns_ray = False
        if not ray.is_initialized():
            target = address or "auto"
            if target == "auto" and _bootstrap(target) is None:
                raise PoolClosed(f"no pool named {name!r} in namespace {namespace!r}: no Ray is running on this "
                                 "machine; pass address= of the cluster the pool runs on")
            owns_ray = connect_ray(RuntimeConfig.from_mapping(
                {"name": name, "ray": {"address": target, "namespace": namespace}}, source="AgentPool.attach"))
        try:
            handle = ray.get_actor(name, namespace=namespace)
        except ValueError:
            _stop_ray(owns_ray)
            raise PoolClosed(f"no pool named {name!r} in namespace {namespace!r}; start one with "
                             "AgentPool(config), or check the name, the namespace and the Ray address") from None
        client = _Client(handle, (name, namespace))
        try:
            info = _sync(client.call("info"))
        except BaseException:
            _stop_ray(owns_ray)
            raise
        pool = cls.__new__(cls)
        pool._connected(client, info, owns_ray, started=False)
        return pool

    @classmethod
    def resume(cls, location: str | os.PathLike, *, name: str | None = None,
               config: RuntimeConfig | None = None, agents: Mapping[str, Any] | None = None) -> "AgentPool":
        """Restart a crashed pool from the newest snapshot at ``location`` that verifies.

        Committed steps are not run again; the step that was in flight restarts from its
        beginning with its agent's last committed state; queued tasks keep their order;
        task ids and event offsets continue. ``location`` is the ``snapshot_dir`` (or a
        URL) the crashed pool wrote to, or its own ``<snapshot_dir>/<name>`` directory;
        ``name`` picks a pool when several wrote there. Without ``config``, the crashed
        pool's own config (from the snapshot manifest) is used. If the newest snapshot
        is damaged, an older one is used and ``pool.resumed["skipped"]`` says why.

        Examples:
            >>> pool = AgentPool.resume(".threadbound/snapshots")          # doctest: +SKIP
            >>> [h.task_id for h in pool.unfinished()]                      # doctest: +SKIP
        """
        from threadbound.snapshots.location import find_location

        where = find_location(os.fspath(location), name)
        found = _crashed_config(where, (config or RuntimeConfig.from_env()).snapshots.key_file)
        if config is not None:
            found = config.replace(snapshot_dir=found.snapshot_dir, name=found.name)
        return cls(found, agents=agents, _resume=True)

    def unfinished(self) -> list["TaskHandle"]:
        """Handles of every task that has not ended (e.g. to follow them after a resume)."""
        return [self.handle(t.task_id) for t in self.tasks() if t.status not in TERMINAL]

    def snapshot(self) -> dict[str, Any]:
        """Write a snapshot now; returns what it cost (``bytes``, ``copy_ms``, ``write_ms``)."""
        return _sync(self._client.call("snapshot_now"))

    @classmethod
    def from_config(cls, path: str | os.PathLike, *, agents: Mapping[str, Any] | None = None) -> "AgentPool":
        """A pool configured by a YAML file (with ``THREADBOUND_*`` overrides applied)."""
        return cls(RuntimeConfig.from_yaml(path), agents=agents)

    def __enter__(self) -> "AgentPool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()  # stops the pool only if this client started it

    # -- tasks ------------------------------------------------------------------------

    def submit(self, task: Task) -> TaskHandle:
        """Queue a task; returns at once with its handle. Bad input raises here."""
        return _sync(self.asubmit(task))

    async def asubmit(self, task: Task) -> TaskHandle:
        """``submit`` for asyncio: ``handle = await pool.asubmit(task)``.

        Without an ``idempotency_key``, not sent again if the supervisor crashes
        meanwhile (it may have accepted the task): that raises :class:`PoolClosed`; look
        for the task in ``tasks()``. With one, it is sent again, which is safe: the
        handle then says ``created is False`` if the first send had been accepted.
        """
        # Validated here, before a round trip: the workspace becomes absolute against this
        # process's directory, not the supervisor's (a joined Ray's workers run elsewhere).
        task = self.config.validate_task(task)
        check_policy(task, self.config.policy)
        task_id, created = await submit(self._client, task)
        handle = self.handle(task_id)
        handle.created = created
        return handle

    def task(self, task_id: str) -> TaskHandle:
        """A handle to a task already submitted (by any client of this pool)."""
        _sync(self.asummary(task_id))  # raises TaskNotFound
        return self.handle(task_id)

    async def asummary(self, task_id: str) -> TaskSummary:
        """The task's row of :meth:`tasks` (status, round, event count, error), for
        asyncio; raises :class:`TaskNotFound` for a task the pool does not know (or has
        forgotten: ``keep_finished_tasks``).

        Examples:
            >>> (await pool.asummary("t00001-ab12")).status          # doctest: +SKIP
            'running'
        """
        return await self._client.call("task_summary", task_id)

    async def await_result(self, task_id: str, timeout: float | None = None) -> TaskResult | None:
        """Wait up to ``timeout`` seconds (None: until it ends) for the task to end; its
        :class:`TaskResult` whatever the status, or None if it has not ended by then.

        Unlike :meth:`TaskHandle.aresult`, neither a task that did not succeed
        (``result.ok`` says so) nor the time running out raises: this is for callers
        that report a task's outcome rather than act on it, such as the gateway.

        Examples:
            >>> result = await pool.await_result("t00001-ab12", timeout=30)   # doctest: +SKIP
            >>> "still running" if result is None else result.status          # doctest: +SKIP
            'failed'
        """
        d = await self._client.call("wait", task_id, timeout)
        return None if d is None else TaskResult(**d)

    async def acancel(self, task_id: str) -> str:
        """Cancel the task ``task_id`` (as :meth:`TaskHandle.cancel`: a running step's actor
        is killed), for asyncio; returns its final status.

        Examples:
            >>> await pool.acancel("t00001-ab12")                     # doctest: +SKIP
            'cancelled'
        """
        return await self._client.call("cancel", task_id)

    def tasks(self) -> list[TaskSummary]:
        """Summaries of every task the pool remembers, oldest first."""
        return _sync(self.atasks())

    async def atasks(self) -> list[TaskSummary]:
        """``tasks`` for asyncio: ``rows = await pool.atasks()``."""
        return await self._client.call("tasks_summary")

    def register(self, role: str, agent: Any) -> None:
        """Add or replace a role: an Agent subclass or ``"package.module:Class"``."""
        blobs = role_blobs({role: agent})
        _sync(self._client.call("register_roles", {role: blobs[role]}))

    def roles(self) -> list[str]:
        """The roles tasks of this pool may name."""
        return self.info()["roles"]

    def info(self) -> dict[str, Any]:
        """What the supervisor says about itself: ``name``, ``config``, ``roles``,
        ``started_at``, ``resumed``, ``metrics_url`` and ``pid`` (its process id on its
        node, e.g. to watch its memory or to see that Ray restarted it).

        Examples:
            >>> psutil.Process(pool.info()["pid"]).memory_info().rss  # doctest: +SKIP
            187695104
        """
        return _sync(self._client.call("info"))

    def stats(self) -> dict[str, Any]:
        """Queue depth, task counts by status, every slot (owner, pid, alive, ...), and
        ``reads``: how many event reads the supervisor has served."""
        return _sync(self._client.call("stats"))

    def health(self) -> dict[str, Any]:
        """The pool's health: its mode, every signal with its threshold, recent transitions.

        ``mode`` is ``normal``, ``degraded`` (steps run at level 1 without streaming) or
        ``paused`` (as degraded, and nothing new is admitted). ``signals`` maps each
        signal to ``{"value", "threshold", "over"}``; ``recovers_in_s`` says how long
        the pool must stay healthy before it leaves its mode.

        Examples:
            >>> pool.health()["mode"]  # doctest: +SKIP
            'normal'
        """
        return _sync(self.ahealth())

    async def ahealth(self) -> dict[str, Any]:
        """``health`` for asyncio: ``mode = (await pool.ahealth())["mode"]``."""
        return await self._client.call("health_report")

    def metrics_text(self) -> str:
        """The pool's metrics in Prometheus text format, as its ``/metrics`` endpoint
        serves them, read through the supervisor (no port to reach). Raises
        :class:`PoolClosed` when the pool records none (``metrics.enabled: false``).

        Examples:
            >>> [line for line in pool.metrics_text().splitlines()       # doctest: +SKIP
            ...  if line.startswith("threadbound_queue_depth")]
            ['threadbound_queue_depth{pool="threadbound"} 0.0']
        """
        return _sync(self.ametrics_text())

    async def ametrics_text(self) -> str:
        """``metrics_text`` for asyncio: ``text = await pool.ametrics_text()``."""
        return await self._client.call("metrics_text")

    # -- lifecycle ------------------------------------------------------------------

    def close(self) -> None:
        """Detach this client; the supervisor and its tasks keep running."""
        self._closed = True

    def shutdown(self, grace_s: float | None = None, *, stop_joined: bool = False) -> None:
        """Stop the pool: cancel queued tasks, give running ones ``grace_s`` to finish,
        cancel the rest, kill every agent actor and the supervisor. Stops Ray too if
        this pool started it.

        Only the client that started the pool stops it (``pool.started``). A client that
        joined a running pool (:meth:`attach`, or ``AgentPool(config)`` finding the pool
        running) only detaches, as :meth:`close`, and the pool's other clients and their
        tasks go on; ``stop_joined=True`` stops it for every client all the same.

        Examples:
            >>> pool = AgentPool.attach("nightly", address="auto")   # doctest: +SKIP
            >>> pool.shutdown()                          # detaches: nightly keeps running
            >>> AgentPool.attach("nightly").shutdown(stop_joined=True)  # doctest: +SKIP
        """
        if self._closed:
            return
        if not self.started and not stop_joined:
            log.info("pool %r was started by another client: left running (shutdown(stop_joined=True) stops it)",
                     self.name)
            self.close()
            return
        self._closed = True
        limit = (grace_s or self.config.shutdown_grace_s) + 30
        try:
            _sync(asyncio.wait_for(self._client.call("shutdown", grace_s, retry=False), limit))
        except (PoolClosed, asyncio.TimeoutError):
            pass
        finally:
            try:
                ray.kill(self._client.handle, no_restart=True)
            except Exception:
                pass
            self._stop_owned_ray()
