"""The supervisor: one async actor that owns a pool's runtime state, wiring its parts.

A plain class, wrapped once by ``ray.remote`` in ``runtime.actors``; clients
(``AgentPool``, the CLI, the gateway) talk to it by name. All state changes happen on
its one event loop, so any point between two awaits is a consistent state.

Its parts, each behind the interface it needs:

* the task shard (``shard``): tasks, their event logs, reads and idempotency keys;
* capacity (``capacity``): slots, the admission queue and placement, which a task's
  run asks for slots (``request``) and gives back (``release``);
* the step path and rounds (``attempt``, ``rounds``), given a typed ``StepEnv``;
* durability (``durability``, opened by ``restore``) and health (``health``),
  called directly; observers (metrics, the structured log, a user's hooks) hang off
  ``hooks``;
* a person in the loop (``inputs``); cost and levels (``budget``);
* one clock (``clock``) for every time and timer.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
from typing import Any, Callable

from threadbound.agents import events as ev
from threadbound.agents.errors import ThreadboundError
from threadbound.snapshots import SnapshotError

from ..config import RuntimeConfig
from ..errors import ConfigError, PoolClosed, UnknownRole
from ..metrics import MetricsServer, PoolMetrics, View
from ..policy import check as check_policy
from ..sandboxing import sandbox_settings
from ..task import ADMITTED, CANCELLED, FAILED, PENDING, RUNNING, TERMINAL, WAITING, Task, TaskSummary
from .attempt import StepEnv
from .binding import Binder
from .allocator import Share
from .budget import Budget
from .capacity import Capacity
from .channel import ActorChannel
from .clock import Clock, SystemClock
from .durability import Durability, open_location
from .layout import shard_location
from .health import NORMAL, Health, HealthMonitor
from .hooks import Hook, Hooks
from .inputs import PersonInTheLoop, answered_since_wait
from .lifecycle import TaskLife
from .metrics_hook import MetricsHook
from .restore import restore, start_fresh, take_lease
from .roles import RoleBook
from .shard import TaskShard
from .slots import SlotTable
from .stats import pool_stats
from .structured_log import StructuredLog
from .task_state import RunState, TaskRecord, export_tasks

log = logging.getLogger("threadbound.supervisor")


class Supervisor:
    """Runs tasks: admits them under the caps, binds their agents to slots, runs their
    rounds, and records everything as events.

    ``make_actor(name)`` creates one slot actor (``runtime.actors`` gives the Ray one;
    tests give a fake); ``clock`` and ``rng`` are injected for the same reason;
    ``hooks`` are observers added after the built-in ones (metrics, the log).
    """

    def __init__(self, config: RuntimeConfig, roles: dict[str, bytes], *, make_actor: Callable[..., Any],
                 clock: Clock | None = None, rng: random.Random | None = None, resume: bool = False,
                 lease_owner: str | None = None, hooks: list[Hook] | None = None, shard: int = 0,
                 allocator: Any = None) -> None:
        self.cfg = config
        # With several shards, the actor (``runtime.supervisor.allocator``) that keeps the
        # pool's caps across them; None: this supervisor's slot table keeps them.
        self.allocator = allocator
        self.clock: Clock = clock or SystemClock()
        self.roles = RoleBook(roles)
        self.health = Health(HealthMonitor(config.health, clock=self.clock), config.streaming)
        mc = config.metrics
        self.metrics = PoolMetrics(config.name, tokens_window_s=mc.tokens_window_s, ray_mirror=mc.ray,
                                   ray_every_s=mc.refresh_s, clock=self.clock.monotonic) if mc.enabled else None
        self.metrics_server: MetricsServer | None = None
        self.event_log: StructuredLog | None = None
        self.hooks = Hooks()
        self.shard = TaskShard(config.name, self.clock, self.hooks, shard=shard)
        # Slot names are unique across the pool's shards: ``<prefix>s<k>/agent/<n>`` with several.
        prefix = ("" if config.name == "threadbound" else f"{config.name}/") + (f"s{shard}/" if config.shards > 1 else "")
        # The Ray messages that carried steps' events (see ActorChannel.counts), for stats().
        self.step_messages = {"replies": 0, "stream": 0}
        self.slots = SlotTable(config.max_agents, config.recycle_after, make_actor,
                               slot_name=lambda i: f"{prefix}agent/{i}", namespace=config.ray.namespace,
                               on_free=lambda: self.life.pump(), clock=self.clock,
                               per_actor=config.agents_per_actor, on_start=self._on_actor_start,
                               idle_ttl_s=config.idle_actor_ttl_s)
        share = None if allocator is None else Share(
            allocator, shard, config.max_agents, incarnation=(self.clock.time(), self.shard.run_id),
            on_grant=lambda: self.life.pump(), clock=self.clock,
            submitted_at=lambda task_id: self.tasks[task_id].submitted_at if task_id in self.tasks else 0.0)
        self.capacity = Capacity(self.slots, config.max_agents_per_task, share=share,
                                 on_grant=lambda task_id, slots: self.life.launch(task_id, slots))
        self.life = TaskLife(config, self.shard, self.capacity, self.health, self.hooks)
        self.inputs = self.life.inputs = PersonInTheLoop(config, self.shard, self.clock, requeue=self.life.enqueue,
                                                         finish=self.life.finish, barrier=self.barrier)
        self.budget = Budget(config)
        self.env = StepEnv(cfg=config, clock=self.clock, rng=rng or random.Random(), budget=self.budget,
                           sandbox=sandbox_settings(config), shard=self.shard, binder=Binder(self.slots),
                           slots=self.slots, blobs=self.roles.blobs, health=self.health, observers=self.hooks,
                           durable=None, life=self.life, on_transition=self.life.on_transition)
        self.life.env = self.env
        self.resumed: dict[str, Any] | None = None
        self.fatal: BaseException | None = None  # why this supervisor cannot serve
        self.submit_calls = 0  # submit calls served (a client sends a burst of tasks in one)
        self.started_at = self.clock.time()
        self._started = False
        self._ticker: asyncio.Task | None = None
        if config.snapshots.enabled:
            try:
                self._open_durability(resume, lease_owner)
            except (SnapshotError, OSError) as exc:
                log.error("cannot start pool %r: %s", config.name, exc)
                self._fail(exc if isinstance(exc, SnapshotError) else SnapshotError(shard_location(config, shard), str(exc)))
                return
        if self.metrics is not None:
            self.hooks.add(MetricsHook(self.metrics, self._metrics_view, self.clock.monotonic))
            if self.durable is not None:
                self.durable.on_write = self.metrics.journal_write
        if config.log.enabled:
            self.event_log = StructuredLog(config)
            self.hooks.add(self.event_log)
        for hook in hooks or ():
            self.hooks.add(hook)
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return  # started by the first call instead
        self._start()

    def _on_actor_start(self, proc: Any) -> None:
        """An agent actor sends its agents' events on one stream, read by its ``channel``."""
        proc.channel = ActorChannel(proc.handle, proc.name, self.step_messages, replies=len(proc.places) == 1)

    @property
    def tasks(self) -> dict[str, TaskRecord]:
        return self.shard.tasks

    @property
    def durable(self) -> Durability | None:
        """The journal and snapshots (None: snapshots off, or closed)."""
        return self.env.durable

    @durable.setter
    def durable(self, durable: Durability | None) -> None:
        self.env.durable = durable

    @property
    def closing(self) -> bool:
        return self.life.closing

    # -- durability -----------------------------------------------------------------

    def _open_durability(self, resume: bool, lease_owner: str | None) -> None:
        location = open_location(self.cfg, self.shard.shard)
        self.durable = Durability(self.cfg, location, self.shard.durable_upto, self.clock)
        self.durable.on_snapshot = self.hooks.on_snapshot
        self.durable.on_failed = self._journal_failed
        self.durable.lease = take_lease(self.cfg, location, lease_owner, patient=resume)
        interrupted: list[TaskRecord] = []
        if resume:
            got = restore(location.load_newest(), self.shard, self.roles, self.health.monitor,
                          location.location, on_roles=self.roles.set)
            self.resumed, interrupted = got.info, got.interrupted
        else:
            start_fresh(location)
        numbers = location.snapshots() + location.segments()
        self.durable.write_now(max(numbers, default=-1) + 1, self._export)
        for ts in self.tasks.values():  # all of it is in the snapshot just written
            ts.visible = len(ts.events)
        self.shard.journal = self.durable.events  # everything before it is in that snapshot
        for ts in interrupted:
            self.shard.emit(ts, ev.RESUMED, None, snapshot=self.resumed["snapshot"],
                            replayed=self.resumed["records"], skipped=self.resumed["skipped"],
                            restarting=dict(ts.inflight), committed=list(ts.committed))
            if ts.status != WAITING or answered_since_wait(ts):
                self.life.enqueue(ts)
            else:  # waiting for a person: out of the queue until answered, its wait goes on
                ts.run.state = RunState.PARKED

    def _journal_failed(self, exc: BaseException) -> None:
        """Nothing can be committed any more: every call says so (a restart resumes)."""
        self.fatal = SnapshotError(shard_location(self.cfg, self.shard.shard), f"the journal cannot be written ({exc!r}); "
                                   "nothing more is committed: free the disk and restart the pool, which resumes")

    def _start(self) -> None:
        if self._started or self.fatal is not None:
            return
        self._started = True
        if self.metrics is not None and self.cfg.metrics.port:
            try:
                # shard k serves its own series at metrics.port + k
                self.metrics_server = MetricsServer(self.metrics.registry, self.cfg.metrics.port + self.shard.shard,
                                                    self.cfg.metrics.host)
            except ConfigError as exc:
                if self.resumed is None:  # a new pool: refuse to start, saying which process holds the port
                    self._fail(exc)
                    return
                # A supervisor resuming (e.g. restarted by Ray) carries on without the endpoint, loudly.
                log.error("pool %r serves no metrics: %s", self.cfg.name, exc)
        if self.durable is not None:
            self.durable.start(self._export)
        self._ticker = asyncio.get_running_loop().create_task(self._tick(), name="threadbound/tick")
        self.capacity.start()  # with shards: the calls to the allocator
        for ts in self.tasks.values():  # waiting when the pool stopped: their wait goes on
            if ts.status == WAITING and ts.run.state is RunState.PARKED:
                self.inputs.arm(ts)
        if self.metrics is not None:
            if self.resumed is not None:
                self.metrics.resumed()
            self.metrics.refresh(self._metrics_view())
        self.life.pump()

    def _fail(self, exc: BaseException) -> None:
        """This supervisor cannot serve: every call raises ``exc``; its lease is let go."""
        self.fatal = exc
        if self.durable is not None and self.durable.lease is not None:
            self.durable.lease.release()
        self.durable = None

    def _export(self) -> tuple[dict[str, Any], dict[str, str], list[Callable[[], None]]]:
        """A consistent copy of the state for a snapshot (called between two awaits);
        pickling runs on the snapshot thread via the returned jobs."""
        entries, jobs, used = export_tasks(self.tasks)
        used.update(self.roles.ids.values())
        state = {"run_id": self.shard.run_id, "seq": self.shard.seq, "roles": dict(self.roles.ids),
                 "blobs": {d: self.roles.blobs[d] for d in used if d in self.roles.blobs},
                 "tasks": entries, "started_at": self.started_at, "health": {"mode": self.health.mode},
                 "format": ev.JOURNAL_FORMAT}
        return state, {ts.id: ts.status for ts in self.tasks.values()}, jobs

    def _check(self) -> None:
        if self.fatal is not None:
            raise self.fatal
        self._start()

    # -- client API: tasks ----------------------------------------------------------

    async def info(self) -> dict[str, Any]:
        self._check()
        return {"name": self.cfg.name, "config": self.cfg, "roles": sorted(self.roles.roles),
                "started_at": self.started_at, "resumed": self.resumed, "pid": os.getpid(),
                "metrics_url": self.metrics_url()}

    async def register_roles(self, blobs: dict[str, bytes]) -> list[str]:
        changed = self.roles.set(blobs)
        if changed and self.durable is not None:
            self.durable.roles(changed)
            await self.durable.flush()
        return sorted(self.roles.roles)

    async def submit(self, spec: Task) -> tuple[str, bool]:
        """Accept a task; returns its id and whether it is new (False: its idempotency
        key named a task this pool already has, which is returned instead)."""
        (got,) = await self.submit_many([spec])
        if isinstance(got, BaseException):
            raise got
        return got

    async def submit_many(self, specs: list[Task]) -> list[tuple[str, bool] | ThreadboundError]:
        """:meth:`submit` for several tasks at once, with one write to disk for all: for
        each, its ``(id, created)``, or the error that refused it (the others are accepted
        all the same). A client sends the tasks submitted together in one call."""
        self._check()
        if self.closing:
            raise PoolClosed("the pool is shutting down; no new tasks are accepted")
        self.submit_calls += 1
        answers: list[tuple[str, bool] | ThreadboundError] = []
        for spec in specs:
            try:
                answers.append(self._accept(spec))
            except ThreadboundError as exc:
                answers.append(exc)
        # Accepted = on disk: a crash now loses none of them. A known key's task is
        # answered after this too: the first submit's acceptance may still be on its way.
        await self.barrier()
        self.life.pump()
        return answers

    def _accept(self, spec: Task) -> tuple[str, bool]:
        spec = self.cfg.validate_task(spec)
        check_policy(spec, self.cfg.policy)
        unknown = [r for r in spec.agents if r not in self.roles.roles]
        if unknown:
            raise UnknownRole(unknown[0], list(self.roles.roles))
        known = self.shard.keyed(spec)
        if known is not None:
            return known.id, False
        ts = self.shard.new(spec, {r: self.roles.ids[r] for r in spec.agents})
        self.hooks.on_submit(ts)
        if self.durable is not None:
            self.durable.submitted(ts)
        self.shard.emit(ts, PENDING, None, goal=spec.goal, agents=list(spec.agents),
                        after={r: list(d) for r, d in spec.after.items()}, priority=spec.priority)
        if self.health.mode != NORMAL and not spec.degrade:
            self.life.finish(ts, FAILED, error=self.health.opted_out(ts), reason="degraded")
        else:
            self.life.enqueue(ts)
        return ts.id, True

    async def respond(self, task_id: str, value: Any, request: int | None = None) -> int:
        """See :meth:`PersonInTheLoop.respond`."""
        offset = await self.inputs.respond(task_id, value, request)
        self.life.pump()
        return offset

    async def send(self, task_id: str, message: Any) -> int:
        return await self.inputs.send(task_id, message)

    async def read(self, task_id: str, offset: int = 0, wait_s: float = 0.0) -> tuple[list[ev.Row], str]:
        """Events from ``offset`` on (waiting up to ``wait_s`` for new ones), and the status."""
        got = await self.shard.read_many({task_id: offset}, wait_s)  # (the actor's read_many answers packed)
        return got.get(task_id) or ([], self.shard.get(task_id).status)

    async def read_many(self, cursors: dict[str, int], wait_s: float = 0.0) -> dict[str, tuple[list[ev.Row], str]]:
        """See :meth:`TaskShard.read_many`."""
        return await self.shard.read_many(cursors, wait_s)

    async def wait(self, task_id: str, timeout_s: float | None) -> dict[str, Any] | None:
        """The task's result once terminal, or None if ``timeout_s`` passes first."""
        ts = await self.shard.wait_settled(task_id, timeout_s)
        return None if ts is None else self.shard.result(ts)

    async def cancel(self, task_id: str, reason: str = "cancelled") -> str:
        ts = self.shard.get(task_id)
        if ts.status in TERMINAL:
            return ts.status
        ts.run.cancel_reason = reason
        if ts.run.state is RunState.RUNNING:
            ts.run.runner.cancel()
            await asyncio.wait({ts.run.runner}, timeout=5)
        else:  # queued, or parked waiting for a person
            self.life.finish(ts, CANCELLED, error=f"cancelled ({reason})", reason=reason)
        await self.barrier()  # a cancel that returned survives a crash
        return ts.status

    async def tasks_summary(self) -> list[TaskSummary]:
        return [self.shard.summary(ts) for ts in self.tasks.values()]

    async def task_summary(self, task_id: str) -> TaskSummary:
        return self.shard.summary(self.shard.get(task_id))

    # -- client API: the pool ---------------------------------------------------------

    async def stats(self) -> dict[str, Any]:
        return pool_stats(self)

    async def health_report(self) -> dict[str, Any]:
        """The pool's health mode, every signal with its threshold, recent transitions."""
        report = self.health.monitor.report()
        report["pool"] = self.cfg.name
        report["queued"] = self.shard.queued(self.capacity.waiting())
        return report

    def metrics_url(self) -> str | None:
        """Where this supervisor serves ``GET /metrics`` (None: it does not)."""
        if self.metrics_server is None:
            return None
        try:
            import ray

            node_ip = ray.util.get_node_ip_address() if ray.is_initialized() else None
        except Exception:
            node_ip = None
        return self.metrics_server.url(node_ip)

    async def metrics_text(self) -> str:
        """This pool's metrics in Prometheus text format (what ``/metrics`` serves)."""
        if self.metrics is None:
            raise PoolClosed(f"pool {self.cfg.name!r} records no metrics (metrics.enabled: false)")
        return self.metrics.text()

    def _metrics_view(self) -> View:
        levels: dict[int, int] = {}
        for ts in self.tasks.values():
            if ts.status in (ADMITTED, RUNNING) and ts.level:
                levels[ts.level] = levels.get(ts.level, 0) + 1
        return View(active=sum(len(ts.run.running) for ts in self.tasks.values()),
                    bound=sum(1 for s in self.slots.slots if s.owner is not None),
                    size=self.cfg.max_agents, actors=sum(1 for p in self.slots.procs if p.handle is not None),
                    actors_size=len(self.slots.procs), queue_depth=self.shard.queued(self.capacity.waiting()),
                    tasks=self.shard.by_status(), levels=levels, mode=self.health.mode,
                    snapshot_interval_s=self.cfg.snapshot_interval_s if self.durable is not None else 0.0)

    async def prewarm(self) -> int:
        """Start every slot actor now instead of on first use."""
        held = self.slots.reserve("__prewarm__", self.slots.free_count())
        for s in held or []:
            await self.slots.wait_ready(s)
            s.owner = None
            s.uses = 0
        self.life.pump()
        return len(held or [])

    async def snapshot_now(self) -> dict[str, Any]:
        """Write a snapshot now; returns its cost (seq, bytes, copy_ms, write_ms)."""
        if self.durable is None:
            raise PoolClosed("snapshots are disabled for this pool (snapshots.enabled: false)")
        await self.durable.flush()
        return await self.durable.snapshot(self._export)

    async def shutdown(self, grace_s: float | None = None) -> None:
        """Stop admitting, let running tasks finish for ``grace_s``, cancel the rest, kill slots."""
        grace = self.cfg.shutdown_grace_s if grace_s is None else grace_s
        self.life.closing = self.capacity.holding = True
        if self._ticker is not None:
            self._ticker.cancel()
        for ts in list(self.tasks.values()):
            if ts.status == PENDING or ts.run.state is RunState.PARKED:
                ts.run.cancel_reason = "shutdown"
                self.life.finish(ts, CANCELLED, error="cancelled (shutdown)", reason="shutdown")
        runners = [ts.run.runner for ts in self.tasks.values() if ts.run.state is RunState.RUNNING]
        if runners and grace > 0:
            await asyncio.wait(runners, timeout=grace)
        for ts in self.tasks.values():
            if ts.run.state is RunState.RUNNING:
                ts.run.cancel_reason = "shutdown"
                ts.run.runner.cancel()
        if runners:
            await asyncio.wait(runners, timeout=5)
        await self.capacity.shutdown()
        if self.metrics_server is not None:
            self.metrics_server.close()
            self.metrics_server = None
        if self.event_log is not None:
            self.event_log.close()
        if self.durable is not None:
            durable, self.durable = self.durable, None
            await durable.close(self._export)

    async def barrier(self) -> None:
        """Return once everything recorded so far is durable (no-op without snapshots)."""
        await self.env.barrier()

    async def _tick(self) -> None:
        """Health recovery and memory pressure need no step to happen; observers refresh."""
        while True:
            await self.clock.sleep(self.cfg.health.check_interval_s)
            change = self.health.tick()
            if change is not None:
                self.life.on_transition(change)
            self.slots.trim_idle()
            self.hooks.on_tick()
