"""A person's part from the terminal, on a real local Ray: `threadbound respond`, `send`,
`approve` and `reject` against a running pool, and `run --approve` waiting for
`threadbound approve` from another shell."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import pool_settings
from scripted_agents import Listener, Questioner

from threadbound.runtime import AgentPool, RuntimeConfig, Task

pytestmark = [pytest.mark.usefixtures("ray_session"), pytest.mark.timeout(180)]

ROOT = Path(__file__).resolve().parents[1]


def cli(*argv: str, timeout: float = 100) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "threadbound.runtime.cli", *argv, "--address",
                           os.environ["RAY_ADDRESS"]], capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def pool(pool_name):
    p = AgentPool(RuntimeConfig.from_mapping(pool_settings(pool_name)), agents={"q": Questioner, "l": Listener})
    yield p
    p.shutdown()


def first(handle, kind):
    for event in handle.stream():
        if event.kind == kind:
            return event
    raise AssertionError(kind)


def test_respond_answers_once_and_a_second_answer_names_the_request(pool):
    handle = pool.submit(Task(goal="g", agents=["q"], inputs={"q": {"questions": ["which database?"]}}))
    first(handle, "waiting")
    ok = cli("respond", handle.task_id, '{"database": "postgres"}', "--name", pool.name)
    assert ok.returncode == 0, ok.stderr
    assert f"task {handle.task_id}: answered" in ok.stdout
    late = cli("respond", handle.task_id, "--text", "sqlite", "--name", pool.name)
    assert late.returncode == 2 and "request #1" in late.stderr and "already answered" in late.stderr
    assert handle.result(timeout=60).outputs["q"]["answers"] == [{"database": "postgres"}]


def test_send_reaches_the_next_step_and_bad_input_is_named_before_ray(pool):
    handle = pool.submit(Task(goal="g", agents=["l", "q"], inputs={"l": {"tokens": 1}}))
    first(handle, "waiting")
    sent = cli("send", handle.task_id, "also update the changelog", "--name", pool.name)
    assert sent.returncode == 0 and "message_received" in sent.stdout, sent.stderr
    bad = cli("send", handle.task_id, "--json", "{not json", "--name", pool.name)
    assert bad.returncode == 2 and "MESSAGE: is not JSON" in bad.stderr
    unknown = cli("approve", "t99999-none", "--name", pool.name)
    assert unknown.returncode == 2 and "t99999-none" in unknown.stderr
    handle.respond("go")
    # the message arrived after l's step committed: q's re-run (its next step) sees it
    result = handle.result(timeout=60)
    assert result.outputs["l"]["inbox"] == []
    events = list(handle.stream())
    assert [e.data["message"] for e in events if e.kind == "message_received"] == ["also update the changelog"]


@pytest.mark.slow
def test_run_approve_waits_for_approve_from_another_shell_then_applies(tmp_path, pool_name):
    # Given: the scripted demo, run with --approve --apply, as a user does
    ws = tmp_path / "fizzbuzz"
    shutil.copytree(ROOT / "examples" / "fizzbuzz", ws)
    before = (ws / "fizzbuzz.py").read_text()
    config = tmp_path / "demo.yaml"
    config.write_text((ROOT / "examples" / "scripted" / "fizzbuzz.yaml").read_text()
                      + f"\nname: {pool_name}\nmetrics:\n  port: 0\n")
    proc = subprocess.Popen([sys.executable, "-m", "threadbound.runtime.cli", "run", str(ws), "--config",
                             str(config), "--approve", "--apply", "--address", os.environ["RAY_ADDRESS"]],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 120
        asked = None
        while asked is None and time.monotonic() < deadline and proc.poll() is None:
            asked = next((m for line in list(out) if (m := re.search(r"threadbound approve (t\S+)", line))), None)
            time.sleep(0.2)
        assert asked is not None, "".join(out)
        # Then: it waits, and nothing is applied yet
        assert (ws / "fizzbuzz.py").read_text() == before
        # When: a person approves from another shell
        ok = cli("approve", asked.group(1), "--config", str(config))
        assert ok.returncode == 0, ok.stderr
        # Then: the run ends succeeded, with the change applied
        assert proc.wait(timeout=120) == 0, "".join(out) + proc.stderr.read()
        reader.join(10)
        assert (ws / "fizzbuzz.py").read_text() != before
        text = "".join(out)
        assert "waiting for a person (#1)" in text and "approve this change to fizzbuzz.py?" in text
        assert "answered (#1)" in text
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_a_diff_the_model_wrote_cannot_rewrite_the_terminal_that_asks_for_approval(capsys):
    # Given: an approval whose diff and file names carry escape sequences that would erase
    # the line above and hide part of the change
    import io

    from threadbound.runtime.cli.run import read_answer
    from threadbound.runtime.cli.render import sentence
    from threadbound.runtime.task import Event

    hostile = "+safe()\n\x1b[1A\x1b[2K+rm -rf ~  # hidden\r\x1b]0;title\x07"
    ev = Event("t1", 3, "input_requested", None,
               {"request": 1, "payload": {"kind": "approval", "diff": hostile, "files": ["a\x1b[2K.py"]}}, 0.0)
    # When: the terminal shows it and the person answers
    answer = read_answer(ev, io.StringIO("y\n"))
    shown = capsys.readouterr()
    line = sentence(ev)
    # Then: no control character reaches the terminal; the hidden line is there to read
    for text in (shown.out + shown.err, line):
        assert not any(c in text for c in "\x1b\r\x07"), repr(text)
    assert "+rm -rf ~  # hidden" in shown.out + shown.err and "\\x1b[2K" in line
    assert answer == {"approve": True}
