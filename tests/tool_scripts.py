"""A deterministic tool-calling model for the tool coder's tests: it greps for the bug the
goal names, reads around it, replaces the span, runs the tests and finishes.

The goal carries what to fix after ``SPEC:`` as JSON (``pattern``, ``old``, ``new``); the
model's next move is read from the conversation so far (how many tool results it holds,
and what the search answered), so the same function drives a callable backend (OpenAI
tool calls or the plain-text protocol) and the local OpenAI-compatible test server.
"""

from __future__ import annotations

import json
import re


def spec_of(messages):
    goal = next(m["content"] for m in messages if m["role"] == "user")
    return json.loads(goal.split("SPEC:", 1)[1].strip().splitlines()[0])


def results_of(messages):
    """The tool results so far, oldest first (OpenAI tool messages or text-protocol results)."""
    return [m["content"] for m in messages
            if m["role"] == "tool" or (m["role"] == "user" and str(m["content"]).startswith("Result of"))]


def next_action(messages):
    """``(text, tool name, arguments)`` for the next turn."""
    spec, results = spec_of(messages), results_of(messages)
    found = re.search(r"^(?:<output>\n)?([^\s:]+):(\d+): ", results[0], re.M) if results else None
    path, line = (found.group(1), int(found.group(2))) if found else ("?", 1)
    steps = [
        ("Searching for the suspicious expression.", "search", {"pattern": spec["pattern"]}),
        (f"Reading {path} around line {line}.", "read_file",
         {"path": path, "start_line": max(1, line - 3), "end_line": line + 3}),
        ("Replacing the faulty span.", "replace", {"path": path, "old_text": spec["old"], "new_text": spec["new"]}),
        ("Running the tests.", "run_tests", {}),
        ("Done.", "finish", {"summary": f"fixed {path} line {line}; tests: {results[-1].splitlines()[0] if results else ''}"}),
    ]
    return steps[min(len(results), len(steps) - 1)]


def fixer(messages, tools=None, **options):
    """A callable backend (``tools: true``): OpenAI-style tool calls when tools are
    offered, a fenced ``tool`` block (the plain-text protocol) when they are not."""
    text, name, args = next_action(messages)
    for word in text.split(" "):
        yield word + " "
    if tools:
        yield {"name": name, "arguments": json.dumps(args)}
    else:
        yield "\n```tool\n" + json.dumps({"name": name, "arguments": args}) + "\n```\n"


def text_fixer(messages, **options):
    """The same moves for a backend without tool calling (``tools: false``)."""
    yield from fixer(messages, tools=None, **options)


def server_script(body):
    """For ``OpenAITestServer(script=...)``: the coder's requests get tool calls; others
    (the reviewer's) the default echo plus an approval."""
    if not body.get("tools"):
        return {"content": "Looks right.\nVERDICT: APPROVE"}
    text, name, args = next_action(body["messages"])
    return {"content": text, "tool_calls": [{"name": name, "arguments": json.dumps(args)}]}
