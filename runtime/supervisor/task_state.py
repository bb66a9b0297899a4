"""A task's state in the supervisor, in two parts:

* :class:`TaskRecord` -- what the task *is*: its spec, its event log, its committed
  outputs and states, its rounds, its person-in-the-loop requests. Replay rebuilds it
  from a snapshot and the journal after it; this module is the one place that says how
  events, commits and journal records change it (:func:`track`, :func:`apply_commit`,
  :func:`replay`), shared by live runs, resume, and the check for unfinished work in
  an old history.
* :class:`TaskRun` -- what the task is *doing* in this supervisor: whether it waits
  for slots, runs, or is parked waiting for a person (:class:`RunState`), its runner,
  the slots it holds and which role is bound to which, its timers. Never in a
  snapshot; a resumed task starts with a fresh one.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import cloudpickle

from threadbound.agents import events as ev
from threadbound.agents.events import STEP_ENDS, Row, UnknownRecord, read_record
from threadbound.snapshots import SnapshotError

from ..task import PENDING, STATUSES, TERMINAL, Task, sequential

if TYPE_CHECKING:
    from .clock import Timer
    from .places import Slot

# What a snapshot holds of a task (everything else is rebuilt on resume).
DURABLE_FIELDS = ("id", "seq", "spec", "blob_ids", "submitted_at", "status", "round", "committed",
                  "outputs", "round_outputs", "states", "feedback", "requests", "inflight", "error",
                  "finished_at", "level", "max_rounds", "spent", "tokens", "reason", "applied", "refused",
                  "asked", "asks", "answers", "answered", "inbox", "inbox_seen", "ran_s", "waiting_since",
                  "waiting_for")
# dicts a snapshot copies (their values are replaced, never changed in place)
_COPIED = ("outputs", "round_outputs", "states", "inflight", "blob_ids", "asks", "answers", "answered", "inbox_seen")
_LISTS = ("feedback", "requests", "committed", "applied", "refused", "inbox", "waiting_for")


def digest(blob: bytes) -> str:
    """The id under which an agent class blob is stored once, however many tasks use it."""
    return hashlib.sha256(blob).hexdigest()[:24]


class RunState(enum.Enum):
    """Where a task's run stands in this supervisor (its ``status`` says where the task does)."""

    IDLE = "idle"        # nothing to run: not queued yet, or ended
    QUEUED = "queued"    # waiting for capacity to grant its slots
    RUNNING = "running"  # its runner holds slots and runs its rounds
    PARKED = "parked"    # waiting for a person's answer, holding no slot (an answer queues it)


@dataclass(eq=False)
class TaskRun:
    """The live side of a task: never snapshotted, rebuilt empty on resume."""

    state: RunState = RunState.IDLE
    runner: asyncio.Task | None = None
    slots: list["Slot"] = field(default_factory=list)  # granted by capacity, held until the run ends
    bound: "OrderedDict[str, Slot]" = field(default_factory=OrderedDict)  # role -> its slot, least recent first
    bind_keys: dict[str, str] = field(default_factory=dict)  # role -> its current binding's key
    binds: int = 0
    running: dict[str, asyncio.Task] = field(default_factory=dict)  # role -> its step, now
    cancel_reason: str | None = None
    started_at: float | None = None  # the clock's monotonic time its current run began
    wait_timer: "Timer | None" = None  # ends it timed_out when its wait_timeout_s passes


@dataclass(eq=False)
class TaskRecord:
    """The durable side of a task; see the module docstring."""

    id: str
    seq: int
    spec: Task
    blob_ids: dict[str, str]  # role -> digest of the agent class blob it was submitted with
    submitted_at: float
    status: str = PENDING
    events: list[Row] = field(default_factory=list)
    visible: int = 0  # events clients may read: the ones already in the journal
    round: int = 0
    committed: list[str] = field(default_factory=list)  # roles committed in the current round
    requests: list[str] = field(default_factory=list)  # round requests of this round so far
    inflight: dict[str, int] = field(default_factory=dict)  # role -> attempt started, not committed
    outputs: dict[str, Any] = field(default_factory=dict)  # role -> its latest committed output
    round_outputs: dict[str, Any] = field(default_factory=dict)  # outputs as the current round began
    states: dict[str, Any] = field(default_factory=dict)  # role -> committed agent state
    feedback: list[str] = field(default_factory=list)
    error: str | None = None
    reason: str | None = None  # why it ended, when it did not succeed
    applied: list[str] = field(default_factory=list)  # paths written back with inputs.apply
    refused: list[str] = field(default_factory=list)
    level: int | None = None  # reasoning level chosen for the task (None: not yet chosen)
    max_rounds: int | None = None  # rounds budget of that level
    spent: float = 0.0  # cost of the model tokens its steps used, in price units
    tokens: int = 0
    finished_at: float | None = None
    version: int = 0  # bumps on every change of what a snapshot holds of the task
    frozen: tuple[int, bytes] | None = None  # (version, pickled snapshot record) cache
    # Its events as snapshots pickled them, in chunks (events[:chunked]); a task's log
    # only grows, so each snapshot pickles the events that came since the last one.
    event_chunks: list[bytes] = field(default_factory=list, repr=False)
    chunked: int = 0
    # A person in the loop (all rebuilt from events on resume):
    asked: int = 0  # input requests made so far (their numbers are 1, 2, ...)
    asks: dict[int, dict[str, Any]] = field(default_factory=dict)  # open request -> {role, round, index}
    answers: dict[str, list[Any]] = field(default_factory=dict)  # role ("" = the approval) -> answers this round
    answered: dict[int, int] = field(default_factory=dict)  # request -> offset of its input_received
    inbox: list[Any] = field(default_factory=list)  # every message sent to the task, in order
    inbox_seen: dict[str, int] = field(default_factory=dict)  # role -> messages its committed steps saw
    ran_s: float = 0.0  # time spent running before its last wait (task_timeout_s counts only running)
    waiting_since: float | None = None  # wall clock when it last began waiting
    waiting_for: list[int] = field(default_factory=list)  # the requests open when it began waiting
    run: TaskRun = field(default_factory=TaskRun, repr=False)  # the live side (not durable)

    @property
    def graph(self) -> dict[str, tuple[str, ...]]:
        """The task's roles and what each comes after (list order for a task of format 1)."""
        after = getattr(self.spec, "after", None)
        return dict(after) if after is not None else sequential(self.spec.agents)

    @property
    def settled(self) -> bool:
        """Terminal, and every event (the final one included) readable."""
        return self.status in TERMINAL and self.visible >= len(self.events)


class TaskWaits(Exception):
    """Raised inside a task's run: a step (or the approval) waits for a person's input."""


class TaskEnds(Exception):
    """Raised inside a task's run: the task ends with ``status`` (and ``reason``)."""

    def __init__(self, status: str, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason


def track(ts: TaskRecord, row: Row) -> None:
    """What an event changes in a task."""
    _, kind, agent, data, at = row
    if kind == ev.TOKENS:  # most events by far, and they change nothing here
        return
    if kind in STATUSES:
        ts.status = kind
        if kind in TERMINAL:
            ts.finished_at, ts.error, ts.reason = at, data.get("error"), data.get("reason")
        elif kind == ev.WAITING:
            ts.ran_s, ts.waiting_since = data.get("ran_s", ts.ran_s), at
            ts.waiting_for = list(data.get("requests", ()))
    elif kind == ev.ROUND_STARTED:
        ts.round, ts.feedback, ts.committed, ts.requests = data["round"], list(data["feedback"]), [], []
        ts.round_outputs = dict(ts.outputs)
        ts.answers = {}
    elif kind == ev.WORKSPACE_LOST:  # the round starts again, from the outputs it began with
        ts.committed, ts.requests, ts.outputs = [], [], dict(ts.round_outputs)
    elif kind == ev.INPUT_REQUESTED:
        ts.asked = max(ts.asked, data["request"])
        ts.asks = {**ts.asks, data["request"]: {"role": agent, "round": data.get("round"),
                                                "index": data.get("index", 0)}}
    elif kind == ev.INPUT_RECEIVED:
        rid = data["request"]
        asks = dict(ts.asks)
        ask = asks.pop(rid, None)
        ts.asks = asks
        if ask is not None:
            key = ask["role"] or ""
            ts.answers = {**ts.answers, key: ts.answers.get(key, []) + [data.get("value")]}
        ts.answered = {**ts.answered, rid: row.offset}
    elif kind == ev.MESSAGE_RECEIVED:
        ts.inbox = ts.inbox + [data.get("message")]
    elif kind == ev.STEP_FINISHED:
        if "inbox_upto" in data:
            ts.inbox_seen = {**ts.inbox_seen, agent: data["inbox_upto"]}
        if agent in ts.answers:
            ts.answers = {k: v for k, v in ts.answers.items() if k != agent}
    elif kind in (ev.STEP_STARTED, ev.RETRYING):
        ts.inflight[agent] = data["attempt"]
    elif kind == ev.APPLIED:
        ts.applied, ts.refused = list(data.get("applied", ())), list(data.get("refused", ()))
    elif kind == ev.LEVEL:
        ts.level = data["level"]
        ts.max_rounds = data.get("max_rounds", ts.max_rounds)
    if (kind in STEP_ENDS or kind == ev.INPUT_REQUESTED) and "cost" in data:
        ts.spent += data["cost"]
        ts.tokens += data.get("tokens", 0)


def apply_commit(ts: TaskRecord, role: str, output: Any, state: Any, requests: list[str]) -> None:
    """A step's result becomes the task's: its output, its agent's state, its requests."""
    ts.outputs[role], ts.states[role] = output, state
    ts.version += 1
    if role not in ts.committed:
        ts.committed = ts.committed + [role]
    ts.requests = ts.requests + list(requests)
    ts.inflight.pop(role, None)


def tasks_from_snapshot(state: dict[str, Any]) -> dict[str, TaskRecord]:
    """The task table of a verified snapshot payload."""
    tasks = {}
    for entry in state["tasks"]:
        rec = cloudpickle.loads(entry)  # bytes from a verified payload
        ts = TaskRecord(**{f: rec[f] for f in DURABLE_FIELDS if f in rec})
        if "committed" not in rec:  # format 1: the first `done` roles of a sequential round
            ts.committed = list(ts.spec.agents[:rec.get("done", 0)])
            ts.round_outputs = dict(ts.outputs)
        chunks = list(rec.get("event_chunks", ()))
        events: list[Any] = []
        for chunk in chunks:  # (inside the verified payload, like the record)
            events.extend(cloudpickle.loads(chunk))
        ts.event_chunks, ts.chunked = chunks, len(events)  # the next snapshot pickles only what follows
        events.extend(rec["events"])  # older snapshots: every event here, as Rows or tuples
        ts.events = [r if type(r) is Row else Row(*r) for r in events]
        ts.visible = len(ts.events)
        tasks[ts.id] = ts
    return tasks


def replay(tasks: dict[str, TaskRecord], raw: Any, *,
           on_roles: Callable[[dict[str, bytes]], Any], where: str,
           on_health: Callable[[str], Any] | None = None) -> int:
    """Apply one journal record (any format :func:`~threadbound.agents.events.read_record`
    reads) to ``tasks``; returns the task number a submit used (else 0)."""
    try:
        rec = read_record(raw)
    except UnknownRecord as exc:
        raise SnapshotError(where, f"{exc}; written by a newer threadbound?") from None
    kind = rec["type"]
    if kind == ev.R_ROLES:
        on_roles(rec["roles"])
    elif kind == ev.R_HEALTH:
        if on_health is not None:
            on_health(rec["mode"])
    elif kind == ev.R_SUBMIT:
        task_id = rec["task"]
        tasks[task_id] = TaskRecord(id=task_id, seq=rec["seq"], spec=rec["spec"], blob_ids=dict(rec["blob_ids"]),
                                   submitted_at=rec["submitted_at"])
        return rec["seq"]
    elif kind == ev.R_EVENT:
        _replay_event(tasks, rec["task"], Row(rec["offset"], rec["kind"], rec["agent"], rec["data"], rec["ts"]), where)
    elif kind == ev.R_EVENTS:
        for task_id, offset, kind_, agent, data, at in rec["rows"]:
            _replay_event(tasks, task_id, Row(offset, kind_, agent, data, at), where)
    elif kind == ev.R_COMMIT:
        ts = tasks.get(rec["task"])
        if ts is not None:
            apply_commit(ts, rec["role"], rec["output"], rec["state"], rec["requests"])
    elif kind == ev.R_FORGET:
        for task_id in rec["tasks"]:
            tasks.pop(task_id, None)
    return 0


def _replay_event(tasks: dict[str, TaskRecord], task_id: str, row: Row, where: str) -> None:
    ts = tasks.get(task_id)
    if ts is None or row.offset < len(ts.events):
        return  # forgotten task, or already in the snapshot
    if row.offset > len(ts.events):
        raise SnapshotError(where, f"journal gap in task {task_id}: event {row.offset} follows "
                                   f"{len(ts.events) - 1}; the journal is incomplete")
    ts.events.append(row)
    track(ts, row)


# -- snapshots: what a snapshot holds of the task table --------------------------------

def export_tasks(tasks: dict[str, TaskRecord]) -> tuple[list[Any], list[Callable[[], None]], set[str]]:
    """Snapshot entries of ``tasks`` (shallow copies, taken between two awaits), the jobs
    that pickle them on the snapshot thread, and the agent blobs they use.

    A task's pickle is cached with the version it shows, so a task that has not changed
    since the last snapshot (a queued or finished one) costs nothing; of one that has,
    only the events since the last snapshot are copied and pickled (as a new chunk of
    plain tuples: ``event_chunks``), the earlier ones go in as the bytes they were."""
    entries: list[Any] = []
    jobs: list[Callable[[], None]] = []
    used: set[str] = set()
    for ts in tasks.values():
        used.update(ts.blob_ids.values())
        if ts.frozen is not None and ts.frozen[0] == ts.version:
            entries.append(ts.frozen[1])
            continue
        rec = {f: getattr(ts, f) for f in DURABLE_FIELDS}
        for f in _COPIED:
            rec[f] = dict(rec[f])
        for f in _LISTS:
            rec[f] = list(rec[f])
        upto = len(ts.events)
        rec["events"] = ts.events[ts.chunked:upto]  # the events no chunk holds yet (a copy)
        rec["event_chunks"] = list(ts.event_chunks)
        entries.append(rec)
        jobs.append(_pickle_job(entries, len(entries) - 1, ts, ts.version, upto))
    return entries, jobs, used


def _pickle_job(entries: list[Any], i: int, ts: TaskRecord, version: int, upto: int) -> Callable[[], None]:
    def job() -> None:
        rec = entries[i]
        new = rec["events"]
        if new:
            # Rows as plain tuples: a namedtuple pickles through cloudpickle's per-object
            # hook and a call per row, ~10x a tuple; tasks_from_snapshot makes Rows again.
            chunk = cloudpickle.dumps([tuple(r) for r in new])
            rec["event_chunks"].append(chunk)
            if ts.chunked == upto - len(new):  # (snapshots take turns: always so)
                ts.event_chunks.append(chunk)
                ts.chunked = upto
        rec["events"] = []
        entries[i] = cloudpickle.dumps(rec)
        ts.frozen = (version, entries[i])  # tagged: a later change makes it stale, not wrong

    return job
