"""What the runtime tells the sandbox: the config's ``sandbox`` section plus the places
only the runtime knows to be secret (the snapshot store and the signing key)."""

from __future__ import annotations

import os

from threadbound.agents.sandbox import SandboxSettings

from .config import RuntimeConfig


def _local(location: str) -> str | None:
    if location.startswith("file://"):
        return location[len("file://"):]
    return None if "://" in location else os.path.abspath(os.path.expanduser(location))


def sandbox_settings(cfg: RuntimeConfig) -> SandboxSettings:
    """The settings every sandboxed run of this pool uses.

    Examples:
        >>> sandbox_settings(RuntimeConfig(snapshot_dir="/srv/snaps")).hide[:1]
        ('/srv/snaps',)
    """
    box = cfg.sandbox
    key_file = os.path.abspath(os.path.expanduser(cfg.snapshots.key_file))  # resolved by the config
    hide = [p for p in (_local(cfg.snapshot_dir), key_file) if p] + list(box.hide)
    return SandboxSettings(isolation=box.isolation, hide=tuple(hide), read_only=tuple(box.read_only),
                           pass_env=tuple(box.pass_env), bwrap=box.bwrap, uid=box.uid)
