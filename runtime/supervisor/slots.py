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

On a cluster (a :class:`~.placement.Placement` given) every slot has a node, and a
task's slots are all on one node, its *home* (see ``runtime.supervisor.placement`` for why node
affinity): :meth:`SlotTable.reserve` picks the node that gives the task the most warm
slots (then the one holding fewest agents, so slots spread), starts free places
there, and as a last resort moves a free slot's process from another node. A slot
whose node died is started again on its task's new home, a surviving node, and the
task is told (:attr:`SlotTable.moved`). With one node all of this reduces to the
single-machine behaviour above.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import ray
from ray.exceptions import RayError

from .clock import Clock, SystemClock

log = logging.getLogger("threadbound.slots")

# How many due slots may be out of service for their recycle at once: one keeps the
# pool's lost capacity to a single slot; a crashed or hung slot is replaced regardless.
RECYCLE_AT_ONCE = 1
PREWARM = "__prewarm__"  # the owner of a reservation that starts every free slot (spread over nodes)


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
    node: str | None = None  # the node its process runs (or is being started) on; None: no process
    sent: tuple[str, int] | None = None  # (binding, generation) whose agent class its process has

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
        placement: Any = None,
        clock: Clock | None = None,
    ) -> None:
        """``make_actor(name)`` creates a slot actor; with a ``placement`` (given, or carried
        by ``make_actor`` as ``runtime.actors.SlotFactory`` does) it is called as
        ``make_actor(name, node)`` and slots are placed on nodes."""
        self.namespace = namespace
        self.clock: Clock = clock or SystemClock()
        self.placement = placement if placement is not None else getattr(make_actor, "placement", None)
        self.homes: dict[str, str] = {}  # owner (task id) -> the node its slots are on
        self.moved: dict[str, tuple[str, str]] = {}  # owner -> (lost node, new home), until the task hears it
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
        them, the first ones start at once). On a cluster, all on one node (see the
        module docstring)."""
        idle = self._idle()
        coming = [s for s in self.slots if s.owner is None and s.replacing]
        if len(idle) + len(coming) < n:
            return None
        if self.placement is not None:
            return self._reserve_on_node(owner, n, idle, coming)
        idle.sort(key=lambda s: (s.handle is None, self.due(s)))  # stable: low numbers first
        picked = (idle + coming)[:n]
        if n > len(idle):
            self.reserved_replacing += 1
        for s in picked:
            s.owner = owner
            if s.handle is None and not s.replacing:
                s.ready = self._spawn(self._start(s))
        return picked

    # -- placement on nodes -----------------------------------------------------------

    def _hosted(self) -> Counter:
        """Slots per node: processes there, or being started there."""
        return Counter(s.node for s in self.slots if s.node is not None and (s.handle is not None or s.replacing))

    def hosts(self) -> set[str]:
        """The nodes that hold (or are starting) agent actors of this pool."""
        return set(self._hosted())

    def home_of(self, owner: str) -> str | None:
        return self.homes.get(owner)

    def _reserve_on_node(self, owner: str, n: int, idle: list[Slot], coming: list[Slot]) -> list[Slot] | None:
        nodes = self.placement.nodes()
        if not nodes:
            return None  # no node can hold an agent now (e.g. only zero-CPU nodes): wait for one
        if owner == PREWARM:
            return self._prewarm(idle, nodes)
        hosted = self._hosted()
        unstarted = [s for s in idle if s.handle is None]
        home = self.homes.get(owner)  # where it ran before (it waited, or the pool resumed): its copy is there
        candidates = {home: nodes[home]} if home in nodes else nodes
        best: tuple | None = None
        for node, cap in candidates.items():
            warm = sorted((s for s in idle if s.handle is not None and s.node == node), key=self.due)[:n]
            room = max(0, cap - hosted[node])
            fresh = unstarted[:min(n - len(warm), room)]
            room -= len(fresh)
            arriving = [s for s in coming if s.node == node][:n - len(warm) - len(fresh)]
            # Last resort: move free processes from other nodes (dead nodes' first, then due ones).
            others = sorted((s for s in idle if s.handle is not None and s.node != node),
                            key=lambda s: (s.node in nodes, not self.due(s)))
            moves = others[:min(n - len(warm) - len(fresh) - len(arriving), room)]
            if len(warm) + len(fresh) + len(arriving) + len(moves) < n:
                continue
            key = (len(warm), -len(moves), -len(arriving), -hosted[node])
            if best is None or key > best[0]:
                best = (key, node, warm, fresh, arriving, moves)
        if best is None:
            return None  # free slots, but on no node with room for all of them: wait
        _, node, warm, fresh, arriving, moves = best
        picked = warm + fresh + arriving + moves
        if arriving or moves:
            self.reserved_replacing += 1
        if home is not None and home != node and len(nodes) > 1:
            # Its copy was on a node that is gone. (With one node left, the node it ran on is
            # this machine under an earlier Ray: its copy is still on this disk.)
            self.moved[owner] = (home, node)
        self.homes[owner] = node
        for s in picked:
            s.owner = owner
        for s in fresh:
            s.node = node
            s.ready = self._spawn(self._start(s))
        for s in moves:
            s.node = node
            self.replace(s, kill=True)
        return picked

    def _prewarm(self, idle: list[Slot], nodes: dict[str, int]) -> list[Slot]:
        """Start every free place, each on the node holding fewest agents (with room)."""
        hosted = self._hosted()
        picked = []
        for s in idle:
            s.owner = PREWARM
            picked.append(s)
            if s.handle is not None:
                continue
            room = [(hosted[node], node) for node, cap in nodes.items() if cap > hosted[node]]
            if not room:
                continue
            s.node = min(room)[1]
            hosted[s.node] += 1
            s.ready = self._spawn(self._start(s))
        return picked

    def _node_for(self, slot: Slot) -> str:
        """Where ``slot``'s process is to start: its owner's home; when that node is gone,
        a new home for the owner (a surviving node with room for all its slots), and the
        owner's other slots follow; a free slot stays on its node while it lives."""
        nodes = self.placement.nodes()
        owner = slot.owner
        home = self.homes.get(owner) if owner is not None else None
        if home is not None and home in nodes:
            slot.node = home
            return home
        if home is None and slot.node in nodes:
            return slot.node
        self.placement.invalidate()  # a node is gone (or the view is stale): look again
        nodes = self.placement.nodes()
        if not nodes:
            raise RuntimeError("no alive node can hold an agent actor (each needs a node with a CPU, or set "
                               "ray.agent_num_cpus: 0)")
        hosted = self._hosted()
        if slot.node is not None and (slot.handle is not None or slot.replacing):
            hosted[slot.node] -= 1  # its own place does not count against its new node
        need = sum(1 for s in self.slots if s.owner == owner) if owner is not None else 1
        fits = [(cap - hosted[node] >= need, cap - hosted[node], node) for node, cap in nodes.items()]
        new = max(fits)[2]
        slot.node = new
        if owner is not None and home is not None and home != new:
            self.homes[owner] = new
            self.moved[owner] = (home, new)
            log.warning("node %s is gone: the agents of %s move to node %s", home, owner, new)
            for other in self.slots:  # the task's other idle slots follow (a busy one crashes, then follows)
                if other is not slot and other.owner == owner and not other.busy and not other.replacing \
                        and other.node != new:
                    other.node = new
                    self.replace(other, kill=True)
        return new

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
        if not slot.recycling and self.placement is not None:
            self.placement.invalidate()  # killed or crashed: perhaps its node is gone
        await self._start(slot)

    async def _start(self, slot: Slot) -> None:
        node = self._node_for(slot) if self.placement is not None else None
        for attempt in range(3):
            try:
                handle = self._make_actor(slot.name) if node is None else self._make_actor(slot.name, node)
                try:
                    info = await handle.ping.remote()
                except asyncio.CancelledError:  # a shutdown: it kills this one with the others
                    self._orphans.append(handle)
                    raise
                except RayError:  # e.g. its node died while it started: look at the cluster again
                    if self.placement is not None:
                        self.placement.invalidate()
                    raise
                break
            except ValueError:  # name still held by a stale actor (e.g. an earlier run)
                try:
                    stale = ray.get_actor(slot.name, namespace=self.namespace)
                except ValueError:
                    await self.clock.sleep(0.1 * (attempt + 1))
                    continue
                await self._kill_and_confirm(stale)
        else:
            raise RuntimeError(f"could not create agent actor {slot.name}")
        slot.handle, slot.pid, slot.uses = handle, info["pid"], 0
        slot.generation += 1

    async def _kill_and_confirm(self, handle: Any) -> None:
        try:
            ray.kill(handle, no_restart=True)
        except Exception:  # already gone
            return
        # A call on a killed actor fails once Ray has marked it dead: only then does
        # the slot's place (and name) become free again.
        for _ in range(100):
            try:
                await self.clock.wait_for(handle.ping.remote(), 1.0)
            except (RayError, asyncio.TimeoutError):
                return
            await self.clock.sleep(0.05)

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
            s.handle, s.owner, s.node = None, None, None
        await asyncio.gather(*(self._kill_and_confirm(h) for h in handles), return_exceptions=True)
        self.homes.clear()
        self.moved.clear()
        if self.placement is not None:  # the model actors its agents started on each node
            try:
                await self.placement.stop_models(self._kill_and_confirm)
            except Exception:
                log.exception("could not stop the pool's model actors")

    def describe(self) -> list[dict[str, Any]]:
        return [
            {"name": s.name, "owner": s.owner, "busy": s.busy, "pid": s.pid, "uses": s.uses,
             "alive": s.handle is not None, "replacing": s.replacing, "generation": s.generation,
             "due": self.due(s), "recycling": s.recycling and s.replacing, "node": s.node}
            for s in self.slots
        ]
