"""Admission and binding: which queued task gets agent actors next, and which of its
actors a role runs on.

A task is admitted when ``min(its roles, max_agents_per_task)`` slots are free (all or
none, so the caps are never exceeded), highest priority first, then first come first
served; nothing is admitted while the pool is paused or closing. An admitted task holds
its slots until it ends; each role is bound to one of them (a fresh agent instance per
binding). A task with more roles than slots lends the slot of the role used least
recently (and not running) to the next one.

On a cluster a task's slots are all on one node, its home (``slots``, ``placement``):
its workspace copy is made there by its first agent, and deleted there when it ends
(:meth:`Admission.discard_copy`). A task is never given more slots than one node can
hold. When its home dies, its slots start again on a surviving node; its next binding
then raises :class:`WorkspaceLost` (the copy, and with it the round's work on it, is
gone), and the task starts its round again from the original workspace.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
from collections import OrderedDict
from typing import Any, Callable

from .slots import Slot, SlotTable
from ..task import ADMITTED, PENDING, TERMINAL
from .task_state import TaskState

log = logging.getLogger("threadbound.admission")


def _swapping(slot: Slot) -> bool:
    """Its process is being replaced (recycled, or after a kill), not started for the first time."""
    return slot.replacing and slot.generation > 0


class SlotLost(Exception):
    """The actor of the slot a step was to run on could not start (a crash of the step)."""

    def __init__(self, slot: Slot, cause: BaseException) -> None:
        super().__init__(f"its actor {slot.name} could not start: {type(cause).__name__}: {cause}"[:500])
        self.slot = slot


class WorkspaceLost(Exception):
    """The node holding a task's workspace copy died; its agents now run on ``node``.

    Raised by :meth:`Admission.bind` once, the first time one of the task's roles binds
    after the move; the copy on the new node is fresh from the original workspace, so the
    round starts again."""

    def __init__(self, task_id: str, lost: str, node: str) -> None:
        super().__init__(f"the node {lost} holding the workspace copy of task {task_id} is gone; its agents "
                         f"now run on node {node}, from a fresh copy of the original workspace")
        self.task_id, self.lost, self.node = task_id, lost, node


def _last_home(ts: TaskState) -> str | None:
    """The node the task's agents last ran on (its last ``admitted`` event says), if any."""
    for row in reversed(ts.events):
        if row[1] == ADMITTED:
            return row[3].get("node")
    return None


class Admission:
    """The admission queue and the binding of a task's roles to its slots."""

    def __init__(self, slots: SlotTable, max_per_task: int) -> None:
        self.slots = slots
        self.max_per_task = max_per_task
        self.queue: list[tuple[int, int, str]] = []  # (-priority, seq, task id): a heap
        self._bg: set[asyncio.Task] = set()  # copies being deleted on other nodes

    def enqueue(self, ts: TaskState) -> None:
        heapq.heappush(self.queue, (-ts.spec.priority, ts.seq, ts.id))

    def width(self, ts: TaskState) -> int:
        """How many slots the task holds (and so how many of its roles run at once)."""
        width = min(len(set(ts.spec.agents)), self.max_per_task)
        placement = self.slots.placement
        if placement is not None:  # all on one node: no more than the largest node holds
            width = min(width, max(1, placement.largest()))
        return width

    def queued(self, tasks: dict[str, TaskState]) -> int:
        return sum(1 for *_, t in self.queue if t in tasks and tasks[t].status == PENDING)

    def admit(self, tasks: dict[str, TaskState], start: Callable[[TaskState, list[Slot]], None]) -> None:
        """Admit queued tasks while their slots fit; ``start`` runs each one admitted."""
        while self.queue:
            _, _, task_id = self.queue[0]
            ts = tasks.get(task_id)
            if ts is None or ts.status in TERMINAL or ts.runner is not None:
                heapq.heappop(self.queue)
                continue
            if self.slots.placement is not None and task_id not in self.slots.homes:
                node = _last_home(ts)
                if node is not None:  # it ran before this supervisor: its copy is on that node
                    self.slots.homes[task_id] = node
            slots = self.slots.reserve(task_id, self.width(ts))
            if slots is None:
                return
            heapq.heappop(self.queue)
            ts.slots = slots
            start(ts, slots)

    async def bind(self, ts: TaskState, role: str) -> Slot:
        """The slot ``role`` runs its next step on (ready to take the call)."""
        slot = ts.bound.get(role)
        other = None
        if slot is not None and _swapping(slot):
            other = self._other(ts, role)  # its process is being replaced: a ready one instead?
            if other is not None:
                del ts.bound[role]
                slot = None
        if slot is not None:
            ts.bound.move_to_end(role)
        else:
            slot = other or self._other(ts, role) or self._any(ts)
            ts.binds += 1
            ts.bound[role] = slot
            ts.bind_keys[role] = f"{ts.id}/{role}/{ts.binds}"
        try:
            await self.slots.wait_ready(slot)
        except Exception as exc:  # its actor could not start: start another, and say so
            self.slots.replace(slot, kill=True)
            raise SlotLost(slot, exc) from exc
        moved = self.slots.moved.pop(ts.id, None)
        if moved is not None and ts.spec.workspace:
            # On a shared disk the old copy may still be there: the round starts from the original.
            await self.discard_copy_on(ts.id, moved[1])
            raise WorkspaceLost(ts.id, *moved)
        return slot

    @staticmethod
    def _other(ts: TaskState, role: str) -> Slot | None:
        """A ready slot for ``role``: a free one, else (when no free one is merely starting
        for the first time) one lent by a role not running, the least recently used; None
        if there is none."""
        used = set(ts.bound.values())
        for s in ts.slots:
            if s not in used and not s.replacing:
                return s
        if any(s not in used and not _swapping(s) for s in ts.slots):
            return None  # a free one is starting for the first time: each role gets its own
        for r in ts.bound:
            if r != role and r not in ts.running and not ts.bound[r].replacing:
                return ts.bound.pop(r)
        return None

    @staticmethod
    def _any(ts: TaskState) -> Slot:
        """A slot for a role when none is ready: a free one, else the least recently used
        idle role's (there is one: a task runs at most as many roles as it has slots)."""
        used = set(ts.bound.values())
        for s in ts.slots:
            if s not in used:
                return s
        return ts.bound.pop(next(r for r in ts.bound if r not in ts.running))

    def release(self, ts: TaskState) -> None:
        """The task ended: its slots go back to the pool (after its steps have stopped).

        No call to the actors: a slot's next binding replaces the agent it holds, and an
        extra call per slot per task cost the supervisor ~7% of its time."""
        for slot in ts.slots:
            if slot.owner == ts.id:
                self.slots.release(slot)
        ts.slots, ts.bound = [], OrderedDict()
        if ts.status in TERMINAL:  # (a task waiting for a person comes back to the node of its copy)
            self.slots.homes.pop(ts.id, None)
            self.slots.moved.pop(ts.id, None)

    # -- the workspace copy, where it is ---------------------------------------------------

    def discard_copy(self, task_id: str, here: Callable[[str], Any]) -> None:
        """Delete a finished task's workspace copy where it is: ``here(task_id)`` on a
        thread when the task's agents ran on this node (or off Ray), else a small Ray
        task on their node. Never raises: a copy left behind is logged, not fatal."""
        node = self.slots.home_of(task_id)
        placement = self.slots.placement
        if node is None or placement is None or node == placement.here():
            try:
                asyncio.get_running_loop().run_in_executor(None, here, task_id)
            except RuntimeError:  # no loop (unit tests of the plain class)
                here(task_id)
            return
        try:
            task = asyncio.get_running_loop().create_task(self.discard_copy_on(task_id, node))
        except RuntimeError:
            here(task_id)
            return
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)

    @staticmethod
    async def discard_copy_on(task_id: str, node: str) -> None:
        from .placement import discard_copy_on

        try:
            await discard_copy_on(node, task_id)
        except Exception as exc:  # its node may be gone, and the copy with it
            log.warning("could not delete the workspace copy of task %s on node %s: %r", task_id, node, exc)
