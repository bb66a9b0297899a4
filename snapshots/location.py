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
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import threading
from dataclasses import dataclass, field
from typing import Any

import cloudpickle

from . import codec, journal, retention
from .errors import NoSnapshot, SnapshotCorrupt, SnapshotError, UnsupportedFormat
from .stores import Lease, Store, open_store

log = logging.getLogger("threadbound.snapshots")

_SNAP = re.compile(r"^snap-(\d{10})\.tbs$")
_JRNL = re.compile(r"^journal-(\d{10})\.tbj$")
HISTORY = "history.tbh"


def snap_name(seq: int) -> str:
    return f"snap-{seq:010d}.tbs"


def journal_name(seq: int) -> str:
    return f"journal-{seq:010d}.tbj"


@dataclass
class Loaded:
    """What a resume starts from."""

    seq: int  # the snapshot number; the journal is replayed from segment seq+1
    manifest: dict[str, Any]
    state: Any
    records: list[Any]
    # (file, why) of newer snapshots not used: damaged, or the journal after them breaks
    skipped: list[tuple[str, str]] = field(default_factory=list)
    torn: list[str] = field(default_factory=list)  # segments whose unacknowledged tail was dropped
    # (file, why) of each journal break that made the resume pass over a newer snapshot
    breaks: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class _Walk:
    bodies: list[bytes]  # verified frame bodies, not yet decoded
    torn: list[str]
    tail: list[Any] | None  # where the journal stands at its end


class SnapshotLocation:
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

    # -- reading ----------------------------------------------------------------------

    def _read_snapshot(self, seq: int) -> tuple[bytes, str]:
        name = snap_name(seq)
        try:
            return self.store.read(name), self.path_of(name)
        except OSError as exc:
            raise SnapshotCorrupt(self.path_of(name), f"cannot read: {exc}") from None

    def _verify_manifest(self, seq: int, data: bytes, path: str) -> tuple[dict[str, Any], int]:
        """Format, signature, then the binding to this file name and this location."""
        manifest, at = codec.verify_manifest(data, self.key, path)
        try:
            record = self.history_record()
        except SnapshotCorrupt as exc:
            raise SnapshotCorrupt(path, f"cannot be checked against this location: {exc}") from None
        codec.check_binding(manifest, path, seq=seq, pool=record["pool"], history=record["history"])
        return manifest, at

    def load(self, seq: int) -> tuple[dict[str, Any], Any]:
        """Verify snapshot ``seq``, then unpickle it: its manifest and state."""
        manifest, payload = self._verified(seq)
        return manifest, cloudpickle.loads(payload)

    def verify(self, seq: int) -> dict[str, Any]:
        """Check snapshot ``seq`` completely without unpickling it; its manifest."""
        return self._verified(seq)[0]

    def _verified(self, seq: int) -> tuple[dict[str, Any], bytes]:
        data, path = self._read_snapshot(seq)
        manifest, at = self._verify_manifest(seq, data, path)
        return manifest, codec.verify_payload(data, at, manifest, path)

    def load_newest(self) -> Loaded:
        """The newest snapshot that verifies and whose journal replays cleanly, plus that journal.

        A damaged newer snapshot is skipped and reported in ``Loaded.skipped``; so is
        one the journal after it does not continue from cleanly (the break also in
        ``Loaded.breaks``). A format this version cannot read is an error, not a
        skip; so is a break no older snapshot gets past (:class:`SnapshotCorrupt`).
        """
        seqs = self.snapshots()
        if not seqs:
            raise NoSnapshot(self.location, "no snapshot here; start a new pool instead of resuming, "
                                            "or point at the snapshot_dir the crashed pool used")
        self._record_or_format_error(seqs)
        skipped: list[tuple[str, str]] = []
        breaks: list[tuple[str, str]] = []
        broken_at: str | None = None  # the newest snapshot the journal did not continue from
        vouched: dict[int, Any] = {}  # journal positions signed by newer snapshots with damaged payloads
        for seq in reversed(seqs):
            try:
                data, path = self._read_snapshot(seq)
                manifest, at = self._verify_manifest(seq, data, path)
            except UnsupportedFormat:
                raise
            except SnapshotCorrupt as exc:
                log.error("snapshot refused: %s", exc)
                skipped.append((exc.path, exc.reason))
                continue
            try:
                payload = codec.verify_payload(data, at, manifest, path)
            except SnapshotCorrupt as exc:
                log.error("snapshot refused: %s", exc)
                skipped.append((exc.path, exc.reason))
                vouched[seq] = manifest.get("journal_tail")
                continue
            try:
                walk = self._walk(seq, manifest.get("journal_tail"), vouched)
            except UnsupportedFormat:
                raise
            except SnapshotCorrupt as exc:
                log.error("the journal after %s breaks: %s", path, exc)
                breaks.append((exc.path, exc.reason))
                skipped.append((path, f"verifies, but the journal after it breaks: {exc}"))
                broken_at = broken_at or snap_name(seq)
                continue
            state = cloudpickle.loads(payload)
            records = journal.decode_records(walk.bodies)
            with self._lock:  # a writer continues this history from here
                self._base, self._open = walk.tail, {}
                self._closed = max([seq, *self.segments()])
                self._ready = True
            return Loaded(seq, manifest, state, records, skipped, walk.torn, breaks)
        if breaks:
            path, reason = breaks[0]
            raise SnapshotCorrupt(path, f"{reason}; resuming from {broken_at} would skip or repeat committed "
                                        "records, and no older snapshot here replays cleanly past this point; "
                                        f"restore the file, or move {self.location} away to start a new history")
        raise NoSnapshot(self.location, "no snapshot here verifies: "
                         + "; ".join(f"{p}: {why}" for p, why in skipped))

    def replay(self, after: int) -> tuple[list[Any], list[str]]:
        """The records of the journal after snapshot ``after`` and the torn segments,
        checked as :meth:`load_newest` checks them. Without a snapshot ``after``
        whose manifest verifies, the first segment is taken to continue from it."""
        tail, strict = None, False
        try:
            data, path = self._read_snapshot(after)
            tail, strict = self._verify_manifest(after, data, path)[0].get("journal_tail"), True
        except SnapshotCorrupt:
            pass
        walk = self._walk(after, tail, {}, strict=strict)
        return journal.decode_records(walk.bodies), walk.torn

    def _walk(self, after: int, tail: list[Any] | None, vouched: dict[int, Any], *, strict: bool = True) -> _Walk:
        """Verify the journal after snapshot ``after`` (whose manifest says it stood at
        ``tail``), segment by segment; raise :class:`SnapshotCorrupt` at the first break."""
        record = self.history_record()
        expect, source = tail, f"snapshot {after}'s manifest"
        seen: dict[int, int] = {}  # segment -> complete frames
        bodies: list[bytes] = []
        torn: list[str] = []
        segments = [k for k in self.segments() if k > after]
        points = {m: t for m, t in vouched.items() if m > after}
        for k in sorted(set(segments) | set(points)):
            if k in segments:
                path = self.path_of(journal_name(k))
                try:
                    data = self.store.read(journal_name(k))
                except OSError as exc:
                    raise SnapshotCorrupt(path, f"cannot read: {exc}") from None
                seg = journal.read_segment(data, self.key, k, path, pool=record["pool"], history=record["history"])
                if seg.header is not None:
                    if not strict:  # nothing to check the first header against but its number
                        if seg.prev is not None and seg.prev[0] > after:
                            raise self._gap(seg.prev, None, seen, f"segment {k}'s header", source, after, k)
                        expect, strict = seg.prev, True
                    elif seg.prev != expect:
                        raise self._gap(seg.prev, expect, seen, f"segment {k}'s header", source, after, k)
                seen[k] = len(seg.bodies)
                if seg.bodies:
                    expect, source = seg.tail, "the journal"
                bodies.extend(seg.bodies)
                if seg.torn:
                    torn.append(path)
            if k in points and strict and points[k] != expect:
                raise self._gap(points[k], expect, seen, f"snapshot {k}'s manifest", source, after, k)
        return _Walk(bodies, torn, expect)

    def _gap(self, claim: list[Any] | None, have: list[Any] | None, seen: dict[int, int], by: str,
             source: str, after: int, at: int) -> SnapshotCorrupt:
        """Why the journal walked so far (standing at ``have``, per ``source``) is not
        where ``by`` says it was (``claim``)."""
        def pos(t: list[Any] | None) -> str:
            return "the start of the history" if t is None else f"{t[1]} frame(s) of segment {t[0]}"

        here = self.path_of(journal_name(at))
        if claim is None:
            return SnapshotCorrupt(here, f"{by} says the journal starts the history there, but {source} says "
                                         f"it had reached {pos(have)} (a segment out of place)")
        p, n = claim[0], claim[1]
        there = self.path_of(journal_name(p))
        if p in seen and n > seen[p]:
            return SnapshotCorrupt(there, f"{by} says the journal reached {n} frame(s) of segment {p}, but segment "
                                          f"{p} holds only {seen[p]}: {n - seen[p]} acknowledged frame(s) were "
                                          "cut off")
        if p in seen and n < seen[p]:
            return SnapshotCorrupt(there, f"{by} says the journal reached {n} frame(s) of segment {p}, but segment "
                                          f"{p} holds {seen[p]} (frames appended after that point)")
        if p in seen:
            return SnapshotCorrupt(there, f"{by} does not continue from the last frame of segment {p} "
                                          "(a frame replaced)")
        if p > after and (have is None or p > have[0]):
            return SnapshotCorrupt(there, f"{by} says the journal reached {n} frame(s) of segment {p}, but "
                                          f"segment {p} is missing (a whole segment deleted)")
        return SnapshotCorrupt(here, f"{by} says the journal reached {pos(claim)}, but {source} says "
                                     f"{pos(have)} (they disagree: one of them is not from this point of the history)")

    def newest_verified(self) -> dict[str, Any]:
        """The manifest of the newest snapshot that verifies (nothing is unpickled)."""
        problems: list[str] = []
        for seq in reversed(self.snapshots()):
            try:
                return self.verify(seq)
            except SnapshotCorrupt as exc:
                if str(exc) not in problems:
                    problems.append(str(exc))
        raise NoSnapshot(self.location, "no snapshot here verifies"
                         + (": " + "; ".join(problems) if problems else ""))

    def newest_manifest(self) -> dict[str, Any] | None:
        seqs = self.snapshots()
        for seq in reversed(seqs):
            try:
                return self.manifest(seq)
            except SnapshotError:
                continue
        return None

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
