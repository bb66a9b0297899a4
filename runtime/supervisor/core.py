"""The supervisor: sole owner of the task table, admission queue, event logs and slots.

A plain class, wrapped once by ``ray.remote`` in ``runtime.actors`` as an async
actor; clients (``AgentPool``, the CLI, the gateway) talk to it by name. All state
changes happen on its one event loop, so any point between two awaits is a consistent
state.

It wires the parts together and owns the state; the behaviour lives in the parts:
``admission`` (the queue, the caps, binding roles to slots), ``attempt`` (a step's
attempts and retries), ``rounds`` (a task's rounds over its agent graph), ``budget``
(cost and levels), ``task_state`` (what events and commits change, snapshot entries).
Durability, health and metrics attach as hooks (``hooks``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import secrets
import time
from typing import Any, Callable

from threadbound.agents import events as ev
from threadbound.agents.errors import ThreadboundError
from threadbound.agents.workspace import Workspace, copy_path
from threadbound.snapshots import HistoryExists, LeaseHeld, Loaded, SnapshotError

from .admission import Admission
from .budget import Budget
from ..config import RuntimeConfig
from .durability import Durability, DurabilityHook, open_location
from .attempt import plain
from ..errors import ConfigError, InputNotExpected, InvalidInput, InvalidTask, PoolClosed, TaskNotFound, UnknownRole
from .health import NORMAL, PAUSED, HealthHook, HealthMonitor, Transition
from .hooks import Hook, Hooks
from ..metrics import MetricsServer, PoolMetrics, View
from .metrics_hook import MetricsHook
from ..policy import check as check_policy
from .rounds import decision, run_task
from ..sandboxing import sandbox_settings
from .slots import Slot, SlotTable
from .structured_log import StructuredLog
from ..task import ADMITTED, CANCELLED, FAILED, PENDING, RUNNING, TERMINAL, TIMED_OUT, WAITING, Task, TaskSummary
from .task_state import TaskEnds, TaskState, digest, export_tasks, replay, tasks_from_snapshot, track

log = logging.getLogger("threadbound.supervisor")

READ_BATCH = 5000  # events returned by one read() call at most
READ_LINGER_S = 0.002  # after a wake-up, how long a read waits for the rest of a burst
RESUME_LEASE_WAIT_S = 15.0  # how long a resuming supervisor waits for a dying one's lease
MAX_INPUT_BYTES = 64 * 1024  # a response or a message, as JSON


def _discard_copy(task_id: str) -> None:
    """Delete a finished task's workspace copy (on a thread: a big copy takes a while)."""
    try:
        Workspace.discard(task_id)
    except Exception:  # a copy left behind is a leak, not a reason to disturb the pool
        log.exception("could not delete the workspace copy of task %s; delete %s by hand", task_id,
                      copy_path(task_id))


def _check_input(name: str, value: Any) -> None:
    """A response or a message: plain data (it is an event), at most MAX_INPUT_BYTES as JSON."""
    if not plain(value):
        raise InvalidInput(name, f"must be plain data (text, numbers, true/false, null, lists, maps with "
                                 f"text keys), got {type(value).__name__}")
    size = len(json.dumps(value))
    if size > MAX_INPUT_BYTES:
        raise InvalidInput(name, f"is {size} bytes as JSON; at most {MAX_INPUT_BYTES} are taken (send a path "
                                 "or a link for more)")


class Supervisor:
    """Runs tasks: admits them under the caps, binds their agents to slots, runs their
    rounds, and records everything as events.

    ``make_actor(name)`` creates one slot actor (``runtime.actors`` gives the Ray one;
    tests give a fake); ``clock`` and ``rng`` are injected for the same reason;
    ``hooks`` are added after the built-in ones (durability, health, metrics).
    """

    def __init__(
        self,
        config: RuntimeConfig,
        roles: dict[str, bytes],
        *,
        make_actor: Callable[[str], Any],
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        resume: bool = False,
        lease_owner: str | None = None,
        hooks: list[Hook] | None = None,
    ) -> None:
        self.cfg = config
        self.roles: dict[str, bytes] = {}
        self.role_ids: dict[str, str] = {}
        self.blobs: dict[str, bytes] = {}  # digest -> agent class blob
        self._set_roles(roles)
        self.clock = clock
        self.rng = rng or random.Random()
        self.health = HealthMonitor(config.health, clock=clock)
        mc = config.metrics
        self.metrics = PoolMetrics(config.name, tokens_window_s=mc.tokens_window_s, ray_mirror=mc.ray,
                                   ray_every_s=mc.refresh_s, clock=clock) if mc.enabled else None
        self.metrics_server: MetricsServer | None = None
        self.event_log: StructuredLog | None = None
        self.sandbox = sandbox_settings(config)
        self.budget = Budget(config)
        self.tasks: dict[str, TaskState] = {}
        self._keys: dict[str, str] = {}  # idempotency key -> task id (rebuilt from the tasks on resume)
        self.seq = 0
        self.closing = False
        self.reads = 0  # read calls served (a client following many tasks makes few)
        self.submit_calls = 0  # submit calls served (a client sends a burst of tasks in one)
        self._news = asyncio.Event()  # set (and replaced) whenever any task has news
        self._finished = 0  # terminal tasks remembered (forgotten beyond keep_finished_tasks)
        self.started_at = time.time()
        # Task ids are unique across supervisors (a workspace copy or log keyed by one
        # never meets another run's task): a sequence number plus this run's suffix.
        self.run_id = secrets.token_hex(2)
        prefix = "" if config.name == "threadbound" else f"{config.name}/"
        self.slots = SlotTable(
            config.max_agents, config.recycle_after, make_actor,
            slot_name=lambda i: f"{prefix}agent/{i}",
            namespace=config.ray.namespace, on_free=self._pump,
        )
        self.admission = Admission(self.slots, config.max_agents_per_task)
        self.hooks = Hooks()
        self.durable: Durability | None = None
        self.resumed: dict[str, Any] | None = None
        self.fatal: BaseException | None = None  # why this supervisor cannot serve
        self._started = False
        self._ticker: asyncio.Task | None = None
        self._wait_timers: dict[str, asyncio.TimerHandle] = {}  # task id -> its wait_timeout_s
        if config.snapshots.enabled:
            try:
                self._open_durability(resume, lease_owner)
            except (SnapshotError, OSError) as exc:
                log.error("cannot start pool %r: %s", config.name, exc)
                if not isinstance(exc, SnapshotError):
                    exc = SnapshotError(config.snapshot_location, str(exc))
                self._fail(exc)
                return
        self.hooks.add(HealthHook(self.health, self._on_transition))
        if self.metrics is not None:
            self.hooks.add(MetricsHook(self.metrics, self._metrics_view, clock))
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

    # -- durability -----------------------------------------------------------------

    def _open_durability(self, resume: bool, lease_owner: str | None) -> None:
        location = open_location(self.cfg)
        self.durable = Durability(self.cfg, location, self._on_durable)
        self.durable.on_snapshot = self.hooks.on_snapshot
        self.durable.lease = self._take_lease(location, lease_owner, patient=resume)
        if resume:
            loaded = location.load_newest()
            self._restore(loaded)
        else:
            newest = location.newest_manifest()
            if newest is not None and not newest.get("clean"):
                unfinished = self._unfinished_in(location)
                if unfinished:
                    raise HistoryExists(location.location, (
                        f"holds the history of pool {newest.get('name')!r}, which stopped without shutting "
                        f"down and left {len(unfinished)} unfinished task(s) ({', '.join(unfinished[:3])}"
                        f"{', ...' if len(unfinished) > 3 else ''}); resume them with "
                        f"`threadbound resume {location.location}` or AgentPool.resume(...), or delete "
                        "that directory (or choose another snapshot_dir) to start over"))
                log.info("%s: the previous run ended without a shutdown but left nothing unfinished; "
                         "starting a new history", location.location)
            location.clear()
        numbers = location.snapshots() + location.segments()
        self.durable.write_now(max(numbers, default=-1) + 1, self._export)
        for ts in self.tasks.values():  # all of it is in the snapshot just written
            ts.visible = len(ts.events)
        self.hooks.add(DurabilityHook(self.durable))  # everything before it is in that snapshot

    def _take_lease(self, location: Any, owner: str | None, *, patient: bool) -> Any:
        """The location's lease. Resuming, the crashed supervisor's process may still be on
        its way out (its name freed, its lock not yet): wait a little for it to go."""
        deadline = time.monotonic() + (RESUME_LEASE_WAIT_S if patient else 0)
        while True:
            try:
                return location.acquire_lease(self.cfg.snapshots.lease_ttl_s, owner)
            except LeaseHeld:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.2)

    @staticmethod
    def _unfinished_in(location: Any) -> list[str]:
        """Ids of tasks a history left unfinished (an unreadable history counts as unfinished)."""
        try:
            loaded = location.load_newest()
        except SnapshotError as exc:
            return [f"unknown: {exc.reason}"]
        tasks = tasks_from_snapshot(loaded.state)
        for rec in loaded.records:
            replay(tasks, rec, on_roles=lambda blobs: None, where=location.location)
        return [t for t, ts in tasks.items() if ts.status not in TERMINAL]

    def _start(self) -> None:
        if self._started or self.fatal is not None:
            return
        self._started = True
        if self.metrics is not None and self.cfg.metrics.port:
            try:
                self.metrics_server = MetricsServer(self.metrics.registry, self.cfg.metrics.port,
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
        for ts in self.tasks.values():  # waiting when the pool stopped: their wait goes on
            if ts.status == WAITING and ts.runner is None:
                self._arm_wait(ts)
        if self.metrics is not None:
            if self.resumed is not None:
                self.metrics.resumed()
            self.metrics.refresh(self._metrics_view())
        self._pump()

    def _fail(self, exc: BaseException) -> None:
        """This supervisor cannot serve: every call raises ``exc``; its lease is let go."""
        self.fatal = exc
        if self.durable is not None and self.durable.lease is not None:
            self.durable.lease.release()
        self.durable = None

    def _on_durable(self, marks: dict[str, int]) -> None:
        for task_id, n in marks.items():
            ts = self.tasks.get(task_id)
            if ts is not None and n > ts.visible:
                ts.visible = n
                self._notify(ts)

    def _export(self) -> tuple[dict[str, Any], dict[str, str], list[Callable[[], None]]]:
        """A consistent copy of the state for a snapshot (called between two awaits);
        pickling runs on the snapshot thread via the returned jobs."""
        entries, jobs, used = export_tasks(self.tasks)
        used.update(self.role_ids.values())
        state = {"run_id": self.run_id, "seq": self.seq, "roles": dict(self.role_ids),
                 "blobs": {d: self.blobs[d] for d in used if d in self.blobs},
                 "tasks": entries, "started_at": self.started_at, "health": {"mode": self.health.mode},
                 "format": ev.JOURNAL_FORMAT}
        return state, {ts.id: ts.status for ts in self.tasks.values()}, jobs

    def _restore(self, loaded: Loaded) -> None:
        """Rebuild the state from a verified snapshot plus the journal after it."""
        state = loaded.state
        self.run_id, self.seq = state["run_id"], state["seq"]
        self.blobs.update(state["blobs"])
        given = dict(self.roles)
        self.roles, self.role_ids = {}, {}
        self._set_roles({r: self.blobs[d] for r, d in state["roles"].items() if d in self.blobs})
        self._set_roles(given)  # roles the resuming client brings win
        self.tasks.update(tasks_from_snapshot(state))
        self.health.restore(state.get("health", {}).get("mode", NORMAL))
        where = self.durable.location.location if self.durable else "journal"
        for rec in loaded.records:
            self.seq = max(self.seq, replay(self.tasks, rec, on_roles=self._set_roles, where=where,
                                            on_health=self.health.restore))
        self._keys = {ts.spec.idempotency_key: ts.id for ts in self.tasks.values()
                      if ts.spec.idempotency_key is not None}
        interrupted = [ts for ts in self.tasks.values() if ts.status not in TERMINAL]
        self._finished = len(self.tasks) - len(interrupted)
        interrupted.sort(key=lambda ts: ts.seq)
        self.resumed = {"snapshot": loaded.seq, "records": len(loaded.records),
                        "skipped": [f"{p}: {why}" for p, why in loaded.skipped],
                        "torn": loaded.torn, "tasks": [ts.id for ts in interrupted]}
        if self.health.mode != NORMAL:
            log.warning("resumed in %s mode; it recovers after health.healthy_period_s (%gs) without trouble",
                        self.health.mode, self.cfg.health.healthy_period_s)
        if loaded.skipped:
            log.error("resumed from an OLDER snapshot (%s) because newer ones were refused: %s",
                      loaded.seq, "; ".join(self.resumed["skipped"]))
        for ts in interrupted:
            self.emit(ts, ev.RESUMED, None, snapshot=loaded.seq, replayed=len(loaded.records),
                      skipped=self.resumed["skipped"], restarting=dict(ts.inflight),
                      committed=list(ts.committed))
            if ts.status != WAITING or self._answered_since_wait(ts):
                self.admission.enqueue(ts)  # (a waiting task stays out of the queue until answered)

    def _set_roles(self, blobs: dict[str, bytes]) -> dict[str, bytes]:
        changed = {}
        for role, blob in blobs.items():
            d = digest(blob)
            if self.role_ids.get(role) != d:
                changed[role] = blob
            self.roles[role], self.role_ids[role] = blob, d
            self.blobs[d] = blob
        return changed

    # -- client API -----------------------------------------------------------------

    async def info(self) -> dict[str, Any]:
        if self.fatal is not None:
            raise self.fatal
        self._start()
        return {"name": self.cfg.name, "config": self.cfg, "roles": sorted(self.roles),
                "started_at": self.started_at, "resumed": self.resumed, "pid": os.getpid(),
                "metrics_url": self.metrics_url()}

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
        tasks: dict[str, int] = {}
        levels: dict[int, int] = {}
        active = 0
        for ts in self.tasks.values():
            tasks[ts.status] = tasks.get(ts.status, 0) + 1
            active += len(ts.running)
            if ts.status in (ADMITTED, RUNNING) and ts.level:
                levels[ts.level] = levels.get(ts.level, 0) + 1
        return View(active=active, bound=sum(1 for s in self.slots.slots if s.owner is not None),
                    size=self.cfg.max_agents, queue_depth=self.admission.queued(self.tasks), tasks=tasks,
                    levels=levels, mode=self.health.mode,
                    snapshot_interval_s=self.cfg.snapshot_interval_s if self.durable is not None else 0.0)

    async def register_roles(self, blobs: dict[str, bytes]) -> list[str]:
        changed = self._set_roles(blobs)
        if changed and self.durable is not None:
            self.durable.record(ev.record(ev.R_ROLES, roles=changed))
            await self.durable.flush()
        return sorted(self.roles)

    async def prewarm(self) -> int:
        """Start every slot actor now instead of on first use."""
        held = self.slots.reserve("__prewarm__", self.slots.free_count())
        for s in held or []:
            await self.slots.wait_ready(s)
            s.owner = None
            s.uses = 0
        self._pump()
        return len(held or [])

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
        if self.fatal is not None:
            raise self.fatal
        if self.closing:
            raise PoolClosed("the pool is shutting down; no new tasks are accepted")
        self._start()
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
        self._pump()
        return answers

    def _accept(self, spec: Task) -> tuple[str, bool]:
        spec = self.cfg.validate_task(spec)
        check_policy(spec, self.cfg.policy)
        unknown = [r for r in spec.agents if r not in self.roles]
        if unknown:
            raise UnknownRole(unknown[0], list(self.roles))
        known = self._keyed(spec)
        if known is not None:
            return known.id, False
        self.seq += 1
        task_id = f"t{self.seq:05d}-{self.run_id}"
        ts = TaskState(id=task_id, seq=self.seq, spec=spec, submitted_at=time.time(),
                       blob_ids={r: self.role_ids[r] for r in spec.agents})
        self.tasks[task_id] = ts
        if spec.idempotency_key is not None:
            self._keys[spec.idempotency_key] = task_id
        self.hooks.on_submit(ts)
        self.emit(ts, PENDING, None, goal=spec.goal, agents=list(spec.agents),
                  after={r: list(d) for r, d in spec.after.items()}, priority=spec.priority)
        if self.health.mode != NORMAL and not spec.degrade:
            self.finish(ts, FAILED, error=self.opted_out(ts), reason="degraded")
        else:
            self.admission.enqueue(ts)
        return task_id, True

    def _keyed(self, spec: Task) -> TaskState | None:
        """The task ``spec``'s idempotency key already made, if the pool still has it."""
        key = spec.idempotency_key
        if key is None:
            return None
        ts = self.tasks.get(self._keys.get(key, ""))
        if ts is None:
            return None
        if ts.spec != spec:
            raise InvalidTask("idempotency_key", f"{key!r} was already used for task {ts.id}, which is a "
                              "different task; use a new key for a new task")
        return ts

    async def respond(self, task_id: str, value: Any, request: int | None = None) -> int:
        """Answer the task's open input request (the only one, or ``request``); returns
        the offset of the ``input_received`` event. The first answer wins; a late one,
        or one to a task not waiting, raises :class:`InputNotExpected`."""
        ts = self._get(task_id)
        rid = self._open_request(ts, request)
        ask = ts.asks[rid]
        _check_input("value", value)
        if ask["role"] is None and decision(value) is None:
            raise InvalidInput("value", f"request #{rid} of task {ts.id} asks to approve a change; answer true "
                               '(approve), false or {"approve": false, "reason": "..."} (reject), or a text: '
                               f"feedback for another round; got {value!r:.80}", task_id=ts.id)
        self.emit(ts, ev.INPUT_RECEIVED, ask["role"], request=rid, round=ask["round"], value=value)
        offset = len(ts.events) - 1
        if ts.status == WAITING and ts.runner is None:  # its run had stopped: queue it again
            self._disarm_wait(ts)
            self.admission.enqueue(ts)
        await self.barrier()  # answered = on disk
        self._pump()
        return offset

    async def send(self, task_id: str, message: Any) -> int:
        """Append ``message`` to the task's inbox (a ``message_received`` event); every
        later step of its agents sees it in ``ctx.inbox``. Returns the event's offset."""
        ts = self._get(task_id)
        if ts.status in TERMINAL:
            raise InputNotExpected(f"task {ts.id} has ended ({ts.status}); messages reach only tasks that have "
                                   "not ended", task_id=ts.id)
        _check_input("message", message)
        self.emit(ts, ev.MESSAGE_RECEIVED, None, n=len(ts.inbox), message=message)
        offset = len(ts.events) - 1
        await self.barrier()
        return offset

    def _open_request(self, ts: TaskState, request: int | None) -> int:
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
            which = self._open_requests(ts)
            raise InputNotExpected(f"task {ts.id} waits for {len(ts.asks)} answers ({which}); say which one "
                                   "with request=N (threadbound respond --request N)", task_id=ts.id)
        return next(iter(ts.asks))

    def _wait_limit(self, ts: TaskState) -> float:
        return float(ts.spec.wait_timeout_s or self.cfg.wait_timeout_s)

    def _arm_wait(self, ts: TaskState) -> None:
        """End the waiting task ``timed_out`` when its wait_timeout_s passes (wall clock:
        the wait goes on across a restart of the supervisor)."""
        self._disarm_wait(ts)
        since = ts.waiting_since or time.time()
        delay = max(0.0, since + self._wait_limit(ts) - time.time())
        self._wait_timers[ts.id] = asyncio.get_running_loop().call_later(delay, self._wait_expired, ts.id)

    def _disarm_wait(self, ts: TaskState) -> None:
        timer = self._wait_timers.pop(ts.id, None)
        if timer is not None:
            timer.cancel()

    @staticmethod
    def _open_requests(ts: TaskState) -> str:
        """``#1 from reviewer, #2 from the approval``: the task's open input requests."""
        return ", ".join(f"#{r} from {a['role'] or 'the approval'}" for r, a in sorted(ts.asks.items()))

    def _wait_expired(self, task_id: str) -> None:
        self._wait_timers.pop(task_id, None)
        ts = self.tasks.get(task_id)
        if ts is None or ts.status != WAITING or ts.runner is not None:
            return
        limit = self._wait_limit(ts)
        which = self._open_requests(ts)
        self.finish(ts, TIMED_OUT, reason="wait_timeout", limit_s=limit,
                    error=f"task {ts.id} waited {limit:g}s for a person's input ({which or 'none open'}) and got "
                          "none (wait_timeout_s); answer sooner, or give the task a longer wait_timeout_s")
        self._retain()

    @staticmethod
    def _answered_since_wait(ts: TaskState) -> bool:
        """A request the task began waiting for has been answered since (it should run)."""
        return any(r not in ts.asks for r in ts.waiting_for)

    async def read(self, task_id: str, offset: int = 0, wait_s: float = 0.0) -> tuple[list[tuple], str]:
        """Events from ``offset`` on (waiting up to ``wait_s`` for new ones), and the status."""
        got = await self.read_many({task_id: offset}, wait_s)
        return got.get(task_id) or ([], self.tasks[task_id].status)

    async def read_many(self, cursors: dict[str, int], wait_s: float = 0.0) -> dict[str, tuple[list[tuple], str]]:
        """For each ``task id -> offset`` that has news: its events from that offset on, and
        its status. A task with nothing new (and not ended) is left out of the answer.

        Waits up to ``wait_s`` until at least one of the tasks has something new (or has
        ended), then answers for all of them at once: a client following many tasks makes
        one long-poll per burst, not one per task."""
        self.reads += 1
        states = []
        for task_id, offset in cursors.items():
            if not isinstance(offset, int) or offset < 0:
                raise InvalidTask("from_offset", f"must be an integer >= 0, got {offset!r}")
            states.append((task_id, offset, self._get(task_id)))

        def news() -> bool:
            return any(off < ts.visible or self._settled(ts) for _, off, ts in states)

        if wait_s > 0 and not news():
            deadline = self.clock() + wait_s
            while True:  # one pool-wide wake-up, not one waiter per followed task
                remaining = deadline - self.clock()
                if remaining <= 0:
                    break
                try:
                    await asyncio.wait_for(self._news.wait(), remaining)
                except asyncio.TimeoutError:
                    break
                if news():
                    if not all(self._settled(ts) for _, _, ts in states):
                        # Events come in bursts (a step's end, the next one's start): let
                        # the burst land so one round trip carries it, not one per event.
                        await asyncio.sleep(READ_LINGER_S)
                    break
        return {task_id: (ts.events[off:min(ts.visible, off + READ_BATCH)], ts.status)
                for task_id, off, ts in states if off < ts.visible or self._settled(ts)}

    async def wait(self, task_id: str, timeout_s: float | None) -> dict[str, Any] | None:
        """The task's result once terminal, or None if ``timeout_s`` passes first."""
        ts = self._get(task_id)
        deadline = None if timeout_s is None else self.clock() + timeout_s
        while not self._settled(ts):
            remaining = None if deadline is None else deadline - self.clock()
            if remaining is not None and remaining <= 0:
                return None
            try:
                await asyncio.wait_for(ts.changed.wait(), remaining)
            except asyncio.TimeoutError:
                return None
        return self._result(ts)

    async def cancel(self, task_id: str, reason: str = "cancelled") -> str:
        ts = self._get(task_id)
        if ts.status in TERMINAL:
            return ts.status
        ts.cancel_reason = reason
        if ts.runner is None:  # queued, or waiting for a person (task_ended let its runner go)
            self.finish(ts, CANCELLED, error=f"cancelled ({reason})", reason=reason)
        else:
            ts.runner.cancel()
            await asyncio.wait({ts.runner}, timeout=5)
        await self.barrier()  # a cancel that returned survives a crash
        return ts.status

    async def tasks_summary(self) -> list[TaskSummary]:
        return [self._summary(ts) for ts in self.tasks.values()]

    async def task_summary(self, task_id: str) -> TaskSummary:
        return self._summary(self._get(task_id))

    async def stats(self) -> dict[str, Any]:
        by_status: dict[str, int] = {}
        for ts in self.tasks.values():
            by_status[ts.status] = by_status.get(ts.status, 0) + 1
        return {
            "name": self.cfg.name, "tasks": by_status,
            "queue_depth": self.admission.queued(self.tasks),
            # processes replaced (counted once the old one is gone), and recycles of due
            # slots begun (counted when begun: a recycle runs in the background)
            "slots": self.slots.describe(), "replacements": self.slots.replacements,
            "recycles": self.slots.recycles,
            "max_agents": self.cfg.max_agents, "max_agents_per_task": self.cfg.max_agents_per_task,
            # which agents of each running task work at this moment
            "running": {ts.id: sorted(ts.running) for ts in self.tasks.values() if ts.running},
            "busy": sum(len(ts.running) for ts in self.tasks.values()),
            "durability": None if self.durable is None else {
                "location": self.durable.location.location, "segment": self.durable.segment,
                **self.durable.stats},
            "resumed": self.resumed, "health": self.health.mode, "hook_failures": self.hooks.failures,
            "reads": self.reads, "submit_calls": self.submit_calls,
            "tokens_per_s": None if self.metrics is None else round(self.metrics.tokens_per_s, 1),
            "metrics_url": self.metrics_url(),
        }

    async def health_report(self) -> dict[str, Any]:
        """The pool's health mode, every signal with its threshold, recent transitions."""
        report = self.health.report()
        report["pool"] = self.cfg.name
        report["queued"] = self.admission.queued(self.tasks)
        return report

    async def snapshot_now(self) -> dict[str, Any]:
        """Write a snapshot now; returns its cost (seq, bytes, copy_ms, write_ms)."""
        if self.durable is None:
            raise PoolClosed("snapshots are disabled for this pool (snapshots.enabled: false)")
        await self.durable.flush()
        return await self.durable.snapshot(self._export)

    async def shutdown(self, grace_s: float | None = None) -> None:
        """Stop admitting, let running tasks finish for ``grace_s``, cancel the rest, kill slots."""
        grace = self.cfg.shutdown_grace_s if grace_s is None else grace_s
        self.closing = True
        if self._ticker is not None:
            self._ticker.cancel()
        for ts in list(self.tasks.values()):
            if ts.status == PENDING or (ts.status == WAITING and ts.runner is None):
                ts.cancel_reason = "shutdown"
                self.finish(ts, CANCELLED, error="cancelled (shutdown)", reason="shutdown")
        runners = [ts.runner for ts in self.tasks.values() if ts.runner and not ts.runner.done()]
        if runners and grace > 0:
            await asyncio.wait(runners, timeout=grace)
        for ts in self.tasks.values():
            if ts.runner and not ts.runner.done():
                ts.cancel_reason = "shutdown"
                ts.runner.cancel()
        if runners:
            await asyncio.wait(runners, timeout=5)
        await self.slots.shutdown()
        if self.metrics_server is not None:
            self.metrics_server.close()
            self.metrics_server = None
        if self.event_log is not None:
            self.event_log.close()
        if self.durable is not None:
            durable, self.durable = self.durable, None
            await durable.close(self._export)

    # -- what the parts call (see attempt.Core and rounds.RoundsCore) ----------------------

    def emit(self, ts: TaskState, kind: str, agent: str | None, **data: Any) -> None:
        """Append an event to the task's log; see :meth:`append`."""
        self.append(ts, kind, agent, data)

    def append(self, ts: TaskState, kind: str, agent: str | None, data: dict[str, Any]) -> None:
        """Append an event to the task's log (``data`` may hold any keys: an agent's own
        event is relayed as it is); hooks hear of it, and durability journals it: clients
        see it once written."""
        row = (len(ts.events), kind, agent, data, time.time())
        ts.events.append(row)
        ts.version += 1
        track(ts, row)
        self.hooks.on_event(ts, row)
        if self.durable is None:
            ts.visible = len(ts.events)
            self._notify(ts)

    async def barrier(self) -> None:
        """Return once everything recorded so far is durable (no-op without snapshots)."""
        if self.durable is not None:
            await self.durable.flush()

    async def bind(self, ts: TaskState, role: str) -> Slot:
        return await self.admission.bind(ts, role)

    def mode_for(self, ts: TaskState) -> tuple[bool, bool]:
        """``(streaming, degraded)`` for the next attempt of a step of ``ts``."""
        if self.health.mode != NORMAL:
            if not ts.spec.degrade:
                raise TaskEnds(FAILED, self.opted_out(ts), reason="degraded")
            return False, True
        return self.cfg.streaming, False

    def degraded_now(self, ts: TaskState) -> bool:
        return self.health.mode != NORMAL and ts.spec.degrade

    def finish(self, ts: TaskState, status: str, **data: Any) -> None:
        if ts.status in TERMINAL:
            return
        self._disarm_wait(ts)
        if ts.spec.workspace:  # the final event says where the copy was and whether it is kept
            data.update(workspace_copy=str(copy_path(ts.id)), workspace_copy_kept=self.cfg.workspace.keep_copies)
        self.emit(ts, status, None, **{k: v for k, v in data.items() if v is not None})
        self._finished += 1
        if ts.spec.workspace and not self.cfg.workspace.keep_copies:
            self.admission.discard_copy(ts.id, _discard_copy)  # on the node the copy is on

    def task_ended(self, ts: TaskState) -> None:
        """The task's run is over (its steps have stopped): free its slots, forget old tasks."""
        self.admission.release(ts)
        if ts.status == WAITING:
            ts.runner = None  # an answer queues it again
        self._retain()

    def task_waits(self, ts: TaskState) -> None:
        """Nothing of the task can run until a person answers: it waits, holding no actor,
        for up to its ``wait_timeout_s``."""
        limit = self._wait_limit(ts)
        self.emit(ts, WAITING, None, requests=sorted(ts.asks), ran_s=round(ts.ran_s, 3), wait_timeout_s=limit)
        self._arm_wait(ts)

    def opted_out(self, ts: TaskState) -> str:
        why = "; ".join(self.health.transitions[-1].reasons) if self.health.transitions else self.health.mode
        return (f"task {ts.id} opted out of degradation (degrade: false) and the pool is {self.health.mode} "
                f"({why}); resubmit it when pool.health() reports normal, or allow degrade")

    # -- admission and health -------------------------------------------------------

    def _pump(self) -> None:
        """Admit queued tasks while their slots fit (nothing while paused or closing)."""
        if self.closing or self.health.mode == PAUSED:
            return
        self.admission.admit(self.tasks, self._launch)

    def _launch(self, ts: TaskState, slots: list[Slot]) -> None:
        node = self.slots.home_of(ts.id)  # on a cluster: where its agents and its workspace copy are
        self.emit(ts, ADMITTED, None, slots=[s.name for s in slots], **({"node": node} if node else {}))
        ts.runner = asyncio.get_running_loop().create_task(run_task(self, ts), name=f"task/{ts.id}")

    async def _tick(self) -> None:
        """Hooks' timer: health recovery and memory pressure need no step to happen."""
        while True:
            await asyncio.sleep(self.cfg.health.check_interval_s)
            self.hooks.on_tick(self)

    def _on_transition(self, t: Transition) -> None:
        """Tell every unfinished task, the log and the hooks; act on the new mode."""
        log.warning("pool %r health: %s -> %s (%s)", self.cfg.name, t.old, t.new, "; ".join(t.reasons))
        self.hooks.on_transition(t)
        degraded = t.new != NORMAL
        for ts in list(self.tasks.values()):
            if ts.status in TERMINAL:
                continue
            self.emit(ts, ev.HEALTH, None, mode=t.new, previous=t.old, reasons=list(t.reasons),
                      level=1 if degraded and ts.spec.degrade else ts.level,
                      streaming=self.cfg.streaming and not degraded, admitting=t.new != PAUSED)
            if degraded and not ts.spec.degrade:
                ts.cancel_reason = "degraded"
                if ts.runner is None:
                    self.finish(ts, FAILED, error=self.opted_out(ts), reason="degraded")
                else:
                    ts.runner.cancel()
        if t.old == PAUSED:
            self._pump()

    # -- events and state -----------------------------------------------------------

    def _notify(self, ts: TaskState) -> None:
        ts.changed.set()
        ts.changed = asyncio.Event()
        self._news.set()  # readers of many tasks wait on this one
        self._news = asyncio.Event()

    @staticmethod
    def _settled(ts: TaskState) -> bool:
        """Terminal, and every event (the final one included) readable."""
        return ts.status in TERMINAL and ts.visible >= len(ts.events)

    def _retain(self) -> None:
        if self._finished <= self.cfg.keep_finished_tasks:
            return  # (counted as tasks end: no scan of the table per task)
        finished = [ts for ts in self.tasks.values() if ts.status in TERMINAL]
        forget = [ts.id for ts in finished[: max(0, len(finished) - self.cfg.keep_finished_tasks)]]
        for task_id in forget:
            key = self.tasks.pop(task_id).spec.idempotency_key
            if key is not None:
                self._keys.pop(key, None)
        self._finished = len(finished) - len(forget)
        if forget and self.durable is not None:
            self.durable.record(ev.record(ev.R_FORGET, tasks=forget))

    def _get(self, task_id: str) -> TaskState:
        ts = self.tasks.get(task_id)
        if ts is None:
            raise TaskNotFound(f"no task {task_id!r} in pool {self.cfg.name!r} "
                               "(finished tasks beyond keep_finished_tasks are forgotten)",
                               task_id=task_id)
        return ts

    def _summary(self, ts: TaskState) -> TaskSummary:
        return TaskSummary(task_id=ts.id, status=ts.status, goal=ts.spec.goal,
                           agents=tuple(ts.spec.agents), round=ts.round, events=len(ts.events),
                           submitted_at=ts.submitted_at, finished_at=ts.finished_at, error=ts.error,
                           idempotency_key=ts.spec.idempotency_key)

    def _result(self, ts: TaskState) -> dict[str, Any]:
        end = ts.finished_at or time.time()
        return {"task_id": ts.id, "status": ts.status, "outputs": dict(ts.outputs), "rounds": ts.round,
                "error": ts.error, "elapsed_s": end - ts.submitted_at, "reason": ts.reason,
                "applied": list(ts.applied), "refused": list(ts.refused)}
