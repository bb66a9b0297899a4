"""The events vocabulary: every kind of event a task's log holds, the event row, and the
journal records that make the log durable -- named, versioned, and the only place that
spells them.

It lives in ``agents`` because agents emit events too (``ctx.emit``) and the agents part
depends on nothing else of ours; the runtime imports it from here.

Journal records: format 3 journals the events appended together as one ``evs`` record
(:func:`events_record`: one per batch, however many tasks it spans); format 2 wrote one
``ev`` record per event; both write each record as a map with a ``type`` and named
fields (:func:`record`); format 1 wrote positional lists. :func:`read_record` reads all
three, so a journal written by an older threadbound still replays.
"""

from __future__ import annotations

from typing import Any, NamedTuple

# -- task statuses (each is also the kind of the event that enters it) -----------------
PENDING = "pending"
ADMITTED = "admitted"
RUNNING = "running"
WAITING = "waiting"                # for a person's input (``ctx.interrupt``, ``--approve``); holds no actor
SUCCEEDED = "succeeded"
FAILED = "failed"
CANCELLED = "cancelled"
TIMED_OUT = "timed_out"
STATUSES = (PENDING, ADMITTED, RUNNING, WAITING, SUCCEEDED, FAILED, CANCELLED, TIMED_OUT)
TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELLED, TIMED_OUT})

# -- rounds and steps -------------------------------------------------------------------
ROUND_STARTED = "round_started"
STEP_STARTED = "step_started"      # every attempt; a retry's carries the new attempt
STEP_FINISHED = "step_finished"    # committed
STEP_FAILED = "step_failed"        # the agent raised
STEP_TIMED_OUT = "step_timed_out"  # past step_timeout_s; its actor was killed
AGENT_CRASHED = "agent_crashed"    # its actor died
STREAM_FAILED = "stream_failed"    # its event stream broke
RETRYING = "retrying"
TOKENS = "tokens"
MESSAGE = "message"                # a non-streaming step's whole text, or held tokens
APPLIED = "applied"                # the approved change written back to the user's directory

# -- a person in the loop ----------------------------------------------------------------
INPUT_REQUESTED = "input_requested"    # request (its number), payload; agent: who asked (None: the approval)
INPUT_RECEIVED = "input_received"      # request, value: the answer, which a re-run of the step receives
MESSAGE_RECEIVED = "message_received"  # n, message: input sent to the task (``handle.send``), for ``ctx.inbox``

# -- the pool ---------------------------------------------------------------------------
LEVEL = "level"
HEALTH = "health"
RESUMED = "resumed"
WORKSPACE_LOST = "workspace_lost"  # the node with the task's copy died: its round starts again from the original

# -- the pool's health modes (a ``health`` event's ``mode``; see runtime.supervisor.health) --
NORMAL = "normal"                  # steps run at their task's level, streaming as configured
DEGRADED = "degraded"              # steps run at level 1 without streaming
PAUSED = "paused"                  # as degraded, and no new task is admitted
HEALTH_MODES = (NORMAL, DEGRADED, PAUSED)

# -- kinds the built-in agents emit (not reserved: an agent's own events) ---------------
SANDBOX = "sandbox"                # one sandboxed command run: isolation, layers, ``killed`` (the limit), exit
TEST_RESULT = "test_result"        # the tester ran the tests: ok, passed, failed, errors, killed, summary
TOOL_CALL = "tool_call"            # a tool-using agent calls a tool: n, id, name, arguments (bounded)
TOOL_RESULT = "tool_result"        # its result: n, id, name, ok, output (bounded), refused_path, bounded, sandbox
NODE_UPDATE = "node_update"        # a LangGraph graph's node updated its state: node, update (bounded)
AGENT_UPDATED = "agent_updated"    # an OpenAI Agents SDK run handed over to another agent: agent

# Step-end events: their ``cost`` and ``tokens`` add up to what a task has spent.
STEP_ENDS = frozenset({STEP_FINISHED, STEP_FAILED, STEP_TIMED_OUT, AGENT_CRASHED, STREAM_FAILED})

# Kinds only the runtime writes; an agent's ``ctx.emit`` of one is refused.
RESERVED_KINDS = frozenset(STATUSES) | STEP_ENDS | frozenset({
    ROUND_STARTED, STEP_STARTED, RETRYING, TOKENS, MESSAGE, APPLIED, LEVEL, HEALTH, RESUMED,
    INPUT_REQUESTED, INPUT_RECEIVED, MESSAGE_RECEIVED, WORKSPACE_LOST,
})

# -- events -----------------------------------------------------------------------------

EVENT_FORMAT = 1  # the row layout below; bump when it changes


class Row(NamedTuple):
    """One event of a task's log as the supervisor holds it, journals it and sends it to
    clients (who turn it into an ``Event`` naming its task)."""

    offset: int
    kind: str
    agent: str | None
    data: dict[str, Any]
    ts: float


# -- journal records --------------------------------------------------------------------

JOURNAL_FORMAT = 3

R_ROLES = "roles"      # roles: {role: agent class blob}
R_HEALTH = "health"    # mode
R_SUBMIT = "submit"    # task, seq, spec, blob_ids, submitted_at
R_EVENT = "ev"         # task, offset, kind, agent, data, ts (format 2: one event; still read)
R_EVENTS = "evs"       # rows: [[task, offset, kind, agent, data, ts], ...] (format 3: a batch)
R_COMMIT = "commit"    # task, role, output, state, requests
R_FORGET = "forget"    # tasks
RECORD_TYPES = (R_ROLES, R_HEALTH, R_SUBMIT, R_EVENT, R_EVENTS, R_COMMIT, R_FORGET)

_V1_FIELDS = {
    R_ROLES: ("roles",),
    R_HEALTH: ("mode",),
    R_SUBMIT: ("task", "seq", "spec", "blob_ids", "submitted_at"),
    R_EVENT: ("task", "offset", "kind", "agent", "data", "ts"),
    R_COMMIT: ("task", "role", "output", "state", "requests"),
    R_FORGET: ("tasks",),
}


def record(kind: str, **fields: Any) -> dict[str, Any]:
    """A journal record: ``{"type": kind, "v": JOURNAL_FORMAT, **fields}``."""
    return {"type": kind, "v": JOURNAL_FORMAT, **fields}


def events_record(rows: list[tuple[str, Row]]) -> dict[str, Any]:
    """One record for events appended together: ``(task id, row)`` pairs, any tasks."""
    return {"type": R_EVENTS, "v": JOURNAL_FORMAT, "rows": [(task_id, *row) for task_id, row in rows]}


class UnknownRecord(ValueError):
    """A journal record this version cannot read (written by a newer threadbound?)."""


def read_record(rec: Any) -> dict[str, Any]:
    """A journal record of format 1 (a positional list), 2 or 3 (a map), as a map."""
    if isinstance(rec, dict):
        if rec.get("type") not in RECORD_TYPES or rec.get("v", JOURNAL_FORMAT) > JOURNAL_FORMAT:
            raise UnknownRecord(f"journal record {rec.get('type')!r} of format {rec.get('v')!r}")
        return rec
    if isinstance(rec, (list, tuple)) and rec and rec[0] in _V1_FIELDS:
        names = _V1_FIELDS[rec[0]]
        if len(rec) - 1 != len(names):
            raise UnknownRecord(f"journal record {rec[0]!r} of format 1 has {len(rec) - 1} fields, "
                                f"expected {len(names)}")
        return {"type": rec[0], "v": 1, **dict(zip(names, rec[1:]))}
    kind = rec[0] if isinstance(rec, (list, tuple)) and rec else type(rec).__name__
    raise UnknownRecord(f"journal record {kind!r}")
