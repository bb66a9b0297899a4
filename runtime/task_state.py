"""A task's state in the supervisor, and the one place that says how events, commits
and journal records change it -- shared by live runs, journal replay on resume, and
the check for unfinished work in an old history."""

from __future__ import annotations

import asyncio
import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import cloudpickle

from threadbound.snapshots import SnapshotError

from .task import PENDING, STATUSES, TERMINAL, Task

if TYPE_CHECKING:
    from .slots import Slot

# What a snapshot holds of a task (everything else is rebuilt on resume).
DURABLE_FIELDS = ("id", "seq", "spec", "blob_ids", "submitted_at", "status", "round", "done",
                  "outputs", "states", "feedback", "requests", "inflight", "error", "finished_at",
                  "level", "max_rounds", "spent", "tokens")
# Step-end events; their ``cost`` and ``tokens`` add up to what a task has spent.
STEP_ENDS = frozenset({"step_finished", "step_failed", "step_timed_out", "agent_crashed", "stream_failed"})


def digest(blob: bytes) -> str:
    """The id under which an agent class blob is stored once, however many tasks use it."""
    return hashlib.sha256(blob).hexdigest()[:24]


@dataclass(eq=False)
class TaskState:
    id: str
    seq: int
    spec: Task
    blob_ids: dict[str, str]  # role -> digest of the agent class blob it was submitted with
    submitted_at: float
    status: str = PENDING
    events: list[tuple] = field(default_factory=list)
    visible: int = 0  # events clients may read: the ones already in the journal
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    round: int = 0
    done: int = 0  # steps of the current round committed, in agents order
    requests: list[str] = field(default_factory=list)  # round requests of this round so far
    inflight: dict[str, int] = field(default_factory=dict)  # role -> attempt started, not committed
    outputs: dict[str, Any] = field(default_factory=dict)
    states: dict[str, Any] = field(default_factory=dict)  # role -> committed agent state
    feedback: list[str] = field(default_factory=list)
    error: str | None = None
    level: int | None = None  # reasoning level chosen for the task (None: not yet chosen)
    max_rounds: int | None = None  # rounds budget of that level
    spent: float = 0.0  # cost of the model tokens its steps used, in price units
    tokens: int = 0
    started_at: float | None = None
    finished_at: float | None = None
    version: int = 0  # bumps on every change of what a snapshot holds of the task
    frozen: tuple[int, bytes] | None = None  # (version, pickled snapshot record) cache
    slots: list["Slot"] = field(default_factory=list)
    bound: "OrderedDict[str, Slot]" = field(default_factory=OrderedDict)
    bind_keys: dict[str, str] = field(default_factory=dict)
    binds: int = 0
    runner: asyncio.Task | None = None
    cancel_reason: str | None = None


def track(ts: TaskState, row: tuple) -> None:
    """What an event changes in a task."""
    _, kind, agent, data, at = row
    if kind in STATUSES:
        ts.status = kind
        if kind in TERMINAL:
            ts.finished_at, ts.error = at, data.get("error")
    elif kind == "round_started":
        ts.round, ts.feedback, ts.done, ts.requests = data["round"], list(data["feedback"]), 0, []
    elif kind in ("step_started", "retrying"):
        ts.inflight[agent] = data["attempt"]
    elif kind == "level":
        ts.level = data["level"]
        ts.max_rounds = data.get("max_rounds", ts.max_rounds)
    if kind in STEP_ENDS and "cost" in data:
        ts.spent += data["cost"]
        ts.tokens += data.get("tokens", 0)


def apply_commit(ts: TaskState, role: str, output: Any, state: Any, requests: list[str]) -> None:
    """A step's result becomes the task's: its output, its agent's state, its requests."""
    ts.outputs[role], ts.states[role] = output, state
    ts.version += 1
    ts.done += 1
    ts.requests = ts.requests + list(requests)
    ts.inflight.pop(role, None)


def tasks_from_snapshot(state: dict[str, Any]) -> dict[str, TaskState]:
    """The task table of a verified snapshot payload."""
    tasks = {}
    for entry in state["tasks"]:
        rec = cloudpickle.loads(entry)  # bytes from a verified payload
        ts = TaskState(**{f: rec[f] for f in DURABLE_FIELDS if f in rec})
        ts.events = list(rec["events"])
        ts.visible = len(ts.events)
        tasks[ts.id] = ts
    return tasks


def replay(tasks: dict[str, TaskState], rec: list[Any], *,
           on_roles: Callable[[dict[str, bytes]], Any], where: str,
           on_health: Callable[[str], Any] | None = None) -> int:
    """Apply one journal record to ``tasks``; returns the task number a submit used (else 0)."""
    kind = rec[0]
    if kind == "roles":
        on_roles(rec[1])
    elif kind == "health":
        if on_health is not None:
            on_health(rec[1])
    elif kind == "submit":
        _, task_id, seq, spec, blob_ids, submitted_at = rec
        tasks[task_id] = TaskState(id=task_id, seq=seq, spec=spec, blob_ids=dict(blob_ids),
                                   submitted_at=submitted_at)
        return seq
    elif kind == "ev":
        _, task_id, offset, ev_kind, agent, data, at = rec
        ts = tasks.get(task_id)
        if ts is None or offset < len(ts.events):
            return 0  # forgotten task, or already in the snapshot
        if offset > len(ts.events):
            raise SnapshotError(where, f"journal gap in task {task_id}: event {offset} follows "
                                       f"{len(ts.events) - 1}; the journal is incomplete")
        row = (offset, ev_kind, agent, data, at)
        ts.events.append(row)
        track(ts, row)
    elif kind == "commit":
        _, task_id, role, output, agent_state, requests = rec
        ts = tasks.get(task_id)
        if ts is not None:
            apply_commit(ts, role, output, agent_state, requests)
    elif kind == "forget":
        for task_id in rec[1]:
            tasks.pop(task_id, None)
    else:
        raise SnapshotError(where, f"unknown journal record {kind!r}; written by a newer threadbound?")
    return 0
