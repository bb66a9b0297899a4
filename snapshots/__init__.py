"""Durable runtime state: the snapshot codec, integrity, stores, retention and lease.

Never imports ``threadbound.runtime``: the runtime hands it plain state and records.
"""

from .errors import (
    HistoryExists, LeaseHeld, NoSnapshot, SnapshotCorrupt, SnapshotError, UnsupportedFormat,
)
from .keys import load_key
from .location import SnapshotLocation
from .reading import Loaded
from .stores import FsspecStore, LocalStore, Store, open_store

__all__ = [
    # Where snapshots live
    "SnapshotLocation", "Loaded", "Store", "LocalStore", "FsspecStore", "open_store",
    # Integrity
    "load_key",
    # Errors
    "SnapshotError", "SnapshotCorrupt", "UnsupportedFormat", "NoSnapshot", "LeaseHeld",
    "HistoryExists",
]
