"""``threadbound tasks``, ``health`` and ``metrics``: what a running pool says about
itself, each asked of a client attached for that one call (exit 2 when there is no
pool to ask).
"""

from __future__ import annotations

import argparse
import json
import time

from .common import NO_POOL, ask
from .render import out, say


def cmd_health(args: argparse.Namespace) -> int:
    h = ask(args, "health")
    if h is NO_POOL:
        return 2
    if args.json:
        out(json.dumps(h, default=str))
        return 0
    recover = f"; recovers after {h['recovers_in_s']:.0f}s more without trouble" if h["recovers_in_s"] else ""
    out(f"pool {h['pool']}: {h['mode']} for {h['since_s']:.0f}s{recover}; {h['queued']} queued")
    out(f"signals over the last {h['window_s']:g}s ({h['steps_in_window']} step attempts):")
    for name, s in h["signals"].items():
        out(f"  {'!' if s['over'] else ' '} {name:<16} {s['value']:>8g}  threshold {s['threshold']:g}")
    for t in h["transitions"][-5:]:
        when = time.strftime("%H:%M:%S", time.localtime(t["at"]))
        out(f"  {when} {t['from']} -> {t['to']}: {'; '.join(map(str, t['reasons']))}", layout=False)
    return 0


def cmd_metrics(args: argparse.Namespace) -> int:
    stats = ask(args, "stats")
    if stats is NO_POOL:
        return 2
    if stats.get("metrics_url"):
        out(stats["metrics_url"])
        return 0
    why = ("records no metrics (metrics.enabled: false)" if stats.get("tokens_per_s") is None
           else "serves no endpoint (metrics.port: 0, or its port was taken when it restarted: see its log)")
    say(f"threadbound: pool {stats['name']!r} {why}")
    return 1


def cmd_tasks(args: argparse.Namespace) -> int:
    rows = ask(args, "tasks")
    if rows is NO_POOL:
        return 2
    for t in rows:
        out(f"{t.task_id}  {t.status:<10} round {t.round}  {', '.join(t.agents):<24} {t.goal[:60]}", layout=False)
    if not rows:
        out("no tasks")
    return 0
