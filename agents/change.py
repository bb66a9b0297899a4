"""What differs between a workspace and its copy, as text, and its unified diff."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Change:
    """The text files of the original (``before``) and of the copy (``after``).

    ``skipped``: relative path -> why an entry that differs between the two could not
    be shown as text (a symbolic link, a FIFO, a file too large or not UTF-8, ...).
    Such a path is not in :attr:`paths`, not in the diff, and never applied back.
    """

    before: dict[str, str]
    after: dict[str, str]
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def paths(self) -> list[str]:
        """Files added, modified or deleted (as text)."""
        return sorted(rel for rel in self.before.keys() | self.after.keys()
                      if self.before.get(rel) != self.after.get(rel) and rel not in self.skipped)

    def diff(self) -> str:
        chunks: list[str] = []
        for rel in self.paths:
            old, new = self.before.get(rel), self.after.get(rel)
            chunks.extend(difflib.unified_diff(
                (old or "").splitlines(keepends=True), (new or "").splitlines(keepends=True),
                f"a/{rel}" if old is not None else "/dev/null", f"b/{rel}" if new is not None else "/dev/null"))
        return "".join(line if line.endswith("\n") else line + "\n\\ No newline at end of file\n"
                       for line in chunks)
