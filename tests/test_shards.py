"""A pool of several supervisor shards is one pool to its users: routing, merging,
a shard lost and resumed while the others stream on, and a changed number of shards.

The routing and merging functions are tested without Ray; the rest on the session's
real local Ray (2 shards, scripted agents, small token counts)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import pytest
from chaos_tools import follow
from conftest import SNAPSHOTS, eventually, make_pool

from threadbound.runtime import ConfigError, RuntimeConfig, Task
from threadbound.runtime.shards import (Router, key_shard, label_shard, merge_health, merge_metrics, merge_stats,
                                        merge_tasks, shard_name, task_shard)
from threadbound.runtime.supervisor.layout import shard_location
from threadbound.runtime.task import TaskSummary


# -- routing and merging, without Ray ---------------------------------------------------------

def test_a_key_goes_to_the_same_shard_in_every_process():
    # Given: keys hashed here and in two other processes with different string-hash salts
    keys = [f"order-{i}" for i in range(200)]
    here = [key_shard(k, 4) for k in keys]
    code = ("import sys; from threadbound.runtime.shards import key_shard; "
            "print(','.join(str(key_shard(f'order-{i}', 4)) for i in range(200)))")
    for seed in ("1", "2"):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60,
                             env={**os.environ, "PYTHONHASHSEED": seed}).stdout.strip()
        # Then: every process sends each key to the same shard (Python's hash() would not)
        assert [int(x) for x in out.split(",")] == here
    # ... the keys spread over all the shards, and one shard takes them all
    assert set(here) == {0, 1, 2, 3}
    assert {key_shard(k, 1) for k in keys} == {0}


def test_calls_about_a_task_go_to_the_shard_its_id_names():
    assert [task_shard(t, 3) for t in ("t00001-ab12", "t00001-ab12-s1", "t00009-cd34-s2")] == [0, 1, 2]
    assert task_shard("t00001-ab12-s5", 3) == 0  # no such shard: shard 0 says it has no such task
    assert shard_name("p", 0) == "p" and shard_name("p", 3) == "p/shard-3"


def test_tasks_without_a_key_take_the_shards_in_turn_and_keyed_ones_their_keys_shard():
    router = Router(2)
    plain = [router.shard_for(Task(goal="x", agents=["coder"])) for _ in range(4)]
    keyed = [router.shard_for(Task(goal="x", agents=["coder"], idempotency_key="k-7")) for _ in range(3)]
    assert plain == [0, 1, 0, 1]
    assert keyed == [key_shard("k-7", 2)] * 3
    assert Router(1).shard_for(Task(goal="x", agents=["coder"], idempotency_key="k-7")) == 0


def test_shards_answers_merge_into_one_pools():
    def row(task_id, at):
        return TaskSummary(task_id=task_id, status="running", goal="g", agents=("a",), round=1, events=3,
                           submitted_at=at, finished_at=None, error=None, idempotency_key=None)

    # tasks: oldest first across shards
    merged = merge_tasks([[row("t1-x", 1.0), row("t2-x", 3.0)], [row("t1-y-s1", 2.0)]])
    assert [t.task_id for t in merged] == ["t1-x", "t1-y-s1", "t2-x"]
    # stats: counts summed, slots together, the worst health, each shard's own kept
    a = {"name": "p", "tasks": {"running": 2}, "queue_depth": 1, "busy": 2, "slots": [{"name": "p/s0/agent/0"}],
         "running": {"t1-x": ["a"]}, "health": "normal", "max_agents": 4, "pid": 11, "tokens_per_s": 1.5,
         "agents": {"busy": 2, "total": 4}}
    b = {"name": "p", "tasks": {"running": 1, "pending": 3}, "queue_depth": 3, "busy": 1,
         "slots": [{"name": "p/s1/agent/0"}], "running": {"t1-y-s1": ["a"]}, "health": "degraded",
         "max_agents": 4, "pid": 12, "tokens_per_s": None, "agents": {"busy": 1, "total": 4}}
    s = merge_stats([a, b])
    assert s["tasks"] == {"running": 3, "pending": 3} and s["queue_depth"] == 4 and s["busy"] == 3
    assert [x["name"] for x in s["slots"]] == ["p/s0/agent/0", "p/s1/agent/0"]
    assert s["running"] == {"t1-x": ["a"], "t1-y-s1": ["a"]} and s["health"] == "degraded"
    assert s["agents"] == {"busy": 3, "total": 8} and s["tokens_per_s"] == 1.5
    assert [x["pid"] for x in s["shards"]] == [11, 12] and s["max_agents"] == 4
    assert merge_stats([a]) is a  # one shard: its stats as they are
    # health: the worst mode, transitions of all in time order
    h = merge_health([{"mode": "normal", "queued": 1, "transitions": [{"at": 5}]},
                      {"mode": "paused", "queued": 2, "transitions": [{"at": 3}]}])
    assert h["mode"] == "paused" and h["queued"] == 3 and [t["at"] for t in h["transitions"]] == [3, 5]


def test_metrics_of_the_shards_are_one_text_with_a_shard_label():
    one = ('# HELP q Queue.\n# TYPE q gauge\nq{pool="p"} 1.0\n'
           '# HELP h Lat.\n# TYPE h histogram\nh_bucket{pool="p",le="1.0"} 2.0\nh_count{pool="p"} 2.0\n')
    two = one.replace("1.0\n", "7.0\n", 1)
    text = merge_metrics([one, two])
    lines = text.splitlines()
    assert lines.count("# TYPE q gauge") == 1 and lines.count("# TYPE h histogram") == 1
    # each family's samples together, right after its header (as the text format requires)
    assert lines[:4] == ["# HELP q Queue.", "# TYPE q gauge", 'q{shard="0",pool="p"} 1.0', 'q{shard="1",pool="p"} 7.0']
    assert 'h_bucket{shard="1",pool="p",le="1.0"} 2.0' in lines
    assert label_shard("x 1", 2) == 'x{shard="2"} 1' and label_shard("x{} 1", 2) == 'x{shard="2"} 1'


def test_the_pools_real_metrics_merge_into_text_prometheus_parses():
    from prometheus_client.parser import text_string_to_metric_families

    from threadbound.runtime.metrics import PoolMetrics

    texts = [PoolMetrics("p", ray_mirror=False).text() for _ in range(2)]
    families = list(text_string_to_metric_families(merge_metrics(texts)))
    alone = list(text_string_to_metric_families(texts[0]))
    assert [f.name for f in families] == [f.name for f in alone]  # each family once
    for merged, one in zip(families, alone):
        assert len(merged.samples) == 2 * len(one.samples)
        assert {s.labels["shard"] for s in merged.samples} == ({"0", "1"} if one.samples else set())
    assert sum(len(f.samples) for f in families) > 0


def test_each_shard_has_its_own_location_under_the_pools():
    cfg = RuntimeConfig(name="p", snapshot_dir="/s", shards=3)
    assert cfg.snapshot_location == "/s/p"
    assert [shard_location(cfg, k) for k in range(3)] == ["/s/p/shard-0", "/s/p/shard-1", "/s/p/shard-2"]
    assert shard_location(cfg.replace(shards=1), 0) == "/s/p"


def test_a_pools_history_is_found_whether_it_has_one_shard_or_several(tmp_path):
    from threadbound.runtime.lifecycle import find_pool
    from threadbound.runtime.supervisor.layout import read_layout
    from threadbound.snapshots import NoSnapshot

    # Given: a snapshot_dir with a pool of one shard and a pool of two (and an old history set aside)
    def history(d):
        d.mkdir(parents=True)
        (d / "history.tbh").write_bytes(b"x")
        (d / "snap-0000000001.tbs").write_bytes(b"x")

    history(tmp_path / "solo")
    history(tmp_path / "duo" / "shard-0")
    history(tmp_path / "duo" / "shard-1")
    history(tmp_path / "duo" / "retired-20240101T000000Z" / "shard-0")
    # Then: each is read as what made it
    solo, duo = read_layout(str(tmp_path / "solo")), read_layout(str(tmp_path / "duo"))
    assert (solo.shards, solo.sharded, duo.shards, duo.sharded) == (1, False, 2, True)
    assert duo.names == ["shard-0", "shard-1"] and duo.fits(2) and not duo.fits(1) and not duo.fits(3)
    assert solo.fits(1) and not solo.fits(2) and read_layout(str(tmp_path / "none")).fits(5)
    # ... and found by the pool's name, by its own directory, or by one shard's directory
    assert find_pool(str(tmp_path), "duo") == find_pool(str(tmp_path / "duo")) == str(tmp_path / "duo")
    assert find_pool(str(tmp_path / "duo" / "shard-1")) == str(tmp_path / "duo")
    assert find_pool(str(tmp_path), "solo") == str(tmp_path / "solo")
    with pytest.raises(NoSnapshot, match="several pools: .*duo.*solo"):
        find_pool(str(tmp_path))


# -- on Ray ------------------------------------------------------------------------------------

ray_tests = [pytest.mark.usefixtures("ray_session"), pytest.mark.timeout(240)]


def scripted(tokens=3, pace_s=0.0, **extra):
    return Task(goal="scripted", agents=["a"], inputs={"*": {"tokens": tokens, "token_sleep_s": pace_s, **extra}})


@pytest.mark.usefixtures("ray_session")
@pytest.mark.timeout(240)
def test_a_two_shard_pool_is_one_pool(pool_name):
    import ray

    from gateway_tools import READ, InProcessGateway, auth

    from threadbound.runtime import AgentPool

    pool = make_pool(pool_name, shards=2, max_agents=2, max_agents_per_task=1)
    try:
        # Given: four tasks without a key and one with a key, submitted twice
        handles = [pool.submit(scripted()) for _ in range(4)]
        keyed = [pool.submit(Task(goal="keyed", agents=["a"], idempotency_key="order-1")) for _ in range(2)]
        # Then: they went to both shards (the id names the shard)
        ids = [h.task_id for h in handles]
        assert [i.endswith("-s1") for i in ids] == [False, True, False, True]
        assert keyed[0].task_id == keyed[1].task_id and (keyed[0].created, keyed[1].created) == (True, False)
        assert keyed[0].task_id.endswith("-s1") == (key_shard("order-1", 2) == 1)
        # ... a burst of submits goes as one call per shard
        import asyncio

        from threadbound.runtime.client import _sync

        before = [s["submit_calls"] for s in pool.stats()["shards"]]

        async def burst():
            return await asyncio.gather(*(pool.asubmit(scripted(tokens=1)) for _ in range(6)))

        handles += _sync(burst())
        assert [s["submit_calls"] - b for s, b in zip(pool.stats()["shards"], before)] == [1, 1]
        assert sorted(h.task_id.endswith("-s1") for h in handles[4:]) == [False] * 3 + [True] * 3
        ids = [h.task_id for h in handles]
        # ... results and streams come from both
        for h in handles + keyed[:1]:
            assert h.result(timeout=120).ok
            offsets = [e.offset for e in h.stream()]
            assert offsets == list(range(len(offsets))) and len(offsets) > 3
        # ... tasks() and stats() merge both shards
        tasks = pool.tasks()
        assert sorted(t.task_id for t in tasks) == sorted(ids + [keyed[0].task_id])
        assert [t.submitted_at for t in tasks] == sorted(t.submitted_at for t in tasks)
        stats = pool.stats()
        assert stats["tasks"] == {"succeeded": 11}
        assert [s["supervisor"] for s in stats["shards"]] == [pool_name, f"{pool_name}/shard-1"]
        assert len({s["pid"] for s in stats["shards"]}) == 2 and all(s["node"] for s in stats["shards"])
        slots = {s["name"] for s in stats["slots"]}
        assert {f"{pool_name}/s0/agent/0", f"{pool_name}/s1/agent/0"} <= slots
        assert pool.info()["shards"] == [pool_name, f"{pool_name}/shard-1"]
        assert pool.health()["mode"] == "normal"
        text = pool.metrics_text()
        assert 'shard="0"' in text and 'shard="1"' in text
        # ... each shard has its own location under the pool's, and its allocator runs
        assert sorted(os.listdir(os.path.join(SNAPSHOTS, pool_name))) == ["shard-0", "shard-1"]
        assert any(n.startswith("snap-") for n in os.listdir(os.path.join(SNAPSHOTS, pool_name, "shard-1")))
        ray.get_actor(f"{pool_name}/allocator", namespace="threadbound")
        assert ray.get(pool._sups[1].info.remote())["allocator"] == f"{pool_name}/allocator"
        # ... another client attached by name sees both shards' tasks
        other = AgentPool.attach(pool_name)
        assert sorted(t.task_id for t in other.tasks()) == sorted(t.task_id for t in tasks)
        assert other.handle(ids[1]).result(timeout=30).ok
        # ... `threadbound top` draws them all, and every shard's agents, from that client
        import io

        from rich.console import Console

        from threadbound.runtime.cli.top import render

        console = Console(width=200, record=True, file=io.StringIO())
        console.print(render(other.stats(), other.health(), other.tasks()))
        screen = console.export_text()
        assert all(t.task_id in screen for t in tasks) and f"{pool_name}/s1/agent/0" in screen
        # ... and so does the gateway
        with InProcessGateway(pool) as gw:
            listed = httpx.get(f"{gw.url}/v1/tasks", headers=auth(READ), timeout=30).json()["tasks"]
            assert sorted(t["task_id"] for t in listed) == sorted(t.task_id for t in tasks)
            one = httpx.get(f"{gw.url}/v1/tasks/{ids[1]}", headers=auth(READ), timeout=30).json()
            assert one["status"] == "succeeded"
    finally:
        pool.shutdown()
    assert eventually(lambda: not _named(f"{pool_name}/shard-1") and not _named(f"{pool_name}/allocator"), 30)


def _released(root, shards):
    """Nobody holds the lease of any of the pool's shard locations."""
    from threadbound.runtime.cli.pools import lease_holder

    return all(lease_holder(os.path.join(root, f"shard-{k}")) is None for k in range(shards))


def _named(name):
    import ray

    try:
        ray.get_actor(name, namespace="threadbound")
    except ValueError:
        return False
    return True


@pytest.mark.usefixtures("ray_session")
@pytest.mark.timeout(240)
def test_a_shard_killed_mid_stream_resumes_while_the_other_shard_streams_on(pool_name, tmp_path):
    import ray
    from test_resume import check_nothing_lost_nothing_rerun

    # Given: a 2-shard pool, two tasks on each shard; shard 0's stream for longer
    mark = tmp_path / "mark"
    mark.mkdir()
    pool = make_pool(pool_name, shards=2, max_agents=2, max_agents_per_task=1, snapshot_interval_s=0.5)
    try:
        def spec(tokens):
            return Task(goal="g", agents=["a", "b", "c"], inputs={"*": {"tokens": tokens, "token_sleep_s": 0.05,
                                                                   "mark": str(mark), "rounds": 2}})

        handles = [pool.submit(spec(20 if k % 2 == 0 else 4)) for k in range(4)]
        assert [h.task_id.endswith("-s1") for h in handles] == [False, True, False, True]
        readers = follow(handles)
        mine, others = readers[1::2], readers[0::2]
        assert eventually(lambda: all(any(e.kind == "step_finished" for e in r.events) for r in mine), 60)
        pids = [ray.get(s.info.remote())["pid"] for s in pool._sups]
        # When: shard 1's process is SIGKILLed while its tasks and shard 0's stream (a task
        # of shard 1 that already ended has nothing to resume: the pool's one cap of two
        # agents may have let it finish first)
        live = [r for r in mine if not any(e.terminal for e in r.events)]
        os.kill(pids[1], signal.SIGKILL)
        killed = time.time()
        # Then: shard 1's tasks resume on a restarted shard, nothing committed runs again,
        # and every stream of both shards is whole (no gap, no duplicate)
        check_nothing_lost_nothing_rerun(pool, handles, readers, str(mark))
        assert ray.get(pool._sups[1].info.remote())["pid"] != pids[1]
        assert ray.get(pool._sups[0].info.remote())["pid"] == pids[0]
        assert live, "every task of shard 1 had ended before the kill"
        for r in live:
            assert any(e.kind == "resumed" for e in r.events)
        for r in others:
            assert not any(e.kind == "resumed" for e in r.events)
        # ... and shard 0's streams went on while shard 1 was down: events of its tasks
        # arrived after the kill and before shard 1's streams said "resumed"
        back = min(t for r in mine for e, t in zip(r.events, r.arrivals) if e.kind == "resumed")
        assert any(killed < t < back for r in others for t in r.arrivals)
    finally:
        pool.shutdown()


@pytest.mark.usefixtures("ray_session")
@pytest.mark.timeout(240)
def test_changing_the_number_of_shards_is_refused_unless_the_pool_was_drained(pool_name, tmp_path, capsys):
    import ray

    from threadbound.runtime import AgentPool
    from threadbound.runtime.cli import main

    snaps = str(tmp_path / "snaps")
    root = os.path.join(snaps, pool_name)
    # Given: a 2-shard pool that died with a task unfinished on each shard
    pool = make_pool(pool_name, shards=2, max_agents=2, max_agents_per_task=1, snapshot_dir=snaps)
    ids = [pool.submit(Task(goal="g", agents=["a"], inputs={"a": {"sleep_s": 30}})).task_id for _ in range(2)]
    for sup in pool._sups + [pool._allocator]:
        ray.kill(sup, no_restart=True)
    assert eventually(lambda: not _named(pool_name) and not _named(f"{pool_name}/shard-1"), 30)
    assert eventually(lambda: _released(root, 2), 30)  # their processes are gone too
    # (`threadbound snapshots ls` lists each shard's snapshots)
    assert main(["snapshots", "ls", snaps, "--pool", pool_name]) == 0
    listed = capsys.readouterr().out
    assert f"{root}/shard-0: " in listed and f"{root}/shard-1: " in listed and "REFUSED" not in listed
    # Then: starting it with 3 shards, or 1, is refused naming `shards`, before any actor starts
    for n in (3, 1):
        with pytest.raises(ConfigError, match=r"shards: .*made with shards: 2.*2 unfinished task"):
            make_pool(pool_name, shards=n, max_agents=2, max_agents_per_task=1, snapshot_dir=snaps)
        assert not _named(pool_name)
    # When: it is resumed (with its 2 shards, found under its location), drained, shut down
    resumed = AgentPool.resume(snaps, name=pool_name)
    try:
        assert resumed.config.shards == 2 and len(resumed._sups) == 2
        assert sorted(t.task_id for t in resumed.unfinished()) == sorted(ids)
        # a pool of that name with another number of shards, while it runs: refused too
        with pytest.raises(ConfigError, match=r"shards"):
            make_pool(pool_name, shards=3, max_agents=2, max_agents_per_task=1, snapshot_dir=snaps)
        with pytest.raises(ConfigError, match=r"shards: 3 in this config, 2 in the running pool"):
            make_pool(pool_name, shards=3, max_agents=2, max_agents_per_task=1, snapshot_dir=snaps,
                      snapshots={"enabled": False})
        for task_id in ids:
            resumed.handle(task_id).cancel()
    finally:
        resumed.shutdown()
    assert eventually(lambda: not _named(pool_name) and not _named(f"{pool_name}/shard-1"), 30)
    assert eventually(lambda: _released(root, 2), 30)
    # Then: the drained history is set aside (moved, not deleted) and 3 shards start afresh
    again = make_pool(pool_name, shards=3, max_agents=2, max_agents_per_task=1, snapshot_dir=snaps)
    try:
        assert again.tasks() == []
        retired = [n for n in os.listdir(root) if n.startswith("retired-")]
        assert len(retired) == 1 and sorted(os.listdir(os.path.join(root, retired[0]))) == ["shard-0", "shard-1"]
        assert sorted(n for n in os.listdir(root) if n.startswith("shard-")) == ["shard-0", "shard-1", "shard-2"]
        assert again.submit(Task(goal="g", agents=["a"])).result(timeout=60).ok
    finally:
        again.shutdown()


@pytest.mark.usefixtures("ray_session")
@pytest.mark.timeout(120)
def test_a_pool_of_one_shard_is_as_before(pool_name):
    import ray

    pool = make_pool(pool_name)
    try:
        handle = pool.submit(Task(goal="g", agents=["a"]))
        assert handle.result(timeout=60).ok
        # one supervisor named as the pool, no allocator, slots and ids as before
        assert len(pool._sups) == 1 and "shards" not in pool.info()
        assert not _named(f"{pool_name}/allocator") and not _named(f"{pool_name}/shard-1")
        assert "-s" not in handle.task_id.split("-", 1)[1]
        assert f"{pool_name}/agent/0" in {s["name"] for s in pool.stats()["slots"]}
        assert "shards" not in pool.stats() and 'shard="' not in pool.metrics_text()
        # ... and its history at <snapshot_dir>/<name> itself
        assert any(n.startswith("snap-") for n in os.listdir(os.path.join(SNAPSHOTS, pool_name)))
        assert not [n for n in os.listdir(os.path.join(SNAPSHOTS, pool_name)) if n.startswith("shard-")]
        assert ray.get(pool._sup.info.remote())["name"] == pool_name
    finally:
        pool.shutdown()
