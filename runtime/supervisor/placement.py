"""Where a pool's actors run on a Ray cluster: a task's agents together on one node.

A task's workspace copy is made by the first of its agents that opens it, on the node
that agent runs on (``Workspace.for_task`` inside the slot actor), and every other
agent of the task must see that same copy. So the slot table hands a task only slots
on one node (the task's *home*), chosen by free slots; slots spread over the nodes
while the caps (``max_agents``, ``max_agents_per_task``) stay global.

**Node affinity, not placement groups.** Slots are warm actors that serve task after
task (a process per agent would cost ~40x in throughput, see DESIGN). An actor created
in a placement group lives and dies with the group, so a group per task would mean new
processes for every task, and a group per node would only restate what Ray already
knows about each node's resources. Instead each slot actor is created with a hard
``NodeAffinitySchedulingStrategy`` to the node chosen for it; a free slot whose process
is on the wrong node for the next task is moved (killed, confirmed dead, started there:
the cap holds while it moves, as for any replacement).

**How many agents a node holds.** With ``ray.agent_num_cpus`` unset an agent actor
takes Ray's actor default (1 CPU to be scheduled, none held), so any node with a CPU
holds any number of them and a node with ``num_cpus=0`` (a head kept free of work)
none; with ``agent_num_cpus: x``, ``CPU // x`` of them.

**Node loss.** When a node dies its agents' steps end ``agent_crashed`` (the attempt
path) and are retried by policy; their slots are started again on the task's new home,
a surviving node, and a task with a workspace restarts its round there from the
original workspace, saying so in a ``workspace_lost`` event (``admission``).

**Checks that read the user's workspace** (``Task`` validation on submit, the
``level: auto`` size walk) run on the client and the supervisor: they read the
original workspace, which every node must see at the same path anyway (each node
makes its copies from it: a shared filesystem or the same checkout on each node), so
they see what the agents will see. A node that cannot see it fails the step with a
``WorkspaceError`` naming the path.

The view of the cluster is cached for ``REFRESH_S`` (one ``ray.nodes()`` call to the
GCS), and read again at once after an actor died or could not start.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import secrets
import time
from typing import Any, Awaitable, Callable, Iterable

log = logging.getLogger("threadbound.placement")

REFRESH_S = 2.0
UNLIMITED = 1 << 30  # agents a node can hold when Ray does not bound them
HEAD_RESOURCE = "node:__internal_head__"
SUPERVISOR_RESOURCE = "threadbound-supervisor"
PROBE_TIMEOUT_S = 30.0


def node_capacity(resources: dict[str, float], agent_num_cpus: float | None) -> int:
    """How many agent actors a node with ``resources`` (its totals) can hold.

    Examples:
        >>> node_capacity({"CPU": 4.0}, None), node_capacity({"CPU": 0.0}, None)
        (1073741824, 0)
        >>> node_capacity({"CPU": 4.0}, 1.5), node_capacity({}, 0)
        (2, 1073741824)
    """
    cpus = float(resources.get("CPU", 0.0))
    if agent_num_cpus is None:  # Ray's actor default: 1 CPU to be scheduled, 0 held
        return UNLIMITED if cpus >= 1 else 0
    if agent_num_cpus <= 0:
        return UNLIMITED
    return int(math.floor(cpus / agent_num_cpus + 1e-9))


def _ray_nodes() -> list[tuple[str, dict[str, float]]]:
    import ray

    return [(n["NodeID"], dict(n.get("Resources") or {})) for n in ray.nodes() if n.get("Alive")]


def _here() -> str | None:
    import ray

    try:
        return ray.get_runtime_context().get_node_id()
    except Exception:
        return None


def affinity(node: str) -> dict[str, Any]:
    """Ray options that pin an actor or task to ``node`` (hard: never elsewhere)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(node, soft=False)}


class Placement:
    """The nodes that can hold agents, and how many each (a cached view of the cluster).

    ``list_nodes`` and ``clock`` are injected so the slot table's placement logic is
    tested without Ray (``tests/test_slots.py``).

    Examples:
        >>> p = Placement(None, list_nodes=lambda: [("a", {"CPU": 2.0}), ("b", {"CPU": 0.0})])
        >>> sorted(p.nodes()), p.largest()
        (['a'], 1073741824)
    """

    def __init__(self, agent_num_cpus: float | None = None, *,
                 list_nodes: Callable[[], list[tuple[str, dict[str, float]]]] = _ray_nodes,
                 here: Callable[[], str | None] = _here, clock: Callable[[], float] = time.monotonic,
                 refresh_s: float = REFRESH_S, namespace: str | None = None, models_prefix: str = "") -> None:
        self.agent_num_cpus = agent_num_cpus
        self.namespace = namespace
        self.models_prefix = models_prefix  # model actors started by this pool's agents: <prefix>model/<node>
        self._list_nodes = list_nodes
        self._here = here
        self._here_id: str | None = None
        self.clock = clock
        self.refresh_s = refresh_s
        self._nodes: dict[str, int] = {}
        self._at = float("-inf")

    def invalidate(self) -> None:
        """Read the cluster again on the next question (an actor died or did not start)."""
        self._at = float("-inf")

    def nodes(self) -> dict[str, int]:
        """Alive nodes that can hold at least one agent -> how many they can hold."""
        now = self.clock()
        if now - self._at >= self.refresh_s:
            try:
                listed = self._list_nodes()
            except Exception as exc:  # the GCS briefly unreachable: keep the last view
                log.warning("could not list the cluster's nodes: %r", exc)
            else:
                self._nodes = {}
                for node, resources in listed:
                    cap = node_capacity(resources, self.agent_num_cpus)
                    if cap > 0:
                        self._nodes[node] = cap
            self._at = now
        return self._nodes

    def largest(self) -> int:
        """The most agents one node can hold (0: no node can hold one now)."""
        return max(self.nodes().values(), default=0)

    def here(self) -> str | None:
        """The node this process (the supervisor) runs on."""
        if self._here_id is None:
            self._here_id = self._here()
        return self._here_id

    def options(self, node: str) -> dict[str, Any]:
        return affinity(node)

    async def stop_models(self, kill: Callable[[Any], Awaitable[None]]) -> int:
        """Kill the model actors this pool's agents started (one per node, named
        ``<prefix>model/<node id>`` in the pool's namespace); returns how many."""
        if self.namespace is None:
            return 0
        import ray

        from threadbound.agents.models.local import MODEL_ACTOR

        start = f"{self.models_prefix}{MODEL_ACTOR}/"
        named = await asyncio.to_thread(ray.util.list_named_actors, all_namespaces=True)
        handles = []
        for entry in named:
            if entry.get("namespace") == self.namespace and entry.get("name", "").startswith(start):
                try:
                    handles.append(ray.get_actor(entry["name"], namespace=self.namespace))
                except ValueError:  # gone meanwhile
                    pass
        await asyncio.gather(*(kill(h) for h in handles), return_exceptions=True)
        return len(handles)


# -- work run on a given node ------------------------------------------------------------

def _remote(fn: Callable[..., Any]) -> Any:
    import ray

    # num_cpus=0: a few milliseconds of bookkeeping must never wait for a CPU the agents use.
    return ray.remote(num_cpus=0, max_retries=0)(fn)


def _discard_copy_here(task_id: str) -> bool:
    from threadbound.agents.workspace import Workspace

    return Workspace.discard(task_id)


def _path_visible(path: str, marker: str) -> str | None:
    """On a node: None if ``marker`` (written by the supervisor) is seen under ``path``,
    else why not."""
    try:
        if "://" in path:
            import fsspec

            fs, root = fsspec.core.url_to_fs(path)
            return None if fs.exists(f"{root.rstrip('/')}/{marker}") else "the directory there does not hold " \
                "what the supervisor wrote (another storage of the same name)"
        if not os.path.isdir(path):
            return "no such directory on that node"
        return None if os.path.exists(os.path.join(path, marker)) else \
            "the directory there is not the one the supervisor writes to (a local disk, not shared storage)"
    except Exception as exc:  # an unreachable bucket, missing credentials, a missing fsspec backend
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"


_REMOTES: dict[str, Any] = {}


def on_node(node: str, fn: Callable[..., Any], *args: Any) -> Any:
    """Run ``fn(*args)`` as a small Ray task on ``node``; returns its ObjectRef."""
    remote = _REMOTES.get(fn.__name__)
    if remote is None:
        remote = _REMOTES[fn.__name__] = _remote(fn)
    return remote.options(name=f"threadbound/{fn.__name__.strip('_')}", **affinity(node)).remote(*args)


async def discard_copy_on(node: str, task_id: str) -> bool:
    """Delete task ``task_id``'s workspace copy on ``node`` (where its agents ran)."""
    return await on_node(node, _discard_copy_here, task_id)


async def memory_on(node: str) -> float:
    """The memory in use on ``node``, in percent (psutil, read there)."""
    from .health import node_memory_percent

    return await on_node(node, node_memory_percent)


def check_snapshot_dir(snapshot_dir: str, nodes: Iterable[str], *,
                       probe: Callable[[str, str, str], Awaitable[str | None] | str | None] | None = None,
                       timeout_s: float = PROBE_TIMEOUT_S) -> Any:
    """A :class:`ConfigError` naming ``snapshot_dir`` if a node in ``nodes`` cannot reach
    it (None if each can, or does not answer in ``timeout_s``).

    The supervisor writes a marker file there; each node must see it. ``probe(node,
    path, marker)`` answers None (seen) or why not; by default a Ray task on that node.
    """
    from ..errors import ConfigError

    nodes = list(nodes)
    if not nodes:
        return None
    marker = f".threadbound-reach-{secrets.token_hex(6)}"
    try:
        _write_marker(snapshot_dir, marker)
    except Exception as exc:
        return ConfigError("snapshot_dir", [("snapshot_dir", (
            f"{snapshot_dir!r} cannot be written from the supervisor's node ({type(exc).__name__}: {exc}); "
            "give snapshot_dir a location every node can write: an s3:// or gs:// URL, or a shared filesystem"))])
    try:
        if probe is None:
            import ray

            refs = {node: on_node(node, _path_visible, snapshot_dir, marker) for node in nodes}
            ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
            answers = {}
            for node, ref in refs.items():
                if ref in ready:
                    try:
                        answers[node] = ray.get(ref)
                    except Exception as exc:  # the node went away meanwhile: not the store's fault
                        log.warning("could not check snapshot_dir from node %s: %r", node, exc)
                else:
                    log.warning("node %s did not answer whether it reaches snapshot_dir in %gs", node, timeout_s)
        else:
            answers = {node: probe(node, snapshot_dir, marker) for node in nodes}
    finally:
        try:
            _remove_marker(snapshot_dir, marker)
        except Exception:
            pass
    bad = {node: why for node, why in answers.items() if why}
    if not bad:
        return None
    node, why = next(iter(bad.items()))
    more = f" (and {len(bad) - 1} other node(s))" if len(bad) > 1 else ""
    return ConfigError("snapshot_dir", [("snapshot_dir", (
        f"{snapshot_dir!r} is not reachable from node {node}{more}: {why}. A supervisor restarted on another "
        "node resumes from snapshot_dir, so every node must reach the same storage: use an s3:// or gs:// URL "
        "(fsspec), or a filesystem shared by all nodes (NFS), or run on one node"))])


def _write_marker(path: str, marker: str) -> None:
    if "://" in path:
        import fsspec

        fs, root = fsspec.core.url_to_fs(path)
        fs.makedirs(root, exist_ok=True)
        with fs.open(f"{root.rstrip('/')}/{marker}", "wb") as fh:
            fh.write(b"threadbound")
        return
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, marker), "wb") as fh:
        fh.write(b"threadbound")


def _remove_marker(path: str, marker: str) -> None:
    if "://" in path:
        import fsspec

        fs, root = fsspec.core.url_to_fs(path)
        fs.rm(f"{root.rstrip('/')}/{marker}")
        return
    os.unlink(os.path.join(path, marker))


# -- the supervisor's node ---------------------------------------------------------------

def supervisor_placement() -> dict[str, Any]:
    """Ray options that keep the supervisor on head-eligible nodes: the ones with a
    ``threadbound-supervisor`` resource when any node has it, else the head node.
    Empty when Ray is not reachable from here (Ray then places it as it likes)."""
    try:
        import ray

        nodes = [n for n in ray.nodes() if n.get("Alive")]
    except Exception:
        return {}
    if any((n.get("Resources") or {}).get(SUPERVISOR_RESOURCE) for n in nodes):
        # A small share, so that several pools fit on one such node.
        return {"resources": {SUPERVISOR_RESOURCE: 0.01}}
    head = [n["NodeID"] for n in nodes if HEAD_RESOURCE in (n.get("Resources") or {})]
    # Pinned even while the head is alone: nodes that join later (autoscaling) are not
    # where a restarted supervisor should land.
    return affinity(head[0]) if head else {}
