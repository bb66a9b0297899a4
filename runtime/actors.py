"""The one place where plain classes become Ray actors and get their Ray options."""

from __future__ import annotations

import logging
import warnings
from typing import Any, Callable

import ray

from threadbound.agents.events import Row
from threadbound.agents.models.local import serve_models_in

from .config import RuntimeConfig
from .supervisor.health import NodesMemory
from .supervisor.placement import Placement, check_snapshot_dir, memory_on, supervisor_placement
from threadbound.agents.host import SlotWorker
from .supervisor.core import Supervisor

log = logging.getLogger("threadbound.supervisor")


class _SlotWorker(SlotWorker):
    """An agent actor that names the model actors its agents start in its pool's namespace."""

    def __init__(self, slot_name: str, namespace: str | None = None, prefix: str = "", places: int = 1) -> None:
        super().__init__(slot_name, places)
        serve_models_in(namespace, prefix)


# One thread, own process; never restarted by Ray: the supervisor replaces slots itself
# so that the agent cap holds while it does. With agents_per_actor k > 1 it is a threaded
# actor (SlotFactory sets max_concurrency): k step calls at once, plus CONTROL_CALLS.
SlotActor = ray.remote(max_concurrency=1, max_restarts=0)(_SlotWorker)
CONTROL_CALLS = 4  # ping and stop calls that must get through while every place runs a step


def _prefix(config: RuntimeConfig) -> str:
    """What the names of a pool's actors start with (as its slots' ``<prefix>agent/<n>``)."""
    return "" if config.name == "threadbound" else f"{config.name}/"


class _Supervisor(Supervisor):
    """When Ray restarts the supervisor's process, it resumes from its snapshots.

    On a cluster its agents' memory is read on every node that holds them, and a
    ``snapshot_dir`` some node cannot reach is refused (a restarted supervisor may run
    on another node, and resumes from there)."""

    def __init__(self, config: RuntimeConfig, roles: dict[str, bytes], *, resume: bool = False,
                 creator: str | None = None) -> None:
        # Which client created this pool (``AgentPool`` passes a fresh id): a client that
        # finds another id in ``info`` joined a pool it did not start, and leaves it running.
        self._creator = creator
        ctx = ray.get_runtime_context()
        with warnings.catch_warnings():  # Ray's own property reads its deprecated actor_id: not the user's concern
            warnings.simplefilter("ignore")
            restarted = ctx.was_current_actor_reconstructed
        factory = SlotFactory(config)
        self._unreachable = None
        # The actor id survives Ray's restarts: the restarted supervisor may take over
        # the lease its previous process held.
        super().__init__(config, roles, make_actor=factory,
                         resume=resume or (restarted and config.snapshots.enabled),
                         lease_owner=ctx.get_actor_id())
        if self._unreachable is not None:
            self.fatal = self._unreachable  # the ConfigError itself, not its wrapping
        self.health.monitor.memory = NodesMemory(self.slots.hosts, factory.placement.here, memory_on)

    async def info(self) -> dict[str, Any]:
        return {**await super().info(), "creator": self._creator}

    # Clients long-poll these many times a second. Ray keeps a bounded number of tasks
    # in its task table (what the dashboard lists): left out of it, the polls no longer
    # push the steps (``<role>/<task id>``) out of it. (No measurable CPU saved: 7.4-7.7
    # ms per step in all processes with or without, at 4 tasks at a time.)
    @ray.method(enable_task_events=False)
    async def read(self, task_id: str, offset: int = 0, wait_s: float = 0.0) -> tuple[list[Row], str]:
        return await super().read(task_id, offset, wait_s)

    @ray.method(enable_task_events=False)
    async def read_many(self, cursors: dict[str, int], wait_s: float = 0.0) -> dict[str, tuple[list[Row], str]]:
        return await super().read_many(cursors, wait_s)

    @ray.method(enable_task_events=False)
    async def wait(self, task_id: str, timeout_s: float | None) -> dict[str, Any] | None:
        return await super().wait(task_id, timeout_s)

    def _open_durability(self, resume: bool, lease_owner: str | None) -> None:
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
        if self.places > 1:
            self.opts["max_concurrency"] = self.places + CONTROL_CALLS
        self.placement = Placement(config.ray.agent_num_cpus, namespace=self.namespace, models_prefix=self.prefix)

    def __call__(self, name: str, node: str | None = None) -> Any:
        opts = self.opts if node is None else {**self.opts, **self.placement.options(node)}
        return SlotActor.options(name=name, **opts).remote(name, self.namespace, self.prefix, self.places)


def slot_actor_factory(config: RuntimeConfig) -> Callable[..., Any]:
    return SlotFactory(config)


def supervisor_options(config: RuntimeConfig) -> dict[str, Any]:
    """The supervisor's Ray options: named in the pool's namespace, restarted by Ray when
    it has snapshots to resume from, and kept on the head node (or on the nodes with a
    ``threadbound-supervisor`` resource when any node has one)."""
    opts: dict[str, Any] = {"name": config.name, "namespace": config.ray.namespace, "get_if_exists": True,
                            # Restarting helps only if there is state to restart from.
                            "max_restarts": config.ray.supervisor_max_restarts if config.snapshots.enabled else 0}
    if config.ray.detached:
        opts["lifetime"] = "detached"
    opts.update(supervisor_placement())
    return opts
