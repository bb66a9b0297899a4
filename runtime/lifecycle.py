"""Starting, joining and resuming a pool by name: whether a supervisor of that name
runs, waiting for a crashed one to be reaped, refusing to join one that runs with
another config, the config a crashed pool ran with, and stopping the Ray a client
started. Used by :class:`~.pool.AgentPool` and the CLI."""

from __future__ import annotations

import time
from typing import Any, Iterator

import ray
from ray.exceptions import RayActorError, RayTaskError

from .config import RayConfig, RuntimeConfig
from .errors import ConfigError, PoolClosed


def _await_gone(name: str, namespace: str, timeout_s: float = 30.0) -> None:
    """Wait until no supervisor named ``name`` lives (a crashed one may take a moment
    to be reaped); refuse if one is alive and answering."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            handle = ray.get_actor(name, namespace=namespace)
        except ValueError:
            return
        try:
            ray.get(handle.info.remote(), timeout=2)
        except (RayActorError, ray.exceptions.GetTimeoutError):
            pass  # dying
        except RayTaskError:
            raise PoolClosed(f"pool {name!r} has a supervisor that cannot serve; stop it with "
                             f"ray.kill(ray.get_actor({name!r}, namespace={namespace!r})) first") from None
        else:
            raise PoolClosed(f"pool {name!r} is running (Ray may have restarted and resumed it already); attach "
                             f"to it with AgentPool.attach({name!r}, namespace={namespace!r}) instead of resuming")
        if time.monotonic() > deadline:
            raise PoolClosed(f"pool {name!r}: the crashed supervisor is still being reaped after {timeout_s:.0f}s")
        time.sleep(0.2)


def _running(name: str, namespace: str) -> bool:
    """A supervisor named ``name`` exists (alive or restarting)."""
    try:
        ray.get_actor(name, namespace=namespace)
    except ValueError:
        return False
    return True


def _stop_ray(owned: bool) -> None:
    if owned:
        ray.shutdown()


# How a client reaches Ray, not how the pool runs: its clients may differ there.
_CLIENT_SIDE = frozenset({"ray.address", "ray.num_cpus"})
_UNSET = "(not set)"


def _leaves(value: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """``(dotted.path, value)`` for every setting in a dumped config."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _leaves(item, f"{path}.{key}" if path else str(key))
    else:
        yield path, value


def _refuse_another_config(config: RuntimeConfig, running: RuntimeConfig) -> None:
    """Raise :class:`ConfigError` naming every setting in which ``config`` differs from
    the config the pool of the same name already runs with."""
    mine, theirs = dict(_leaves(config.model_dump())), dict(_leaves(running.model_dump()))
    differ = [(path, mine.get(path, _UNSET), theirs.get(path, _UNSET)) for path in {**mine, **theirs}
              if path not in _CLIENT_SIDE and mine.get(path, _UNSET) != theirs.get(path, _UNSET)]
    if not differ:
        return

    def show(value: Any) -> str:
        text = value if value is _UNSET else repr(value)
        return text if len(text) <= 60 else text[:57] + "..."

    name, namespace = config.name, config.ray.namespace
    where = "" if namespace == RayConfig().namespace else f", namespace={namespace!r}"
    problems = [(path, f"{show(a)} in this config, {show(b)} in the running pool") for path, a, b in differ]
    problems.append(("name", f"a pool named {name!r} already runs in namespace {namespace!r} with the settings "
                             f"above; use it as it is with AgentPool.attach({name!r}{where}), or stop it "
                             "first, or choose another name"))
    raise ConfigError(f"pool {name!r}", problems)


def _crashed_config(location: str, key_file: str | None, root: str | None = None) -> RuntimeConfig:
    """The config a crashed pool ran with (from its newest verified manifest), with
    ``snapshot_dir`` and ``name`` pointing at ``root`` (the pool's location; ``location``
    itself, or the directory holding it when it is one shard's)."""
    from threadbound.snapshots import NoSnapshot, SnapshotLocation, load_key, open_store

    manifest = SnapshotLocation(open_store(location, create=False), load_key(key_file)).newest_verified()
    cfg = RuntimeConfig.from_mapping(manifest.get("config") or {}, source=f"{location} (newest manifest)")
    parent, _, base = (root or location).rstrip("/").rpartition("/")
    if base != cfg.name:
        raise NoSnapshot(location, f"holds the snapshots of pool {cfg.name!r}, but the directory is "
                                   f"named {base!r}; rename it back to {cfg.name!r}")
    return cfg.replace(snapshot_dir=parent or "/")


def find_pool(path: str, name: str | None = None) -> str:
    """The location of one pool's history (``<snapshot_dir>/<name>``, one shard or
    several): ``path`` itself, ``path/<name>``, the only pool under ``path``, or the pool
    whose shard directory ``path`` is. Reads only; raises ``NoSnapshot`` as
    ``find_location`` does."""
    import os

    from threadbound.snapshots import NoSnapshot, open_store
    from threadbound.snapshots.location import find_location

    from .supervisor.layout import SHARD_DIR, read_layout

    where = path.rstrip("/") if "://" in path else os.path.abspath(os.path.expanduser(path))
    if name is not None:
        where = f"{where}/{name}"
    parent, _, base = where.rpartition("/")
    if SHARD_DIR.match(base) and read_layout(parent).sharded:
        return parent  # one shard's directory: its pool, all of whose shards resume
    if read_layout(where).shards:
        return where
    if name is None:
        pools = [c for c in open_store(where, create=False).children() if read_layout(c).shards]
        if len(pools) == 1:
            return pools[0]
        if pools:
            raise NoSnapshot(where, "holds the snapshots of several pools: "
                                    + ", ".join(p.rsplit("/", 1)[-1] for p in pools)
                                    + "; pass one of their directories (or name=...)")
    return find_location(path, name)


def crashed_pool(location: str, name: str | None, key_file: str | None) -> RuntimeConfig:
    """The config of the crashed pool found at ``location`` (see :func:`find_pool`), with
    ``snapshot_dir`` and ``name`` pointing there; a pool of several shards is read from
    its shard 0."""
    from .supervisor.layout import read_layout

    root = find_pool(location, name)
    if read_layout(root).sharded:
        return _crashed_config(f"{root}/shard-0", key_file, root=root)
    return _crashed_config(root, key_file)
