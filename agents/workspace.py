"""A task's private copy of the user's workspace: read, write, diff, apply back.

Every agent of a task (each in its own process) opens the same copy by task id.
The user's directory is never written to unless the change is applied on purpose.
"""

from __future__ import annotations

import difflib
import os
import shutil
import tempfile
from pathlib import Path

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

    def files(self, base: Path | None = None) -> list[str]:
        """Relative paths of the text files in the copy (or in ``base``), sorted."""
        root = base or self.path
        out = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d not in IGNORED and not d.endswith(".egg-info"))
            for name in filenames:
                p = Path(dirpath) / name
                if name.endswith(".pyc") or p.stat().st_size > MAX_TEXT_BYTES:
                    continue
                try:
                    p.read_text()
                except (UnicodeDecodeError, OSError):
                    continue
                out.append(str(p.relative_to(root)))
        return sorted(out)

    def read(self, rel: str) -> str:
        return self.resolve(rel).read_text()

    def write(self, rel: str, text: str) -> None:
        p = self.resolve(rel)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)

    def changed(self) -> list[str]:
        """Files added, modified or deleted relative to the original."""
        now, before = set(self.files()), set(self.files(self.original))
        out = []
        for rel in sorted(now | before):
            a, b = self.original / rel, self.path / rel
            if not a.exists() or not b.exists() or a.read_bytes() != b.read_bytes():
                out.append(rel)
        return out

    def diff(self) -> str:
        """A unified diff from the original to the copy (a/ and b/ prefixes, like git)."""
        chunks = []
        for rel in self.changed():
            a, b = self.original / rel, self.path / rel
            old = a.read_text().splitlines(keepends=True) if a.exists() else []
            new = b.read_text().splitlines(keepends=True) if b.exists() else []
            chunks.extend(difflib.unified_diff(old, new, f"a/{rel}" if a.exists() else "/dev/null",
                                               f"b/{rel}" if b.exists() else "/dev/null"))
        return "".join(line if line.endswith("\n") else line + "\n\\ No newline at end of file\n"
                       for line in chunks)

    def apply_back(self) -> list[str]:
        """Write the change into the user's original directory; returns the paths touched."""
        touched = self.changed()
        for rel in touched:
            src, dst = self.path / rel, self.original / rel
            if src.exists():
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dst)
            elif dst.exists():
                dst.unlink()
        return touched
