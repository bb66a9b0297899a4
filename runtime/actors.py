"""The one place where plain classes become Ray actors and get their Ray options."""

from __future__ import annotations

import warnings
from typing import Any, Callable

import ray

from .config import RuntimeConfig
from .slot import SlotWorker
from .supervisor import Supervisor

# One thread, own process; never restarted by Ray: the supervisor replaces slots itself
# so that the agent cap holds while it does.
SlotActor = ray.remote(max_concurrency=1, max_restarts=0)(SlotWorker)


class _Supervisor(Supervisor):
    """When Ray restarts the supervisor's process, it resumes from its snapshots."""

    def __init__(self, config: RuntimeConfig, roles: dict[str, bytes], *, resume: bool = False) -> None:
        ctx = ray.get_runtime_context()
        with warnings.catch_warnings():  # Ray's own property reads its deprecated actor_id: not the user's concern
            warnings.simplefilter("ignore")
            restarted = ctx.was_current_actor_reconstructed
        # The actor id survives Ray's restarts: the restarted supervisor may take over
        # the lease its previous process held.
        super().__init__(config, roles, make_actor=slot_actor_factory(config),
                         resume=resume or (restarted and config.snapshots.enabled),
                         lease_owner=ctx.get_actor_id())


# An async actor: many clients may wait on it at once, it never blocks a CPU.
SupervisorActor = ray.remote(num_cpus=0, max_concurrency=10_000)(_Supervisor)


def slot_actor_factory(config: RuntimeConfig) -> Callable[[str], Any]:
    opts: dict[str, Any] = {"namespace": config.ray.namespace}
    if config.ray.agent_num_cpus is not None:
        opts["num_cpus"] = config.ray.agent_num_cpus
    if config.ray.detached:
        opts["lifetime"] = "detached"

    def make(name: str) -> Any:
        return SlotActor.options(name=name, **opts).remote(name)

    return make


def supervisor_options(config: RuntimeConfig) -> dict[str, Any]:
    opts: dict[str, Any] = {"name": config.name, "namespace": config.ray.namespace, "get_if_exists": True,
                            # Restarting helps only if there is state to restart from.
                            "max_restarts": config.ray.supervisor_max_restarts if config.snapshots.enabled else 0}
    if config.ray.detached:
        opts["lifetime"] = "detached"
    return opts
