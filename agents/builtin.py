"""The built-in roles: a tester that runs the workspace's tests in the sandbox, a reviewer
that checks the change and approves it or sends it back, and the whole-file coder
(``coder-wholefile``) that puts the workspace into one prompt and takes whole files back.
The ``coder`` role is the tool-using coder, :mod:`threadbound.agents.tool_coder`.

Every round: the coder, then the tester and the reviewer at the same time. The tester
runs the tests on a throwaway copy of the coder's change (so nothing the tests write
can reach what the reviewer reads or what is applied); the reviewer reviews the change
itself. The task succeeds at the end of a round in which the tests pass and the
reviewer approves (neither asked for another round); with ``inputs.apply`` the runtime
then writes back the change the reviewer approved (its output's ``apply`` map). Task
inputs they read: ``test_command`` (list of strings, default pytest), ``apply``,
``sandbox`` (limits: wall_s, cpu_s, memory_mb, max_procs).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from typing import Any, Generator

from . import events as ev
from . import sandbox
from .base import Agent, StepContext
from .edits import parse
from .errors import AgentError, TaskInputError
from .workspace import Workspace, WorkspaceError, workspaces_root

MAX_CONTEXT_CHARS = 24_000
_SUMMARY = re.compile(r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed)")


def workspace_of(ctx: StepContext) -> Workspace:
    if not ctx.workspace:
        raise TaskInputError(f"the {ctx.role} needs a workspace; submit the task with workspace=<directory>",
                             task_id=ctx.task_id, agent=ctx.role)
    if not os.path.isdir(ctx.workspace):
        raise TaskInputError(f"workspace {ctx.workspace!r} does not exist or is not a directory",
                             task_id=ctx.task_id, agent=ctx.role)
    try:
        # the pool's snapshot store and key file (what its sandbox hides) stay out of the copy too
        return Workspace.for_task(ctx.task_id, ctx.workspace,
                                  protect=ctx.sandbox.hide if ctx.sandbox is not None else ())
    except WorkspaceError as exc:
        raise AgentError(str(exc), task_id=ctx.task_id, agent=ctx.role) from None


def _files_block(ws: Workspace) -> str:
    parts, used = [], 0
    for rel, text in ws.texts().items():
        if used + len(text) > MAX_CONTEXT_CHARS:
            parts.append(f"({rel} omitted: context budget)")
            continue
        used += len(text)
        lang = "python" if rel.endswith(".py") else ""
        parts.append(f"```{lang} {rel}\n{text}```")
    return "\n\n".join(parts)


class WholeFileCoder(Agent):
    """The ``coder-wholefile`` role: asks the model, once per round, for changes to the
    workspace given whole in the prompt (up to ``MAX_CONTEXT_CHARS``; the rest is left out
    with "omitted: context budget"), and writes the whole files or diffs of its answer into
    the task's copy. For small workspaces and models without tool calling; the ``coder``
    role works on repositories of any size."""

    def step(self, ctx: StepContext) -> Generator[str, None, Any]:
        ws = workspace_of(ctx)
        prompt = (
            f"Goal: {ctx.goal}\n\nThe workspace files:\n\n{_files_block(ws)}\n\n"
            + (("Feedback from the last round:\n" + "\n".join(ctx.feedback) + "\n\n") if ctx.feedback else "")
            + "Reply with every file you change as a whole file in a fenced block whose info "
              "string is the language and the path, for example:\n```python src/module.py\n...\n```\n"
              "Unified diffs are accepted too. Do not change the tests unless the goal says so."
        )
        reply = yield from ctx.ask([
            {"role": "system", "content": "You are a careful software engineer. You fix code so its tests pass."},
            {"role": "user", "content": prompt},
        ])
        edits = parse(reply)
        changed, problems = ws.apply(edits)
        if not edits:
            problems.append("the reply contained no file block or diff that could be applied")
        if problems:
            ctx.emit("edit_problems", {"problems": problems})
        return {"changed": changed, "problems": problems,
                "summary": f"changed {', '.join(changed) or 'nothing'}" + (f"; {len(problems)} problem(s)" if problems else "")}


def parse_pytest(output: str) -> dict[str, int]:
    """Counts from pytest's closing line (``2 failed, 3 passed in 0.1s``)."""
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    lines = [l for l in output.splitlines() if _SUMMARY.search(l) and " in " in l]
    for n, what in _SUMMARY.findall(lines[-1] if lines else ""):
        key = "errors" if what.startswith("error") else what
        if key in counts:
            counts[key] += int(n)
    return counts


def _counted(output: str) -> bool:
    """True when the output has pytest's closing line with counts."""
    return any(_SUMMARY.search(line) and " in " in line for line in output.splitlines())


def _is_pytest(command: list[str]) -> bool:
    return any(os.path.basename(part).startswith(("pytest", "py.test")) for part in command)


_EXEC_FAILED = re.compile(r"^sandbox: cannot run '(.*)': (.+)$", re.M)
_NO_MODULE = re.compile(r"^\S*: No module named (\S+)\s*$", re.M)  # python -m X, before X ran


def cannot_start(command: list[str], exit_code: int | None, output: str) -> str | None:
    """Why the test command never ran (not found, not executable, ``python -m`` of a module
    that is not installed), or None if it ran. A missing runner is a cause, never a result.

    Examples:
        >>> cannot_start(["python", "-m", "pytest"], 1, "/usr/bin/python: No module named pytest")
        "'python -m pytest': No module named pytest (install pytest where the pool runs: pip install pytest)"
        >>> cannot_start(["./t.sh"], 127, "sandbox: cannot run './t.sh': Permission denied")
        "'./t.sh' is not executable (Permission denied); chmod +x it or run it through its interpreter"
    """
    if exit_code in (126, 127):
        m = _EXEC_FAILED.search(output)
        why = m.group(2) if m else ("command not found" if exit_code == 127 else "not executable")
        if "ermission" in why or exit_code == 126:
            return f"{command[0]!r} is not executable ({why}); chmod +x it or run it through its interpreter"
        return (f"test command {command[0]!r} was not found in the sandbox ({why}); install it or set the "
                "task's test_command input")
    if exit_code == 1 and "-m" in command[:-1]:
        module = command[command.index("-m") + 1]
        m = _NO_MODULE.search(output)
        if m and m.group(1).rstrip(";") == module:
            return (f"'{' '.join([os.path.basename(command[0]), '-m', module])}': No module named {module} "
                    f"(install {module} where the pool runs: pip install {module})")
    return None


DEFAULT_TEST_COMMAND = (sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider")
# The default command loads no pytest plugin the host happens to have installed: they are
# not the workspace's, and a few of them (schemathesis, langsmith, ...) cost seconds of CPU
# per run at import. A test command of the task's own keeps pytest's autoloading.
DEFAULT_TEST_ENV = {"PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}


def _test_command(ctx: StepContext) -> list[str]:
    command = ctx.inputs.get("test_command") or list(DEFAULT_TEST_COMMAND)
    if isinstance(command, str):
        command = command.split()
    if not isinstance(command, (list, tuple)) or not command or not all(isinstance(c, str) and c for c in command):
        raise TaskInputError(f"inputs.test_command must be a command line (a string or a list of strings), "
                             f"got {ctx.inputs.get('test_command')!r}", task_id=ctx.task_id, agent=ctx.role)
    return list(command)


def _sandbox_limits(ctx: StepContext, wall_s: float = 120.0) -> sandbox.SandboxLimits:
    """``inputs.sandbox`` checked limit by limit (naming the input) over a wall clock of ``wall_s``."""
    given = ctx.inputs.get("sandbox", {})
    allowed = [f.name for f in dataclasses.fields(sandbox.SandboxLimits)]
    if not isinstance(given, dict):
        raise TaskInputError(f"inputs.sandbox must be a mapping of limits ({', '.join(allowed)}), got {given!r}",
                             task_id=ctx.task_id, agent=ctx.role)
    for key, value in given.items():
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            raise TaskInputError(f"inputs.sandbox.{key}: unknown limit" + (f"; did you mean `{close[0]}`?" if close else "")
                                 + f" Allowed: {', '.join(allowed)}", task_id=ctx.task_id, agent=ctx.role)
        if key == "network":
            if not isinstance(value, bool):
                raise TaskInputError(f"inputs.sandbox.network: must be true or false, got {value!r}",
                                     task_id=ctx.task_id, agent=ctx.role)
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise TaskInputError(f"inputs.sandbox.{key}: must be a positive number, got {value!r}",
                                 task_id=ctx.task_id, agent=ctx.role)
    return sandbox.SandboxLimits(**{"wall_s": wall_s, **given})


class Tester(Agent):
    """Runs the workspace's tests in the sandbox and reports structured results."""

    def step(self, ctx: StepContext) -> dict[str, Any]:
        ws = workspace_of(ctx)
        command, limits = _test_command(ctx), _sandbox_limits(ctx)
        # The user's own workspace and every other task's copy stay out of sight.
        settings = (ctx.sandbox or sandbox.SandboxSettings()).hiding(str(ws.original), str(workspaces_root()))
        try:
            with ws.trial() as trial:
                res = sandbox.run(command, cwd=str(trial), limits=limits, settings=settings,
                                  env=None if ctx.inputs.get("test_command") else DEFAULT_TEST_ENV)
        except sandbox.SandboxUnavailable as exc:
            exc.task_id, exc.agent = ctx.task_id, ctx.role
            raise
        except WorkspaceError as exc:
            raise AgentError(f"cannot prepare the test run: {exc}", task_id=ctx.task_id, agent=ctx.role) from None
        ctx.emit(ev.SANDBOX, {"isolation": res.isolation, "layers": [l.to_dict() for l in res.layers],
                             "notes": res.notes, "killed": res.killed, "exit_code": res.exit_code,
                             "elapsed_s": round(res.elapsed_s, 3)})
        cannot = cannot_start(command, res.exit_code, res.output)
        if cannot:
            raise AgentError(f"the test command cannot start: {cannot}",
                             task_id=ctx.task_id, agent=ctx.role)
        counts = parse_pytest(res.output)
        counted = _counted(res.output)
        if res.exit_code == 5 or (not counted and res.exit_code == 0 and _is_pytest(command)):
            raise TaskInputError(f"the workspace {ctx.workspace} has no tests (the test command collected "
                             "nothing); add tests or set the task's test_command input",
                             task_id=ctx.task_id, agent=ctx.role)
        ok = res.exit_code == 0 and res.killed is None
        result = {
            "ok": ok, **counts, "exit_code": res.exit_code, "killed": res.killed, "signal": res.signal,
            "elapsed_s": round(res.elapsed_s, 3), "network_isolated": res.network_isolated,
            "isolation": res.isolation, "layers": [l.to_dict() for l in res.layers],
            "notes": res.notes, "output": res.output[-6000:],
            "summary": ((f"{counts['passed']} passed, {counts['failed']} failed, {counts['errors']} errors"
                         if counted else f"exit code {res.exit_code}, no test counts in the output")
                        + (f" (killed: {res.killed})" if res.killed else "")),
        }
        ctx.emit(ev.TEST_RESULT, {k: result[k] for k in ("ok", "passed", "failed", "errors", "killed", "summary")})
        if not ok:
            ctx.request_round("Tests failed: " + result["summary"] + "\n" + res.output[-3000:])
        return result


_VERDICT = re.compile(r"verdict\W{0,5}(approved?|lgtm|request[_ -]?changes|changes[_ -]requested|reject(?:ed)?)", re.I)


def parse_verdict(text: str) -> tuple[str | None, str]:
    """``("approve" | "request_changes" | None, reasons)`` from a review.

    Accepts a JSON object with ``verdict`` (and ``reasons``), or a line such as
    ``VERDICT: APPROVE``; None when no verdict can be found.
    """
    for m in re.finditer(r"\{[^{}]*\"verdict\"[^{}]*\}", text, re.S):
        try:
            obj = json.loads(m.group(0))
        except json.JSONDecodeError:
            continue
        v = str(obj.get("verdict", "")).lower()
        reasons = obj.get("reasons") or obj.get("reason") or ""
        reasons = "; ".join(map(str, reasons)) if isinstance(reasons, list) else str(reasons)
        if v.startswith("approve") or v == "lgtm":
            return "approve", reasons
        if v:
            return "request_changes", reasons
    matches = _VERDICT.findall(text)
    if matches:
        v = matches[-1].lower()
        return ("approve" if v.startswith("approve") or v == "lgtm" else "request_changes"), text.strip()
    return None, text.strip()


def static_checks(texts: dict[str, str], paths: list[str]) -> list[str]:
    """Problems found in changed Python files: they must compile; ruff's error rules if installed.

    ``texts`` are the copy's files as the workspace read them (regular files only, never
    through a link, bounded). Nothing here opens a file of the copy: ruff gets each
    file on stdin and ``--isolated`` (a config file in the copy could otherwise make it
    read, and echo, a file outside).
    """
    problems = []
    py = [p for p in paths if p.endswith(".py") and p in texts]
    for rel in py:
        try:
            compile(texts[rel], rel, "exec", dont_inherit=True)
        except (SyntaxError, ValueError) as exc:
            problems.append(f"{rel} does not compile: {type(exc).__name__}: {exc}")
    ruff = shutil.which("ruff")
    for rel in py[:20] if ruff else ():
        with tempfile.TemporaryDirectory() as empty:  # no config, no files of the copy around it
            r = subprocess.run([ruff, "check", "--isolated", "--select", "E9,F63,F7,F82", "--output-format",
                                "concise", "--no-cache", "--stdin-filename", rel, "-"], input=texts[rel],
                               cwd=empty, capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            problems += [l for l in r.stdout.splitlines() if ":" in l and not l.startswith("Found")][:20]
    return problems[:40]


class Reviewer(Agent):
    """Static checks plus a model review ending in a verdict; approves or sends back.

    It reviews the coder's change, not the test run (the tester runs alongside it);
    an approved change is returned under ``apply`` for the runtime to write back."""

    def __init__(self) -> None:
        self.rounds: list[dict[str, Any]] = []

    def get_state(self) -> Any:
        return {"rounds": self.rounds}

    def set_state(self, state: Any) -> None:
        self.rounds = list(state.get("rounds", []))

    def step(self, ctx: StepContext) -> Generator[str, None, Any]:
        ws = workspace_of(ctx)
        try:
            change = ws.change()
        except WorkspaceError as exc:  # a tree too large to see whole: never review (or apply) half of it
            raise AgentError(f"cannot review the change: {exc}", task_id=ctx.task_id, agent=ctx.role) from None
        changed, diff = change.paths, change.diff()
        problems = static_checks(change.after, changed)
        prompt = (
            f"Goal: {ctx.goal}\n\nThe change (unified diff):\n```diff\n{diff[:MAX_CONTEXT_CHARS] or '(no change)'}\n```\n\n"
            + (("Static check problems:\n" + "\n".join(problems) + "\n") if problems else "")
            + (("Not reviewed (not regular text files; they will not be applied):\n"
                + "\n".join(f"{rel}: {why}" for rel, why in change.skipped.items()) + "\n") if change.skipped else "")
            + "\nReview the change. End with one line: VERDICT: APPROVE or VERDICT: REQUEST_CHANGES, "
              "with your reasons above it."
        )
        review = yield from ctx.ask([
            {"role": "system", "content": "You are a strict code reviewer."},
            {"role": "user", "content": prompt},
        ])
        verdict, reasons = parse_verdict(review)
        approved = verdict == "approve" and not problems
        feedback = []
        if problems:
            feedback.append("static checks: " + "; ".join(problems))
        if verdict is None:
            feedback.append("the review had no verdict; the reviewer said: " + reasons[:1500])
        elif verdict == "request_changes":
            feedback.append("the reviewer requested changes: " + reasons[:1500])
        summary = {"round": ctx.round, "changed": changed, "verdict": verdict or "unparseable",
                   "approved": approved}
        self.rounds = [r for r in self.rounds if r["round"] != ctx.round] + [summary]
        if not approved:
            ctx.request_round("Review: " + " | ".join(feedback))
        return {
            "approved": approved, "verdict": verdict or "unparseable", "reasons": reasons[:4000],
            "static_problems": problems, "diff": diff, "changed": changed,
            "files": {rel: change.after[rel] for rel in changed if rel in change.after},
            "rounds": list(self.rounds), "not_reviewed": dict(change.skipped), "workspace_copy": str(ws.path),
            # What the runtime writes back at the round's end if the round succeeds (inputs.apply):
            # the reviewed texts, never a re-read of the copy.
            "apply": {rel: change.after.get(rel) for rel in changed} if approved else None,
            "summary": "approved" if approved else "changes requested",
        }
