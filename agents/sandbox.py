"""Run untrusted commands (tests a model wrote) in a confined subprocess.

Confinement, each applied where the OS allows and reported in the result:

* its own session / process group, and where ``unshare`` works its own PID and
  network namespaces: no network at all, and killing the namespace's first process
  makes the kernel kill every process inside it;
* a wall-clock deadline: the whole tree is killed (psutil) when it passes;
* rlimits: CPU seconds, address space, file size, no core dumps, processes
  (RLIMIT_NPROC binds non-root users only, so a watchdog also counts the tree's
  processes and kills it past ``max_procs``: a fork bomb is contained and reported);
* a scrubbed environment: only PATH, LANG and a few harmless variables pass, so no
  API key or Ray token leaks in; HOME and TMPDIR point into the workspace.
"""

from __future__ import annotations

import functools
import os
import resource
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field

import psutil

_PASS_ENV = ("PATH", "LANG", "LC_ALL", "TZ", "TERM")


@dataclass(frozen=True)
class SandboxLimits:
    """Limits for one sandboxed command."""

    wall_s: float = 60.0
    cpu_s: int = 60
    memory_mb: int = 1024
    max_procs: int = 64
    file_mb: int = 256
    network: bool = False  # True: do not isolate the network


@dataclass
class SandboxResult:
    """What happened: exit code, trimmed output, and which limit (if any) ended it."""

    command: list[str]
    exit_code: int | None
    output: str
    elapsed_s: float
    killed: str | None = None  # "wall_clock", "max_procs", "cpu_time", or None
    signal: str | None = None  # the signal that ended the process, if any
    network_isolated: bool = False  # and a PID namespace of its own: one unshare gives both
    notes: list[str] = field(default_factory=list)


@functools.lru_cache(maxsize=None)
def namespaces_available() -> tuple[bool, str]:
    """Can we run ``unshare -n -p -f`` here? (root, or user namespaces enabled)."""
    exe = shutil.which("unshare")
    if exe is None:
        return False, "unshare is not installed; network is NOT isolated"
    try:
        r = subprocess.run([exe, "-n", "-p", "-f", "--kill-child", "true"], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"unshare failed ({exc}); network is NOT isolated"
    if r.returncode != 0:
        return False, "unshare is not permitted here; network is NOT isolated: " + r.stderr.decode()[:200]
    return True, ""


def scrubbed_env(workdir: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: os.environ[k] for k in _PASS_ENV if k in os.environ}
    env.setdefault("PATH", os.defpath)
    home = os.path.join(workdir, ".sandbox-home")
    os.makedirs(home, exist_ok=True)
    env.update(HOME=home, TMPDIR=home, PYTHONDONTWRITEBYTECODE="1", PYTHONUNBUFFERED="1",
               PYTHONNOUSERSITE="1")
    env.update(extra or {})
    return env


def _limits(limits: SandboxLimits):
    def apply() -> None:
        mb = 1024 * 1024
        resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_s, limits.cpu_s + 1))
        resource.setrlimit(resource.RLIMIT_AS, (limits.memory_mb * mb, limits.memory_mb * mb))
        resource.setrlimit(resource.RLIMIT_FSIZE, (limits.file_mb * mb, limits.file_mb * mb))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if os.geteuid() != 0:
            resource.setrlimit(resource.RLIMIT_NPROC, (limits.max_procs, limits.max_procs))

    return apply


def _kill_tree(proc: subprocess.Popen, wait_s: float = 0.0) -> None:
    try:
        root = psutil.Process(proc.pid)
        victims = root.children(recursive=True)
    except psutil.Error:
        victims = []
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole session (start_new_session=True)
    except OSError:
        pass
    for p in victims:  # anything that left the group
        try:
            p.kill()
        except psutil.Error:
            pass
    if wait_s and victims:  # return only once they are really gone
        psutil.wait_procs(victims, timeout=wait_s)


def _watched(argv: list[str], cwd: str, env: dict[str, str], limits: SandboxLimits,
             started: float) -> tuple[int, list[str], bytes]:
    """Run ``argv`` to its end under the watchdog: (exit code, limits that killed it, output)."""
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_limits(limits))
        killed: list[str] = []

        def watch() -> None:
            while proc.poll() is None:
                if time.monotonic() - started > limits.wall_s:
                    killed.append("wall_clock")
                else:
                    try:
                        n = len(psutil.Process(proc.pid).children(recursive=True))
                    except psutil.Error:
                        n = 0
                    if n > limits.max_procs:
                        killed.append("max_procs")
                if killed:
                    _kill_tree(proc, wait_s=5.0)
                    return
                time.sleep(0.02)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        code = proc.wait()
        watcher.join(timeout=5)
        _kill_tree(proc, wait_s=5.0)  # leave nothing behind (daemonised grandchildren included)
        out.seek(0)
        return code, killed, out.read()


def run(command: list[str], cwd: str, limits: SandboxLimits | None = None,
        env: dict[str, str] | None = None, max_output: int = 20_000) -> SandboxResult:
    """Run ``command`` in ``cwd`` under ``limits``; never raises for what the command does.

    Examples:
        >>> r = run([sys.executable, "-c", "print('hi')"], cwd=tempfile.gettempdir())
        >>> (r.exit_code, r.output.strip())
        (0, 'hi')
    """
    limits = limits or SandboxLimits()
    notes: list[str] = []
    isolated = False
    argv = list(command)
    if not limits.network:
        ok, why = namespaces_available()
        if ok:
            # sh is the namespace's first process: it reports a signal death as 128+n
            # (unshare cannot re-raise some, e.g. SIGXCPU), and when it exits the
            # kernel kills whatever the command left behind in the namespace.
            argv = ["unshare", "-n", "-p", "-f", "--", "/bin/sh", "-c", '"$@"', "sandbox", *argv]
            isolated = True
        else:
            notes.append(why)
    started = time.monotonic()
    try:
        code, killed, data = _watched(argv, cwd, env if env is not None else scrubbed_env(cwd), limits, started)
    except OSError as exc:
        return SandboxResult(command=list(command), exit_code=127, output=f"cannot start {command[0]!r}: {exc}",
                             elapsed_s=0.0, notes=notes)
    text = data.decode("utf-8", "replace")
    if len(text) > max_output:
        half = max_output // 2
        text = text[:half] + f"\n... [{len(text) - max_output} characters trimmed] ...\n" + text[-half:]
    sig = signal.Signals(-code).name if code is not None and code < 0 else None
    if isolated and code is not None and code > 128 and not sig:  # unshare reports the child's signal as 128+n
        try:
            sig = signal.Signals(code - 128).name
        except ValueError:
            pass
    if not killed and sig == "SIGXCPU":
        killed.append("cpu_time")
    return SandboxResult(command=list(command), exit_code=code, output=text,
                         elapsed_s=time.monotonic() - started, killed=killed[0] if killed else None,
                         signal=sig, network_isolated=isolated, notes=notes)
