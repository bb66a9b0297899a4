"""The supervisor: sole owner of the task table, admission queue, event logs and slots.

A plain class, wrapped once by ``ray.remote`` in ``runtime.actors`` as an async
actor; clients (``AgentPool``, the CLI) talk to it by name. All state changes happen
on its one event loop, so any point between two awaits is a consistent state.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import random
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

from ray.exceptions import RayError

from .config import RuntimeConfig
from .errors import InvalidTask, PoolClosed, TaskNotFound, UnknownRole
from .retry import backoff_s
from .slot import ERROR, RESULT, StepRequest
from .slots import Slot, SlotTable
from .task import (
    ADMITTED, CANCELLED, FAILED, PENDING, RUNNING, SUCCEEDED, TERMINAL, TIMED_OUT,
    Task, TaskSummary,
)

log = logging.getLogger("threadbound.supervisor")

READ_BATCH = 5000  # events returned by one read() call at most


@dataclass(eq=False)
class _TaskState:
    id: str
    spec: Task
    blobs: dict[str, bytes]
    submitted_at: float
    status: str = PENDING
    events: list[tuple] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    round: int = 0
    outputs: dict[str, Any] = field(default_factory=dict)
    states: dict[str, Any] = field(default_factory=dict)  # role -> committed agent state
    feedback: list[str] = field(default_factory=list)
    error: str | None = None
    started_at: float | None = None
    finished_at: float | None = None
    slots: list[Slot] = field(default_factory=list)
    bound: "OrderedDict[str, Slot]" = field(default_factory=OrderedDict)
    bind_keys: dict[str, str] = field(default_factory=dict)
    binds: int = 0
    runner: asyncio.Task | None = None
    cancel_reason: str | None = None


@dataclass
class _Outcome:
    kind: str  # ok | error | transient | timeout | crash
    data: dict[str, Any]


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
    ) -> None:
        self.cfg = config
        self.roles = dict(roles)
        self.clock = clock
        self.rng = rng or random.Random()
        self.tasks: dict[str, _TaskState] = {}
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

    # -- client API -----------------------------------------------------------------

    async def info(self) -> dict[str, Any]:
        return {"name": self.cfg.name, "config": self.cfg, "roles": sorted(self.roles),
                "started_at": self.started_at}

    async def register_roles(self, blobs: dict[str, bytes]) -> list[str]:
        self.roles.update(blobs)
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
        if self.closing:
            raise PoolClosed("the pool is shutting down; no new tasks are accepted")
        spec = spec.validated(self.cfg.default_agents)
        unknown = [r for r in spec.agents if r not in self.roles]
        if unknown:
            raise UnknownRole(unknown[0], list(self.roles))
        self.seq += 1
        task_id = f"t{self.seq:05d}-{self.run_id}"
        ts = _TaskState(id=task_id, spec=spec, submitted_at=time.time(),
                        blobs={r: self.roles[r] for r in spec.agents})
        self.tasks[task_id] = ts
        self._emit(ts, PENDING, None, goal=spec.goal, agents=list(spec.agents), priority=spec.priority)
        heapq.heappush(self.queue, (-spec.priority, self.seq, task_id))
        self._pump()
        return task_id

    async def read(self, task_id: str, offset: int = 0, wait_s: float = 0.0) -> tuple[list[tuple], str]:
        """Events from ``offset`` on (waiting up to ``wait_s`` for new ones), and the status."""
        ts = self._get(task_id)
        if offset < 0:
            raise InvalidTask("from_offset", f"must be >= 0, got {offset}")
        if offset >= len(ts.events) and ts.status not in TERMINAL and wait_s > 0:
            try:
                await asyncio.wait_for(ts.changed.wait(), wait_s)
            except asyncio.TimeoutError:
                pass
        return ts.events[offset:offset + READ_BATCH], ts.status

    async def wait(self, task_id: str, timeout_s: float | None) -> dict[str, Any] | None:
        """The task's result once terminal, or None if ``timeout_s`` passes first."""
        ts = self._get(task_id)
        deadline = None if timeout_s is None else self.clock() + timeout_s
        while ts.status not in TERMINAL:
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
            "queue_depth": sum(1 for *_, t in self.queue if self.tasks.get(t) and self.tasks[t].status == PENDING),
            "slots": self.slots.describe(), "replacements": self.slots.replacements,
            "max_agents": self.cfg.max_agents, "max_agents_per_task": self.cfg.max_agents_per_task,
        }

    async def shutdown(self, grace_s: float | None = None) -> None:
        """Stop admitting, let running tasks finish for ``grace_s``, cancel the rest, kill slots."""
        grace = self.cfg.shutdown_grace_s if grace_s is None else grace_s
        self.closing = True
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

    # -- admission ------------------------------------------------------------------

    def _pump(self) -> None:
        """Admit queued tasks, highest priority first then FIFO, while their slots fit."""
        while self.queue and not self.closing:
            _, _, task_id = self.queue[0]
            ts = self.tasks.get(task_id)
            if ts is None or ts.status != PENDING:
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

    async def _run(self, ts: _TaskState) -> None:
        timeout = ts.spec.task_timeout_s or self.cfg.task_timeout_s
        ts.started_at = self.clock()
        try:
            await asyncio.wait_for(self._pipeline(ts), timeout)
        except asyncio.TimeoutError:
            self._finish(ts, TIMED_OUT, limit_s=timeout, elapsed_s=self.clock() - ts.started_at,
                         error=f"task {ts.id} exceeded its timeout of {timeout:.3f}s")
        except asyncio.CancelledError:
            reason = ts.cancel_reason or "shutdown"
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
                    self._spawn_release(slot, ts)
            ts.slots, ts.bound = [], OrderedDict()
            self._retain()

    def _spawn_release(self, slot: Slot, ts: _TaskState) -> None:
        async def release() -> None:
            if slot.handle is not None and not slot.replacing:
                try:
                    await asyncio.wait_for(slot.handle.release.remote(), 5)
                except (RayError, asyncio.TimeoutError):
                    self.slots.replace(slot, kill=True)
            self.slots.release(slot)

        asyncio.get_running_loop().create_task(release())

    async def _pipeline(self, ts: _TaskState) -> None:
        self._set_status(ts, RUNNING)
        max_rounds = ts.spec.max_rounds or self.cfg.max_rounds
        for rnd in range(1, max_rounds + 1):
            ts.round = rnd
            self._emit(ts, "round_started", None, round=rnd, feedback=list(ts.feedback))
            requests: list[str] = []
            for role in ts.spec.agents:
                requests += await self._step(ts, role, rnd)
            if not requests:
                self._finish(ts, SUCCEEDED)
                return
            ts.feedback = requests
        raise _StepFailed(FAILED, f"no success after {max_rounds} round(s); last feedback: "
                          + "; ".join(ts.feedback)[:500])

    async def _step(self, ts: _TaskState, role: str, rnd: int) -> list[str]:
        policy = self.cfg.retry
        attempt = 0
        while True:
            attempt += 1
            out = await self._attempt(ts, role, rnd, attempt)
            if out.kind == "ok":
                ts.outputs[role] = out.data["output"]
                ts.states[role] = out.data["state"]
                output = out.data["output"]
                self._emit(ts, "step_finished", role, round=rnd, attempt=attempt,
                           elapsed_s=out.data.get("elapsed_s"),
                           output=output if _plain(output) else repr(output)[:2000],
                           round_requests=out.data["round_requests"])
                return out.data["round_requests"]
            retryable = out.kind in policy.retry_on and attempt < policy.max_attempts
            if not retryable:
                status = TIMED_OUT if out.kind == "timeout" else FAILED
                tried = f" after {attempt} attempt(s)" if attempt > 1 else ""
                raise _StepFailed(status, f"agent {role!r} of task {ts.id} {out.data['why']}{tried}")
            delay = backoff_s(policy, attempt, self.rng, out.data.get("retry_after_s"))
            self._emit(ts, "retrying", role, round=rnd, attempt=attempt + 1, reason=out.kind,
                       delay_s=round(delay, 3))
            await asyncio.sleep(delay)

    async def _bind(self, ts: _TaskState, role: str) -> Slot:
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

    async def _attempt(self, ts: _TaskState, role: str, rnd: int, attempt: int) -> _Outcome:
        slot = await self._bind(ts, role)
        timeout = ts.spec.step_timeout_s or self.cfg.step_timeout_s
        level = min(ts.spec.level or self.cfg.reasoning.level, self.cfg.reasoning.max_level)
        req = StepRequest(
            binding=ts.bind_keys[role], agent_blob=ts.blobs[role], task_id=ts.id, role=role,
            goal=ts.spec.goal, workspace=ts.spec.workspace, round=rnd, attempt=attempt,
            idempotency_key=f"{ts.id}:{rnd}:{role}:{attempt}", inputs=ts.spec.inputs,
            outputs=dict(ts.outputs), feedback=list(ts.feedback), level=level,
            streaming=self.cfg.streaming, model_config=self.cfg.model,
            token_batch_size=self.cfg.token_batch_size,
            token_interval_s=self.cfg.token_interval_ms / 1000.0,
            state=ts.states.get(role), has_state=role in ts.states,
        )
        self._emit(ts, "step_started", role, round=rnd, attempt=attempt, slot=slot.name, pid=slot.pid)
        started = self.clock()
        deadline = started + timeout
        partial: list[str] = []
        slot.busy = True
        try:
            gen = slot.handle.run_step.options(name=f"{role}/{ts.id}").remote(req)
            while True:
                remaining = deadline - self.clock()
                if remaining <= 0:
                    raise asyncio.TimeoutError
                ref = await asyncio.wait_for(gen.__anext__(), remaining)
                for kind, data in await ref:
                    if kind == RESULT:
                        slot.busy = False
                        return _Outcome("ok", data)
                    if kind == ERROR:
                        slot.busy = False
                        self._emit(ts, "step_failed", role, round=rnd, attempt=attempt,
                                   error=f"{data['type']}: {data['message']}", transient=data["transient"],
                                   traceback=data["traceback"][-4000:])
                        kind_ = "transient" if data["transient"] else "error"
                        return _Outcome(kind_, {"why": f"failed: {data['type']}: {data['message']}",
                                                "retry_after_s": data.get("retry_after_s")})
                    if kind == "tokens":
                        partial.append(data["text"])
                    self._emit(ts, kind, role, **(data if isinstance(data, dict) else {"value": data}))
        except asyncio.TimeoutError:
            slot.busy = False
            elapsed = self.clock() - started
            self.slots.replace(slot, kill=True)  # a running sync method cannot be interrupted
            self._emit(ts, "step_timed_out", role, round=rnd, attempt=attempt, limit_s=timeout,
                       elapsed_s=round(elapsed, 3), partial="".join(partial)[-4000:], slot=slot.name)
            return _Outcome("timeout", {"why": f"exceeded its step timeout of {timeout:.3f}s "
                                               f"(elapsed: {elapsed:.1f}s)"})
        except StopAsyncIteration:
            slot.busy = False
            return _Outcome("crash", {"why": "ended its step without a result"})
        except RayError as exc:
            slot.busy = False
            self.slots.replace(slot, kill=True)
            self._emit(ts, "agent_crashed", role, round=rnd, attempt=attempt, slot=slot.name,
                       error=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:500])
            return _Outcome("crash", {"why": f"crashed (its actor {slot.name} died)"})

    # -- events and state -----------------------------------------------------------

    def _emit(self, ts: _TaskState, kind: str, agent: str | None, **data: Any) -> None:
        ts.events.append((len(ts.events), kind, agent, data, time.time()))
        ts.changed.set()
        ts.changed = asyncio.Event()

    def _set_status(self, ts: _TaskState, status: str, **data: Any) -> None:
        ts.status = status
        self._emit(ts, status, None, **data)

    def _finish(self, ts: _TaskState, status: str, **data: Any) -> None:
        if ts.status in TERMINAL:
            return
        ts.finished_at = time.time()
        ts.error = data.get("error")
        self._set_status(ts, status, **data)

    def _retain(self) -> None:
        finished = [ts for ts in self.tasks.values() if ts.status in TERMINAL]
        for ts in finished[: max(0, len(finished) - self.cfg.keep_finished_tasks)]:
            del self.tasks[ts.id]

    def _get(self, task_id: str) -> _TaskState:
        ts = self.tasks.get(task_id)
        if ts is None:
            raise TaskNotFound(f"no task {task_id!r} in pool {self.cfg.name!r} "
                               "(finished tasks beyond keep_finished_tasks are forgotten)",
                               task_id=task_id)
        return ts

    def _summary(self, ts: _TaskState) -> TaskSummary:
        return TaskSummary(task_id=ts.id, status=ts.status, goal=ts.spec.goal,
                           agents=tuple(ts.spec.agents), round=ts.round, events=len(ts.events),
                           submitted_at=ts.submitted_at, finished_at=ts.finished_at, error=ts.error)

    def _result(self, ts: _TaskState) -> dict[str, Any]:
        end = ts.finished_at or time.time()
        return {"task_id": ts.id, "status": ts.status, "outputs": dict(ts.outputs), "rounds": ts.round,
                "error": ts.error, "elapsed_s": end - ts.submitted_at}
