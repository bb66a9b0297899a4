"""Reading and writing a tree that may be hostile, without following a link.

The workspace copy is written by the model's code and tests (sandboxed, but free to
create anything inside it: symbolic links, FIFOs, hard links, huge files, deep
trees), while the agents that read it run outside the sandbox. Everything here goes
one path component at a time through directory descriptors with ``O_NOFOLLOW``,
opens only regular files (non-blocking, checked again with ``fstat``), and bounds
every read and walk. :mod:`threadbound.agents.workspace` builds the copy on it; the bounded
walk of a tree is in :mod:`threadbound.agents.hostile_walk`.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
from pathlib import Path

IGNORED = {".git", "__pycache__", ".pytest_cache", ".venv", "venv", "node_modules", ".mypy_cache",
           ".ruff_cache", ".sandbox-home", ".threadbound"}
# Secrets never copied into a task's copy, never read into a prompt or a diff, wherever
# they lie in a workspace: Ray's and SSH's directories, threadbound's own key and token
# files, SSH private keys. (The state and snapshot directories are left out by path too:
# see copies.protected_paths.)
SECRET_DIRS = frozenset({".ray", ".ssh", ".gnupg", ".threadbound"})
SECRET_FILES = frozenset({"snapshot.key", "gateway_tokens", "auth_token", "ray_auth_token", ".netrc", ".pgpass",
                          "id_rsa", "id_dsa", "id_ecdsa", "id_ed25519", "id_ecdsa_sk", "id_ed25519_sk",
                          "identity"})
MAX_TEXT_BYTES = 200_000  # one file; a larger one is left out of texts and changes
MAX_TOTAL_TEXT_BYTES = 20_000_000  # one tree's files read in one walk
MAX_WALK_ENTRIES = 20_000  # directory entries one walk looks at (ignored ones count too)
MAX_WALK_DEPTH = 64  # nested directories one walk enters

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW_FILE_MODE = 0o644
_RM_DEPTH = 32  # discard moves a deeper directory up to the top instead of descending further


class WorkspaceError(ValueError):
    pass


class _LeftOut(WorkspaceError):
    """A file that is not read, why, and what it looks like (to tell a changed one from an unchanged one)."""

    def __init__(self, reason: str, fingerprint: tuple) -> None:
        super().__init__(reason)
        self.reason, self.fingerprint = reason, fingerprint

    def __reduce__(self):
        return type(self), (self.reason, self.fingerprint)


def _is_secret(name: str) -> bool:
    return name in SECRET_DIRS or name in SECRET_FILES


def _is_ignored(name: str) -> bool:
    return name in IGNORED or name.endswith((".pyc", ".egg-info")) or _is_secret(name)


def _excluded(path: str, exclude: frozenset[str]) -> bool:
    """``path`` (absolute, its parent resolved) is one of ``exclude`` (real paths)."""
    return bool(exclude) and os.path.normpath(path) in exclude


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISLNK, "symbolic link"), (stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "FIFO"),
                       (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device")):
        if test(mode):
            return name
    return "special file"


def _parts(rel: str) -> list[str]:
    """The components of ``rel``, normalized without the filesystem; refuses leaving the tree."""
    if os.path.isabs(rel) or "\0" in rel:
        raise WorkspaceError(f"path {rel!r} leaves the workspace")
    parts: list[str] = []
    for part in rel.split("/"):
        if part == "..":
            if not parts:
                raise WorkspaceError(f"path {rel!r} leaves the workspace")
            parts.pop()
        elif part not in ("", "."):
            parts.append(part)
    if not parts:
        raise WorkspaceError(f"path {rel!r} names no file in the workspace")
    return parts


def _lstat_at(dir_fd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _open_root(path: Path) -> int:
    try:
        return os.open(path, _DIR_FLAGS)
    except OSError as exc:
        if os.path.islink(path):  # O_NOFOLLOW|O_DIRECTORY says ELOOP or ENOTDIR
            raise WorkspaceError(f"{path} is a symbolic link; refused") from None
        raise WorkspaceError(f"{path} cannot be opened as a directory: {exc.strerror}") from None


def _open_dirs(root_fd: int, parts: list[str], rel: str, create: bool = False) -> int | None:
    """A descriptor of the directory ``parts`` under ``root_fd``, opened one component at a
    time without following a link. None when a component does not exist (and not ``create``)."""
    fd = os.dup(root_fd)
    try:
        for i, part in enumerate(parts):
            for attempt in (1, 2):
                try:
                    sub = os.open(part, _DIR_FLAGS, dir_fd=fd)
                    break
                except FileNotFoundError:
                    if not create or attempt == 2:
                        os.close(fd)
                        return None
                    try:
                        os.mkdir(part, dir_fd=fd)  # mkdir never follows a link either
                    except FileExistsError:
                        pass
                except OSError as exc:
                    if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                        raise
                    st, where = _lstat_at(fd, part), "/".join(parts[: i + 1])
                    if st is not None and stat.S_ISLNK(st.st_mode):
                        raise WorkspaceError(f"{rel!r}: {where!r} is a symbolic link; refused") from None
                    raise WorkspaceError(f"{rel!r}: {where!r} is not a directory") from None
            os.close(fd)
            fd = sub
        return fd
    except BaseException:
        os.close(fd)
        raise


def _readlink_at(dir_fd: int, name: str) -> str:
    try:
        return os.readlink(name, dir_fd=dir_fd)
    except OSError:
        return ""


def _read_regular(dir_fd: int, name: str, seen: os.stat_result | None = None, single_link: bool = False,
                  limit: int = MAX_TEXT_BYTES) -> bytes:
    """At most ``limit`` bytes of the regular file ``name``; raises :class:`_LeftOut` for anything else.

    Checked before opening (a link, FIFO or device is never opened) and after (the
    descriptor must be the same regular file: the entry may have been swapped).
    """
    st = seen or _lstat_at(dir_fd, name)
    if st is None:
        raise FileNotFoundError(errno.ENOENT, "no such file", name)
    if stat.S_ISLNK(st.st_mode):
        raise _LeftOut("a symbolic link", ("symlink", _readlink_at(dir_fd, name)))
    if not stat.S_ISREG(st.st_mode):
        raise _LeftOut(f"a {_kind(st.st_mode)}, not a regular file", (_kind(st.st_mode),))
    try:
        fd = os.open(name, _READ_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _LeftOut("a symbolic link", ("symlink", _readlink_at(dir_fd, name))) from None
        raise _LeftOut(f"unreadable ({exc.strerror})", ("unreadable", exc.errno)) from None
    try:
        fst = os.fstat(fd)
        if not stat.S_ISREG(fst.st_mode) or (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino):
            raise _LeftOut("replaced while being read", ("replaced", fst.st_ino))
        if single_link and fst.st_nlink > 1:
            raise _LeftOut("a file with other hard links (it may be a file outside the copy)",
                           ("hard-linked", fst.st_dev, fst.st_ino))
        fingerprint = ("file", fst.st_size, fst.st_mtime_ns)
        if fst.st_size > limit:
            raise _LeftOut(f"larger than {limit} bytes", fingerprint)
        chunks, size = [], 0
        while size <= limit:
            chunk = os.read(fd, limit + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > limit:
            raise _LeftOut(f"larger than {limit} bytes", fingerprint)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _decode(data: bytes, rel: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise WorkspaceError(f"{rel!r} is not UTF-8 text") from None


def _put(root_fd: int, rel: str, data: bytes) -> None:
    """Write ``data`` to ``rel`` under ``root_fd``: parents made as needed (never through a
    link), a new file in the same directory renamed over the old one (keeping its mode)."""
    parts = _parts(rel)
    dir_fd = _open_dirs(root_fd, parts[:-1], rel, create=True)
    assert dir_fd is not None
    try:
        name = parts[-1]
        st = _lstat_at(dir_fd, name)
        if st is not None and stat.S_ISLNK(st.st_mode):
            raise WorkspaceError(f"{rel!r} is a symbolic link; refused")
        if st is not None and not stat.S_ISREG(st.st_mode):
            raise WorkspaceError(f"{rel!r} is a {_kind(st.st_mode)}, not a regular file; refused")
        mode = stat.S_IMODE(st.st_mode) & 0o777 if st is not None else _NEW_FILE_MODE
        tmp = f".threadbound-{secrets.token_hex(8)}.tmp"
        fd = os.open(tmp, _NEW_FILE_FLAGS, 0o600, dir_fd=dir_fd)
        try:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fchmod(fd, mode)
            finally:
                os.close(fd)
            os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            try:
                os.unlink(tmp, dir_fd=dir_fd)
            except OSError:
                pass
            raise
    finally:
        os.close(dir_fd)


def _remove(root_fd: int, rel: str) -> bool:
    """Delete the regular file ``rel`` under ``root_fd``; False when it does not exist."""
    parts = _parts(rel)
    dir_fd = _open_dirs(root_fd, parts[:-1], rel)
    if dir_fd is None:
        return False
    try:
        st = _lstat_at(dir_fd, parts[-1])
        if st is None:
            return False
        if stat.S_ISLNK(st.st_mode):
            raise WorkspaceError(f"{rel!r} is a symbolic link; refused")
        if not stat.S_ISREG(st.st_mode):
            raise WorkspaceError(f"{rel!r} is a {_kind(st.st_mode)}, not a regular file; refused")
        os.unlink(parts[-1], dir_fd=dir_fd)  # unlink never follows a link, even if swapped in since
        return True
    finally:
        os.close(dir_fd)


def _private_root(base: Path) -> None:
    """Make ``base`` (0700) or check that it is a directory of ours and make it private."""
    base.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(base, 0o700)
    except FileExistsError:
        pass
    fd = _open_root(base)
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid():
            raise WorkspaceError(f"the workspaces directory {base} belongs to uid {st.st_uid}, not to this "
                                 "process; refused (set THREADBOUND_WORKSPACES to a directory of your own)")
        if stat.S_IMODE(st.st_mode) & 0o077:
            os.fchmod(fd, 0o700)
    finally:
        os.close(fd)


def _open_for_removal(parent_fd: int, name: str) -> int:
    """Open directory ``name`` (never a link) so that its entries can be deleted."""
    try:
        fd = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
    except PermissionError:
        st = _lstat_at(parent_fd, name)
        if st is None or not stat.S_ISDIR(st.st_mode):
            raise
        # No chmod that refuses links exists on Linux; the lstat just above said it is a
        # directory, and nothing runs in a copy that is being discarded.
        os.chmod(name, 0o700, dir_fd=parent_fd)
        fd = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
    if stat.S_IMODE(os.fstat(fd).st_mode) & 0o700 != 0o700:
        os.fchmod(fd, 0o700)
    return fd


def _clear(fd: int, top: int, depth: int) -> bool:
    """Delete what is in directory ``fd``; True if a directory too deep was moved up to ``top``."""
    moved = False
    with os.scandir(fd) as it:
        entries = [(e.name, e.is_dir(follow_symlinks=False)) for e in it]
    for name, is_dir in entries:
        if not is_dir:
            os.unlink(name, dir_fd=fd)
        elif depth >= _RM_DEPTH:  # a rename never follows a link: the stack stays short however deep
            os.rename(name, f".discard-{secrets.token_hex(8)}", src_dir_fd=fd, dst_dir_fd=top)
            moved = True
        else:
            sub = _open_for_removal(fd, name)
            try:
                moved |= _clear(sub, top, depth + 1)
            finally:
                os.close(sub)
            os.rmdir(name, dir_fd=fd)
    return moved


def _remove_tree(parent_fd: int, name: str) -> None:
    top = _open_for_removal(parent_fd, name)
    try:
        while _clear(top, top, 0):
            pass
    finally:
        os.close(top)
    os.rmdir(name, dir_fd=parent_fd)
