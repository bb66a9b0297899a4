"""The supervisor: sole owner of the task table, admission queue, event logs and slots.

A plain class, wrapped once by ``ray.remote`` in ``runtime.actors`` as an async
actor; clients (``AgentPool``, the CLI) talk to it by name. All state changes happen
on its one event loop, so any point between two awaits is a consistent state.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import os
import random
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

import cloudpickle
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayError

from threadbound.agents.workspace import Workspace, copy_path
from threadbound.snapshots import HistoryExists, Loaded, SnapshotError

from .config import RuntimeConfig
from .durability import Durability, open_location
from .errors import InvalidTask, PoolClosed, TaskNotFound, UnknownRole
from .health import (
    ACTOR_DEATH, NORMAL, PAUSED, RETRY_EXHAUSTED, STEP_FAILED, STEP_OK, STREAM_FAILURE, TIMEOUT,
    HealthMonitor, Transition,
)
from .levels import choose, fit_step, step_cost, workspace_size
from .metrics import Metrics
from .policy import check as check_policy
from .retry import backoff_s
from .sandboxing import sandbox_settings
from .slot import ERROR, RESULT, StepRequest
from .slots import Slot, SlotTable
from .task import ADMITTED, CANCELLED, FAILED, PENDING, RUNNING, SUCCEEDED, TERMINAL, TIMED_OUT, Task, TaskSummary
from .task_state import DURABLE_FIELDS, TaskState, apply_commit, digest, replay, tasks_from_snapshot, track

log = logging.getLogger("threadbound.supervisor")

READ_BATCH = 5000  # events returned by one read() call at most
READ_LINGER_S = 0.002  # after a wake-up, how long a read waits for the rest of a burst


@dataclass
class _Outcome:
    kind: str  # ok | error | rate_limit | transient | timeout | crash (the retry policy's classes)
    data: dict[str, Any]
    signal: str | None = None  # what else the health monitor hears of it (timeout, actor death, ...)


class _StepFailed(Exception):
    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status = status


def _plain(value: Any, depth: int = 0) -> bool:
    """True if ``value`` is plain data a client can print or encode as JSON."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return True
    if depth > 6:
        return False
    if isinstance(value, (list, tuple)):
        return all(_plain(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v, depth + 1) for k, v in value.items())
    return False


def _discard_copy(task_id: str) -> None:
    """Delete a finished task's workspace copy (on a thread: a big copy takes a while)."""
    try:
        Workspace.discard(task_id)
    except Exception:  # a copy left behind is a leak, not a reason to disturb the pool
        log.exception("could not delete the workspace copy of task %s; delete %s by hand", task_id,
                      copy_path(task_id))


class Supervisor:
    """Runs tasks: admits them under the caps, binds their agents to slots, enforces
    deadlines and retries, and records everything as events."""

    def __init__(
        self,
        config: RuntimeConfig,
        roles: dict[str, bytes],
        *,
        make_actor: Callable[[str], Any] | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        resume: bool = False,
        lease_owner: str | None = None,
    ) -> None:
        self.cfg = config
        self.roles: dict[str, bytes] = {}
        self.role_ids: dict[str, str] = {}
        self.blobs: dict[str, bytes] = {}  # digest -> agent class blob
        self._set_roles(roles)
        self.clock = clock
        self.rng = rng or random.Random()
        self.health = HealthMonitor(config.health, clock=clock)
        self.metrics = Metrics(config.name)
        self.sandbox = sandbox_settings(config)
        self.tasks: dict[str, TaskState] = {}
        self.queue: list[tuple[int, int, str]] = []
        self.seq = 0
        self.closing = False
        self.started_at = time.time()
        # Task ids are unique across supervisors (a workspace copy or log keyed by one
        # never meets another run's task): a sequence number plus this run's suffix.
        self.run_id = secrets.token_hex(2)
        if make_actor is None:
            from .actors import slot_actor_factory

            make_actor = slot_actor_factory(config)
        prefix = "" if config.name == "threadbound" else f"{config.name}/"
        self.slots = SlotTable(
            config.max_agents, config.recycle_after, make_actor,
            slot_name=lambda i: f"{prefix}agent/{i}",
            namespace=config.ray.namespace, on_free=self._pump,
        )
        self.durable: Durability | None = None
        self.resumed: dict[str, Any] | None = None
        self.fatal: BaseException | None = None  # why this supervisor cannot serve
        self._started = False
        self._watcher: asyncio.Task | None = None
        if config.snapshots.enabled:
            try:
                self._open_durability(resume, lease_owner)
            except (SnapshotError, OSError) as exc:
                log.error("cannot start pool %r: %s", config.name, exc)
                if not isinstance(exc, SnapshotError):
                    exc = SnapshotError(config.snapshot_location, str(exc))
                self.fatal = exc
                if self.durable is not None and self.durable.lease is not None:
                    self.durable.lease.release()
                self.durable = None
                return
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return  # started by the first call instead
        self._start()

    # -- durability -----------------------------------------------------------------

    def _open_durability(self, resume: bool, lease_owner: str | None) -> None:
        location = open_location(self.cfg)
        self.durable = Durability(self.cfg, location, self._on_durable)
        self.durable.lease = location.acquire_lease(self.cfg.snapshots.lease_ttl_s, lease_owner)
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
        if self.durable is not None:
            self.durable.start(self._export)
        if self.cfg.health.enabled:
            self._watcher = asyncio.get_running_loop().create_task(self._watch(), name="health")
        self.metrics.health_mode(self.health.mode, entered=False)
        self._pump()

    def _on_durable(self, marks: dict[str, int]) -> None:
        for task_id, n in marks.items():
            ts = self.tasks.get(task_id)
            if ts is not None and n > ts.visible:
                ts.visible = n
                self._notify(ts)

    def _export(self) -> tuple[dict[str, Any], dict[str, str], list[Callable[[], None]]]:
        """A consistent copy of the state for a snapshot (called between two awaits).

        Only shallow copies are made here; pickling runs on the snapshot thread via the
        returned jobs. A task's pickle is cached with the version it shows, so a task
        that has not changed since the last snapshot (a queued or finished one) costs
        nothing.
        """
        entries: list[Any] = []
        jobs: list[Callable[[], None]] = []
        used: set[str] = set(self.role_ids.values())
        for ts in self.tasks.values():
            used.update(ts.blob_ids.values())
            if ts.frozen is not None and ts.frozen[0] == ts.version:
                entries.append(ts.frozen[1])
                continue
            rec = {f: getattr(ts, f) for f in DURABLE_FIELDS}
            for f in ("outputs", "states", "inflight", "blob_ids"):
                rec[f] = dict(rec[f])
            rec["feedback"], rec["requests"] = list(ts.feedback), list(ts.requests)
            rec["events"] = list(ts.events)
            entries.append(rec)
            jobs.append(self._pickle_job(entries, len(entries) - 1, ts, ts.version))
        state = {"run_id": self.run_id, "seq": self.seq, "roles": dict(self.role_ids),
                 "blobs": {d: self.blobs[d] for d in used if d in self.blobs},
                 "tasks": entries, "started_at": self.started_at, "health": {"mode": self.health.mode}}
        return state, {ts.id: ts.status for ts in self.tasks.values()}, jobs

    @staticmethod
    def _pickle_job(entries: list[Any], i: int, ts: TaskState, version: int) -> Callable[[], None]:
        def job() -> None:
            entries[i] = cloudpickle.dumps(entries[i])
            ts.frozen = (version, entries[i])  # tagged: a later change makes it stale, not wrong

        return job

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
        for rec in loaded.records:
            self._replay(rec)
        interrupted = [ts for ts in self.tasks.values() if ts.status not in TERMINAL]
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
            self._emit(ts, "resumed", None, snapshot=loaded.seq, replayed=len(loaded.records),
                       skipped=self.resumed["skipped"], restarting=dict(ts.inflight))
            heapq.heappush(self.queue, (-ts.spec.priority, ts.seq, ts.id))

    def _replay(self, rec: list[Any]) -> None:
        where = self.durable.location.location if self.durable else "journal"
        self.seq = max(self.seq, replay(self.tasks, rec, on_roles=self._set_roles, where=where,
                                        on_health=self.health.restore))

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
                "started_at": self.started_at, "resumed": self.resumed, "pid": os.getpid()}

    async def register_roles(self, blobs: dict[str, bytes]) -> list[str]:
        changed = self._set_roles(blobs)
        if changed and self.durable is not None:
            self.durable.record(("roles", changed))
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

    async def submit(self, spec: Task) -> str:
        if self.fatal is not None:
            raise self.fatal
        if self.closing:
            raise PoolClosed("the pool is shutting down; no new tasks are accepted")
        self._start()
        spec = spec.validated(self.cfg.default_agents)
        check_policy(spec, self.cfg.policy)
        unknown = [r for r in spec.agents if r not in self.roles]
        if unknown:
            raise UnknownRole(unknown[0], list(self.roles))
        self.seq += 1
        task_id = f"t{self.seq:05d}-{self.run_id}"
        ts = TaskState(id=task_id, seq=self.seq, spec=spec, submitted_at=time.time(),
                        blob_ids={r: self.role_ids[r] for r in spec.agents})
        self.tasks[task_id] = ts
        if self.durable is not None:
            self.durable.record(("submit", task_id, ts.seq, spec, ts.blob_ids, ts.submitted_at))
        self._emit(ts, PENDING, None, goal=spec.goal, agents=list(spec.agents), priority=spec.priority)
        if self.health.mode != NORMAL and not spec.degrade:
            self._finish(ts, FAILED, error=self._opted_out(ts), reason="degraded")
        else:
            heapq.heappush(self.queue, (-spec.priority, ts.seq, task_id))
        if self.durable is not None:
            await self.durable.flush()  # accepted = on disk: a crash now loses nothing
        self._pump()
        return task_id

    async def read(self, task_id: str, offset: int = 0, wait_s: float = 0.0) -> tuple[list[tuple], str]:
        """Events from ``offset`` on (waiting up to ``wait_s`` for new ones), and the status."""
        ts = self._get(task_id)
        if offset < 0:
            raise InvalidTask("from_offset", f"must be >= 0, got {offset}")
        if offset >= ts.visible and not self._settled(ts) and wait_s > 0:
            try:
                await asyncio.wait_for(ts.changed.wait(), wait_s)
            except asyncio.TimeoutError:
                pass
            else:
                if not self._settled(ts):
                    # Events come in bursts (a step's end, the next one's start): let the
                    # burst land so one round trip carries it, not one per event.
                    await asyncio.sleep(READ_LINGER_S)
        return ts.events[offset:min(ts.visible, offset + READ_BATCH)], ts.status

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
        if ts.runner is None:
            self._finish(ts, CANCELLED, error=f"cancelled ({reason})", reason=reason)
        else:
            ts.runner.cancel()
            await asyncio.wait({ts.runner}, timeout=5)
        if self.durable is not None:
            await self.durable.flush()  # a cancel that returned survives a crash
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
            "queue_depth": self._queued(),
            "slots": self.slots.describe(), "replacements": self.slots.replacements,
            "max_agents": self.cfg.max_agents, "max_agents_per_task": self.cfg.max_agents_per_task,
            "durability": None if self.durable is None else {
                "location": self.durable.location.location, "segment": self.durable.segment,
                **self.durable.stats},
            "resumed": self.resumed, "health": self.health.mode,
        }

    async def health_report(self) -> dict[str, Any]:
        """The pool's health mode, every signal with its threshold, recent transitions."""
        report = self.health.report()
        report["pool"] = self.cfg.name
        report["queued"] = self._queued()
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
        if self._watcher is not None:
            self._watcher.cancel()
        for ts in list(self.tasks.values()):
            if ts.status == PENDING:
                ts.cancel_reason = "shutdown"
                self._finish(ts, CANCELLED, error="cancelled (shutdown)", reason="shutdown")
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
        if self.durable is not None:
            durable, self.durable = self.durable, None
            await durable.close(self._export)

    # -- admission ------------------------------------------------------------------

    def _pump(self) -> None:
        """Admit queued tasks, highest priority first then FIFO, while their slots fit.

        Nothing is admitted while the pool is paused; queued tasks wait for it to recover."""
        while self.queue and not self.closing and self.health.mode != PAUSED:
            _, _, task_id = self.queue[0]
            ts = self.tasks.get(task_id)
            if ts is None or ts.status in TERMINAL or ts.runner is not None:
                heapq.heappop(self.queue)
                continue
            need = min(len(set(ts.spec.agents)), self.cfg.max_agents_per_task)
            slots = self.slots.reserve(task_id, need)
            if slots is None:
                return
            heapq.heappop(self.queue)
            ts.slots = slots
            self._set_status(ts, ADMITTED, slots=[s.name for s in slots])
            ts.runner = asyncio.get_running_loop().create_task(self._run(ts), name=f"task/{task_id}")

    # -- running a task -------------------------------------------------------------

    async def _run(self, ts: TaskState) -> None:
        timeout = ts.spec.task_timeout_s or self.cfg.task_timeout_s
        ts.started_at = self.clock()
        try:
            await asyncio.wait_for(self._pipeline(ts), timeout)
        except asyncio.TimeoutError:
            self._finish(ts, TIMED_OUT, limit_s=timeout, elapsed_s=self.clock() - ts.started_at,
                         error=f"task {ts.id} exceeded its timeout of {timeout:.3f}s")
        except asyncio.CancelledError:
            reason = ts.cancel_reason or "shutdown"
            if reason == "degraded":
                self._finish(ts, FAILED, error=self._opted_out(ts), reason=reason)
            else:
                self._finish(ts, CANCELLED, error=f"cancelled ({reason})", reason=reason)
        except _StepFailed as f:
            self._finish(ts, f.status, error=str(f))
        except Exception as exc:  # a bug of ours: fail the task loudly, keep the pool up
            log.exception("task %s failed inside the supervisor", ts.id)
            self._finish(ts, FAILED, error=f"internal error: {exc!r}")
        finally:
            for slot in ts.slots:
                if slot.busy:  # cannot interrupt a running step: end its process
                    slot.busy = False
                    self.slots.replace(slot, kill=True)
                if slot.owner == ts.id:
                    self._release_slot(slot)
            ts.slots, ts.bound = [], OrderedDict()
            self._retain()

    def _release_slot(self, slot: Slot) -> None:
        # No call to the actor: its next binding replaces the agent it holds, and an
        # extra call per slot per task cost the supervisor ~7% of its time.
        self.slots.release(slot)

    async def _pipeline(self, ts: TaskState) -> None:
        """Rounds of steps; after a resume it continues at the first step not committed."""
        self._set_status(ts, RUNNING)
        if ts.level is None:
            await self._choose_level(ts)
        max_rounds = ts.spec.max_rounds or ts.max_rounds or self.cfg.max_rounds
        rnd = max(ts.round, 1)
        while rnd <= max_rounds:
            if ts.round != rnd:
                self._emit(ts, "round_started", None, round=rnd, feedback=list(ts.feedback))
            for i, role in enumerate(ts.spec.agents):
                if i >= ts.done:
                    await self._step(ts, role, rnd)
            if not ts.requests:
                self._finish(ts, SUCCEEDED)
                return
            ts.feedback = list(ts.requests)
            rnd += 1
        raise _StepFailed(FAILED, f"no success after {max_rounds} round(s); last feedback: "
                          + "; ".join(ts.feedback)[:500])

    async def _choose_level(self, ts: TaskState) -> None:
        """Pick the task's level (fixed or scored, capped, fitted to its budget): a ``level`` event."""
        spec, rcfg = ts.spec, self.cfg.reasoning
        requested = spec.level if spec.level is not None else rcfg.level
        size = None
        if requested == "auto":  # a big workspace takes a while to walk: not on the loop
            size = await asyncio.to_thread(workspace_size, spec.workspace)
        choice = choose(rcfg, spec.level, spec.goal, size, n_agents=len(spec.agents),
                        max_rounds=spec.max_rounds, default_rounds=self.cfg.max_rounds,
                        budget=self._budget(ts))
        self._emit(ts, "level", None, **choice.event())

    def _budget(self, ts: TaskState) -> float | None:
        return ts.spec.cost_budget if ts.spec.cost_budget is not None else self.cfg.reasoning.cost_budget

    def _plan(self, ts: TaskState, role: str) -> tuple[int, bool, bool]:
        """The level and streaming of the next attempt of a step, and whether it runs degraded."""
        if self.health.mode != NORMAL:
            if not ts.spec.degrade:
                raise _StepFailed(FAILED, self._opted_out(ts))
            return 1, False, True
        budget = self._budget(ts)
        level = ts.level or 1
        if budget is not None:
            fits = fit_step(self.cfg.reasoning, level, ts.spent, budget)
            if fits is None:
                raise _StepFailed(FAILED, (
                    f"task {ts.id} would exceed its cost budget of {budget:g}: it has spent {ts.spent:.4g} and "
                    f"a level-1 step of {role!r} is estimated at {step_cost(self.cfg.reasoning, 1):.4g}; "
                    "raise cost_budget or lower reasoning.levels.1.max_tokens"))
            if fits < level:
                self._emit(ts, "level", None, level=fits, requested=level, reasons=[
                    f"cost budget {budget:g}: spent {ts.spent:.4g}; a level-{level} step is estimated at "
                    f"{step_cost(self.cfg.reasoning, level):.4g}, a level-{fits} step at "
                    f"{step_cost(self.cfg.reasoning, fits):.4g}"])
                level = fits
        return level, self.cfg.streaming, False

    async def _step(self, ts: TaskState, role: str, rnd: int) -> None:
        # A step interrupted by a crash restarts under its own attempt number, so its
        # idempotency key is the same and an idempotent side effect is not repeated.
        attempt = ts.inflight.get(role, 1) - 1
        while True:
            attempt += 1
            level, streaming, degraded = self._plan(ts, role)
            out = await self._attempt(ts, role, rnd, attempt, level, streaming)
            policy = self.cfg.retry.for_class(out.kind)
            retryable = out.kind in self.cfg.retry.retry_on
            self._observe(out, degraded, exhausted=retryable and attempt >= policy.max_attempts)
            if out.kind == "ok":
                output, requests = out.data["output"], list(out.data["round_requests"])
                if self.durable is not None:
                    self.durable.record(("commit", ts.id, role, output, out.data["state"], requests))
                apply_commit(ts, role, output, out.data["state"], requests)
                self._emit(ts, "step_finished", role, round=rnd, attempt=attempt,
                           elapsed_s=out.data.get("elapsed_s"),
                           output=output if _plain(output) else repr(output)[:2000],
                           round_requests=requests, **self._cost(out.data.get("tokens"), level))
                if self.durable is not None:
                    await self.durable.flush()  # committed = in the journal
                return
            if not retryable or attempt >= policy.max_attempts:
                status = TIMED_OUT if out.kind == "timeout" else FAILED
                tried = f" after {attempt} attempt(s)" if attempt > 1 else ""
                raise _StepFailed(status, f"agent {role!r} of task {ts.id} {out.data['why']}{tried}")
            delay = backoff_s(policy, attempt, self.rng, out.data.get("retry_after_s"))
            self._emit(ts, "retrying", role, round=rnd, attempt=attempt + 1, reason=out.kind,
                       delay_s=round(delay, 3), retry_after_s=out.data.get("retry_after_s"))
            await asyncio.sleep(delay)

    def _tokens_left(self, ts: TaskState, level: int) -> int | None:
        """What is left of the task's budget, in tokens at ``level``: a hard cap for the step."""
        budget, price = self._budget(ts), self.cfg.reasoning.spec(level).price_per_1k_tokens
        if budget is None or price <= 0:
            return None
        return max(0, int((budget - ts.spent) * 1000.0 / price + 1e-9))

    def _cost(self, tokens: int | None, level: int) -> dict[str, Any]:
        """What a step's model tokens cost at its level (the fields of its end event)."""
        tokens = int(tokens or 0)
        price = self.cfg.reasoning.spec(level).price_per_1k_tokens
        return {"level": level, "tokens": tokens, "cost": round(tokens * price / 1000.0, 9)}

    async def _bind(self, ts: TaskState, role: str) -> Slot:
        slot = ts.bound.get(role)
        if slot is not None:
            ts.bound.move_to_end(role)
        else:
            used = set(ts.bound.values())
            free = [s for s in ts.slots if s not in used]
            if free:
                slot = free[0]
            else:  # more roles than slots: the least recently used role gives up its slot
                _, slot = ts.bound.popitem(last=False)
            ts.binds += 1
            ts.bound[role] = slot
            ts.bind_keys[role] = f"{ts.id}/{role}/{ts.binds}"
        await self.slots.wait_ready(slot)
        return slot

    async def _attempt(self, ts: TaskState, role: str, rnd: int, attempt: int, level: int,
                       streaming: bool) -> _Outcome:
        slot = await self._bind(ts, role)
        timeout = ts.spec.step_timeout_s or self.cfg.step_timeout_s
        lv = self.cfg.reasoning.spec(level)
        options = {k: v for k, v in (("model", lv.model), ("max_tokens", lv.max_tokens),
                                     ("temperature", lv.temperature)) if v is not None}
        req = StepRequest(
            binding=ts.bind_keys[role], agent_blob=self.blobs[ts.blob_ids[role]], task_id=ts.id, role=role,
            goal=ts.spec.goal, workspace=ts.spec.workspace, round=rnd, attempt=attempt,
            idempotency_key=f"{ts.id}:{rnd}:{role}:{attempt}", inputs=ts.spec.inputs,
            outputs=dict(ts.outputs), feedback=list(ts.feedback), level=level,
            streaming=streaming, model_config=self.cfg.model, model_options=options,
            token_batch_size=self.cfg.token_batch_size,
            token_interval_s=self.cfg.token_interval_ms / 1000.0,
            state=ts.states.get(role), has_state=role in ts.states,
            tokens_left=self._tokens_left(ts, level), sandbox=self.sandbox,
        )
        self._emit(ts, "step_started", role, round=rnd, attempt=attempt, slot=slot.name, pid=slot.pid,
                   level=level, streaming=streaming)
        started = self.clock()
        deadline = started + timeout
        partial: list[str] = []
        streamed = 0  # tokens received, for the cost of a step that ends without a result
        held: list[str] = []  # tokens of a streaming step that the pool stopped streaming

        def release_held() -> None:
            if held:
                self._emit(ts, "message", role, text="".join(held), degraded=True)
                held.clear()

        slot.busy = True
        try:
            gen = slot.handle.run_step.options(name=f"{role}/{ts.id}").remote(req)
            while True:
                remaining = deadline - self.clock()
                if remaining <= 0:
                    raise asyncio.TimeoutError
                ref = await asyncio.wait_for(gen.__anext__(), remaining)
                if ts.cancel_reason is not None:
                    # Python < 3.12: wait_for drops a cancel that lands as its inner await
                    # completes; the reason set by cancel() makes the cancel stick anyway.
                    raise asyncio.CancelledError
                for kind, data in await ref:
                    if kind == RESULT:
                        slot.busy = False
                        release_held()
                        return _Outcome("ok", data)
                    if kind == ERROR:
                        slot.busy = False
                        release_held()
                        klass = data["error_class"] or "error"
                        self._emit(ts, "step_failed", role, round=rnd, attempt=attempt,
                                   error=f"{data['type']}: {data['message']}", transient=data["transient"],
                                   error_class=klass, retry_after_s=data.get("retry_after_s"),
                                   traceback=data["traceback"][-4000:], **self._cost(data.get("tokens"), level))
                        return _Outcome(klass, {"why": f"failed: {data['type']}: {data['message']}",
                                                "retry_after_s": data.get("retry_after_s")})
                    if kind == "tokens":
                        partial.append(data["text"])
                        streamed += data.get("n", 1)
                        if self.health.mode != NORMAL and ts.spec.degrade:
                            held.append(data["text"])  # degraded mid-step: the rest comes as one message
                            continue
                    else:
                        release_held()
                    self._emit(ts, kind, role, **(data if isinstance(data, dict) else {"value": data}))
        except asyncio.TimeoutError:
            slot.busy = False
            release_held()
            elapsed = self.clock() - started
            self.slots.replace(slot, kill=True)  # a running sync method cannot be interrupted
            self._emit(ts, "step_timed_out", role, round=rnd, attempt=attempt, limit_s=timeout,
                       elapsed_s=round(elapsed, 3), partial="".join(partial)[-4000:], slot=slot.name,
                       **self._cost(streamed, level))
            return _Outcome("timeout", {"why": f"exceeded its step timeout of {timeout:.3f}s "
                                               f"(elapsed: {elapsed:.1f}s)"}, signal=TIMEOUT)
        except StopAsyncIteration:
            slot.busy = False
            release_held()
            return _Outcome("crash", {"why": "ended its step without a result"})
        except RayError as exc:
            slot.busy = False
            release_held()
            self.slots.replace(slot, kill=True)
            died = isinstance(exc, (RayActorError, ActorDiedError, ActorUnavailableError))
            self._emit(ts, "agent_crashed" if died else "stream_failed", role, round=rnd, attempt=attempt,
                       slot=slot.name, error=f"{type(exc).__name__}: "
                       f"{str(exc).splitlines()[0] if str(exc) else ''}"[:500], **self._cost(streamed, level))
            if died:
                return _Outcome("crash", {"why": f"crashed (its actor {slot.name} died)"}, signal=ACTOR_DEATH)
            return _Outcome("crash", {"why": f"lost its event stream ({type(exc).__name__}); its actor "
                                             f"{slot.name} was replaced"}, signal=STREAM_FAILURE)

    # -- health ---------------------------------------------------------------------

    async def _watch(self) -> None:
        """Re-evaluate health on a timer: recovery and memory pressure need no step to happen."""
        while True:
            await asyncio.sleep(self.cfg.health.check_interval_s)
            try:
                self._evaluate()
            except Exception:  # a monitor bug must not stop the pool
                log.exception("health evaluation failed")

    def _observe(self, out: _Outcome, degraded: bool, exhausted: bool) -> None:
        """Tell the monitor how a step attempt ended, then let it decide."""
        self.health.record(STEP_OK if out.kind == "ok" else STEP_FAILED, degraded)
        if out.signal is not None:
            self.health.record(out.signal, degraded)
        if exhausted and out.kind != "ok":
            self.health.record(RETRY_EXHAUSTED, degraded)
        self._evaluate()

    def _evaluate(self) -> None:
        change = self.health.evaluate()
        if change is not None:
            self._on_transition(change)

    def _on_transition(self, t: Transition) -> None:
        """Tell every unfinished task, the log, the journal and the metrics; act on the new mode."""
        log.warning("pool %r health: %s -> %s (%s)", self.cfg.name, t.old, t.new, "; ".join(t.reasons))
        self.metrics.health_mode(t.new)
        if self.durable is not None:
            self.durable.record(("health", t.new))
        degraded = t.new != NORMAL
        for ts in list(self.tasks.values()):
            if ts.status in TERMINAL:
                continue
            self._emit(ts, "health", None, mode=t.new, previous=t.old, reasons=list(t.reasons),
                       level=1 if degraded and ts.spec.degrade else ts.level,
                       streaming=self.cfg.streaming and not degraded, admitting=t.new != PAUSED)
            if degraded and not ts.spec.degrade:
                ts.cancel_reason = "degraded"
                if ts.runner is None:
                    self._finish(ts, FAILED, error=self._opted_out(ts), reason="degraded")
                else:
                    ts.runner.cancel()
        if t.old == PAUSED:
            self._pump()

    def _opted_out(self, ts: TaskState) -> str:
        why = "; ".join(self.health.transitions[-1].reasons) if self.health.transitions else self.health.mode
        return (f"task {ts.id} opted out of degradation (degrade: false) and the pool is {self.health.mode} "
                f"({why}); resubmit it when pool.health() reports normal, or allow degrade")

    # -- events and state -----------------------------------------------------------

    def _emit(self, ts: TaskState, kind: str, agent: str | None, **data: Any) -> None:
        row = (len(ts.events), kind, agent, data, time.time())
        ts.events.append(row)
        ts.version += 1
        track(ts, row)
        if self.durable is not None:  # visible once written: see _on_durable
            self.durable.record(("ev", ts.id, *row), ts.id, len(ts.events))
        else:
            ts.visible = len(ts.events)
            self._notify(ts)

    @staticmethod
    def _notify(ts: TaskState) -> None:
        ts.changed.set()
        ts.changed = asyncio.Event()

    @staticmethod
    def _settled(ts: TaskState) -> bool:
        """Terminal, and every event (the final one included) readable."""
        return ts.status in TERMINAL and ts.visible >= len(ts.events)

    def _set_status(self, ts: TaskState, status: str, **data: Any) -> None:
        self._emit(ts, status, None, **data)

    def _finish(self, ts: TaskState, status: str, **data: Any) -> None:
        if ts.status in TERMINAL:
            return
        if ts.spec.workspace:  # the final event says where the copy was and whether it is kept
            data.update(workspace_copy=str(copy_path(ts.id)), workspace_copy_kept=self.cfg.workspace.keep_copies)
        self._set_status(ts, status, **data)
        if ts.spec.workspace and not self.cfg.workspace.keep_copies:
            try:
                asyncio.get_running_loop().run_in_executor(None, _discard_copy, ts.id)
            except RuntimeError:  # no loop (unit tests of the plain class)
                _discard_copy(ts.id)

    def _queued(self) -> int:
        return sum(1 for *_, t in self.queue if self.tasks.get(t) and self.tasks[t].status == PENDING)

    def _retain(self) -> None:
        finished = [ts for ts in self.tasks.values() if ts.status in TERMINAL]
        forget = [ts.id for ts in finished[: max(0, len(finished) - self.cfg.keep_finished_tasks)]]
        for task_id in forget:
            del self.tasks[task_id]
        if forget and self.durable is not None:
            self.durable.record(("forget", forget))

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
                           submitted_at=ts.submitted_at, finished_at=ts.finished_at, error=ts.error)

    def _result(self, ts: TaskState) -> dict[str, Any]:
        end = ts.finished_at or time.time()
        return {"task_id": ts.id, "status": ts.status, "outputs": dict(ts.outputs), "rounds": ts.round,
                "error": ts.error, "elapsed_s": end - ts.submitted_at}
