"""What ``pool.stats()`` reports: the supervisor's parts read at one moment."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .core import Supervisor


def pool_stats(sup: "Supervisor") -> dict[str, Any]:
    tasks, slots, durable, metrics = sup.tasks, sup.slots, sup.durable, sup.metrics
    return {
        "name": sup.cfg.name, "tasks": sup.shard.by_status(),
        "queue_depth": sup.shard.queued(sup.capacity.waiting()),
        # processes replaced (counted once the old one is gone), and recycles of due
        # slots begun (counted when begun: a recycle runs in the background)
        "slots": slots.describe(), "replacements": slots.replacements, "recycles": slots.recycles,
        # actors stopped for having been idle idle_actor_ttl_s (counted when begun)
        "stopped_idle": slots.stopped_idle,
        # agents (places: busy of total) and actors (processes) separately
        **slots.counts(),
        "max_agents": sup.cfg.max_agents, "max_agents_per_task": sup.cfg.max_agents_per_task,
        # which agents of each running task work at this moment
        "running": {ts.id: sorted(ts.run.running) for ts in tasks.values() if ts.run.running},
        "busy": sum(len(ts.run.running) for ts in tasks.values()),
        "durability": None if durable is None else {
            "location": durable.location.location, "segment": durable.segment, **durable.stats},
        "resumed": sup.resumed, "health": sup.health.mode, "hook_failures": sup.hooks.failures,
        "reads": sup.shard.reads, "submit_calls": sup.submit_calls,
        # Ray messages that brought steps' events: start calls' replies (a step's first
        # batch; a short step whole) and messages on the actors' streams
        "step_messages": dict(sup.step_messages),
        "tokens_per_s": None if metrics is None else round(metrics.tokens_per_s, 1),
        "metrics_url": sup.metrics_url(),
        # with shards: this shard's calls to the pool's allocator, its grants and the time
        # its tasks waited for budget (None: one shard, no allocator)
        "allocator": None if sup.capacity.share is None else sup.capacity.share.describe(),
    }
