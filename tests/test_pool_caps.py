"""Caps, admission order, recycling and shutdown, observed through Ray's own state API."""

import threading
import time

import pytest
from conftest import eventually, make_pool
from ray.util.state import list_actors

from threadbound.runtime import Task

pytestmark = pytest.mark.usefixtures("ray_session")


def live_agent_actors(prefix):
    """Agent actors of one pool that Ray does not report DEAD (alive, starting or restarting)."""
    rows = list_actors(filters=[("class_name", "=", "SlotWorker")], limit=10_000, raise_on_missing_output=False)
    return [a for a in rows if a.name.startswith(prefix) and a.state != "DEAD"]


def test_caps_hold_under_load_even_while_killed_agents_are_replaced(ray_session, pool_name):
    # Given a pool of 4 agents, at most 2 per task, and 20 tasks of 3 roles each,
    # some of which hang once (their actors are killed and replaced mid-run)
    pool = make_pool(pool_name, max_agents=4, max_agents_per_task=2, step_timeout_s=1.0)
    samples, per_task_max, stop = [], [0], threading.Event()

    def sample():
        while not stop.is_set():
            samples.append(len(live_agent_actors(f"{pool_name}/agent/")))
            owners = {}
            for s in pool.stats()["slots"]:
                if s["owner"]:
                    owners[s["owner"]] = owners.get(s["owner"], 0) + 1
            per_task_max[0] = max([per_task_max[0], *owners.values()])
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        handles = [
            pool.submit(Task(goal=f"task {i}", agents=["a", "b", "c"],
                             inputs={"*": {"tokens": 5, "sleep_s": 0.05},
                                     "b": {"hang_on": [1] if i % 5 == 0 else []}}))
            for i in range(20)
        ]
        results = [h.result(timeout=120) for h in handles]
    finally:
        stop.set()
        sampler.join()
    # Then every task finished, and neither cap was ever exceeded
    assert all(r.ok for r in results)
    # (each hang kills its process; with several agents per process, hangs at once share a kill)
    assert pool.stats()["replacements"] >= (4 if pool.stats()["actors"]["agents_per_actor"] == 1 else 1)
    assert len(samples) > 10 and max(samples) <= 4
    assert per_task_max[0] == 2
    pool.shutdown()
    assert eventually(lambda: not live_agent_actors(f"{pool_name}/agent/"), 20)


def test_higher_priority_is_admitted_first_then_fifo(ray_session, pool_name):
    pool = make_pool(pool_name, max_agents=1, max_agents_per_task=1)
    try:
        blocker = pool.submit(Task(goal="block", agents=["a"], inputs={"a": {"sleep_s": 1.0}}))
        low1 = pool.submit(Task(goal="low 1", agents=["a"]))
        low2 = pool.submit(Task(goal="low 2", agents=["a"]))
        high = pool.submit(Task(goal="high", agents=["a"], priority=5))
        for h in (blocker, low1, low2, high):
            h.result(timeout=60)
        admitted = {h.task_id: next(e.ts for e in h.stream() if e.kind == "admitted") for h in (low1, low2, high)}
        assert admitted[high.task_id] < admitted[low1.task_id] < admitted[low2.task_id]
    finally:
        pool.shutdown()


def test_agent_process_is_recycled_after_recycle_after_tasks(ray_session, pool_name):
    pool = make_pool(pool_name, max_agents=1, max_agents_per_task=1, recycle_after=2)
    try:
        pids = [pool.submit(Task(goal=f"t{i}", agents=["a"])).result(timeout=60).outputs["a"]["pid"]
                for i in range(4)]
        assert pids[0] == pids[1] and pids[2] == pids[3] and pids[1] != pids[2]
    finally:
        pool.shutdown()


def test_each_binding_gets_a_fresh_agent_instance(ray_session, pool_name):
    pool = make_pool(pool_name, max_agents=1, max_agents_per_task=1)
    try:
        outs = [pool.submit(Task(goal=f"t{i}", agents=["a"])).result(timeout=60).outputs["a"] for i in range(2)]
        assert outs[0]["pid"] == outs[1]["pid"]  # the same warm process...
        assert outs[0]["calls"] == outs[1]["calls"] == 1  # ...but nothing carried over between tasks
    finally:
        pool.shutdown()


def test_more_roles_than_the_per_task_cap_take_turns_and_keep_state(ray_session, pool_name):
    pool = make_pool(pool_name, max_agents=2, max_agents_per_task=2)
    try:
        res = pool.submit(Task(goal="five roles", agents=list("abcde"), inputs={"e": {"rounds": 2}})).result(timeout=60)
        assert res.rounds == 2 and all(res.outputs[r]["calls"] == 2 for r in "abcde")
        assert len({res.outputs[r]["pid"] for r in "abcde"}) <= 2
    finally:
        pool.shutdown()


def test_shutdown_cancels_running_and_queued_tasks_and_leaves_no_actor(ray_session, pool_name):
    pool = make_pool(pool_name, max_agents=1, max_agents_per_task=1)
    running = pool.submit(Task(goal="long", agents=["a"], inputs={"a": {"sleep_s": 60}}))
    queued = pool.submit(Task(goal="queued", agents=["a"]))
    eventually(lambda: running.status == "running", 20)
    reader = pool.task(running.task_id)
    pool.shutdown(grace_s=0.2)
    assert eventually(lambda: not live_agent_actors(f"{pool_name}/agent/"), 20)
    assert queued.task_id and reader.task_id  # handles stay valid objects; the supervisor is gone
