"""Crash, resume, and nothing is lost or run twice: on a real local Ray."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import ray
from chaos_tools import follow, kill_busy_agents, runs
from conftest import SNAPSHOTS, eventually, make_pool, pool_settings

from threadbound.runtime import AgentPool, Task
from threadbound.snapshots import HistoryExists, LeaseHeld

pytestmark = [pytest.mark.usefixtures("ray_session"), pytest.mark.timeout(180)]


def workload(mark, n=5, tokens=8, token_sleep_s=0.03, rounds=2, **extra):
    spec = {"tokens": tokens, "token_sleep_s": token_sleep_s, "mark": str(mark), "rounds": rounds, **extra}
    return [Task(goal=f"task {i}", agents=["a", "b", "c"], inputs={"*": spec}) for i in range(n)]


def check_nothing_lost_nothing_rerun(pool, handles, readers, mark):
    for h in handles:
        assert h.result(timeout=120).status == "succeeded"
    executions = runs(mark)
    effects = set(os.listdir(os.path.join(mark, "effects")))
    for h, r in zip(handles, readers):
        r.join(30)
        assert r.error is None, r.error
        offsets = [ev.offset for ev in r.events]
        assert offsets == list(range(len(offsets))), "the stream has a duplicate or a gap"
        finished = [ev for ev in r.events if ev.kind == "step_finished"]
        resumed_at = next((ev.offset for ev in r.events if ev.kind == "resumed"), None)
        for ev in finished:
            key = f"{h.task_id}:{ev.data['round']}:{ev.agent}:{ev.data['attempt']}"
            assert key.replace(":", "_") in effects  # its external effect happened once
            if resumed_at is None or ev.offset < resumed_at:
                assert executions[key] == 1, f"committed step {key} ran {executions[key]} times"
            else:
                assert executions[key] <= 2  # at most: the run the crash cut short, then this one
        # The agents' committed state was restored, not rebuilt by re-running steps.
        result = h.result()
        for role in "abc":
            assert result.outputs[role]["calls"] == sum(1 for ev in finished if ev.agent == role)
    return executions


@pytest.mark.parametrize("when", ["mid-stream", "between steps", "mid-snapshot-write"])
def test_supervisor_killed_at_any_point_resumes_without_loss_or_rerun(pool_name, tmp_path, when):
    # Given: a multi-task run with streams followed by clients
    mark = tmp_path / "mark"
    mark.mkdir()
    extra = {"ballast": "x" * (8 << 20)} if when == "mid-snapshot-write" else {}
    # (8 MiB of inputs make each snapshot slow to write; the policy lets this pool take them)
    big = {"policy": {"max_inputs_bytes": 16 << 20}} if extra else {}
    pool = make_pool(pool_name, snapshot_interval_s=0.2 if extra else 0.5, max_agents=3, **big)
    try:
        handles = [pool.submit(t) for t in workload(mark, n=4, **extra)]
        readers = follow(handles)
        pid = ray.get(pool._sup.info.remote())["pid"]
        # When: the supervisor's process is SIGKILLed at the chosen point
        location = os.path.join(SNAPSHOTS, pool_name)
        if when == "mid-stream":
            assert eventually(lambda: any(ev.kind == "tokens" for r in readers for ev in r.events[5:]), 30)
        elif when == "between steps":
            assert eventually(lambda: sum(ev.kind == "step_finished" for r in readers for ev in r.events) >= 3, 30)
        else:
            assert eventually(lambda: any(n.startswith(".snap-") for n in os.listdir(location)), 30, 0.001)
        os.kill(pid, signal.SIGKILL)
        # Then: Ray restarts it, it resumes from its snapshots, and every task finishes
        check_nothing_lost_nothing_rerun(pool, handles, readers, str(mark))
        info = ray.get(pool._sup.info.remote())
        assert info["pid"] != pid and info["resumed"] is not None
        assert any(ev.kind == "resumed" for r in readers for ev in r.events)
    finally:
        pool.shutdown()


DRIVER = """
import sys, time
from scripted_agents import Scripted
from threadbound.runtime import AgentPool, RuntimeConfig, Task
pool = AgentPool(RuntimeConfig.from_mapping({settings!r}), agents={{r: Scripted for r in "abc"}})
handles = [pool.submit(Task(**t)) for t in {tasks!r}]
print(" ".join(h.task_id for h in handles), flush=True)
time.sleep(3600)
"""


def test_driver_killed_then_resumed_by_another_process(pool_name, tmp_path):
    # Given: a driver process that owns the pool (its supervisor dies with it)
    mark = tmp_path / "mark"
    mark.mkdir()
    tasks = [dict(goal=t.goal, agents=list(t.agents), inputs=t.inputs) for t in workload(mark, n=4)]
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(DRIVER).format(
        settings=pool_settings(pool_name, snapshot_interval_s=0.5), tasks=tasks)],
        stdout=subprocess.PIPE, text=True, env={**os.environ})
    try:
        ids = child.stdout.readline().split()
        assert len(ids) == 4
        assert eventually(lambda: os.path.exists(mark / "runs.log") and sum(runs(str(mark)).values()) >= 4, 60)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    # When: another process resumes from the snapshot directory
    pool = AgentPool.resume(SNAPSHOTS, name=pool_name)
    try:
        assert pool.resumed["tasks"]
        handles = [pool.task(i) for i in ids]
        readers = follow(handles)
        # Then: same ids, offsets continue, committed steps are not run again
        check_nothing_lost_nothing_rerun(pool, handles, readers, str(mark))
        # ... and the tasks were admitted again in their submission order
        readmitted = []
        for h, r in zip(handles, readers):
            after = [ev for ev in r.events if ev.kind == "resumed"]
            if after:
                readmitted.append((next(ev.ts for ev in r.events
                                        if ev.kind == "admitted" and ev.offset > after[0].offset), h.task_id))
        assert [t for _, t in sorted(readmitted)] == sorted(t for _, t in readmitted)
    finally:
        pool.shutdown()


def test_killing_agent_actors_at_random_loses_nothing(pool_name, tmp_path):
    mark = tmp_path / "mark"
    mark.mkdir()
    pool = make_pool(pool_name, retry={"max_attempts": 6, "backoff_s": 0.05, "max_backoff_s": 0.2})
    try:
        handles = [pool.submit(t) for t in workload(mark, n=4, tokens=6)]
        readers = follow(handles)
        killed = kill_busy_agents(pool, 4)
        assert killed == 4
        check_nothing_lost_nothing_rerun(pool, handles, readers, str(mark))
        crashes = sum(ev.kind == "agent_crashed" for r in readers for ev in r.events)
        assert crashes >= 1
    finally:
        pool.shutdown()


def test_a_damaged_newest_snapshot_falls_back_loudly(pool_name, tmp_path):
    mark = tmp_path / "mark"
    mark.mkdir()
    pool = make_pool(pool_name, snapshot_interval_s=60)
    handles = [pool.submit(t) for t in workload(mark, n=2, tokens=20, token_sleep_s=0.05)]
    assert eventually(lambda: sum(runs(str(mark)).values()) >= 2 if (mark / "runs.log").exists() else False, 30)
    pool.snapshot()
    pool.snapshot()
    ray.kill(pool._sup, no_restart=True)  # a crash the pool does not come back from by itself
    location = os.path.join(SNAPSHOTS, pool_name)
    newest = sorted(n for n in os.listdir(location) if n.startswith("snap-"))[-1]
    path = os.path.join(location, newest)
    data = bytearray(open(path, "rb").read())
    data[-10] ^= 0xFF
    open(path, "wb").write(bytes(data))
    resumed = AgentPool.resume(location)
    try:
        assert resumed.resumed["skipped"] and newest in resumed.resumed["skipped"][0]
        for h in handles:
            h = resumed.task(h.task_id)
            events = list(h.stream())
            notice = next(ev for ev in events if ev.kind == "resumed")
            assert "SHA-256" in notice.data["skipped"][0]
            assert h.result(timeout=60).status == "succeeded"
    finally:
        resumed.shutdown()


def test_a_second_supervisor_on_the_same_location_refuses_to_start(pool_name):
    pool = make_pool(pool_name)
    try:
        with pytest.raises(LeaseHeld, match=r"another supervisor holds .* \(pid \d+ on"):
            make_pool(pool_name, ray={"namespace": "elsewhere"})
    finally:
        pool.shutdown()


def test_a_fresh_pool_refuses_an_unfinished_history_but_reuses_a_finished_one(pool_name):
    # Given: a pool that dies with a task unfinished
    pool = make_pool(pool_name)
    task_id = pool.submit(Task(goal="g", agents=["a"], inputs={"a": {"sleep_s": 30}})).task_id
    ray.kill(pool._sup, no_restart=True)
    eventually(lambda: _gone(pool_name), 15)
    # Then: a fresh pool there refuses, naming the task and how to resume it
    with pytest.raises(HistoryExists, match=rf"left 1 unfinished task\(s\) \({task_id}\).*threadbound resume"):
        make_pool(pool_name)
    # When: the task is finished off by a resume, and that pool dies without a shutdown
    resumed = AgentPool.resume(SNAPSHOTS, name=pool_name)
    resumed.task(task_id).cancel()
    ray.kill(resumed._sup, no_restart=True)
    eventually(lambda: _gone(pool_name), 15)
    # Then: nothing is left to resume, so a fresh pool starts a new history
    again = make_pool(pool_name)
    try:
        assert again.tasks() == []
    finally:
        again.shutdown()


def _gone(name):
    try:
        ray.get_actor(name, namespace="threadbound")
    except ValueError:
        return True
    return False


def test_a_pool_on_a_file_url_resumes_after_its_supervisor_is_killed(pool_name, tmp_path):
    # Given: snapshots on an fsspec URL (the path a cluster's shared storage takes)
    mark = tmp_path / "mark"
    mark.mkdir()
    pool = make_pool(pool_name, snapshot_dir=f"file://{tmp_path}/snaps", snapshot_interval_s=0.3)
    try:
        handles = [pool.submit(t) for t in workload(mark, n=3)]
        readers = follow(handles)
        assert eventually(lambda: sum(ev.kind == "step_finished" for r in readers for ev in r.events) >= 2, 30)
        # When: its process is SIGKILLed
        os.kill(ray.get(pool._sup.info.remote())["pid"], signal.SIGKILL)
        # Then: the restarted supervisor takes its own lease back at once and resumes
        check_nothing_lost_nothing_rerun(pool, handles, readers, str(mark))
        assert any(n.startswith("journal-") for n in os.listdir(tmp_path / "snaps" / pool_name))
    finally:
        pool.shutdown()


def test_a_keyed_submit_names_the_same_task_after_the_supervisor_restarts(pool_name, tmp_path):
    # Given: a task submitted with an idempotency key
    mark = tmp_path / "mark"
    mark.mkdir()
    pool = make_pool(pool_name, snapshot_interval_s=0.5, max_agents=3)
    try:
        task = Task(goal="keyed", agents=["a", "b", "c"], idempotency_key="order-42",
                    inputs={"*": {"tokens": 4, "token_sleep_s": 0.05, "mark": str(mark)}})
        first = pool.submit(task)
        assert first.created
        # When: the supervisor is SIGKILLed and Ray restarts it from its snapshots
        pid = ray.get(pool._sup.info.remote())["pid"]
        os.kill(pid, signal.SIGKILL)
        # Then: the client's retry of that submit returns the task it made, not a second one
        again = pool.submit(task)
        assert (again.task_id, again.created) == (first.task_id, False)
        assert again.result(timeout=120).ok
        assert ray.get(pool._sup.info.remote())["pid"] != pid
        assert [t.task_id for t in pool.tasks() if t.idempotency_key == "order-42"] == [first.task_id]
    finally:
        pool.shutdown()
