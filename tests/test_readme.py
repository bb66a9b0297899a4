"""The README and the docs/ pages as a new user follows them: the README's first command
succeeds on a fresh home; every Python snippet of README.md and docs/*.md runs verbatim
without a traceback; every `threadbound ...` line of their bash blocks runs and exits 0,
unless the block says why not on the line before it (`<!-- not run: needs a Ray cluster -->`);
and every relative link points at a file (and heading) that exists."""

import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def fenced(language):
    return re.findall(rf"^```{language}\n(.*?)^```", README, re.S | re.M)


class Block(NamedTuple):
    page: Path
    line: int          # of the opening fence, from 1
    language: str
    body: str
    marked: bool       # a `<!-- not run ... -->` comment on the line before the fence
    reason: str        # what that comment says after `not run:`


def blocks(page):
    """Every fenced block of a page, with the `not run` marker that precedes it, if any."""
    lines = page.read_text().splitlines(keepends=True)
    found, i = [], 0
    while i < len(lines):
        opening = re.fullmatch(r"```(\w*)\s*", lines[i])
        if not opening:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        marker = re.fullmatch(r"<!--\s*not run\b:?(.*?)-->\s*", lines[i - 1]) if i else None
        found.append(Block(page, i + 1, opening.group(1), "".join(lines[i + 1:end]), marker is not None,
                           marker.group(1).strip() if marker else ""))
        i = end + 1
    return found


BLOCKS = [b for page in PAGES for b in blocks(page)]


def where(block):
    return f"{block.page.relative_to(ROOT)}:{block.line}"


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


def run_on_the_metrics_port(argv, **kwargs):
    """Run what starts a pool on the default metrics port, 9464, as a user's would. Other
    test sessions on this machine (the CLI's tests, say) start pools on it too: wait until
    it is free, and run again if another pool took it in between (a pool refuses to start
    on a port in use, naming `metrics.port`, before it does anything)."""
    for _ in range(4):
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with socket.socket() as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    s.bind(("127.0.0.1", 9464))
                    break
                except OSError:
                    time.sleep(0.5)
        proc = subprocess.run(argv, capture_output=True, text=True, **kwargs)
        if proc.returncode == 0 or "metrics.port: port 9464 " not in proc.stdout + proc.stderr:
            return proc
    return proc


@pytest.mark.timeout(300)
def test_the_first_command_succeeds_for_a_new_user(tmp_path):
    # Given: a home with no Ray token, no snapshot key, no state
    home = tmp_path / "home"
    home.mkdir()
    argv = first_command()
    assert argv[:2] == ["threadbound", "run"]
    was_there = (ROOT / ".threadbound").exists()  # an older version's runs may have left one
    # When: the README's first command runs, from the repository as the README says
    proc = run_on_the_metrics_port([sys.executable, "-m", "threadbound.runtime.cli", *argv[1:]], cwd=ROOT,
                                   env=fresh_user_env(home), timeout=220)
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


# -- Python snippets ------------------------------------------------------------------------

SNIPPETS = fenced("python")  # the README's, in order
PAGE_SNIPPETS = [(f"{b.page.stem}-snippet{n}", b.body)
                 for page in PAGES[1:]
                 for n, b in enumerate((b for b in BLOCKS if b.page == page and b.language == "python"), 1)]
ALL_SNIPPETS = [(f"snippet{i + 1}", s) for i, s in enumerate(SNIPPETS)] + PAGE_SNIPPETS


@pytest.mark.usefixtures("ray_session")
@pytest.mark.timeout(300)
@pytest.mark.parametrize("snippet", [s for _, s in ALL_SNIPPETS], ids=[name for name, _ in ALL_SNIPPETS])
def test_every_python_snippet_runs_verbatim(snippet, tmp_path):
    # The snippets join the session's Ray (RAY_ADDRESS), as a user's would join theirs,
    # from the repository's root, where their relative paths point.
    script = tmp_path / "snippet.py"
    script.write_text(snippet)
    proc = run_on_the_metrics_port([sys.executable, str(script)], cwd=ROOT, timeout=140)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, snippet + proc.stdout[-2000:] + proc.stderr[-3000:]


def test_the_readme_has_the_snippets_this_test_runs():
    assert len(SNIPPETS) >= 2 and "AgentPool.from_config" in SNIPPETS[0]
    assert len(PAGE_SNIPPETS) >= 5, "the docs/ pages' Python blocks are not found"


# -- commands -------------------------------------------------------------------------------

def command_lines(block):
    """The lines of a bash block that are commands (comments and blank lines left out)."""
    return [line.strip() for line in block.body.splitlines() if line.strip() and not line.strip().startswith("#")]


RUN_BLOCKS = [b for b in BLOCKS if b.language == "bash" and not b.marked]
COMMANDS = {}  # a command that several pages show runs once, named after the first place it appears
for b in RUN_BLOCKS:
    for line in command_lines(b):
        command = line.split(" #")[0].strip()
        COMMANDS.setdefault(command, (f"{where(b)}: {command}", line))
COMMANDS = list(COMMANDS.values())


def test_every_block_runs_or_says_why_not():
    # Every marker names its reason; only bash blocks may be skipped (every Python block
    # runs); a bash block that runs holds only self-contained threadbound commands.
    for b in BLOCKS:
        if b.marked:
            assert b.reason, f"{where(b)}: a skipped block says why: <!-- not run: needs a Ray cluster -->"
            assert b.language == "bash", f"{where(b)}: only bash blocks may be skipped; every {b.language} block runs"
    for b in RUN_BLOCKS:
        for line in command_lines(b):
            assert line.startswith("threadbound "), (
                f"{where(b)}: {line!r} is not a threadbound command; mark the block "
                "<!-- not run: <why> --> or move the line to a block that is")
    # the README's two set-up commands are the first two bash blocks, word for word
    setup = [b for b in BLOCKS if b.page.name == "README.md" and b.language == "bash"][:2]
    assert [b.body.strip() for b in setup] == [
        "pip install -e . && threadbound run examples/fizzbuzz --config examples/scripted/fizzbuzz.yaml",
        "pip install -e '.[dev]' && python -m pytest -q"]


def test_the_pages_have_the_commands_this_test_runs():
    skipped = [b for b in BLOCKS if b.marked]
    assert len(COMMANDS) >= 8 and len(skipped) >= 10
    assert any(line.startswith("threadbound run examples/fizzbuzz") for _, line in COMMANDS)


@pytest.fixture
def user_checkout(tmp_path):
    """Where a user runs the commands from: the repository's examples and configs, in a
    scratch directory, so that what a command writes (alerts.yml, say) lands there."""
    root = tmp_path / "checkout"
    for part in ("examples", "configs"):
        shutil.copytree(ROOT / part, root / part)
    return root


@pytest.mark.usefixtures("ray_session")
@pytest.mark.timeout(300)
@pytest.mark.parametrize("command", [c for _, c in COMMANDS], ids=[name for name, _ in COMMANDS])
def test_every_threadbound_command_runs_as_written(command, user_checkout, tmp_path):
    # The commands join the session's Ray (RAY_ADDRESS) and keep their state in its
    # scratch (XDG_STATE_HOME), with `threadbound` on PATH as after `pip install -e .`.
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["THREADBOUND_WORKSPACES"] = str(tmp_path / "workspaces")
    proc = run_on_the_metrics_port(["bash", "-c", command], cwd=user_checkout, env=env, timeout=220)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, (
        command + "\n" + proc.stdout[-2000:] + proc.stderr[-3000:])


# -- links ----------------------------------------------------------------------------------

def anchors(page):
    """The anchors GitHub gives a page's headings."""
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#{1,6} (.+)$", text, re.M)}


def links(page):
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)  # code blocks
    text = re.sub(r"`[^`\n]*`", "", text)                                   # code spans
    return re.findall(r"\]\(([^)\s]+)\)", text)


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_every_relative_link_points_at_what_exists(page):
    for target in links(page):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        assert file.exists(), f"{page.relative_to(ROOT)}: the link {target!r} points at nothing"
        if anchor:
            assert file.suffix == ".md" and anchor in anchors(file), (
                f"{page.relative_to(ROOT)}: {target!r}: no heading of {file.name} has the anchor #{anchor}")


def test_the_readme_is_a_front_door():
    # a first screen, the set-up and a tour; the reference lives in docs/, every page linked
    assert len(README.splitlines()) <= 250
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in links(ROOT / "README.md")}
    assert set(PAGES[1:]) <= linked, "a docs/ page the README's table of contents does not list"


# -- the configuration page -----------------------------------------------------------------

def knobs():
    """Every key a runtime YAML may set, dotted (`retry.max_attempts`; each model backend's keys)."""
    import types
    import typing

    from pydantic import BaseModel

    from threadbound.runtime import RuntimeConfig

    def walk(model, prefix):
        for name, field in model.model_fields.items():
            union = typing.get_origin(field.annotation) in (typing.Union, types.UnionType)
            kinds = [a for a in (typing.get_args(field.annotation) if union else (field.annotation,))
                     if isinstance(a, type) and issubclass(a, BaseModel)]
            if kinds:
                for kind in kinds:
                    yield from walk(kind, f"{prefix}{name}.")
            else:
                yield f"{prefix}{name}"

    return sorted(set(walk(RuntimeConfig, "")))


def test_the_configuration_page_names_every_knob():
    page = (ROOT / "docs" / "configuration.md").read_text()
    missing = [k for k in knobs() if f"`{k}`" not in page]
    assert not missing, f"docs/configuration.md does not name {missing}"
    from threadbound.runtime.config import ENV_OVERRIDES
    assert not [v for v in ENV_OVERRIDES if f"`{v}`" not in page]
