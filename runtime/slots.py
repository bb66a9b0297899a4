"""The warm agent actors ("slots") the supervisor binds agents to, and the caps on them.

Invariant: at most ``max_agents`` slot actors exist at any moment. A slot being
replaced counts until Ray confirms its old actor dead; only then is the new one
created under the same name, so the cap holds even during restarts.

Recycling is kept off the tasks' path. A slot that has served ``recycle_after``
tasks is *due*; it stays usable until it is replaced, and it is replaced in the
background when it is free: right away when it comes back to the pool if no other
slot is being recycled, else once the one before it is done and it is free again. So
recycling takes at most one slot out of service at a time (under a steady load a slot
may serve a few tasks past its count while it waits its turn), and a process start is
never paid by a task that could have had a warm slot: :meth:`SlotTable.reserve` hands
out warm slots first (the fresher ones before the due ones), then places with no actor
yet, and a slot whose process is being replaced only when no other is free (the role
bound to it waits for it when it gets there; the task's other roles start at once).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import ray
from ray.exceptions import RayError

log = logging.getLogger("threadbound.slots")

# How many due slots may be out of service for their recycle at once: one keeps the
# pool's lost capacity to a single slot; a crashed or hung slot is replaced regardless.
RECYCLE_AT_ONCE = 1


@dataclass(eq=False)
class Slot:
    index: int
    name: str
    handle: Any = None
    owner: str | None = None  # task id holding the slot
    uses: int = 0  # task reservations since this process started
    busy: bool = False  # a step is in flight
    pid: int | None = None
    generation: int = 0  # process number: bumps on every replacement
    ready: asyncio.Task | None = field(default=None, repr=False)
    recycling: bool = False  # the current replacement is a recycle (not a crash's)

    @property
    def replacing(self) -> bool:
        return self.ready is not None and not self.ready.done()


class SlotTable:
    """Creates, reserves, releases, recycles and replaces slot actors."""

    def __init__(
        self,
        max_agents: int,
        recycle_after: int,
        make_actor: Callable[[str], Any],
        slot_name: Callable[[int], str],
        namespace: str | None = None,
        on_free: Callable[[], None] = lambda: None,
    ) -> None:
        self.namespace = namespace
        self.max_agents = max_agents
        self.recycle_after = recycle_after
        self._make_actor = make_actor
        self._on_free = on_free
        self.slots = [Slot(index=i, name=slot_name(i)) for i in range(max_agents)]
        self.replacements = 0  # processes replaced, for any reason
        self.recycles = 0  # of which recycles of due slots
        self.reserved_replacing = 0  # reservations that took a slot still being replaced
        self._bg: set[asyncio.Task] = set()
        self._orphans: list[Any] = []  # actors whose start a shutdown interrupted
        self._closed = False

    # -- capacity ---------------------------------------------------------------

    def _idle(self) -> list[Slot]:
        return [s for s in self.slots if s.owner is None and not s.replacing]

    def free_count(self) -> int:
        return len(self._idle())

    def due(self, slot: Slot) -> bool:
        """True once ``slot``'s process has served ``recycle_after`` tasks."""
        return slot.handle is not None and slot.uses >= self.recycle_after

    def reserve(self, owner: str, n: int) -> list[Slot] | None:
        """Give ``n`` slots to ``owner`` (all or none): warm ones first, fresher before
        due, then places with no actor yet (started now), then slots whose process is
        being replaced (only when nothing else is free: the roles bound last wait for
        them, the first ones start at once)."""
        idle = self._idle()
        coming = [s for s in self.slots if s.owner is None and s.replacing]
        if len(idle) + len(coming) < n:
            return None
        idle.sort(key=lambda s: (s.handle is None, self.due(s)))  # stable: low numbers first
        picked = (idle + coming)[:n]
        if n > len(idle):
            self.reserved_replacing += 1
        for s in picked:
            s.owner = owner
            if s.handle is None and not s.replacing:
                s.ready = self._spawn(self._start(s))
        return picked

    def release(self, slot: Slot) -> None:
        """Return a slot to the pool. A due one is recycled in the background now if no
        other slot is being recycled (a waiting task may still take it, as its last
        pick), else later, when its turn comes and it is free."""
        slot.owner = None
        slot.uses += 1
        if self._closed:
            return
        if self.due(slot) and not slot.replacing and self._recycling_now() < RECYCLE_AT_ONCE:
            self._recycle(slot)
        self._on_free()

    async def wait_ready(self, slot: Slot) -> None:
        while slot.ready is not None and not slot.ready.done():
            await asyncio.shield(slot.ready)
        if slot.ready is not None and slot.ready.exception() is not None:
            raise slot.ready.exception()

    # -- recycling ----------------------------------------------------------------

    def _recycling_now(self) -> int:
        return sum(1 for s in self.slots if s.recycling and s.replacing)

    def _recycle(self, slot: Slot) -> None:
        slot.recycling = True
        self.recycles += 1
        self.replace(slot, kill=True, recycle=True)

    def _sweep(self) -> None:
        """Recycle free due slots while the limit allows (after a replacement ended and
        the waiting tasks have had their pick)."""
        if self._closed:
            return
        for s in self.slots:
            if self._recycling_now() >= RECYCLE_AT_ONCE:
                return
            if s.owner is None and not s.replacing and self.due(s):
                self._recycle(s)

    # -- actor lifecycle ----------------------------------------------------------

    def replace(self, slot: Slot, *, kill: bool, recycle: bool = False) -> None:
        """Kill (if asked) and replace a slot's process in the background."""
        if slot.replacing:
            return
        slot.recycling = recycle
        old = slot.handle
        slot.ready = self._spawn(self._replace(slot, old, kill))

    async def _replace(self, slot: Slot, old: Any, kill: bool) -> None:
        if old is not None:
            await self._kill_and_confirm(old)
        slot.handle = None
        self.replacements += 1
        await self._start(slot)

    async def _start(self, slot: Slot) -> None:
        for attempt in range(3):
            try:
                handle = self._make_actor(slot.name)
                try:
                    info = await handle.ping.remote()
                except asyncio.CancelledError:  # a shutdown: it kills this one with the others
                    self._orphans.append(handle)
                    raise
                break
            except ValueError:  # name still held by a stale actor (e.g. an earlier run)
                try:
                    stale = ray.get_actor(slot.name, namespace=self.namespace)
                except ValueError:
                    await asyncio.sleep(0.1 * (attempt + 1))
                    continue
                await self._kill_and_confirm(stale)
        else:
            raise RuntimeError(f"could not create agent actor {slot.name}")
        slot.handle, slot.pid, slot.uses = handle, info["pid"], 0
        slot.generation += 1

    @staticmethod
    async def _kill_and_confirm(handle: Any) -> None:
        try:
            ray.kill(handle, no_restart=True)
        except Exception:  # already gone
            return
        # A call on a killed actor fails once Ray has marked it dead: only then does
        # the slot's place (and name) become free again.
        for _ in range(100):
            try:
                await asyncio.wait_for(handle.ping.remote(), 1.0)
            except (RayError, asyncio.TimeoutError):
                return
            await asyncio.sleep(0.05)

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._bg.add(task)

        def done(t: asyncio.Task) -> None:
            self._bg.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.error("agent actor start failed: %r", t.exception())
            self._on_free()
            self._sweep()  # the next due slot's turn

        task.add_done_callback(done)
        return task

    async def shutdown(self) -> None:
        """Kill every slot actor and wait until Ray confirms each one dead."""
        self._closed = True
        for t in list(self._bg):
            t.cancel()
        await asyncio.gather(*list(self._bg), return_exceptions=True)
        handles = [s.handle for s in self.slots if s.handle is not None] + self._orphans
        self._orphans = []
        for s in self.slots:
            s.handle, s.owner = None, None
        await asyncio.gather(*(self._kill_and_confirm(h) for h in handles), return_exceptions=True)

    def describe(self) -> list[dict[str, Any]]:
        return [
            {"name": s.name, "owner": s.owner, "busy": s.busy, "pid": s.pid, "uses": s.uses,
             "alive": s.handle is not None, "replacing": s.replacing, "generation": s.generation,
             "due": self.due(s), "recycling": s.recycling and s.replacing}
            for s in self.slots
        ]
