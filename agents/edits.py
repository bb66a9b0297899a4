"""Turn a model's reply into file edits: whole-file blocks and unified diffs.

Accepted forms:

* a fenced block whose info string is a language and a path: ```` ```python src/fizz.py ````
* a fenced block whose info string is just a path: ```` ```src/fizz.py ````
* a path alone on the line before a fence (``src/fizz.py``, `` `src/fizz.py` ``,
  ``**src/fizz.py**``, ``File: src/fizz.py``, ``# src/fizz.py``)
* unified diffs (``--- a/x`` / ``+++ b/x`` / ``@@`` hunks), fenced as ``diff`` or bare.

A file name with a control character (an escape sequence among them) or invisible
Unicode (bidi controls, zero-width characters) is refused, as one that leaves the
workspace is: such a name would be written into the workspace with ``--apply`` and
rewrite the terminal, or read as another name, wherever it is shown. A refused edit is
reported in :attr:`Edits.refused` (the coder's feedback), never applied.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field

_FENCE = re.compile(r"^(`{3,}|~{3,})[ \t]*([^\n`]*)\n(.*?)^\1[ \t]*$", re.S | re.M)
_PATHLIKE = re.compile(r"^[\w.\-/]+\.[A-Za-z0-9]+$|^[\w.\-]+/[\w.\-/]+$")
_LABEL = re.compile(r"^\s*(?:#+\s*|\*\*|`|(?:file|path|filename)\s*:\s*)*([\w./\-]+?)[`*:]*\s*$", re.I)
_HUNK = re.compile(r"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@")


@dataclass
class Edits:
    files: dict[str, str] = field(default_factory=dict)  # path -> whole new text
    patches: list[tuple[str, list[tuple[int, list[str]]]]] = field(default_factory=list)  # path, hunks
    deletes: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)  # why an edit was not taken (its name, shown safely)

    def __bool__(self) -> bool:
        return bool(self.files or self.patches or self.deletes or self.refused)


# Control characters (C0, DEL, C1), format characters (bidi controls, zero-width ones),
# line/paragraph separators and lone surrogates.
_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})


def unsafe_name(path: str) -> str | None:
    r"""Why ``path`` cannot name a file the coder writes, or None when it can.

    Examples:
        >>> unsafe_name("src/fizz.py") is None
        True
        >>> print(unsafe_name("evil" + chr(27) + "[2K.py"))
        'evil\x1b[2K.py': refused: its name has a control character (U+001B); name files with printable characters
    """
    for ch in path:
        category = unicodedata.category(ch)
        if category in _UNSAFE_CATEGORIES:
            what = ("a control character" if category == "Cc" else
                    "an invisible Unicode character (a bidi control, zero-width or separator)")
            return f"{path!r}: refused: its name has {what} (U+{ord(ch):04X}); name files with printable characters"
    return None


def _take(path: str, edits: Edits) -> bool:
    """True if ``path`` may be edited; otherwise records why not in ``edits.refused``."""
    why = unsafe_name(path)
    if why is not None:
        edits.refused.append(why)
    return why is None


def _looks_like_path(s: str) -> bool:
    return bool(s) and " " not in s and bool(_PATHLIKE.match(s)) and not s.startswith(("http", "-"))


def parse(reply: str) -> Edits:
    """Find every edit in ``reply``."""
    edits = Edits()
    for m in _FENCE.finditer(reply):
        info, body = m.group(2).strip(), m.group(3)
        words = info.split()
        if (words and words[0].lower() in ("diff", "patch", "udiff")) or body.lstrip().startswith("--- "):
            _parse_diff(body, edits)
            continue
        path = next((w for w in reversed(words) if _looks_like_path(w)), None)
        if path is None:  # the path alone on the line before the fence
            before = reply[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
            label = _LABEL.match(before)
            if label and _looks_like_path(label.group(1)):
                path = label.group(1)
        if path and _take(path, edits):
            edits.files[path] = body
    if not edits:  # a bare diff with no fences
        _parse_diff(reply, edits)
    return edits


def _lines(text: str) -> list[str]:
    """``text``'s lines split at newlines only (and CRLF), not at the other characters
    ``str.splitlines`` breaks at (CR alone, form feed, U+2028...): those stay in the line,
    so a file name that carries one is seen whole and refused."""
    lines = [line[:-1] if line.endswith("\r") else line for line in text.split("\n")]
    return lines[:-1] if lines and lines[-1] == "" else lines


def _parse_diff(text: str, edits: Edits) -> None:
    lines = _lines(text)
    i = 0
    while i < len(lines):
        if lines[i].startswith("--- ") and i + 1 < len(lines) and lines[i + 1].startswith("+++ "):
            old = lines[i][4:].split("\t")[0].strip()
            new = lines[i + 1][4:].split("\t")[0].strip()
            i += 2
            hunks: list[tuple[int, list[str]]] = []
            while i < len(lines) and not lines[i].startswith("--- "):
                m = _HUNK.match(lines[i])
                if m:
                    start, body = int(m.group(1)), []
                    i += 1
                    while i < len(lines) and not lines[i].startswith(("@@", "--- ")):
                        if lines[i][:1] in (" ", "+", "-") or lines[i] == "":
                            body.append(lines[i] if lines[i] else " ")
                        i += 1
                    hunks.append((start, body))
                else:
                    i += 1
            target = new[2:] if new.startswith("b/") else new
            if new == "/dev/null":
                gone = old[2:] if old.startswith("a/") else old
                if _take(gone, edits):
                    edits.deletes.append(gone)
            elif not _take(target, edits):
                pass
            elif old == "/dev/null":
                edits.files[target] = "".join(l[1:] + "\n" for h in hunks for l in h[1] if l.startswith("+"))
            else:
                edits.patches.append((target, hunks))
        else:
            i += 1


class PatchError(ValueError):
    pass


def apply_hunks(text: str, hunks: list[tuple[int, list[str]]]) -> str:
    """Apply unified-diff hunks, tolerating shifted line numbers (context is searched)."""
    lines = text.splitlines()
    offset = 0
    for start, body in hunks:
        old = [l[1:] for l in body if l[:1] in (" ", "-")]
        new = [l[1:] for l in body if l[:1] in (" ", "+")]
        guess = max(0, start - 1 + offset)
        pos = _find(lines, old, guess)
        if pos is None:
            raise PatchError(f"hunk at line {start} does not match the file: "
                             + " / ".join(old[:3])[:200])
        lines[pos:pos + len(old)] = new
        offset += len(new) - len(old)
    return "\n".join(lines) + ("\n" if lines else "")


def _find(lines: list[str], needle: list[str], guess: int) -> int | None:
    if not needle:
        return min(guess, len(lines))
    n = len(needle)
    order = sorted(range(0, len(lines) - n + 1), key=lambda p: abs(p - guess))
    for strip in (False, True):
        for p in order:
            window = lines[p:p + n]
            if (window == needle) or (strip and [w.rstrip() for w in window] == [x.rstrip() for x in needle]):
                return p
    return None
