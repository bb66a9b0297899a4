"""A shard's node lost: supervisor shards on a real multi-node Ray, three nodes on this machine
(``ray.cluster_utils.Cluster``), two of them head-eligible (the ``threadbound-supervisor``
resource). As in tests/test_multinode.py, the scenario runs in a child process -- this
file run as a script -- against a cluster of its own; the test asserts on its JSON.
"""

from __future__ import annotations

import json
import os
import sys
import time

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.ray]

HERE = os.path.dirname(os.path.abspath(__file__))


def background_job(scratch: str):
    """The scenario, in a child process of its own (started in the background when the
    session's collection ends: ``tests/background.py``)."""
    from cluster_child import scenario_job

    return scenario_job(__file__, os.path.join(scratch, "shards-node-loss"), 300)


@pytest.mark.timeout(330)
def test_shards_spread_over_head_eligible_nodes_and_a_lost_ones_shard_resumes_on_another(tmp_path):
    from cluster_child import run_scenario

    found = run_scenario(background_job(str(tmp_path)))
    # Given: two head-eligible nodes (the head and one more) and a third node without the resource
    eligible = {found["head"], found["second"]}
    # Then: the two shards ran on the two head-eligible nodes, one each
    assert set(found["nodes_before"]) == eligible
    # When: the node of the shard that was not on the head is removed mid-run
    lost = found["lost_shard"]
    # Then: Ray restarted that shard on the surviving head-eligible node, where it resumed
    assert found["nodes_after"][lost] == found["head"]
    assert found["resumed"][lost] and not found["resumed"][1 - lost]
    assert found["pids_after"][1 - lost] == found["pids_before"][1 - lost]  # the other shard never stopped
    # ... and every task of both shards still ended well
    assert found["statuses"] == ["succeeded"] * len(found["statuses"]) and len(found["statuses"]) == 4


def _child(out: str) -> None:
    import ray
    from ray.cluster_utils import Cluster

    from threadbound.runtime import AgentPool, RuntimeConfig, Task

    sys.path.insert(0, HERE)
    from scripted_agents import Scripted

    supervisor = "threadbound-supervisor"
    cluster = Cluster(initialize_head=True, head_node_args=dict(
        num_cpus=1, resources={"tb-node-0": 1, supervisor: 1}, include_dashboard=False))
    found: dict = {}
    try:
        second = cluster.add_node(num_cpus=1, resources={"tb-node-1": 1, supervisor: 1})
        cluster.add_node(num_cpus=2, resources={"tb-node-2": 1})
        ray.init(address=cluster.address, namespace="shards", logging_level="ERROR", log_to_driver=False)
        cluster.wait_for_nodes()
        found["head"], found["second"] = cluster.head_node.node_id, second.node_id
        cfg = RuntimeConfig.from_mapping(dict(
            name="sharded", shards=2, max_agents=4, max_agents_per_task=1, step_timeout_s=20, task_timeout_s=120,
            retry={"max_attempts": 4, "backoff_s": 0.05, "max_backoff_s": 0.2}, snapshot_interval_s=0.5,
            snapshot_dir="file://" + os.path.join(out, "shared-snapshots"), health={"enabled": False},
            metrics={"port": 0}))
        with AgentPool(cfg, agents={r: Scripted for r in "abc"}) as pool:
            handles = [pool.submit(Task(goal=f"t{i}", agents=["a", "b", "c"],
                                        inputs={"*": {"sleep_s": 0.5, "tokens": 2}})) for i in range(4)]
            shards = pool.stats()["shards"]
            found["nodes_before"] = [s["node"] for s in shards]
            found["pids_before"] = [s["pid"] for s in shards]
            lost = next(k for k, s in enumerate(shards) if s["node"] == second.node_id)
            found["lost_shard"] = lost
            deadline = time.monotonic() + 60  # mid-run: once every task runs
            while time.monotonic() < deadline and any(t.status != "running" for t in pool.tasks()):
                time.sleep(0.1)
            cluster.remove_node(second)
            results = [h.result(timeout=200) for h in handles]
            found["statuses"] = [r.status for r in results]
            shards = pool.stats()["shards"]
            found["nodes_after"] = [s["node"] for s in shards]
            found["pids_after"] = [s["pid"] for s in shards]
            found["resumed"] = [bool(s["resumed"]) for s in shards]
    finally:
        ray.shutdown()
        cluster.shutdown()
    print(json.dumps(found))


if __name__ == "__main__":
    _child(sys.argv[1])
