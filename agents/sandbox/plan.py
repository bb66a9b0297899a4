"""How one sandboxed run is started (:class:`_Plan`): the cleared environment, and the
launcher's config and argv inside bubblewrap or, without it, on its own (:func:`_confined`)."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from . import mounts
from .seats import _chown_tree, sandbox_uid
from .settings import Layer, SandboxLimits, SandboxSettings
from .watchdog import rlimits

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
