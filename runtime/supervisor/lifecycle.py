"""A task's life in the supervisor, between the parts: queued for slots, granted them and
run, parked while a person is asked, ended -- and what the pool's health mode does to
every task when it changes.

:class:`TaskLife` is the ``Lifecycle`` the rounds call (``finish``, ``task_ended``,
``task_waits``); capacity calls it back when a task's slots are granted (``launch``).
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from threadbound.agents import events as ev
from threadbound.agents.copies import copy_path
from threadbound.agents.workspace import Workspace

from ..config import RuntimeConfig
from ..task import ADMITTED, FAILED, TERMINAL, WAITING
from .capacity import Capacity
from .health import NORMAL, PAUSED, Health
from .hooks import Hooks, Transition
from .rounds import run_task
from .shard import TaskShard
from .places import Slot
from .task_state import RunState, TaskRecord

if TYPE_CHECKING:
    from .attempt import StepEnv
    from .inputs import PersonInTheLoop

log = logging.getLogger("threadbound.supervisor")


def _discard_copy(task_id: str) -> None:
    """Delete a finished task's workspace copy (on a thread: a big copy takes a while)."""
    try:
        Workspace.discard(task_id)
    except Exception:  # a copy left behind is a leak, not a reason to disturb the pool
        log.exception("could not delete the workspace copy of task %s; delete %s by hand", task_id,
                      copy_path(task_id))


class TaskLife:
    """Queues, launches, parks and ends tasks; applies health transitions."""

    def __init__(self, cfg: RuntimeConfig, shard: TaskShard, capacity: Capacity, health: Health,
                 hooks: Hooks) -> None:
        self.cfg, self.shard, self.capacity, self.health, self.hooks = cfg, shard, capacity, health, hooks
        self.env: "StepEnv | None" = None  # set by the supervisor once built
        self.inputs: "PersonInTheLoop | None" = None
        self.closing = False

    @property
    def tasks(self) -> dict[str, TaskRecord]:
        return self.shard.tasks

    def enqueue(self, ts: TaskRecord) -> None:
        """Ask capacity for the task's slots; its run starts when they are granted."""
        ts.run.state = RunState.QUEUED
        home = next((row.data.get("node") for row in reversed(ts.events) if row.kind == ADMITTED), None)
        self.capacity.request(ts.id, len(set(ts.spec.agents)), ts.spec.priority, ts.seq, home)

    def pump(self) -> None:
        """Grant queued tasks their slots while they fit (nothing while paused or closing)."""
        self.capacity.holding = self.closing or self.health.mode == PAUSED
        self.capacity.pump()

    def launch(self, task_id: str, slots: list[Slot]) -> None:
        ts = self.tasks[task_id]
        node = self.capacity.slots.home_of(ts.id)  # on a cluster: where its agents and its workspace copy are
        self.shard.emit(ts, ADMITTED, None, slots=[s.name for s in slots], **({"node": node} if node else {}))
        ts.run.slots, ts.run.state = slots, RunState.RUNNING
        ts.run.runner = asyncio.get_running_loop().create_task(run_task(self.env, ts), name=f"task/{ts.id}")

    def finish(self, ts: TaskRecord, status: str, **data: Any) -> None:
        if ts.status in TERMINAL:
            return
        self.inputs.disarm(ts)
        self.capacity.withdraw(ts.id)
        if ts.spec.workspace:  # the final event says where the copy was and whether it is kept
            data.update(workspace_copy=str(copy_path(ts.id)), workspace_copy_kept=self.cfg.workspace.keep_copies)
        self.shard.emit(ts, status, None, **{k: v for k, v in data.items() if v is not None})
        self.shard.finished += 1
        if ts.spec.workspace and not self.cfg.workspace.keep_copies:
            self.capacity.discard_copy(ts.id, _discard_copy)  # on the node the copy is on
        if ts.run.state is not RunState.RUNNING:  # queued or parked: no run will end it
            ts.run.state = RunState.IDLE
            self.retain()

    def task_ended(self, ts: TaskRecord) -> None:
        """The task's run is over (its steps have stopped): its slots go back, old tasks are forgotten."""
        run = ts.run
        self.capacity.release(ts.id, run.slots, ended=ts.status in TERMINAL)
        run.slots, run.bound, run.runner = [], OrderedDict(), None
        run.state = RunState.PARKED if ts.status == WAITING else RunState.IDLE  # an answer queues it again
        self.retain()

    def task_waits(self, ts: TaskRecord) -> None:
        """Nothing of the task can run until a person answers: it waits, holding no actor,
        for up to its ``wait_timeout_s``."""
        self.shard.emit(ts, WAITING, None, requests=sorted(ts.asks), ran_s=round(ts.ran_s, 3),
                        wait_timeout_s=self.inputs.limit(ts))
        self.inputs.arm(ts)

    def retain(self) -> None:
        forget = self.shard.forget_beyond(self.cfg.keep_finished_tasks)
        if forget and self.env.durable is not None:
            self.env.durable.forgot(forget)

    def on_transition(self, t: Transition) -> None:
        """Journal it, tell every unfinished task, the log and the observers; act on the new mode."""
        log.warning("pool %r health: %s -> %s (%s)", self.cfg.name, t.old, t.new, "; ".join(t.reasons))
        if self.env.durable is not None:
            self.env.durable.mode(t.new)
        self.hooks.on_transition(t)
        degraded = t.new != NORMAL
        for ts in list(self.tasks.values()):
            if ts.status in TERMINAL:
                continue
            self.shard.emit(ts, ev.HEALTH, None, mode=t.new, previous=t.old, reasons=list(t.reasons),
                            level=1 if degraded and ts.spec.degrade else ts.level,
                            streaming=self.cfg.streaming and not degraded, admitting=t.new != PAUSED)
            if degraded and not ts.spec.degrade:
                ts.run.cancel_reason = "degraded"
                if ts.run.state is RunState.RUNNING:
                    ts.run.runner.cancel()
                else:
                    self.finish(ts, FAILED, error=self.health.opted_out(ts), reason="degraded")
        self.pump()
