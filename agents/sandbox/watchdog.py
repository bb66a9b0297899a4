"""The watchdog a sandboxed command runs under: its rlimits, and the thread that kills its
process tree on wall clock, process count and the copy's size, leaving nothing behind."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import tempfile
import threading
import time

import psutil

from .settings import SandboxLimits


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
