"""One bounded walk of a tree that may be hostile (:class:`Scan`): only regular files read,
never through a link, within ``MAX_WALK_ENTRIES`` entries, ``MAX_WALK_DEPTH`` nested
directories and ``MAX_TOTAL_TEXT_BYTES``, saying what it left out. Built on the reads of
:mod:`threadbound.agents.hostile_fs`."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from .hostile_fs import (
    _DIR_FLAGS, MAX_TEXT_BYTES, MAX_TOTAL_TEXT_BYTES, MAX_WALK_DEPTH, MAX_WALK_ENTRIES, _excluded, _is_ignored, _LeftOut,
    _open_root, _read_regular,
)


@dataclass(frozen=True)
class Scan:
    """One bounded walk of a tree.

    ``texts``: relative path -> content of each UTF-8 regular file that was read.
    ``skipped``: relative path -> why an entry is not in ``texts`` (a symbolic link, a
    FIFO, larger than ``MAX_TEXT_BYTES``, past the tree's byte budget, not UTF-8, ...).
    ``truncated``: why the walk stopped early (``MAX_WALK_ENTRIES`` or
    ``MAX_WALK_DEPTH`` reached), or None when it saw the whole tree.
    """

    texts: dict[str, str]
    skipped: dict[str, str] = field(default_factory=dict)
    truncated: str | None = None
    fingerprints: dict[str, tuple] = field(default_factory=dict, repr=False, compare=False)


class _Walk:
    def __init__(self, hostile: bool, exclude: frozenset[str] = frozenset()) -> None:
        self.hostile = hostile
        self.exclude = exclude  # real paths never entered or read (the state directory, ...)
        self.root = ""
        self.texts: dict[str, str] = {}
        self.skipped: dict[str, str] = {}
        self.fingerprints: dict[str, tuple] = {}
        self.entries = self.bytes = 0
        self.truncated: str | None = None

    def scan(self, root: Path) -> Scan:
        self.root = os.path.realpath(root)
        fd = _open_root(root)
        try:
            self.walk(fd, "", 0)
        finally:
            os.close(fd)
        return Scan(dict(sorted(self.texts.items())), dict(sorted(self.skipped.items())), self.truncated,
                    self.fingerprints)

    def leave(self, rel: str, reason: str, fingerprint: tuple) -> None:
        self.skipped[rel], self.fingerprints[rel] = reason, fingerprint

    def walk(self, dir_fd: int, prefix: str, level: int) -> None:
        found = []
        with os.scandir(dir_fd) as it:
            for entry in it:
                self.entries += 1
                if self.entries > MAX_WALK_ENTRIES:
                    self.truncated = f"more than {MAX_WALK_ENTRIES} entries"
                    return
                if not _is_ignored(entry.name) and not _excluded(os.path.join(self.root, prefix + entry.name),
                                                                   self.exclude):
                    found.append(entry)
        for entry in sorted(found, key=lambda e: e.name):
            if self.truncated:
                return
            rel = prefix + entry.name
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:  # gone since the listing
                continue
            if stat.S_ISDIR(st.st_mode):
                if level + 1 > MAX_WALK_DEPTH:
                    self.truncated = f"more than {MAX_WALK_DEPTH} nested directories (at {rel!r})"
                    return
                try:
                    sub = os.open(entry.name, _DIR_FLAGS, dir_fd=dir_fd)
                except OSError as exc:
                    self.leave(rel, f"a directory that cannot be opened ({exc.strerror})", ("unopenable", exc.errno))
                    continue
                try:
                    self.walk(sub, rel + "/", level + 1)
                finally:
                    os.close(sub)
            else:
                self.file(dir_fd, entry.name, rel, st)

    def file(self, dir_fd: int, name: str, rel: str, st: os.stat_result) -> None:
        fingerprint = ("file", st.st_size, st.st_mtime_ns)
        if stat.S_ISREG(st.st_mode) and self.bytes + min(st.st_size, MAX_TEXT_BYTES + 1) > MAX_TOTAL_TEXT_BYTES:
            return self.leave(rel, f"past the {MAX_TOTAL_TEXT_BYTES}-byte budget of one walk", fingerprint)
        try:
            data = _read_regular(dir_fd, name, st, single_link=self.hostile)
        except _LeftOut as out:
            return self.leave(rel, out.reason, out.fingerprint)
        except OSError as exc:
            return self.leave(rel, f"unreadable ({exc.strerror})", ("unreadable", exc.errno))
        self.bytes += len(data)
        try:
            self.texts[rel] = data.decode("utf-8")
        except UnicodeDecodeError:
            return self.leave(rel, "not UTF-8 text", fingerprint)
        self.fingerprints[rel] = fingerprint
