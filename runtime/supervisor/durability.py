"""The supervisor's durability: a journal flushed before a step counts as committed,
and full snapshots every ``snapshot_interval_s`` taken off the event loop.

The supervisor calls it directly for every state change -- :meth:`Durability.submitted`,
:meth:`~Durability.events` (one record per batch of events, however many tasks it
spans), :meth:`~Durability.committed`, :meth:`~Durability.mode`,
:meth:`~Durability.forgot` -- which only append to an in-memory batch, and awaits
:meth:`Durability.flush` where a step or a submit is acknowledged. It is not a hook:
a hook's failure is logged and passed over, a journal that cannot be written fails
every flush from then on (nothing more counts as committed). One flusher appends batches to the journal (group commit: all records
gathered while the previous write ran go in one signed frame, one fdatasync; a record
nobody waits for lets ``GATHER_S`` pass first, so the events of a burst share a frame,
and no less than ``BUSY_GAP_S`` since the previous frame, so a steady stream of events
makes a bounded number of frames a second; a flush writes at once); small
frames to a local disk are written on the loop itself (~0.1 ms, cheaper than two
thread hops), large ones and remote stores on a writer thread.
Events become visible to clients only once written, so a client never sees an
event that a resume would not have: reconnecting with its last offset continues
with no duplicate and no gap.

Snapshots: :meth:`snapshot` takes the supervisor's consistent copy between two
awaits (a shallow copy; cheap), closes the journal segment, waits until every
frame of that segment is written (the snapshot's signed manifest records where the
journal stands, so a reader can tell a segment cut short; records of the next
segment keep flowing meanwhile), and pickles, writes and prunes on a second thread.

The location belongs to pool ``cfg.name`` (``<snapshot_dir>/<name>``, and
``<snapshot_dir>/<name>/shard-<k>`` for shard ``k`` of a pool of several): snapshots
and segments of another pool or another history there are refused on resume.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import cloudpickle

from threadbound.snapshots import SnapshotLocation, load_key, open_store

from threadbound.agents import events as ev

from ..config import RuntimeConfig
from .clock import Clock, SystemClock
from .layout import shard_location

log = logging.getLogger("threadbound.durability")

_INLINE_BYTES = 64 << 10  # journal frames up to this size are written on the event loop
# A record nobody waits for (an event a client will read) is written within this long,
# with whatever else comes in meanwhile; a flush (a commit) writes at once.
GATHER_S = 0.001
# ... and, while the journal is busy, no sooner than this long after the previous frame:
# under a stream of events the frames (each a signed write and an fdatasync) come at
# most ~1/BUSY_GAP_S a second however many events there are, each carrying more of them.
BUSY_GAP_S = 0.005


def open_location(cfg: RuntimeConfig, shard: int = 0) -> SnapshotLocation:
    """The snapshot location of shard ``shard`` of the pool ``cfg`` names (the pool's own
    with one shard: :func:`~.layout.shard_location`), with its signing key, bound to pool
    ``cfg.name``."""
    key = load_key(cfg.snapshots.key_file)
    store = open_store(shard_location(cfg, shard), fsync=cfg.snapshots.fsync)
    return SnapshotLocation(store, key, keep=cfg.snapshots.keep, keep_pinned=cfg.snapshots.keep_pinned,
                            pool=cfg.name)


class Durability:
    """Journal + snapshots for one supervisor; see the module docstring."""

    def __init__(self, cfg: RuntimeConfig, location: SnapshotLocation,
                 on_durable: Callable[[dict[str, int]], None], clock: Clock | None = None) -> None:
        self.cfg = cfg
        self.clock = clock or SystemClock()
        self.location = location
        self.on_durable = on_durable
        self.on_snapshot: Callable[[dict[str, Any]], None] = lambda cost: None  # the supervisor's hooks
        self.on_write: Callable[[float], None] | None = None  # seconds one journal frame took to write
        self.on_failed: Callable[[BaseException], None] = lambda exc: None  # the journal cannot be written
        self.segment = 1
        # Records not yet written, grouped by segment: [(segment, records, marks)].
        self._groups: list[tuple[int, list[Any], dict[str, int]]] = [(self.segment, [], {})]
        self._waiters: list[asyncio.Future] = []
        self._writing: list[asyncio.Future] | None = None  # waiters of the batch being written
        self._wake = asyncio.Event()
        self._timer: Any = None  # a write due GATHER_S after a record (a clock timer)
        self._written_at: float | None = None  # the clock's monotonic time the last frame was written
        self._journal = ThreadPoolExecutor(1, thread_name_prefix="threadbound-journal")
        self._snapper = ThreadPoolExecutor(1, thread_name_prefix="threadbound-snapshot")
        self._tasks: list[asyncio.Task] = []
        self._snapshot_lock = asyncio.Lock()
        self.failed: BaseException | None = None
        self.lease = None
        self.changes = 0  # records queued since start; a snapshot is due only if it moved
        self._changes_at_snapshot = -1
        self._inline = location.store.local_disk
        self._config = cfg.model_dump(mode="json")  # written into every manifest
        if self._config.get("model", {}).get("api_key"):  # manifests are readable without the key
            self._config["model"]["api_key"] = None
        self.stats: dict[str, Any] = {"snapshots": 0, "last_snapshot": None, "journal_frames": 0,
                                      "journal_bytes": 0, "records": 0}

    # -- journal --------------------------------------------------------------------

    def submitted(self, ts: Any) -> None:
        self.record(ev.record(ev.R_SUBMIT, task=ts.id, seq=ts.seq, spec=ts.spec, blob_ids=ts.blob_ids,
                              submitted_at=ts.submitted_at))

    def events(self, rows: list[tuple[str, ev.Row]]) -> None:
        """A batch of appended events (``(task id, row)``), as one record; each task's
        events become readable once it is written."""
        self.record(ev.events_record(rows), {task_id: row.offset + 1 for task_id, row in rows})

    def committed(self, ts: Any, role: str, output: Any, state: Any, requests: list[str]) -> None:
        self.record(ev.record(ev.R_COMMIT, task=ts.id, role=role, output=output, state=state,
                              requests=list(requests)))

    def mode(self, mode: str) -> None:
        self.record(ev.record(ev.R_HEALTH, mode=mode))

    def forgot(self, task_ids: list[str]) -> None:
        self.record(ev.record(ev.R_FORGET, tasks=task_ids))

    def roles(self, changed: dict[str, bytes]) -> None:
        self.record(ev.record(ev.R_ROLES, roles=changed))

    def record(self, rec: Any, marks: dict[str, int] | None = None) -> None:
        """Queue one record; ``marks``: task id -> its event count once it is written."""
        _, records, pending = self._groups[-1]
        records.append(rec)
        self.changes += 1
        if marks:
            pending.update(marks)
        if self._timer is None and not self._wake.is_set():
            delay = GATHER_S
            if self._written_at is not None:  # busy: let the events of the next few ms join this frame
                delay = max(delay, self._written_at + BUSY_GAP_S - self.clock.monotonic())
            try:
                self._timer = self.clock.call_later(delay, self._wake.set)
            except RuntimeError:  # no loop running (start-up): the flusher sees it at its next turn
                self._wake.set()

    async def flush(self) -> None:
        """Return once every record queued so far is durable."""
        if self.failed is not None:
            raise self.failed
        if any(g[1] for g in self._groups):
            waiters = self._waiters
        elif self._writing is not None:  # records queued earlier are in the batch being written
            waiters = self._writing
        else:
            return
        fut = asyncio.get_running_loop().create_future()
        waiters.append(fut)
        self._wake.set()
        await fut

    async def _flusher(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            while any(g[1] for g in self._groups):
                groups, self._writing = self._groups, self._waiters
                self._groups, self._waiters = [(self.segment, [], {})], []
                try:
                    for seg, records, _ in groups:
                        if records:
                            n = await self._append(loop, seg, records)
                            self.stats["journal_frames"] += 1
                            self.stats["journal_bytes"] += n
                            self.stats["records"] += len(records)
                except BaseException as exc:  # the disk failed us: nothing more counts as committed
                    log.error("journal write to %s failed: %r", self.location.location, exc)
                    self.failed = exc
                    self.on_failed(exc)
                    for w in self._writing + self._waiters:
                        if not w.done():
                            w.set_exception(exc)
                    self._writing, self._waiters = None, []
                    return
                waiters, self._writing = self._writing, None
                self._written_at = self.clock.monotonic()
                marks: dict[str, int] = {}
                for _, _, m in groups:
                    marks.update(m)
                # The flushes first: a commit's step goes on (the task's next step is sent)
                # before the readers these events wake take their turn of the loop.
                for w in waiters:
                    if not w.done():
                        w.set_result(None)
                self.on_durable(marks)

    async def _append(self, loop: asyncio.AbstractEventLoop, seg: int, records: list[Any]) -> int:
        """One frame: a small one to a local disk is written right here (an append and
        an fdatasync take ~0.1 ms; two thread hops cost more on a busy machine); large
        frames and remote stores go through the writer thread."""
        frame = self.location.frame(seg, records)
        t0 = time.perf_counter()
        if self._inline and len(frame) <= _INLINE_BYTES:
            n = self.location.append_frame(seg, frame)
        else:
            n = await loop.run_in_executor(self._journal, self.location.append_frame, seg, frame)
        if self.on_write is not None:
            self.on_write(time.perf_counter() - t0)
        return n


    # -- snapshots ------------------------------------------------------------------

    async def snapshot(self, export: Callable[[], tuple[dict[str, Any], dict[str, str], list]],
                       *, clean: bool = False) -> dict[str, Any]:
        """Write a full snapshot of ``export()``'s copy; returns what it cost."""
        async with self._snapshot_lock:
            t0 = time.perf_counter()
            state, tasks, pickle_jobs = export()  # no await in between: consistent
            self._changes_at_snapshot = self.changes
            seq = self.segment
            self.segment += 1
            self._groups.append((self.segment, [], {}))
            copy_ms = (time.perf_counter() - t0) * 1000
            if self._tasks:  # the snapshot records where segment seq ends: let it end first
                await self.flush()
            loop = asyncio.get_running_loop()
            extra = self._extra(state, clean)
            size, write_ms = await loop.run_in_executor(self._snapper, self._write, seq, state, tasks,
                                                        pickle_jobs, extra)
            cost = {"seq": seq, "bytes": size, "copy_ms": round(copy_ms, 3),
                    "write_ms": round(write_ms, 3), "tasks": len(tasks), "at": self.clock.time()}
            self.stats["snapshots"] += 1
            self.stats["last_snapshot"] = cost
            self.on_snapshot(cost)
            return cost

    def _extra(self, state: dict[str, Any], clean: bool) -> dict[str, Any]:
        return {"name": self.cfg.name, "run_id": state.get("run_id"), "clean": clean, "config": self._config}

    def write_now(self, seq: int, export: Callable[[], Any]) -> None:
        """Write snapshot ``seq`` synchronously (at start, before any record); the
        journal continues in segment ``seq + 1``."""
        state, tasks, jobs = export()
        self._write(seq, state, tasks, jobs, self._extra(state, False))
        self.segment = seq + 1
        self._groups = [(self.segment, [], {})]
        self._changes_at_snapshot = self.changes

    def _write(self, seq: int, state: dict[str, Any], tasks: dict[str, str],
               pickle_jobs: list, extra: dict[str, Any]) -> tuple[int, float]:
        t0 = time.perf_counter()
        for job in pickle_jobs:  # per-task pickles (finished tasks keep theirs cached)
            job()
        payload = cloudpickle.dumps(state)
        _, size = self.location.write_snapshot(seq, None, tasks=tasks, extra=extra, payload=payload)
        try:
            self.location.prune()
        except Exception as exc:  # retention failing must not fail the snapshot
            log.warning("pruning %s failed: %r", self.location.location, exc)
        return size, (time.perf_counter() - t0) * 1000

    async def _every_interval(self, export: Callable[[], Any]) -> None:
        while True:
            await self.clock.sleep(self.cfg.snapshot_interval_s)
            if self.changes == self._changes_at_snapshot:
                continue
            try:
                await self.snapshot(export)
            except Exception as exc:  # a failed snapshot is logged and retried next interval
                log.error("snapshot to %s failed: %r", self.location.location, exc)

    async def _renew_lease(self) -> None:
        while True:
            await self.clock.sleep(self.cfg.snapshots.lease_ttl_s / 3)
            try:
                await asyncio.get_running_loop().run_in_executor(self._snapper, self.lease.renew)
            except Exception as exc:
                log.error("renewing the lease on %s failed: %r", self.location.location, exc)

    # -- lifecycle ------------------------------------------------------------------

    def start(self, export: Callable[[], Any]) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._flusher(), name="threadbound/journal"),
                       loop.create_task(self._every_interval(export), name="threadbound/snapshots"),
                       loop.create_task(self._renew_lease(), name="threadbound/lease")]

    async def close(self, export: Callable[[], Any]) -> None:
        """Flush, write a final snapshot marked clean, release the lease."""
        try:
            await self.flush()
            await self.snapshot(export, clean=True)
        finally:
            for t in self._tasks:
                t.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            self._journal.shutdown(wait=True)
            self._snapper.shutdown(wait=True)
            self.location.store.close()
            if self.lease is not None:
                self.lease.release()
                self.lease = None
