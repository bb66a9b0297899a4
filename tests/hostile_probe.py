"""What a hostile workspace tries from inside the sandbox, and what it got: facts, as JSON.

Standard library only: this file is copied into a task's workspace (where a test file
imports it, as a model's test would) or run as a script through
``threadbound.agents.sandbox.run`` by tests/unprivileged.py. It is given only paths,
ports and pids -- never a secret -- and writes what it managed to see to
``report.json`` in its working directory (the copy), so that a secret in the report
or in the output can only have come through the sandbox. The tests decide, from the
report and from the host, whether an attack succeeded.

    python hostile_probe.py '{"read": ["/etc/shadow"], "tcp": [["127.0.0.1", 8080]]}'

Every attack is bounded in time. Calls that would change the probe's own process
(setns, unshare, ptrace) run in a forked child that reports the result in its exit
status, so one attack that gets through does not change what the next one sees.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import signal
import socket
import sys
import time

REPORT = "report.json"
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long

CLONE_FLAGS = {"CLONE_NEWNS": 0x00020000, "CLONE_NEWUSER": 0x10000000, "CLONE_NEWNET": 0x40000000,
               "CLONE_NEWPID": 0x20000000}
PTRACE_SEIZE = 0x4206  # attaches without stopping the tracee (ATTACH would leave a victim stopped)
_SYS_PROCESS_VM_READV = 310  # x86_64; other architectures report "unsupported"


def _err(exc_or_no) -> str:
    no = exc_or_no if isinstance(exc_or_no, int) else getattr(exc_or_no, "errno", None)
    return errno.errorcode.get(no, str(no)) if no else repr(exc_or_no)


def read(path: str, limit: int = 400) -> dict:
    out: dict = {"exists": os.path.lexists(path)}
    try:
        with open(path, "rb") as fh:
            out["content"] = fh.read(limit).decode("utf-8", "replace")
    except OSError as exc:
        out["error"] = _err(exc)
    return out


def listdir(path: str) -> dict:
    try:
        return {"entries": sorted(os.listdir(path))}
    except OSError as exc:
        return {"error": _err(exc)}


def write(path: str, text: str) -> dict:
    """Append ``text`` to ``path`` (creating it): what a planted .pth or .bashrc line would need."""
    try:
        with open(path, "a") as fh:
            fh.write(text)
        return {"wrote": True}
    except OSError as exc:
        return {"wrote": False, "error": _err(exc)}


def environ_scan(extra_pids=()) -> dict:
    """Every /proc/<pid>/environ this process can read (what a token thief looks at first)."""
    readable, texts, errors = [], [], {}
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError as exc:
        return {"error": _err(exc), "explicit": {str(p): read(f"/proc/{p}/environ", 20000) for p in extra_pids}}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/environ", "rb") as fh:
                data = fh.read(20000)
        except OSError as exc:
            errors[pid] = _err(exc)
            continue
        readable.append(int(pid))
        texts.append(data.replace(b"\0", b"\n").decode("utf-8", "replace"))
    return {"visible": len(pids), "readable": sorted(readable), "errors": errors, "text": "\n".join(texts)[:200_000],
            "explicit": {str(p): read(f"/proc/{p}/environ", 20000) for p in extra_pids}}


def _in_child(fn) -> dict:
    """Run ``fn`` (returns 0 or an errno) in a forked child; its exit status is the result."""
    pid = os.fork()
    if pid == 0:
        try:
            code = fn()
        except BaseException:
            code = 255
        os._exit(code & 0xFF)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    return {"ok": code == 0, "errno": _err(code) if code > 0 else ("signal" if code < 0 else None)}


def _syscall_errno(rc: int) -> int:
    return 0 if rc >= 0 else (ctypes.get_errno() or 255)


def _sleeper() -> int:
    pid = os.fork()
    if pid == 0:
        time.sleep(30)
        os._exit(0)
    return pid


def ptrace(pids) -> dict:
    """PTRACE_SEIZE each pid (and to a child of our own, which only seccomp can stop)."""
    out = {}
    child = _sleeper()
    try:
        for label, pid in [("own_child", child)] + [(str(p), int(p)) for p in pids]:
            out[label] = _in_child(lambda pid=pid: _syscall_errno(_libc.ptrace(PTRACE_SEIZE, pid, None, None)))
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
    return out


class _IOVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


def process_vm_readv(pids) -> dict:
    """Read memory of each pid (and of a child of our own) with process_vm_readv."""
    if os.uname().machine != "x86_64":
        return {"unsupported": os.uname().machine}
    buf = ctypes.create_string_buffer(b"hostile-probe-memory", 64)
    child = _sleeper()  # a copy of us: ``buf`` is at the same address there
    out = {}
    try:
        for label, pid in [("own_child", child)] + [(str(p), int(p)) for p in pids]:
            dst = ctypes.create_string_buffer(64)
            local = _IOVec(ctypes.cast(dst, ctypes.c_void_p), 64)
            remote = _IOVec(ctypes.cast(buf, ctypes.c_void_p), 64)
            rc = _libc.syscall(ctypes.c_long(_SYS_PROCESS_VM_READV), ctypes.c_int(pid), ctypes.byref(local),
                               ctypes.c_ulong(1), ctypes.byref(remote), ctypes.c_ulong(1), ctypes.c_ulong(0))
            out[label] = {"ok": rc > 0, "errno": None if rc >= 0 else _err(ctypes.get_errno())}
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
    return out


def proc_mem(pids) -> dict:
    """Open /proc/<pid>/mem for writing (what rewriting another process's code needs)."""
    out = {}
    for pid in pids:
        try:
            fd = os.open(f"/proc/{pid}/mem", os.O_RDWR)
        except OSError as exc:
            out[str(pid)] = {"ok": False, "errno": _err(exc)}
        else:
            os.close(fd)
            out[str(pid)] = {"ok": True, "errno": None}
    return out


def setns(path: str) -> dict:
    def attempt() -> int:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            return exc.errno or 255
        return _syscall_errno(_libc.setns(fd, 0))

    try:
        os.close(os.open(path, os.O_RDONLY))
        opened = True
    except OSError as exc:
        opened = _err(exc)
    return {"open": opened, **_in_child(attempt)}


def unshare(names) -> dict:
    return {name: _in_child(lambda f=CLONE_FLAGS[name]: _syscall_errno(_libc.unshare(f))) for name in names}


def tcp(targets) -> dict:
    out = {}
    for host, port in targets:
        s = socket.socket()
        s.settimeout(3)
        try:
            s.connect((host, int(port)))
            try:
                banner = s.recv(200).decode("utf-8", "replace")
            except OSError:
                banner = ""
            out[f"{host}:{port}"] = {"connected": True, "banner": banner}
        except OSError as exc:
            out[f"{host}:{port}"] = {"connected": False, "errno": _err(exc)}
        finally:
            s.close()
    return out


def udp(targets) -> dict:
    """Send one datagram to each target and wait briefly for an answer."""
    out = {}
    for host, port in targets:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(2)
        try:
            s.sendto(b"hello from the sandbox", (host, int(port)))
            try:
                answer = s.recv(200).decode("utf-8", "replace")
            except OSError:
                answer = ""
            out[f"{host}:{port}"] = {"sent": True, "answer": answer}
        except OSError as exc:
            out[f"{host}:{port}"] = {"sent": False, "errno": _err(exc)}
        finally:
            s.close()
    return out


def unix(paths) -> dict:
    out = {}
    for path in paths:
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(3)
        try:
            s.connect(path)
            out[path] = {"connected": True}
        except OSError as exc:
            out[path] = {"connected": False, "errno": _err(exc)}
        finally:
            s.close()
    return out


def signal0(pids) -> dict:
    out = {}
    for pid in pids:
        try:
            os.kill(int(pid), 0)
            out[str(pid)] = {"ok": True}
        except OSError as exc:
            out[str(pid)] = {"ok": False, "errno": _err(exc)}
    return out


_DAEMON = """
import os, sys, time
watch = int(sys.argv[3])
while os.path.exists(f"/proc/{watch}"):  # until the test run that started it is over (order, not time)
    time.sleep(0.05)
time.sleep(float(sys.argv[2]))
for path in sys.argv[4:]:
    try:
        open(path, "a").write("the daemon outlived its sandbox\\n")
    except OSError:
        pass
time.sleep(60)
"""


def daemon(marker: str, files, delay_s: float = 2.0) -> dict:
    """Double fork, setsid, exec a long sleeper whose argv carries ``marker``; once the test run
    that started it has ended, it waits ``delay_s`` and writes ``files`` (if it still lives)."""
    run = os.getpid()  # the test run: the daemon waits for it to end before it acts
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        os.setsid()
        if os.fork():
            os._exit(0)
        os.write(w, str(os.getpid()).encode())
        os.close(w)
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        try:
            os.execv(sys.executable, [sys.executable, "-c", _DAEMON, marker, str(delay_s), str(run), *files])
        finally:
            os._exit(127)
    os.close(w)
    os.waitpid(pid, 0)
    grandchild = os.read(r, 32).decode()
    os.close(r)
    return {"started": bool(grandchild), "pid": grandchild}


def fill_files(count: int, hold_s: float) -> dict:
    os.makedirs("fill", exist_ok=True)
    made = 0
    try:
        for i in range(count):
            with open(f"fill/f{i}", "w") as fh:
                fh.write("x")
            made += 1
    except OSError as exc:
        return {"made": made, "errno": _err(exc)}
    time.sleep(hold_s)
    return {"made": made}


def fill_bytes(mb: int, hold_s: float) -> dict:
    os.makedirs("fill", exist_ok=True)
    chunk = os.urandom(1024 * 1024)
    written = 0
    try:
        for i in range(mb):
            with open(f"fill/big{i}", "wb") as fh:
                fh.write(chunk)
                fh.flush()
                os.fsync(fh.fileno())
            written += 1
    except OSError as exc:
        return {"written_mb": written, "errno": _err(exc)}
    time.sleep(hold_s)
    return {"written_mb": written}


def fork_bomb(seconds: float) -> dict:
    """Fork as fast as possible for ``seconds`` (every child too), then every child exits."""
    me = os.getpid()
    end = time.monotonic() + seconds
    forks = failures = 0
    while time.monotonic() < end:
        try:
            if os.fork() == 0:
                forks = failures = 0
                continue
            forks += 1
        except OSError:
            failures += 1
            time.sleep(0.001)
    if os.getpid() != me:
        os._exit(0)
    return {"forks": forks, "failures": failures}


def memory(mb: int) -> dict:
    hog, got = [], 0
    try:
        while got < mb:
            block = bytearray(64 * 1024 * 1024)
            block[::4096] = b"x" * len(block[::4096])  # touch every page
            hog.append(block)
            got += 64
    except MemoryError:
        return {"allocated_mb": got, "error": "MemoryError"}
    return {"allocated_mb": got}


def main(args: dict, report: str = REPORT) -> dict:
    """Run the attacks ``args`` names (see the module docstring); write and return the findings."""
    found: dict = {"uid": os.getuid(), "pid": os.getpid(), "ppid": os.getppid(), "cwd": os.getcwd(),
                   "hostname": socket.gethostname()}

    def save() -> None:  # after every attack: a run killed by a limit still leaves what it saw
        with open(report, "w") as fh:
            json.dump(found, fh)

    save()
    steps = [
        ("read", lambda v: {p: read(p) for p in v}),
        ("list", lambda v: {p: listdir(p) for p in v}),
        ("environ", lambda v: environ_scan(v)),
        ("ptrace", ptrace),
        ("process_vm_readv", process_vm_readv),
        ("proc_mem", proc_mem),
        ("setns", setns),
        ("unshare", unshare),
        ("tcp", tcp),
        ("udp", udp),
        ("unix", unix),
        ("signal", signal0),
        ("write", lambda v: {p: write(p, t) for p, t in v}),
        ("daemon", lambda v: daemon(**v)),
        ("fill_files", lambda v: fill_files(**v)),
        ("fill_bytes", lambda v: fill_bytes(**v)),
        ("fork_bomb", lambda v: fork_bomb(**v)),
        ("memory", lambda v: memory(**v)),
    ]
    for name, attack in steps:
        if name in args:
            try:
                found[name] = attack(args[name])
            except Exception as exc:  # an attack that cannot even be tried is a fact too
                found[name] = {"crashed": f"{type(exc).__name__}: {exc}"}
            save()
    found["done"] = True
    save()
    print("HOSTILE-PROBE done:", ", ".join(k for k in args))
    return found


if __name__ == "__main__":
    main(json.loads(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else REPORT)
