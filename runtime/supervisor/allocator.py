"""The global caps of a pool of several supervisor shards: one small allocator actor.

With ``shards: 1`` there is none: the one supervisor's slot table keeps ``max_agents``
itself. With ``shards: N`` each shard still admits its own tasks, in its own order, but a
task's agents run only once the allocator has granted them out of the pool's one
``max_agents`` budget.

The protocol is state-based, so that an allocator restarted by Ray loses nothing: each
shard's :meth:`Allocator.sync` carries all the shard holds (``held``: task id -> agents)
and what it waits for (``wanted``: the head of its queue), and the answer is what the
shard holds from then on. A restarted allocator grants nothing until every shard has
told it what it holds, so the cap is never exceeded while it relearns.
"""

from __future__ import annotations

from typing import Any


def allocator_name(pool: str) -> str:
    """The allocator actor's name in the pool's namespace."""
    return f"{pool}/allocator"


class Allocator:
    """Grants agents out of ``max_agents`` to ``shards`` supervisor shards; see the module docstring."""

    def __init__(self, max_agents: int, shards: int) -> None:
        self.max_agents = max_agents
        self.shards = shards
        self.held: dict[int, dict[str, int]] = {}
        self.wanted: dict[int, list[tuple[str, int, int, float]]] = {}
        self.calls = 0

    def in_use(self) -> int:
        return sum(sum(h.values()) for h in self.held.values())

    async def sync(self, shard: int, held: dict[str, int], wanted: list[tuple[str, int, int, float]]) -> dict[str, int]:
        """Shard ``shard`` holds ``held`` and waits for ``wanted`` (``(task id, agents,
        priority, submitted_at)``, in its queue's order); returns what it holds now."""
        self.calls += 1
        self.held[shard] = dict(held)
        self.wanted[shard] = list(wanted)
        self._grant()
        return dict(self.held[shard])

    def _grant(self) -> None:
        if len(self.held) < self.shards:  # not every shard has said what it holds
            return
        free = self.max_agents - self.in_use()
        queue = sorted(((-prio, at, shard, task, n) for shard, ws in self.wanted.items()
                        for task, n, prio, at in ws), key=lambda w: w[:2])
        for _, _, shard, task, n in queue:
            if n > free:
                break  # first come first served across shards: nobody overtakes the head
            if task in self.held[shard]:
                continue
            self.held[shard][task] = n
            free -= n
            self.wanted[shard] = [w for w in self.wanted[shard] if w[0] != task]

    async def describe(self) -> dict[str, Any]:
        return {"max_agents": self.max_agents, "shards": self.shards, "in_use": self.in_use(),
                "held": {s: dict(h) for s, h in self.held.items()}, "calls": self.calls}
