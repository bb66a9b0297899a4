"""Who may ask for what: the powers a task's submitter uses, checked against ``policy``.

``inputs.sandbox.network: true``, ``inputs.test_command``, ``inputs.apply`` and the
``workspace`` itself are powers. The runtime config's ``policy`` section says which a
submitter may use; a refused request is an :class:`InvalidTask` naming the field and
the policy key, raised before the task is accepted.

Sizes are powers too: the policy caps a task's ``max_rounds``, the size of its goal and
inputs, how deep its inputs nest, and each sandbox limit it may ask for, so that a
submitter cannot make the pool run, store or stream without end.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os

from threadbound.agents.sandbox import SandboxLimits

from .config import PolicyConfig
from .errors import InvalidTask
from .task import Task, check_inputs, number


def check(task: Task, policy: PolicyConfig) -> None:
    """Raise :class:`InvalidTask` if ``task`` asks for a power ``policy`` does not grant.

    Examples:
        >>> check(Task(goal="g", inputs={"sandbox": {"network": True}}), PolicyConfig(network=True))
        >>> check(Task(goal="g", inputs={"sandbox": {"network": True}}), PolicyConfig())
        Traceback (most recent call last):
        ...
        threadbound.runtime.errors.InvalidTask: invalid task: inputs.sandbox.network: the pool's policy does not \
let a task use the network (policy.network is false); drop it, or set policy.network: true in the runtime config \
for trusted submitters
    """
    inputs = task.inputs or {}
    sizes(task, policy)
    box = inputs.get("sandbox")
    if isinstance(box, dict) and box.get("network") and not policy.network:
        raise InvalidTask("inputs.sandbox.network", "the pool's policy does not let a task use the network "
                          "(policy.network is false); drop it, or set policy.network: true in the runtime "
                          "config for trusted submitters")
    if inputs.get("test_command") and not policy.test_command:
        raise InvalidTask("inputs.test_command", "the pool's policy does not let a task choose its test command "
                          "(policy.test_command is false); drop it to run pytest")
    if inputs.get("apply") and not policy.apply:
        raise InvalidTask("inputs.apply", "the pool's policy does not let a task write its change back "
                          "(policy.apply is false); drop it and apply the diff from the result yourself")
    if task.workspace is not None and policy.workspace_roots:
        ws = os.path.realpath(task.workspace)
        roots = [os.path.realpath(r) for r in policy.workspace_roots]
        if not any(ws == r or ws.startswith(r.rstrip("/") + "/") for r in roots):
            raise InvalidTask("workspace", f"{task.workspace!r} is outside the directories the pool's policy "
                              f"allows (policy.workspace_roots: {', '.join(roots)}); use a workspace under one "
                              "of them")


def sizes(task: Task, policy: PolicyConfig) -> None:
    """Raise :class:`InvalidTask` when ``task`` is larger than ``policy`` lets a task be:
    its ``max_rounds``, goal, inputs (size and depth) and ``inputs.sandbox`` limits."""
    if task.max_rounds is not None:
        number("max_rounds", task.max_rounds, most=10_000, integer=True, least=1, inclusive=True)
        if task.max_rounds > policy.max_rounds:
            raise InvalidTask("max_rounds", f"{task.max_rounds} is more rounds than the pool's policy lets a task "
                              f"ask for ({policy.max_rounds}, policy.max_rounds); ask for fewer, or raise "
                              "policy.max_rounds in the runtime config")
    if isinstance(task.goal, str):
        size = len(task.goal.encode("utf-8", "surrogatepass"))
        if size > policy.max_goal_bytes:
            raise InvalidTask("goal", f"is {size} bytes; the pool's policy takes at most {policy.max_goal_bytes} "
                              "(policy.max_goal_bytes): say what to do in words and put the material in the "
                              "workspace")
    inputs = task.inputs if isinstance(task.inputs, dict) else {}
    check_inputs(inputs, policy.max_inputs_depth)
    try:
        size = len(json.dumps(inputs, default=repr, allow_nan=False).encode("utf-8", "surrogatepass"))
    except (ValueError, RecursionError) as exc:
        raise InvalidTask("inputs", f"cannot be written as JSON: {exc}") from None
    if size > policy.max_inputs_bytes:
        raise InvalidTask("inputs", f"is {size} bytes as JSON; the pool's policy takes at most "
                          f"{policy.max_inputs_bytes} (policy.max_inputs_bytes): put large material in the "
                          "workspace")
    box = inputs.get("sandbox")
    if box is None:
        return
    known = [f.name for f in dataclasses.fields(SandboxLimits)]
    if not isinstance(box, dict):
        raise InvalidTask("inputs.sandbox", f"must be a map of limits ({', '.join(known)}), got {box!r:.40}")
    for key, value in box.items():
        if key not in known:
            near = difflib.get_close_matches(str(key), known, 1)
            raise InvalidTask(f"inputs.sandbox.{str(key)[:40]}", "is not a sandbox limit"
                              + (f"; did you mean {near[0]!r}?" if near else f"; the limits are {', '.join(known)}"))
        if key == "network":
            if not isinstance(value, bool):
                raise InvalidTask("inputs.sandbox.network", f"must be true or false, got {value!r:.40}")
            continue
        most = policy.sandbox_limits.get(key, math.inf)
        integer = isinstance(getattr(SandboxLimits, key), int)
        number(f"inputs.sandbox.{key}", value, most=1e15, integer=integer)
        if math.isfinite(most) and value > most:
            raise InvalidTask(f"inputs.sandbox.{key}", f"{value!r:.40} is above what the pool's policy lets a task "
                              f"ask for ({most:g}, policy.sandbox_limits.{key}); ask for less")
