"""The slot table's placement on nodes: a task's places all on one node, its *home*
(see ``runtime.supervisor.placement`` for why node affinity and the module docstring of
``runtime.supervisor.slots`` for the rules). A part of :class:`~.slots.SlotTable`, which
holds the fields these methods use."""

from __future__ import annotations

import logging
from collections import Counter

from .places import PREWARM, Proc, Slot

log = logging.getLogger("threadbound.slots")


class SlotNodes:
    """The node side of :class:`~.slots.SlotTable` (mixed into it)."""

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
