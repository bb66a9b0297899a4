"""The one place where plain classes become Ray actors and get their Ray options."""

from __future__ import annotations

import os
import warnings
from typing import Any, Callable, Iterator

import ray

from threadbound.agents.events import Row
from threadbound.agents.models.local import serve_models_in

from .config import RuntimeConfig
from .supervisor.health import NodesMemory
from .errors import ConfigError
from .shards import shard_name
from .supervisor.allocator import Allocator, allocator_name
from .supervisor.layout import settle_layout
from .supervisor.placement import (SUPERVISOR_RESOURCE, Placement, check_snapshot_dir, memory_on,
                                   supervisor_placement)
from threadbound.agents.host import SlotWorker
from threadbound.agents.wire import pack, unpack
from .supervisor.core import Supervisor


class _SlotWorker(SlotWorker):
    """An agent actor that names the model actors its agents start in its pool's namespace."""

    def __init__(self, slot_name: str, namespace: str | None = None, prefix: str = "", places: int = 1) -> None:
        super().__init__(slot_name, places)
        serve_models_in(namespace, prefix)

    # Seen from Ray, a step goes in and its batches come out as bytes (``agents.wire``).
    def start_step(self, req: bytes) -> bytes:  # type: ignore[override]
        return pack(super().start_step(unpack(req)))

    def events(self) -> Iterator[bytes]:  # type: ignore[override]
        for item in super().events():
            yield pack(item)


# Never restarted by Ray: the supervisor replaces slots itself so that the agent cap holds
# while it does. A threaded actor (SlotFactory sets max_concurrency): its agents_per_actor
# k places start a step each (``start_step`` returns with the step's first batch), its one
# event stream (``events``) runs as long as it does, and CONTROL_CALLS more get through
# while every place is busy. The supervisor sends a place one step at a time.
SlotActor = ray.remote(max_restarts=0)(_SlotWorker)
CONTROL_CALLS = 4  # the event stream, ping and stop calls


def _prefix(config: RuntimeConfig) -> str:
    """What the names of a pool's actors start with (as its slots' ``<prefix>agent/<n>``)."""
    return "" if config.name == "threadbound" else f"{config.name}/"


class _Supervisor(Supervisor):
    """When Ray restarts the supervisor's process, it resumes from its snapshots.

    On a cluster its agents' memory is read on every node that holds them, and a
    ``snapshot_dir`` some node cannot reach is refused (a restarted supervisor may run
    on another node, and resumes from there)."""

    def __init__(self, config: RuntimeConfig, roles: dict[str, bytes], *, resume: bool = False,
                 creator: str | None = None, shard: int = 0) -> None:
        # Which client created this pool (``AgentPool`` passes a fresh id): a client that
        # finds another id in ``info`` joined a pool it did not start, and leaves it running.
        self._creator = creator
        ctx = ray.get_runtime_context()
        with warnings.catch_warnings():  # Ray's own property reads its deprecated actor_id: not the user's concern
            warnings.simplefilter("ignore")
            restarted = ctx.was_current_actor_reconstructed
        factory = SlotFactory(config)
        self._unreachable = None
        # Several shards: the pool's allocator (created by the client before the shards)
        # keeps the caps across them; one shard keeps them itself, as it always did.
        allocator = find_allocator(config) if config.shards > 1 else None
        # The actor id survives Ray's restarts: the restarted supervisor may take over
        # the lease its previous process held.
        super().__init__(config, roles, make_actor=factory,
                         resume=resume or (restarted and config.snapshots.enabled),
                         lease_owner=ctx.get_actor_id(), shard=shard, allocator=allocator)
        if self._unreachable is not None:
            self.fatal = self._unreachable  # the ConfigError itself, not its wrapping
        self.health.monitor.memory = NodesMemory(self.slots.hosts, factory.placement.here, memory_on)

    async def info(self) -> dict[str, Any]:
        got = {**await super().info(), "creator": self._creator}
        if self.cfg.shards > 1:  # which shard this is, and the pool's shards by name
            got["shard"] = self.shard.shard
            got["shards"] = [shard_name(self.cfg.name, k) for k in range(self.cfg.shards)]
            got["allocator"] = None if self.allocator is None else allocator_name(self.cfg.name)
        return got

    async def stats(self) -> dict[str, Any]:
        got = await super().stats()
        if self.cfg.shards > 1:  # (merged by the client: each shard's own under "shards")
            got.update(shard=self.shard.shard, supervisor=shard_name(self.cfg.name, self.shard.shard),
                       pid=os.getpid(), node=ray.get_runtime_context().get_node_id())
        return got

    # Clients long-poll these many times a second. Ray keeps a bounded number of tasks
    # in its task table (what the dashboard lists): left out of it, the polls no longer
    # push the steps (``<role>/<task id>``) out of it. (No measurable CPU saved: 7.4-7.7
    # ms per step in all processes with or without, at 4 tasks at a time.)
    @ray.method(enable_task_events=False)
    async def read(self, task_id: str, offset: int = 0, wait_s: float = 0.0) -> tuple[list[Row], str]:
        return await super().read(task_id, offset, wait_s)

    # The answer goes back packed (``agents.wire``): the rows of every task a client
    # follows, in one bytes object Ray moves as it is.
    @ray.method(enable_task_events=False)
    async def read_many(self, cursors: dict[str, int], wait_s: float = 0.0) -> bytes:  # type: ignore[override]
        return pack(await super().read_many(cursors, wait_s))

    @ray.method(enable_task_events=False)
    async def wait(self, task_id: str, timeout_s: float | None) -> dict[str, Any] | None:
        return await super().wait(task_id, timeout_s)

    def _open_durability(self, resume: bool, lease_owner: str | None) -> None:
        if self.shard.shard == 0:
            # A history made with another number of shards: refused, or set aside when
            # drained (the client did so already if it can see the location); shard 0
            # does it before the client creates the other shards.
            try:
                settle_layout(self.cfg, resume=resume)
            except ConfigError as exc:
                self._unreachable = exc
                raise OSError(str(exc)) from None
        placement = self.slots.placement
        others = [n for n in placement.nodes() if n != placement.here()] if placement is not None else []
        if others:  # more than one node: each must reach the snapshots
            problem = check_snapshot_dir(self.cfg.snapshot_dir, others)
            if problem is not None:
                self._unreachable = problem
                raise OSError(str(problem))
        super()._open_durability(resume, lease_owner)


# An async actor: many clients may wait on it at once, it never blocks a CPU.
SupervisorActor = ray.remote(num_cpus=0, max_concurrency=10_000)(_Supervisor)


class SlotFactory:
    """Creates a pool's slot actors: ``make(name)``, or ``make(name, node)`` pinned to a
    node (hard node affinity; see ``runtime.placement`` for why not placement groups).
    ``placement`` is the cluster view the slot table places slots with."""

    def __init__(self, config: RuntimeConfig) -> None:
        self.opts: dict[str, Any] = {"namespace": config.ray.namespace}
        if config.ray.agent_num_cpus is not None:
            self.opts["num_cpus"] = config.ray.agent_num_cpus
        if config.ray.detached:
            self.opts["lifetime"] = "detached"
        self.namespace = config.ray.namespace
        self.prefix = _prefix(config)
        self.places = config.agents_per_actor
        self.opts["max_concurrency"] = self.places + CONTROL_CALLS
        self.placement = Placement(config.ray.agent_num_cpus, namespace=self.namespace, models_prefix=self.prefix)

    def __call__(self, name: str, node: str | None = None) -> Any:
        opts = self.opts if node is None else {**self.opts, **self.placement.options(node)}
        return SlotActor.options(name=name, **opts).remote(name, self.namespace, self.prefix, self.places)


def slot_actor_factory(config: RuntimeConfig) -> Callable[..., Any]:
    return SlotFactory(config)


def supervisor_options(config: RuntimeConfig, shard: int = 0) -> dict[str, Any]:
    """The Ray options of shard ``shard``'s supervisor: named in the pool's namespace
    (shard 0 as the pool, shard k ``<name>/shard-<k>``), restarted by Ray when it has
    snapshots to resume from, and kept on the head node (or on the nodes with a
    ``threadbound-supervisor`` resource when any node has one: the shards of a pool
    round-robin over them, see :func:`shard_placement`)."""
    opts: dict[str, Any] = {"name": shard_name(config.name, shard), "namespace": config.ray.namespace,
                            "get_if_exists": True,
                            # Restarting helps only if there is state to restart from.
                            "max_restarts": config.ray.supervisor_max_restarts if config.snapshots.enabled else 0}
    if config.ray.detached:
        opts["lifetime"] = "detached"
    opts.update(supervisor_placement() if config.shards == 1 else shard_placement(shard))
    return opts


def shard_placement(shard: int) -> dict[str, Any]:
    """Where shard ``shard`` runs: with several nodes holding the ``threadbound-supervisor``
    resource, a soft node affinity to one of them in turn (by node id), plus a share of
    that resource, so that the shards spread over them and Ray, restarting a shard whose
    node died, puts it on a surviving one; else the head, as a single supervisor."""
    base = supervisor_placement()
    if "resources" not in base:
        return base
    try:
        nodes = sorted(n["NodeID"] for n in ray.nodes()
                       if n.get("Alive") and (n.get("Resources") or {}).get(SUPERVISOR_RESOURCE))
    except Exception:
        return base
    if len(nodes) < 2:
        return base
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return {**base, "scheduling_strategy": NodeAffinitySchedulingStrategy(nodes[shard % len(nodes)], soft=True)}


# The global caps' allocator of a pool of several shards (runtime.supervisor.allocator):
# an async actor that Ray restarts, and retries calls on, for as long as the pool lives.
AllocatorActor = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)(Allocator)


def allocator_options(config: RuntimeConfig) -> dict[str, Any]:
    """The allocator's Ray options: named ``<name>/allocator`` in the pool's namespace,
    detached like the supervisors when they are, placed where they are."""
    opts: dict[str, Any] = {"name": allocator_name(config.name), "namespace": config.ray.namespace,
                            "get_if_exists": True}
    if config.ray.detached:
        opts["lifetime"] = "detached"
    opts.update(supervisor_placement())
    return opts


def start_allocator(config: RuntimeConfig) -> Any:
    """The pool's allocator actor (the one running, or a new one)."""
    return AllocatorActor.options(**allocator_options(config)).remote(config.max_agents, config.shards)


def find_allocator(config: RuntimeConfig) -> "AllocatorByName":
    """The pool's allocator, found by name when a shard first calls it (the client creates
    it before the shards; a shard that Ray restarts finds it again)."""
    return AllocatorByName(allocator_name(config.name), config.ray.namespace)


class AllocatorByName:
    """The pool's allocator actor, looked up by its name at the first call and again
    after a lookup that found nothing. Fails closed: a shard whose allocator is not
    there grants nothing (its ``Share`` retries with backoff, as for an allocator that
    died) rather than keeping the caps by itself, which would let N shards run N times
    ``max_agents``."""

    def __init__(self, name: str, namespace: str | None) -> None:
        self.name, self.namespace = name, namespace
        self._handle: Any = None

    @property
    def sync(self) -> Any:
        if self._handle is None:
            try:
                self._handle = ray.get_actor(self.name, namespace=self.namespace)
            except ValueError:
                raise LookupError(f"no allocator actor {self.name!r} in namespace {self.namespace!r} "
                                  "(yet): no new task starts until it is there") from None
        return self._handle.sync
