"""The README as a new user follows it: its first command succeeds on a fresh home, and
every Python snippet in it runs verbatim without a traceback."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def fenced(language):
    return re.findall(rf"^```{language}\n(.*?)^```", README, re.S | re.M)


def first_command():
    """The `threadbound ...` part of the README's first command (`pip install ... && threadbound ...`)."""
    line = fenced("bash")[0].strip().splitlines()[0]
    part = next(p.strip() for p in line.split("&&") if p.strip().startswith("threadbound "))
    return shlex.split(part)


def fresh_user_env(home):
    """A user who never ran Ray or threadbound: none of the test session's settings."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_", "THREADBOUND_")) and k not in ("XDG_STATE_HOME", "PYTHONPATH")}
    env["HOME"] = str(home)
    return env


@pytest.mark.timeout(240)
def test_the_first_command_succeeds_for_a_new_user(tmp_path):
    # Given: a home with no Ray token, no snapshot key, no state
    home = tmp_path / "home"
    home.mkdir()
    argv = first_command()
    assert argv[:2] == ["threadbound", "run"]
    was_there = (ROOT / ".threadbound").exists()  # an older version's runs may have left one
    # When: the README's first command runs, from the repository as the README says
    proc = subprocess.run([sys.executable, "-m", "threadbound.runtime.cli", *argv[1:]], cwd=ROOT,
                          env=fresh_user_env(home), capture_output=True, text=True, timeout=220)
    # Then: exit 0 and a task that succeeded, said plainly, with the model named
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert re.search(r"^task t\S+ succeeded after \d round", proc.stdout, re.M)
    assert proc.stderr.startswith("model: scripted")
    assert "same task, offline model:" in proc.stderr and "OPENAI_BASE_URL=" in proc.stderr
    # a quiet terminal: no Ray warnings, no deprecation lines, no traceback
    for noise in ("WARNING", "Deprecat", "Traceback", "\x1b["):
        assert noise not in proc.stdout + proc.stderr, noise
    # nothing lands in the directory it ran from; state goes to the per-user directory
    assert (ROOT / ".threadbound").exists() == was_there
    assert (home / ".local" / "state" / "threadbound" / "snapshots" / "threadbound").is_dir()


SNIPPETS = fenced("python")


@pytest.mark.usefixtures("ray_session")
@pytest.mark.timeout(150)
@pytest.mark.parametrize("snippet", SNIPPETS, ids=[f"snippet{i + 1}" for i in range(len(SNIPPETS))])
def test_every_python_snippet_runs_verbatim(snippet, tmp_path):
    # The snippets join the session's Ray (RAY_ADDRESS), as a user's would join theirs,
    # from the repository's root, where their relative paths point.
    script = tmp_path / "snippet.py"
    script.write_text(snippet)
    proc = subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True, timeout=140)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, snippet + proc.stdout[-2000:] + proc.stderr[-3000:]


def test_the_readme_has_the_snippets_this_test_runs():
    assert len(SNIPPETS) >= 5 and "AgentPool.from_config" in SNIPPETS[0]
