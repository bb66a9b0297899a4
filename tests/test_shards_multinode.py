"""One pool of two supervisor shards on a real three-node Ray (``ray.cluster_utils.Cluster``).

As in ``test_multinode.py``, a process joins one Ray and this session's Ray is not a
cluster, so the scenario runs in a child process -- this file run as a script -- against a
cluster of its own, which it stops by its handle; the tests assert on the JSON it prints.

The head and node 1 are head-eligible (the ``threadbound-supervisor`` resource), node 2
only runs agents. Sixty tasks of two parallel agents run under ``max_agents: 6``; every
step writes when it starts and ends to a file, so "never more than six at once" is read
from the order of those lines, not from timings. Mid-run, shard 1's process is SIGKILLed
(Ray restarts it; it resumes from its own snapshots) and node 2 is removed.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.ray]

HERE = os.path.dirname(os.path.abspath(__file__))
TASKS = 60
MAX_AGENTS = 6


def background_job(scratch: str):
    """The scenario, in a child process of its own (started in the background when the
    session's collection ends: ``tests/background.py``)."""
    from cluster_child import scenario_job

    return scenario_job(__file__, os.path.join(scratch, "shards-multinode"), 420)


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory):
    from cluster_child import run_scenario

    return run_scenario(background_job(str(tmp_path_factory.mktemp("shards-multinode"))))


@pytest.mark.timeout(450)
def test_sixty_tasks_over_two_shards_all_succeed_under_the_global_cap(sharded_run):
    run = sharded_run
    # Given 60 tasks submitted to one pool of two shards
    assert run["statuses"] == ["succeeded"] * TASKS
    # they went to both shards
    assert sorted(run["per_shard"]) == ["0", "1"] and min(run["per_shard"].values()) >= TASKS // 4
    # Then never more than max_agents agents ran at once, over both shards together,
    # and never more than max_agents_per_task of one task
    assert 2 <= run["most_at_once"] <= MAX_AGENTS, run["most_at_once"]
    assert run["most_of_one_task"] <= 2


@pytest.mark.timeout(450)
def test_a_killed_shard_resumes_and_reruns_nothing_while_the_other_streams_on(sharded_run):
    kill = sharded_run["kill"]
    # Given shard 1 SIGKILLed mid-run
    assert kill["pid_before"] != kill["pid_after"], "shard 1 was not restarted"
    # Then Ray restarted it on a head-eligible node, and it resumed its own tasks
    assert kill["node_after"] in kill["eligible"]
    assert kill["resumed_tasks"] > 0
    # nothing it had committed ran again
    assert kill["committed_before"] > 0
    assert kill["rerun"] == []
    # and a client of a shard-0 task read on without a gap while shard 1 was down:
    # contiguous offsets from 0 to its end, some of them between the kill and the resume
    assert kill["streams"] == sharded_run["per_shard"]["0"]
    assert kill["stream_offsets_contiguous"] and kill["streams_ended"] == ["succeeded"]
    assert kill["read_while_down"] > 0


@pytest.mark.timeout(450)
def test_a_removed_worker_node_costs_retries_not_tasks(sharded_run):
    loss = sharded_run["loss"]
    # Given node 2 removed while agents ran there
    assert loss["on_lost_node"], "no agent ran on the node removed"
    # Then those tasks still succeeded: the steps cut short there were retried elsewhere
    for task_id in loss["on_lost_node"]:
        assert sharded_run["by_task"][task_id] == "succeeded"
        assert "agent_crashed" in loss["kinds"][task_id]


@pytest.mark.timeout(450)
def test_the_gateway_and_top_show_every_task_of_both_shards(sharded_run):
    seen = sharded_run["views"]
    ids = set(sharded_run["by_task"])
    # The gateway's task list and the top screen name all 60 tasks, of both shards
    assert set(seen["gateway"]) == ids
    assert set(seen["top"]) == ids
    # and top's status counts add up to the pool's total
    assert seen["top_counts"] == TASKS


# -- the child process ---------------------------------------------------------------------

def _agent():
    from threadbound.agents import Agent

    class Counted(Agent):
        """Writes when its step starts and ends (one line each, appended), streams a few
        tokens, and counts its runs by idempotency key (scripted_agents.mark). On a node
        the test is about to remove (a ``hold-<node>`` file), it says so and waits there
        for the node to go."""

        def step(self, ctx):
            import ray

            from scripted_agents import mark

            spec = dict(ctx.inputs.get("*", {}))
            here = spec["mark"]
            node = ray.get_runtime_context().get_node_id()
            key = f"{ctx.task_id}:{ctx.round}:{ctx.role}:{ctx.attempt}"
            with open(os.path.join(here, "steps.log"), "a") as fh:
                fh.write(f"start {ctx.task_id} {ctx.role} {node}\n")
            try:
                for _ in range(spec.get("tokens", 4)):
                    time.sleep(spec.get("token_sleep_s", 0.1))
                    yield "tok "
                if os.path.exists(os.path.join(here, f"hold-{node}")):
                    with open(os.path.join(here, "steps.log"), "a") as fh:
                        fh.write(f"held {ctx.task_id} {ctx.role} {node}\n")
                    time.sleep(3600)
                mark(here, key)
            finally:
                with open(os.path.join(here, "steps.log"), "a") as fh:
                    fh.write(f"end {ctx.task_id} {ctx.role} {node}\n")
            return {"node": node}

    return Counted


def _most_at_once(lines: list[str]) -> tuple[int, int]:
    """The most steps running at once, overall and of one task, from the start/end lines
    in the order they were written. A step whose process was killed never writes its end:
    the child writes ``killed <shard>`` when it kills a shard (its agents die with it) and
    ``removed <node>`` when it removes a node, which end the steps they killed."""
    running: dict[tuple[str, str], str] = {}  # (task, role) -> node
    most = most_task = 0
    for line in lines:
        parts = line.split()
        if parts[:1] == ["killed"]:
            running = {k: n for k, n in running.items() if _shard(k[0]) != parts[1]}
        elif parts[:1] == ["removed"]:
            running = {k: n for k, n in running.items() if n != parts[1]}
        elif parts[:1] == ["start"]:
            _, task, role, node = parts
            running[(task, role)] = node
            most = max(most, len(running))
            most_task = max(most_task, sum(1 for t, _ in running if t == task))
        elif parts[:1] == ["end"]:
            running.pop((parts[1], parts[2]), None)
    return most, most_task


def _shard(task_id: str) -> str:
    """The shard a task id names (``t00012-ab3f-s1`` -> "1"; no suffix -> "0")."""
    tail = task_id.rsplit("-", 1)[-1]
    return tail[1:] if tail.startswith("s") and tail[1:].isdigit() else "0"


def _child(out: str) -> None:
    import httpx
    import ray
    from ray.cluster_utils import Cluster

    from threadbound.runtime import AgentPool, RuntimeConfig, Task
    from threadbound.runtime.cli.top import render
    from threadbound.runtime.client import _sync

    sys.path.insert(0, HERE)
    from gateway_tools import InProcessGateway, auth

    mark_dir = os.path.join(out, "mark")
    os.makedirs(mark_dir, exist_ok=True)
    found: dict = {}
    cluster = Cluster(initialize_head=True, head_node_args=dict(
        num_cpus=2, resources={"tb-node-0": 1, "threadbound-supervisor": 1}))
    try:
        eligible_node = cluster.add_node(num_cpus=2, resources={"tb-node-1": 1, "threadbound-supervisor": 1})
        worker = cluster.add_node(num_cpus=2, resources={"tb-node-2": 1})
        ray.init(address=cluster.address, namespace="shards", logging_level="ERROR", log_to_driver=False)
        cluster.wait_for_nodes()
        eligible = [cluster.head_node.node_id, eligible_node.node_id]
        cfg = RuntimeConfig.from_mapping(dict(
            name="sharded", shards=2, max_agents=MAX_AGENTS, max_agents_per_task=2, step_timeout_s=30,
            task_timeout_s=240, retry={"max_attempts": 5, "backoff_s": 0.05, "max_backoff_s": 0.2},
            snapshot_dir="file://" + os.path.join(out, "snapshots"), snapshot_interval_s=1,
            health={"enabled": False}, metrics={"port": 0}))
        counted = _agent()
        with AgentPool(cfg, agents={"a": counted, "b": counted}) as pool:
            handles = [pool.submit(Task(goal=f"sharded {i}", agents=["a", "b"], after={"a": [], "b": []},
                                        inputs={"*": {"mark": mark_dir, "tokens": 8, "token_sleep_s": 0.1}}))
                       for i in range(TASKS)]
            ids = [h.task_id for h in handles]
            shard_of = {t: _shard(t) for t in ids}
            per_shard: dict = {}
            for t in ids:
                per_shard[shard_of[t]] = per_shard.get(shard_of[t], 0) + 1

            # A client follows every shard-0 task (one long-poll for all of them, as clients do).
            got: dict = {}  # task id -> [(offset, kind, wall-clock arrival)]

            async def follow_all():
                import asyncio

                async def one(h):
                    async for e in h.astream():
                        got.setdefault(h.task_id, []).append((e.offset, e.kind, time.time()))

                await asyncio.gather(*(one(h) for h in handles if shard_of[h.task_id] == "0"))

            import asyncio as _asyncio

            reader = threading.Thread(target=lambda: _asyncio.run(follow_all()), daemon=True)
            reader.start()
            log_path = os.path.join(mark_dir, "steps.log")

            def shard_stats(k):
                return next(s for s in pool.stats()["shards"] if int(s["shard"]) == k)

            # Wait until shard 1 has committed steps, then SIGKILL its process.
            def committed(task_id):
                events, _ = _sync(pool.handle(task_id)._client.call("read", task_id, 0, 0.0))
                return [f"{task_id}:{d['round']}:{agent}:{d['attempt']}" for _, kind, agent, d, _ in events
                        if kind == "step_finished"]

            deadline = time.monotonic() + 90
            before: list = []
            while time.monotonic() < deadline:
                before = [k for t in ids if shard_of[t] == "1" for k in committed(t)]
                if len(before) >= 6:
                    break
                time.sleep(0.2)
            before = [k for t in ids if shard_of[t] == "1" for k in committed(t)]
            victim = shard_stats(1)
            killed_at = time.time()
            with open(log_path, "a") as fh:
                fh.write("killed 1\n")
            os.kill(victim["pid"], signal.SIGKILL)

            # Node 2 removed while a step runs there (after the kill): its next steps hold
            # until it is gone, so the removal surely cuts one short. The hold comes once
            # shard 1 answers again (a call to it waits out the restart): a step the killed
            # shard had started could otherwise reach the hold before Ray stopped its actors
            # (they go with their owner), and its task resumes it as interrupted, not crashed.
            shard_stats(1)
            open(os.path.join(mark_dir, f"hold-{worker.node_id}"), "w").close()
            deadline = time.monotonic() + 90
            on_node: set = set()
            while time.monotonic() < deadline and not on_node:
                with open(log_path) as fh:
                    on_node = {ln.split()[1] for ln in fh if ln.startswith("held ")}
                time.sleep(0.05)
            with open(log_path, "a") as fh:
                fh.write(f"removed {worker.node_id}\n")
            cluster.remove_node(worker)

            results = [h.result(timeout=300) for h in handles]
            reader.join(60)
            after = shard_stats(1)
            with open(log_path) as fh:
                most, most_task = _most_at_once(fh.read().splitlines())
            with open(os.path.join(mark_dir, "runs.log")) as fh:
                runs = fh.read().split()
            events = {h.task_id: list(h.stream()) for h in handles}
            # When shard 1 was back: its first "resumed" event (stamped by its own clock,
            # the wall clock of this same machine).
            back = [e.ts for t, evs in events.items() if shard_of[t] == "1" for e in evs if e.kind == "resumed"]
            back_at = min(back) if back else killed_at
            arrivals = [at for rows in got.values() for _, _, at in rows]
            found.update({
                "statuses": [r.status for r in results], "by_task": {r.task_id: r.status for r in results},
                "per_shard": per_shard, "most_at_once": most, "most_of_one_task": most_task,
                "kill": {"pid_before": victim["pid"], "pid_after": after["pid"], "node_after": after.get("node"),
                         "eligible": eligible, "resumed_tasks": len({t for t, evs in events.items()
                                                                     if any(e.kind == "resumed" for e in evs)}),
                         "committed_before": len(before), "rerun": sorted(k for k in before if runs.count(k) != 1),
                         "stream_offsets_contiguous": all([o for o, _, _ in rows] == list(range(len(rows)))
                                                          for rows in got.values()),
                         "streams_ended": sorted({rows[-1][1] for rows in got.values()}),
                         "streams": len(got),
                         "read_while_down": sum(1 for at in arrivals if killed_at <= at <= back_at)},
                "loss": {"on_lost_node": sorted(on_node),
                         "kinds": {t: [e.kind for e in events[t]] for t in on_node}},
            })

            # The views: the gateway's task list and top's screen.
            with InProcessGateway(pool) as gw:
                listed, after_id = [], None
                while True:
                    params = {"limit": 50, **({"after": after_id} if after_id else {})}
                    page = httpx.get(f"{gw.url}/v1/tasks", params=params, headers=auth(), timeout=30).json()
                    listed += [t["task_id"] for t in page["tasks"]]
                    after_id = page.get("next")
                    if not after_id:
                        break
            from rich.console import Console
            import io

            console = Console(width=200, record=True, file=io.StringIO())
            stats = pool.stats()
            console.print(render(stats, pool.health(), pool.tasks(), max_tasks=TASKS + 10))
            screen = console.export_text()
            found["views"] = {"gateway": listed, "top": [t for t in ids if t in screen],
                              "top_counts": sum((stats.get("tasks") or {}).values())}
    finally:
        ray.shutdown()
        cluster.shutdown()
    print(json.dumps(found))


if __name__ == "__main__":
    _child(sys.argv[1])
