"""Where a pool's shards keep their history, and what happens when their number changes.

With ``shards: 1`` the one supervisor's snapshots, journal and lease are the pool's
location itself, ``<snapshot_dir>/<name>`` (as before shards existed). With
``shards: N > 1`` shard ``k`` has its own location ``<snapshot_dir>/<name>/shard-<k>``
(shard 0 too), and the pool's location holds only those directories.

A history is bound to the number of shards that made it: a task's id names its shard,
and each shard resumes only its own tasks. So a pool started with another number of
shards than its history was made with is refused (:func:`settle_layout`), unless that
history left no unfinished task: then it is set aside -- moved, never deleted -- to
``<snapshot_dir>/<name>/retired-<UTC time>/`` and the new number of shards starts a
fresh history. The client checks this before Ray starts where it can see the location;
shard 0 of a new pool checks it again (the location may only be reachable from the
cluster) before any other shard opens its own.
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any

from threadbound.snapshots import LeaseHeld, SnapshotError, SnapshotLocation, load_key, open_store
from threadbound.snapshots.files import HISTORY, _SNAP

from ..config import RuntimeConfig
from ..errors import ConfigError

log = logging.getLogger("threadbound.supervisor")

SHARD_DIR = re.compile(r"^shard-(\d+)$")
RETIRED = "retired-"


def shard_location(cfg: RuntimeConfig, shard: int) -> str:
    """The snapshot location of shard ``shard`` of the pool ``cfg`` configures: the pool's
    own location with one shard, ``<snapshot_location>/shard-<k>`` with several.

    Examples:
        >>> cfg = RuntimeConfig(name="nightly", snapshot_dir="/s", shards=2)
        >>> shard_location(cfg, 1), shard_location(cfg.replace(shards=1), 0)
        ('/s/nightly/shard-1', '/s/nightly')
    """
    if cfg.shards == 1:
        return cfg.snapshot_location
    return f"{cfg.snapshot_location}/shard-{shard}"


def _holds_history(store: Any) -> bool:
    return any(_SNAP.match(n) or n == HISTORY for n in store.list())


@dataclass
class Layout:
    """What a pool's location holds: ``shards`` (the number that made the history there;
    0: none) and the locations of that history (one, or one per shard)."""

    shards: int = 0
    locations: list[str] = field(default_factory=list)
    names: list[str] = field(default_factory=list)  # what to move aside: files or shard directories
    sharded: bool = False  # in shard-<k> directories (a pool of several shards made it)

    def fits(self, shards: int) -> bool:
        """A pool of ``shards`` shards may go on with this history (or there is none)."""
        return self.shards == 0 or (self.shards == shards and self.sharded == (shards > 1))


def read_layout(root: str) -> Layout:
    """The history at a pool's location ``root``, as laid out on disk. Reads only."""
    store = open_store(root, create=False)
    try:
        names = store.list()
    except OSError:
        return Layout()
    sharded = {}
    for child in store.children():
        m = SHARD_DIR.match(child.rstrip("/").rsplit("/", 1)[-1])
        if m and _holds_history(open_store(child, create=False)):
            sharded[int(m.group(1))] = child
    if sharded:
        return Layout(max(sharded) + 1, [sharded[k] for k in sorted(sharded)],
                      [f"shard-{k}" for k in sorted(sharded)], sharded=True)
    if any(_SNAP.match(n) or n == HISTORY for n in names):
        children = {c.rstrip("/").rsplit("/", 1)[-1] for c in store.children()}
        return Layout(1, [store.location], [n for n in names if n not in children])
    return Layout()


def _unfinished(location: str, key: bytes) -> list[str]:
    from .restore import unfinished_in

    loc = SnapshotLocation(open_store(location, create=False), key)
    newest = loc.newest_manifest()
    if newest is not None and newest.get("clean"):
        return []
    return unfinished_in(loc)


def settle_layout(cfg: RuntimeConfig, *, resume: bool = False) -> str | None:
    """Make the pool's location fit ``cfg.shards`` before its shards open their own.

    Nothing to do when the location is empty or holds a history of as many shards.
    Otherwise raises :class:`ConfigError` naming ``shards`` when that history left
    unfinished tasks (or is in use, or is resumed with another number); a drained one
    is moved to ``<location>/retired-<time>/``, whose path is returned."""
    root = cfg.snapshot_location
    layout = read_layout(root)
    if layout.fits(cfg.shards):
        return None
    old = layout.shards
    how = (f"the pool {cfg.name!r} at {root} was made with shards: {old}; a task's id names its shard, so "
           f"it cannot go on with shards: {cfg.shards}")
    again = (f"set shards: {old} again (AgentPool.resume({cfg.snapshot_dir!r}) does), let its tasks finish "
             f"and shut it down, then start it with shards: {cfg.shards}; or choose another name or snapshot_dir")
    if resume:
        raise ConfigError(f"pool {cfg.name!r}", [("shards", f"{how}: {again}")])
    key = load_key(cfg.snapshots.key_file)
    leases = []
    try:
        for where in layout.locations:
            try:
                leases.append(SnapshotLocation(open_store(where), key).acquire_lease(cfg.snapshots.lease_ttl_s))
            except LeaseHeld as exc:
                raise ConfigError(f"pool {cfg.name!r}", [("shards", f"{how}, and it runs now (held by {exc.holder}): attach "
                                                                    f"to it as it is with AgentPool.attach("
                                                                    f"{cfg.name!r}), or stop it and {again}")]) from None
        unfinished: list[str] = []
        for where in layout.locations:
            try:
                unfinished += _unfinished(where, key)
            except SnapshotError as exc:
                unfinished.append(f"unknown: {exc.reason}")
        if unfinished:
            shown = ", ".join(unfinished[:3]) + (", ..." if len(unfinished) > 3 else "")
            raise ConfigError(f"pool {cfg.name!r}", [("shards", f"{how}, and its history left {len(unfinished)} "
                                                                f"unfinished task(s) ({shown}): {again}")])
        retired = f"{RETIRED}{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
        target = _move_aside(root, layout.names, retired)
    finally:
        for lease in leases:
            lease.release()
    log.warning("pool %r: its history (shards: %d) left no unfinished task; moved to %s to start over with "
                "shards: %d", cfg.name, old, target, cfg.shards)
    return target


def _move_aside(root: str, names: list[str], retired: str) -> str:
    """Move ``names`` (files or directories) of ``root`` into ``root/retired``."""
    if "://" not in root:
        base = os.path.abspath(os.path.expanduser(root))
        target = os.path.join(base, retired)
        while os.path.exists(target):
            target += "-1"
        os.makedirs(target)
        for n in names + [n for n in os.listdir(base) if n.startswith(".") and ".tmp-" in n]:
            os.rename(os.path.join(base, n), os.path.join(target, n))
        return target
    store = open_store(root)
    fs, path = store.fs, store.root  # type: ignore[attr-defined]
    target = f"{path}/{retired}"
    fs.makedirs(target, exist_ok=True)
    for n in fs.ls(path, detail=False):
        base = n.rstrip("/").rsplit("/", 1)[-1]
        if any(base == x or base.startswith(f"{x}.part-") for x in names):
            fs.mv(n, f"{target}/{base}", recursive=True)
    return f"{store.location}/{retired}"
