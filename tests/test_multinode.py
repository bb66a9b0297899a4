"""A pool on a real multi-node Ray: three nodes on this machine (``ray.cluster_utils.Cluster``).

A process joins one Ray, and this session's Ray (conftest) is not a cluster, so the
scenarios run in a child process -- this file run as a script -- against a cluster of
its own, which it stops by its handle; the tests assert on the JSON it prints.
Each node has a custom resource naming it (``tb-node-<n>``).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slow

HERE = os.path.dirname(os.path.abspath(__file__))


def background_job(scratch: str):
    """Every scenario, run once on one three-node cluster in a child process (started in
    the background when the session's collection ends: ``tests/background.py``)."""
    from cluster_child import scenario_job

    return scenario_job(__file__, os.path.join(scratch, "multinode"), 280)


@pytest.fixture(scope="module")
def cluster_run(tmp_path_factory):
    """The scenarios' findings, by scenario."""
    from cluster_child import run_scenario

    return run_scenario(background_job(str(tmp_path_factory.mktemp("multinode"))))


@pytest.mark.timeout(300)
def test_each_tasks_agents_run_on_one_node_and_tasks_spread_over_nodes(cluster_run):
    # Given three nodes and six tasks of two agents each
    spread = cluster_run["spread"]
    # Then every task ended well, every actor of a task (Ray's state API) is on one node...
    assert spread["statuses"] == ["succeeded"] * spread["tasks"]
    for task_id, nodes in spread["actor_nodes"].items():
        assert len(nodes) == 1, f"task {task_id} ran on nodes {nodes}"
        assert nodes == spread["step_nodes"][task_id] == spread["copy_nodes"][task_id]
    # ...its admitted event names that node, and the tasks used more than one node
    assert spread["admitted_nodes"] == {t: n[0] for t, n in spread["actor_nodes"].items()}
    assert len({n[0] for n in spread["actor_nodes"].values()}) >= 2
    # and the copies were deleted where they were made
    assert spread["copies_left"] == []


@pytest.mark.timeout(300)
def test_a_lost_node_costs_retries_not_tasks(cluster_run):
    loss = cluster_run["loss"]
    # Given tasks running on a worker node that is removed mid-run
    assert loss["on_lost_node"], "no task ran on the node removed"
    # Then every task still ends succeeded: none lost
    assert loss["statuses"] == ["succeeded"] * loss["tasks"]
    # the steps that ran there crashed and were retried, on a surviving node
    for task_id in loss["on_lost_node"]:
        assert "agent_crashed" in loss["kinds"][task_id]
        assert loss["workspace_lost"][task_id], f"{task_id} did not say its workspace copy was lost"
        assert loss["final_node"][task_id] != loss["lost_node"]
    # and the caps held all along (slot actors alive, per pool and per task)
    assert 0 < loss["max_alive_slots"] <= loss["max_agents"]
    assert loss["max_per_task"] <= loss["max_agents_per_task"]


@pytest.mark.timeout(300)
def test_a_killed_supervisor_resumes_on_the_head_from_the_shared_store(cluster_run):
    kill = cluster_run["kill"]
    # Given a pool with snapshots on a store every node shares (a file:// URL), killed mid-run
    assert kill["resumed"], "the restarted supervisor did not resume"
    # Then it ran on the head before and after, and every task finished
    assert kill["supervisor_nodes"] == [kill["head"], kill["head"]]
    assert kill["statuses"] == ["succeeded"] * kill["tasks"]
    # and no step committed before the kill ran again
    assert kill["committed_before"] > 0
    assert kill["rerun"] == []
    for task_id, finished in kill["finished"].items():
        steps = [tuple(step) for step in finished]
        assert len(steps) == len(set(steps)) == 3, f"{task_id} committed a step twice: {finished}"


# -- placement without a cluster: the slot table's choices, exactly ------------------------

class _Nodes:
    """A cluster view the test edits: node id -> its resources."""

    def __init__(self, **nodes):
        self.nodes = {n: {"CPU": cpus} for n, cpus in nodes.items()}

    def __call__(self):
        return list(self.nodes.items())


@pytest.fixture
def fake_ray(monkeypatch):
    from test_slots import FakeRay

    from threadbound.runtime.supervisor import slot_actors as slots_mod

    world = FakeRay()
    monkeypatch.setattr(slots_mod.ray, "kill", world.kill)
    return world


def _table(world, cluster, n, agent_num_cpus=None):
    from threadbound.runtime.supervisor.placement import Placement
    from threadbound.runtime.supervisor.slots import SlotTable

    placed = {}

    def make(name, node):
        placed[name] = node
        return world.make(name)

    placement = Placement(agent_num_cpus, list_nodes=cluster, here=lambda: "a", refresh_s=0)
    return SlotTable(n, 100, make, slot_name=lambda i: f"agent/{i}", placement=placement), placed


async def _ready(t, slots):
    for s in slots:
        await t.wait_ready(s)


def test_each_tasks_slots_are_on_one_node_and_tasks_spread_over_the_nodes(fake_ray):
    async def main():
        # Given three nodes and six slots
        t, placed = _table(fake_ray, _Nodes(a=2, b=2, c=2), 6)
        # When three tasks of two agents come
        got = {task: t.reserve(task, 2) for task in ("t1", "t2", "t3")}
        for slots in got.values():
            await _ready(t, slots)
        # Then each task's actors were started on one node, each task on another
        homes = {task: {placed[s.name] for s in slots} for task, slots in got.items()}
        assert all(len(nodes) == 1 for nodes in homes.values())
        assert {n for nodes in homes.values() for n in nodes} == {"a", "b", "c"}
        assert {task: t.home_of(task) for task in got} == {task: next(iter(n)) for task, n in homes.items()}

    asyncio.run(main())


def test_a_task_holds_no_more_slots_than_one_node_can_hold(fake_ray):
    from threadbound.runtime.supervisor.capacity import Capacity

    # Given nodes of one CPU each and agents that take one CPU
    t, _ = _table(fake_ray, _Nodes(a=1, b=1, c=0), 3, agent_num_cpus=1.0)
    # Then a task of three roles holds one slot (its roles take turns), on a node with a CPU
    assert Capacity(t, 3, on_grant=lambda task, slots: None).width(roles=3) == 1
    assert set(t.placement.nodes()) == {"a", "b"}


def test_a_free_slot_moves_to_the_node_a_task_needs_with_the_cap_held(fake_ray):
    async def main():
        # Given four warm slots spread over two nodes (prewarm spreads them)
        t, placed = _table(fake_ray, _Nodes(a=2, b=2), 4)
        held = t.reserve("__prewarm__", 4)
        await _ready(t, held)
        for s in held:
            s.owner = None
        assert sorted(placed.values()) == ["a", "a", "b", "b"]
        # When a task needs three slots on one node
        slots = t.reserve("t1", 3)
        await _ready(t, slots)
        # Then it has them on one node: one slot's process moved there, the old one dead first
        assert len({s.node for s in slots}) == 1
        assert t.replacements == 1 and fake_ray.peak == 4

    asyncio.run(main())


def test_a_lost_nodes_slots_start_again_on_a_surviving_node_and_the_task_is_told(fake_ray):
    async def main():
        # Given a task on node b
        cluster = _Nodes(a=2, b=2)
        t, placed = _table(fake_ray, cluster, 4)
        t.reserve("t0", 2)
        slots = t.reserve("t1", 2)
        await _ready(t, slots)
        lost = t.home_of("t1")
        assert {placed[s.name] for s in slots} == {lost}
        # When its node dies and the step on its first slot crashes
        del cluster.nodes[lost]
        t.replace(slots[0], kill=True)
        await _ready(t, slots)
        # Then both its slots run on the surviving node, and it hears that its copy is gone
        (survivor,) = cluster.nodes
        assert [s.node for s in slots] == [survivor, survivor]
        assert t.moved["t1"] == (lost, survivor) and t.home_of("t1") == survivor
        assert fake_ray.peak <= 4

    asyncio.run(main())


@pytest.mark.timeout(120)
def test_model_actors_are_named_in_the_pools_namespace_and_stopped_by_shutdown(ray_session, pool_name):
    import ray
    from conftest import make_pool

    from threadbound.agents.models.local import model_actor_name

    # Given a pool, and a model actor one of its agents started on this node
    pool = make_pool(pool_name)
    namespace = pool.config.ray.namespace
    node = ray.get_runtime_context().get_node_id()
    name = model_actor_name(node, f"{pool_name}/")

    @ray.remote(num_cpus=0)
    class Model:
        def ping(self):
            return os.getpid()

    model = Model.options(name=name, namespace=namespace, lifetime="detached").remote()
    ray.get(model.ping.remote())
    # When the pool shuts down
    pool.shutdown()
    # Then its model actor is gone with it
    with pytest.raises(ValueError):
        ray.get_actor(name, namespace=namespace)


def test_a_snapshot_dir_a_node_cannot_reach_is_a_config_error_naming_it(tmp_path):
    import pickle

    from threadbound.runtime.errors import ConfigError
    from threadbound.runtime.supervisor.placement import check_snapshot_dir

    # Given a snapshot_dir on the supervisor's local disk, and a node that sees another disk
    def elsewhere(node, path, marker):
        return "the directory there is not the one the supervisor writes to (a local disk, not shared storage)"

    def shared(node, path, marker):
        return None if os.path.exists(os.path.join(path, marker)) else "not seen"

    err = check_snapshot_dir(str(tmp_path / "snaps"), ["node-1"], probe=elsewhere)
    # Then the pool refuses it, naming the field and what to use instead
    assert isinstance(err, ConfigError) and err.problems[0][0] == "snapshot_dir"
    assert "node-1" in str(err) and "s3://" in str(err) and "shared" in str(err)
    assert pickle.loads(pickle.dumps(err)).problems == err.problems
    # and a store every node sees passes, leaving nothing behind
    assert check_snapshot_dir(str(tmp_path / "snaps"), ["node-1"], probe=shared) is None
    assert os.listdir(tmp_path / "snaps") == []


@pytest.mark.timeout(60)
def test_an_address_that_refuses_the_token_is_a_config_error_naming_ray_address(ray_session, tmp_path):
    # Given the session's Ray (token auth on) and a client holding another token
    (tmp_path / "wrong").write_text("0123456789abcdef" * 4)
    env = {**os.environ, "RAY_AUTH_TOKEN_PATH": str(tmp_path / "wrong")}
    env.pop("RAY_AUTH_MODE", None)
    code = ("import json, os\n"
            "from threadbound.runtime import ConfigError, RuntimeConfig\n"
            "from threadbound.runtime.connect import connect_ray\n"
            "cfg = RuntimeConfig.from_mapping({'ray': {'address': os.environ['RAY_ADDRESS']}})\n"
            "try:\n    connect_ray(cfg)\nexcept ConfigError as e:\n    print(json.dumps(e.problems))\n")
    # When it joins from Python
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=50,
                          cwd=str(tmp_path))
    # Then it is told which field and what to do
    (field, message), = json.loads(proc.stdout.strip().splitlines()[-1])
    assert field == "ray.address" and "token authentication failed" in message
    assert "ray get-auth-token" in message


# -- the child process ---------------------------------------------------------------------

def _agents():
    from threadbound.agents import Agent

    class Walker(Agent):
        """Opens the task's workspace copy (making it on this node), says where it runs."""

        def step(self, ctx):
            import ray

            from threadbound.agents.workspace import Workspace

            spec = dict(ctx.inputs.get("*", {}))
            ws = Workspace.for_task(ctx.task_id, ctx.workspace)
            node = ray.get_runtime_context().get_node_id()
            seen = sorted(ws.files())
            ws.write(f"{ctx.role}.txt", node)
            yield f"{ctx.role} "
            time.sleep(spec.get("sleep_s", 0.0))
            return {"node": node, "copy": str(ws.path), "seen": seen}

    return Walker


def _child(out: str) -> None:
    import threading

    import ray
    from ray.cluster_utils import Cluster
    from ray.util.state import list_actors, list_tasks

    from threadbound.runtime import AgentPool, RuntimeConfig, Task

    sys.path.insert(0, HERE)
    from ports import free_port
    from scripted_agents import Scripted

    walker = _agents()
    workspace = os.path.join(out, "ws")
    os.makedirs(workspace, exist_ok=True)
    with open(os.path.join(workspace, "main.py"), "w") as fh:
        fh.write("x = 1\n")
    found: dict = {}
    # The state API needs the dashboard; not on 8265, which another Ray may hold.
    cluster = Cluster(initialize_head=True, head_node_args=dict(
        num_cpus=1, resources={"tb-node-0": 1}, include_dashboard=True, dashboard_port=free_port()))
    try:
        workers = [cluster.add_node(num_cpus=1, resources={f"tb-node-{i}": 1}) for i in (1, 2)]
        ray.init(address=cluster.address, namespace="multinode", logging_level="ERROR", log_to_driver=False)
        cluster.wait_for_nodes()
        head = cluster.head_node.node_id

        def settings(name, **kw):
            base = dict(name=name, max_agents=6, max_agents_per_task=2, step_timeout_s=20, task_timeout_s=90,
                        retry={"max_attempts": 4, "backoff_s": 0.05, "max_backoff_s": 0.2},
                        snapshot_dir=os.path.join(out, "snapshots"), health={"enabled": False},
                        metrics={"port": 0})
            base.update(kw)
            return RuntimeConfig.from_mapping(base)

        # 1. Spread: each task's agents on one node, the tasks over several nodes.
        with AgentPool(settings("spread"), agents={"w1": walker, "w2": walker}) as pool:
            handles = [pool.submit(Task(goal=f"spread {i}", agents=["w1", "w2"], workspace=workspace,
                                        inputs={"*": {"sleep_s": 0.4}})) for i in range(6)]
            results = [h.result(timeout=90) for h in handles]
            events = {h.task_id: list(h.stream()) for h in handles}
            # Ray's state API reports tasks and actors a while after they ran: read it until
            # every step of every task and the actor it ran on are listed (bounded).
            deadline = time.monotonic() + 90
            while True:
                actor_node = {a.actor_id: a.node_id for a in list_actors(limit=10_000)}
                step_actors = {}
                for h in handles:
                    for role in ("w1", "w2"):
                        tasks = list_tasks(filters=[("name", "=", f"{role}/{h.task_id}")], detail=True)
                        step_actors[(h.task_id, role)] = {t.actor_id for t in tasks if t.actor_id}
                listed = all(ids and ids <= actor_node.keys() for ids in step_actors.values())
                if listed or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            actor_nodes, step_nodes = {}, {}
            for h in handles:
                ids = step_actors[(h.task_id, "w1")] | step_actors[(h.task_id, "w2")]
                actor_nodes[h.task_id] = sorted({actor_node[a] for a in ids if a in actor_node})
                step_nodes[h.task_id] = sorted({r.outputs[role]["node"] for r in results if r.task_id == h.task_id
                                                for role in ("w1", "w2")})
            copies = os.path.join(out, "copies")
            time.sleep(1.0)  # copies are deleted in the background
            found["spread"] = {
                "tasks": len(handles), "statuses": [r.status for r in results],
                "actor_nodes": actor_nodes, "step_nodes": step_nodes,
                "copy_nodes": {t: sorted({e.data["output"]["node"] for e in evs if e.kind == "step_finished"})
                               for t, evs in events.items()},
                "admitted_nodes": {t: next(e.data.get("node") for e in evs if e.kind == "admitted")
                                   for t, evs in events.items()},
                "copies_left": sorted(n for n in os.listdir(copies) if not n.startswith(".")) if os.path.isdir(copies)
                else [],
            }

        # 2. Node loss: remove the worker node running tasks, mid-step.
        cfg = settings("loss")
        with AgentPool(cfg, agents={"w1": walker, "w2": walker}) as pool:
            handles = [pool.submit(Task(goal=f"loss {i}", agents=["w1", "w2"], workspace=workspace,
                                        inputs={"*": {"sleep_s": 1.5}})) for i in range(5)]
            samples, per_task, stop = [0], [0], threading.Event()

            def watch():
                while not stop.is_set():
                    alive = [a for a in list_actors(filters=[("state", "!=", "DEAD")], limit=10_000)
                             if (a.name or "").startswith("loss/agent/")]
                    samples.append(len(alive))
                    owners: dict = {}
                    for s in pool.stats()["slots"]:
                        if s["owner"]:
                            owners[s["owner"]] = owners.get(s["owner"], 0) + 1
                    per_task.append(max(owners.values(), default=0))
                    stop.wait(0.3)

            watcher = threading.Thread(target=watch, daemon=True)
            watcher.start()
            by_node = {w.node_id: w for w in workers}
            deadline = time.monotonic() + 30
            on_node: dict = {}
            while time.monotonic() < deadline:  # wait until a worker node runs steps
                on_node = {}
                for s in pool.stats()["slots"]:
                    if s["busy"] and s["node"] in by_node:
                        on_node.setdefault(s["node"], set()).add(s["owner"])
                if on_node:
                    break
                time.sleep(0.1)
            lost = max(on_node, key=lambda n: len(on_node[n]))
            time.sleep(0.3)
            cluster.remove_node(by_node[lost])
            results = [h.result(timeout=120) for h in handles]
            stop.set()
            watcher.join()
            events = {h.task_id: list(h.stream()) for h in handles}
            found["loss"] = {
                "tasks": len(handles), "statuses": [r.status for r in results], "lost_node": lost,
                "on_lost_node": sorted(on_node[lost]),
                "kinds": {t: [e.kind for e in evs] for t, evs in events.items()},
                "workspace_lost": {t: [e.data for e in evs if e.kind == "workspace_lost"] for t, evs in events.items()},
                "final_node": {r.task_id: r.outputs["w2"]["node"] for r in results},
                "max_alive_slots": max(samples), "max_agents": cfg.max_agents,
                "max_per_task": max(per_task), "max_agents_per_task": cfg.max_agents_per_task,
            }

        # 3. The supervisor killed: Ray restarts it on the head; it resumes from the shared store.
        mark = os.path.join(out, "mark")
        os.makedirs(mark, exist_ok=True)
        cfg = settings("kill", snapshot_dir="file://" + os.path.join(out, "shared-snapshots"),
                       max_agents=4, max_agents_per_task=1)
        with AgentPool(cfg, agents={r: Scripted for r in "abc"}) as pool:
            handles = [pool.submit(Task(goal=f"kill {i}", agents=["a", "b", "c"],
                                        inputs={"*": {"sleep_s": 0.6, "tokens": 2, "mark": mark}}))
                       for i in range(3)]

            def where_supervisor():
                rows = list_actors(filters=[("name", "=", "kill"), ("state", "=", "ALIVE")])
                return rows[0].node_id if rows else None

            nodes = [where_supervisor()]
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                if _finished(pool, handles) >= 3:
                    break
                time.sleep(0.1)
            committed = {}
            for h in handles:
                committed[h.task_id] = _committed_keys(pool, h.task_id)
            ray.kill(pool._sup, no_restart=False)
            results = [h.result(timeout=120) for h in handles]
            nodes.append(where_supervisor())  # the restarted one
            with open(os.path.join(mark, "runs.log")) as fh:
                runs = fh.read().split()
            before = [k for keys in committed.values() for k in keys]
            finished = {h.task_id: [(e.data["round"], e.agent) for e in h.stream() if e.kind == "step_finished"]
                        for h in handles}
            resumed = any(e.kind == "resumed" for h in handles for e in h.stream())
            found["kill"] = {
                "tasks": len(handles), "statuses": [r.status for r in results], "head": head,
                "supervisor_nodes": nodes, "resumed": resumed, "committed_before": len(before),
                "rerun": sorted(k for k in before if runs.count(k) != 1), "finished": finished,
            }
    finally:
        ray.shutdown()
        cluster.shutdown()
    print(json.dumps(found))


def _finished(pool, handles) -> int:
    return sum(len(_committed_keys(pool, h.task_id)) for h in handles)


def _committed_keys(pool, task_id: str) -> list[str]:
    """The idempotency keys of the task's committed steps so far (its step_finished events)."""
    from threadbound.runtime.client import _sync

    events, _ = _sync(pool._client.call("read", task_id, 0, 0.0))
    return [f"{task_id}:{d['round']}:{agent}:{d['attempt']}" for _, kind, agent, d, _ in events
            if kind == "step_finished"]


if __name__ == "__main__":
    _child(sys.argv[1])
