"""A task's agents in parallel, on a real local Ray: the graph decides who waits for
whom, the caps hold, and crash, resume, cancel and write-back work with steps running
at the same time."""

from __future__ import annotations

import os
import signal

import pytest
import ray
from chaos_tools import follow
from conftest import eventually, make_pool
from scripted_agents import Approver
from test_resume import check_nothing_lost_nothing_rerun

from threadbound.runtime import AgentPool, InvalidTask, RuntimeConfig, Task, TaskCancelled

pytestmark = [pytest.mark.usefixtures("ray_session"), pytest.mark.timeout(180)]

FORK = {"b": ["a"], "c": ["a"]}  # a, then b and c together: the built-in trio's shape


def intervals(events):
    """role -> (offset of its last step_started, offset of its step_finished)."""
    spans = {}
    for e in events:
        if e.kind == "step_started":
            spans[e.agent] = [e.offset, None]
        elif e.kind == "step_finished":
            spans[e.agent][1] = e.offset
    return spans


def most_at_once(events) -> int:
    running, most = set(), 0
    for e in events:
        if e.kind == "step_started":
            running.add(e.agent)
            most = max(most, len(running))
        elif e.kind in ("step_finished", "step_failed", "step_timed_out", "agent_crashed"):
            running.discard(e.agent)
    return most


def test_roles_after_the_same_role_run_at_the_same_time(pool_name):
    pool = make_pool(pool_name, snapshots={"enabled": False})
    try:
        h = pool.submit(Task(goal="fork", agents=["a", "b", "c"], after=FORK,
                             inputs={"*": {"tokens": 2}, "b": {"sleep_s": 1.0}, "c": {"sleep_s": 1.0}}))
        # while both run, the pool says so
        assert eventually(lambda: sorted(pool.stats()["running"].get(h.task_id, [])) == ["b", "c"], 30, 0.05)
        events = list(h.stream())
        assert h.result(timeout=60).ok
        spans = intervals(events)
        # a commits before b or c starts; b and c overlap (each starts before the other ends)
        assert spans["a"][1] < min(spans["b"][0], spans["c"][0])
        assert spans["b"][0] < spans["c"][1] and spans["c"][0] < spans["b"][1]
        started = {e.agent: e.data for e in events if e.kind == "step_started"}
        assert started["a"]["running"] == ["a"] and "b" in started["c"]["running"] or "c" in started["b"]["running"]
        # each ran on its own place (with one agent per actor, its own process)
        assert len({started[r]["slot"] for r in "abc"}) == 3
        if pool.stats()["actors"]["agents_per_actor"] == 1:
            assert len({started[r]["pid"] for r in "abc"}) == 3
        # and every event of a step carries its attempt
        assert all(e.data.get("attempt") == 1 for e in events if e.agent and e.kind in ("tokens", "step_started"))
    finally:
        pool.shutdown()


def test_without_after_roles_run_in_list_order_and_the_per_task_cap_holds(pool_name):
    # Warm slots: a slot started only when the second task is admitted may still be
    # starting when that task's first 0.5 s step ends, and then nothing runs at once.
    pool = make_pool(pool_name, snapshots={"enabled": False}, max_agents=3, max_agents_per_task=2, prewarm=True)
    try:
        assert eventually(lambda: all(s["pid"] for s in pool.stats()["slots"]), 60, 0.1)
        seq = pool.submit(Task(goal="in order", agents=["a", "b", "c"], inputs={"*": {"sleep_s": 0.2}}))
        free = pool.submit(Task(goal="all at once", agents=["a", "b", "c"], after={},
                                inputs={"*": {"sleep_s": 0.5}}))
        seq_events, free_events = list(seq.stream()), list(free.stream())
        assert seq.result(timeout=60).ok and free.result(timeout=60).ok
        assert most_at_once(seq_events) == 1
        order = [e.agent for e in seq_events if e.kind == "step_started"]
        assert order == ["a", "b", "c"]
        # three independent roles, two slots: two at once, the third waits (queued, not failed)
        assert most_at_once(free_events) == 2
        assert not [e for e in free_events if e.kind in ("step_failed", "retrying")]
    finally:
        pool.shutdown()


@pytest.mark.parametrize("after, names", [
    ({"b": ["z"]}, "'z'"),
    ({"z": ["a"]}, "'z'"),
    ({"a": ["a"]}, "'a' comes after itself"),
    ({"a": ["c"], "b": ["a"], "c": ["b"]}, "a -> c -> b -> a"),
])
def test_a_bad_graph_is_refused_naming_the_roles(pool_name, after, names):
    pool = make_pool(pool_name, snapshots={"enabled": False})
    try:
        with pytest.raises(InvalidTask, match="after") as err:
            pool.submit(Task(goal="bad", agents=["a", "b", "c"], after=after))
        assert names in str(err.value)
        assert pool.tasks() == []  # nothing was accepted
    finally:
        pool.shutdown()


def test_cancel_ends_every_running_step_of_the_task(pool_name):
    pool = make_pool(pool_name, snapshots={"enabled": False})
    try:
        h = pool.submit(Task(goal="cancel me", agents=["a", "b", "c"], after={},
                             inputs={"*": {"tokens": 1, "hang_on": [1]}}))
        assert eventually(lambda: len(pool.stats()["running"].get(h.task_id, [])) == 3, 30, 0.05)
        before = {s["name"]: s["generation"] for s in pool.stats()["slots"]}
        h.cancel()
        with pytest.raises(TaskCancelled) as err:
            h.result(timeout=30)
        assert err.value.reason == "cancelled" and err.value.result.reason == "cancelled"
        # every hung step's process was ended and replaced
        assert eventually(lambda: all(s["generation"] > before[s["name"]] and s["alive"]
                                      for s in pool.stats()["slots"]), 30)
        events = list(h.stream())
        assert events[-1].kind == "cancelled"
        assert not any(e.kind == "step_finished" for e in events)
    finally:
        pool.shutdown()


def test_a_supervisor_killed_while_steps_run_in_parallel_resumes_without_loss_or_rerun(pool_name, tmp_path):
    mark = tmp_path / "mark"
    mark.mkdir()
    pool = make_pool(pool_name, snapshot_interval_s=0.5, max_agents=6)
    try:
        spec = {"tokens": 6, "token_sleep_s": 0.05, "mark": str(mark), "rounds": 2}
        handles = [pool.submit(Task(goal=f"fork {i}", agents=["a", "b", "c"], after=FORK, inputs={"*": spec}))
                   for i in range(3)]
        readers = follow(handles)
        pid = ray.get(pool._sup.info.remote())["pid"]
        # When: the supervisor dies while b and c of some task run at once
        assert eventually(lambda: any(len(v) == 2 for v in pool.stats()["running"].values()), 30, 0.02)
        os.kill(pid, signal.SIGKILL)
        # Then: every task finishes, committed steps are not run again, streams have no gap
        check_nothing_lost_nothing_rerun(pool, handles, readers, str(mark))
        for r in readers:
            assert most_at_once(r.events) >= 2
    finally:
        pool.shutdown()


def test_write_back_takes_only_paths_inside_the_workspace(ray_session, tmp_path):
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "keep.py").write_text("OLD = 1\n")
    outside = tmp_path / "outside.txt"
    outside.write_text("untouched\n")
    os.symlink(outside, ws / "link.txt")
    proposal = {"keep.py": "NEW = 2\n", "../outside.txt": "pwned\n", str(outside): "pwned\n",
                "link.txt": "pwned\n", "sub/new.py": "X = 3\n", "gone.py": None}
    pool = AgentPool(RuntimeConfig(name="writeback", max_agents=1, max_agents_per_task=1, snapshots={"enabled": False},
                                   health={"enabled": False}, metrics={"port": 0}), agents={"approver": Approver})
    try:
        res = pool.submit(Task(goal="write back", workspace=ws, agents=["approver"],
                               inputs={"apply": True, "proposal": proposal})).result(timeout=60)
        assert res.ok
        assert res.applied == ["keep.py", "sub/new.py"]
        assert len(res.refused) == 3 and all("not applied" in r for r in res.refused)
        assert (ws / "keep.py").read_text() == "NEW = 2\n" and (ws / "sub" / "new.py").read_text() == "X = 3\n"
        assert outside.read_text() == "untouched\n" and os.readlink(ws / "link.txt") == str(outside)
        # without inputs.apply nothing is written
        res = pool.submit(Task(goal="no", workspace=ws, agents=["approver"],
                               inputs={"proposal": {"keep.py": "NO\n"}})).result(timeout=60)
        assert res.applied == [] and (ws / "keep.py").read_text() == "NEW = 2\n"
    finally:
        pool.shutdown()
