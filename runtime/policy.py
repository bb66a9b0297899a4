"""Who may ask for what: the powers a task's submitter uses, checked against ``policy``.

``inputs.sandbox.network: true``, ``inputs.test_command``, ``inputs.apply`` and the
``workspace`` itself are powers. The runtime config's ``policy`` section says which a
submitter may use; a refused request is an :class:`InvalidTask` naming the field and
the policy key, raised before the task is accepted.
"""

from __future__ import annotations

import os

from .config import PolicyConfig
from .errors import InvalidTask
from .task import Task


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
