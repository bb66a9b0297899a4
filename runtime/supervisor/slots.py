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

On a cluster (a :class:`~.placement.Placement` given) every actor has a node, and a
task's places are all on one node, its *home* (see ``runtime.supervisor.placement`` for
why node affinity): :meth:`SlotTable.reserve` picks the node that gives the task the most
warm places (then the one holding fewest actors, so they spread), starts actors there,
and as a last resort moves a free actor's process from another node. An actor whose node
died is started again on its tasks' new home, a surviving node, and the task is told
(:attr:`SlotTable.moved`). With one node all of this reduces to the single-machine
behaviour above.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import ray
from ray.exceptions import RayError

from threadbound.agents.host import ERROR, INTERRUPT, RESULT

from .channel import Listener
from .clock import Clock, SystemClock

log = logging.getLogger("threadbound.slots")

# With several agents per actor, a step past its deadline is asked to stop, then given
# this long to end before its actor (and with it the co-tenants' steps) is killed.
STOP_GRACE_S = 2.0
_ENDS = (RESULT, ERROR, INTERRUPT)

# How many due actors may be out of service for their recycle at once: one keeps the
# pool's lost capacity to a single actor; a crashed or hung actor is replaced regardless.
RECYCLE_AT_ONCE = 1
PREWARM = "__prewarm__"  # the owner of a reservation that starts every free actor (spread over nodes)


@dataclass(eq=False)
class Proc:
    """One slot actor: a process hosting ``len(places)`` agents at most."""

    index: int
    name: str
    places: list["Slot"] = field(default_factory=list, repr=False)
    handle: Any = None
    uses: int = 0  # task reservations of its places since this process started
    pid: int | None = None
    generation: int = 0  # process number: bumps on every replacement
    ready: asyncio.Task | None = field(default=None, repr=False)
    recycling: bool = False  # the current replacement is a recycle (not a crash's)
    node: str | None = None  # the node its process runs (or is being started) on; None: no process
    causes: dict[int, str] = field(default_factory=dict, repr=False)  # generation -> why it was killed
    channel: Any = field(default=None, repr=False)  # the actor's event channel (agents_per_actor > 1)

    @property
    def replacing(self) -> bool:
        return self.ready is not None and not self.ready.done()

    def idle(self) -> bool:
        """No agent of any task is bound to it."""
        return all(p.owner is None for p in self.places)

    def load(self) -> int:
        return sum(1 for p in self.places if p.owner is not None)


def _proxy(attr: str) -> property:
    return property(lambda self: getattr(self.proc, attr), lambda self, value: setattr(self.proc, attr, value))


@dataclass(eq=False)
class Slot:
    """A place on a slot actor: one agent at a time. Its process's fields (``handle``,
    ``pid``, ``generation``, ``node``, ``uses``, ...) are the actor's, shared by its places."""

    index: int  # its number in the pool, 0 .. max_agents - 1
    name: str  # the actor's name with one agent per actor, else ``<actor>.<place>``
    proc: Proc = field(repr=False)
    place: int = 0  # its number within the actor
    owner: str | None = None  # task id holding the place
    busy: bool = False  # a step is in flight
    sent: tuple[str, int] | None = None  # (binding, generation) whose agent class its process has
    draining: asyncio.Task | None = field(default=None, repr=False)  # a step asked to stop, not yet ended

    handle = _proxy("handle")
    uses = _proxy("uses")
    pid = _proxy("pid")
    generation = _proxy("generation")
    ready = _proxy("ready")
    recycling = _proxy("recycling")
    node = _proxy("node")

    @property
    def actor(self) -> str:
        return self.proc.name

    @property
    def replacing(self) -> bool:
        return self.proc.replacing


def _draining(slot: Slot) -> bool:
    return slot.draining is not None and not slot.draining.done()


class SlotTable:
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
    ) -> None:
        """``make_actor(name)`` creates a slot actor; with a ``placement`` (given, or carried
        by ``make_actor`` as ``runtime.actors.SlotFactory`` does) it is called as
        ``make_actor(name, node)`` and actors are placed on nodes. ``per_actor``: places
        per actor (``agents_per_actor``). ``on_start(proc)``: a new process answered."""
        self.namespace = namespace
        self.clock: Clock = clock or SystemClock()
        self.placement = placement if placement is not None else getattr(make_actor, "placement", None)
        self.homes: dict[str, str] = {}  # owner (task id) -> the node its places are on
        self.moved: dict[str, tuple[str, str]] = {}  # owner -> (lost node, new home), until the task hears it
        self.max_agents = max_agents
        self.per_actor = per_actor = max(1, min(per_actor, max_agents))
        self.recycle_after = recycle_after
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

    # -- placement on nodes -----------------------------------------------------------

    def _hosted(self) -> Counter:
        """Actors per node: processes there, or being started there."""
        return Counter(p.node for p in self.procs if p.node is not None and (p.handle is not None or p.replacing))

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
        unstarted = [p for p in self.procs if p.handle is None and not p.replacing]
        home = self.homes.get(owner)  # where it ran before (it waited, or the pool resumed): its copy is there
        candidates = {home: nodes[home]} if home in nodes else nodes
        best: tuple | None = None
        for node, cap in candidates.items():
            warm = self._pick([s for s in idle if s.handle is not None and s.node == node], n)
            room = max(0, cap - hosted[node])
            fresh: list[Slot] = []
            started: list[Proc] = []
            for p in unstarted:
                if len(warm) + len(fresh) >= n or room <= 0:
                    break
                free = [s for s in p.places if s.owner is None][:n - len(warm) - len(fresh)]
                if free:
                    fresh += free
                    started.append(p)
                    room -= 1
            arriving = [s for s in coming if s.node == node][:n - len(warm) - len(fresh)]
            # Last resort: move wholly free processes from other nodes (dead nodes' first, then due ones).
            others = sorted((p for p in self.procs if p.handle is not None and p.node != node and p.idle()
                             and not p.replacing), key=lambda p: (p.node in nodes, not self.due(p)))
            moves: list[Slot] = []
            moved: list[Proc] = []
            for p in others:
                need = n - len(warm) - len(fresh) - len(arriving) - len(moves)
                if need <= 0 or room <= 0:
                    break
                moves += p.places[:need]
                moved.append(p)
                room -= 1
            if len(warm) + len(fresh) + len(arriving) + len(moves) < n:
                continue
            key = (len(warm), -len(moves), -len(arriving), -hosted[node])
            if best is None or key > best[0]:
                best = (key, node, warm, fresh, arriving, moves, started, moved)
        if best is None:
            return None  # free places, but on no node with room for all of them: wait
        _, node, warm, fresh, arriving, moves, started, moved = best
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
        for p in started:
            p.node = node
            p.ready = self._spawn(self._start(p))
        for p in moved:
            p.node = node
            self.replace(p, kill=True)
        return picked

    def _prewarm(self, idle: list[Slot], nodes: dict[str, int]) -> list[Slot]:
        """Start every free actor, each on the node holding fewest actors (with room)."""
        hosted = self._hosted()
        for s in idle:
            s.owner = PREWARM
        for p in self.procs:
            if p.handle is not None or p.replacing or not any(s.owner == PREWARM for s in p.places):
                continue
            room = [(hosted[node], node) for node, cap in nodes.items() if cap > hosted[node]]
            if not room:
                continue
            p.node = min(room)[1]
            hosted[p.node] += 1
            p.ready = self._spawn(self._start(p))
        return idle

    def _node_for(self, proc: Proc) -> str:
        """Where ``proc`` is to start: its tasks' home; when that node is gone, a new home
        for its tasks (a surviving node with room for all their actors), and the tasks'
        other free actors follow; a free actor stays on its node while it lives."""
        nodes = self.placement.nodes()
        owners = list(dict.fromkeys(s.owner for s in proc.places if s.owner not in (None, PREWARM)))
        homes = [self.homes[o] for o in owners if o in self.homes]
        alive = [h for h in homes if h in nodes]
        if alive:
            proc.node = alive[0]
            return alive[0]
        if not homes and proc.node in nodes:
            return proc.node
        self.placement.invalidate()  # a node is gone (or the view is stale): look again
        nodes = self.placement.nodes()
        if not nodes:
            raise RuntimeError("no alive node can hold an agent actor (each needs a node with a CPU, or set "
                               "ray.agent_num_cpus: 0)")
        hosted = self._hosted()
        if proc.node is not None and (proc.handle is not None or proc.replacing):
            hosted[proc.node] -= 1  # its own place does not count against its new node
        need = len({id(s.proc) for s in self.slots if s.owner in owners}) if owners else 1
        fits = [(cap - hosted[node] >= need, cap - hosted[node], node) for node, cap in nodes.items()]
        new = max(fits)[2]
        proc.node = new
        for owner in owners:
            home = self.homes.get(owner)
            if home is None or home == new:
                continue
            self.homes[owner] = new
            self.moved[owner] = (home, new)
            log.warning("node %s is gone: the agents of %s move to node %s", home, owner, new)
            for other in self.procs:  # the task's other free actors follow (a busy one crashes, then follows)
                if other is not proc and any(s.owner == owner for s in other.places) \
                        and not any(s.busy for s in other.places) and not other.replacing and other.node != new:
                    other.node = new
                    self.replace(other, kill=True)
        return new

    def release(self, slot: Slot) -> None:
        """Return a place to the pool. Its actor, once due and wholly free, is recycled in
        the background now if no other actor is being recycled (a waiting task may still
        take its places, as its last pick), else later, when its turn comes."""
        slot.owner = None
        proc = slot.proc
        proc.uses += 1
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

    # -- actor lifecycle ----------------------------------------------------------

    def replace(self, slot: "Slot | Proc", *, kill: bool, recycle: bool = False, cause: str | None = None) -> None:
        """Kill (if asked) and replace the process of ``slot`` (a place or an actor) in the
        background; every place on it loses its agent. ``cause``: why it is killed, told to
        the co-tenants whose steps it ends (:meth:`cause`)."""
        proc = slot.proc if isinstance(slot, Slot) else slot
        if proc.replacing:
            return
        if cause is not None:
            proc.causes[proc.generation] = cause
            for old in [g for g in proc.causes if g < proc.generation - 3]:
                del proc.causes[old]
        proc.recycling = recycle
        old = proc.handle
        proc.ready = self._spawn(self._replace(proc, old, kill))

    def stop_or_kill(self, slot: Slot, stream: Any, key: str, cause: str) -> None:
        """A step on ``slot`` did not end (deadline, cancel) and its actor hosts other agents:
        ask it to stop, give it :data:`STOP_GRACE_S` to end, and only then kill the actor
        (its co-tenants' steps crash, told ``cause``). Until then the place serves no one."""
        if _draining(slot) or slot.handle is None or slot.proc.replacing:
            return
        slot.draining = self._spawn(self._stop_or_kill(slot, stream, key, cause))

    async def _stop_or_kill(self, slot: Slot, stream: Any, key: str, cause: str) -> None:
        proc, generation = slot.proc, slot.generation
        deadline = self.clock.monotonic() + STOP_GRACE_S
        ended = False
        try:
            await self.clock.wait_for(proc.handle.stop.remote(slot.place, key), STOP_GRACE_S)
            while not ended:
                ref = await self.clock.wait_for(stream.__anext__(), max(0.0, deadline - self.clock.monotonic()))
                ended = any(kind in _ENDS for kind, _ in await ref)
        except StopAsyncIteration:
            ended = True
        except (RayError, asyncio.TimeoutError):
            pass
        finally:
            if isinstance(stream, Listener):  # stop listening on the actor's one stream
                stream.close()
        if not ended and proc.generation == generation and not proc.replacing and not self._closed:
            log.warning("the step %s on %s did not stop within %.1fs: its actor is killed (%s)",
                        key, slot.name, STOP_GRACE_S, cause)
            self.replace(proc, kill=True, cause=cause)

    def cause(self, slot: Slot, generation: int) -> str | None:
        """Why the process ``generation`` of ``slot``'s actor was killed (None: not known to
        have been killed on purpose, e.g. it crashed)."""
        return slot.proc.causes.get(generation)

    async def _replace(self, proc: Proc, old: Any, kill: bool) -> None:
        if old is not None:
            await self._kill_and_confirm(old)
        proc.handle = None
        if proc.channel is not None:
            proc.channel.close()
            proc.channel = None
        self.replacements += 1
        if not proc.recycling and self.placement is not None:
            self.placement.invalidate()  # killed or crashed: perhaps its node is gone
        await self._start(proc)

    async def _start(self, proc: Proc) -> None:
        node = self._node_for(proc) if self.placement is not None else None
        for attempt in range(3):
            try:
                handle = self._make_actor(proc.name) if node is None else self._make_actor(proc.name, node)
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
                    stale = ray.get_actor(proc.name, namespace=self.namespace)
                except ValueError:
                    await self.clock.sleep(0.1 * (attempt + 1))
                    continue
                await self._kill_and_confirm(stale)
        else:
            raise RuntimeError(f"could not create agent actor {proc.name}")
        proc.handle, proc.pid, proc.uses = handle, info["pid"], 0
        proc.generation += 1
        if self._on_start is not None:
            self._on_start(proc)

    async def _kill_and_confirm(self, handle: Any) -> None:
        try:
            ray.kill(handle, no_restart=True)
        except Exception:  # already gone
            return
        # A call on a killed actor fails once Ray has marked it dead: only then does
        # the actor's place (and name) become free again.
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
            self._sweep()  # the next due actor's turn

        task.add_done_callback(done)
        return task

    async def shutdown(self) -> None:
        """Kill every slot actor and wait until Ray confirms each one dead."""
        self._closed = True
        for t in list(self._bg):
            t.cancel()
        await asyncio.gather(*list(self._bg), return_exceptions=True)
        handles = [p.handle for p in self.procs if p.handle is not None] + self._orphans
        self._orphans = []
        for p in self.procs:
            if p.channel is not None:
                p.channel.close()
                p.channel = None
            p.handle, p.node = None, None
        for s in self.slots:
            s.owner = None
        await asyncio.gather(*(self._kill_and_confirm(h) for h in handles), return_exceptions=True)
        self.homes.clear()
        self.moved.clear()
        if self.placement is not None:  # the model actors its agents started on each node
            try:
                await self.placement.stop_models(self._kill_and_confirm)
            except Exception:
                log.exception("could not stop the pool's model actors")

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
