"""The tools of the tool-using coder, run on a task's copy: list, search, read a range,
replace a span, create a file, run a command or the tests in the sandbox, finish.

The copy is hostile (see :mod:`threadbound.agents.workspace`), and so is every argument:
the model chose it. So:

* Every path goes through the workspace's checks: one that leaves the copy (absolute,
  ``..`` past its top) or goes through or ends at a symbolic link is refused, and the
  refusal is counted (:attr:`ToolStats.refused_paths`). Files are read and written
  through :class:`~threadbound.agents.workspace.Workspace` only: regular files, never a
  link followed, at most ``MAX_TEXT_BYTES`` read.
* Every result is bounded (``MAX_RESULT_CHARS``: head and tail kept, the middle elided
  and said so, as mini-swe-agent does); a bounded result is counted
  (:attr:`ToolStats.bounded`).
* Commands and the tests run in the sandbox (``sandbox.run``), never on the host: a
  command in the copy itself (so it may edit it, as a shell agent does), the tests in a
  throwaway copy of it (:meth:`Workspace.trial`), as the tester runs them.
* Arguments are checked against each tool's JSON schema; a call that does not fit (bad
  JSON, an unknown tool, a missing or extra field, a wrong type) is a :class:`ToolResult`
  with ``ok=False`` telling the model what to fix, never an exception.

Where the issue that asked for these is silent they do what SWE-agent's ``str_replace``
editor and mini-swe-agent's bash tool do: an edit replaces an exact span that must occur
exactly once; a file is created only where none exists; output is cut in the middle.

The tools' schemas, the checking of a call's arguments and the result types are in
:mod:`threadbound.agents.tool_calls`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import unicodedata
from typing import Any, Callable

from . import sandbox
from .edits import unsafe_name
from .tool_calls import (
    MAX_LINE_CHARS, MAX_LIST_ENTRIES, MAX_MATCHES, MAX_PATTERN_CHARS, MAX_READ_LINES, MAX_RESULT_CHARS, ToolCallError,
    ToolResult, ToolStats, bound, parse_arguments,
)
from .workspace import MAX_TEXT_BYTES, Workspace, WorkspaceError

REGEX_SECONDS = 10.0  # one regular-expression search, in a child process killed past it
MAX_REGEX_MB = 1024  # that child's address space

# A regular expression runs in a child process: Python's ``re`` can backtrack for ever on
# ``(a+)+$`` and no call interrupts it, so the child is killed past REGEX_SECONDS.
_REGEX_CHILD = r"""
import json, re, sys
job = json.load(sys.stdin)
try:
    rx = re.compile(job["pattern"])
except (re.error, ValueError, RecursionError, OverflowError) as exc:
    print(json.dumps({"error": str(exc)})); sys.exit()
hits, more = [], 0
for rel, text in job["texts"]:
    for n, line in enumerate(text.splitlines(), 1):
        if rx.search(line[:10_000]):
            if len(hits) < job["max"]:
                hits.append([rel, n])
            else:
                more += 1
print(json.dumps({"hits": hits, "more": more}))
"""


def _numbered(lines: list[str], first: int) -> str:
    width = len(str(first + len(lines)))
    return "".join(f"{n:>{width}}  {line}" for n, line in enumerate(lines, first))


def _shown(text: str) -> str:
    """One line of the model's or the copy's text as a listing shows it: no control characters."""
    text = "".join(c if c == "\t" or unicodedata.category(c)[0] != "C" else "?" for c in text)
    return text if len(text) <= MAX_LINE_CHARS else text[:MAX_LINE_CHARS] + "..."


class Toolbox:
    """The tools on one task's copy. ``run`` and ``run_tests`` go through ``runner``
    (``sandbox.run``'s signature: command, cwd, limits, settings, env)."""

    def __init__(self, ws: Workspace, *, test_command: list[str], test_env: dict[str, str] | None = None,
                 limits: sandbox.SandboxLimits | None = None, settings: sandbox.SandboxSettings | None = None,
                 runner: Callable[..., sandbox.SandboxResult] = sandbox.run) -> None:
        self.ws = ws
        self.test_command, self.test_env = list(test_command), test_env
        self.limits = limits or sandbox.SandboxLimits(wall_s=120.0)
        self.settings = settings
        self.runner = runner
        self.stats = ToolStats()

    def call(self, name: str, arguments: str) -> ToolResult:
        """Run one call; every problem with it is a tool error (``ok=False``), counted."""
        try:
            args = parse_arguments(name, arguments)
            result = getattr(self, "_" + name)(**args)
        except ToolCallError as exc:
            result = ToolResult(False, f"error: {exc}", refused_path=exc.refused_path, bounded=exc.bounded)
        except FileNotFoundError as exc:
            result = ToolResult(False, f"error: {exc.filename!r} does not exist in the repository")
        except (WorkspaceError, OSError, UnicodeError) as exc:
            result = ToolResult(False, f"error: {exc}")
        except sandbox.SandboxUnavailable as exc:
            result = ToolResult(False, f"error: commands cannot run here: {exc}")
        if not result.bounded:
            result.output, result.bounded = bound(result.output)
        self.stats.count(name, result)
        return result

    # -- paths ---------------------------------------------------------------------------

    def _path(self, rel: str, *, directory: bool = False) -> str:
        """``rel`` checked: inside the copy, through no link; refusals are counted."""
        if not rel.strip() or rel.strip() in (".", "./"):
            if directory:
                return ""
            raise ToolCallError("give the path of a file, e.g. src/app.py")
        why = unsafe_name(rel)  # the edit parser's rule: no control or invisible character in a name
        if why is not None:
            raise ToolCallError(why, refused_path=True)
        try:
            full = self.ws.resolve(rel)  # refuses leaving the copy, and a link on the way or at the end
        except WorkspaceError as exc:
            raise ToolCallError(f"{exc} (only paths inside the repository, through no symbolic link, "
                                "can be used)", refused_path=True) from None
        return full.relative_to(self.ws.path).as_posix()

    # -- the tools -----------------------------------------------------------------------

    def _list_files(self, path: str = "") -> ToolResult:
        top = self._path(path, directory=True)
        scan = self.ws.scan()
        prefix = top + "/" if top else ""
        entries = [(rel, None) for rel in scan.texts if rel.startswith(prefix)]
        entries += [(rel, why) for rel, why in scan.skipped.items() if rel.startswith(prefix)]
        if not entries and top:
            if top in scan.texts:
                return ToolResult(True, f"{top} is a file ({len(scan.texts[top].splitlines())} lines)")
            raise ToolCallError(f"{top!r} is not a directory of the repository")
        entries.sort()
        lines = [_shown(rel) + (f"  ({why}: not readable)" if why else "") for rel, why in entries[:MAX_LIST_ENTRIES]]
        bounded = len(entries) > MAX_LIST_ENTRIES or bool(scan.truncated)
        if len(entries) > MAX_LIST_ENTRIES:
            lines.append(f"... and {len(entries) - MAX_LIST_ENTRIES} more (list a subdirectory)")
        if scan.truncated:
            lines.append(f"(the walk stopped early: {scan.truncated})")
        return ToolResult(True, "\n".join(lines) or "(no files)", bounded=bounded)

    def _search(self, pattern: str, path: str = "", regex: bool = False) -> ToolResult:
        if not pattern or len(pattern) > MAX_PATTERN_CHARS:
            raise ToolCallError(f"pattern must be 1 to {MAX_PATTERN_CHARS} characters")
        top = self._path(path, directory=True)
        texts = {rel: text for rel, text in self.ws.scan().texts.items()
                 if not top or rel == top or rel.startswith(top + "/")}
        matches, more = [], 0
        if regex:
            hits, more = _regex_hits(pattern, texts)
            lines = {rel: texts[rel].splitlines() for rel, _ in hits}
            matches = [f"{_shown(rel)}:{n}: {_shown(lines[rel][n - 1].strip())}" for rel, n in hits]
        else:
            for rel, text in texts.items():
                for n, line in enumerate(text.splitlines(), 1):
                    if pattern in line[:10_000]:
                        if len(matches) < MAX_MATCHES:
                            matches.append(f"{_shown(rel)}:{n}: {_shown(line.strip())}")
                        else:
                            more += 1
        if more:
            matches.append(f"... {more} more matches (narrow the pattern or the path)")
        return ToolResult(True, "\n".join(matches) or f"no match for {pattern!r}", bounded=bool(more))

    def _read(self, rel: str) -> str:
        try:
            return self.ws.read(rel)
        except WorkspaceError as exc:
            refused = "symbolic link" in str(exc) or "leaves the workspace" in str(exc)
            too_large = "larger than" in str(exc)  # read no further than MAX_TEXT_BYTES
            raise ToolCallError(str(exc) + ("; search it, or run a command that prints a part of it"
                                            if too_large else ""), refused_path=refused, bounded=too_large) from None

    def _read_file(self, path: str, start_line: int = 1, end_line: int | None = None) -> ToolResult:
        rel = self._path(path)
        lines = self._read(rel).splitlines(keepends=True)
        total = len(lines)
        if start_line < 1 or (end_line is not None and end_line < start_line):
            raise ToolCallError(f"lines go from 1 to {total}; start_line must be >= 1 and end_line >= start_line")
        if total and start_line > total:
            raise ToolCallError(f"{rel} has {total} lines; start_line {start_line} is past its end")
        last = min(total, end_line or total, start_line + MAX_READ_LINES - 1)
        shown = _numbered(lines[start_line - 1:last], start_line)
        cut = last < min(total, end_line or total)
        note = (f"\n(lines {start_line}-{last} of {total} shown; read on with start_line={last + 1})" if cut
                else f"\n({total} lines)" if start_line == 1 and last == total else "")
        text, bounded = bound(shown + note)
        return ToolResult(True, text or "(empty file)", bounded=bounded or cut)

    def _replace(self, path: str, old_text: str, new_text: str) -> ToolResult:
        rel = self._path(path)
        text = self._read(rel)
        if not old_text:
            raise ToolCallError("old_text is empty; give the exact text to replace")
        count = text.count(old_text)
        if count == 0:
            raise ToolCallError(f"no replacement made: old_text does not occur in {rel} as given (whitespace "
                                "and indentation count); read the file and copy the span exactly")
        if count > 1:
            at = [text[:i].count("\n") + 1 for i in _finds(text, old_text)][:10]
            raise ToolCallError(f"no replacement made: old_text occurs {count} times in {rel} (at lines "
                                f"{', '.join(map(str, at))}); include more surrounding lines to make it unique")
        start = text.index(old_text)
        _fits(rel, text[:start] + new_text + text[start + len(old_text):])
        self.ws.write(rel, text[:start] + new_text + text[start + len(old_text):])
        first = text[:start].count("\n") + 1
        after = (text[:start] + new_text).splitlines(keepends=True)
        lo = max(0, first - 4)
        snippet = _numbered(after[lo:first + new_text.count("\n") + 3], lo + 1)
        return ToolResult(True, f"replaced lines {first}-{first + old_text.count(chr(10))} of {rel}; "
                                f"now:\n{snippet}")

    def _create_file(self, path: str, content: str) -> ToolResult:
        rel = self._path(path)
        try:
            self.ws.read(rel)
            exists = True
        except FileNotFoundError:
            exists = False
        except WorkspaceError:
            exists = True  # something is there that is not a readable text file
        if exists:
            raise ToolCallError(f"{rel} exists; change it with replace (create_file never overwrites)")
        _fits(rel, content)
        self.ws.write(rel, content)
        return ToolResult(True, f"created {rel} ({len(content.splitlines())} lines)")

    def _sandboxed(self, command: list[str], cwd: str, env: dict[str, str] | None) -> sandbox.SandboxResult:
        self.stats.sandbox_runs += 1
        return self.runner(command, cwd=cwd, limits=self.limits, settings=self.settings, env=env,
                           max_output=MAX_RESULT_CHARS * 4)

    @staticmethod
    def _facts(res: sandbox.SandboxResult) -> dict[str, Any]:
        return {"isolation": res.isolation, "exit_code": res.exit_code, "killed": res.killed,
                "elapsed_s": round(res.elapsed_s, 3)}

    def _run(self, command: str) -> ToolResult:
        if not command.strip():
            raise ToolCallError("command is empty")
        res = self._sandboxed(["/bin/sh", "-c", command], str(self.ws.path), None)
        head = f"exit code {res.exit_code}" + (f" (killed: {res.killed})" if res.killed else "")
        text, bounded = bound(f"{head}\n{res.output}")
        return ToolResult(True, text, bounded=bounded, sandbox=self._facts(res))

    def _run_tests(self) -> ToolResult:
        from .builtin import cannot_start, parse_pytest  # the tester's reading of a test run

        self.stats.test_runs += 1
        with self.ws.trial() as trial:
            res = self._sandboxed(self.test_command, str(trial), self.test_env)
        cannot = cannot_start(self.test_command, res.exit_code, res.output)
        if cannot:
            return ToolResult(False, f"error: the test command cannot start: {cannot}", sandbox=self._facts(res))
        counts = parse_pytest(res.output)
        ok = res.exit_code == 0 and res.killed is None
        head = (("tests passed" if ok else "tests FAILED") + f": {counts['passed']} passed, {counts['failed']} "
                f"failed, {counts['errors']} errors, exit code {res.exit_code}"
                + (f" (killed: {res.killed})" if res.killed else ""))
        tail, bounded = bound(res.output, MAX_RESULT_CHARS - 200)
        return ToolResult(True, f"{head}\n{tail}", bounded=bounded, sandbox={**self._facts(res), "ok": ok, **counts})

    def _finish(self, summary: str) -> ToolResult:
        return ToolResult(True, "finished", finished=True)


def _fits(rel: str, text: str) -> None:
    """Refuse writing a file the tools could not read back (and a disk filled by the model's
    arguments: the sandbox's disk limit does not see what the tools write)."""
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_TEXT_BYTES:
        raise ToolCallError(f"no change made: {rel} would be {size} bytes, over the {MAX_TEXT_BYTES}-byte "
                            "bound of a file the tools read and review; write less", bounded=True)


def _regex_hits(pattern: str, texts: dict[str, str]) -> tuple[list[tuple[str, int]], int]:
    """(path, line) of the first MAX_MATCHES lines ``pattern`` matches, and how many more,
    from a child process that is killed past REGEX_SECONDS (a ToolCallError then)."""
    job = json.dumps({"pattern": pattern, "texts": list(texts.items()), "max": MAX_MATCHES})
    proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", _REGEX_CHILD], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        limit = MAX_REGEX_MB * 1024 * 1024
        import resource

        resource.prlimit(proc.pid, resource.RLIMIT_AS, (limit, limit))
    except (ImportError, AttributeError, OSError, ValueError):
        pass
    try:
        out, _ = proc.communicate(job, timeout=REGEX_SECONDS)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise ToolCallError(f"the regular expression {pattern[:100]!r} ran past {REGEX_SECONDS:.0f} s and was "
                            "stopped (it backtracks too much); search for a plain string, or a simpler "
                            "pattern", bounded=True) from None
    try:
        answer = json.loads(out)
    except ValueError:
        raise ToolCallError(f"the regular expression {pattern[:100]!r} could not be run (its search process "
                            f"ended with code {proc.returncode}); search for a plain string") from None
    if "error" in answer:
        raise ToolCallError(f"pattern is not a valid regular expression: {answer['error'][:200]}")
    return [(rel, n) for rel, n in answer["hits"]], answer["more"]


def _finds(text: str, needle: str):
    at = text.find(needle)
    while at != -1:
        yield at
        at = text.find(needle, at + 1)
