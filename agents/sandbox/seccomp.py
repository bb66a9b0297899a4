"""The seccomp filter every sandboxed command runs under: system calls that only an
escape or an attack on the host needs fail with EPERM.

Built once per process with libseccomp (through ``pyseccomp``) and handed to bwrap
as a compiled BPF program (``--seccomp FD``), or loaded by the launcher where bwrap
cannot start. Everything else is allowed: test suites fork, thread, mmap and use
sockets. Other architectures' system call tables (a 32-bit ``int 0x80``) are
killed by libseccomp's default bad-arch action.
"""

from __future__ import annotations

import errno
import functools
import tempfile

# Debugging, reading or writing other processes' memory; joining or making
# namespaces; mounting; kernel keyrings, BPF, perf and modules; clock, swap, reboot
# and accounting; io_uring (its own path around these rules); handles that bypass
# path checks; userfaultfd (a kernel-exploit staple).
DENIED = (
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd",
    "setns", "unshare", "mount", "umount2", "pivot_root", "chroot", "move_mount", "open_tree",
    "fsopen", "fsconfig", "fsmount", "fspick", "mount_setattr",
    "bpf", "keyctl", "add_key", "request_key", "perf_event_open",
    "init_module", "finit_module", "delete_module", "kexec_load", "kexec_file_load",
    "reboot", "swapon", "swapoff", "acct", "quotactl", "settimeofday", "clock_settime",
    "clock_adjtime", "adjtimex", "iopl", "ioperm", "lookup_dcookie", "userfaultfd",
    "io_uring_setup", "io_uring_enter", "io_uring_register",
    "open_by_handle_at", "name_to_handle_at", "syslog", "vhangup", "personality",
)
_NEW_NAMESPACES = {  # clone() flags that make namespaces
    "CLONE_NEWNS": 0x00020000, "CLONE_NEWCGROUP": 0x02000000, "CLONE_NEWUTS": 0x04000000,
    "CLONE_NEWIPC": 0x08000000, "CLONE_NEWUSER": 0x10000000, "CLONE_NEWPID": 0x20000000,
    "CLONE_NEWNET": 0x40000000,
}
_TIOCSTI, _TIOCLINUX = 0x5412, 0x541C  # push input into the controlling terminal


@functools.lru_cache(maxsize=1)
def compiled() -> tuple[bytes | None, str]:
    """The BPF program (or None) and what it does, or why there is none."""
    try:
        import pyseccomp as sc
    except Exception as exc:  # ImportError, or libseccomp.so.2 missing (OSError)
        return None, f"libseccomp is not usable ({type(exc).__name__}: {exc}); install libseccomp2"
    try:
        f = sc.SyscallFilter(defaction=sc.ALLOW)
        skipped = []
        for name in DENIED:
            try:
                f.add_rule(sc.ERRNO(errno.EPERM), name)
            except Exception:  # a call this kernel/arch does not have
                skipped.append(name)
        for flag in _NEW_NAMESPACES.values():
            f.add_rule(sc.ERRNO(errno.EPERM), "clone", sc.Arg(0, sc.MASKED_EQ, flag, flag))
        f.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")  # its flags are in memory: make libc fall back to clone
        for request in (_TIOCSTI, _TIOCLINUX):
            f.add_rule(sc.ERRNO(errno.EPERM), "ioctl", sc.Arg(1, sc.MASKED_EQ, 0xFFFFFFFF, request))
        with tempfile.TemporaryFile() as fh:
            f.export_bpf(fh)
            fh.seek(0)
            program = fh.read()
    except Exception as exc:
        return None, f"the seccomp filter could not be built ({type(exc).__name__}: {exc})"
    n = len(DENIED) - len(skipped)
    return program, (f"{n} system calls refused (ptrace, process_vm_*, setns, unshare, mount, bpf, keyctl, "
                     "perf_event_open, io_uring, ...), namespace flags of clone refused, clone3 made ENOSYS")
