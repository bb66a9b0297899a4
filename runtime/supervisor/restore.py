"""Opening a pool's durable history: taking the lease on its snapshot location, and
either resuming from the newest snapshot that verifies (plus the journal after it) or
starting a new history -- refusing to bury one that left unfinished work.

A resumed supervisor rebuilds its task table (:func:`restore`); the steps that had
committed are not run again, a step that was in flight restarts from its beginning,
and a task that was waiting for a person waits on.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from threadbound.snapshots import HistoryExists, LeaseHeld, Loaded, SnapshotError

from ..config import RuntimeConfig
from ..task import TERMINAL
from .health import HealthMonitor
from .roles import RoleBook
from .shard import TaskShard
from .task_state import TaskRecord, replay, tasks_from_snapshot

log = logging.getLogger("threadbound.supervisor")

RESUME_LEASE_WAIT_S = 15.0  # how long a resuming supervisor waits for a dying one's lease


def take_lease(cfg: RuntimeConfig, location: Any, owner: str | None, *, patient: bool) -> Any:
    """The location's lease. Resuming, the crashed supervisor's process may still be on
    its way out (its name freed, its lock not yet): wait a little for it to go."""
    deadline = time.monotonic() + (RESUME_LEASE_WAIT_S if patient else 0)
    while True:
        try:
            return location.acquire_lease(cfg.snapshots.lease_ttl_s, owner)
        except LeaseHeld:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.2)  # (before the loop runs: the supervisor is being constructed)


def unfinished_in(location: Any) -> list[str]:
    """Ids of tasks a history left unfinished (an unreadable history counts as unfinished)."""
    try:
        loaded = location.load_newest()
    except SnapshotError as exc:
        return [f"unknown: {exc.reason}"]
    tasks = tasks_from_snapshot(loaded.state)
    for rec in loaded.records:
        replay(tasks, rec, on_roles=lambda blobs: None, where=location.location)
    return [t for t, ts in tasks.items() if ts.status not in TERMINAL]


def start_fresh(location: Any) -> None:
    """A new history at ``location``: refused if the old one left unfinished tasks."""
    newest = location.newest_manifest()
    if newest is not None and not newest.get("clean"):
        unfinished = unfinished_in(location)
        if unfinished:
            raise HistoryExists(location.location, (
                f"holds the history of pool {newest.get('name')!r}, which stopped without shutting "
                f"down and left {len(unfinished)} unfinished task(s) ({', '.join(unfinished[:3])}"
                f"{', ...' if len(unfinished) > 3 else ''}); resume them with "
                f"`threadbound resume {location.location}` or AgentPool.resume(...), or delete "
                "that directory (or choose another snapshot_dir) to start over"))
        log.info("%s: the previous run ended without a shutdown but left nothing unfinished; "
                 "starting a new history", location.location)
    location.clear()


@dataclass
class Resumed:
    """What a resume found: ``info`` for clients (``pool.resumed``), and the tasks it
    interrupted, oldest first."""

    info: dict[str, Any]
    interrupted: list[TaskRecord] = field(default_factory=list)


def restore(loaded: Loaded, shard: TaskShard, roles: RoleBook, health: HealthMonitor, where: str,
            on_roles: Callable[[dict[str, bytes]], Any]) -> Resumed:
    """Rebuild the state from a verified snapshot plus the journal after it."""
    state = loaded.state
    roles.restore(state["roles"], state["blobs"])
    tasks = tasks_from_snapshot(state)
    health.restore(state.get("health", {}).get("mode", "normal"))
    seq = state["seq"]
    for rec in loaded.records:
        seq = max(seq, replay(tasks, rec, on_roles=on_roles, where=where, on_health=health.restore))
    shard.restored(tasks, seq, state["run_id"])
    interrupted = sorted((ts for ts in shard.tasks.values() if ts.status not in TERMINAL), key=lambda ts: ts.seq)
    info = {"snapshot": loaded.seq, "records": len(loaded.records),
            "skipped": [f"{p}: {why}" for p, why in loaded.skipped],
            "torn": loaded.torn, "tasks": [ts.id for ts in interrupted]}
    if health.mode != "normal":
        log.warning("resumed in %s mode; it recovers after health.healthy_period_s (%gs) without trouble",
                    health.mode, health.cfg.healthy_period_s)
    if loaded.skipped:
        log.error("resumed from an OLDER snapshot (%s) because newer ones were refused: %s",
                  loaded.seq, "; ".join(info["skipped"]))
    return Resumed(info, interrupted)
