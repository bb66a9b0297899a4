"""What a user submits (:class:`Task`) and what comes back (:class:`Event`, :class:`TaskResult`)."""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

from threadbound.agents.events import (  # noqa: F401  (re-exported: the statuses users compare with)
    ADMITTED, CANCELLED, FAILED, PENDING, RUNNING, STATUSES, SUCCEEDED, TERMINAL, TIMED_OUT, WAITING,
)

from .errors import InvalidTask

MAX_KEY_LEN = 255  # an idempotency key: a UUID or a request id fits with room to spare
# Bounds of what a Task may say at all, whatever the pool's policy (which may set lower ones):
MAX_SECONDS = 366 * 86400.0  # a timeout: a year; a larger one is a mistake or an attack (float overflow)
MAX_ROUNDS = 10_000
MAX_PRIORITY = 1_000_000
MAX_COST_BUDGET = 1e12
MAX_INPUTS_DEPTH = 64  # nested lists/maps in inputs (deeper ones cannot even be pickled)


def number(name: str, value: Any, *, most: float, integer: bool = False, least: float = 0.0,
           inclusive: bool = False) -> None:
    """Raise :class:`InvalidTask` naming ``name`` unless ``value`` is a finite number
    (an integer if ``integer``) above ``least`` (or equal, if ``inclusive``) and at most
    ``most``. Never converts a huge integer to float (that overflows).

    Examples:
        >>> number("max_rounds", 3, most=10, integer=True)
        >>> number("wait_timeout_s", 10**400, most=60.0)
        Traceback (most recent call last):
        ...
        threadbound.runtime.errors.InvalidTask: invalid task: wait_timeout_s: must be a number above 0 and at most 60, got an integer of about 401 digits
    """
    kind = "an integer" if integer else "a number"
    bound = f"{'at least' if inclusive else 'above'} {_num(least)} and at most {_num(most)}"
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type:
        raise InvalidTask(name, f"must be {kind} {bound}, got {value!r:.40}")
    if isinstance(value, int) and abs(value) > 10**30:  # (its text may be too long for str() to make)
        raise InvalidTask(name, f"must be {kind} {bound}, got an integer of about "
                                f"{int(value.bit_length() * 0.30103) + 1} digits")
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidTask(name, f"must be {kind} {bound}, got {value!r}")
    if value > most or value < least or (value == least and not inclusive):
        raise InvalidTask(name, f"must be {kind} {bound}, got {value!r:.40}")


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def check_inputs(inputs: dict, most_depth: int = MAX_INPUTS_DEPTH) -> None:
    """Raise :class:`InvalidTask` naming the place in ``inputs`` that nests deeper than
    ``most_depth``, has a map key that is not a text, or holds a number that is not
    finite (JSON has no Infinity or NaN). Walks without recursion, however deep."""
    todo: list[tuple[Any, int, str]] = [(inputs, 1, "inputs")]
    while todo:
        value, depth, where = todo.pop()
        if isinstance(value, float) and not math.isfinite(value):
            raise InvalidTask(where, f"must be a finite number, got {value!r}")
        if isinstance(value, (dict, list, tuple)):
            if depth > most_depth:
                raise InvalidTask("inputs", f"nests lists and maps more than {most_depth} deep (at {where[:120]}); "
                                  "send flatter data")
            if isinstance(value, dict):
                for k, v in value.items():
                    if not isinstance(k, str):
                        raise InvalidTask(where, f"map keys must be texts, got {k!r:.40}")
                    todo.append((v, depth + 1, f"{where}.{k[:40]}"))
            else:
                todo.extend((v, depth + 1, f"{where}[{i}]") for i, v in enumerate(value))


@dataclass(frozen=True)
class Task:
    """A unit of work: a goal, a workspace, and the agents (roles) that work on it.

    Each round runs every agent once. A role starts when the roles it comes ``after``
    have committed in this round; roles that do not wait for each other run at the
    same time, each on its own agent actor (at most ``max_agents_per_task`` at once).
    An agent that calls ``ctx.request_round(feedback)`` asks for another round (up to
    ``max_rounds``); the task succeeds at the end of a round nobody asked that of.

    Attributes:
        goal: what to achieve, in words.
        workspace: a directory the agents work on, or None.
        agents: role names. None = the config's ``default_agents`` (coder, tester,
            reviewer).
        after: ``{role: [roles it comes after]}``, the task's dependency graph; a role
            not named runs at once. None = in list order, one after another (for the
            config's ``default_agents``: the config's ``default_after``, by default
            coder, then tester and reviewer together); ``{}`` = all at once.
        inputs: extra plain data handed to every step as ``ctx.inputs``.
        priority: higher is admitted first; equal priorities keep FIFO order.
        max_rounds, step_timeout_s, task_timeout_s: per-task overrides of the config
            (``task_timeout_s`` counts the time the task runs, not the time it waits).
        wait_timeout_s: how long the task may wait for a person's input (an agent's
            ``ctx.interrupt``, or the approval with ``inputs={"approve": True}``) before
            it ends ``timed_out``; None = the config's ``wait_timeout_s``.
        level: reasoning level 1-4, or ``"auto"`` to score it from the goal and the
            workspace; None = the config's ``reasoning.level``. ``max_level`` caps it.
        cost_budget: the most the task may spend on model tokens, in the price units
            of ``reasoning.levels``; the level is pushed down to stay under it. None =
            the config's ``reasoning.cost_budget``.
        degrade: False to fail the task rather than run it degraded (level 1, no
            streaming) while the pool is unhealthy.
        idempotency_key: submitting a task with a key the pool already knows returns
            the task that key made instead of starting another (across a supervisor
            restart and a resume too, for as long as the pool remembers that task:
            ``keep_finished_tasks``). The same key with a different task is refused.

    Examples:
        >>> Task(goal="make tests pass", workspace=None, agents=["coder"]).agents
        ('coder',)
    """

    goal: str
    workspace: str | os.PathLike | None = None
    agents: Sequence[str] | None = None
    after: Mapping[str, Sequence[str]] | None = None
    inputs: dict[str, Any] = field(default_factory=dict)
    priority: int = 0
    max_rounds: int | None = None
    step_timeout_s: float | None = None
    task_timeout_s: float | None = None
    level: int | str | None = None
    cost_budget: float | None = None
    degrade: bool = True
    idempotency_key: str | None = None
    wait_timeout_s: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.agents, str):
            object.__setattr__(self, "agents", (self.agents,))
        elif self.agents is not None:
            object.__setattr__(self, "agents", tuple(self.agents))
        if self.workspace is not None:
            object.__setattr__(self, "workspace", os.fspath(self.workspace))

    def validated(self, default_agents: Sequence[str],
                  default_after: Mapping[str, Sequence[str]] | None = None) -> "Task":
        """Check every field; raise :class:`InvalidTask` naming the first bad one.

        The result has ``agents`` and ``after`` filled in (``after`` maps every role)."""
        if not isinstance(self.goal, str) or not self.goal.strip():
            raise InvalidTask("goal", "must be a non-empty string saying what to achieve")
        agents = tuple(self.agents) if self.agents is not None else tuple(default_agents)
        if not agents:
            raise InvalidTask("agents", "must name at least one role, e.g. ['coder']")
        for role in agents:
            if not isinstance(role, str) or not role:
                raise InvalidTask("agents", f"role names must be non-empty strings, got {role!r}")
        if len(set(agents)) != len(agents):
            dup = sorted({r for r in agents if agents.count(r) > 1})
            raise InvalidTask("agents", f"names role(s) {', '.join(map(repr, dup))} more than once; "
                              "each role runs once per round")
        after = resolve_after(self.after, agents, default_agents, default_after)
        ws = self.workspace
        if ws is not None:
            ws = os.path.abspath(ws)
            if not os.path.isdir(ws):
                raise InvalidTask("workspace", f"{self.workspace!r} is not an existing directory; "
                                  "pass the path of the code to work on, or None")
        if self.max_rounds is not None:
            number("max_rounds", self.max_rounds, most=MAX_ROUNDS, integer=True, least=1, inclusive=True)
        for name in ("step_timeout_s", "task_timeout_s", "wait_timeout_s"):
            v = getattr(self, name)
            if v is not None:
                number(name, v, most=MAX_SECONDS)
        level = self.level
        if isinstance(level, str) and level.strip().lower() == "auto":
            level = "auto"
        elif level is not None and (isinstance(level, bool) or level not in (1, 2, 3, 4)):
            raise InvalidTask("level", f"must be 1, 2, 3, 4, 'auto' or None, got {self.level!r}")
        if self.cost_budget is not None:
            number("cost_budget", self.cost_budget, most=MAX_COST_BUDGET)
        if not isinstance(self.degrade, bool):
            raise InvalidTask("degrade", f"must be true or false, got {self.degrade!r}")
        number("priority", self.priority, most=MAX_PRIORITY, least=-MAX_PRIORITY, integer=True, inclusive=True)
        if not isinstance(self.inputs, dict):
            raise InvalidTask("inputs", f"must be a dict, got {type(self.inputs).__name__}")
        check_inputs(self.inputs)
        key = self.idempotency_key
        if key is not None and (not isinstance(key, str) or not 0 < len(key) <= MAX_KEY_LEN
                                or not key.isprintable()):
            raise InvalidTask("idempotency_key", f"must be a printable string of 1 to {MAX_KEY_LEN} "
                              f"characters, or None; got {key!r:.80}")
        return Task(goal=self.goal, workspace=ws, agents=agents, after=after, inputs=dict(self.inputs),
                    priority=self.priority, max_rounds=self.max_rounds,
                    step_timeout_s=self.step_timeout_s, task_timeout_s=self.task_timeout_s,
                    level=level, cost_budget=self.cost_budget, degrade=self.degrade, idempotency_key=key,
                    wait_timeout_s=self.wait_timeout_s)


def sequential(agents: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """The graph that runs ``agents`` one after another, in list order."""
    return {r: ((agents[i - 1],) if i else ()) for i, r in enumerate(agents)}


def resolve_after(after: Mapping[str, Sequence[str]] | None, agents: tuple[str, ...],
                  default_agents: Sequence[str] = (),
                  default_after: Mapping[str, Sequence[str]] | None = None) -> dict[str, tuple[str, ...]]:
    """The task's dependency graph with every role mapped; :class:`InvalidTask` for a bad one
    (a role not in ``agents``, a role after itself, a cycle), naming the roles."""
    if after is None:
        if default_after is not None and agents == tuple(default_agents):
            after = {r: [d for d in deps if d in agents] for r, deps in default_after.items() if r in agents}
        else:
            return sequential(agents)
    if not isinstance(after, Mapping):
        raise InvalidTask("after", f"must map a role to the roles it comes after, got {type(after).__name__}")
    graph: dict[str, tuple[str, ...]] = {r: () for r in agents}
    for role, deps in after.items():
        if role not in graph:
            raise InvalidTask("after", f"names role {role!r}, which is not among the task's agents "
                              f"{list(agents)}; add it to agents or drop it from after")
        if isinstance(deps, str):
            deps = (deps,)
        if not isinstance(deps, (list, tuple)):
            raise InvalidTask("after", f"{role!r} must map to a list of roles, got {deps!r}")
        for d in deps:
            if d == role:
                raise InvalidTask("after", f"role {role!r} comes after itself; remove it from its own list")
            if d not in graph:
                raise InvalidTask("after", f"role {role!r} comes after {d!r}, which is not among the task's "
                                  f"agents {list(agents)}")
        graph[role] = tuple(dict.fromkeys(deps))
    cycle = find_cycle(graph)
    if cycle:
        raise InvalidTask("after", "the roles wait for each other in a cycle: " + " -> ".join(cycle)
                          + "; break it so that some role starts first")
    return graph


def find_cycle(graph: Mapping[str, Sequence[str]]) -> list[str] | None:
    """A cycle of ``graph`` as ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in graph.get(node, ()):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state:
                found = visit(dep)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in graph:
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def ancestors(graph: Mapping[str, Sequence[str]], role: str) -> set[str]:
    """Every role ``role`` comes after, directly or through others."""
    seen: set[str] = set()
    todo = list(graph.get(role, ()))
    while todo:
        r = todo.pop()
        if r not in seen:
            seen.add(r)
            todo.extend(graph.get(r, ()))
    return seen


@dataclass(frozen=True)
class Event:
    """One entry of a task's append-only log.

    ``offset`` counts from 0 per task and never skips; ``kind`` is a status name
    (``pending`` ... ``timed_out``), a step event (``step_started``, ``tokens``,
    ``message``, ``step_finished``, ``step_timed_out``, ``agent_crashed``,
    ``retrying``, ...), a person's part (``input_requested``, ``input_received``,
    ``message_received``) or an agent's own kind; ``agent`` is the role or None.
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
    idempotency_key: str | None = None


@dataclass(frozen=True)
class TaskResult:
    """The final state of a task: its status and the last output of every agent.

    ``reason``: why it ended as it did when it did not succeed (``cancelled``,
    ``shutdown``, ``degraded``, ``timeout``, ``wait_timeout``, ``rejected``, ``step_failed``,
    ``rounds``, ``budget``, ...).
    ``applied``: with ``inputs={"apply": True}``, the paths of the approved change
    written back to the workspace, and ``refused``: the ones that were not, with why.
    """

    task_id: str
    status: str
    outputs: dict[str, Any]
    rounds: int
    error: str | None
    elapsed_s: float
    reason: str | None = None
    applied: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == SUCCEEDED


def result_or_raise(d: dict[str, Any]) -> TaskResult:
    """The :class:`TaskResult` of a finished task's result mapping (as the supervisor and
    the gateway send it); a task that did not succeed raises its error instead
    (:class:`TaskFailed`, :class:`TaskCancelled` with its ``reason``, :class:`TaskTimedOut`),
    the result attached as ``err.result``."""
    from .errors import TaskCancelled, TaskFailed, TaskTimedOut

    res = TaskResult(**d)
    if res.status == SUCCEEDED:
        return res
    cls = {CANCELLED: TaskCancelled, TIMED_OUT: TaskTimedOut}.get(res.status, TaskFailed)
    err = cls(f"task {res.task_id} {res.status}: {res.error}", task_id=res.task_id, elapsed=res.elapsed_s)
    err.result = res
    if isinstance(err, TaskCancelled):
        err.reason = res.reason or "cancelled"
    raise err
