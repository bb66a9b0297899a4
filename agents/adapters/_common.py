"""What the three adapters share: their extras, settings, events, the workspace copy and
the sandbox, and how a synchronous framework's tokens reach the task's stream.

Nothing here imports a framework: each adapter imports its own inside the step (and
:func:`import_openai_agents` does so without the repository's ``agents/`` folder in the way).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any, Callable, Generator

from .. import sandbox
from ..base import Agent, StepContext
from ..builtin import _sandbox_limits
from ..errors import AgentError, BudgetExhausted, TaskInputError
from ..events import AGENT_UPDATED, NODE_UPDATE, TOOL_CALL, TOOL_RESULT
from ..workspace import Workspace, workspaces_root

# The event kinds the adapters emit (an agent's own events; none is reserved).
ADAPTER_KINDS = (TOOL_CALL, TOOL_RESULT, NODE_UPDATE, AGENT_UPDATED)

MAX_EVENT_TEXT = 4000  # characters of a tool's output or a node's update shown in an event


class AdapterNotInstalled(AgentError):
    """An adapter role ran where its framework (an optional extra) is not installed.

    Raised in the agent actor when a node lacks the extra; the pool refuses the role
    earlier, as a ``ConfigError`` naming it, where it is registered (before Ray starts).
    """


@dataclasses.dataclass(frozen=True)
class Extra:
    """An optional extra: the name ``pip install -e '.[name]'`` takes and the modules it brings."""

    name: str
    modules: tuple[str, ...]
    framework: str

    def install_line(self) -> str:
        return f"pip install -e '.[{self.name}]'"

    def problem(self, role: str) -> str | None:
        """Why ``role`` cannot run here (its framework is missing), or None."""
        for module in self.modules:
            try:
                found = _importable(module)
            except (ImportError, ValueError):
                found = False
            if not found:
                return (f"role {role!r} runs {self.framework} agents, which is an optional extra that is not "
                        f"installed here (no module {module!r}); install it with `{self.install_line()}` "
                        "on every node of the pool")
        return None


def _importable(module: str) -> bool:
    if module == "agents":  # the Agents SDK's name is also this repository's folder
        current = sys.modules.get("agents", False)
        return current is not None and (_is_sdk(current) or _sdk_spec() is not None)
    if module in sys.modules:
        return sys.modules[module] is not None
    return importlib.util.find_spec(module) is not None


MINI_SWE_AGENT = Extra("mini-swe-agent", ("minisweagent",), "mini-swe-agent")
OPENAI_AGENTS = Extra("openai-agents", ("agents", "openai"), "OpenAI Agents SDK")
LANGGRAPH = Extra("langgraph", ("langgraph", "langchain_core"), "LangGraph")


def require(extra: Extra, ctx: StepContext) -> None:
    problem = extra.problem(ctx.role)
    if problem:
        raise AdapterNotInstalled(problem, task_id=ctx.task_id, agent=ctx.role)


# -- the Agents SDK's top-level name ------------------------------------------------------------

_OURS = Path(__file__).resolve().parent.parent  # this repository's agents/ (threadbound.agents)


def _shadows(entry: str) -> bool:
    """True when ``entry`` of sys.path would make ``import agents`` find our folder."""
    try:
        return (Path(entry or os.getcwd()) / "agents").resolve() == _OURS
    except OSError:
        return False


def _sdk_spec():
    """The SDK's module spec, looked up past our folder (on sys.path or already imported as ``agents``)."""
    saved, aside = sys.path[:], sys.modules.pop("agents", None)
    sys.path[:] = [p for p in saved if not _shadows(p)]
    try:
        return importlib.util.find_spec("agents")
    finally:
        sys.path[:] = saved
        if aside is not None:
            sys.modules["agents"] = aside


def _is_sdk(module: Any) -> bool:
    return module is not None and hasattr(module, "Runner") and hasattr(module, "RunConfig")


def import_openai_agents():
    """The OpenAI Agents SDK's ``agents`` module, whatever the working directory.

    From the repository's root (``python -c``, a Ray worker started there) ``import agents``
    would find the repository's own ``agents/`` folder; the entries of ``sys.path`` that point
    there are left out while the SDK is imported, and a module of that folder registered as
    ``agents`` is set aside (its importers keep their reference).
    """
    current = sys.modules.get("agents", False)
    if current is None:  # marked unimportable
        raise ImportError("import of agents halted; None in sys.modules")
    if _is_sdk(current):
        return current
    os.environ.setdefault("OPENAI_AGENTS_DISABLE_TRACING", "1")  # no trace export: no network
    ours = {name: sys.modules.pop(name) for name in list(sys.modules)
            if name == "agents" or name.startswith("agents.")} if current is not False else {}
    saved = sys.path[:]
    sys.path[:] = [p for p in saved if not _shadows(p)]
    try:
        module = importlib.import_module("agents")
    except BaseException:
        sys.modules.update(ours)
        raise
    finally:
        sys.path[:] = saved
    if not _is_sdk(module):
        raise ImportError(f"'agents' resolved to {getattr(module, '__file__', module)!r}, not the OpenAI Agents SDK")
    module.set_tracing_disabled(True)
    return module


# -- settings -------------------------------------------------------------------------------------


def settings_of(ctx: StepContext, defaults: dict[str, Any], from_class: dict[str, Any]) -> dict[str, Any]:
    """An adapter's settings: its defaults, then the role's own (class attribute ``settings``),
    then the task's ``inputs[<role>]``; unknown keys are refused with a hint."""
    given = ctx.inputs.get(ctx.role, {})
    if given is None:
        given = {}
    if not isinstance(given, dict):
        raise TaskInputError(f"inputs.{ctx.role} must be a mapping of the {ctx.role} role's settings "
                             f"({', '.join(sorted(defaults))}), got {type(given).__name__}",
                             task_id=ctx.task_id, agent=ctx.role)
    merged = dict(defaults)
    for source, values in (("settings", from_class), (f"inputs.{ctx.role}", given)):
        for key, value in values.items():
            if key not in defaults:
                close = difflib.get_close_matches(str(key), list(defaults), n=1)
                raise TaskInputError(f"{source}.{key}: unknown setting of the {ctx.role} role"
                                     + (f"; did you mean `{close[0]}`?" if close else "")
                                     + f" Known: {', '.join(sorted(defaults))}", task_id=ctx.task_id, agent=ctx.role)
            merged[key] = value
    return merged


def positive_int(ctx: StepContext, settings: dict[str, Any], key: str, upper: int) -> int:
    value = settings[key]
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= upper:
        raise TaskInputError(f"inputs.{ctx.role}.{key}: must be a whole number from 1 to {upper}, got {value!r}",
                             task_id=ctx.task_id, agent=ctx.role)
    return value


def resolve_factory(ctx: StepContext, what: str, default: Any, choices: dict[str, Any], chosen: Any) -> Callable:
    """The factory a step runs: the role's own (``default``), or the one the task's inputs
    name among the role's ``choices``. A task never names code to import: an import path
    from a task (which anyone allowed to submit writes) is refused, never imported."""
    target = default
    if chosen is not None:
        if not isinstance(chosen, str) or chosen not in choices:
            raise TaskInputError(
                f"inputs.{ctx.role}.{what}: {chosen!r} is not one of the {ctx.role} role's {what}s "
                f"({', '.join(sorted(choices)) or 'none'}); a task picks a {what} by name, the role "
                f"defines them (class attribute `{what}s`)", task_id=ctx.task_id, agent=ctx.role)
        target = choices[chosen]
    if target is None:
        raise TaskInputError(f"the {ctx.role} role has no {what}: set its class attribute `{what}` to a "
                             "function or 'package.module:function'", task_id=ctx.task_id, agent=ctx.role)
    if isinstance(target, str):
        mod_name, sep, attr = target.partition(":")
        if not sep or not mod_name or not attr:
            raise AgentError(f"the {ctx.role} role's {what} {target!r} is not an import path; write it as "
                             "'package.module:function'", task_id=ctx.task_id, agent=ctx.role)
        try:
            target = getattr(importlib.import_module(mod_name), attr)
        except (ImportError, AttributeError) as exc:
            raise AgentError(f"the {ctx.role} role's {what} {target!r} cannot be imported in the agent actor "
                             f"({exc}); make it importable on every node", task_id=ctx.task_id, agent=ctx.role) from None
    if not callable(target):
        raise AgentError(f"the {ctx.role} role's {what} must be callable, got {type(target).__name__}",
                         task_id=ctx.task_id, agent=ctx.role)
    return target


# -- the workspace copy and the sandbox ------------------------------------------------------------


def sandbox_limits(ctx: StepContext, wall_s: float) -> sandbox.SandboxLimits:
    """``inputs.sandbox`` (the built-in tester's limits, checked by the same function) over ``wall_s``."""
    if ctx.inputs.get("sandbox") is None:
        return sandbox.SandboxLimits(wall_s=wall_s)
    return _sandbox_limits(ctx, wall_s)


def sandbox_settings(ctx: StepContext, ws: Workspace) -> sandbox.SandboxSettings:
    """The pool's sandbox settings with the user's own workspace and every other copy hidden."""
    return (ctx.sandbox or sandbox.SandboxSettings()).hiding(str(ws.original), str(workspaces_root()))


def sandbox_event(res: sandbox.SandboxResult) -> dict[str, Any]:
    return {"isolation": res.isolation, "layers": [layer.to_dict() for layer in res.layers], "notes": res.notes,
            "killed": res.killed, "exit_code": res.exit_code, "elapsed_s": round(res.elapsed_s, 3)}


# -- tokens, the budget, plain data ------------------------------------------------------------------


def drain(gen: Generator[str, None, Any], sink: Callable[[str], None]) -> Any:
    """Run a token generator (``ctx.ask``) to its end, passing each token to ``sink``; its return value.

    A synchronous framework calls the model deep inside its own loop, where the step
    cannot ``yield``: its tokens go to the step's sink exactly as yielded ones do."""
    while True:
        try:
            sink(next(gen))
        except StopIteration as stop:
            return stop.value


def token_sink(ctx: StepContext) -> Callable[[str], None]:
    """Where a step's tokens go when it cannot yield them (the runtime's sink takes ``str``
    items as tokens, as it does the ones a generator step yields)."""
    return ctx.sink.append


def tokens_left(ctx: StepContext) -> int | None:
    """What is left of the task's budget for this step, in tokens (None: no budget)."""
    return None if ctx.tokens_left is None else ctx.tokens_left - ctx.tokens_used


def check_budget(ctx: StepContext) -> None:
    left = tokens_left(ctx)
    if left is not None and left <= 0:
        raise BudgetExhausted(
            f"task {ctx.task_id} has spent its cost budget ({ctx.tokens_used} tokens this step); "
            "raise the task's cost_budget to let it go on", task_id=ctx.task_id, agent=ctx.role)


def trimmed(text: Any, limit: int = MAX_EVENT_TEXT) -> str:
    text = text if isinstance(text, str) else repr(text)
    if len(text) <= limit:
        return text
    return text[: limit // 2] + f"\n... [{len(text) - limit} characters trimmed] ...\n" + text[-limit // 2:]


def plain(value: Any, depth: int = 0) -> Any:
    """``value`` as plain data (str, numbers, lists, dicts) for events and outputs: chat
    messages become ``{"role", "content"}`` maps, anything else unknown its ``repr``."""
    if depth > 20:
        return trimmed(repr(value))
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        return {str(k): plain(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [plain(v, depth + 1) for v in value]
    kind = getattr(value, "type", None)
    if isinstance(kind, str) and hasattr(value, "content"):  # a LangChain message
        out = {"role": kind, "content": plain(value.content, depth + 1)}
        for attr in ("name", "tool_calls", "tool_call_id"):
            extra = getattr(value, attr, None)
            if extra:
                out[attr] = plain(extra, depth + 1)
        return out
    if hasattr(value, "model_dump"):
        try:
            return plain(value.model_dump(mode="json"), depth + 1)
        except Exception:
            pass
    return trimmed(repr(value))


def goal_text(ctx: StepContext) -> str:
    """The goal, with last round's feedback after it when there is some."""
    if not ctx.feedback:
        return ctx.goal
    return ctx.goal + "\n\nFeedback from the last round:\n" + "\n".join(ctx.feedback)


class AdapterRole(Agent):
    """What the three adapter roles share: the extra they need, checked where they are registered."""

    extra: Extra

    @classmethod
    def installation_problem(cls, role: str) -> str | None:
        """Why ``role`` (this class) cannot run where the pool is made, or None; the pool's
        registry turns it into a ``ConfigError`` before Ray starts."""
        return cls.extra.problem(role)

