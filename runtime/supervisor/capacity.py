"""The pool's capacity: its agent slots, the order in which waiting tasks get them, and
where they run -- behind a narrow interface, so that it can become an actor of its own
serving several task shards.

A task shard talks to it through:

* :meth:`Capacity.request` -- queue a reservation of ``min(roles, max_agents_per_task)``
  slots for a task (all on one node on a cluster);
* :meth:`Capacity.withdraw` -- drop a queued reservation (the task ended or was cancelled);
* :meth:`Capacity.release` -- a task's run ended: its slots go back;
* the ``on_grant(task_id, slots)`` event -- a reservation was granted: those slots are the
  task's until it releases them.

A reservation is granted when its slots are free (all or none, so the caps are never
exceeded), highest priority first, then first come first served; nothing is granted
while the capacity is held (the pool is paused or closing). The slot table
(``slots``) says which actors exist and keeps the cap while they are replaced;
placement (``placement``) says which node each runs on.

In a pool of several shards (a :class:`~.allocator.Share` given) the caps are the
pool's, not this shard's: a reservation is granted once the allocator has granted the
task's agents out of the pool's ``max_agents`` *and* the slots here are free (each
shard's table has ``max_agents`` slots, so a granted task always fits); the order
across shards is the allocator's. Releases and withdrawals give the budget back in the
shard's next sync. Without a share nothing of this runs.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
from typing import Any, Callable

from .allocator import Share
from .places import Slot
from .slots import SlotTable

log = logging.getLogger("threadbound.capacity")


class Capacity:
    """Slots, the admission queue and placement; see the module docstring.

    Examples:
        >>> granted = []
        >>> cap = Capacity(table, max_per_task=3, on_grant=lambda t, slots: granted.append(t))  # doctest: +SKIP
        >>> cap.request("t1", roles=3, priority=0, order=1); cap.pump()                         # doctest: +SKIP
    """

    def __init__(self, slots: SlotTable, max_per_task: int,
                 on_grant: Callable[[str, list[Slot]], None], share: Share | None = None) -> None:
        self.slots = slots
        self.max_per_task = max_per_task
        self.on_grant = on_grant
        self.share = share  # this shard's part of the pool's caps (None: one shard, the table keeps them)
        self._holding = False
        self._queue: list[tuple[int, int, str]] = []  # (-priority, order, task id): a heap
        self._requests: dict[str, tuple[int, str | None]] = {}  # task id -> (slots, last home)
        self._bg: set[asyncio.Task] = set()  # copies being deleted on other nodes

    @property
    def holding(self) -> bool:
        """True: grant nothing (paused or closing)."""
        return self._holding

    @holding.setter
    def holding(self, value: bool) -> None:
        self._holding = value
        if self.share is not None:
            self.share.hold(value)

    def start(self) -> None:
        """Start talking to the allocator (on the supervisor's loop; nothing without one)."""
        if self.share is not None:
            self.share.start()

    # -- the interface ----------------------------------------------------------------

    def width(self, roles: int) -> int:
        """How many slots a task of ``roles`` distinct roles holds (so how many run at once)."""
        width = min(roles, self.max_per_task)
        if self.slots.placement is not None:  # all on one node: no more than the largest node holds
            width = min(width, max(1, self.slots.placement.largest() * self.slots.per_actor))
        return width

    def request(self, task_id: str, roles: int, priority: int, order: int, home: str | None = None) -> None:
        """Queue a reservation for the task; ``home``: the node its agents ran on before
        (its workspace copy is there), if it ran before this supervisor."""
        n = self.width(roles)
        self._requests[task_id] = (n, home)
        if self.share is not None:  # the allocator orders the waiting tasks of all shards
            self.share.want(task_id, n, priority, order)
            return
        heapq.heappush(self._queue, (-priority, order, task_id))

    def withdraw(self, task_id: str) -> None:
        self._requests.pop(task_id, None)  # (its heap entry is skipped when it comes up)
        if self.share is not None:
            self.share.withdraw(task_id)  # (a running task's budget goes back on release)

    def waiting(self) -> list[str]:
        """The tasks whose reservation is queued."""
        return list(self._requests)

    def pump(self) -> None:
        """Grant queued reservations, in order, while their slots are free."""
        if self.share is not None:
            self._pump_granted()
            return
        while self._queue and not self.holding:
            _, _, task_id = self._queue[0]
            want = self._requests.get(task_id)
            if want is None:
                heapq.heappop(self._queue)
                continue
            n, home = want
            if self.slots.placement is not None and home is not None and task_id not in self.slots.homes:
                self.slots.homes[task_id] = home
            slots = self.slots.reserve(task_id, n)
            if slots is None:
                return
            heapq.heappop(self._queue)
            del self._requests[task_id]
            self.on_grant(task_id, slots)

    def _pump_granted(self) -> None:
        """With an allocator: give slots to the tasks it granted budget, in grant order."""
        for task_id in self.share.granted():
            if self.holding:
                return
            want = self._requests.get(task_id)
            if want is None:  # withdrawn: its budget goes back
                self.share.withdraw(task_id)
                continue
            n, home = want
            if self.slots.placement is not None and home is not None and task_id not in self.slots.homes:
                self.slots.homes[task_id] = home
            slots = self.slots.reserve(task_id, n)
            if slots is None:  # held for a moment (a prewarm): its budget waits for the next pump
                continue
            del self._requests[task_id]
            self.share.bound(task_id)
            self.on_grant(task_id, slots)

    def release(self, task_id: str, slots: list[Slot], *, ended: bool) -> None:
        """The task's run ended: its slots go back to the pool (after its steps stopped).

        No call to the actors: a slot's next binding replaces the agent it holds, and an
        extra call per slot per task cost the supervisor ~7% of its time. ``ended``: the
        task is over (not just waiting for a person, who brings it back to the node of
        its copy)."""
        if self.share is not None:
            self.share.drop(task_id)  # before the slots: freeing them pumps
        for slot in slots:
            if slot.owner == task_id:
                self.slots.release(slot)
        if ended:
            self.slots.homes.pop(task_id, None)
            self.slots.moved.pop(task_id, None)

    async def shutdown(self) -> None:
        self.holding = True
        if self.share is not None:
            await self.share.close()  # the allocator hears that this shard holds nothing
        await self.slots.shutdown()

    # -- the workspace copy, where it is ------------------------------------------------

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
            task = asyncio.get_running_loop().create_task(discard_copy_on(task_id, node))
        except RuntimeError:
            here(task_id)
            return
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)


async def discard_copy_on(task_id: str, node: str) -> None:
    from .placement import discard_copy_on as on_node

    try:
        await on_node(node, task_id)
    except Exception as exc:  # its node may be gone, and the copy with it
        log.warning("could not delete the workspace copy of task %s on node %s: %r", task_id, node, exc)
