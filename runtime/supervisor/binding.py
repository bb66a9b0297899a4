"""Binding: which of a task's slots each of its roles runs on.

A task holds the slots capacity granted it (``runtime.supervisor.capacity``) until its
run ends; each role is bound to one of them (a fresh agent instance per binding). A
task with more roles than slots lends the slot of the role used least recently (and
not running) to the next one.

On a cluster a task's slots are all on one node, its home (``slots``, ``placement``):
its workspace copy is made there by its first agent. When its home dies, its slots
start again on a surviving node; its next binding then raises :class:`WorkspaceLost`
(the copy, and with it the round's work on it, is gone), and the task starts its round
again from the original workspace.
"""

from __future__ import annotations

from .capacity import discard_copy_on
from .places import Slot
from .slots import SlotTable
from .task_state import TaskRecord


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

    Raised by :meth:`Binder.bind` once, the first time one of the task's roles binds
    after the move; the copy on the new node is fresh from the original workspace, so the
    round starts again."""

    def __init__(self, task_id: str, lost: str, node: str) -> None:
        super().__init__(f"the node {lost} holding the workspace copy of task {task_id} is gone; its agents "
                         f"now run on node {node}, from a fresh copy of the original workspace")
        self.task_id, self.lost, self.node = task_id, lost, node


class Binder:
    """Binds a task's roles to the slots it holds."""

    def __init__(self, slots: SlotTable) -> None:
        self.slots = slots

    async def bind(self, ts: TaskRecord, role: str) -> Slot:
        """The slot ``role`` runs its next step on (ready to take the call)."""
        run = ts.run
        slot = run.bound.get(role)
        other = None
        if slot is not None and _swapping(slot):
            other = self._other(ts, role)  # its process is being replaced: a ready one instead?
            if other is not None:
                del run.bound[role]
                slot = None
        if slot is not None:
            run.bound.move_to_end(role)
        else:
            slot = other or self._other(ts, role) or self._any(ts)
            run.binds += 1
            run.bound[role] = slot
            run.bind_keys[role] = f"{ts.id}/{role}/{run.binds}"
        try:
            await self.slots.wait_ready(slot)
        except Exception as exc:  # its actor could not start: start another, and say so
            self.slots.replace(slot, kill=True)
            raise SlotLost(slot, exc) from exc
        moved = self.slots.moved.pop(ts.id, None)
        if moved is not None and ts.spec.workspace:
            # On a shared disk the old copy may still be there: the round starts from the original.
            await discard_copy_on(ts.id, moved[1])
            raise WorkspaceLost(ts.id, *moved)
        return slot

    @staticmethod
    def _other(ts: TaskRecord, role: str) -> Slot | None:
        """A ready slot for ``role``: a free one, else (when no free one is merely starting
        for the first time) one lent by a role not running, the least recently used; None
        if there is none."""
        run = ts.run
        used = set(run.bound.values())
        for s in run.slots:
            if s not in used and not s.replacing:
                return s
        if any(s not in used and not _swapping(s) for s in run.slots):
            return None  # a free one is starting for the first time: each role gets its own
        for r in run.bound:
            if r != role and r not in run.running and not run.bound[r].replacing:
                return run.bound.pop(r)
        return None

    @staticmethod
    def _any(ts: TaskRecord) -> Slot:
        """A slot for a role when none is ready: a free one, else the least recently used
        idle role's (there is one: a task runs at most as many roles as it has slots)."""
        run = ts.run
        used = set(run.bound.values())
        for s in run.slots:
            if s not in used:
                return s
        return run.bound.pop(next(r for r in run.bound if r not in run.running))
