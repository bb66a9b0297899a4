"""A real terminal for the CLI's tests: a tmux server of its own running a bare bash, in
the environment of a user's shell (none of the test session's Ray or threadbound
settings, the cluster's token where Ray keeps it); and what the tests of ``threadbound
top`` look for on its screen."""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest


def user_env(home: Path) -> dict[str, str]:
    """The environment of a user's shell whose home is ``home``: none of the test session's
    Ray or threadbound settings, the cluster's token in ``home/.ray/auth_token``."""
    (home / ".ray").mkdir(parents=True, exist_ok=True)
    shutil.copy(os.environ["RAY_AUTH_TOKEN_PATH"], home / ".ray" / "auth_token")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_", "THREADBOUND_", "TMUX")) and k not in ("PYTHONPATH", "XDG_STATE_HOME")}
    env["HOME"] = str(home)
    return env


class Terminal:
    """A tmux server of its own (its own socket) with one 160x50 window running a bare
    bash whose prompt is ``ready>``, as a user's terminal."""

    PROMPT = "ready>"

    def __init__(self, env):
        self.dir = tempfile.mkdtemp(prefix="tb-tmux-")  # short: a socket path has a length limit
        self.base = ["tmux", "-S", os.path.join(self.dir, "socket"), "-f", "/dev/null"]
        self.env = env
        self.tmux("new-session", "-d", "-x", "160", "-y", "50", "-s", "view",
                  f"env PS1='{self.PROMPT} ' bash --norc --noprofile -i")

    def tmux(self, *argv):
        return subprocess.run([*self.base, *argv], env=self.env, capture_output=True, text=True, timeout=10,
                              check=True).stdout

    def type(self, line):
        self.tmux("send-keys", "-t", "view", "-l", line)
        self.tmux("send-keys", "-t", "view", "Enter")

    def keys(self, *keys):
        self.tmux("send-keys", "-t", "view", *keys)

    def text(self):
        return self.tmux("capture-pane", "-p", "-t", "view")

    def title(self):
        """The window title the programs in the terminal have set."""
        return self.tmux("display-message", "-p", "-t", "view", "#{pane_title}")

    def wait_for(self, what, check, timeout_s=30.0):
        """Poll the screen until ``check(text)`` holds; fail showing the screen if it never does."""
        deadline = time.monotonic() + timeout_s
        while True:
            text = self.text()
            if check(text):
                return text
            if time.monotonic() > deadline:
                pytest.fail(f"the screen never showed {what}; it shows:\n{text}")
            time.sleep(0.1)

    def close(self):
        subprocess.run([*self.base, "kill-server"], env=self.env, capture_output=True, timeout=10)
        shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def user_terminal(home: Path) -> Iterator[Terminal]:
    """A :class:`Terminal` in a user's shell (:func:`user_env`) whose home is ``home``;
    the test is skipped where tmux is not installed."""
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed (apt-get install tmux); `threadbound top` is tested in a tmux terminal")
    term = Terminal({**user_env(home), "TERM": "xterm-256color"})
    try:
        yield term
    finally:
        term.close()


def top_command(pool_name):
    """The shell line that runs ``threadbound top`` on the test session's Ray, then says how it exited."""
    argv = [sys.executable, "-m", "threadbound.runtime.cli", "top", "--address", os.environ["RAY_ADDRESS"],
            "--name", pool_name, "--interval", "0.2"]
    return " ".join(shlex.quote(a) for a in argv) + "; echo top exited $?"


def task_row(text, task_id):
    """The line of ``top``'s screen that starts with ``task_id`` ("" if none)."""
    return next((line for line in text.splitlines() if line.lstrip().startswith(task_id)), "")


def prompt_is_back(text):
    """The shell's prompt is the screen's last line, and no traceback is shown."""
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1].strip() == Terminal.PROMPT and "Traceback" not in text
