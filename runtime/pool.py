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
from .errors import PoolClosed
from .handle import TaskHandle
from .lifecycle import _await_gone, _refuse_another_config, _running, _stop_ray, crashed_pool
from .metrics.server import check_port
from .policy import check as check_policy
from .registry import role_blobs
from .shards import Router, merge_health, merge_metrics, merge_resumed, merge_stats, merge_tasks, shard_name, task_shard
from .supervisor.allocator import allocator_name
from .task import TERMINAL, Task, TaskResult, TaskSummary

log = logging.getLogger("threadbound.pool")


class AgentPool:
    """The pool of agent actors, driven by one supervisor actor.

    Starts Ray if it is not running (or joins ``config.ray.address``), then creates
    the supervisor named ``config.name`` in ``config.ray.namespace``. If a pool of that
    name already runs with the same config, this attaches to it; with another config,
    it raises :class:`ConfigError` naming the settings that differ (attach to a running
    pool as it is with :meth:`attach`).

    With ``shards: N`` > 1 the pool is N supervisor actors (shard 0 named ``config.name``,
    shard k ``<name>/shard-<k>``), and this client is still one pool: ``submit`` picks a
    shard (by the idempotency key, else in turn), calls about a task go to the shard
    its id names, and ``tasks``, ``stats``, ``health`` and ``metrics_text`` merge every
    shard's answer (``runtime.shards``; docs/clusters.md).

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
            for k in range(config.shards if config.metrics.port else 1):  # shard k serves at port + k
                check_port(config.metrics.port + k if config.metrics.port else 0, config.metrics.host)
        if config.snapshots.enabled:
            _settle_layout(config, _resume)  # a history of another number of shards: before Ray
        owns_ray = connect_ray(config)
        from .actors import SupervisorActor, start_allocator, supervisor_options

        namespace = config.ray.namespace
        names = [shard_name(config.name, k) for k in range(config.shards)]
        if _resume:
            try:
                for name in names:
                    _await_gone(name, namespace)
            except PoolClosed:
                _stop_ray(owns_ray)
                raise
        existed = _running(config.name, namespace)
        # get_if_exists: a pool of this name that already runs is attached to, not replaced.
        # ``creator`` tells this client, in ``info``, whether it started the pool or joined it.
        creator = uuid.uuid4().hex
        # Several shards: the allocator of the pool's caps first (each shard finds it by name).
        allocator = start_allocator(config) if config.shards > 1 and not existed else None

        def start(k: int) -> _Client:
            handle = SupervisorActor.options(**supervisor_options(config, k)).remote(
                config, blobs, resume=_resume, creator=creator, shard=k)
            return _Client(handle, (names[k], namespace))

        clients = [start(0)]
        try:
            info = _sync(clients[0].call("info"))
            _refuse_another_config(config, info["config"])
            # The other shards once shard 0 has settled the location (a history of another
            # number of shards set aside or refused before any shard opens its own).
            clients += [start(k) for k in range(1, config.shards)]
            infos = [info, *_sync(_calls(clients[1:], "info"))]
        except ThreadboundError:  # e.g. a snapshot location held by another supervisor
            if not existed:  # ours, and it cannot serve; one we found is not ours to kill
                for c in clients:
                    ray.kill(c.handle, no_restart=True)
                if allocator is not None:
                    ray.kill(allocator, no_restart=True)
            _stop_ray(owns_ray)
            raise
        self._connected(clients, info, owns_ray, started=info.get("creator") == creator)
        self._allocator = allocator  # (a named actor that is not detached lives while its creator holds it)
        self.resumed = merge_resumed([i.get("resumed") for i in infos])
        self._gather("register_roles", blobs)
        if self.resumed and self.resumed.get("skipped"):
            log.error("resumed from an older snapshot; newer ones were refused: %s",
                      "; ".join(self.resumed["skipped"]))
        if config.prewarm:
            self._gather("prewarm")

    def _connected(self, clients: list[_Client], info: dict[str, Any], owns_ray: bool, *, started: bool) -> None:
        self._clients = clients
        self._client = clients[0]  # shard 0, named as the pool
        self._router = Router(len(clients))
        self._owns_ray = owns_ray
        #: True when this client started the pool; False when it joined one that ran already
        #: (``attach``, or a pool of the same name and config): only the client that started
        #: a pool stops it (:meth:`shutdown`), the others leave it running.
        self.started = started
        self.config: RuntimeConfig = info["config"]
        self.name: str = info["name"]
        self.resumed: dict[str, Any] | None = info.get("resumed")
        self._closed = False

    def _gather(self, method: str, *args: Any) -> list[Any]:
        """``method`` called on every shard at once; their answers in shard order."""
        return _sync(self._agather(method, *args))

    async def _agather(self, method: str, *args: Any) -> list[Any]:
        return await _calls(self._clients, method, *args)

    def _for(self, task_id: str) -> _Client:
        """The client of the shard that owns ``task_id``."""
        return self._clients[task_shard(task_id, len(self._clients))]

    @property
    def _sup(self) -> Any:
        """Shard 0's actor handle (for tests and tools that kill or probe it)."""
        return self._client.handle

    @property
    def _sups(self) -> list[Any]:
        """Every shard's actor handle, in shard order."""
        return [c.handle for c in self._clients]

    def handle(self, task_id: str) -> "TaskHandle":
        """A handle to the task ``task_id`` made here, without asking the supervisor
        (:meth:`task` asks first); a call on it for a task the pool does not know raises
        :class:`TaskNotFound` then. Its calls go to the shard the id names.

        Examples:
            >>> async for event in pool.handle("t00001-ab12").astream(5):   # doctest: +SKIP
            ...     print(event.offset, event.kind)
        """
        client = self._for(task_id)
        return TaskHandle(client.handle, task_id, client.name)

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
            # A pool of several shards: shard 0 names them all (each resolved by its name).
            clients = [client] + [_Client(_named(n, namespace), (n, namespace)) for n in info.get("shards", [])[1:]]
        except BaseException:
            _stop_ray(owns_ray)
            raise
        pool = cls.__new__(cls)
        pool._connected(clients, info, owns_ray, started=False)
        return pool

    @classmethod
    def resume(cls, location: str | os.PathLike, *, name: str | None = None,
               config: RuntimeConfig | None = None, agents: Mapping[str, Any] | None = None) -> "AgentPool":
        """Restart a crashed pool from the newest snapshot at ``location`` that verifies.

        Committed steps are not run again; the step that was in flight restarts from its
        beginning with its agent's last committed state; queued tasks keep their order;
        task ids and event offsets continue. ``location`` is the ``snapshot_dir`` (or a
        URL) the crashed pool wrote to, or its own ``<snapshot_dir>/<name>`` directory
        (a pool of several shards resumes all of them, each from its own directory);
        ``name`` picks a pool when several wrote there. Without ``config``, the crashed
        pool's own config (from the snapshot manifest) is used. If the newest snapshot
        is damaged, an older one is used and ``pool.resumed["skipped"]`` says why.

        Examples:
            >>> pool = AgentPool.resume(".threadbound/snapshots")          # doctest: +SKIP
            >>> [h.task_id for h in pool.unfinished()]                      # doctest: +SKIP
        """
        found = crashed_pool(os.fspath(location), name, (config or RuntimeConfig.from_env()).snapshots.key_file)
        if config is not None:  # (its history's shards: each shard resumes its own)
            found = config.replace(snapshot_dir=found.snapshot_dir, name=found.name, shards=found.shards)
        return cls(found, agents=agents, _resume=True)

    def unfinished(self) -> list["TaskHandle"]:
        """Handles of every task that has not ended (e.g. to follow them after a resume)."""
        return [self.handle(t.task_id) for t in self.tasks() if t.status not in TERMINAL]

    def snapshot(self) -> dict[str, Any]:
        """Write a snapshot now (every shard its own); returns what it cost (``bytes``,
        ``copy_ms``, ``write_ms``: with several shards, the total bytes, the slowest times,
        and each shard's cost under ``shards``)."""
        costs = self._gather("snapshot_now")
        if len(costs) == 1:
            return costs[0]
        return {**costs[0], "bytes": sum(c.get("bytes") or 0 for c in costs),
                "copy_ms": max(c.get("copy_ms") or 0 for c in costs),
                "write_ms": max(c.get("write_ms") or 0 for c in costs), "shards": costs}

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
        # Its key's shard, else the next shard in turn (see runtime.shards); a burst goes
        # as one call per shard.
        task_id, created = await submit(self._clients[self._router.shard_for(task)], task)
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
        return await self._for(task_id).call("task_summary", task_id)

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
        d = await self._for(task_id).call("wait", task_id, timeout)
        return None if d is None else TaskResult(**d)

    async def acancel(self, task_id: str) -> str:
        """Cancel the task ``task_id`` (as :meth:`TaskHandle.cancel`: a running step's actor
        is killed), for asyncio; returns its final status.

        Examples:
            >>> await pool.acancel("t00001-ab12")                     # doctest: +SKIP
            'cancelled'
        """
        return await self._for(task_id).call("cancel", task_id)

    def tasks(self) -> list[TaskSummary]:
        """Summaries of every task the pool remembers, oldest first."""
        return _sync(self.atasks())

    async def atasks(self) -> list[TaskSummary]:
        """``tasks`` for asyncio: ``rows = await pool.atasks()``."""
        return merge_tasks(await self._agather("tasks_summary"))

    def register(self, role: str, agent: Any) -> None:
        """Add or replace a role: an Agent subclass or ``"package.module:Class"``."""
        blobs = role_blobs({role: agent})
        self._gather("register_roles", {role: blobs[role]})

    def roles(self) -> list[str]:
        """The roles tasks of this pool may name."""
        return self.info()["roles"]

    def info(self) -> dict[str, Any]:
        """What the supervisor says about itself: ``name``, ``config``, ``roles``,
        ``started_at``, ``resumed``, ``metrics_url`` and ``pid`` (its process id on its
        node, e.g. to watch its memory or to see that Ray restarted it). With several
        shards, shard 0's, plus ``shard`` (0) and ``shards``: every shard's actor name.

        Examples:
            >>> psutil.Process(pool.info()["pid"]).memory_info().rss  # doctest: +SKIP
            187695104
        """
        return _sync(self._client.call("info"))

    def stats(self) -> dict[str, Any]:
        """Queue depth, task counts by status, every slot (owner, pid, alive, ...), and
        ``reads``: how many event reads the supervisor has served. With several shards,
        the counts summed over them and each shard's own stats (with its ``supervisor``
        name, ``pid`` and ``node``) under ``"shards"``."""
        return merge_stats(self._gather("stats"))

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
        return merge_health(await self._agather("health_report"))

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
        return merge_metrics(await self._agather("metrics_text"))

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
            _sync(asyncio.wait_for(_calls(self._clients, "shutdown", grace_s, retry=False, quiet=True), limit))
        except asyncio.TimeoutError:
            pass
        finally:
            handles = [c.handle for c in self._clients]
            if len(handles) > 1:
                handles.append(_named(allocator_name(self.name), self.config.ray.namespace, missing=None))
            for handle in handles:
                try:
                    ray.kill(handle, no_restart=True)
                except Exception:
                    pass
            self._stop_owned_ray()


async def _calls(clients: list[_Client], method: str, *args: Any, retry: bool = True,
                 quiet: bool = False) -> list[Any]:
    """``method`` called on each client's shard at once; the answers in order (``quiet``:
    an error is the answer instead of being raised)."""
    return list(await asyncio.gather(*(c.call(method, *args, retry=retry) for c in clients),
                                     return_exceptions=quiet))


_MISSING = object()


def _named(name: str, namespace: str, missing: Any = _MISSING) -> Any:
    """The actor named ``name``; raises :class:`PoolClosed` when there is none (or
    returns ``missing`` when given)."""
    try:
        return ray.get_actor(name, namespace=namespace)
    except ValueError:
        if missing is not _MISSING:
            return missing
        raise PoolClosed(f"no supervisor named {name!r} in namespace {namespace!r}: the pool is stopping or "
                         "one of its shards is gone; start it again") from None


def _settle_layout(config: RuntimeConfig, resume: bool) -> None:
    """Refuse, before Ray starts, a pool whose location holds a history made with another
    number of shards (or set that history aside when it left nothing unfinished: see
    ``runtime.supervisor.layout``). A location this process cannot read is left to the
    pool's shard 0, which checks again."""
    from threadbound.snapshots import SnapshotError

    from .supervisor.layout import settle_layout

    try:
        settle_layout(config, resume=resume)
    except (SnapshotError, OSError) as exc:
        log.debug("the snapshot location is checked by the supervisor: %s", exc)
