"""One pool over N supervisor shards, on the user's side: which shard a call goes to,
and how the shards' answers make one answer.

* **Names.** Shard 0 is named as the pool (``AgentPool.attach(name)`` and the CLI find
  it); shard ``k`` is ``"<name>/shard-<k>"``.
* **Routing.** A task with an ``idempotency_key`` goes to the shard its key hashes to
  (BLAKE2b of the key, the same in every process and every run: Python's ``hash`` of a
  string is salted per process), so submitting it again from any client finds the task
  it made. A task without one goes to the next shard in turn: round robin needs no
  round trip to choose (the least loaded shard would need fresh stats from every shard
  before each submit, or would act on stale ones) and splits a burst evenly, one
  ``submit_many`` call per shard. Every call about a task goes to the shard its id
  names (``t00012-ab3f-s3``: :func:`~.supervisor.shard.shard_of`).
* **Merging.** ``tasks()`` oldest first across shards; ``stats()`` sums the counts and
  keeps each shard's own stats under ``"shards"``; ``health()`` is the worst shard's
  mode; ``metrics_text()`` is every shard's series with a ``shard`` label.
"""

from __future__ import annotations

import hashlib
import itertools
import threading
from typing import Any, Iterable, Sequence

from threadbound.agents.events import HEALTH_MODES

from .supervisor.shard import shard_of


def shard_name(pool: str, shard: int) -> str:
    """The supervisor actor's name of shard ``shard`` of pool ``pool``.

    Examples:
        >>> shard_name("nightly", 0), shard_name("nightly", 2)
        ('nightly', 'nightly/shard-2')
    """
    return pool if shard == 0 else f"{pool}/shard-{shard}"


def key_shard(key: str, shards: int) -> int:
    """The shard a task with idempotency key ``key`` goes to (stable across processes).

    Examples:
        >>> key_shard("order-42", 4) == key_shard("order-42", 4), key_shard("order-42", 1)
        (True, 0)
    """
    digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % shards


def task_shard(task_id: str, shards: int) -> int:
    """The shard that owns task ``task_id`` (shard 0 for an id it cannot be: that shard
    then answers ``TaskNotFound`` as for any unknown id).

    Examples:
        >>> task_shard("t00012-ab3f-s1", 2), task_shard("t00012-ab3f", 2), task_shard("t1-x-s7", 2)
        (1, 0, 0)
    """
    k = shard_of(task_id)
    return k if k < shards else 0


class Router:
    """Picks the shard of each new task; see the module docstring.

    Examples:
        >>> from threadbound.runtime.task import Task
        >>> r = Router(3)
        >>> [r.shard_for(Task(goal="x", agents=["coder"])) for _ in range(4)]
        [0, 1, 2, 0]
    """

    def __init__(self, shards: int) -> None:
        self.shards = shards
        self._turn = itertools.count()
        self._lock = threading.Lock()  # sync and async callers may share one pool

    def shard_for(self, task: Any) -> int:
        if self.shards == 1:
            return 0
        key = getattr(task, "idempotency_key", None)
        if key is not None:
            return key_shard(key, self.shards)
        with self._lock:
            return next(self._turn) % self.shards


# -- merging answers ------------------------------------------------------------------------

def merge_tasks(per_shard: Sequence[Sequence[Any]]) -> list[Any]:
    """Every shard's task summaries, oldest first (a shard's own order kept for ties)."""
    rows = [t for rows in per_shard for t in rows]
    return sorted(rows, key=lambda t: t.submitted_at)  # stable: ties keep shard order


def _worst(modes: Iterable[str]) -> str:
    order = {m: i for i, m in enumerate(HEALTH_MODES)}
    return max(modes, key=lambda m: order.get(m, len(order)))


def _sum_dicts(dicts: Iterable[dict[str, Any] | None]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for d in dicts:
        for k, v in (d or {}).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out[k] = out.get(k, 0) + v
            elif k not in out:
                out[k] = v
    return out


_SUMMED = ("queue_depth", "replacements", "recycles", "busy", "reads", "submit_calls", "hook_failures")


def merge_stats(per_shard: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One pool's stats from its shards' (see the module docstring). Counts are summed,
    slots listed together, the health is the worst shard's; ``shards`` keeps each shard's
    own stats (with its ``pid`` and ``node``)."""
    if len(per_shard) == 1:
        return per_shard[0]
    out = dict(per_shard[0])
    for k in _SUMMED:
        out[k] = sum(s.get(k) or 0 for s in per_shard)
    out["tasks"] = _sum_dicts(s.get("tasks") for s in per_shard)
    out["agents"] = _sum_dicts(s.get("agents") for s in per_shard)
    out["actors"] = _sum_dicts(s.get("actors") for s in per_shard)
    if "agents_per_actor" in (per_shard[0].get("actors") or {}):
        out["actors"]["agents_per_actor"] = per_shard[0]["actors"]["agents_per_actor"]
    out["slots"] = [slot for s in per_shard for slot in s.get("slots") or ()]
    out["running"] = {t: r for s in per_shard for t, r in (s.get("running") or {}).items()}
    rates = [s["tokens_per_s"] for s in per_shard if s.get("tokens_per_s") is not None]
    out["tokens_per_s"] = round(sum(rates), 1) if rates else None
    out["health"] = _worst(s.get("health") or "normal" for s in per_shard)
    durable = [s["durability"] for s in per_shard if s.get("durability")]
    if durable:
        out["durability"] = {**_sum_dicts(durable), "location": [d.get("location") for d in durable]}
    out["resumed"] = merge_resumed([s.get("resumed") for s in per_shard])
    out["shards"] = list(per_shard)
    return out


def merge_resumed(per_shard: Sequence[dict[str, Any] | None]) -> dict[str, Any] | None:
    """What resuming found, over the shards that resumed (None: none did)."""
    got = [r for r in per_shard if r]
    if len(per_shard) == 1 or not got:
        return per_shard[0] if len(per_shard) == 1 else None
    return {"snapshot": got[0].get("snapshot"), "records": sum(r.get("records") or 0 for r in got),
            "skipped": [s for r in got for s in r.get("skipped") or ()],
            "torn": [t for r in got for t in r.get("torn") or ()],
            "tasks": [t for r in got for t in r.get("tasks") or ()], "shards": list(per_shard)}


def merge_health(per_shard: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The worst shard's health report (its signals and timers), every shard's transitions
    in time order, the queue summed, and each shard's report under ``shards``."""
    if len(per_shard) == 1:
        return per_shard[0]
    worst = _worst(r.get("mode") or "normal" for r in per_shard)
    out = dict(next(r for r in per_shard if (r.get("mode") or "normal") == worst))
    out["queued"] = sum(r.get("queued") or 0 for r in per_shard)
    out["transitions"] = sorted((t for r in per_shard for t in r.get("transitions") or ()),
                                key=lambda t: t.get("at", 0))
    out["shards"] = list(per_shard)
    return out


def label_shard(line: str, shard: int) -> str:
    """A Prometheus sample line with a ``shard`` label added.

    Examples:
        >>> label_shard('threadbound_queue_depth{pool="p"} 0.0', 1)
        'threadbound_queue_depth{shard="1",pool="p"} 0.0'
        >>> label_shard('up 1.0', 0)
        'up{shard="0"} 1.0'
    """
    brace, space = line.find("{"), line.find(" ")
    if brace != -1 and (space == -1 or brace < space):
        empty = line[brace + 1:brace + 2] == "}"
        return f'{line[:brace]}{{shard="{shard}"{"" if empty else ","}{line[brace + 1:]}'
    return f'{line[:space]}{{shard="{shard}"}}{line[space:]}'


def merge_metrics(per_shard: Sequence[str]) -> str:
    """The shards' metrics in one Prometheus text: each family once, with every shard's
    samples under it, told apart by a ``shard`` label."""
    if len(per_shard) == 1:
        return per_shard[0]
    families: dict[str, tuple[list[str], list[str]]] = {}
    for k, text in enumerate(per_shard):
        current = None
        for line in text.splitlines():
            if not line.strip():
                continue
            if line.startswith("#"):
                parts = line.split(None, 3)
                if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                    current = parts[2]
                    head, _ = families.setdefault(current, ([], []))
                    if line not in head:
                        head.append(line)
                continue
            if current is None:
                current = line.split("{", 1)[0].split(" ", 1)[0]
                families.setdefault(current, ([], []))
            families[current][1].append(label_shard(line, k))
    return "".join("\n".join(head + samples) + "\n" for head, samples in families.values())
