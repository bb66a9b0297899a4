"""Errors of the snapshot layer; each names the file (or location) and says what to do."""

from __future__ import annotations

from threadbound.agents.errors import ThreadboundError


class SnapshotError(ThreadboundError):
    """A snapshot, journal, key or lease problem. ``path`` names what it is about."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class SnapshotCorrupt(SnapshotError):
    """A snapshot, journal segment or history record failed verification and was
    refused before anything in it was unpickled: its size, checksum or signature; its
    binding (file number, pool, history); or its order (a journal frame or segment
    missing, repeated or out of place). ``reason`` names the check that failed."""


class UnsupportedFormat(SnapshotError):
    """A snapshot written in a format version this threadbound cannot read."""


class NoSnapshot(SnapshotError):
    """A location holds no snapshot that verifies."""


class LeaseHeld(SnapshotError):
    """Another supervisor holds the lease on a snapshot location."""

    def __init__(self, path: str, holder: str) -> None:
        super().__init__(path, f"another supervisor holds this snapshot location ({holder}); "
                               "stop it first, or give this pool its own snapshot_dir")
        self.holder = holder


class HistoryExists(SnapshotError):
    """A fresh pool was pointed at the unfinished history of an earlier run."""
