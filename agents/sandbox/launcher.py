"""The first program inside the sandbox: applies the in-process layers, then runs the command.

Run as ``python -I -S -c <this file's source> <config json> <command...>`` (standard
library only: it starts in ~15 ms). In order, after setting the rlimits:

1. Landlock (where the kernel has it): read-only everywhere it is told, writable only
   the task's copy and the private /tmp; with ABI >= 4 no TCP bind or connect unless
   the network is allowed; with ABI >= 6 no signals to, and no abstract unix sockets
   of, processes outside the sandbox.
2. The seccomp filter, when bwrap did not load it (landlock-only mode).
3. Root only: drop to the unprivileged uid/gid the runner chose, with no groups and no
   capabilities (bwrap left it CAP_SETUID and CAP_SETGID for exactly this, nothing else).
4. Report what held on the status fd, then exec the command -- or, without a PID
   namespace, fork it as a child subreaper and kill whatever it leaves behind.

If the uid drop fails the command never runs: exit 126 with the reason.
"""

import ctypes
import json
import os
import signal
import sys
import time

_PR_SET_NO_NEW_PRIVS, _PR_SET_CHILD_SUBREAPER, _PR_CAPBSET_DROP, _PR_SET_SECCOMP = 38, 36, 24, 22
_SECCOMP_MODE_FILTER = 2
_ACCESS_NET_BIND_TCP, _ACCESS_NET_CONNECT_TCP = 1, 2
_SCOPE_ABSTRACT_UNIX_SOCKET, _SCOPE_SIGNAL = 1, 2


# Landlock's ABI, spelled out here rather than imported from the ``landlock`` package:
# importing that package costs ~20 ms per run (scripts/sandbox_cost.py), and it knows
# neither the network rules (ABI 4) nor the scopes (ABI 6) used below.
_SYS_CREATE_RULESET, _SYS_ADD_RULE, _SYS_RESTRICT_SELF = 444, 445, 446
_CREATE_RULESET_VERSION = 1
_RULE_PATH_BENEATH = 1
_EXECUTE, _WRITE_FILE, _READ_FILE, _READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
_DIR_ONLY = sum(1 << b for b in range(4, 14))  # remove dir/file, make char/dir/reg/sock/fifo/block/sym, refer
_TRUNCATE, _IOCTL_DEV = 1 << 14, 1 << 15


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _PathBeneath(ctypes.Structure):
    _pack_ = 1  # the kernel's struct landlock_path_beneath_attr is packed
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return libc


def landlock_abi():
    """The kernel's Landlock ABI version, 0 if it has none."""
    n = _libc().syscall(ctypes.c_long(_SYS_CREATE_RULESET), None, ctypes.c_size_t(0),
                        ctypes.c_uint32(_CREATE_RULESET_VERSION))
    return max(0, int(n))


def _landlock(cfg):
    libc = _libc()
    abi = landlock_abi()
    if abi < 1:
        raise OSError("this kernel has no Landlock")
    files = _EXECUTE | _WRITE_FILE | _READ_FILE | (_TRUNCATE if abi >= 3 else 0) | (_IOCTL_DEV if abi >= 5 else 0)
    dir_only = _DIR_ONLY if abi >= 2 else _DIR_ONLY & ~(1 << 13)
    handled = files | _READ_DIR | dir_only
    read = _READ_FILE | _READ_DIR | _EXECUTE
    dev = _READ_FILE | _WRITE_FILE | (_TRUNCATE if abi >= 3 else 0) | (_IOCTL_DEV if abi >= 5 else 0)
    attr = _RulesetAttr(handled, 0, 0)
    what = [f"ABI {abi}: writes only to the copy and /tmp"]
    if abi >= 4 and cfg.get("deny_tcp"):
        attr.handled_access_net = _ACCESS_NET_BIND_TCP | _ACCESS_NET_CONNECT_TCP
        what.append("no TCP bind/connect")
    if abi >= 6:
        attr.scoped = _SCOPE_ABSTRACT_UNIX_SOCKET | _SCOPE_SIGNAL
        what.append("no signals or abstract sockets outside")
    size = 24 if abi >= 6 else (16 if abi >= 4 else 8)
    ruleset = libc.syscall(ctypes.c_long(_SYS_CREATE_RULESET), ctypes.byref(attr), ctypes.c_size_t(size),
                           ctypes.c_uint32(0))
    if ruleset < 0:
        raise OSError(ctypes.get_errno(), "landlock_create_ruleset failed")

    def allow(path, rights):
        try:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except OSError:
            return
        try:
            if not os.path.isdir(path):
                rights &= files  # a file takes only file rights
            rule = _PathBeneath(rights & handled, fd)
            if libc.syscall(ctypes.c_long(_SYS_ADD_RULE), ctypes.c_int(ruleset), ctypes.c_int(_RULE_PATH_BENEATH),
                            ctypes.byref(rule), ctypes.c_uint32(0)) < 0:
                raise OSError(ctypes.get_errno(), f"landlock_add_rule({path}) failed")
        finally:
            os.close(fd)

    for p in cfg.get("ro", ()):
        allow(p, read)
    for p in cfg.get("dev", ()):
        allow(p, dev)
    for p in cfg.get("rw", ()):
        allow(p, handled)
    libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    if libc.syscall(ctypes.c_long(_SYS_RESTRICT_SELF), ctypes.c_int(ruleset), ctypes.c_uint32(0)) < 0:
        raise OSError(ctypes.get_errno(), "landlock_restrict_self failed")
    os.close(ruleset)
    return "; ".join(what)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def _seccomp(fd):
    program = b""
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        program += chunk
    os.close(fd)
    buf = ctypes.create_string_buffer(program)
    prog = _SockFprog(len(program) // 8, ctypes.cast(buf, ctypes.c_void_p))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    if libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP) failed")


def _rlimits(limits):
    import resource

    for name, value in limits.items():
        resource.setrlimit(getattr(resource, name), tuple(value))


def _drop(uid, gid):
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in range(64):  # empty the bounding set while we still may (CAP_SETPCAP); harmless if not
        if libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            break
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    if os.getresuid() != (uid, uid, uid) or os.getuid() == 0:
        raise OSError("the uid did not change")


def _reap(argv, children_fd):
    """No PID namespace: run the command as our child and, as a subreaper, kill what it leaves.

    ``children_fd`` is ``/proc/<us>/task/<us>/children``, opened before Landlock (which
    allows no /proc) and re-read with ``pread``: orphans of the command (a double-forked
    daemon) are reparented to us, and are killed until none is left.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    pid = os.fork()
    if pid == 0:
        os.setpgid(0, 0)
        try:
            os.execvp(argv[0], argv)
        except OSError as exc:
            sys.stderr.write(f"sandbox: cannot run {argv[0]!r}: {exc.strerror}\n")
            os._exit(127)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    for _ in range(5000):
        children = [int(c) for c in os.pread(children_fd, 1 << 16, 0).split()]
        for c in children:
            try:
                os.kill(c, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        except ChildProcessError:  # no child left, not even one exiting
            break
        time.sleep(0.002)
    os._exit(128 - code if code < 0 else code)


def main():
    cfg = json.loads(sys.argv[1])
    argv = sys.argv[2:]
    status = {}
    children_fd = None
    if cfg.get("reaper"):  # before Landlock, which allows no /proc
        tid = os.getpid()
        children_fd = os.open(f"/proc/{tid}/task/{tid}/children", os.O_RDONLY | os.O_CLOEXEC)
    if cfg.get("rlimits"):
        _rlimits(cfg["rlimits"])
    if cfg.get("landlock"):
        try:
            status["landlock"] = [True, _landlock(cfg["landlock"])]
        except Exception as exc:
            status["landlock"] = [False, f"{type(exc).__name__}: {exc}"]
    if cfg.get("seccomp_fd") is not None:
        try:
            _seccomp(cfg["seccomp_fd"])
            status["seccomp"] = [True, "loaded by the launcher"]
        except Exception as exc:
            status["seccomp"] = [False, f"{type(exc).__name__}: {exc}"]
    if cfg.get("uid") is not None:
        try:
            _drop(cfg["uid"], cfg["gid"])
        except Exception as exc:
            sys.stderr.write(f"sandbox: refusing to run as root: cannot drop to uid {cfg['uid']}: {exc}\n")
            os._exit(126)
    status["uid"] = [os.getuid() != 0, f"uid {os.getuid()}, gid {os.getgid()}"]
    try:
        os.chdir(cfg["cwd"])
    except OSError as exc:
        sys.stderr.write(f"sandbox: cannot enter the copy {cfg['cwd']!r} as uid {os.getuid()}: {exc.strerror} "
                         "(without bubblewrap, a root pool's runs need the copy and Python reachable by that uid)\n")
        os._exit(126)
    fd = cfg.get("status_fd")
    if fd is not None:
        try:
            os.write(fd, json.dumps(status).encode())
        finally:
            os.close(fd)
    if children_fd is not None:
        _reap(argv, children_fd)
    try:
        os.execvp(argv[0], argv)
    except OSError as exc:
        sys.stderr.write(f"sandbox: cannot run {argv[0]!r}: {exc.strerror}\n")
        os._exit(127)


if __name__ == "__main__":
    main()
