"""The global caps of a pool of several supervisor shards: one small allocator actor.

With ``shards: 1`` there is none: the one supervisor's slot table keeps ``max_agents``
itself. With ``shards: N`` each shard still admits its own tasks, in its own order, but a
task's agents run only once the allocator has granted them out of the pool's one
``max_agents`` budget. Two halves live here: :class:`Allocator`, the actor (one per pool,
named :func:`allocator_name`), and :class:`Share`, a shard's side of it (what the shard
holds, what it waits for, and the one call it keeps going to the allocator).

**State, not deltas.** Each :meth:`Allocator.sync` carries all the shard holds (``held``:
task id -> agents) and the head of what it waits for (``wanted``, in the shard's order),
and the answer is what the shard holds from then on. So a lost answer or a restarted
allocator loses nothing: the next sync says it all again. A restarted allocator grants
nothing until every shard has told it what it holds, so the cap is never exceeded while
it relearns; a shard that died keeps what it held in the allocator's books until it is
back and says what it holds (its agent actors die with it).

**Order.** Across shards, the waiting tasks are granted highest priority first, then by
submission time (first come, first served); nobody overtakes the head: when it does not
fit, nothing is granted until it does (as one supervisor's admission queue does).

**Few messages.** A shard has one call out at a time: a *sync* when it has news (a task
queued, ended, withdrawn), answered at once, every change made while it was out going in
the next one; else a *listen* (a sync with nothing new and ``wait_s`` > 0), which the
allocator holds until it grants this shard something (because another shard freed some)
or ``wait_s`` passes. News while a listen is out sends a sync at once, which answers the
listen (``None``: superseded). A shard that waits for budget thus hears of it in one
message, and an idle shard costs one message per ``LISTEN_S``. The listen is also how a
shard learns that the allocator restarted: its call fails, and it syncs again.

**Order of calls.** Each sync carries the shard's *incarnation* (when its supervisor
started, and a random id) and a sequence number; the allocator ignores a call older
than the newest it has seen from that shard (answering ``stale``), so a late call of a
shard's previous life, or an overtaken one, never rolls its books back. (A shard
restarted on a node whose clock is behind is told the newest incarnation seen and
starts its numbering above it.) A shard uses an
answer only if it is the answer to its newest call: everything it holds is therefore
always in the allocator's books (``held`` there is a superset), which is what keeps the
cap.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import os
from typing import Any, Callable

from .clock import Clock, SystemClock

log = logging.getLogger("threadbound.allocator")

LISTEN_S = 30.0  # how long the allocator holds a listen before answering "nothing new"
CALL_MARGIN_S = 10.0  # beyond its wait, how long a call may take before the allocator counts as unavailable
BACKOFF_S = (0.05, 2.0)  # first and longest pause between calls to an unavailable allocator
CLOSE_S = 2.0  # how long a closing shard waits for the allocator to hear that it holds nothing

Wanted = tuple[str, int, int, float]  # (task id, agents, priority, submitted at: wall-clock seconds)


def allocator_name(pool: str) -> str:
    """The allocator actor's name in the pool's namespace."""
    return f"{pool}/allocator"


class Allocator:
    """Grants agents out of ``max_agents`` to ``shards`` supervisor shards; see the module docstring.

    A plain class: ``runtime.actors`` makes it an async Ray actor (restarted by Ray when
    it dies); tests call it in-process.

    Examples:
        >>> import asyncio
        >>> a = Allocator(max_agents=3, shards=2)
        >>> asyncio.run(a.sync(0, (1.0, "x"), 1, {}, [("t1-s0", 2, 0, 5.0)]))["held"]  # shard 1 not heard yet
        {}
        >>> asyncio.run(a.sync(1, (1.0, "y"), 1, {}, [("t1-s1", 2, 0, 6.0)]))["held"]  # t1-s0 came first
        {}
        >>> a.held
        {0: {'t1-s0': 2}, 1: {}}
    """

    def __init__(self, max_agents: int, shards: int) -> None:
        self.max_agents = max_agents
        self.shards = shards
        self.held: dict[int, dict[str, int]] = {}
        self.wanted: dict[int, list[Wanted]] = {}
        self.latest: dict[int, tuple[tuple[float, str], int]] = {}  # shard -> (incarnation, seq) of its newest call
        self._listening: dict[int, asyncio.Future] = {}  # shard -> its listen, waiting
        self.calls = 0
        self.listens = 0
        self.stale = 0  # calls answered "stale": older than the shard's newest
        self.grants = 0
        self.most_in_use = 0

    def in_use(self) -> int:
        return sum(sum(h.values()) for h in self.held.values())

    def ready(self) -> bool:
        """True once every shard has said what it holds (until then nothing is granted)."""
        return len(self.held) >= self.shards

    async def sync(self, shard: int, incarnation: tuple[float, str], seq: int, held: dict[str, int],
                   wanted: list[Wanted], wait_s: float = 0.0) -> dict[str, Any] | None:
        """Shard ``shard`` (in its life ``incarnation``, call number ``seq``) holds ``held``
        and waits for ``wanted`` (``(task id, agents, priority, submitted_at)``, in its
        queue's order). Returns ``{"held": what it holds now, "ready": ...}``, or
        ``{"stale": True, "latest": (incarnation, seq)}`` when a newer call of the shard has
        been seen (this one changed nothing; ``latest`` lets a shard whose clock is behind
        its previous life's start above it). With ``wait_s``
        > 0 (a listen) the answer waits until the shard is granted something, a newer
        call comes, or ``wait_s`` passes."""
        if not 0 <= shard < self.shards:
            raise ValueError(f"shard {shard} is not one of this pool's {self.shards} shards (0-{self.shards - 1})")
        self.calls += 1
        mine = (tuple(incarnation), int(seq))
        last = self.latest.get(shard)
        if last is not None and mine <= last:
            self.stale += 1
            return {"stale": True, "latest": last}
        self.latest[shard] = mine
        waiting = self._listening.pop(shard, None)
        if waiting is not None and not waiting.done():
            waiting.set_result(None)  # superseded: it answers "stale"
        self.held[shard] = {str(t): int(n) for t, n in held.items()}
        self.wanted[shard] = [(str(t), int(n), int(p), float(at)) for t, n, p, at in wanted]
        self._grant(exclude=shard)
        granted = set(self.held[shard]) - set(held)
        if wait_s > 0 and not granted:
            self.listens += 1
            fut = asyncio.get_running_loop().create_future()
            self._listening[shard] = fut
            try:
                await asyncio.wait_for(asyncio.shield(fut), min(float(wait_s), 4 * LISTEN_S))
            except asyncio.TimeoutError:
                pass
            finally:
                if self._listening.get(shard) is fut:
                    del self._listening[shard]
            if self.latest.get(shard) != mine:
                return {"stale": True, "latest": self.latest[shard]}
        return {"held": dict(self.held[shard]), "ready": self.ready()}

    def _grant(self, exclude: int | None = None) -> None:
        """Grant the waiting tasks in order while they fit; wake the listens of the shards
        granted something (``exclude``: the caller, answered directly)."""
        if not self.ready():
            return
        free = self.max_agents - self.in_use()
        if free <= 0:
            return
        queue = sorted(((-prio, at, shard, i, task, n) for shard, ws in self.wanted.items()
                        for i, (task, n, prio, at) in enumerate(ws)))
        woken: set[int] = set()
        for _, _, shard, _, task, n in queue:
            if task in self.held[shard]:
                continue
            if n > free:
                break  # first come first served across shards: nobody overtakes the head
            self.held[shard][task] = n
            self.grants += 1
            free -= n
            woken.add(shard)
        for shard in woken:
            self.wanted[shard] = [w for w in self.wanted[shard] if w[0] not in self.held[shard]]
            fut = self._listening.pop(shard, None)
            if shard != exclude and fut is not None and not fut.done():
                fut.set_result(None)
        self.most_in_use = max(self.most_in_use, self.in_use())

    async def describe(self) -> dict[str, Any]:
        return {"max_agents": self.max_agents, "shards": self.shards, "in_use": self.in_use(),
                "most_in_use": self.most_in_use, "ready": self.ready(),
                "held": {s: dict(h) for s, h in self.held.items()},
                "waiting": {s: len(w) for s, w in self.wanted.items()},
                "calls": self.calls, "listens": self.listens, "stale": self.stale, "grants": self.grants,
                "pid": os.getpid()}


class Share:
    """One shard's share of the pool's caps, kept in step with the allocator.

    ``allocator``: a handle with ``sync.options(...).remote(...)`` returning an awaitable
    (the Ray actor handle; tests give an in-process one). ``on_grant()``: the allocator
    granted some waiting tasks (:meth:`granted` lists them); ``submitted_at(task_id)``:
    the task's submission time (wall clock), its place in the order across shards.

    The capacity calls :meth:`want`, :meth:`drop` and :meth:`bound`; everything it changes
    goes to the allocator in the next sync (see the module docstring).
    """

    def __init__(self, allocator: Any, shard: int, max_agents: int, *, incarnation: tuple[float, str],
                 on_grant: Callable[[], None], submitted_at: Callable[[str], float],
                 clock: Clock | None = None) -> None:
        self.allocator = allocator
        self.shard = shard
        self.max_agents = max_agents
        self.incarnation = incarnation
        self.on_grant = on_grant
        self.submitted_at = submitted_at
        self.clock: Clock = clock or SystemClock()
        self.held: dict[str, int] = {}  # task id -> agents the allocator granted it (until released)
        self.waiting: dict[str, tuple[int, int, int, float]] = {}  # task id -> (-priority, order, agents, since)
        self._granted: dict[str, tuple[int, int, int, float]] = {}  # held, slots not taken yet: its request
        # (-priority, order, task id) of the waiting tasks, sorted, so that the head of the
        # queue costs no sort of thousands per sync; entries of tasks no longer waiting are
        # skipped, and cut off once they reach the front.
        self._order: list[tuple[int, int, str]] = []
        self.holding = False  # paused or closing: want nothing
        self.ready = False  # the allocator has heard from every shard
        self.available = True  # the last call to the allocator succeeded
        self.seq = 0
        self._changed = True  # news since the last answer used (the first call is a sync)
        self._news: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None
        self._closed = False
        self.stats = {"syncs": 0, "listens": 0, "superseded": 0, "stale": 0, "failures": 0, "grants": 0,
                      "waited_s": 0.0, "most_held": 0}

    # -- what the capacity tells it -----------------------------------------------------

    def want(self, task_id: str, agents: int, priority: int, order: int) -> None:
        self._queue(task_id, (-priority, order, agents, self.clock.monotonic()))
        self._news_now()

    def _queue(self, task_id: str, want: tuple[int, int, int, float]) -> None:
        self.waiting[task_id] = want
        bisect.insort(self._order, (want[0], want[1], task_id))

    def drop(self, task_id: str) -> None:
        """The task no longer waits, or gives its budget back (released or withdrawn)."""
        was_waiting = self.waiting.pop(task_id, None) is not None
        self._granted.pop(task_id, None)
        if self.held.pop(task_id, None) is not None or was_waiting:
            self._news_now()

    def withdraw(self, task_id: str) -> None:
        """The task no longer waits (ended or cancelled before it ran): its request goes,
        and its budget if granted but not taken; a task running keeps its budget until
        :meth:`drop` (its release)."""
        if self.waiting.pop(task_id, None) is not None:
            self._news_now()
        if self._granted.pop(task_id, None) is not None:
            self.held.pop(task_id, None)
            self._news_now()

    def granted(self) -> list[str]:
        """Tasks granted budget whose slots are not taken yet, in grant order."""
        return list(self._granted)

    def bound(self, task_id: str) -> None:
        """The task took its slots (its budget stays held until :meth:`drop`)."""
        self._granted.pop(task_id, None)

    def hold(self, holding: bool) -> None:
        """Paused or closing: want nothing, and give back budget granted to tasks not started."""
        if holding == self.holding:
            return
        self.holding = holding
        if holding:
            for task_id, want in list(self._granted.items()):  # it waits again, in its place
                del self._granted[task_id]
                self.held.pop(task_id, None)
                self._queue(task_id, want)
        self._news_now()

    def _news_now(self) -> None:
        self._changed = True
        if self._news is not None:
            self._news.set()

    # -- the calls ----------------------------------------------------------------------

    def start(self) -> None:
        if self._loop_task is None and not self._closed:
            self._news = asyncio.Event()
            self._loop_task = asyncio.get_running_loop().create_task(self._run(), name="threadbound/allocator")

    def _wanted(self) -> list[Wanted]:
        if self.holding:
            return []
        # No more than max_agents entries: the allocator could not grant more at once.
        head: list[Wanted] = []
        seen: set[str] = set()
        cut = 0  # entries at the front that no longer wait
        for i, (prio, order, task_id) in enumerate(self._order):
            want = self.waiting.get(task_id)
            if want is None or want[:2] != (prio, order) or task_id in seen:
                if not head:
                    cut = i + 1
                continue
            seen.add(task_id)
            head.append((task_id, want[2], -prio, self.submitted_at(task_id)))
            if len(head) >= self.max_agents:
                break
        if cut:
            del self._order[:cut]
        return head

    async def _call(self, seq: int, held: dict[str, int], wanted: list[Wanted], wait_s: float) -> Any:
        ref = self.allocator.sync.options(max_task_retries=0).remote(
            self.shard, self.incarnation, seq, held, wanted, wait_s)
        return await self.clock.wait_for(ref, wait_s + CALL_MARGIN_S)

    async def _run(self) -> None:
        backoff, stale = 0.0, 0
        while not self._closed:
            news, self._changed = self._changed, False
            self._news.clear()
            self.seq += 1
            held, wanted = dict(self.held), self._wanted()
            wait_s = 0.0 if news else LISTEN_S
            self.stats["listens" if wait_s else "syncs"] += 1
            call = asyncio.ensure_future(self._call(self.seq, held, wanted, wait_s))
            if wait_s:  # a listen: news replaces it
                woken = asyncio.ensure_future(self._news.wait())
                try:
                    await asyncio.wait({call, woken}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    woken.cancel()
                if not call.done():
                    self.stats["superseded"] += 1
                    call.add_done_callback(_forget)  # the next call answers it; its answer is stale
                    continue
            try:
                reply = await call
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # dead, restarting, or not answering
                self.stats["failures"] += 1
                if self.available:
                    log.warning("shard %d: the pool's allocator does not answer (%r); running tasks go on, "
                                "no new ones start until it is back", self.shard, exc)
                self.available = False
                self._changed = True  # say everything again once it is back
                backoff = min(BACKOFF_S[1], max(BACKOFF_S[0], 2 * backoff))
                await self.clock.sleep(backoff)
                continue
            if not self.available:
                log.warning("shard %d: the pool's allocator answers again", self.shard)
            self.available, backoff = True, 0.0
            if reply.get("stale"):  # the allocator has seen a newer call of this shard
                self.stats["stale"] += 1
                self._changed = True
                stale += 1
                self._overtake(reply["latest"])
                if stale > 2:  # should not happen twice: never spin on it
                    backoff = min(BACKOFF_S[1], max(BACKOFF_S[0], 2 * backoff))
                    await self.clock.sleep(backoff)
                continue
            stale = 0
            self._apply(reply, held)

    def _overtake(self, latest: Any) -> None:
        """Number the next call above ``latest``, the newest the allocator has seen of this
        shard: a call of this life overtaken (the next one is numbered above it), or one of
        a previous life whose clock was ahead of this node's (this life starts above it)."""
        (when, token), seq = latest
        if (when, token) > self.incarnation:
            log.warning("shard %d: a previous life of this shard started at %.3f, after this one (%.3f): "
                        "is this node's clock behind?", self.shard, when, self.incarnation[0])
            self.incarnation = (when + 0.001, self.incarnation[1])
        elif tuple((when, token)) == tuple(self.incarnation):
            self.seq = max(self.seq, seq)

    def _apply(self, reply: dict[str, Any], sent: dict[str, int]) -> None:
        self.ready = bool(reply.get("ready"))
        now = self.clock.monotonic()
        got = False
        for task_id in reply["held"]:
            if task_id in sent or task_id in self.held:
                continue  # ours already (or released since: the next sync says so)
            want = self.waiting.get(task_id)
            if want is None or self.holding:  # withdrawn meanwhile, or paused: give it back
                self._changed = True
                continue
            del self.waiting[task_id]
            self.held[task_id] = want[2]
            self._granted[task_id] = want
            self.stats["grants"] += 1
            self.stats["waited_s"] += max(0.0, now - want[3])
            got = True
        self.stats["most_held"] = max(self.stats["most_held"], sum(self.held.values()))
        if got:
            self.on_grant()

    async def close(self) -> None:
        """Stop calling; tell the allocator this shard holds nothing (briefly: it may be gone)."""
        if self._closed:
            return
        self._closed = True
        self.held.clear()
        self.waiting.clear()
        self._granted.clear()
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
        self.seq += 1
        try:
            ref = self.allocator.sync.options(max_task_retries=0).remote(self.shard, self.incarnation, self.seq, {}, [],
                                                                         0.0)
            await self.clock.wait_for(ref, CLOSE_S)
        except Exception as exc:
            log.info("shard %d: could not tell the allocator it holds nothing (%r)", self.shard, exc)

    def describe(self) -> dict[str, Any]:
        """What ``pool_stats()["allocator"]`` shows: ``calls`` made (``syncs``, with news, and
        ``listens``; ``superseded``: listens replaced by a sync), tasks granted budget
        (``grants``) and the seconds they waited for it in all (``waited_s``), agents and
        tasks ``held`` now, tasks ``waiting``, ``failures`` (calls that failed: the allocator
        dead, restarting or slow) and whether it answers now (``available``)."""
        return {**self.stats, "calls": self.stats["syncs"] + self.stats["listens"],
                "waited_s": round(self.stats["waited_s"], 3), "held": sum(self.held.values()),
                "tasks_held": len(self.held), "waiting": len(self.waiting), "ready": self.ready,
                "available": self.available}


def _forget(fut: asyncio.Future) -> None:
    if not fut.cancelled():
        fut.exception()  # retrieved: a superseded call's failure is nobody's concern
