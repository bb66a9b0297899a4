"""A task shard: the tasks one supervisor owns, their event logs, and the reads and
idempotency keys over them.

Events are appended in batches (:meth:`TaskShard.append_many`: any number of events
for any number of tasks): the rows are made and tracked, the observers hear of the
batch once, and the journal gets one record for it. A task's events become readable
once that record is written (:meth:`TaskShard.durable_upto`), so a client never reads
an event a resume would not have. Readers long-poll: :meth:`TaskShard.read_many` waits
until any of the tasks it follows has news and answers for all of them at once. Waiting
readers are kept by task (the way Ray Serve's long-poll host keys its listeners), so
news of one task wakes the readers that follow it and no one else; rows go out as
plain tuples.

Task ids are ``t<seq>-<run>`` for shard 0 and ``t<seq>-<run>-s<n>`` for shard ``n``
(:func:`shard_of` reads the number back), so a pool of several shards can route a
call by its task id alone; ids of older pools (no suffix) belong to shard 0.
"""

from __future__ import annotations

import asyncio
import re
import secrets
from typing import Any, Callable, Iterable

from threadbound.agents.events import Row

from ..errors import InvalidTask, TaskNotFound
from ..task import PENDING, TERMINAL, Task, TaskSummary
from .clock import Clock
from .hooks import Hooks
from .task_state import TaskRecord, track

READ_BATCH = 5000  # events returned by one read() call at most
READ_LINGER_S = 0.002  # after a wake-up, how long a read waits for the rest of a burst

_SHARD = re.compile(r"-s(\d+)$")


def shard_of(task_id: str) -> int:
    """The shard number a task id carries (0 when it carries none).

    Examples:
        >>> shard_of("t00012-ab3f"), shard_of("t00012-ab3f-s3")
        (0, 3)
    """
    m = _SHARD.search(task_id)
    return int(m.group(1)) if m else 0


class TaskShard:
    """The task table and its event logs; see the module docstring.

    ``journal`` (set once durability is open) receives each batch of appended events as
    ``[(task id, row), ...]``; without one, events are readable at once.
    """

    def __init__(self, pool: str, clock: Clock, observers: Hooks, *, shard: int = 0) -> None:
        self.pool = pool
        self.clock = clock
        self.observers = observers
        self.shard = shard
        self.tasks: dict[str, TaskRecord] = {}
        self.keys: dict[str, str] = {}  # idempotency key -> task id (rebuilt from the tasks on resume)
        self.seq = 0
        # Task ids are unique across supervisors (a workspace copy or log keyed by one
        # never meets another run's task): a sequence number plus this run's suffix.
        self.run_id = secrets.token_hex(2)
        self.journal: Callable[[list[tuple[str, Row]]], None] | None = None
        self.finished = 0  # terminal tasks remembered (forgotten beyond keep_finished_tasks)
        self.reads = 0  # read calls served (a client following many tasks makes few)
        # Who waits for news of a task (read_many, wait_settled): task id -> futures,
        # so news of one task wakes its readers only.
        self._waiters: dict[str, list[asyncio.Future]] = {}

    # -- the table --------------------------------------------------------------------

    def get(self, task_id: str) -> TaskRecord:
        ts = self.tasks.get(task_id)
        if ts is None:
            raise TaskNotFound(f"no task {task_id!r} in pool {self.pool!r} "
                               "(finished tasks beyond keep_finished_tasks are forgotten)", task_id=task_id)
        return ts

    def new(self, spec: Task, blob_ids: dict[str, str]) -> TaskRecord:
        """A new task's record, under a new id (not yet logged: its first event is the caller's)."""
        self.seq += 1
        suffix = f"-s{self.shard}" if self.shard else ""
        task_id = f"t{self.seq:05d}-{self.run_id}{suffix}"
        ts = TaskRecord(id=task_id, seq=self.seq, spec=spec, submitted_at=self.clock.time(), blob_ids=blob_ids)
        self.tasks[task_id] = ts
        if spec.idempotency_key is not None:
            self.keys[spec.idempotency_key] = task_id
        return ts

    def keyed(self, spec: Task) -> TaskRecord | None:
        """The task ``spec``'s idempotency key already made, if the pool still has it."""
        key = spec.idempotency_key
        if key is None:
            return None
        ts = self.tasks.get(self.keys.get(key, ""))
        if ts is None:
            return None
        if ts.spec != spec:
            raise InvalidTask("idempotency_key", f"{key!r} was already used for task {ts.id}, which is a "
                              "different task; use a new key for a new task")
        return ts

    def restored(self, tasks: dict[str, TaskRecord], seq: int, run_id: str) -> None:
        """Take over a resumed table (its keys rebuilt from the tasks)."""
        self.tasks.update(tasks)
        self.seq, self.run_id = seq, run_id
        self.keys = {ts.spec.idempotency_key: ts.id for ts in self.tasks.values()
                     if ts.spec.idempotency_key is not None}
        self.finished = sum(1 for ts in self.tasks.values() if ts.status in TERMINAL)

    def forget_beyond(self, keep: int) -> list[str]:
        """Forget the oldest finished tasks beyond ``keep``; their ids."""
        if self.finished <= keep:
            return []  # (counted as tasks end: no scan of the table per task)
        finished = [ts for ts in self.tasks.values() if ts.status in TERMINAL]
        forget = [ts.id for ts in finished[: max(0, len(finished) - keep)]]
        for task_id in forget:
            key = self.tasks.pop(task_id).spec.idempotency_key
            if key is not None:
                self.keys.pop(key, None)
        self.finished = len(finished) - len(forget)
        return forget

    def by_status(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for ts in self.tasks.values():
            out[ts.status] = out.get(ts.status, 0) + 1
        return out

    def queued(self, waiting: Iterable[str]) -> int:
        """How many of ``waiting`` (capacity's queue) are tasks not yet admitted."""
        return sum(1 for t in waiting if t in self.tasks and self.tasks[t].status == PENDING)

    # -- the event logs -----------------------------------------------------------------

    def emit(self, ts: TaskRecord, kind: str, agent: str | None, **data: Any) -> None:
        """Append one event to the task's log; see :meth:`append_many`."""
        self.append_many([(ts, kind, agent, data)])

    def append_many(self, items: list[tuple[TaskRecord, str, str | None, dict[str, Any]]]) -> None:
        """Append a batch of events (``(task, kind, agent, data)``; ``data`` may hold any
        keys: an agent's own event is relayed as it is), for one or more tasks: each is
        tracked, the observers hear of the batch once, the journal gets one record."""
        now = self.clock.time()
        batch: list[tuple[TaskRecord, Row]] = []
        for ts, kind, agent, data in items:
            row = Row(len(ts.events), kind, agent, data, now)
            ts.events.append(row)
            ts.version += 1
            track(ts, row)
            batch.append((ts, row))
        self.observers.on_events(batch)
        if self.journal is not None:
            self.journal([(ts.id, row) for ts, row in batch])
        else:
            self.durable_upto({ts.id: row.offset + 1 for ts, row in batch})

    def durable_upto(self, marks: dict[str, int]) -> None:
        """Tasks' events up to these counts are durable: clients may read them."""
        for task_id, n in marks.items():
            ts = self.tasks.get(task_id)
            if ts is not None and n > ts.visible:
                ts.visible = n
                self.notify(ts)

    def notify(self, ts: TaskRecord) -> None:
        """The task has news: wake whoever waits on it (and only them)."""
        waiters = self._waiters.pop(ts.id, None)
        if waiters:
            for w in waiters:
                if not w.done():
                    w.set_result(None)

    def watchers(self, task_id: str) -> int:
        """Reads and waits now waiting for news of ``task_id``."""
        return len(self._waiters.get(task_id, ()))

    def _watch(self, task_ids: Iterable[str]) -> asyncio.Future:
        """A future set at the next news of any of ``task_ids``; :meth:`_unwatch` it after."""
        fut = asyncio.get_running_loop().create_future()
        for task_id in task_ids:
            self._waiters.setdefault(task_id, []).append(fut)
        return fut

    def _unwatch(self, fut: asyncio.Future, task_ids: Iterable[str]) -> None:
        for task_id in task_ids:
            waiters = self._waiters.get(task_id)
            if waiters:
                try:
                    waiters.remove(fut)
                except ValueError:
                    continue  # popped by the news that woke it
                if not waiters:
                    del self._waiters[task_id]

    # -- reads --------------------------------------------------------------------------

    async def read_many(self, cursors: dict[str, int], wait_s: float = 0.0) -> dict[str, tuple[list[Row], str]]:
        """For each ``task id -> offset`` that has news: its events from that offset on (as
        plain ``(offset, kind, agent, data, ts)`` tuples, the fields of a Row), and its status. A task with nothing new (and not ended) is left out of the answer.

        Waits up to ``wait_s`` until at least one of the tasks has something new (or has
        ended), then answers for all of them at once: a client following many tasks makes
        one long-poll per burst, not one per task. A waiting read is woken only by news of
        its own tasks (waiters are kept by task), never by the rest of the pool."""
        self.reads += 1
        states = []
        news = False
        for task_id, offset in cursors.items():
            if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
                raise InvalidTask("from_offset", f"must be an integer >= 0, got {offset!r}")
            ts = self.get(task_id)
            states.append((task_id, offset, ts))
            if offset < ts.visible or ts.settled:
                news = True

        if wait_s > 0 and not news:
            fut = self._watch(cursors)
            try:
                await self.clock.wait_for(fut, wait_s)
                woke = True
            except asyncio.TimeoutError:
                woke = False
            finally:
                self._unwatch(fut, cursors)
            if woke and not all(ts.settled for _, _, ts in states):
                # Events come in bursts (a step's end, the next one's start; many agents'
                # tokens): let the burst land so one round trip carries it.
                await self.clock.sleep(READ_LINGER_S)
        # Rows go out as plain tuples: Ray pickles a namedtuple through cloudpickle's
        # per-object hook and rebuilds it with a call, ~10x the cost of a tuple.
        return {task_id: ([tuple(r) for r in ts.events[off:min(ts.visible, off + READ_BATCH)]], ts.status)
                for task_id, off, ts in states if off < ts.visible or ts.settled}

    async def wait_settled(self, task_id: str, timeout_s: float | None) -> TaskRecord | None:
        """The task once it has ended and all its events are readable; None if
        ``timeout_s`` passes first."""
        ts = self.get(task_id)
        deadline = None if timeout_s is None else self.clock.monotonic() + timeout_s
        while not ts.settled:
            remaining = None if deadline is None else deadline - self.clock.monotonic()
            if remaining is not None and remaining <= 0:
                return None
            fut = self._watch((task_id,))
            try:
                await self.clock.wait_for(fut, remaining)
            except asyncio.TimeoutError:
                return None
            finally:
                self._unwatch(fut, (task_id,))
        return ts

    # -- what clients are told ------------------------------------------------------------

    @staticmethod
    def summary(ts: TaskRecord) -> TaskSummary:
        return TaskSummary(task_id=ts.id, status=ts.status, goal=ts.spec.goal,
                           agents=tuple(ts.spec.agents), round=ts.round, events=len(ts.events),
                           submitted_at=ts.submitted_at, finished_at=ts.finished_at, error=ts.error,
                           idempotency_key=ts.spec.idempotency_key)

    def result(self, ts: TaskRecord) -> dict[str, Any]:
        end = ts.finished_at or self.clock.time()
        return {"task_id": ts.id, "status": ts.status, "outputs": dict(ts.outputs), "rounds": ts.round,
                "error": ts.error, "elapsed_s": end - ts.submitted_at, "reason": ts.reason,
                "applied": list(ts.applied), "refused": list(ts.refused)}
