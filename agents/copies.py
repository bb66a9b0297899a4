"""Where a task's copy of the workspace lives, what a copy leaves out (ignored names, the
user's secrets, anything but directories, regular files and links), and deleting a copy
without following a link. :class:`~threadbound.agents.workspace.Workspace` makes and opens
the copies."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Callable, Iterable

from .hostile_fs import WorkspaceError, _excluded, _is_ignored, _lstat_at, _open_root, _remove_tree


def workspaces_root() -> Path:
    """Where task copies live: ``$THREADBOUND_WORKSPACES`` or the system temp dir."""
    return Path(os.environ.get("THREADBOUND_WORKSPACES") or Path(tempfile.gettempdir()) / "threadbound-workspaces")


def protected_paths(extra: Iterable[str | os.PathLike | None] = ()) -> frozenset[str]:
    """Real paths a copy never contains and a walk never enters, wherever the workspace is:
    the places that hold the pool user's secrets (threadbound's state directory, with its
    snapshot key and gateway tokens, ``~/.threadbound``, ``~/.ray``, ``~/.ssh``, Ray's
    session directory and token folder), ``$THREADBOUND_SNAPSHOT_DIR``, and ``extra``
    (the pool's configured snapshot store and key file: ``ctx.sandbox.hide``).
    Names that are secrets anywhere (``.ssh``, ``snapshot.key``, ``id_ed25519``, ...) are
    left out as well: ``hostile_fs.SECRET_DIRS`` and ``SECRET_FILES``."""
    from .sandbox.mounts import default_hidden

    paths = [*default_hidden(), os.environ.get("THREADBOUND_SNAPSHOT_DIR"), *extra]
    return frozenset(os.path.normpath(os.path.realpath(os.path.expanduser(os.fspath(p))))
                     for p in paths if p and "://" not in os.fspath(p))


def _copy_ignore(exclude: frozenset[str]) -> Callable[[str, list[str]], set[str]]:
    """For copytree: ignored and secret names, protected paths, and anything but
    directories, regular files and links."""
    def ignore(dirpath: str, names: list[str]) -> set[str]:
        out = set()
        for name in names:
            path = os.path.join(dirpath, name)
            try:
                mode = os.lstat(path).st_mode
            except OSError:
                out.add(name)
                continue
            if (_is_ignored(name) or _excluded(path, exclude)
                    or not (stat.S_ISDIR(mode) or stat.S_ISREG(mode) or stat.S_ISLNK(mode))):
                out.add(name)
        return out
    return ignore


def copy_path(task_id: str, root: str | os.PathLike | None = None) -> Path:
    """Where task ``task_id``'s copy is (or will be) on this node."""
    return (Path(root) if root is not None else workspaces_root()) / _copy_name(task_id)


TRIAL_SUFFIX = ".tests"  # the copy the tests last ran in, beside the task's copy


def trial_path(task_id: str, root: str | os.PathLike | None = None) -> Path:
    """Where the tests of task ``task_id`` last ran (a copy of its copy; see Workspace.trial)."""
    return copy_path(task_id, root).with_name(_copy_name(task_id) + TRIAL_SUFFIX)


def _discard_tree(base: Path, name: str) -> bool:
    """Delete ``base/name`` (a tree or a file) following no link; True if it was there.

    The tree is removed through directory descriptors (a link in it is deleted, never
    what it points to), and a directory made unreadable by the tests is made readable
    first. Raises :class:`WorkspaceError` when it cannot be deleted."""
    if not shutil.rmtree.avoids_symlink_attacks:  # same needs: dir_fd for open/unlink/rmdir, scandir(fd)
        raise WorkspaceError("this platform cannot delete a directory without following symbolic links; "
                             "delete the task's copy yourself")
    if not os.path.lexists(base):
        return False
    base_fd = _open_root(base)
    try:
        st = _lstat_at(base_fd, name)
        if st is None:
            return False
        if stat.S_ISDIR(st.st_mode):
            _remove_tree(base_fd, name)
        else:
            os.unlink(name, dir_fd=base_fd)
        return True
    except OSError as exc:
        raise WorkspaceError(f"could not delete {base / name}: {exc}") from None
    finally:
        os.close(base_fd)


def _copy_name(task_id: str) -> str:
    name = task_id.replace("/", "_").replace("\0", "_")
    if name in ("", ".", ".."):
        raise WorkspaceError(f"task id {task_id!r} cannot name a workspace copy")
    return name
