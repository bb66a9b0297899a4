"""The warm agent actors ("slots") the supervisor binds agents to, and the caps on them.

A slot actor is one process (:class:`Proc`) with ``agents_per_actor`` *places*
(:class:`Slot`): a place is what a task reserves and a step runs on, one agent at a time
on a thread of its own. With ``agents_per_actor: 1`` (the default) a place is its
actor. ``max_agents`` places exist, on ``ceil(max_agents / agents_per_actor)``
processes, so the cap counts agents, never actors.

Invariant: at most ``ceil(max_agents / agents_per_actor)`` slot actors exist at any
moment. An actor being replaced counts until Ray confirms its old process dead; only
then is the new one created under the same name, so the cap holds even during restarts.
Replacing (or losing) an actor takes all its places with it: the steps running on them
end as crashes, and the cause of a kill is kept (:meth:`SlotTable.cause`) so that the
co-tenants' crash names the agent whose deadline killed their actor.

Recycling is kept off the tasks' path. An actor that has served ``recycle_after`` tasks
(counted over all its places) is *due*; it stays usable until it is replaced, and it is
replaced in the background once all its places are free: right away when its last place
comes back to the pool if no other actor is being recycled, else once the one before it
is done and it is free again. So recycling takes at most one actor out of service at a
time (under a steady load an actor may serve a few tasks past its count while it waits
its turn), and a process start is never paid by a task that could have had a warm
place: :meth:`SlotTable.reserve` hands out places on warm actors first (the fresher ones
before the due ones, then the least loaded, so agents spread over processes), then places
on actors not started yet, and a place whose process is being replaced only when no
other is free (the role bound to it waits for it when it gets there; the task's other
roles start at once).

With ``idle_ttl_s`` (the config's ``idle_actor_ttl_s``) an actor with no agent bound,
whose process started and whose places were last released that long ago, is stopped
(:meth:`SlotTable.trim_idle`, on the supervisor's tick) and its places count as not
started: the next reservation that needs them starts it again. Until Ray confirms the
old process dead it counts as being replaced, so the cap and the name hold as for a
recycle; a place reserved on it meanwhile (a last pick) gets a fresh process as soon as
the old one is gone.

On a cluster (a :class:`~.placement.Placement` given) every actor has a node, and a
task's places are all on one node, its *home* (see ``runtime.supervisor.placement`` for
why node affinity): :meth:`SlotTable.reserve` picks the node that gives the task the most
warm places (then the one holding fewest actors, so they spread), starts actors there,
and as a last resort moves a free actor's process from another node. An actor whose node
died is started again on its tasks' new home, a surviving node, and the task is told
(:attr:`SlotTable.moved`). With one node all of this reduces to the single-machine
behaviour above.

The table is in parts: the process and place records in ``places``, placement on nodes in
``slot_nodes``, the actors' start, replacement, stop-or-kill and shutdown in
``slot_actors``; reserving, releasing and recycling here.
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable

from .clock import Clock, SystemClock
from .places import Proc, Slot, _draining
from .slot_actors import SlotActors
from .slot_nodes import SlotNodes

# How many due actors may be out of service for their recycle at once: one keeps the
# pool's lost capacity to a single actor; a crashed or hung actor is replaced regardless.
RECYCLE_AT_ONCE = 1


class SlotTable(SlotNodes, SlotActors):
    """Creates, reserves, releases, recycles and replaces slot actors and their places."""

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
        per_actor: int = 1,
        on_start: Callable[[Proc], None] | None = None,
        idle_ttl_s: float | None = None,
    ) -> None:
        """``make_actor(name)`` creates a slot actor; with a ``placement`` (given, or carried
        by ``make_actor`` as ``runtime.actors.SlotFactory`` does) it is called as
        ``make_actor(name, node)`` and actors are placed on nodes. ``per_actor``: places
        per actor (``agents_per_actor``). ``on_start(proc)``: a new process answered.
        ``idle_ttl_s``: stop actors idle this long (None: never; see :meth:`trim_idle`)."""
        self.namespace = namespace
        self.clock: Clock = clock or SystemClock()
        self.placement = placement if placement is not None else getattr(make_actor, "placement", None)
        self.homes: dict[str, str] = {}  # owner (task id) -> the node its places are on
        self.moved: dict[str, tuple[str, str]] = {}  # owner -> (lost node, new home), until the task hears it
        self.max_agents = max_agents
        self.per_actor = per_actor = max(1, min(per_actor, max_agents))
        self.recycle_after = recycle_after
        self.idle_ttl_s = idle_ttl_s
        self._make_actor = make_actor
        self._on_free = on_free
        self._on_start = on_start
        self.procs: list[Proc] = []
        self.slots: list[Slot] = []
        for i in range(-(-max_agents // per_actor)):
            proc = Proc(index=i, name=slot_name(i))
            for j in range(min(per_actor, max_agents - i * per_actor)):
                place = Slot(index=len(self.slots), name=proc.name if per_actor == 1 else f"{proc.name}.{j}",
                             proc=proc, place=j)
                proc.places.append(place)
                self.slots.append(place)
            self.procs.append(proc)
        self.replacements = 0  # processes replaced, for any reason
        self.recycles = 0  # of which recycles of due actors
        self.stopped_idle = 0  # actors stopped for being idle idle_ttl_s (trim_idle), counted when begun
        self.reserved_replacing = 0  # reservations that took a place whose process was being replaced
        self._bg: set[asyncio.Task] = set()
        self._orphans: list[Any] = []  # actors whose start a shutdown interrupted
        self._closed = False

    # -- capacity ---------------------------------------------------------------

    def _idle(self) -> list[Slot]:
        return [s for s in self.slots if s.owner is None and not s.proc.replacing and not _draining(s)]

    def free_count(self) -> int:
        return len(self._idle())

    def due(self, slot: "Slot | Proc") -> bool:
        """True once the process of ``slot`` (a place or an actor) has served ``recycle_after`` tasks."""
        proc = slot.proc if isinstance(slot, Slot) else slot
        return proc.handle is not None and proc.uses >= self.recycle_after

    def _pick(self, candidates: list[Slot], n: int) -> list[Slot]:
        """``n`` of ``candidates``: warm before unstarted, fresh before due, then on the
        actor holding fewest agents (counting those just picked), then low numbers first."""
        if self.per_actor == 1:
            return sorted(candidates, key=lambda s: (s.handle is None, self.due(s)))[:n]  # stable
        load = {id(p): p.load() for p in {id(s.proc): s.proc for s in candidates}.values()}
        left, picked = list(candidates), []
        for _ in range(min(n, len(left))):
            best = min(left, key=lambda s: (s.handle is None, self.due(s), load[id(s.proc)], s.index))
            left.remove(best)
            load[id(best.proc)] += 1
            picked.append(best)
        return picked

    def reserve(self, owner: str, n: int) -> list[Slot] | None:
        """Give ``n`` places to ``owner`` (all or none): on warm actors first, fresher
        before due, then on actors not started yet (started now), then places whose
        process is being replaced (only when nothing else is free: the roles bound last
        wait for them, the first ones start at once). On a cluster, all on one node (see
        the module docstring)."""
        idle = self._idle()
        coming = [s for s in self.slots if s.owner is None and (s.proc.replacing or _draining(s))]
        if len(idle) + len(coming) < n:
            return None
        if self.placement is not None:
            return self._reserve_on_node(owner, n, idle, coming)
        picked = self._pick(idle, n)
        if n > len(picked):
            self.reserved_replacing += 1
            picked += coming[:n - len(picked)]
        for s in picked:
            s.owner = owner
            if s.proc.handle is None and not s.proc.replacing:
                s.proc.ready = self._spawn(self._start(s.proc))
        return picked

    def release(self, slot: Slot) -> None:
        """Return a place to the pool. Its actor, once due and wholly free, is recycled in
        the background now if no other actor is being recycled (a waiting task may still
        take its places, as its last pick), else later, when its turn comes."""
        slot.owner = None
        proc = slot.proc
        proc.uses += 1
        proc.last_used = self.clock.monotonic()
        if self._closed:
            return
        if self.due(proc) and proc.idle() and not proc.replacing and self._recycling_now() < RECYCLE_AT_ONCE:
            self._recycle(proc)
        self._on_free()

    async def wait_ready(self, slot: "Slot | Proc") -> None:
        if isinstance(slot, Slot):
            while _draining(slot):  # its last step was asked to stop: it ends, or its actor is replaced
                await asyncio.shield(slot.draining)
        proc = slot.proc if isinstance(slot, Slot) else slot
        while proc.ready is not None and not proc.ready.done():
            await asyncio.shield(proc.ready)
        if proc.ready is not None and proc.ready.exception() is not None:
            raise proc.ready.exception()

    def trim_idle(self) -> int:
        """Stop every actor with no agent bound whose process started, and whose places were
        last released, ``idle_ttl_s`` ago or more: its process and memory go back to the
        machine, and its places start it again when a task needs them. Returns how many
        it began to stop (0 with ``idle_ttl_s`` None)."""
        if self.idle_ttl_s is None or self._closed:
            return 0
        now, begun = self.clock.monotonic(), 0
        for p in self.procs:
            if (p.handle is not None and p.idle() and not p.replacing and not any(_draining(s) for s in p.places)
                    and now - p.last_used >= self.idle_ttl_s):
                p.recycling = False  # a stop, not a recycle: it does not hold up the due actors' turn
                p.ready = self._spawn(self._stop_idle(p))
                self.stopped_idle += 1
                begun += 1
        return begun

    # -- recycling ----------------------------------------------------------------

    def _recycling_now(self) -> int:
        return sum(1 for p in self.procs if p.recycling and p.replacing)

    def _recycle(self, proc: Proc) -> None:
        proc.recycling = True
        self.recycles += 1
        self.replace(proc, kill=True, recycle=True)

    def _sweep(self) -> None:
        """Recycle wholly free due actors while the limit allows (after a replacement ended
        and the waiting tasks have had their pick)."""
        if self._closed:
            return
        for p in self.procs:
            if self._recycling_now() >= RECYCLE_AT_ONCE:
                return
            if p.idle() and not p.replacing and self.due(p):
                self._recycle(p)

    def describe(self) -> list[dict[str, Any]]:
        """One row per place (an agent's seat), with its actor's fields."""
        return [
            {"name": s.name, "actor": s.proc.name, "owner": s.owner, "busy": s.busy, "pid": s.pid, "uses": s.uses,
             "alive": s.handle is not None, "replacing": s.replacing, "generation": s.generation,
             "due": self.due(s), "recycling": s.recycling and s.replacing, "node": s.node}
            for s in self.slots
        ]

    def counts(self) -> dict[str, Any]:
        """Agents (places) and actors (processes), separately."""
        return {
            "agents": {"busy": sum(1 for s in self.slots if s.busy), "bound": sum(1 for s in self.slots if s.owner),
                       "total": len(self.slots)},
            "actors": {"alive": sum(1 for p in self.procs if p.handle is not None),
                       "replacing": sum(1 for p in self.procs if p.replacing), "total": len(self.procs),
                       "agents_per_actor": self.per_actor},
        }
