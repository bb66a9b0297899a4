"""How the CLI shows what it did not write itself to a person, and how ``threadbound
run`` and ``resume`` show a task.

One rule for text that reaches a terminal: everything that did not come from
threadbound itself (streamed tokens, model answers, diffs, file names, goals, reasons,
errors, events of any kind) passes through :func:`visible`, which shows control
characters and invisible Unicode (bidi controls among them) instead of letting them act,
and is printed with :func:`out` / :func:`say` or drawn by Rich as :func:`plain` text,
never as markup. The only escape sequences the CLI writes are its own (the status line
below, and the reset before an approval prompt). tests/test_cli_terminal.py checks that
no module of the CLI writes to a stream any other way.

Model tokens stream under a header naming the round and the agent, whole lines at a time
(each agent's text is buffered until a newline, so agents that run at once never
interleave mid-sentence; while several run, each line is prefixed with its role); structured
events (test results, the sandbox, the level, a resume) become one short sentence each;
the final status and error are printed once. On a terminal a status line at the bottom
shows every running agent's round, tokens, tokens/s and elapsed time; it is redrawn
twice a second and never reaches a pipe or a file.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import threading
import unicodedata
import time
from typing import Any, Callable, TextIO

from threadbound.agents import events
from threadbound.agents.workspace import TRIAL_SUFFIX

from ..task import Event


# Candidates: everything outside printable ASCII; which of them are marked is decided
# per character by its Unicode category (see :func:`visible`).
_SUSPECT = re.compile(r"[^\x20-\x7e]")
_MARKED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})


def _mark(ch: str, layout: bool) -> str:
    code = ord(ch)
    if layout and ch in "\n\t":
        return ch
    if code < 0xA0:  # C0, DEL, C1: the terminal's own control codes, ESC among them
        return f"\\x{code:02x}"
    if unicodedata.category(ch) in _MARKED_CATEGORIES:
        return f"<U+{code:04X}>"  # bidi controls, zero-width and other invisible format characters
    return ch


def visible(text: object, *, layout: bool = True) -> str:
    r"""THE function every text that did not come from threadbound itself passes through
    on its way to a terminal (tokens, model answers, diffs, file names, goals, reasons,
    errors, events): nothing in it can drive the terminal, and nothing in it is hidden.

    * C0 controls, DEL and C1 controls (ESC, CSI, OSC and BEL among them) are shown as
      ``\xNN``: an escape sequence in a model's answer could otherwise clear the screen,
      move the cursor and draw a fake diff over the real one, set a scroll region that
      swallows it, hide text, retitle the window or write the clipboard.
    * Unicode format characters, the bidirectional controls among them (U+202A-202E,
      U+2066-2069, U+200E, U+200F, U+061C), zero-width characters, line and paragraph
      separators and lone surrogates are shown as ``<U+202E>``: "Trojan Source" code
      reads differently from how it runs, and a person must see that before approving it.
    * Newline and tab are kept where they are layout (``layout=True``: streamed text,
      diffs) and marked too in one-line fields (``layout=False``: file names, goals,
      reasons, table cells).

    The result is plain text. Where Rich draws it (``top``) it goes in a
    ``rich.text.Text`` (:func:`plain`), never through Rich markup, so ``[/]`` or
    ``[link=...]`` in a goal stay text.

    Examples:
        >>> visible("ok" + chr(27) + "[1A")
        'ok\\x1b[1A'
        >>> visible("if admin" + chr(0x202E) + " {")
        'if admin<U+202E> {'
        >>> visible("two" + chr(10) + "lines", layout=False)
        'two\\x0alines'
    """
    text = text if isinstance(text, str) else str(text)
    return _SUSPECT.sub(lambda m: _mark(m.group(), layout), text)


def plain(text: object, style: str | None = None) -> Any:
    """A ``rich.text.Text`` of :func:`visible` (one line): shown as it is, never read as markup."""
    from rich.text import Text

    return Text(visible(text, layout=False), style=style or "")


def out(text: object = "", *, layout: bool = True) -> None:
    """Print a line on stdout through :func:`visible` (the CLI's ``print``); ``layout=False``
    for a line that must stay one line (a row of a listing)."""
    sys.stdout.write(visible(text, layout=layout) + "\n")
    sys.stdout.flush()


def say(text: object) -> None:
    """Print a line on stderr through :func:`visible`: what threadbound tells the person
    beside a command's output (errors, what it starts, where its log is)."""
    sys.stderr.write(visible(text) + "\n")
    sys.stderr.flush()


_CLEAR = "\r\x1b[K"


def sentence(ev: Event) -> str | None:
    """One line for a structured event (through :func:`visible`), or None for events shown
    another way.

    Examples:
        >>> sentence(Event("t1", 7, "test_result", "tester",
        ...                {"ok": False, "summary": "2 passed, 1 failed, 0 errors"}, 0))
        'tests failed: 2 passed, 1 failed, 0 errors'
        >>> sentence(Event("t1", 8, "tool_call", "coder", {"name": "read_file", "arguments": {"path": "a.py"}}, 0))
        'calls read_file({"path": "a.py"})'
        >>> sentence(Event("t1", 9, "tool_result", "coder", {"name": "read_file", "ok": True,
        ...                "output": "1\\tdef f():\\x1b[2J\\n2\\t..."}, 0))
        'read_file ok: 1\\\\x09def f():\\\\x1b[2J'
    """
    text = _sentence(ev)
    return None if text is None else visible(text, layout=False)


def _sentence(ev: Event) -> str | None:
    d, kind = ev.data, ev.kind
    if kind == events.TEST_RESULT:
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
    if kind == events.TOOL_CALL:
        args = d.get("arguments")
        shown = args if isinstance(args, str) else json.dumps(args, default=str, ensure_ascii=False)
        return f"calls {d.get('name')}({shown[:160]})"
    if kind == events.TOOL_RESULT:
        outcome = "ok" if d.get("ok") else "failed"
        if d.get("refused_path"):
            outcome = "refused: the path is outside the task's copy"
        first = str(d.get("output") or "").strip().splitlines()[:1]
        return f"{d.get('name')} {outcome}" + (f": {first[0][:160]}" if first else "")
    if kind == events.NODE_UPDATE:
        return f"graph node {d.get('node')} updated the state"
    if kind == "health":
        reasons = "; ".join(d.get("reasons", []))
        return f"the pool is {d.get('mode')}" + (f" ({reasons})" if reasons else "") + (
            "" if d.get("mode") == "normal" else ": steps run at level 1 without streaming")
    return None


class _Status:
    """What one running step has done so far, for the status line."""

    def __init__(self, round_: int, started: float) -> None:
        self.round, self.started, self.tokens = round_, started, 0

    def text(self, agent: str, now: float) -> str:
        elapsed = max(now - self.started, 1e-6)
        tokens = f" · {self.tokens} tok · {self.tokens / elapsed:.0f} tok/s" if self.tokens else ""
        return f"{agent} round {self.round}{tokens} · {elapsed:.1f}s"


class Live:
    """Renders one task's events for a person on ``out``.

    Everything an agent or the pool said goes through :func:`visible` on its way out;
    the only escape sequences written are this class's own (the status line, on a
    terminal). An agent's streamed text is kept whole per line: each agent's text is
    buffered until a newline or the end of its step, so agents that run at the same
    time never interleave mid-sentence; while several run, each of their lines is
    prefixed with the agent's role."""

    def __init__(self, out: TextIO, *, tty: bool | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.out = out
        self.tty = out.isatty() if tty is None else tty
        self.clock = clock
        self.speaker: str | None = None  # the agent whose header or text is the last line printed
        self.running: dict[str, _Status] = {}
        self.partial: dict[str, str] = {}  # per agent: the line being streamed, not yet printed
        self.status_shown = False
        self.lock = threading.RLock()
        self.final: Event | None = None
        self._ticker: threading.Thread | None = None
        self._stop = threading.Event()
        self._paused = False  # a question is asked below the stream: no status line over it

    # -- the status line (terminals only) ------------------------------------------

    def start(self) -> "Live":
        if self.tty:
            self._ticker = threading.Thread(target=self._tick, name="threadbound-status", daemon=True)
            self._ticker.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        with self.lock:
            for agent in list(self.partial):  # a stream cut short (Ctrl-C): keep what was said
                self._flush_partial(agent)
            self._hide_status()
            self.out.flush()

    def settle(self) -> None:
        """Print every agent's unfinished line and take the status line down until
        :meth:`resume`: before anything else is shown below the stream (the approval diff
        and prompt), which nothing of the stream may then draw over."""
        with self.lock:
            self._paused = True
            for agent in list(self.partial):
                self._flush_partial(agent)
            self._hide_status()
            self.out.flush()

    def resume(self) -> None:
        """The question is answered: the status line may show again."""
        with self.lock:
            self._paused = False

    def _tick(self) -> None:
        while not self._stop.wait(0.5):
            with self.lock:
                self._show_status()

    def _hide_status(self) -> None:
        if self.status_shown:
            self.out.write(_CLEAR)
            self.status_shown = False

    def _show_status(self) -> None:
        if not self.tty or not self.running or self._stop.is_set() or self._paused:
            return
        now = self.clock()
        line = "  " + " │ ".join(st.text(a, now) for a, st in self.running.items())
        speaking = self.partial.get(self.speaker or "")
        if speaking:
            line += " │ " + speaking[-60:]
        width = shutil.get_terminal_size((100, 24)).columns - 1  # one row, or \r cannot clear it
        self.out.write(_CLEAR + "\x1b[2m" + visible(line, layout=False)[:width] + "\x1b[0m")
        self.out.flush()
        self.status_shown = True

    def _flush_partial(self, agent: str) -> None:
        text = self.partial.pop(agent, "")
        if text:
            self._text(agent, text)

    # -- events ----------------------------------------------------------------------

    def _line(self, text: str, *, layout: bool = False, speaker: str | None = None) -> None:
        self._hide_status()
        self.out.write(visible(text, layout=layout) + "\n")
        self.speaker = speaker

    def _header(self, agent: str, round_: int, extra: str = "") -> None:
        self._line(f"── round {round_} · {agent}{extra} ──", speaker=agent)

    def _text(self, agent: str, line: str) -> None:
        """One whole line of an agent's text."""
        if len(self.running) > 1:  # agents at work at once: say whose line it is
            self._line(f"{agent} │ {line}", layout=True)
            return
        if self.speaker != agent:  # something else was printed since this agent's last line
            status = self.running.get(agent)
            self._header(agent, status.round if status else 0, " (continued)")
        self._line(line, layout=True, speaker=agent)

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
            *done, self.partial[agent] = (self.partial.get(agent, "") + str(d.get("text", ""))).split("\n")
            for line in done:
                self._text(agent, line)
            if not self.partial[agent]:
                del self.partial[agent]
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
                       + (f": {summary}" if summary else ""))
        elif ev.kind in ("step_timed_out", "agent_crashed", "step_failed", "stream_failed"):
            self._flush_partial(agent)
            self.running.pop(agent, None)
            detail = str(d.get("error") or d.get("reason") or f"after {d.get('elapsed_s')}s").splitlines()[0]
            detail = detail.removeprefix("AgentError: ")
            self._line(f"   ! {agent}: {ev.kind.replace('_', ' ')}: {detail[:300]}")
        elif ev.kind == "retrying":
            self._line(f"   ↻ {agent}: retrying in {d.get('delay_s', 0):.1f}s (attempt {d.get('attempt', '?')})")
        elif ev.kind in ("pending", "admitted", "running", "round_started"):
            pass
        elif ev.terminal:
            for who in list(self.partial):
                self._flush_partial(who)
            self.running.clear()
            self.final = ev  # the summary prints it, once
        else:
            try:
                text = sentence(ev)
            except (TypeError, ValueError, KeyError, AttributeError):  # an agent's event of an odd shape
                text = None
            if text is None:
                text = f"{ev.kind}: {json.dumps(d, default=str)[:200]}"
            self._line(f"   · {agent + ': ' if agent else ''}{text}")


def summary_lines(res: Any, final: Event | None) -> list[str]:
    """The closing summary of a task: status, rounds, tests, each round, the change, the copy,
    and the error (once); every line through :func:`visible`."""
    return [visible(line, layout=False) for line in _summary_lines(res, final)]


def _summary_lines(res: Any, final: Event | None) -> list[str]:
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
        trial = f"{copy}{TRIAL_SUFFIX}"
        tested = "tester" in outputs
        if data.get("workspace_copy_kept"):
            lines.append(f"  copy:     {copy} (kept)" + (f"; the tests last ran in {trial}, kept beside it"
                                                          if tested else ""))
        else:
            lines.append(f"  copy:     deleted ({copy}" + (f" and {trial}, where the tests ran" if tested else "")
                         + "); --keep-workspace keeps it")
    error = (res.error if res is not None else None) or data.get("error")
    if error:
        first, *rest = str(error).splitlines() or [""]
        lines.append(f"  error:    {first}" + (f" ({len(rest)} more line(s) in the task's final event: --json)"
                                                 if rest else ""))
    return lines
