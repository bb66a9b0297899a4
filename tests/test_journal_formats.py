"""Journal records of every format replay to the same task: format 1 (positional lists),
format 2 (one ``ev`` record per event) and format 3 (one ``evs`` record per batch of
events, any tasks) -- so a history written by an older threadbound still resumes."""

from __future__ import annotations

import pytest

from threadbound.agents import events as ev
from threadbound.runtime.supervisor.task_state import replay
from threadbound.runtime.task import Task
from threadbound.snapshots import SnapshotError

SPEC = Task(goal="g", agents=["a"]).validated(("a",), None)
ROWS = [(0, "pending", None, {"goal": "g"}, 1.0), (1, "admitted", None, {}, 2.0),
        (2, "running", None, {}, 3.0), (3, "step_started", "a", {"attempt": 1, "round": 1}, 4.0)]


def submit(task: str, fmt: int):
    fields = {"task": task, "seq": 1, "spec": SPEC, "blob_ids": {"a": "d"}, "submitted_at": 0.5}
    return ["submit", *fields.values()] if fmt == 1 else {"type": "submit", "v": fmt, **fields}


def records(fmt: int) -> list:
    out = [submit("t1", fmt), submit("t2", fmt)]
    if fmt == 1:
        out += [["ev", task, *row] for task in ("t1", "t2") for row in ROWS]
    elif fmt == 2:
        out += [{"type": "ev", "v": 2, "task": task, "offset": o, "kind": k, "agent": a, "data": d, "ts": t}
                for task in ("t1", "t2") for o, k, a, d, t in ROWS]
    else:  # one batch spanning both tasks, as the supervisor appends them
        out.append(ev.events_record([(task, ev.Row(*row)) for row in ROWS for task in ("t1", "t2")]))
    return out


@pytest.mark.parametrize("fmt", [1, 2, 3])
def test_every_journal_format_replays_to_the_same_tasks(fmt):
    tasks: dict = {}
    for rec in records(fmt):
        replay(tasks, rec, on_roles=lambda blobs: None, where="journal")
    for task in ("t1", "t2"):
        ts = tasks[task]
        assert ts.events == [ev.Row(*row) for row in ROWS]
        assert all(type(row) is ev.Row for row in ts.events)
        assert ts.status == "running" and ts.inflight == {"a": 1}


def test_a_batch_with_a_gap_in_a_tasks_offsets_is_refused():
    tasks: dict = {}
    replay(tasks, submit("t1", 3), on_roles=lambda blobs: None, where="journal")
    gap = ev.events_record([("t1", ev.Row(*ROWS[0])), ("t1", ev.Row(*ROWS[2]))])
    with pytest.raises(SnapshotError, match="journal gap in task t1"):
        replay(tasks, gap, on_roles=lambda blobs: None, where="journal")


def test_a_record_of_a_newer_format_is_refused_with_a_clear_reason():
    tasks: dict = {}
    with pytest.raises(SnapshotError, match="newer threadbound"):
        replay(tasks, {"type": "evs", "v": ev.JOURNAL_FORMAT + 1, "rows": []}, on_roles=lambda b: None,
               where="journal")
