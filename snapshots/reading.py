"""Reading a snapshot location back: verifying a snapshot, loading the newest one that
verifies, and walking the journal after it in order (the rules are in :mod:`.location`'s
docstring, "In their order"). :class:`SnapshotLocation` gets these methods from
:class:`_Reading`; the listing, the history record, writing and the lease are its own.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any

import cloudpickle

from . import codec, journal
from .errors import NoSnapshot, SnapshotCorrupt, SnapshotError, UnsupportedFormat
from .files import journal_name, snap_name
from .stores import Store

log = logging.getLogger("threadbound.snapshots")


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

class _Reading:
    """The reading half of :class:`~threadbound.snapshots.location.SnapshotLocation`.

    It uses the location's store, key and writer state, and its ``snapshots``,
    ``segments``, ``manifest``, ``path_of``, ``history_record`` and
    ``_record_or_format_error`` methods.
    """

    store: Store
    key: bytes
    location: str
    _lock: threading.Lock
    _ready: bool
    _base: list[Any] | None
    _open: dict[int, list[Any]]
    _closed: int

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
