"""``threadbound top``: a live view of a running pool, refreshed in place until ``q``.

What the supervisor says (``stats()``, ``health()``, ``tasks()``) is fetched on a
background thread, so the screen and the keys stay responsive while a call waits on
a restarting supervisor; :func:`render` turns one fetch into the screen and is a pure
function of it (unit tested without Ray). When the pool goes away the screen says so
and the view keeps trying to attach again by the pool's name.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

from rich import box
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from ..task import TERMINAL
from .common import attach, log_file
from .render import plain, visible

GOAL_CHARS = 48
TASK_ROWS = 20
TRANSITIONS = 5
STALE_S = 5.0  # a view older than this (and than 3 refreshes) says so
_MODE_STYLE = {"normal": "green", "degraded": "yellow", "paused": "bold red"}


def _short(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 3] + "..."


def _clock(at: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(at))


def _field(row: Any, name: str, default: Any = None) -> Any:
    """A TaskSummary's field, or a dict's key (tests and JSON give dicts)."""
    return row.get(name, default) if isinstance(row, dict) else getattr(row, name, default)


def _pick_tasks(tasks: Sequence[Any], limit: int) -> tuple[list[Any], int]:
    """Unfinished tasks oldest first, then finished ones newest first, at most ``limit``;
    and how many were left out."""
    live = [t for t in tasks if _field(t, "status") not in TERMINAL]
    done = [t for t in tasks if _field(t, "status") in TERMINAL][::-1]
    rows = (live + done)[:limit]
    return rows, len(tasks) - len(rows)


def render(stats: dict[str, Any] | None, health: dict[str, Any] | None, tasks: Sequence[Any] | None, *,
           problem: str | None = None, updated_at: float | None = None,
           max_tasks: int = TASK_ROWS) -> RenderableType:
    """The screen of ``threadbound top`` for one fetch of ``pool.stats()``, ``pool.health()``
    and ``pool.tasks()``; ``problem`` is a line shown above it (e.g. the pool is gone).

    Examples:
        >>> import io
        >>> from rich.console import Console
        >>> console = Console(width=120, record=True, file=io.StringIO())
        >>> console.print(render({"name": "nightly", "queue_depth": 2, "max_agents": 4, "busy": 0},
        ...                      {"mode": "normal", "transitions": []}, []))
        >>> console.export_text().splitlines()[0]
        'pool nightly   mode normal   queue 2   agents busy 0/4 (bound 0)   tokens/s -'
    """
    parts: list[RenderableType] = []
    # Everything below that the pool or a submitter wrote (names, goals, roles, reasons,
    # errors) is drawn as plain(): visible() in a Text, never Rich markup.
    if problem:
        parts.append(plain(problem, style="bold red"))
    if stats is None or health is None or tasks is None:
        parts.append(Text("waiting for the pool to answer...", style="dim"))
        return Group(*parts)

    # -- the pool in one line
    slots = stats.get("slots") or []
    bound = sum(1 for s in slots if s.get("owner"))
    tps = stats.get("tokens_per_s")
    mode = health.get("mode", "?")
    head = Text()
    head.append(plain(f"pool {stats.get('name') or health.get('pool', '?')}", style="bold"))
    head.append("   mode ")
    head.append(plain(mode, style=_MODE_STYLE.get(str(mode), "bold")))
    if health.get("since_s") is not None:
        head.append(plain(f" for {health['since_s']:.0f}s"))
    if health.get("recovers_in_s"):
        head.append(plain(f" (recovers after {health['recovers_in_s']:.0f}s more without trouble)"))
    head.append(plain(f"   queue {stats.get('queue_depth', 0)}"))
    head.append(plain(f"   agents busy {stats.get('busy', 0)}/{stats.get('max_agents', '?')} (bound {bound})"))
    actors = stats.get("actors")
    if actors and actors.get("agents_per_actor", 1) > 1:  # several agents per process: show the processes
        head.append(plain(f"   actors {actors.get('alive', 0)}/{actors.get('total', '?')}"
                          f" ({actors['agents_per_actor']} agents each)"))
    head.append(plain(f"   tokens/s {'-' if tps is None else f'{tps:.1f}'}"))
    if updated_at is not None:
        head.append(plain(f"   updated {_clock(updated_at)}", style="dim"))
    parts.append(head)
    counts = stats.get("tasks") or {}
    parts.append(plain("tasks: " + (", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "none"),
                       style="dim"))

    # -- tasks, with which of their agents run now
    running: dict[str, list[str]] = stats.get("running") or {}
    per_task: dict[str, int] = {}
    for s in slots:
        if s.get("owner"):
            per_task[s["owner"]] = per_task.get(s["owner"], 0) + 1
    table = Table(title="tasks (* = agent running now)", title_justify="left", expand=True, box=box.SIMPLE_HEAD,
                  show_edge=False, pad_edge=False)
    for name, kw in (("TASK", {"no_wrap": True}), ("STATUS", {"no_wrap": True}), ("ROUND", {"justify": "right"}),
                     ("AGENTS", {}), ("SLOTS", {"justify": "right"}), ("GOAL", {"no_wrap": True, "ratio": 1})):
        table.add_column(name, **kw)
    rows, left_out = _pick_tasks(list(tasks), max_tasks)
    for t in rows:
        task_id, status = _field(t, "task_id"), _field(t, "status")
        now = set(running.get(task_id, ()))
        agents = Text()
        for i, role in enumerate(_field(t, "agents", ()) or ()):
            if i:
                agents.append(" ")
            agents.append(plain(f"{role}*" if role in now else role, style="bold green" if role in now else "dim"))
        style = "dim" if status in TERMINAL else None
        table.add_row(plain(task_id), plain(status), plain(_field(t, "round", 0)), agents,
                      plain(per_task.get(task_id, 0)), plain(_short(visible(_field(t, "goal", "") or "", layout=False),
                                                                    GOAL_CHARS)), style=style)
    parts.append(table)
    if left_out:
        parts.append(plain(f"... {left_out} more finished task(s) not shown", style="dim"))
    if not tasks:
        parts.append(Text("no tasks", style="dim"))

    # -- agent slots: which are bound to a task and which work now
    agents_table = Table(title="agents", title_justify="left", box=box.SIMPLE_HEAD, show_edge=False,
                         pad_edge=False)
    for name in ("AGENT", "TASK", "STATE", "PID", "USES"):
        agents_table.add_column(name, no_wrap=True)
    for s in slots:
        state = ("no actor" if not s.get("alive", True) else "replacing" if s.get("replacing")
                 else "busy" if s.get("busy") else "bound" if s.get("owner") else "idle")
        agents_table.add_row(plain(s.get("name", "?")), plain(s.get("owner") or "-"), plain(state),
                             plain(s.get("pid") or "-"), plain(s.get("uses", 0)),
                             style="bold green" if state == "busy" else "dim" if state == "idle" else None)
    parts.append(agents_table)

    # -- health: signals over their threshold, recent transitions
    over = [f"{name} {s['value']:g} >= {s['threshold']:g}"
            for name, s in (health.get("signals") or {}).items() if s.get("over")]
    parts.append(plain("health: " + ("; ".join(over) if over else "no signal over its threshold")
                       + ("" if health.get("enabled", True) else " (monitoring off)")))
    transitions = (health.get("transitions") or [])[-TRANSITIONS:]
    if transitions:
        for t in transitions:
            parts.append(plain(f"  {_clock(t['at'])} {t['from']} -> {t['to']}: "
                               f"{'; '.join(map(str, t.get('reasons') or []))}"))
    else:
        parts.append(Text("  no transitions", style="dim"))
    parts.append(Text("q quits", style="dim"))
    return Group(*parts)


# -- fetching on a background thread -------------------------------------------------------------


@dataclass
class _Seen:
    stats: dict[str, Any] | None = None
    health: dict[str, Any] | None = None
    tasks: list[Any] | None = None
    at: float | None = None
    problem: str | None = None


class _Watcher:
    """Fetches the pool every ``interval_s`` on a daemon thread (a call stuck on a
    restarting supervisor never freezes the screen); attaches again when it is gone."""

    def __init__(self, pool: Any, name: str, namespace: str, interval_s: float) -> None:
        self.pool, self.name, self.namespace, self.interval_s = pool, name, namespace, interval_s
        self.seen = _Seen()
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="threadbound-top", daemon=True)

    def snapshot(self) -> _Seen:
        with self.lock:
            return _Seen(**vars(self.seen))

    def _run(self) -> None:
        from ..errors import PoolClosed
        from ..pool import AgentPool

        while not self.stop.is_set():
            try:
                if self.pool is None:
                    self.pool = AgentPool.attach(self.name, namespace=self.namespace)
                # The tasks first: a task they show ended had ended before the stats were
                # read, so one screen never shows an ended task with an agent still running.
                tasks = self.pool.tasks()
                stats, health = self.pool.stats(), self.pool.health()
            except Exception as exc:  # noqa: BLE001 (whatever it is, the view stays up and says it)
                self.pool = None
                why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                why = why.removeprefix(f"pool {self.name!r}: ")
                if not isinstance(exc, PoolClosed):
                    why = f"{type(exc).__name__}: {why}"
                with self.lock:
                    last = f" (last seen {_clock(self.seen.at)})" if self.seen.at else ""
                    self.seen.problem = (f"pool {self.name!r} is gone{last}: {why}; trying to attach again "
                                         f"every {self.interval_s:g}s")
            else:
                with self.lock:
                    self.seen = _Seen(stats, health, tasks, time.time(), None)
            self.stop.wait(self.interval_s)


def _stale(seen: _Seen, interval_s: float, now: float | None = None) -> str | None:
    """What to say while a fetch hangs (a supervisor that Ray is restarting answers
    only once it is back): nothing until a few refreshes were missed."""
    waited = (time.time() if now is None else now) - seen.at if seen.at is not None else 0.0
    if waited < max(STALE_S, 3 * interval_s):
        return None
    return (f"no answer from the pool's supervisor for {waited:.0f}s (restarting?); "
            f"showing what it said at {_clock(seen.at)}")


# -- the terminal ---------------------------------------------------------------------------


@contextlib.contextmanager
def _keys() -> Iterator[Any]:
    """Keys as they are pressed (no Enter needed), echo off; Ctrl-C still interrupts.
    Yields ``read(timeout_s) -> str`` (the keys pressed, or "" when none)."""
    fd = sys.stdin.fileno() if sys.stdin is not None and sys.stdin.isatty() else None
    if fd is None:  # not a terminal (piped, cron): no keys, only the refresh
        yield lambda timeout_s: (time.sleep(timeout_s), "")[1]
        return
    import termios
    import tty

    saved = termios.tcgetattr(fd)
    tty.setcbreak(fd)

    def read(timeout_s: float) -> str:
        ready, _, _ = select.select([fd], [], [], timeout_s)
        return os.read(fd, 64).decode(errors="replace") if ready else ""

    try:
        yield read
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def cmd_top(args: argparse.Namespace) -> int:
    """Attach to the pool, then refresh its view every ``--interval`` seconds until ``q``
    (or Ctrl-C). Exit codes: 0 quit, 2 no Ray or no such pool at the start."""
    from rich.console import Console
    from rich.live import Live

    from ..connect import _ray_logs_to

    pool = attach(args)
    if pool is None:
        return 2
    watcher = _Watcher(pool, pool.name, pool.config.ray.namespace, args.interval)
    watcher.thread.start()
    console = Console()
    # Ray's and the client's own lines (a restarting supervisor, a worker dying) would
    # scribble over the screen: to the log file while it is shown, unless -v.
    with contextlib.ExitStack() as stack:
        stack.enter_context(_ray_logs_to(None if args.verbose else log_file()))
        read = stack.enter_context(_keys())
        live = stack.enter_context(Live(console=console, screen=True, auto_refresh=False, transient=True))
        try:
            while True:
                seen = watcher.snapshot()
                live.update(render(seen.stats, seen.health, seen.tasks, problem=seen.problem or _stale(seen, args.interval),
                                   updated_at=seen.at), refresh=True)
                if "q" in read(args.interval).lower():
                    break
        except KeyboardInterrupt:
            pass  # Ctrl-C quits like q
        finally:
            watcher.stop.set()
    return 0
