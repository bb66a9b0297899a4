"""``MiniSweAgent``: a mini-swe-agent agent as a threadbound role.

mini-swe-agent's ``DefaultAgent`` runs its own loop (ask the model, run one bash
command, show the output, repeat until the model submits); this role gives it two
parts of threadbound's own:

- an ``Environment`` whose ``execute`` runs each bash command through
  :func:`threadbound.agents.sandbox.run` on the task's copy (never the user's directory,
  the copy the only writable place, other tasks' copies hidden, bounded output), and
- a ``Model`` whose ``query`` is ``ctx.ask`` on the task's model config (any backend: the
  same ``base_url``, ``api_key``, timeouts, errors and retries as the built-in roles; the
  cost budget caps it), using mini-swe-agent's text protocol (one ```mswea_bash_command
  block per answer), so it needs no tool-calling model.

The trajectory (mini-swe-agent's messages) is the step's output.
"""

from __future__ import annotations

import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

from .. import events as ev
from .. import sandbox
from ..base import StepContext
from ..builtin import workspace_of  # the built-in roles' copy of the workspace: secrets left out
from ..errors import TaskInputError
from ..workspace import Workspace, WorkspaceError
from ._common import (
    MINI_SWE_AGENT, TOOL_CALL, TOOL_RESULT, AdapterRole, drain, goal_text, positive_int, require,
    sandbox_event, sandbox_limits, sandbox_settings, settings_of, token_sink, trimmed,
)

SUBMIT_MARKER = "COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT"  # mini-swe-agent's: the first line of a command's output
ACTION_REGEX = r"```mswea_bash_command\s*\n(.*?)\n```"
# mini-swe-agent's observation (mini_textbased.yaml), shorter: the output is already bounded by the sandbox.
OBSERVATION_TEMPLATE = (
    "{% if output.exception_info %}<exception>{{output.exception_info}}</exception>\n{% endif %}"
    "<returncode>{{output.returncode}}</returncode>\n<output>\n{{output.output}}</output>")
FORMAT_ERROR_TEMPLATE = (
    "Format error: {{error}}\nEvery answer must hold EXACTLY ONE action in a ```mswea_bash_command block; "
    "when you are done, run `echo COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT` alone.")
# Commands see a pager-free, progress-bar-free shell, as in mini-swe-agent's own configs.
COMMAND_ENV = {"PAGER": "cat", "MANPAGER": "cat", "LESS": "-R", "PIP_PROGRESS_BAR": "off", "TQDM_DISABLE": "1"}

DEFAULTS: dict[str, Any] = {
    "step_limit": 30,          # model calls in one step (mini-swe-agent's step_limit)
    "command_timeout_s": 60,   # wall clock of one bash command in the sandbox
    "max_output": 10_000,      # characters of a command's output the model sees
    "agent": {},               # more of mini-swe-agent's AgentConfig (templates, wall_time_limit_seconds, ...)
}


def _import():
    os.environ.setdefault("MSWEA_SILENT_STARTUP", "1")
    # mini-swe-agent reads (and makes) a global config directory with a .env file at import;
    # point it at an empty private one so no user's .env leaks keys into the agent actor.
    os.environ.setdefault("MSWEA_GLOBAL_CONFIG_DIR", tempfile.mkdtemp(prefix="threadbound-mswea-"))
    import minisweagent
    from minisweagent.agents.default import DefaultAgent
    from minisweagent.exceptions import Submitted
    from minisweagent.models.utils.actions_text import format_observation_messages, parse_regex_actions

    return minisweagent, DefaultAgent, Submitted, format_observation_messages, parse_regex_actions


class ThreadboundModel:
    """mini-swe-agent's ``Model`` protocol over the task's model (``ctx.ask``)."""

    def __init__(self, ctx: StepContext, parse, format_observations) -> None:
        self.ctx = ctx
        self._parse = parse
        self._format_observations = format_observations
        self.config = {"model_name": ctx.model_options.get("model") or getattr(ctx.model, "name", "threadbound"),
                       "observation_template": OBSERVATION_TEMPLATE}
        self.n_calls = 0

    def query(self, messages: list[dict[str, Any]], **kwargs: Any) -> dict[str, Any]:
        prepared = [{"role": m["role"], "content": m["content"]} for m in messages
                    if m.get("role") in ("system", "user", "assistant")]
        self.n_calls += 1
        text = drain(self.ctx.ask(prepared), token_sink(self.ctx))
        extra = {"cost": 0.0, "timestamp": time.time()}
        try:
            actions = self._parse(text, action_regex=ACTION_REGEX, format_error_template=FORMAT_ERROR_TEMPLATE)
        except Exception as exc:  # FormatError: mini-swe-agent shows it to the model and goes on
            for message in getattr(exc, "messages", ()):
                message.setdefault("extra", {}).update(extra)
            raise
        return {"role": "assistant", "content": text, "extra": {"actions": actions, **extra}}

    def format_message(self, **kwargs: Any) -> dict[str, Any]:
        return dict(kwargs)

    def format_observation_messages(self, message: dict, outputs: list[dict], template_vars: dict | None = None):
        return self._format_observations(outputs, observation_template=OBSERVATION_TEMPLATE,
                                         template_vars=template_vars)

    def get_template_vars(self, **kwargs: Any) -> dict[str, Any]:
        return dict(self.config)

    def serialize(self) -> dict[str, Any]:
        return {"info": {"config": {"model": dict(self.config), "model_type": "threadbound"}}}


class SandboxEnvironment:
    """mini-swe-agent's ``Environment`` protocol: each action runs as ``bash -c`` in the
    sandbox, in the task's copy. Every run is a ``sandbox`` event and a tool call/result pair."""

    def __init__(self, ctx: StepContext, ws: Workspace, limits: sandbox.SandboxLimits, max_output: int,
                 submitted: type) -> None:
        self.ctx, self.ws, self.limits, self.max_output = ctx, ws, limits, max_output
        self.settings = sandbox_settings(ctx, ws)
        self._submitted = submitted
        self.config = {"cwd": "/workspace-copy", "timeout": limits.wall_s}
        self.runs = 0

    def execute(self, action: dict, cwd: str = "", *, timeout: int | None = None) -> dict[str, Any]:
        command = str(action.get("command", ""))
        self.runs += 1
        call_id = f"bash-{self.runs}"
        self.ctx.emit(TOOL_CALL, {"name": "bash", "arguments": {"command": trimmed(command)}, "id": call_id})
        try:
            res = sandbox.run(["bash", "-c", command], cwd=str(self.ws.path), limits=self.limits,
                              env=COMMAND_ENV, max_output=self.max_output, settings=self.settings)
        except sandbox.SandboxUnavailable as exc:
            exc.task_id, exc.agent = self.ctx.task_id, self.ctx.role
            raise
        self.ctx.emit(ev.SANDBOX, sandbox_event(res))
        output = {"output": res.output, "returncode": res.exit_code,
                  "exception_info": f"the command was killed: {res.killed} limit" if res.killed else ""}
        self.ctx.emit(TOOL_RESULT, {"name": "bash", "id": call_id, "ok": res.exit_code == 0 and not res.killed,
                                    "exit_code": res.exit_code, "killed": res.killed, "output": trimmed(res.output)})
        lines = res.output.lstrip().splitlines(keepends=True)
        if lines and lines[0].strip() == SUBMIT_MARKER and res.exit_code == 0:
            submission = "".join(lines[1:])
            raise self._submitted({"role": "exit", "content": submission,
                                   "extra": {"exit_status": "Submitted", "submission": submission}})
        return output

    def get_template_vars(self, **kwargs: Any) -> dict[str, Any]:
        # What mini-swe-agent's templates use ({{system}}, {{release}}, ...), never the
        # actor's environment variables (LocalEnvironment's would show them to the model).
        return {**platform.uname()._asdict(), **self.config, **kwargs}

    def serialize(self) -> dict[str, Any]:
        return {"info": {"config": {"environment": dict(self.config), "environment_type": "threadbound.sandbox"}}}


def _checked_agent_settings(ctx: StepContext, settings: dict[str, Any]) -> dict[str, Any]:
    """mini-swe-agent's agent settings from this role's, checked before anything runs."""
    extra = settings["agent"]
    if not isinstance(extra, dict):
        raise TaskInputError(f"inputs.{ctx.role}.agent must be a mapping of mini-swe-agent's agent settings, "
                             f"got {type(extra).__name__}", task_id=ctx.task_id, agent=ctx.role)
    for key in ("output_path", "step_limit", "cost_limit"):
        if key in extra:  # no file written from a task's input; the limits are this role's settings
            raise TaskInputError(f"inputs.{ctx.role}.agent.{key}: not settable here"
                                 + (f"; use inputs.{ctx.role}.step_limit" if key == "step_limit" else ""),
                                 task_id=ctx.task_id, agent=ctx.role)
    return {**extra, "step_limit": positive_int(ctx, settings, "step_limit", 1000), "cost_limit": 0.0}


def _templates(minisweagent) -> dict[str, str]:
    """mini-swe-agent's own system and instance templates for its text protocol."""
    import yaml

    base = yaml.safe_load((Path(minisweagent.package_dir) / "config" / "mini_textbased.yaml").read_text())["agent"]
    return {k: v for k, v in base.items() if k in ("system_template", "instance_template")}


class MiniSweAgent(AdapterRole):
    """Runs mini-swe-agent's ``DefaultAgent`` as a role: bash in the sandbox, the task's model.

    Settings (class attribute ``settings``, overridden by the task's ``inputs[<role>]``):
    ``step_limit`` (model calls per step, default 30), ``command_timeout_s`` (default 60),
    ``max_output`` (characters of a command's output, default 10,000) and ``agent`` (more of
    mini-swe-agent's agent config: ``system_template``, ``instance_template``,
    ``wall_time_limit_seconds``...). ``inputs.sandbox`` limits every command, as for the tester.

    Output: ``exit_status`` (``Submitted``, ``LimitsExceeded``...), ``submission``, ``changed``
    (files of the copy that differ from the workspace), ``commands``, ``model_calls`` and
    ``trajectory`` (mini-swe-agent's messages). Needs ``pip install -e '.[mini-swe-agent]'``.

    Examples:
        >>> class Fixer(MiniSweAgent):
        ...     settings = {"step_limit": 10}
        >>> Fixer.installation_problem("fixer") is None or "mini-swe-agent" in Fixer.installation_problem("fixer")
        True
    """

    extra = MINI_SWE_AGENT
    settings: dict[str, Any] = {}

    def step(self, ctx: StepContext) -> dict[str, Any]:
        require(self.extra, ctx)
        conf = settings_of(ctx, DEFAULTS, dict(self.settings))
        wall = conf["command_timeout_s"]
        if isinstance(wall, bool) or not isinstance(wall, (int, float)) or not 0 < wall <= 3600:
            raise TaskInputError(f"inputs.{ctx.role}.command_timeout_s: must be a number of seconds from 0 to "
                                 f"3600, got {wall!r}", task_id=ctx.task_id, agent=ctx.role)
        max_output = positive_int(ctx, conf, "max_output", 200_000)
        agent_settings = _checked_agent_settings(ctx, conf)
        limits = sandbox_limits(ctx, float(wall))
        ws = workspace_of(ctx)
        minisweagent, DefaultAgent, Submitted, format_observations, parse = _import()
        model = ThreadboundModel(ctx, parse, format_observations)
        env = SandboxEnvironment(ctx, ws, limits, max_output, Submitted)
        agent = DefaultAgent(model, env, **{**_templates(minisweagent), **agent_settings})
        result = agent.run(task=goal_text(ctx))
        try:
            changed: list[str] | None = ws.changed()
        except WorkspaceError:  # a copy too large to compare whole: say so, never half of it
            changed = None
        return {
            "exit_status": result.get("exit_status", ""), "submission": result.get("submission", ""),
            "changed": changed, "commands": env.runs, "model_calls": model.n_calls,
            "trajectory": [{"role": m.get("role"), "content": trimmed(m.get("content") or "", 20_000)}
                           for m in agent.messages],
        }
