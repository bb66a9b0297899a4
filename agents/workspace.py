"""A task's private copy of the user's workspace: read, write, diff, apply back.

Every agent of a task (each in its own process) opens the same copy by task id.
The user's directory is never written to unless the change is applied on purpose.
"""

from __future__ import annotations

import difflib
import functools
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .edits import Edits, PatchError, apply_hunks

IGNORED = {".git", "__pycache__", ".pytest_cache", ".venv", "venv", "node_modules", ".mypy_cache",
           ".ruff_cache", ".sandbox-home", ".threadbound"}
MAX_TEXT_BYTES = 200_000


def workspaces_root() -> Path:
    """Where task copies live: ``$THREADBOUND_WORKSPACES`` or the system temp dir."""
    return Path(os.environ.get("THREADBOUND_WORKSPACES") or Path(tempfile.gettempdir()) / "threadbound-workspaces")


def _ignore(_dir: str, names: list[str]) -> set[str]:
    return {n for n in names if n in IGNORED or n.endswith((".pyc", ".egg-info"))}


class WorkspaceError(ValueError):
    pass


class Workspace:
    """The per-task copy of ``original``.

    Examples:
        >>> import tempfile, pathlib
        >>> src = pathlib.Path(tempfile.mkdtemp()); (src / "a.py").write_text("x = 1\\n")
        6
        >>> ws = Workspace.for_task("t-doc", str(src), root=tempfile.mkdtemp())
        >>> ws.write("a.py", "x = 2\\n"); ws.changed()
        ['a.py']
    """

    def __init__(self, original: Path, path: Path) -> None:
        self.original = original
        self.path = path

    @classmethod
    def for_task(cls, task_id: str, original: str, root: str | os.PathLike | None = None) -> "Workspace":
        """Open the task's copy, making it on first use (atomically: copy, then rename)."""
        src = Path(original).resolve()
        if not src.is_dir():
            raise WorkspaceError(f"workspace {original!r} does not exist or is not a directory")
        base = Path(root) if root is not None else workspaces_root()
        dest = base / task_id.replace("/", "_")
        if not dest.exists():
            base.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=base))
            shutil.copytree(src, tmp / "w", ignore=_ignore)
            try:
                os.rename(tmp / "w", dest)
            except OSError:  # someone else made it first
                pass
            shutil.rmtree(tmp, ignore_errors=True)
        return cls(src, dest)

    def resolve(self, rel: str) -> Path:
        """The absolute path of ``rel`` inside the copy; refuses paths that leave it."""
        rel = rel.strip().strip("`'\"")
        if rel.startswith(("a/", "b/")) and not (self.path / rel).exists() and (self.path / rel[2:]).parent.exists():
            rel = rel[2:]
        p = (self.path / rel).resolve()
        if os.path.isabs(rel) or not p.is_relative_to(self.path.resolve()):
            raise WorkspaceError(f"path {rel!r} leaves the workspace")
        return p

    def texts(self, base: Path | None = None) -> dict[str, str]:
        """The text files of the copy (or of ``base``): relative path -> content, by path."""
        root = base or self.path
        out: dict[str, str] = {}
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d not in IGNORED and not d.endswith(".egg-info"))
            for name in filenames:
                p = Path(dirpath) / name
                if name.endswith(".pyc") or p.stat().st_size > MAX_TEXT_BYTES:
                    continue
                try:
                    out[str(p.relative_to(root))] = p.read_bytes().decode("utf-8")
                except (UnicodeDecodeError, OSError):
                    continue
        return dict(sorted(out.items()))

    def files(self, base: Path | None = None) -> list[str]:
        """Relative paths of the text files in the copy (or in ``base``), sorted."""
        return list(self.texts(base))

    def read(self, rel: str) -> str:
        return self.resolve(rel).read_text()

    def write(self, rel: str, text: str) -> None:
        p = self.resolve(rel)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)

    def apply(self, edits: Edits) -> tuple[list[str], list[str]]:
        """Write parsed edits into the copy: returns (paths changed, problems with the rest).

        An edit that cannot be applied is reported, never raised: it is feedback.
        """
        ops: list[tuple[str, Callable[[], object]]] = []
        ops += [(rel, functools.partial(self.write, rel, text)) for rel, text in edits.files.items()]
        ops += [(rel, functools.partial(self._patch, rel, hunks)) for rel, hunks in edits.patches]
        ops += [(rel, lambda rel=rel: self.resolve(rel).unlink()) for rel in edits.deletes]
        changed, problems = [], []
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
        """What differs between the original and the copy (each tree read once)."""
        return Change(before=self.texts(self.original), after=self.texts())

    def changed(self) -> list[str]:
        """Files added, modified or deleted relative to the original."""
        return self.change().paths

    def diff(self) -> str:
        """A unified diff from the original to the copy (a/ and b/ prefixes, like git)."""
        return self.change().diff()

    def apply_back(self, change: "Change | None" = None) -> list[str]:
        """Write the change into the user's original directory; returns the paths touched."""
        touched = (change or self.change()).paths
        for rel in touched:
            src, dst = self.path / rel, self.original / rel
            if src.exists():
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dst)
            elif dst.exists():
                dst.unlink()
        return touched


@dataclass(frozen=True)
class Change:
    """The text files of the original (``before``) and of the copy (``after``)."""

    before: dict[str, str]
    after: dict[str, str]

    @property
    def paths(self) -> list[str]:
        """Files added, modified or deleted."""
        return sorted(rel for rel in self.before.keys() | self.after.keys()
                      if self.before.get(rel) != self.after.get(rel))

    def diff(self) -> str:
        chunks: list[str] = []
        for rel in self.paths:
            old, new = self.before.get(rel), self.after.get(rel)
            chunks.extend(difflib.unified_diff(
                (old or "").splitlines(keepends=True), (new or "").splitlines(keepends=True),
                f"a/{rel}" if old is not None else "/dev/null", f"b/{rel}" if new is not None else "/dev/null"))
        return "".join(line if line.endswith("\n") else line + "\n\\ No newline at end of file\n"
                       for line in chunks)
