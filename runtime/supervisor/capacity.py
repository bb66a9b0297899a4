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
"""

from __future__ import annotations

import asyncio
import heapq
import logging
from typing import Any, Callable

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
                 on_grant: Callable[[str, list[Slot]], None]) -> None:
        self.slots = slots
        self.max_per_task = max_per_task
        self.on_grant = on_grant
        self.holding = False  # True: grant nothing (paused or closing)
        self._queue: list[tuple[int, int, str]] = []  # (-priority, order, task id): a heap
        self._requests: dict[str, tuple[int, str | None]] = {}  # task id -> (slots, last home)
        self._bg: set[asyncio.Task] = set()  # copies being deleted on other nodes

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
        self._requests[task_id] = (self.width(roles), home)
        heapq.heappush(self._queue, (-priority, order, task_id))

    def withdraw(self, task_id: str) -> None:
        self._requests.pop(task_id, None)  # (its heap entry is skipped when it comes up)

    def waiting(self) -> list[str]:
        """The tasks whose reservation is queued."""
        return list(self._requests)

    def pump(self) -> None:
        """Grant queued reservations, in order, while their slots are free."""
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

    def release(self, task_id: str, slots: list[Slot], *, ended: bool) -> None:
        """The task's run ended: its slots go back to the pool (after its steps stopped).

        No call to the actors: a slot's next binding replaces the agent it holds, and an
        extra call per slot per task cost the supervisor ~7% of its time. ``ended``: the
        task is over (not just waiting for a person, who brings it back to the node of
        its copy)."""
        for slot in slots:
            if slot.owner == task_id:
                self.slots.release(slot)
        if ended:
            self.slots.homes.pop(task_id, None)
            self.slots.moved.pop(task_id, None)

    async def shutdown(self) -> None:
        self.holding = True
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
