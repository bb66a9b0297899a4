"""The pool's structured log: one JSON object per event, per line, in a rotated file.

``<log.dir>/pool-<name>.jsonl`` (by default under the per-user state directory's
``logs/``), written by the supervisor through a hook. Each line carries what an
operator filters on: ``ts`` (ISO 8601, UTC), ``pool``, ``task``, ``role``, ``actor``
(the agent actor that ran it, once known), ``level``, ``kind``, ``attempt``, ``offset``,
and the event's fields (long strings cut). Token events are left out unless
``log.tokens`` (they are most of a log and all of them are in the task's event log).

With ``log.stderr`` (``threadbound run -v`` sets it) the same events also go, one short
line each, to the ``threadbound.events`` logger on the supervisor's stderr, which Ray
forwards to the terminal then; off by default, it costs the event path nothing.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import sys
from datetime import datetime, timezone
from typing import Any

from threadbound.agents import events as ev

from .config import RuntimeConfig, state_dir
from .hooks import Hook

human = logging.getLogger("threadbound.events")
MAX_FIELD = 500  # characters kept of one string field


def log_path(cfg: RuntimeConfig) -> str:
    return os.path.join(cfg.log.dir or os.path.join(state_dir(), "logs"), f"pool-{cfg.name}.jsonl")


def _cut(value: Any, depth: int = 0) -> Any:
    if isinstance(value, str):
        return value if len(value) <= MAX_FIELD else value[:MAX_FIELD] + f"... ({len(value)} chars)"
    if depth > 3:
        return repr(value)[:MAX_FIELD]
    if isinstance(value, dict):
        return {str(k): _cut(v, depth + 1) for k, v in list(value.items())[:50]}
    if isinstance(value, (list, tuple)):
        return [_cut(v, depth + 1) for v in value[:50]]
    if value is None or isinstance(value, (int, float, bool)):
        return value
    return repr(value)[:MAX_FIELD]


class StructuredLog(Hook):
    """Writes every event of every task to the pool's JSONL log (see the module docstring)."""

    def __init__(self, cfg: RuntimeConfig) -> None:
        self.pool = cfg.name
        self.tokens = cfg.log.tokens
        self.path = log_path(cfg)
        os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
        self._file = logging.getLogger(f"threadbound.jsonl.{cfg.name}")
        self._file.propagate = False
        self._file.setLevel(logging.INFO)
        for h in list(self._file.handlers):  # a supervisor restarted in the same process: one handler
            self._file.removeHandler(h)
            h.close()
        handler = logging.handlers.RotatingFileHandler(
            self.path, maxBytes=int(cfg.log.max_mb * 1024 * 1024), backupCount=cfg.log.backups,
            encoding="utf-8", delay=True)
        handler.setFormatter(logging.Formatter("%(message)s"))
        self._file.addHandler(handler)
        self.stderr = cfg.log.stderr
        if self.stderr and not human.handlers:
            out = logging.StreamHandler(sys.stderr)
            out.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
            human.addHandler(out)
            human.setLevel(logging.INFO)
            human.propagate = False
        self._actors: dict[tuple[str, str], str] = {}  # (task, role) -> the actor of its last step

    def on_event(self, task: Any, row: tuple) -> None:
        offset, kind, agent, data, ts = row
        if kind == ev.TOKENS and not self.tokens:
            return
        data = data if isinstance(data, dict) else {"value": data}
        if kind == ev.STEP_STARTED and agent is not None:
            self._actors[(task.id, agent)] = data.get("slot")
        elif kind in ev.TERMINAL:
            for key in [k for k in self._actors if k[0] == task.id]:
                del self._actors[key]
        line = {
            "ts": datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="milliseconds"),
            "pool": self.pool, "task": task.id, "role": agent,
            "actor": self._actors.get((task.id, agent)) if agent else None,
            "level": data.get("level", task.level), "kind": kind, "attempt": data.get("attempt"),
            "offset": offset, "data": _cut(data),
        }
        self._file.info(json.dumps(line, default=repr))
        if self.stderr:
            where = f"{task.id}/{agent}" if agent else task.id
            brief = data.get("error") or data.get("reason") or data.get("mode") or ""
            human.info("%s %s%s", where, kind, f": {str(brief)[:200]}" if brief else "")

    def close(self) -> None:
        for h in list(self._file.handlers):
            self._file.removeHandler(h)
            h.close()
