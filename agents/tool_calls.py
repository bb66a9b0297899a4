"""What the tool-using coder's model may call: the tools' JSON schemas in OpenAI's format,
a call's arguments parsed and checked against them (:func:`parse_arguments`), the bounds
it is told, and what a call answers (:class:`ToolResult`, :class:`ToolStats`). The tools
themselves run in :mod:`threadbound.agents.tools`."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

MAX_RESULT_CHARS = 10_000  # one tool result as the model sees it
MAX_READ_LINES = 400  # one read_file call
MAX_LIST_ENTRIES = 400  # one list_files call
MAX_MATCHES = 100  # one search call
MAX_LINE_CHARS = 300  # one line of a search or listing
MAX_PATTERN_CHARS = 500

FINISH = "finish"


def _schema(properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": required, "additionalProperties": False}


_PATH = {"type": "string", "description": "a path relative to the repository's top, e.g. src/app.py"}

# OpenAI's tool format: {"type": "function", "function": {name, description, parameters}}.
TOOLS: list[dict[str, Any]] = [{"type": "function", "function": f} for f in [
    {"name": "list_files", "description": "List the repository's files under a directory (a tree, bounded). "
     "Symbolic links and special files are shown with why they cannot be read.",
     "parameters": _schema({"path": {**_PATH, "description": "a directory; default: the top"}}, [])},
    {"name": "search", "description": f"Search the text files for a string (or a Python regular expression "
     f"with regex: true); answers path:line: text, at most {MAX_MATCHES} matches.",
     "parameters": _schema({"pattern": {"type": "string"}, "path": {**_PATH, "description": "a directory or "
                            "file to search in; default: everywhere"}, "regex": {"type": "boolean"}}, ["pattern"])},
    {"name": "read_file", "description": f"Read a text file with line numbers, or lines start_line..end_line "
     f"(from 1, inclusive); at most {MAX_READ_LINES} lines per call.",
     "parameters": _schema({"path": _PATH, "start_line": {"type": "integer"}, "end_line": {"type": "integer"}},
                           ["path"])},
    {"name": "replace", "description": "Replace an exact span of a file: old_text must occur exactly once in "
     "the file (include enough surrounding lines to make it unique; whitespace counts); it becomes new_text.",
     "parameters": _schema({"path": _PATH, "old_text": {"type": "string"}, "new_text": {"type": "string"}},
                           ["path", "old_text", "new_text"])},
    {"name": "create_file", "description": "Create a new file with the given content (its directories too). "
     "Refused if the file exists: change existing files with replace.",
     "parameters": _schema({"path": _PATH, "content": {"type": "string"}}, ["path", "content"])},
    {"name": "run", "description": "Run a shell command in the repository, in a sandbox (no network, only the "
     "repository writable); answers its exit code and output (bounded).",
     "parameters": _schema({"command": {"type": "string"}}, ["command"])},
    {"name": "run_tests", "description": "Run the repository's tests (the task's test command) in a sandbox on a "
     "throwaway copy; answers pass/fail counts and the end of the output.",
     "parameters": _schema({}, [])},
    {"name": FINISH, "description": "Stop: the work is done (or cannot be done). Say what you changed and why.",
     "parameters": _schema({"summary": {"type": "string"}}, ["summary"])},
]]
TOOL_NAMES = tuple(t["function"]["name"] for t in TOOLS)
_SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
_TYPES = {"string": str, "integer": int, "boolean": bool}


@dataclass
class ToolResult:
    """What a tool call answered. ``ok=False``: a tool error the model should fix."""

    ok: bool
    output: str
    refused_path: bool = False
    bounded: bool = False
    finished: bool = False
    sandbox: dict[str, Any] | None = None  # the sandboxed run's isolation, exit code, limit hit


@dataclass
class ToolStats:
    """Counts of one step's tool use (in the step's output)."""

    tool_calls: int = 0
    tool_errors: int = 0
    refused_paths: int = 0
    bounded: int = 0
    sandbox_runs: int = 0
    test_runs: int = 0
    by_tool: dict[str, int] = field(default_factory=dict)

    def count(self, name: str, result: ToolResult) -> None:
        self.tool_calls += 1
        self.by_tool[name] = self.by_tool.get(name, 0) + 1
        self.tool_errors += not result.ok
        self.refused_paths += result.refused_path
        self.bounded += result.bounded

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ToolCallError(ValueError):
    """A call the model got wrong: its message goes back to the model."""

    def __init__(self, message: str, refused_path: bool = False, bounded: bool = False) -> None:
        super().__init__(message)
        self.refused_path, self.bounded = refused_path, bounded


def bound(text: str, limit: int = MAX_RESULT_CHARS) -> tuple[str, bool]:
    """``text`` cut to ``limit`` characters, head and tail kept; and whether it was cut.

    Examples:
        >>> bound("x" * 30, 20)[1]
        True
    """
    if len(text) <= limit:
        return text, False
    head, tail = limit * 2 // 3, limit // 3
    return (text[:head] + f"\n... {len(text) - head - tail} characters elided (output bounded at {limit}) ...\n"
            + text[-tail:]), True


def parse_arguments(name: str, arguments: str) -> dict[str, Any]:
    """The arguments of a call to tool ``name``, checked against its schema."""
    if name not in _SCHEMAS:
        raise ToolCallError(f"there is no tool {name[:100]!r}; the tools are: {', '.join(TOOL_NAMES)}")
    text = (arguments or "").strip() or "{}"
    try:
        args = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ToolCallError(f"the arguments of {name} are not valid JSON ({exc.msg} at character {exc.pos}): "
                            f"{text[:200]!r}; send a JSON object such as {json.dumps(_example(name))}") from None
    except (ValueError, RecursionError) as exc:  # a number of 5,000 digits, arrays nested 100,000 deep
        raise ToolCallError(f"the arguments of {name} cannot be read: {str(exc)[:200]}; send a plain JSON "
                            f"object such as {json.dumps(_example(name))}") from None
    if not isinstance(args, dict):
        raise ToolCallError(f"the arguments of {name} must be a JSON object, got {type(args).__name__}")
    schema = _SCHEMAS[name]
    for key in args:
        if key not in schema["properties"]:
            raise ToolCallError(f"{name} has no argument {key!r}; its arguments are: "
                                f"{', '.join(schema['properties']) or 'none'}")
    for key in schema["required"]:
        if key not in args:
            raise ToolCallError(f"{name} needs the argument {key!r}")
    for key, value in args.items():
        want = _TYPES[schema["properties"][key]["type"]]
        if not isinstance(value, want) or (want is int and isinstance(value, bool)):
            raise ToolCallError(f"{name}: argument {key!r} must be a {schema['properties'][key]['type']}, "
                                f"got {type(value).__name__}")
    return args


def _example(name: str) -> dict[str, Any]:
    props = _SCHEMAS[name]["properties"]
    return {k: ("src/app.py" if k == "path" else 1 if props[k]["type"] == "integer" else "...")
            for k in _SCHEMAS[name]["required"]}
