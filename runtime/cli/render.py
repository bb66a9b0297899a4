"""How ``threadbound run`` and ``resume`` show a task to a person.

Model tokens stream inline under a header naming the round and the agent; structured
events (test results, the sandbox, the level, a resume) become one short sentence each;
the final status and error are printed once. On a terminal a status line at the bottom
shows every running agent's round, tokens, tokens/s and elapsed time; it is redrawn
twice a second and never reaches a pipe or a file.
"""

from __future__ import annotations

import json
import re
import shutil
import threading
import time
from typing import Any, Callable, TextIO

from threadbound.agents import events

from ..task import Event


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def visible(text: str) -> str:
    r"""``text`` with every control character but newline and tab shown as ``\xNN``: what
    a person is asked to approve or answer was written by the model, and an escape
    sequence in it could otherwise erase or rewrite lines of the terminal (hide part of
    a diff).

    Examples:
        >>> visible("ok" + chr(27) + "[1A")
        'ok\\x1b[1A'
    """
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)

_CLEAR = "\r\x1b[K"


def sentence(ev: Event) -> str | None:
    """One line for a structured event, or None for events shown another way.

    Examples:
        >>> sentence(Event("t1", 7, "test_result", "tester",
        ...                {"ok": False, "summary": "2 passed, 1 failed, 0 errors"}, 0))
        'tests failed: 2 passed, 1 failed, 0 errors'
    """
    d, kind = ev.data, ev.kind
    if kind == "test_result":
        return f"tests {'passed' if d.get('ok') else 'failed'}: {d.get('summary')}"
    if kind == events.SANDBOX:
        layers = d.get("layers") or []
        held = [lay["name"] for lay in layers if lay.get("applied")]
        missing = [lay["name"] for lay in layers if not lay.get("applied")]
        text = f"ran in the sandbox ({d.get('isolation')}): {', '.join(held) or 'no layer'} held"
        return text + (f"; not applied: {', '.join(missing)}" if missing else "")
    if kind == "level":
        reasons = d.get("reasons") or []
        return f"reasoning level {d.get('level')}" + (f" ({reasons[0]})" if reasons else "")
    if kind == "resumed":
        restarts = ", ".join(f"{role} (attempt {n})" for role, n in (d.get("restarting") or {}).items())
        snap = d.get("snapshot")
        source = f"snapshot {snap}" if snap is not None else "the journal (no snapshot had been written)"
        replayed = d.get("replayed")
        skipped = d.get("skipped") or []
        return (f"resumed from {source}" + (f" + {replayed} journal record(s)" if replayed else "")
                + (f"; restarting {restarts} from its beginning" if restarts else "; no step was in flight")
                + (f"; {len(skipped)} damaged snapshot(s) skipped" if skipped else ""))
    if kind == "edit_problems":
        problems = d.get("problems") or []
        return f"{len(problems)} problem(s) applying the reply: " + "; ".join(map(str, problems))[:300]
    if kind == "applied":
        return (f"applied to your workspace: {', '.join(d.get('applied') or []) or 'nothing'}"
                + ("; NOT applied: " + "; ".join(map(str, d["refused"]))[:300] if d.get("refused") else ""))
    if kind == events.INPUT_REQUESTED:
        payload = d.get("payload")
        if isinstance(payload, dict) and payload.get("kind") == "approval":
            files = visible(", ".join(map(str, payload.get("files") or [])) or "no file")
            return (f"asks a person (#{d.get('request')}): approve this change to {files}? "
                    f"threadbound approve {ev.task_id} | reject {ev.task_id} --reason ... | "
                    f"respond {ev.task_id} --text 'feedback for another round'")
        shown = payload if isinstance(payload, str) else json.dumps(payload, default=str)
        return (f"asks a person (#{d.get('request')}): {visible(shown[:300])}  "
                f"(answer: threadbound respond {ev.task_id} JSON)")
    if kind == events.INPUT_RECEIVED:
        return f"answered (#{d.get('request')}): {json.dumps(d.get('value'), default=str)[:200]}"
    if kind == events.MESSAGE_RECEIVED:
        return f"message {d.get('n')}: {json.dumps(d.get('message'), default=str)[:200]}"
    if kind == events.WAITING:
        which = ", ".join(f"#{r}" for r in d.get("requests") or [])
        return (f"waiting for a person ({which}); its agent actors are free meanwhile; it gives up after "
                f"{d.get('wait_timeout_s', 0):g}s (wait_timeout_s)")
    if kind == "health":
        reasons = "; ".join(d.get("reasons", []))
        return f"the pool is {d.get('mode')}" + (f" ({reasons})" if reasons else "") + (
            "" if d.get("mode") == "normal" else ": steps run at level 1 without streaming")
    return None


class _Status:
    """What one running step has done so far, for the status line."""

    def __init__(self, round_: int, started: float) -> None:
        self.round, self.started, self.tokens = round_, started, 0
        self.partial = ""  # the line being streamed, not yet printed (terminals only)

    def text(self, agent: str, now: float) -> str:
        elapsed = max(now - self.started, 1e-6)
        tokens = f" · {self.tokens} tok · {self.tokens / elapsed:.0f} tok/s" if self.tokens else ""
        return f"{agent} round {self.round}{tokens} · {elapsed:.1f}s"


class Live:
    """Renders one task's events for a person on ``out``."""

    def __init__(self, out: TextIO, *, tty: bool | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.out = out
        self.tty = out.isatty() if tty is None else tty
        self.clock = clock
        self.at_line_start = True
        self.speaker: str | None = None  # the agent whose tokens are being printed
        self.running: dict[str, _Status] = {}
        self.status_shown = False
        self.lock = threading.RLock()
        self.final: Event | None = None
        self._ticker: threading.Thread | None = None
        self._stop = threading.Event()

    # -- the status line (terminals only) ------------------------------------------

    def start(self) -> "Live":
        if self.tty:
            self._ticker = threading.Thread(target=self._tick, name="threadbound-status", daemon=True)
            self._ticker.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        with self.lock:
            for agent in list(self.running):  # a stream cut short (Ctrl-C): keep what was said
                self._flush_partial(agent)
            self._hide_status()
            if not self.at_line_start:
                self.out.write("\n")
                self.at_line_start = True
            self.out.flush()

    def _tick(self) -> None:
        while not self._stop.wait(0.5):
            with self.lock:
                self._show_status()

    def _hide_status(self) -> None:
        if self.status_shown:
            self.out.write(_CLEAR)
            self.status_shown = False

    def _show_status(self) -> None:
        if not self.tty or not self.running or not self.at_line_start:
            return
        now = self.clock()
        line = "  " + " │ ".join(st.text(a, now) for a, st in self.running.items())
        speaking = self.running.get(self.speaker or "")
        if speaking is not None and speaking.partial:
            line += " │ " + speaking.partial[-60:]
        width = shutil.get_terminal_size((100, 24)).columns - 1  # one row, or \r cannot clear it
        self.out.write(_CLEAR + "\x1b[2m" + line[:width] + "\x1b[0m")
        self.out.flush()
        self.status_shown = True

    def _flush_partial(self, agent: str) -> None:
        st = self.running.get(agent)
        if st is not None and st.partial:
            self._line(st.partial)
            st.partial = ""

    # -- events ----------------------------------------------------------------------

    def _line(self, text: str) -> None:
        self._hide_status()
        if not self.at_line_start:
            self.out.write("\n")
        self.out.write(text + "\n")
        self.at_line_start = True

    def _header(self, agent: str, round_: int, extra: str = "") -> None:
        self._line(f"── round {round_} · {agent}{extra} ──")
        self.speaker = agent

    def __call__(self, ev: Event) -> None:
        with self.lock:
            self._render(ev)
            self._show_status()
            self.out.flush()

    def _render(self, ev: Event) -> None:
        d, agent = ev.data, ev.agent or ""
        if ev.kind in ("tokens", "message"):
            status = self.running.get(agent)
            if status is not None:
                status.tokens += int(d.get("n") or 0) or 1
            if self.speaker != agent:  # another agent was speaking (steps run in parallel)
                self._header(agent, status.round if status else 0, " (continued)")
            text = visible(d["text"])  # the model's words: no escape sequence reaches the terminal
            if self.tty and status is not None:  # whole lines above, the line in progress in the status
                *done, status.partial = (status.partial + text).split("\n")
                for line in done:
                    self._line(line)
                return
            self._hide_status()
            self.out.write(text)
            self.at_line_start = text.endswith("\n")
        elif ev.kind == "step_started":
            self.running[agent] = _Status(d.get("round", 0), self.clock())
            retry = f", attempt {d['attempt']}" if d.get("attempt", 1) > 1 else ""
            self._header(agent, d.get("round", 0), f" on {d.get('slot')}{retry}")
        elif ev.kind == "step_finished":
            self._flush_partial(agent)
            self.running.pop(agent, None)
            out = d.get("output") if isinstance(d.get("output"), dict) else {}
            failed = out.get("ok") is False or out.get("approved") is False
            summary = out.get("summary")
            self._line(f"   {'✗' if failed else '✓'} {agent} done in {d['elapsed_s']:.1f}s"
                       + (f": {visible(str(summary))}" if summary else ""))  # a model's finish summary
        elif ev.kind in ("step_timed_out", "agent_crashed", "step_failed", "stream_failed"):
            self._flush_partial(agent)
            self.running.pop(agent, None)
            detail = str(d.get("error") or d.get("reason") or f"after {d.get('elapsed_s')}s").splitlines()[0]
            detail = detail.removeprefix("AgentError: ")
            self._line(f"   ! {agent}: {ev.kind.replace('_', ' ')}: {visible(detail[:300])}")
        elif ev.kind == "retrying":
            self._line(f"   ↻ {agent}: retrying in {d.get('delay_s', 0):.1f}s (attempt {d.get('attempt', '?')})")
        elif ev.kind in ("pending", "admitted", "running", "round_started"):
            pass
        elif ev.terminal:
            self.running.clear()
            self.final = ev  # the summary prints it, once
        else:
            text = sentence(ev)
            if text is None:
                text = f"{ev.kind}: {json.dumps(d, default=str)[:200]}"
            self._line(f"   · {agent + ': ' if agent else ''}{text}")


def summary_lines(res: Any, final: Event | None) -> list[str]:
    """The closing summary of a task: status, rounds, tests, each round, the change, the copy,
    and the error (once)."""
    outputs = res.outputs if res is not None else {}
    review = outputs.get("reviewer") if isinstance(outputs.get("reviewer"), dict) else {}
    tests = outputs.get("tester") if isinstance(outputs.get("tester"), dict) else {}
    data = final.data if final is not None else {}
    status = res.status if res is not None else (final.kind if final is not None else "unknown")
    task_id = res.task_id if res is not None else (final.task_id if final is not None else "?")
    lines = [f"task {task_id} {status}" + (f" after {res.rounds} round(s) in {res.elapsed_s:.1f}s" if res else "")]
    if tests.get("summary"):
        lines.append(f"  tests:    {tests['summary']}")
    for r in review.get("rounds", []):
        lines.append(f"  round {r['round']}: changed {', '.join(r['changed']) or 'nothing'}; "
                     f"verdict {r['verdict']}")
    applied, refused = (res.applied, res.refused) if res is not None else ([], [])
    if review.get("changed"):
        lines.append(f"  changed:  {', '.join(review['changed'])}")
        lines.append("  applied to your workspace" if applied else
                     "  your workspace is untouched; rerun with --apply to write the change back")
    for line in refused:
        lines.append(f"  NOT applied: {line}")
    copy = data.get("workspace_copy")
    if copy:
        lines.append(f"  copy:     {copy} (kept)" if data.get("workspace_copy_kept") else
                     f"  copy:     deleted ({copy}); --keep-workspace keeps it")
    error = (res.error if res is not None else None) or data.get("error")
    if error:
        first, *rest = str(error).splitlines() or [""]
        lines.append(f"  error:    {first}" + (f" ({len(rest)} more line(s) in the task's final event: --json)"
                                                 if rest else ""))
    return [visible(line) for line in lines]  # file names and errors come from the model's copy
