"""One snapshot location: numbered snapshots, the journal segments between them,
the location's history record, retention, and the lease that makes its owner the
only writer.

Snapshot ``n`` (``snap-<n>.tbs``) holds the state as of the moment journal segment
``n`` was closed; records appended after it go to segment ``n+1``
(``journal-<n+1>.tbj``). Resume = newest snapshot that verifies + every segment
after it, in order. Segments are deleted only once the oldest snapshot of the
retention window covers them, so falling back to an older snapshot loses nothing.

**Bound to their place.** ``history.tbh`` is the location's signed record of the
pool it belongs to and its current history: a random id drawn when a pool starts a
fresh history here (:meth:`SnapshotLocation.clear`, then the first write), kept by
every later writer that resumes it. Every snapshot's signed manifest carries its
number, pool and history, and every journal segment's signed header its number,
pool and history; a file whose binding does not match its name and this location
is refused before anything in it is unpickled (a renamed old snapshot, another
pool's, a snapshot or segment of another history). ``pool=`` names the pool the
caller expects; without it, the pool the history record names is taken.

**In their order** (see :mod:`.journal`): frames are hash-chained within a segment,
each segment's header names the journal position it continues from, and each
snapshot's manifest names the position it covers (``journal_tail``). The rule on
resume: the journal after snapshot ``n`` replays only if it continues exactly from
``n``'s position, every segment header continues exactly from the position walked
so far, and -- where a newer snapshot was refused for a damaged payload but its
signed manifest verified -- it reaches exactly the position that snapshot recorded.
The first break stops the walk: the journal is never replayed across a hole, since
a missing committed record would make a committed step run again. The break is
reported (:attr:`Loaded.breaks`, and in :attr:`Loaded.skipped` against the
snapshot passed over) and an older snapshot is tried as for a damaged one; if none
replays cleanly, :meth:`SnapshotLocation.load_newest` raises
:class:`SnapshotCorrupt` naming the file and the check. A torn tail (an append a
crash cut short) was never acknowledged: it is dropped and listed in
:attr:`Loaded.torn`. Cut-offs at the very end of the journal, with nothing after
them that vouches for the missing frames, cannot be told from a crash.

Here: the location's listing, history record, writing, retention and lease; reading
back and the journal walk are in :mod:`.reading`, the file names in :mod:`.files`.
"""

from __future__ import annotations

import os
import re
import secrets
import threading
from typing import Any

from . import codec, journal, retention
from .errors import NoSnapshot, SnapshotCorrupt, SnapshotError
from .files import _SNAP, _JRNL, HISTORY, journal_name, snap_name
from .reading import _Reading
from .stores import Lease, Store, open_store


class SnapshotLocation(_Reading):
    """Snapshots and journal in one :class:`~threadbound.snapshots.stores.Store`.

    ``pool`` is the pool this location belongs to: a fresh history records it, and
    loading refuses files of another pool (None: the pool the location records).

    Examples:
        >>> import tempfile
        >>> from threadbound.snapshots import LocalStore, SnapshotLocation
        >>> loc = SnapshotLocation(LocalStore(tempfile.mkdtemp()), b"k" * 32, pool="main")
        >>> loc.write_snapshot(0, {"hello": 1}, tasks={})[0]
        'snap-0000000000.tbs'
        >>> _ = loc.append(1, [["step", "t1"]])  # durable on return
        >>> loaded = loc.load_newest()
        >>> loaded.state, loaded.records
        ({'hello': 1}, [['step', 't1']])
    """

    def __init__(self, store: Store, key: bytes, *, keep: int = 3, keep_pinned: int = 10,
                 pool: str | None = None) -> None:
        self.store, self.key = store, key
        self.keep, self.keep_pinned = keep, keep_pinned
        self.pool = pool
        self._manifests: dict[int, dict[str, Any]] = {}
        self._record: dict[str, Any] | None = None  # the verified history record
        # The writer's journal position (guarded: frames are made on the event loop,
        # snapshots written on a thread). _base: the position before the open
        # segments; _open: segment -> [frames, MAC of its last frame or header];
        # segments up to _closed are covered by a snapshot or on disk: never appended to.
        self._lock = threading.Lock()
        self._ready = False
        self._base: list[Any] | None = None
        self._open: dict[int, list[Any]] = {}
        self._closed = -1

    @property
    def location(self) -> str:
        return self.store.location

    @property
    def history(self) -> str | None:
        """The id of the history this location holds, once read or started (else None)."""
        return None if self._record is None else self._record["history"]

    # -- listing ----------------------------------------------------------------------

    def _numbered(self, pattern: re.Pattern[str]) -> list[int]:
        return sorted(int(m.group(1)) for n in self.store.list() if (m := pattern.match(n)))

    def snapshots(self) -> list[int]:
        return self._numbered(_SNAP)

    def segments(self) -> list[int]:
        return self._numbered(_JRNL)

    def manifest(self, seq: int) -> dict[str, Any]:
        """A snapshot's manifest, unverified (``ls``/``show`` and retention); never unpickles."""
        m = self._manifests.get(seq)
        if m is None:
            m, _ = codec.read_manifest(self.store.read(snap_name(seq)), self.path_of(snap_name(seq)))
            self._manifests[seq] = m
        return m

    def path_of(self, name: str) -> str:
        """Where file ``name`` of this location is, for messages."""
        return f"{self.location.rstrip('/')}/{name}"

    # -- the history record -----------------------------------------------------------

    def history_record(self) -> dict[str, Any]:
        """The verified record of this location's pool and history (read once)."""
        if self._record is not None:
            return self._record
        path = self.path_of(HISTORY)
        try:
            data = self.store.read(HISTORY)
        except FileNotFoundError:
            raise SnapshotCorrupt(path, "missing: this location's record of its pool and history is gone, and "
                                        "every snapshot and journal segment here is bound to it; restore it, "
                                        "or move this directory away to start a new history") from None
        except OSError as exc:
            raise SnapshotCorrupt(path, f"cannot read: {exc}") from None
        record = codec.read_history(data, self.key, path)
        if self.pool is not None and record["pool"] != self.pool:
            raise SnapshotCorrupt(path, f"written by pool {record['pool']!r} but this location belongs to pool "
                                        f"{self.pool!r} (another pool's snapshot directory)")
        self._record = record
        return record

    def _record_or_format_error(self, seqs: list[int]) -> dict[str, Any]:
        """The history record; where it is missing or bad, an old-format location is
        reported as such (it never had one)."""
        try:
            return self.history_record()
        except SnapshotCorrupt as exc:
            problem = exc
        for seq in reversed(seqs):
            path = self.path_of(snap_name(seq))
            try:
                manifest, _ = codec.read_manifest(self.store.read(snap_name(seq)), path)
            except (SnapshotError, OSError):
                continue
            codec.check_format(manifest, path)
            break
        raise problem

    # -- writing ----------------------------------------------------------------------

    def _writer(self) -> None:
        """Establish what this writer continues (under the lock): the history this
        location records (adopted with its journal position, when it was neither
        loaded nor cleared by this writer), or a fresh one."""
        if self._ready:
            return
        if HISTORY in self.store.list():
            self.history_record()
            self._base, self._open = self._position_on_disk(), {}
            self._closed = max(self.segments(), default=-1)
        else:
            pool, history = self.pool or codec.DEFAULT_POOL, secrets.token_hex(8)
            self.store.write_atomic(HISTORY, codec.encode_history(self.key, pool=pool, history=history))
            self._record = {"pool": pool, "history": history}
            self._base, self._open, self._closed = None, {}, -1
        self._ready = True

    def _position_on_disk(self) -> list[Any] | None:
        """Where the journal on disk ends, walked from the newest snapshot whose manifest verifies."""
        for seq in reversed(self.snapshots()):
            try:
                data, path = self._read_snapshot(seq)
                manifest, _ = self._verify_manifest(seq, data, path)
            except SnapshotCorrupt:
                continue
            return self._walk(seq, manifest.get("journal_tail"), {}).tail
        return self._walk(-1, None, {}, strict=False).tail

    def _tail_through(self, seq: int) -> list[Any] | None:
        """The writer's journal position after segment ``seq`` (under the lock)."""
        written = [k for k, (frames, _) in self._open.items() if k <= seq and frames]
        if not written:
            return self._base
        k = max(written)
        return [k, self._open[k][0], self._open[k][1].hex()]

    def write_snapshot(self, seq: int, state: Any, *, tasks: dict[str, str],
                       extra: dict[str, Any] | None = None, payload: bytes | None = None) -> tuple[str, int]:
        """Write snapshot ``seq`` atomically; returns its name and size in bytes.

        It closes journal segment ``seq``: append every frame of it first; later
        records go to segment ``seq + 1``.
        """
        with self._lock:
            self._writer()
            tail = self._tail_through(seq)
            for k in [k for k in self._open if k <= seq]:
                del self._open[k]
            self._base, self._closed = tail, max(self._closed, seq)
            record = self._record
        data = codec.encode(state, self.key, seq=seq, tasks=tasks, extra=extra, payload=payload,
                            pool=record["pool"], history=record["history"], journal_tail=tail)
        name = snap_name(seq)
        self.store.write_atomic(name, data)
        self._manifests[seq], _ = codec.read_manifest(data)
        return name, len(data)

    def append(self, seq: int, records: list[Any]) -> int:
        """Append one signed frame to segment ``seq``; durable when this returns."""
        return self.append_frame(seq, self.frame(seq, records))

    def frame(self, seq: int, records: list[Any]) -> bytes:
        """``records`` encoded and signed as the next frame of segment ``seq`` (with the
        segment's header if it is the first). Frames must be appended in the order
        they are made, segments in ascending order."""
        with self._lock:
            self._writer()
            newest = max(self._open, default=self._closed)
            if seq <= self._closed or seq < newest:
                raise ValueError(f"journal segment {seq} is closed (a snapshot covers it, it is on disk from an "
                                 f"earlier run, or segment {newest} came after it); append to a later segment")
            state = self._open.get(seq)
            head = b""
            if state is None:
                head, before = journal.open_segment(self.key, segment=seq, pool=self._record["pool"],
                                                    history=self._record["history"],
                                                    prev=self._tail_through(seq - 1))
                state = self._open[seq] = [0, before]
            frame, mac = journal.encode_frame(records, self.key, seq, state[0], state[1])
            state[0], state[1] = state[0] + 1, mac
        return head + frame

    def append_frame(self, seq: int, frame: bytes) -> int:
        """Append a frame made by :meth:`frame`; durable when this returns."""
        self.store.append(journal_name(seq), frame)
        return len(frame)

    def prune(self) -> list[str]:
        """Apply retention; delete journal segments the oldest kept window snapshot covers."""
        seqs = self.snapshots()
        manifests = []
        for seq in seqs:
            try:
                manifests.append((seq, self.manifest(seq)))
            except (SnapshotError, OSError):
                manifests.append((seq, {}))  # unreadable: no task pins it
        kept, dropped = retention.plan(manifests, self.keep, self.keep_pinned)
        deleted = []
        for seq in sorted(dropped):
            self.store.delete(snap_name(seq))
            self._manifests.pop(seq, None)
            deleted.append(snap_name(seq))
        window = seqs[-self.keep:] if self.keep > 0 else seqs[-1:]
        floor = window[0] if window else -1
        for seq in self.segments():
            if seq <= floor:
                self.store.delete(journal_name(seq))
                deleted.append(journal_name(seq))
        return deleted

    def clear(self) -> None:
        """Remove every snapshot, segment and the history record (the lease stays):
        the next write starts a fresh history."""
        with self._lock:
            self.store.clear()
            self._manifests.clear()
            self._record = None
            self._ready, self._base, self._open, self._closed = False, None, {}, -1

    def acquire_lease(self, ttl_s: float, owner: str | None = None) -> Lease:
        """Become the only writer; then remove temp files of writes a crash cut short."""
        lease = self.store.acquire_lease(ttl_s, owner)
        self.store.remove_partial()
        return lease


def find_location(path: str, name: str | None = None) -> str:
    """The snapshot location of one pool: ``path`` itself, ``path/<name>``, or the only
    pool under ``path``. Reads only; creates nothing."""
    path = path.rstrip("/") if "://" in path else os.path.abspath(os.path.expanduser(path))
    if name is not None:
        path = f"{path}/{name}"
    store = open_store(path, create=False)
    if _holds_snapshots(store):
        return path
    pools = [c for c in store.children() if _holds_snapshots(open_store(c, create=False))] if name is None else []
    if len(pools) == 1:
        return pools[0]
    if pools:
        raise NoSnapshot(path, "holds the snapshots of several pools: "
                               + ", ".join(p.rsplit("/", 1)[-1] for p in pools)
                               + "; pass one of their directories (or name=...)")
    raise NoSnapshot(path, "no snapshot here; pass the snapshot_dir (or <snapshot_dir>/<pool name>) "
                           "the crashed pool wrote to")


def _holds_snapshots(store: Store) -> bool:
    return any(_SNAP.match(n) for n in store.list())
