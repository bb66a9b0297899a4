"""``AgentPool`` and ``TaskHandle``: the thin client side of the supervisor actor.

Several clients (this process, another process, the CLI, the gateway) attach to one
supervisor by its name; all state lives in the supervisor. The calls themselves are
made by ``runtime.client`` (one asyncio implementation; the sync methods run it on a
private event loop), and Ray is joined by ``runtime.connect``. ``TaskHandle`` lives in
``runtime.handle``; finding, refusing and resuming a supervisor by name in
``runtime.lifecycle``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from typing import Any, Mapping

import ray

from threadbound.agents.errors import ThreadboundError

from .config import RayConfig, RuntimeConfig
from .client import _Client, _sync, submit
from .connect import _bootstrap, connect_ray  # noqa: F401  (connect_ray: part of this module's API)
from .errors import ConfigError, PoolClosed
from .handle import TaskHandle
from .lifecycle import _await_gone, _crashed_config, _refuse_another_config, _running, _stop_ray
from .metrics.server import check_port
from .policy import check as check_policy
from .registry import role_blobs
from .task import TERMINAL, Task, TaskResult, TaskSummary

log = logging.getLogger("threadbound.pool")


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
