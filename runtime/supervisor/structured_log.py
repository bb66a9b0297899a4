"""The pool's structured log: one JSON object per event, per line, in a rotated file.

``<log.dir>/pool-<name>.jsonl`` (by default under the per-user state directory's
``logs/``), written by the supervisor through a hook. Each line carries what an
operator filters on: ``ts`` (ISO 8601, UTC), ``pool``, ``task``, ``role``, ``actor``
(the agent actor that ran it, once known), ``level``, ``kind``, ``attempt``, ``offset``,
and the event's fields (long strings cut). Token events are left out unless
``log.tokens`` (they are most of a log and all of them are in the task's event log).

Lines are gathered during one turn of the supervisor's event loop and written with one
``write`` at its end (a burst of events costs one system call, and nothing waits on a
timer); the file is rotated past ``log.max_mb`` keeping ``log.backups`` older files.

With ``log.stderr`` (``threadbound run -v`` sets it) the same events also go, one short
line each, to the ``threadbound.events`` logger on the supervisor's stderr, which Ray
forwards to the terminal then; off by default, it costs the event path nothing.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
from typing import Any

from threadbound.agents import events as ev

from ..config import RuntimeConfig, state_dir
from .hooks import Hook

human = logging.getLogger("threadbound.events")
log = logging.getLogger("threadbound.structured_log")
MAX_FIELD = 500  # characters kept of one string field


def log_path(cfg: RuntimeConfig) -> str:
    return os.path.join(cfg.log.dir or os.path.join(state_dir(), "logs"), f"pool-{cfg.name}.jsonl")


_FLAT = (int, float, bool, type(None))


def _short(value: Any) -> bool:
    return isinstance(value, _FLAT) or (isinstance(value, str) and len(value) <= MAX_FIELD)


def _cut_fields(data: dict[str, Any]) -> dict[str, Any]:
    """An event's fields as :func:`_cut` leaves them; most events hold only numbers and
    short strings, which go through as they are (no copy made)."""
    if len(data) <= 50:
        for key, value in data.items():
            if not (isinstance(key, str) and (_short(value) or (isinstance(value, list) and len(value) <= 50
                                                                 and all(_short(v) for v in value)))):
                break
        else:
            return data
    return _cut(data)


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


class _RotatingLines:
    """An append-only file of lines, rotated past ``max_bytes`` (``path.1`` ... ``path.N``,
    or cut back when ``backups`` is 0, as :class:`logging.handlers.RotatingFileHandler`
    does); lines added during one turn of the running event loop go out in one write.

    The file is never opened through a symbolic link (someone who can write the log
    directory cannot point the pool's appends at another file). A file that cannot be
    written is said once, in the supervisor's log, and the pool runs on without it."""

    def __init__(self, path: str, max_bytes: int, backups: int) -> None:
        self.path, self.max_bytes, self.backups = path, max_bytes, backups
        self._fd: int | None = None
        self._size = 0
        self._pending: list[bytes] = []
        self._scheduled = False
        self.failed: OSError | None = None

    def add(self, line: bytes) -> None:
        self.add_many((line,))

    def add_many(self, lines: "list[bytes] | tuple[bytes, ...]") -> None:
        if self.failed is not None:
            return
        self._pending.extend(lines)
        if self._scheduled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        self._scheduled = True
        loop.call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        pending, self._pending = self._pending, []
        if not pending or self.failed is not None:
            return
        try:
            if self._fd is None:
                self._open()
            chunk: list[bytes] = []
            size = self._size
            for line in pending:
                if size + len(line) > self.max_bytes and size > 0:
                    self._write(chunk)
                    chunk, size = [], 0
                    self._rotate()
                chunk.append(line)
                size += len(line)
            self._write(chunk)
        except OSError as exc:
            self.failed = exc
            log.error("the pool's JSONL log %s cannot be written (%s); the pool runs on without it: remove "
                      "what is in its place, or set log.dir to a directory only you can write", self.path, exc)

    def _open(self, truncate: bool = False) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | (os.O_TRUNC if truncate else 0)
        self._fd = os.open(self.path, flags, 0o600)
        self._size = os.fstat(self._fd).st_size

    def _write(self, chunk: list[bytes]) -> None:
        if not chunk:
            return
        view = memoryview(b"".join(chunk))
        self._size += len(view)
        while view:
            view = view[os.write(self._fd, view):]

    def _rotate(self) -> None:
        os.close(self._fd)
        self._fd = None
        if self.backups > 0:
            for i in range(self.backups - 1, 0, -1):
                if os.path.lexists(f"{self.path}.{i}"):
                    os.replace(f"{self.path}.{i}", f"{self.path}.{i + 1}")
            os.replace(self.path, f"{self.path}.1")
        self._open(truncate=self.backups == 0)

    def close(self) -> None:
        self.flush()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


_second: list[Any] = [None, ""]  # the last whole second formatted, and its text (events come many a second)


def _iso(ts: float) -> str:
    """``ts`` as ISO 8601 in UTC with milliseconds (``2026-11-22T13:04:05.123+00:00``)."""
    ms = int(ts * 1000)
    second = ms // 1000
    if _second[0] != second:
        _second[:] = [second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))]
    return f"{_second[1]}.{ms % 1000:03d}+00:00"


class StructuredLog(Hook):
    """Writes every event of every task to the pool's JSONL log (see the module docstring)."""

    def __init__(self, cfg: RuntimeConfig) -> None:
        self.pool = cfg.name
        self.tokens = cfg.log.tokens
        self.path = log_path(cfg)
        os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
        self._file = _RotatingLines(self.path, int(cfg.log.max_mb * 1024 * 1024), cfg.log.backups)
        self.stderr = cfg.log.stderr
        if self.stderr and not human.handlers:
            out = logging.StreamHandler(sys.stderr)
            out.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
            human.addHandler(out)
            human.setLevel(logging.INFO)
            human.propagate = False
        self._actors: dict[str, dict[str, str]] = {}  # task -> role -> the actor of its last step

    def on_events(self, batch: list[tuple[Any, ev.Row]]) -> None:
        """A batch's lines go to the file in one add; token events (most of a batch) are
        passed over with one comparison each unless ``log.tokens``."""
        lines = []
        for task, row in batch:
            if row[1] == ev.TOKENS and not self.tokens:
                continue
            lines.append(self._line(task, row))
        if lines:
            self._file.add_many(lines)

    def on_event(self, task: Any, row: ev.Row) -> None:
        line = self._line(task, row)
        if line:
            self._file.add(line)

    def _line(self, task: Any, row: ev.Row) -> bytes:
        offset, kind, agent, data, ts = row
        if kind == ev.TOKENS and not self.tokens:
            return b""
        data = data if isinstance(data, dict) else {"value": data}
        if kind == ev.STEP_STARTED and agent is not None:
            self._actors.setdefault(task.id, {})[agent] = data.get("slot")
        elif kind in ev.TERMINAL:  # (a task's own entry: no scan of every running task's)
            self._actors.pop(task.id, None)
        line = {
            "ts": _iso(ts),
            "pool": self.pool, "task": task.id, "role": agent,
            "actor": self._actors.get(task.id, {}).get(agent) if agent else None,
            "level": data.get("level", task.level), "kind": kind, "attempt": data.get("attempt"),
            "offset": offset, "data": _cut_fields(data),
        }
        if self.stderr:
            where = f"{task.id}/{agent}" if agent else task.id
            brief = data.get("error") or data.get("reason") or data.get("mode") or ""
            human.info("%s %s%s", where, kind, f": {str(brief)[:200]}" if brief else "")
        return json.dumps(line, default=repr).encode() + b"\n"  # ASCII: ensure_ascii

    def close(self) -> None:
        self._file.close()
