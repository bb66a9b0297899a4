"""A slot actor's process (:class:`Proc`) and its places (:class:`Slot`): the bookkeeping
the slot table (``runtime.supervisor.slots``) keeps for each of them."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

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
    channel: Any = field(default=None, repr=False)  # reads the actor's event stream (runtime.supervisor.channel)
    last_used: float = 0.0  # clock.monotonic() when its process started or a place of it was last released

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

