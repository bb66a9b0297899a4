"""A task's private copy of the user's workspace: read, write, diff, apply back.

Every agent of a task (each in its own process) opens the same copy by task id.
The user's directory is never written to unless the change is applied on purpose.

The copy is hostile. The model's code and tests run in it (sandboxed, but free to
create anything inside it: symbolic links, FIFOs, hard links, huge files, deep
trees), while the agents that read it through this module run outside the sandbox.
So here:

* No symbolic link is ever followed. Trees are walked, and paths opened, one
  component at a time through directory descriptors with ``O_NOFOLLOW``; a path
  through a link is refused (``WorkspaceError: ... is a symbolic link; refused``).
* Only regular files are read: links, FIFOs, sockets and devices are left out and
  never opened; a file is opened non-blocking and checked again with ``fstat``.
  In the copy, a file with other hard links is left out too (it may be a file
  from outside the copy).
* Every read is bounded: a file over ``MAX_TEXT_BYTES`` is left out, one tree's
  text stops at ``MAX_TOTAL_TEXT_BYTES``, a walk stops after ``MAX_WALK_ENTRIES``
  entries or ``MAX_WALK_DEPTH`` nested directories. What is left out is said
  (:meth:`Workspace.scan`, :attr:`Change.skipped`); a :class:`Change` is refused
  outright when a walk stopped early, because a half-seen tree would look like
  deleted files.
* Writes go to a new file in the same directory, renamed into place: never through
  a link, a hard link or a FIFO.
* Copies live in a private (0700) directory and are deleted by
  :meth:`Workspace.discard`.

Where copies live, what a copy leaves out and how one is deleted is in ``copies``; the
:class:`Change` between a workspace and its copy in ``change``; the reads, walks and
writes that never follow a link in ``hostile_fs`` and ``hostile_walk``.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Iterator

from .change import Change
from .copies import TRIAL_SUFFIX, _copy_ignore, _copy_name, _discard_tree, protected_paths, workspaces_root
from .edits import Edits, PatchError, apply_hunks

log = logging.getLogger("threadbound.workspace")

from .hostile_fs import (  # noqa: F401  (IGNORED and the bounds are part of this module's API)
    IGNORED, MAX_TEXT_BYTES, SECRET_DIRS, SECRET_FILES, MAX_TOTAL_TEXT_BYTES, MAX_WALK_DEPTH, MAX_WALK_ENTRIES, WorkspaceError,
    _decode, _excluded, _is_ignored, _kind, _LeftOut, _lstat_at, _open_dirs, _open_root, _parts, _private_root, _put,
    _read_regular, _remove, _remove_tree,
)
from .hostile_walk import Scan, _Walk


class Workspace:
    """The per-task copy of ``original``; see the module's docstring for how it is read.

    Examples:
        >>> import tempfile, pathlib
        >>> src = pathlib.Path(tempfile.mkdtemp()); (src / "a.py").write_text("x = 1\\n")
        6
        >>> ws = Workspace.for_task("t-doc", str(src), root=tempfile.mkdtemp())
        >>> ws.write("a.py", "x = 2\\n"); ws.changed()
        ['a.py']
        >>> Workspace.discard("t-doc", root=ws.path.parent)
        True
    """

    def __init__(self, original: Path, path: Path, exclude: frozenset[str] | None = None) -> None:
        self.original = original
        self.path = path
        self.exclude = protected_paths() if exclude is None else exclude

    @classmethod
    def for_task(cls, task_id: str, original: str, root: str | os.PathLike | None = None,
                 protect: Iterable[str | os.PathLike | None] = ()) -> "Workspace":
        """Open the task's copy, making it on first use (atomically: copy, then rename).

        The workspaces directory (``root``, default :func:`workspaces_root`) and each
        copy are private (0700); a root that is a symbolic link or another user's is
        refused. Symbolic links in the original are copied as links (the sandboxed
        tests see the project as it is; nothing outside the sandbox follows them);
        FIFOs, sockets and devices are not copied, nor are the user's secrets
        (:func:`protected_paths`, plus ``protect``: the pool's snapshot store and key).
        """
        exclude = protected_paths(protect)
        src = Path(original).resolve()
        if not src.is_dir():
            raise WorkspaceError(f"workspace {original!r} does not exist or is not a directory")
        base = Path(root) if root is not None else workspaces_root()
        dest = base / _copy_name(task_id)
        _private_root(base)
        if not os.path.lexists(dest):
            tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=base))
            try:
                shutil.copytree(src, tmp / "w", symlinks=True, ignore=_copy_ignore(exclude))
                os.chmod(tmp / "w", 0o700)
                try:
                    os.rename(tmp / "w", dest)
                except OSError:  # someone else made it first
                    pass
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        st = os.lstat(dest)
        if not stat.S_ISDIR(st.st_mode):
            raise WorkspaceError(f"the task's copy {dest} is a {_kind(st.st_mode)}, not a directory; refused")
        fd = _open_root(dest)
        try:
            if stat.S_IMODE(os.fstat(fd).st_mode) & 0o077:  # made by an older version
                os.fchmod(fd, 0o700)
        finally:
            os.close(fd)
        return cls(src, dest, exclude)

    @classmethod
    def discard(cls, task_id: str, root: str | os.PathLike | None = None) -> bool:
        """Delete the task's copy; True if there was one.

        Follows no link: the tree is removed through directory descriptors (a link in
        the copy is deleted, never what it points to), and a directory made unreadable
        by the tests is made readable first. Raises :class:`WorkspaceError` when the
        copy cannot be deleted.

        Examples:
            >>> import tempfile
            >>> root = tempfile.mkdtemp()
            >>> ws = Workspace.for_task("t-gone", tempfile.mkdtemp(), root=root)
            >>> Workspace.discard("t-gone", root=root), Workspace.discard("t-gone", root=root)
            (True, False)
        """
        base = Path(root) if root is not None else workspaces_root()
        name = _copy_name(task_id)
        _discard_tree(base, name + TRIAL_SUFFIX)
        return _discard_tree(base, name)

    @contextlib.contextmanager
    def trial(self) -> Iterator[Path]:
        """A fresh copy of the task's copy for a run that may write to it (the tests), so
        nothing it writes reaches the copy the reviewer reads and the change that is
        applied. Made like the copy (links as links; FIFOs, sockets, devices left out,
        private), at ``<copy>.tests`` beside it (see :func:`trial_path`): the previous
        run's is deleted first, without following a link; the last one stays for a
        look until the task's copy is discarded."""
        dest = self.path.with_name(self.path.name + TRIAL_SUFFIX)
        _discard_tree(dest.parent, dest.name)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
        try:
            shutil.copytree(self.path, tmp / "w", symlinks=True, ignore=_copy_ignore(self.exclude))
            os.chmod(tmp / "w", 0o700)
            os.rename(tmp / "w", dest)
        except OSError as exc:
            raise WorkspaceError(f"could not make a copy of {self.path} for the tests: {exc}") from None
        except RecursionError:  # copytree recurses: a tree a few hundred directories deep
            raise WorkspaceError(f"could not make a copy of {self.path} for the tests: its directories nest "
                                 "too deeply; remove the deep tree") from None
        finally:
            _discard_tree(tmp.parent, tmp.name)
        yield dest

    def _rel_parts(self, rel: str) -> list[str]:
        """``rel`` as the model may write it (quoted, with git's a/ or b/ prefix), as components."""
        rel = rel.strip().strip("`'\"")
        if rel.startswith(("a/", "b/")) and self._lookup(rel) is None:
            try:
                parent = _parts(rel[2:])[:-1]
            except WorkspaceError:
                parent = None
            if parent == [] or (parent and (st := self._lookup("/".join(parent))) and stat.S_ISDIR(st.st_mode)):
                rel = rel[2:]
        return _parts(rel)

    def _lookup(self, rel: str) -> os.stat_result | None:
        """What ``rel`` is in the copy, without following links; None if it does not exist (or cannot)."""
        try:
            parts = _parts(rel)
            root = _open_root(self.path)
        except WorkspaceError:
            return None
        try:
            dir_fd = _open_dirs(root, parts[:-1], rel)
        except (WorkspaceError, OSError):  # a link on the way, or no such directory
            return None
        finally:
            os.close(root)
        if dir_fd is None:
            return None
        try:
            return _lstat_at(dir_fd, parts[-1])
        finally:
            os.close(dir_fd)

    def _open_parent(self, rel: str) -> tuple[list[str], int | None]:
        """``rel``'s components and a descriptor of its directory (None if that does not exist)."""
        parts = self._rel_parts(rel)
        root = _open_root(self.path)
        try:
            return parts, _open_dirs(root, parts[:-1], rel)
        finally:
            os.close(root)

    def resolve(self, rel: str) -> Path:
        """The absolute path of ``rel`` inside the copy.

        Refuses a path that leaves the copy (absolute, or ``..`` past its top) and one
        that goes through or ends at a symbolic link (``WorkspaceError``). The path is
        for showing: open files with :meth:`read` / :meth:`write`, which check again.
        """
        parts, dir_fd = self._open_parent(rel)
        if dir_fd is not None:
            try:
                st = _lstat_at(dir_fd, parts[-1])
            finally:
                os.close(dir_fd)
            if st is not None and stat.S_ISLNK(st.st_mode):
                raise WorkspaceError(f"{rel!r} is a symbolic link; refused")
        return self.path.joinpath(*parts)

    def scan(self, base: Path | None = None) -> Scan:
        """One bounded walk of the copy (or of ``base``): texts, what was left out and why,
        and whether the walk stopped early. Never raises for what it finds."""
        root = Path(base) if base is not None else self.path
        return _Walk(hostile=root == self.path, exclude=self.exclude).scan(root)

    def texts(self, base: Path | None = None) -> dict[str, str]:
        """The text files of the copy (or of ``base``): relative path -> content, by path.

        Only UTF-8 regular files up to ``MAX_TEXT_BYTES``, within the walk's bounds: past
        them the result is partial (:meth:`scan` says what was left out).
        """
        return self.scan(base).texts

    def files(self, base: Path | None = None) -> list[str]:
        """Relative paths of the text files in the copy (or in ``base``), sorted."""
        return list(self.texts(base))

    def read(self, rel: str) -> str:
        """The text of ``rel`` in the copy: a UTF-8 regular file of at most ``MAX_TEXT_BYTES``.

        Raises ``FileNotFoundError`` if it does not exist, ``WorkspaceError`` for anything
        else (a link on the way, a FIFO, too large, not UTF-8).
        """
        parts, dir_fd = self._open_parent(rel)
        if dir_fd is None:
            raise FileNotFoundError(errno.ENOENT, "no such file in the workspace", rel)
        try:
            data = _read_regular(dir_fd, parts[-1], single_link=True)
        except _LeftOut as out:
            raise WorkspaceError(f"{rel!r} is {out.reason}; refused") from None
        finally:
            os.close(dir_fd)
        return _decode(data, rel)

    def write(self, rel: str, text: str) -> None:
        """Write ``text`` (UTF-8) to ``rel`` in the copy, making its directories; never through
        a link (``WorkspaceError``). A new file is 0644; a replaced one keeps its mode."""
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise WorkspaceError(f"{rel!r}: the text cannot be written as UTF-8: {exc}") from None
        parts = self._rel_parts(rel)
        root = _open_root(self.path)
        try:
            _put(root, "/".join(parts), data)
        finally:
            os.close(root)

    def delete(self, rel: str) -> None:
        """Delete the regular file ``rel`` from the copy (``FileNotFoundError`` if absent)."""
        parts = self._rel_parts(rel)
        root = _open_root(self.path)
        try:
            if not _remove(root, "/".join(parts)):
                raise FileNotFoundError(errno.ENOENT, "no such file in the workspace", rel)
        finally:
            os.close(root)

    def apply(self, edits: Edits) -> tuple[list[str], list[str]]:
        """Write parsed edits into the copy: returns (paths changed, problems with the rest).

        An edit that cannot be applied is reported, never raised: it is feedback.
        """
        ops: list[tuple[str, Callable[[], object]]] = []
        ops += [(rel, functools.partial(self.write, rel, text)) for rel, text in edits.files.items()]
        ops += [(rel, functools.partial(self._patch, rel, hunks)) for rel, hunks in edits.patches]
        ops += [(rel, functools.partial(self.delete, rel)) for rel in edits.deletes]
        changed, problems = [], list(edits.refused)  # names the parser refused (edits.unsafe_name)
        for rel, op in ops:
            try:
                op()
                changed.append(rel)
            except (PatchError, WorkspaceError, OSError) as exc:
                problems.append(f"{rel}: {exc}")
        return changed, problems

    def _patch(self, rel: str, hunks: list) -> None:
        self.write(rel, apply_hunks(self.read(rel), hunks))

    def change(self) -> "Change":
        """What differs between the original and the copy (each tree read once, bounded).

        Entries that could not be compared as text and differ (a link, a FIFO, a file
        too large or not UTF-8, on either side) are in :attr:`Change.skipped`, never in
        its paths. Raises ``WorkspaceError`` when either walk stopped at its bounds: a
        tree seen only in part would show the unseen files as deleted.
        """
        before, after = self.scan(self.original), self.scan()
        for seen, what in ((before, f"your workspace {self.original}"), (after, f"the task's copy {self.path}")):
            if seen.truncated:
                raise WorkspaceError(f"{what} is too large to review: {seen.truncated} (the bounds are "
                                     f"{MAX_WALK_ENTRIES} entries and {MAX_WALK_DEPTH} nested directories); "
                                     "no change is shown or applied")
        skipped = {}
        for rel in sorted(before.skipped.keys() | after.skipped.keys()):
            old, new = before.fingerprints.get(rel), after.fingerprints.get(rel)
            if old is not None and old == new:
                continue  # the same on both sides (an untouched binary file, an unchanged link)
            skipped[rel] = (f"{after.skipped[rel]} in the task's copy" if rel in after.skipped
                            else f"{before.skipped[rel]} in your workspace")
        return Change(before=before.texts, after=after.texts, skipped=skipped)

    def changed(self) -> list[str]:
        """Files added, modified or deleted relative to the original."""
        return self.change().paths

    def diff(self) -> str:
        """A unified diff from the original to the copy (a/ and b/ prefixes, like git)."""
        return self.change().diff()

    def write_back(self, change: "Change | None" = None) -> tuple[list[str], list[str]]:
        """Write the change into the user's original directory: ``(touched, refused)``.

        ``touched``: the paths written or deleted, sorted. ``refused``: ``"path: why"``
        for each one that was not: every entry of ``change.skipped`` (a link, a FIFO,
        a file too large to review, ... in the copy), and every path whose target in
        the original is a symbolic link, goes through one, or is not a regular file.

        What is written is the text in ``change.after``, the content that was reviewed,
        never a re-read of the copy; each file is written to a new file in the same
        directory and renamed into place (so never through a link), keeping the mode
        of the file it replaces (0644 if new). Only regular files are deleted.
        """
        change = change if change is not None else self.change()
        refused = [f"{rel}: {why}; not applied" for rel, why in change.skipped.items()]
        touched, more = self.write_files({rel: change.after.get(rel) for rel in change.paths})
        return touched, refused + more

    def write_files(self, files: dict[str, str | None]) -> tuple[list[str], list[str]]:
        """Write ``files`` (path -> text, None: delete) into the user's original directory,
        as :meth:`write_back` does: ``(touched, refused)``."""
        touched: list[str] = []
        refused: list[str] = []
        root = _open_root(self.original)
        try:
            order = sorted(rel for rel, text in files.items() if text is None) + \
                sorted(rel for rel, text in files.items() if text is not None)
            for rel in order:
                try:
                    if files[rel] is not None:
                        _put(root, rel, files[rel].encode("utf-8"))
                    elif not _remove(root, rel):
                        continue
                    touched.append(rel)
                except (WorkspaceError, OSError, UnicodeError) as exc:
                    refused.append(f"{rel}: {exc} (in your workspace {self.original}); not applied")
        finally:
            os.close(root)
        return sorted(touched), refused

    def apply_back(self, change: "Change | None" = None) -> list[str]:
        """Write the change into the user's original directory; returns the paths touched.

        Like :meth:`write_back`, whose refusals this logs as a warning; call
        ``write_back`` to get them.
        """
        touched, refused = self.write_back(change)
        if refused:
            log.warning("not applied to %s: %s", self.original, "; ".join(refused))
        return touched
