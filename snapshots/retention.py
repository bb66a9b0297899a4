"""Which snapshots to keep.

* the newest ``keep`` snapshots -- the window a resume may fall back within (the
  journal is kept from the oldest of them on, so falling back loses nothing);
* plus, for every task whose final state is in an older snapshot only (the pool
  has since forgotten it, see ``keep_finished_tasks``), the newest snapshot holding
  that final state -- at most ``keep_pinned`` such snapshots, newest first.

Everything else is deleted, so the bytes on disk are bounded by
``(keep + keep_pinned) x`` one snapshot (itself bounded by ``keep_finished_tasks``),
plus the journal since the oldest kept snapshot.
"""

from __future__ import annotations

from typing import Any, Iterable

TERMINAL_STATES = frozenset({"succeeded", "failed", "cancelled", "timed_out"})


def plan(manifests: list[tuple[int, dict[str, Any]]], keep: int, keep_pinned: int,
         terminal: Iterable[str] = TERMINAL_STATES) -> tuple[set[int], set[int]]:
    """``(kept, deleted)`` snapshot numbers, from ``(seq, manifest)`` pairs.

    Examples:
        >>> m = lambda **t: {"tasks": t}
        >>> plan([(1, m(a="succeeded")), (2, m(b="running")), (3, m(b="succeeded"))], 1, 5)
        ({1, 3}, {2})
    """
    terminal = frozenset(terminal)
    ordered = sorted(manifests, key=lambda p: p[0])
    window = ordered[-keep:] if keep > 0 else []
    seen = {tid for _, m in window for tid in (m.get("tasks") or {})}
    pins: dict[str, int] = {}
    for seq, m in ordered[: len(ordered) - len(window)]:
        for tid, status in (m.get("tasks") or {}).items():
            if status in terminal and tid not in seen:
                pins[tid] = seq  # ascending order: the newest holding its final state wins
    pinned = set(sorted(set(pins.values()))[-keep_pinned:]) if keep_pinned > 0 else set()
    kept = {seq for seq, _ in window} | pinned
    return kept, {seq for seq, _ in ordered} - kept
