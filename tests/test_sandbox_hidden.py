"""A hidden path that covers Python: the sandbox names it instead of failing like a test.

The sandbox hides the pool's secrets (snapshot store, key file, workspaces root,
``~/.ray``, ``~/.threadbound``, the state directory, Ray's token folder). When one of
them also holds the interpreter (a virtualenv next to Ray's token, say), the launcher
has nothing to start inside. ``mounts.covering`` finds that before a run: ``required``
refuses with a ``SandboxUnavailable`` naming the path and the ways out, ``best_effort``
shows Python's folders inside it read-only and keeps the rest hidden. ``threadbound
doctor`` runs the same check. Real virtualenvs, real bwrap, a real ``threadbound run``.

The end-to-end run (two ``threadbound run``, each starting a Ray; marked ``in_child``) runs in
a child pytest in the background while the session's first tests run
(``tests/background.py``); the last test here waits for its report.
"""

from __future__ import annotations

import glob
import json
import os
import secrets
import shutil
import site
import stat
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

import background
from threadbound.agents import sandbox
from threadbound.agents.sandbox import mounts
from threadbound.agents.sandbox.probe import capabilities

ROOT = Path(__file__).resolve().parent.parent
FIZZBUZZ = ROOT / "examples" / "fizzbuzz"
HAS_BWRAP = capabilities().bwrap is not None
needs_bwrap = pytest.mark.skipif(not HAS_BWRAP, reason="bubblewrap cannot start here")

pytestmark = pytest.mark.timeout(300)


# --- the covering check, on real files and links -------------------------------------------


def interpreter_at(path: Path, target: Path) -> Path:
    """``path`` as a virtualenv's ``bin/python``: a symbolic link to ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("#!/bin/sh\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(target)
    return path


def needs(exe: Path, prefix: Path, package: Path) -> list[tuple[str, str]]:
    package.mkdir(parents=True, exist_ok=True)
    return mounts.needed_paths(str(exe), {"sys.prefix": str(prefix)}, str(package))


def test_a_hidden_folder_holding_a_virtualenv_covers_its_interpreter_and_prefix(tmp_path):
    tb = tmp_path / "home" / ".cache" / "tb"
    exe = interpreter_at(tb / "venv" / "bin" / "python", tmp_path / "usr" / "bin" / "python3.11")
    found = mounts.covering([str(tb)], needs(exe, tb / "venv", tmp_path / "pkg"))
    assert {(c.hidden, c.what) for c in found} == {(str(tb), "the interpreter"), (str(tb), "sys.prefix")}
    assert all(mounts.revealable(c) for c in found)
    assert mounts.reveal_paths(found) == [str((tb / "venv").resolve())]
    text = mounts.covered_message(found)
    assert str(tb) in text and "RAY_AUTH_TOKEN_PATH" in text and "best_effort" in text


def test_a_hidden_folder_holding_the_interpreters_target_covers_it(tmp_path):
    """The venv is visible, but what its bin/python points at is hidden (pyenv under ~/.ray, say)."""
    exe = interpreter_at(tmp_path / "venv" / "bin" / "python", tmp_path / "hid" / "bin" / "python3.11")
    found = mounts.covering([str(tmp_path / "hid")], needs(exe, tmp_path / "venv", tmp_path / "pkg"))
    assert [(c.what, c.path) for c in found] == [("the interpreter's target",
                                                   str((tmp_path / "hid" / "bin" / "python3.11").resolve()))]


def test_a_hidden_path_reached_through_a_link_is_compared_resolved(tmp_path):
    real = tmp_path / "data" / "tb"
    (tmp_path / "cache").symlink_to(tmp_path / "data")
    exe = interpreter_at(real / "venv" / "bin" / "python", tmp_path / "usr" / "python3")
    found = mounts.covering([str(tmp_path / "cache" / "tb")], needs(exe, real / "venv", tmp_path / "pkg"))
    assert {c.what for c in found} == {"the interpreter", "sys.prefix"}
    # and the other way round: the interpreter named through the link, the hidden path resolved
    exe2 = tmp_path / "cache" / "tb" / "venv" / "bin" / "python"
    found = mounts.covering([str(real)], needs(exe2, tmp_path / "cache" / "tb" / "venv", tmp_path / "pkg"))
    assert {c.what for c in found} == {"the interpreter", "sys.prefix"}


def test_a_prefix_equal_to_a_hidden_path_is_covered_and_cannot_be_shown(tmp_path):
    venv = tmp_path / "venv"
    exe = interpreter_at(venv / "bin" / "python", tmp_path / "usr" / "python3")
    found = mounts.covering([str(venv)], needs(exe, venv, tmp_path / "pkg"))
    prefix = next(c for c in found if c.what == "sys.prefix")
    assert prefix.path == str(venv) and not mounts.revealable(prefix)
    assert "best_effort" not in mounts.covered_message([prefix], best_effort_helps=False)


def test_nested_and_neighbouring_paths(tmp_path):
    venv = tmp_path / "a" / "b" / "c" / "venv"
    exe = interpreter_at(venv / "bin" / "python", tmp_path / "usr" / "python3")
    need = needs(exe, venv, tmp_path / "a" / "pkg")
    outer = mounts.covering([str(tmp_path / "a")], need)  # several levels up: covers all three
    assert {c.what for c in outer} == {"the interpreter", "sys.prefix", "the threadbound package"}
    assert mounts.reveal_paths(outer) == sorted([str(tmp_path / "a" / "pkg"), str(venv)], key=len)
    assert mounts.covering([str(venv / "secrets")], need) == []  # a hidden path inside the prefix covers nothing
    assert mounts.covering([str(tmp_path / "a" / "b" / "c" / "ven")], need) == []  # a name's prefix is not a parent
    assert mounts.covering([str(tmp_path / "a" / "b" / "c" / "venv" / "bin" / "python")], need)[0].what == \
        "the interpreter"  # the file itself


def test_ray_token_folder_and_the_pools_places_are_checked(tmp_path, monkeypatch):
    """The token's folder, ~/.ray, ~/.threadbound, the state dir and the settings' paths are
    all in the list the check walks, and each would be found covering this interpreter."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "tok" / "ray_auth_token"))
    hidden = mounts.hidden_paths(("/srv/snaps", "/srv/key"))
    home = os.path.realpath(tmp_path / "home")
    for p in (f"{home}/.ray", f"{home}/.threadbound", f"{home}/.local/state/threadbound",
              os.path.realpath(tmp_path / "tok"), "/srv/snaps", "/srv/key"):
        assert p in hidden
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", os.path.join(sys.prefix, "ray_auth_token"))
    found = mounts.covering(mounts.hidden_paths())
    assert {c.what for c in found} >= {"the interpreter", "Python's prefix (sys.prefix)"}
    assert all(c.hidden == os.path.realpath(sys.prefix) for c in found)


# --- the runner: refused before anything runs, or shown read-only under best_effort ----------


@needs_bwrap
def test_required_refuses_a_run_whose_hidden_path_is_pythons_prefix(tmp_path):
    marker = tmp_path / "ran.txt"
    with pytest.raises(sandbox.SandboxUnavailable) as err:
        sandbox.run([sys.executable, "-c", f"open({str(marker)!r}, 'w')"], cwd=str(tmp_path),
                    settings=sandbox.SandboxSettings("required", hide=(sys.prefix,)))
    assert os.path.realpath(sys.prefix) in str(err.value) and "was not run" in str(err.value)
    assert not marker.exists()
    with pytest.raises(sandbox.SandboxUnavailable):  # best_effort cannot show what is itself hidden
        sandbox.run([sys.executable, "-c", "pass"], cwd=str(tmp_path),
                    settings=sandbox.SandboxSettings("best_effort", hide=(sys.prefix,)))


def _loader_dir() -> str | None:
    for ld in ("/lib64/ld-linux-x86-64.so.2", "/lib/ld-linux-aarch64.so.1"):
        if os.path.exists(ld):
            return os.path.dirname(os.path.realpath(ld))
    return None


@needs_bwrap
@pytest.mark.skipif(_loader_dir() is None, reason="no known dynamic loader")
def test_a_launcher_that_does_not_start_is_refused_not_a_result(tmp_path):
    """Hiding the C library's folder (it covers no Python path the check knows) leaves the
    launcher unable to start inside bwrap: that is an error, never an exit code."""
    with pytest.raises(sandbox.SandboxUnavailable) as err:
        sandbox.run([sys.executable, "-c", "pass"], cwd=str(tmp_path),
                    settings=sandbox.SandboxSettings("required", hide=(_loader_dir(),)))
    text = str(err.value)
    assert "launcher did not start" in text and "not applied: user" in text and "threadbound doctor" in text
    with pytest.raises(sandbox.SandboxUnavailable) as err:  # best_effort too: the command never ran
        sandbox.run([sys.executable, "-c", "pass"], cwd=str(tmp_path),
                    settings=sandbox.SandboxSettings("best_effort", hide=(_loader_dir(),)))
    assert "launcher did not start" in str(err.value)


# --- a real virtualenv inside Ray's token folder ---------------------------------------------


def _editable_files() -> list[str]:
    """What ``pip install -e`` wrote for threadbound in this environment (a .pth and its finder)."""
    out = []
    for s in site.getsitepackages():
        out += glob.glob(os.path.join(s, "__editable__*threadbound*"))
    return out


@pytest.fixture
def base():
    """A folder every uid may traverse (a root pool's runs drop to a uid of their own)."""
    path = Path(tempfile.mkdtemp(prefix="threadbound-hidden-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def make_world(tmp_path: Path) -> dict:
    """$HOME/.cache/tb/{venv, ray_auth_token} as the issue has it: a virtualenv made with
    --system-site-packages and threadbound installed in it the way ``pip install -e`` does.
    The token is world-readable: only the sandbox may stop a read of it."""
    home = tmp_path / "home"
    tb = home / ".cache" / "tb"
    tb.mkdir(parents=True)
    venv = tb / "venv"
    base_python = os.path.join(sys.base_prefix, "bin", "python3")
    subprocess.run([base_python, "-m", "venv", "--without-pip", "--system-site-packages", str(venv)],
                   check=True, timeout=120)
    venv_site = subprocess.run([str(venv / "bin" / "python"), "-c", "import site; print(site.getsitepackages()[0])"],
                               capture_output=True, text=True, check=True, timeout=60).stdout.strip()
    files = _editable_files()
    if files:
        for f in files:
            shutil.copy2(f, venv_site)
    else:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", venv_site, str(ROOT)],
                       check=True, timeout=600)
    token = tb / "ray_auth_token"
    token.write_text(secrets.token_hex(32) + "\n")
    token.chmod(0o644)
    env = {"HOME": str(home), "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
           "LANG": os.environ.get("LANG", "C.UTF-8"), "RAY_AUTH_TOKEN_PATH": str(token),
           "THREADBOUND_WORKSPACES": str(tmp_path / "workspaces"),
           # a Ray of its own, never one another `ray start` on this machine left running
           "RAY_TMPDIR": str(tmp_path / "rt")}
    return {"home": home, "tb": tb, "venv": venv, "python": str(venv / "bin" / "python"), "token": token,
            "env": env}


def config(tmp_path: Path, isolation: str) -> Path:
    cfg = tmp_path / f"runtime-{isolation}.yaml"
    cfg.write_text((ROOT / "examples" / "scripted" / "fizzbuzz.yaml").read_text()
                   + f"metrics: {{port: 0}}\nsnapshot_dir: {tmp_path / ('snaps-' + isolation)}\n"
                   + f"sandbox: {{isolation: {isolation}}}\n")
    return cfg


_DRIVER = textwrap.dedent("""
    import json, os, sys
    from threadbound.agents import sandbox
    copy, isolation, token = sys.argv[1], sys.argv[2], sys.argv[3]
    probe = "import sys\\ntry:\\n    open(sys.argv[1]).read()\\n    print('READ')\\nexcept OSError as e:\\n    print('DENIED', e.errno)\\n"
    open(os.path.join(copy, "probe.py"), "w").write(probe)
    try:
        r = sandbox.run([sys.executable, "probe.py", token], cwd=copy,
                        settings=sandbox.SandboxSettings(isolation, bwrap=sys.argv[4] or None))
        print("RESULT" + json.dumps({"exit": r.exit_code, "output": r.output, "notes": r.notes,
                                     "layers": {l.name: l.applied for l in r.layers}}))
    except sandbox.SandboxUnavailable as exc:
        print("RESULT" + json.dumps({"unavailable": str(exc)}))
""")


def drive(world: dict, tmp_path: Path, isolation: str, bwrap: str = "") -> dict:
    copy = tmp_path / f"copy-{isolation}-{bool(bwrap)}"
    copy.mkdir()
    out = subprocess.run([world["python"], "-c", _DRIVER, str(copy), isolation, str(world["token"]), bwrap],
                         env=world["env"], capture_output=True, text=True, timeout=120)
    line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT")), None)
    assert line, out.stdout + out.stderr
    return json.loads(line[len("RESULT"):])


@needs_bwrap
def test_the_runner_in_a_virtualenv_inside_rays_token_folder(base):
    """As root: required names the folder; best_effort runs, with the venv shown and the
    token beside it still unreadable (bwrap, and Landlock alone)."""
    world = make_world(base)
    r = drive(world, base, "required")
    assert "unavailable" in r and str(world["tb"]) in r["unavailable"] and "the interpreter" in r["unavailable"]
    assert "RAY_AUTH_TOKEN_PATH" in r["unavailable"] and "best_effort" in r["unavailable"]
    # Landlock alone, as root, runs the command as a uid of its own on the host's files: only
    # where that uid can reach the interpreter (not a pyenv under /root, say).
    alone = os.geteuid() != 0 or reachable_by_anyone(os.path.realpath(world["python"]))
    for bwrap in ("", "/nonexistent") if alone else ("",):
        r = drive(world, base, "best_effort", bwrap)
        assert r.get("exit") == 0 and r["output"].startswith("DENIED"), r
        assert any(str(world["venv"]) in n for n in r["notes"]), r["notes"]
        assert r["layers"]["landlock"] and r["layers"]["seccomp"]


def reachable_by_anyone(path: str) -> bool:
    return all(os.stat(p).st_mode & stat.S_IXOTH for p in Path(path).parents)


def cli(world: dict, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([world["python"], "-m", "threadbound.runtime.cli", *args], env=world["env"],
                          cwd=str(world["home"].parent), capture_output=True, text=True, timeout=timeout)


@needs_bwrap
@pytest.mark.slow
@pytest.mark.in_child
def test_threadbound_run_fails_in_one_round_naming_the_folder_and_doctor_finds_it(base):
    """The issue's reproduction, end to end: the README's main job from a virtualenv inside
    the folder that holds Ray's token. The task fails in round 1 with SandboxUnavailable
    naming the folder (not 3 rounds of "no test counts"); doctor, from the same
    environment, names it and exits 1; best_effort runs the job to success."""
    tmp_path = base
    world = make_world(tmp_path)
    tb = str(world["tb"])
    doctor = cli(world, "doctor", "--config", str(config(tmp_path, "required")), timeout=120)
    assert doctor.returncode == 1, doctor.stdout + doctor.stderr
    hidden_row = next(l for l in doctor.stdout.splitlines() if l.strip().startswith("hidden"))
    assert " NO " in hidden_row and tb in hidden_row and "the interpreter" in hidden_row
    assert "REFUSED" in doctor.stdout and "RAY_AUTH_TOKEN_PATH" in doctor.stdout.splitlines()[-1]

    run = cli(world, "run", str(FIZZBUZZ), "--config", str(config(tmp_path, "required")))
    out = run.stdout + run.stderr
    assert run.returncode != 0, out
    assert "SandboxUnavailable" in out and tb in out and "the interpreter" in out, out
    assert "failed after 1 round(s)" in out and "round 2" not in out, out
    assert "no test counts" not in out, out

    ok = cli(world, "run", str(FIZZBUZZ), "--config", str(config(tmp_path, "best_effort")))
    assert ok.returncode == 0, ok.stdout[-3000:] + ok.stderr[-3000:]
    assert "succeeded" in ok.stdout and "3 passed" in ok.stdout


# --- threadbound doctor, in process -----------------------------------------------------------


@needs_bwrap
def test_doctor_names_a_hidden_prefix_and_exits_1(tmp_path, capsys):
    from threadbound.runtime import cli

    cfg = tmp_path / "runtime.yaml"
    cfg.write_text(f"snapshot_dir: {tmp_path / 'snaps'}\nsandbox: {{hide: [{sys.prefix}]}}\n")
    code = cli.main(["doctor", "--config", str(cfg)])
    out = capsys.readouterr().out
    assert code == 1, out
    row = next(line for line in out.splitlines() if line.strip().startswith("hidden"))
    assert " NO " in row and os.path.realpath(sys.prefix) in row and "Python's prefix" in row
    last = out.splitlines()[-1]
    assert "REFUSED" in last and os.path.realpath(sys.prefix) in last and "sandbox.hide" in last
    assert "best_effort, which shows" not in last  # it cannot help: the hidden path is the prefix


@needs_bwrap
def test_doctor_under_best_effort_says_what_it_shows_and_runs(tmp_path):
    from threadbound.agents.sandbox.doctor import check

    parent = os.path.dirname(os.path.realpath(sys.prefix))
    rows, can_run = check(sandbox.SandboxSettings("best_effort", hide=(parent,)))
    hidden = rows[0]
    assert hidden.layer == "hidden" and not hidden.ok and parent in hidden.detail
    assert f"best_effort shows {os.path.realpath(sys.prefix)}" in hidden.detail
    assert can_run and next(r for r in rows if r.layer == "namespaces").ok
    rows, can_run = check(sandbox.SandboxSettings("required"))
    assert rows[0].ok and can_run  # this environment: nothing hidden covers Python


@needs_bwrap
def test_a_copy_inside_a_hidden_folder_is_still_where_the_run_works(base):
    """The task's copy always lies inside a hidden folder (the workspaces root): the copy is
    bound over the hiding, so the check does not count it, and the run works; the rest
    of that folder stays hidden."""
    hidden = base / "state"
    copy = hidden / "workspaces" / "t1"
    copy.mkdir(parents=True)
    (hidden / "snapshot.key").write_text("KEY-" + secrets.token_hex(8))
    (hidden / "snapshot.key").chmod(0o644)
    r = sandbox.run([sys.executable, "-c", "import os, sys; print(os.listdir('.'), os.path.exists(sys.argv[1]))",
                     str(hidden / "snapshot.key")], cwd=str(copy),
                    settings=sandbox.SandboxSettings("required", hide=(str(hidden),)))
    assert r.exit_code == 0 and r.output.strip() == "[] False", r.output


def background_job(scratch: str) -> background.Job:
    return background.child_pytest(__file__, 400)


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(500)
def test_the_end_to_end_run_passes_in_a_child_pytest():
    background.passed(background_job(""))
