"""What a user submits (:class:`Task`) and what comes back (:class:`Event`, :class:`TaskResult`)."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

from .errors import InvalidTask

PENDING, ADMITTED, RUNNING = "pending", "admitted", "running"
SUCCEEDED, FAILED, CANCELLED, TIMED_OUT = "succeeded", "failed", "cancelled", "timed_out"
TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELLED, TIMED_OUT})
STATUSES = (PENDING, ADMITTED, RUNNING, SUCCEEDED, FAILED, CANCELLED, TIMED_OUT)


@dataclass(frozen=True)
class Task:
    """A unit of work: a goal, a workspace, and the agents (roles) that work on it.

    Each round runs the agents in order, one step each; an agent that calls
    ``ctx.request_round(feedback)`` asks for another round (up to ``max_rounds``).

    Attributes:
        goal: what to achieve, in words.
        workspace: a directory the agents work on, or None.
        agents: role names, run in this order every round. None = the config's
            ``default_agents`` (coder, tester, reviewer).
        inputs: extra plain data handed to every step as ``ctx.inputs``.
        priority: higher is admitted first; equal priorities keep FIFO order.
        max_rounds, step_timeout_s, task_timeout_s: per-task overrides of the config.
        level: reasoning level 1-4, or ``"auto"`` to score it from the goal and the
            workspace; None = the config's ``reasoning.level``. ``max_level`` caps it.
        cost_budget: the most the task may spend on model tokens, in the price units
            of ``reasoning.levels``; the level is pushed down to stay under it. None =
            the config's ``reasoning.cost_budget``.
        degrade: False to fail the task rather than run it degraded (level 1, no
            streaming) while the pool is unhealthy.

    Examples:
        >>> Task(goal="make tests pass", workspace=None, agents=["coder"]).agents
        ('coder',)
    """

    goal: str
    workspace: str | os.PathLike | None = None
    agents: Sequence[str] | None = None
    inputs: dict[str, Any] = field(default_factory=dict)
    priority: int = 0
    max_rounds: int | None = None
    step_timeout_s: float | None = None
    task_timeout_s: float | None = None
    level: int | str | None = None
    cost_budget: float | None = None
    degrade: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.agents, str):
            object.__setattr__(self, "agents", (self.agents,))
        elif self.agents is not None:
            object.__setattr__(self, "agents", tuple(self.agents))
        if self.workspace is not None:
            object.__setattr__(self, "workspace", os.fspath(self.workspace))

    def validated(self, default_agents: Sequence[str]) -> "Task":
        """Check every field; raise :class:`InvalidTask` naming the first bad one."""
        if not isinstance(self.goal, str) or not self.goal.strip():
            raise InvalidTask("goal", "must be a non-empty string saying what to achieve")
        agents = tuple(self.agents) if self.agents is not None else tuple(default_agents)
        if not agents:
            raise InvalidTask("agents", "must name at least one role, e.g. ['coder']")
        for role in agents:
            if not isinstance(role, str) or not role:
                raise InvalidTask("agents", f"role names must be non-empty strings, got {role!r}")
        ws = self.workspace
        if ws is not None:
            ws = os.path.abspath(ws)
            if not os.path.isdir(ws):
                raise InvalidTask("workspace", f"{self.workspace!r} is not an existing directory; "
                                  "pass the path of the code to work on, or None")
        for name in ("max_rounds", "step_timeout_s", "task_timeout_s"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0):
                raise InvalidTask(name, f"must be a positive number or None, got {v!r}")
        level = self.level
        if isinstance(level, str) and level.strip().lower() == "auto":
            level = "auto"
        elif level is not None and (isinstance(level, bool) or level not in (1, 2, 3, 4)):
            raise InvalidTask("level", f"must be 1, 2, 3, 4, 'auto' or None, got {self.level!r}")
        b = self.cost_budget
        if b is not None and (isinstance(b, bool) or not isinstance(b, (int, float)) or b <= 0):
            raise InvalidTask("cost_budget", f"must be a positive number (price units) or None, got {b!r}")
        if not isinstance(self.degrade, bool):
            raise InvalidTask("degrade", f"must be true or false, got {self.degrade!r}")
        if not isinstance(self.priority, int) or isinstance(self.priority, bool):
            raise InvalidTask("priority", f"must be an integer, got {self.priority!r}")
        if not isinstance(self.inputs, dict):
            raise InvalidTask("inputs", f"must be a dict, got {type(self.inputs).__name__}")
        return Task(goal=self.goal, workspace=ws, agents=agents, inputs=dict(self.inputs),
                    priority=self.priority, max_rounds=self.max_rounds,
                    step_timeout_s=self.step_timeout_s, task_timeout_s=self.task_timeout_s,
                    level=level, cost_budget=self.cost_budget, degrade=self.degrade)


@dataclass(frozen=True)
class Event:
    """One entry of a task's append-only log.

    ``offset`` counts from 0 per task and never skips; ``kind`` is a status name
    (``pending`` ... ``timed_out``), a step event (``step_started``, ``tokens``,
    ``message``, ``step_finished``, ``step_timed_out``, ``agent_crashed``,
    ``retrying``, ...) or an agent's own kind; ``agent`` is the role or None.
    """

    task_id: str
    offset: int
    kind: str
    agent: str | None
    data: dict[str, Any]
    ts: float

    @property
    def terminal(self) -> bool:
        """True for the task's last event (a final status)."""
        return self.kind in TERMINAL

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class TaskSummary:
    """A row of ``pool.tasks()``."""

    task_id: str
    status: str
    goal: str
    agents: tuple[str, ...]
    round: int
    events: int
    submitted_at: float
    finished_at: float | None
    error: str | None


@dataclass(frozen=True)
class TaskResult:
    """The final state of a task: its status and the last output of every agent."""

    task_id: str
    status: str
    outputs: dict[str, Any]
    rounds: int
    error: str | None
    elapsed_s: float

    @property
    def ok(self) -> bool:
        return self.status == SUCCEEDED
