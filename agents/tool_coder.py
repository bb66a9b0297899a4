"""The ``coder`` role: a loop of tool calls on the task's copy within one step.

Each turn the model answers with text (streamed as tokens) and tool calls; each call runs
on the copy (:mod:`threadbound.agents.tools`: list, search, read a range, replace a span,
create a file, run a command or the tests in the sandbox, finish), is an event
(``tool_call``, then ``tool_result``) and goes back to the model, until it calls ``finish``,
answers without a tool call, or the step's bounds end the loop. The diff of the copy is
the step's result, for the tester, the reviewer, the approval and ``apply``, as the
whole-file coder's was (that one is the ``coder-wholefile`` role,
:class:`threadbound.agents.builtin.WholeFileCoder`).

Backends that take OpenAI tool calls (``model.supports_tools``) get the tools as OpenAI's
``tools`` list; the others get a plain-text protocol: one fenced ``tool`` block per reply
holding ``{"name": ..., "arguments": {...}}``, as mini-swe-agent reads one bash block.

Bounds per step, by reasoning level (:data:`STEP_BOUNDS`), or the task's inputs
``max_tool_calls`` and ``max_step_tokens``: past either the loop stops and the step
returns what the copy holds (``stopped`` says why). The task's cost budget still caps
every answer, as :meth:`StepContext.ask` does.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from typing import Any, Generator

from . import events as ev
from . import sandbox
from .base import Agent, StepContext
from .builtin import DEFAULT_TEST_ENV, _sandbox_limits, _test_command, workspace_of
from .edits import parse
from .errors import BudgetExhausted, TaskInputError
from .models.base import ToolCall, Usage, count_tokens
from .tool_calls import FINISH, TOOLS, ToolResult, bound
from .tools import Toolbox
from .workspace import WorkspaceError, workspaces_root


@dataclass(frozen=True)
class StepBounds:
    """The most one coder step may do: tool calls, and tokens the model answers."""

    max_tool_calls: int
    max_tokens: int


# By reasoning level: a quick step looks at a few files; a thorough one may read around.
STEP_BOUNDS = {1: StepBounds(12, 8_000), 2: StepBounds(30, 32_000), 3: StepBounds(60, 96_000),
               4: StepBounds(120, 256_000)}
EVENT_CHARS = 2_000  # a tool call's arguments or result as a ``tool_call``/``tool_result`` event shows it

_TOOL_BLOCK = re.compile(r"^```tool[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)

SYSTEM = (
    "You are a careful software engineer. You fix code so its tests pass, working on a copy of a "
    "repository through tools. Look before you change anything: list the files, search for what the goal "
    "names, read the parts you need (a range of lines is enough). Change files with replace (an exact "
    "span that occurs once) or create_file. Run the tests to check your change. When you are done, call "
    "finish with a short summary of what you changed. Do not change the tests unless the goal says so."
)


def text_protocol() -> str:
    """The instructions for a model without tool calling: one fenced ``tool`` block per reply."""
    lines = []
    for tool in TOOLS:
        fn = tool["function"]
        params = fn["parameters"]
        args = ", ".join(k + ("" if k in params["required"] else "?") + f": {v['type']}"
                         for k, v in params["properties"].items())
        lines.append(f"- {fn['name']}({args}): {fn['description']}")
    return ("\n\nTo call a tool, end your reply with one block like this (JSON inside):\n"
            "```tool\n{\"name\": \"read_file\", \"arguments\": {\"path\": \"src/app.py\", \"start_line\": 1}}\n```\n"
            "One tool per reply; its result comes back in the next message. The tools:\n" + "\n".join(lines))


def text_calls(text: str, turn: int) -> list[ToolCall]:
    """The tool calls in a reply written in the plain-text protocol (a malformed block
    becomes a call whose arguments say so, so the model hears about it)."""
    calls = []
    for i, m in enumerate(_TOOL_BLOCK.finditer(text)):
        body = m.group(1).strip()
        try:
            obj = json.loads(body)
        except json.JSONDecodeError as exc:
            obj = {"name": "", "error": f"the tool block is not valid JSON ({exc.msg} at character {exc.pos})"}
        except (ValueError, RecursionError) as exc:  # a number of 5,000 digits, arrays nested 100,000 deep
            obj = {"name": "", "error": f"the tool block cannot be read: {str(exc)[:200]}"}
        if not isinstance(obj, dict):
            obj = {"name": "", "error": "the tool block must hold a JSON object with name and arguments"}
        args = obj.get("arguments", {})
        calls.append(ToolCall(name=str(obj.get("name") or ""), id=f"text_{turn}_{i}",
                              arguments=obj["error"] if "error" in obj else
                              (args if isinstance(args, str) else json.dumps(args))))
    return calls


def step_bounds(ctx: StepContext) -> StepBounds:
    """The step's bounds: its level's, or the task's ``max_tool_calls`` / ``max_step_tokens``."""
    base = STEP_BOUNDS.get(ctx.level, STEP_BOUNDS[2])
    values = {}
    for key, field in (("max_tool_calls", "max_tool_calls"), ("max_step_tokens", "max_tokens")):
        value = ctx.inputs.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 10_000_000:
            raise TaskInputError(f"inputs.{key}: must be a whole number from 1 to 10000000, got {value!r}",
                                 task_id=ctx.task_id, agent=ctx.role)
        values[field] = value
    return StepBounds(**{"max_tool_calls": base.max_tool_calls, "max_tokens": base.max_tokens, **values})


def _utf8(text: str) -> str:
    """``text`` with each lone surrogate made U+FFFD: a model's JSON may say "\\ud800", which
    decodes to one, and no UTF-8 encoder (the next request, the event log) takes it."""
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return "".join("\ufffd" if "\ud800" <= c <= "\udfff" else c for c in text)


def _top_level(ws) -> str:
    try:
        names = sorted({rel.split("/", 1)[0] + ("/" if "/" in rel else "") for rel in ws.scan().texts})
    except WorkspaceError:
        return "(cannot be listed)"
    shown = ", ".join(names[:60]) + (f", ... ({len(names) - 60} more)" if len(names) > 60 else "")
    return shown or "(empty)"


class Coder(Agent):
    """The tool-using coder: reads, searches and edits the task's copy through tools, runs
    the tests in the sandbox, and stops when done; its output counts what it did.

    Output: ``changed`` (paths), ``summary``, ``problems``, ``stopped`` (``finish``,
    ``answered``: a reply without a tool call, ``tool_calls`` / ``tokens``: a bound,
    ``budget``: the task's cost budget), ``turns``, ``tokens``, ``tool_calls``,
    ``tool_errors``, ``refused_paths``, ``bounded``, ``sandbox_runs``, ``test_runs``,
    ``by_tool``, ``protocol`` (``tools`` or ``text``), ``wall_s``.
    """

    def step(self, ctx: StepContext) -> Generator[str, None, Any]:
        if ctx.model is None:
            raise RuntimeError("this step has no model configured")
        started = time.monotonic()
        ws = workspace_of(ctx)
        bounds = step_bounds(ctx)
        box = Toolbox(ws, test_command=_test_command(ctx), limits=_sandbox_limits(ctx),
                      test_env=None if ctx.inputs.get("test_command") else DEFAULT_TEST_ENV,
                      # The user's own workspace and every other task's copy stay out of sight.
                      settings=(ctx.sandbox or sandbox.SandboxSettings()).hiding(str(ws.original),
                                                                              str(workspaces_root())))
        native = bool(getattr(ctx.model, "supports_tools", False))
        messages: list[dict[str, Any]] = [
            {"role": "system", "content": SYSTEM + ("" if native else text_protocol())},
            {"role": "user", "content": (
                f"Goal: {ctx.goal}\n\n"
                + (("Feedback from the last round:\n" + "\n".join(ctx.feedback) + "\n\n") if ctx.feedback else "")
                + f"The repository's top level: {_top_level(ws)}\n\n"
                "Use the tools to find and fix what the goal asks; call finish when done.")},
        ]
        tokens = prompt_tokens = turns = 0
        stopped, summary, final_text = None, "", ""
        while stopped is None:
            if box.stats.tool_calls >= bounds.max_tool_calls:
                stopped = "tool_calls"
                break
            cap = bounds.max_tokens - tokens
            if cap <= 0:
                stopped = "tokens"
                break
            if ctx.tokens_left is not None:
                left = ctx.tokens_left - ctx.tokens_used
                if left <= 0:
                    if turns == 0:
                        raise BudgetExhausted(
                            f"task {ctx.task_id} has spent its cost budget ({ctx.tokens_used} tokens this step); "
                            "raise the task's cost_budget to let it go on", task_id=ctx.task_id, agent=ctx.role)
                    stopped = "budget"
                    break
                cap = min(cap, left)
            turns += 1
            text, calls, used, usage = yield from self._turn(ctx, messages, native, turns, cap)
            tokens += used
            prompt_tokens += usage.prompt_tokens if usage else 0
            if not native:
                calls = calls or text_calls(text, turns)
                extra = calls[1:]
                calls = calls[:1]  # one tool per reply: the model sees each result before its next move
            if not calls:
                final_text, stopped = text, "answered"
                break
            if native:
                messages.append({"role": "assistant", "content": text or None, "tool_calls": [
                    {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                    for c in calls]})
            else:
                messages.append({"role": "assistant", "content": text})
            results = []
            for call in calls:
                if stopped == FINISH:  # calls after finish in the same reply: the step is over
                    result = ToolResult(False, "not run: finish was called before it in this reply")
                elif box.stats.tool_calls >= bounds.max_tool_calls:
                    result = ToolResult(False, f"not run: this step's bound of {bounds.max_tool_calls} tool "
                                               "calls is reached")
                else:
                    ctx.emit(ev.TOOL_CALL, {"n": box.stats.tool_calls + 1, "id": call.id[:100], "name": call.name[:100],
                                            "arguments": bound(call.arguments, EVENT_CHARS)[0]})
                    result = box.call(call.name, call.arguments)
                    ctx.emit(ev.TOOL_RESULT, {"n": box.stats.tool_calls, "id": call.id[:100], "name": call.name[:100],
                                              "ok": result.ok, "output": bound(result.output, EVENT_CHARS)[0],
                                              "refused_path": result.refused_path, "bounded": result.bounded,
                                              "sandbox": result.sandbox})
                results.append((call, result))
                if result.finished:
                    stopped = FINISH
                    try:
                        summary = _utf8(str(json.loads(call.arguments).get("summary", ""))[:4000])
                    except (json.JSONDecodeError, AttributeError):
                        summary = ""
            if native:
                messages += [{"role": "tool", "tool_call_id": c.id, "content": r.output} for c, r in results]
            else:
                c, r = results[0]
                note = (f"\n(only the first tool block of a reply runs; {len(extra)} more ignored)" if extra else "")
                messages.append({"role": "user", "content": f"Result of {c.name[:100] or 'the tool block'} "
                                 f"({'ok' if r.ok else 'error'}):\n<output>\n{r.output}\n</output>{note}"})
        problems: list[str] = []
        if final_text:  # a closing answer in the whole-file protocol still counts
            edits = parse(final_text)
            if edits:
                _, problems = ws.apply(edits)
        try:
            changed = ws.changed()
        except WorkspaceError as exc:
            changed, problems = [], problems + [f"cannot list the change: {exc}"]
        if stopped == "answered" and not changed and not box.stats.tool_calls:
            problems.append("the model answered without a tool call and changed nothing (the reply contained "
                            "no file block or diff that could be applied either)")
        if problems:
            ctx.emit("edit_problems", {"problems": problems})
        stats = box.stats.to_dict()
        return {
            "changed": changed, "problems": problems, "stopped": stopped, "turns": turns, "tokens": tokens,
            "prompt_tokens": prompt_tokens or None, "protocol": "tools" if native else "text",
            "max_tool_calls": bounds.max_tool_calls, "max_step_tokens": bounds.max_tokens, **stats,
            "wall_s": round(time.monotonic() - started, 3),
            "summary": (summary or f"changed {', '.join(changed) or 'nothing'}")
            + f" ({stats['tool_calls']} tool calls, stopped: {stopped})"
            + (f"; {len(problems)} problem(s)" if problems else ""),
        }

    @staticmethod
    def _turn(ctx: StepContext, messages: list[dict[str, Any]], native: bool, turn: int,
              cap: int) -> Generator[str, None, tuple[str, list[ToolCall], int, Usage | None]]:
        """One model answer: its text streamed as tokens, its tool calls, the tokens it cost."""
        opts = {"agent": ctx.role, "task_id": ctx.task_id, "level": ctx.level, "round": ctx.round,
                "attempt": ctx.attempt, "goal": ctx.goal, "stream": ctx.streaming, **ctx.model_options,
                "turn": turn}
        opts["max_tokens"] = min(opts.get("max_tokens") or cap, cap)
        parts: list[str] = []
        calls: list[ToolCall] = []
        usage = None
        streamed = 0
        for item in ctx.model.turn(messages, TOOLS if native else None, **opts):
            if isinstance(item, ToolCall):
                calls.append(ToolCall(name=_utf8(item.name), arguments=_utf8(item.arguments), id=_utf8(item.id)))
            elif isinstance(item, Usage):
                usage = item
            elif item:
                item = _utf8(item)
                parts.append(item)
                if ctx.streaming:
                    streamed += 1
                    ctx.tokens_used += 1
                    yield item
        text = "".join(parts)
        if not ctx.streaming and text:
            yield text
        used = (streamed if ctx.streaming else count_tokens(text)) + sum(count_tokens(c.arguments) + 1 for c in calls)
        if usage is not None and usage.completion_tokens:
            used = usage.completion_tokens  # the server's count wins over ours
        ctx.tokens_used += used - streamed
        return text, calls, used, usage
