"""The commands that need no Ray: ``threadbound snapshots`` (what a snapshot location
holds; nothing is unpickled), ``config`` (check or show a config file), ``alerts``
(Prometheus rules from its thresholds) and ``doctor`` (which sandbox layers work here).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

from ..config import RuntimeConfig
from .common import base_config
from .render import out, say


def cmd_snapshots(args: argparse.Namespace) -> int:
    from threadbound.snapshots import NoSnapshot, SnapshotError, load_key
    from threadbound.snapshots.location import find_location

    from ..lifecycle import find_pool
    from ..supervisor.layout import read_layout

    cfg = base_config(args)
    try:
        wheres = [find_location(args.location or cfg.snapshot_dir, args.pool)]
    except NoSnapshot:
        # a pool of several shards: each shard's location in turn (``show`` takes one of them)
        root = find_pool(args.location or cfg.snapshot_dir, args.pool)
        wheres = read_layout(root).locations
        if args.action != "ls":
            say(f"threadbound: {root} holds a pool of {len(wheres)} shards; show one of them: "
                f"{wheres[0]} ... {wheres[-1]}")
            return 2
    try:
        key, unverified = load_key(cfg.snapshots.key_file), ""
    except SnapshotError as exc:
        key, unverified = b"", f"unverified ({exc})"
    for where in wheres[:-1]:
        _snapshots(args, where, key, unverified)
    return _snapshots(args, wheres[-1], key, unverified)


def _snapshots(args: argparse.Namespace, where: str, key: bytes, unverified: str) -> int:
    from threadbound.snapshots import SnapshotError, SnapshotLocation, open_store

    loc = SnapshotLocation(open_store(where, create=False), key)

    def manifest(seq: int) -> tuple[dict[str, Any], str]:
        """The manifest and what verification says; one read when it verifies."""
        if not unverified:
            try:
                return loc.verify(seq), "verified"
            except SnapshotError as exc:
                return loc.manifest(seq), f"REFUSED: {exc.reason}"
        return loc.manifest(seq), unverified

    seqs = loc.snapshots()
    if args.action == "ls":
        out(f"{where}: {len(seqs)} snapshot(s), journal segments {loc.segments()}")
        for seq in seqs:
            try:
                m, verdict = manifest(seq)
            except SnapshotError as exc:
                out(f"  {seq:>6}  unreadable: {exc.reason}")
                continue
            by: dict[str, int] = {}
            for st in (m.get("tasks") or {}).values():
                by[st] = by.get(st, 0) + 1
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(m["created_at"]))
            out(f"  {seq:>6}  {when}  {m['payload_size']:>10} B  "
                  f"{' '.join(f'{k}={v}' for k, v in sorted(by.items())) or 'no tasks':<40} "
                  f"{'clean ' if m.get('clean') else ''}{verdict}")
        return 0
    seq = args.seq if args.seq is not None else (seqs[-1] if seqs else None)
    if seq is None or seq not in seqs:
        say(f"threadbound: {where}: no snapshot {seq}; have {seqs}")
        return 2
    m, verdict = manifest(seq)
    out(json.dumps({**m, "verification": verdict}, indent=2, default=str))
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    cfg = RuntimeConfig.from_yaml(args.file)
    if args.action == "show":
        import yaml

        out(yaml.safe_dump(json.loads(cfg.model_dump_json()), sort_keys=False))
    else:
        out(f"{args.file}: ok")
    return 0


def cmd_alerts(args: argparse.Namespace) -> int:
    from ..metrics.alerts import render

    out(render(base_config(args), source=args.config or "<config>").rstrip("\n"))
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from threadbound.agents.sandbox.doctor import check, refusal

    from ..sandboxing import sandbox_settings

    cfg = base_config(args)
    settings = sandbox_settings(cfg)
    who = "root" if os.geteuid() == 0 else f"uid {os.geteuid()}"
    out(f"sandbox layers on this machine (pool running as {who}); each proved by a probe run inside:")
    rows, can_run = check(settings)
    for row in rows:
        out(f"  {row.layer:<12} {'ok ' if row.ok else 'NO '} {row.detail}")
    if can_run:
        out(f"sandbox.isolation: {settings.isolation} -> sandboxed commands will run"
              + ("" if settings.isolation == "required" else " WITHOUT the full sandbox (see the rows marked NO)"))
        return 0
    out(f"sandbox.isolation: {settings.isolation} -> sandboxed commands will be REFUSED here: "
        + refusal(settings, rows))
    return 1
