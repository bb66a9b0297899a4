"""Run ``threadbound.agents.sandbox.run`` as an unprivileged user, the way most pools run.

The tests run as root here, and our interpreter lives under /root (0700), which the user
``nobody`` cannot reach. So :func:`stage` copies what the sandbox imports (the
``threadbound/agents`` folder and the packages it pulls in from our site-packages) into
a world-readable directory, and :func:`run_as_nobody` runs Debian's /usr/bin/python3 as
nobody (``setpriv``) with that directory on ``PYTHONPATH``. Nothing is downloaded.

As a script (``python3 unprivileged.py drive CONFIG.json``) this file is the driver that
runs inside that process: for each case it makes a copy directory, runs
tests/hostile_probe.py in it through ``sandbox.run`` with the case's settings and limits,
and prints one JSON line (``DRIVER-RESULT {...}``) with the result and the probe's report.
The string ``"$DRIVER_PID"`` anywhere in a case's probe arguments becomes the driver's
pid: the process that runs the sandbox, the one an attacker would go after.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

NOBODY = 65534
SYSTEM_PYTHON = "/usr/bin/python3"
REPO = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent
RESULT_PREFIX = "DRIVER-RESULT "

# What the sandbox must import in the staged interpreter; the list of packages is found
# by importing it here (it changes as the sandbox does), never written down.
_IMPORT_PROBE = """
import json, sys
import threadbound.agents.sandbox
from threadbound.agents.sandbox import probe, seccomp
seccomp.compiled()
probe.find_bwrap()
probe.capabilities()
print(json.dumps(sorted({name: getattr(m, "__file__", None) for name, m in list(sys.modules.items())
                         if getattr(m, "__file__", None)}.items())))
"""


def why_not_as_nobody() -> str | None:
    """Why the suite cannot run the sandbox as nobody from here, or None if it can."""
    if os.geteuid() != 0:
        return None  # not needed: the suite runs unprivileged already (see :func:`command`)
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        return f"{SYSTEM_PYTHON} is missing: no world-executable Python to run as nobody"
    ours = f"{sys.version_info.major}.{sys.version_info.minor}"
    try:
        theirs = subprocess.run([SYSTEM_PYTHON, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                                capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{SYSTEM_PYTHON} does not run: {exc}"
    if theirs != ours:
        return (f"{SYSTEM_PYTHON} is Python {theirs}, this interpreter {ours}: the compiled packages the "
                "sandbox imports (pydantic_core, psutil) would not load in it")
    if not shutil.which("setpriv"):
        return "setpriv (util-linux) is missing: cannot switch to nobody"
    return None


_STARTUP_ONLY = ("__editable__", "_distutils_hack")


def _site_dirs() -> list[str]:
    import site

    return [os.path.realpath(p) for p in site.getsitepackages() if os.path.isdir(p)]


def sandbox_modules() -> dict[str, str]:
    """Module name -> file of every module importing the sandbox loads (in a fresh interpreter)."""
    out = subprocess.run([sys.executable, "-c", _IMPORT_PROBE], capture_output=True, text=True, timeout=60,
                         check=True)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def stage(dest: Path) -> Path:
    """Copy what the sandbox needs under ``dest/site-packages``; returns that directory.

    ``threadbound/<part>`` from this repository for every part imported, and from our
    site-packages every top-level package or module loaded (with its ``<name>.libs``
    directory of bundled shared libraries, e.g. bwrap's libcap), all world-readable.
    """
    site_dir = dest / "site-packages"
    site_dir.mkdir(parents=True, exist_ok=True)
    sites = _site_dirs()
    tops: set[str] = set()
    parts: set[str] = set()
    for name, path in sandbox_modules().items():
        real = os.path.realpath(path)
        if name.startswith("threadbound."):
            parts.add(name.split(".")[1])
            continue
        for s in sites:
            if real.startswith(s + os.sep):
                top = os.path.relpath(real, s).split(os.sep)[0]
                if not top.startswith(_STARTUP_ONLY):  # loaded by .pth files at start-up, not by the sandbox
                    tops.add(top)
    for part in sorted(parts):
        shutil.copytree(REPO / part, site_dir / "threadbound" / part,
                        ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True)
    for top in sorted(tops):
        for s in sites:
            src = Path(s) / top
            if src.is_dir():
                shutil.copytree(src, site_dir / top, ignore=shutil.ignore_patterns("__pycache__"),
                                dirs_exist_ok=True)
                for libs in (Path(s) / f"{top}.libs", Path(s) / f"{top}_libs"):
                    if libs.is_dir():
                        shutil.copytree(libs, site_dir / libs.name, dirs_exist_ok=True)
                break
            if src.is_file():
                shutil.copy2(src, site_dir / top)
                break
    for f in ("unprivileged.py", "hostile_probe.py"):
        shutil.copy2(HERE / f, dest / f)
    world_readable(dest)
    return site_dir


def world_readable(root: Path) -> None:
    for dirpath, dirnames, filenames in os.walk(root):
        os.chmod(dirpath, os.stat(dirpath).st_mode | 0o755)
        for f in filenames:
            p = os.path.join(dirpath, f)
            if not os.path.islink(p):
                os.chmod(p, os.stat(p).st_mode | 0o444)


def base_python() -> str:
    """The interpreter a virtualenv for the driver is made from (see :func:`command`)."""
    return SYSTEM_PYTHON if os.geteuid() == 0 else os.path.join(sys.base_prefix, "bin", "python3")


def command(staged: Path | None, config: Path, python: str | None = None) -> tuple[list[str], dict[str, str]]:
    """The command line (and base environment) that runs the driver unprivileged.

    As root: /usr/bin/python3 as nobody on the staged copy. Otherwise: this interpreter,
    as the current (already unprivileged) user, on the installed package. ``python``: a
    virtualenv of :func:`base_python` to run the driver with instead, on the staged copy.
    """
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": os.environ.get("LANG", "C.UTF-8")}
    if os.geteuid() == 0:
        assert staged is not None
        env.update(PYTHONPATH=str(staged / "site-packages"), HOME=str(staged / "home"))
        argv = ["setpriv", "--reuid", str(NOBODY), "--regid", str(NOBODY), "--clear-groups",
                python or SYSTEM_PYTHON, str(staged / "unprivileged.py"), "drive", str(config)]
    elif python:
        assert staged is not None
        env.update(PYTHONPATH=str(staged / "site-packages"), HOME=os.environ.get("HOME", "/tmp"))
        argv = [python, str(staged / "unprivileged.py"), "drive", str(config)]
    else:
        env.update(HOME=os.environ.get("HOME", "/tmp"))
        argv = [sys.executable, str(HERE / "unprivileged.py"), "drive", str(config)]
    return argv, env


def run_driver(staged: Path | None, config: dict, extra_env: dict[str, str], timeout_s: float,
               python: str | None = None) -> dict[str, dict]:
    """Run the driver on ``config``'s cases; returns case name -> its result."""
    where = Path(config["copies"]).parent / f"driver-{len(os.listdir(Path(config['copies']).parent))}.json"
    where.write_text(json.dumps(config))
    os.chmod(where, 0o644)
    argv, env = command(staged, where, python)
    env.update(extra_env)
    proc = subprocess.run(argv, env=env, cwd=str(where.parent), capture_output=True, text=True, timeout=timeout_s)
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            r = json.loads(line[len(RESULT_PREFIX):])
            results[r["name"]] = r
    if proc.returncode != 0 or len(results) != len(config["cases"]):
        raise AssertionError(f"the driver failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-3000:]}")
    return results


# --- the driver (runs unprivileged, standard library + the staged sandbox only) -------------


def _with_pid(value, pid: int):
    if value == "$DRIVER_PID":
        return pid
    if isinstance(value, list):
        return [_with_pid(v, pid) for v in value]
    if isinstance(value, dict):
        return {k: _with_pid(v, pid) for k, v in value.items()}
    return value


def read_report(copy: str | os.PathLike) -> dict:
    """The attack's report.json in ``copy``, read without following a link; {} if none."""
    try:
        fd = os.open(os.path.join(copy, "report.json"), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return {}
    with os.fdopen(fd) as fh:
        try:
            return json.load(fh)
        except ValueError:
            return {}


def drive(config: dict) -> None:
    from threadbound.agents import sandbox

    probe = (Path(__file__).parent / "hostile_probe.py").read_text()
    copies = config["copies"]
    for case in config["cases"]:
        copy = os.path.join(copies, case["name"].replace("/", "_"))
        os.makedirs(copy)
        with open(os.path.join(copy, "hostile_probe.py"), "w") as fh:
            fh.write(probe)
        # As the tester does: the user's workspace and every other copy stay out of sight.
        settings = sandbox.SandboxSettings(**{k: tuple(v) if isinstance(v, list) else v
                                              for k, v in case["settings"].items()})
        settings = settings.hiding(config.get("original"), copies)
        args = _with_pid(case["args"], os.getpid())
        out = {"name": case["name"], "copy": copy, "driver_pid": os.getpid(), "uid": os.getuid()}
        try:
            res = sandbox.run([sys.executable, "hostile_probe.py", json.dumps(args)], cwd=copy,
                              limits=sandbox.SandboxLimits(**case.get("limits", {})), settings=settings)
        except sandbox.SandboxUnavailable as exc:
            out["unavailable"] = str(exc)
        else:
            out.update(exit_code=res.exit_code, killed=res.killed, signal=res.signal, output=res.output[-4000:],
                       elapsed_s=res.elapsed_s, layers=[layer.to_dict() for layer in res.layers], notes=res.notes,
                       network_isolated=res.network_isolated)
        out["report"] = read_report(copy)
        print(RESULT_PREFIX + json.dumps(out), flush=True)


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "drive":
        sys.exit("usage: unprivileged.py drive CONFIG.json")
    with open(sys.argv[2]) as fh:
        drive(json.load(fh))
