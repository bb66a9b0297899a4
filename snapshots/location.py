"""One snapshot location: numbered snapshots, the journal segments between them,
retention, and the lease that makes its owner the only writer.

Snapshot ``n`` (``snap-<n>.tbs``) holds the state as of the moment journal segment
``n`` was closed; records appended after it go to segment ``n+1``
(``journal-<n+1>.tbj``). Resume = newest snapshot that verifies + every segment
after it, in order. Segments are deleted only once the oldest snapshot of the
retention window covers them, so falling back to an older snapshot loses nothing.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any

from . import codec, journal, retention
from .errors import NoSnapshot, SnapshotCorrupt, SnapshotError, UnsupportedFormat
from .stores import Lease, Store, open_store

log = logging.getLogger("threadbound.snapshots")

_SNAP = re.compile(r"^snap-(\d{10})\.tbs$")
_JRNL = re.compile(r"^journal-(\d{10})\.tbj$")


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
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, why) of damaged newer snapshots
    torn: list[str] = field(default_factory=list)  # segments whose unacknowledged tail was dropped


class SnapshotLocation:
    """Snapshots and journal in one :class:`~threadbound.snapshots.stores.Store`.

    Examples:
        >>> import tempfile
        >>> from threadbound.snapshots import LocalStore, SnapshotLocation
        >>> loc = SnapshotLocation(LocalStore(tempfile.mkdtemp()), b"k" * 32)
        >>> loc.write_snapshot(0, {"hello": 1}, tasks={})[0]
        'snap-0000000000.tbs'
        >>> loc.load_newest().state
        {'hello': 1}
    """

    def __init__(self, store: Store, key: bytes, *, keep: int = 3, keep_pinned: int = 10) -> None:
        self.store, self.key = store, key
        self.keep, self.keep_pinned = keep, keep_pinned
        self._manifests: dict[int, dict[str, Any]] = {}
        self._segments_started: set[int] = set()

    @property
    def location(self) -> str:
        return self.store.location

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

    # -- writing ----------------------------------------------------------------------

    def write_snapshot(self, seq: int, state: Any, *, tasks: dict[str, str],
                       extra: dict[str, Any] | None = None, payload: bytes | None = None) -> tuple[str, int]:
        """Write snapshot ``seq`` atomically; returns its name and size in bytes."""
        data = codec.encode(state, self.key, seq=seq, tasks=tasks, extra=extra, payload=payload)
        name = snap_name(seq)
        self.store.write_atomic(name, data)
        self._manifests[seq], _ = codec.read_manifest(data)
        return name, len(data)

    def append(self, seq: int, records: list[Any]) -> int:
        """Append one signed frame to segment ``seq``; durable when this returns."""
        return self.append_frame(seq, self.frame(seq, records))

    def frame(self, seq: int, records: list[Any]) -> bytes:
        """``records`` encoded and signed as one frame of segment ``seq``."""
        return journal.encode_frame(records, self.key, seq)

    def append_frame(self, seq: int, frame: bytes) -> int:
        if seq not in self._segments_started:
            frame = journal.SEGMENT_MAGIC + frame
            self._segments_started.add(seq)
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
        """Remove every snapshot and segment (the lease stays)."""
        self.store.clear()
        self._manifests.clear()
        self._segments_started.clear()

    # -- reading ----------------------------------------------------------------------

    def _read_snapshot(self, seq: int) -> tuple[bytes, str]:
        name = snap_name(seq)
        try:
            return self.store.read(name), self.path_of(name)
        except OSError as exc:
            raise SnapshotCorrupt(self.path_of(name), f"cannot read: {exc}") from None

    def load(self, seq: int) -> tuple[dict[str, Any], Any]:
        """Verify snapshot ``seq``, then unpickle it: its manifest and state."""
        data, path = self._read_snapshot(seq)
        return codec.decode(data, self.key, path)

    def verify(self, seq: int) -> dict[str, Any]:
        """Check snapshot ``seq`` completely without unpickling it; its manifest."""
        data, path = self._read_snapshot(seq)
        return codec.verify(data, self.key, path)[0]

    def load_newest(self) -> Loaded:
        """The newest snapshot that verifies, plus the journal after it.

        A damaged newer snapshot is skipped and reported in ``Loaded.skipped``; a
        format this version cannot read is an error, not a skip.
        """
        seqs = self.snapshots()
        if not seqs:
            raise NoSnapshot(self.location, "no snapshot here; start a new pool instead of resuming, "
                                            "or point at the snapshot_dir the crashed pool used")
        skipped: list[tuple[str, str]] = []
        for seq in reversed(seqs):
            try:
                manifest, state = self.load(seq)
            except UnsupportedFormat:
                raise
            except SnapshotCorrupt as exc:
                log.error("snapshot refused: %s", exc)
                skipped.append((exc.path, exc.reason))
                continue
            records, torn = self.replay(after=seq)
            return Loaded(seq, manifest, state, records, skipped, torn)
        raise NoSnapshot(self.location, "no snapshot here verifies: "
                         + "; ".join(f"{p}: {why}" for p, why in skipped))

    def replay(self, after: int) -> tuple[list[Any], list[str]]:
        records: list[Any] = []
        torn: list[str] = []
        for seq in self.segments():
            if seq <= after:
                continue
            name = journal_name(seq)
            recs, was_torn = journal.decode_segment(self.store.read(name), self.key, seq, self.path_of(name))
            records.extend(recs)
            if was_torn:
                torn.append(self.path_of(name))
        return records, torn

    def newest_verified(self) -> dict[str, Any]:
        """The manifest of the newest snapshot that verifies (nothing is unpickled)."""
        problems = []
        for seq in reversed(self.snapshots()):
            try:
                return self.verify(seq)
            except SnapshotCorrupt as exc:
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
