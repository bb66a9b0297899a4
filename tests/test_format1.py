"""A history written by threadbound's format 1 (positional journal records, a task
state counting committed steps) still resumes: the files under tests/data/format1 were
written by the code before the events vocabulary and the agent graph (commit 2f17384),
by a pool killed while its second task's step ``b`` ran.

No Ray here: the supervisor is a plain class, restored in this process."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from threadbound.agents import events as ev
from threadbound.runtime import RuntimeConfig
from threadbound.runtime.supervisor.core import Supervisor

pytestmark = pytest.mark.timeout(60)

DATA = Path(__file__).parent / "data" / "format1"


def _never(name: str):
    raise AssertionError("restoring a history starts no actor")


@pytest.fixture()
def restored(tmp_path, monkeypatch):
    shutil.copytree(DATA / "format1", tmp_path / "snapshots" / "format1")
    monkeypatch.setenv("THREADBOUND_SNAPSHOT_KEY", (DATA / "snapshot.key").read_text().strip())
    cfg = RuntimeConfig(name="format1", snapshot_dir=str(tmp_path / "snapshots"), max_agents=3,
                        health={"enabled": False}, metrics={"port": 0})
    sup = Supervisor(cfg, {}, make_actor=_never, resume=True)
    assert sup.fatal is None, sup.fatal
    yield sup
    if sup.durable is not None and sup.durable.lease is not None:
        sup.durable.lease.release()


def test_format1_records_read_as_named_records():
    assert ev.read_record(["commit", "t1", "a", {"x": 1}, None, []]) == {
        "type": "commit", "v": 1, "task": "t1", "role": "a", "output": {"x": 1}, "state": None, "requests": []}
    assert ev.read_record(ev.record(ev.R_FORGET, tasks=["t1"]))["tasks"] == ["t1"]
    with pytest.raises(ev.UnknownRecord):
        ev.read_record(["commit", "t1"])  # a format-1 record cut short
    with pytest.raises(ev.UnknownRecord):
        ev.read_record({"type": "ev", "v": ev.JOURNAL_FORMAT + 1})  # from a newer threadbound


def test_a_format1_snapshot_and_journal_resume_with_nothing_lost(restored):
    sup = restored
    first, second = sorted(sup.tasks.values(), key=lambda ts: ts.seq)
    # The task that finished before the crash is as it ended.
    assert first.status == "succeeded" and set(first.outputs) == {"a", "b", "c"}
    # The interrupted one: `a` committed (from a format-1 journal record), `b` in flight.
    assert second.status not in ev.TERMINAL
    assert second.committed == ["a"] and second.inflight == {"b": 1}
    assert second.outputs["a"]["calls"] == 1 and "b" not in second.outputs
    # Its graph is the list order format 1 ran in; offsets continue without a gap.
    assert second.graph == {"a": (), "b": ("a",), "c": ("b",)}
    assert [row[0] for row in second.events] == list(range(len(second.events)))
    resumed = second.events[-1]
    assert resumed[1] == ev.RESUMED and resumed[3]["restarting"] == {"b": 1} and resumed[3]["committed"] == ["a"]
    assert sup.resumed["tasks"] == [second.id]
    # and it waits in the queue to be admitted again
    assert sup.capacity.waiting() == [second.id]
