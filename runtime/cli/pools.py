"""Where ``run`` gets its pool, and who stops it: a pool of its own on a Ray of its own,
or the pool it finds running on the Ray it was asked to join.

Two plain ``threadbound run`` at once on one machine each start a local Ray of their
own; what they would share is on the machine, not in Ray: the snapshot location
(``<snapshot_dir>/<name>``, leased by one supervisor at a time) and the metrics port.
:func:`own_pool` settles both before Ray starts: a location another run holds makes this
run's pool ``<name>-2`` (``-3``, ...), the default metrics port in use makes it take the
next free one above it; a name or port the user chose that is taken is refused, naming the flag.

A pool is stopped only by the client that started it (``pool.started``); a ``run``
that joined one detaches. One that started a pool others joined waits for their tasks
before it stops it.
"""

from __future__ import annotations

import errno
import json
import os
from typing import Any

from ..config import RuntimeConfig
from ..errors import ConfigError
from ..metrics.server import DEFAULT_PORT, choose_port
from ..task import TERMINAL
from .common import BadInput, say

_MAX_SUFFIX = 50


def lease_holder(location: str) -> str | None:
    """Who holds the lease on the local snapshot location ``location`` now ("pid 123 on
    host, since ..."), or None when nobody does (or it is not a local directory)."""
    import fcntl

    from threadbound.snapshots.stores import LEASE, describe_holder

    if "://" in location:
        return None  # a store of another kind is checked by the supervisor itself
    try:
        fd = os.open(os.path.join(location, LEASE), os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in (errno.EAGAIN, errno.EACCES):
            return None
        try:
            return describe_holder(json.loads(os.pread(fd, 4096, 0) or b"{}"))
        except ValueError:
            return "an unknown holder"
    finally:
        os.close(fd)  # drops the lock taken to look
    return None


# Claims this process holds for its whole life (flocks on files in the state directory):
# two runs starting at once both see a location or a port free before either supervisor
# takes it; the claim decides between them at once, before Ray starts.
_claims: list[int] = []


def claim(what: str) -> bool:
    """Take ``what`` (a snapshot location, a port) for this process's life, among the
    ``threadbound run`` processes of this user; False when another one has it."""
    import fcntl
    import hashlib

    from ..config import state_dir

    folder = os.path.join(state_dir(), "claims")
    os.makedirs(folder, mode=0o700, exist_ok=True)
    path = os.path.join(folder, hashlib.sha256(what.encode()).hexdigest()[:32])
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return False
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} {what}\n".encode(), 0)
    _claims.append(fd)
    return True


def claimant(what: str) -> str:
    """Who claimed ``what`` ("pid 123, a threadbound run"), as far as its file says."""
    import hashlib

    from ..config import state_dir

    path = os.path.join(state_dir(), "claims", hashlib.sha256(what.encode()).hexdigest()[:32])
    try:
        with open(path) as fh:
            return f"pid {fh.read().split()[0]} (another threadbound run)"
    except (OSError, IndexError):
        return "another threadbound run"


def _location_taken(cfg: RuntimeConfig) -> str | None:
    """Who has ``cfg``'s snapshot location (a supervisor's lease, another run's claim), or
    None after claiming it for this process."""
    from ..supervisor.layout import shard_location

    holder = lease_holder(shard_location(cfg, 0))  # (a pool of several shards: shard 0's)
    if holder is not None:
        return holder
    if not claim(f"snapshots {cfg.snapshot_location}"):
        return claimant(f"snapshots {cfg.snapshot_location}")
    return None


def own_pool(cfg: RuntimeConfig, *, name_chosen: bool, port_chosen: bool) -> tuple[RuntimeConfig, list[str]]:
    """The config of a pool this command starts on a local Ray of its own, made to fit
    next to the other pools of this machine, and the lines that say what changed.

    Raises :class:`BadInput` naming the flag when what the user chose is taken."""
    lines: list[str] = []
    if cfg.snapshots.enabled:
        holder = _location_taken(cfg)
        if holder is not None:
            if name_chosen:
                raise BadInput("--name", f"pool {cfg.name!r} already runs on this machine: its snapshot location "
                                         f"{cfg.snapshot_location} is held by {holder}; give this run another "
                                         "--name, or leave --name out to get a pool of its own")
            base = cfg.name
            for n in range(2, _MAX_SUFFIX + 2):
                other = cfg.replace(name=f"{base}-{n}")
                if _location_taken(other) is None:
                    break
            else:
                raise BadInput("--name", f"pools {base!r} to {base}-{_MAX_SUFFIX + 1} all run on this machine; "
                                         "give this run a --name of its own")
            lines.append(f"pool {base!r} already runs on this machine (its snapshot location is held by {holder}); "
                         f"this run starts pool {other.name!r} of its own (snapshots in {other.snapshot_location}; "
                         "--name chooses another)")
            cfg = other
    if cfg.metrics.enabled and cfg.metrics.port:
        what = f"metrics port {cfg.metrics.host}:{cfg.metrics.port}"
        taken_by = None if claim(what) else claimant(what)
        try:
            port, line = choose_port(cfg.metrics.port, cfg.metrics.host, chosen=port_chosen, taken_by=taken_by,
                                     count=cfg.shards, claim=lambda p: claim(f"metrics port {cfg.metrics.host}:{p}"))
        except ConfigError as exc:
            raise BadInput("--metrics-port", dict(exc.problems).get("metrics.port", str(exc))) from None
        if line is not None:
            lines.append(line)
            cfg = cfg.replace(metrics={**cfg.metrics.model_dump(), "port": port})
    return cfg, lines


def port_was_chosen(cfg: RuntimeConfig, args: Any) -> bool:
    """The user asked for this metrics port (flag, environment or a config file setting
    another than the default): taken, it is refused rather than replaced."""
    return (getattr(args, "metrics_port", None) is not None or bool(os.environ.get("THREADBOUND_METRICS_PORT"))
            or cfg.metrics.port != DEFAULT_PORT)


def pool_line(pool: Any, address: str | None) -> str:
    """What ``run`` says about the pool it uses: started it, or joined it."""
    if pool.started:
        return f"started pool {pool.name!r}; it stops when this command ends"
    where = address or "this process's Ray"
    return (f"joined pool {pool.name!r} at {where} (another client started it; it keeps running after this "
            "command ends)")


def wait_for_others(pool: Any, mine: str | None) -> None:
    """Before the client that started ``pool`` stops it: wait for the tasks other clients
    submitted to it (a ``run`` that joined this pool), so that stopping it does not
    cancel them. Ctrl-C stops waiting (the shutdown then cancels them)."""
    from threadbound.agents.errors import ThreadboundError

    try:
        others = [t.task_id for t in pool.tasks() if t.status not in TERMINAL and t.task_id != mine]
    except ThreadboundError:
        return
    if not others:
        return
    say(f"threadbound: pool {pool.name!r}, which this command started, still runs {len(others)} task(s) other "
        f"clients submitted ({', '.join(others[:3])}{', ...' if len(others) > 3 else ''}); waiting for them to end "
        "before stopping it (Ctrl-C stops it now, cancelling them)")
    try:
        for task_id in others:
            try:
                pool.handle(task_id).result()
            except ThreadboundError:
                pass  # it ended otherwise: that is its client's to report
    except KeyboardInterrupt:
        say("threadbound: not waiting: stopping the pool cancels them")
