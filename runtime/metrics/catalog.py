"""Every metric the pool exports: one table, read by the Prometheus registry, the Ray
mirror, the alert rules and the Grafana dashboard, so a name is spelled once.

Names follow Prometheus' conventions: base units (seconds, bytes), ``_total`` on
counters, a ``pool`` label on every series (several pools may share one Prometheus).
"""

from __future__ import annotations

from typing import NamedTuple

COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"

# Step latency runs from milliseconds (a scripted step) to minutes (a real model call).
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
FIRST_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
WRITE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class Spec(NamedTuple):
    name: str
    kind: str
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()


METRICS: tuple[Spec, ...] = (
    Spec("threadbound_latency_seconds", HISTOGRAM,
         "Step attempt latency, from request to its end, by role, reasoning level and outcome "
         "(ok, or the failure's retry class: error, rate_limit, transient, timeout, crash)",
         ("role", "level", "outcome"), STEP_BUCKETS),
    Spec("threadbound_time_to_first_token_seconds", HISTOGRAM,
         "Time from a step's request to its first token, by role", ("role",), FIRST_TOKEN_BUCKETS),
    Spec("threadbound_tokens_total", COUNTER, "Model tokens streamed by agents"),
    Spec("threadbound_tokens_per_second", GAUGE, "Tokens per second, pool-wide, over the last metrics.tokens_window_s"),
    Spec("threadbound_thread_pool_active", GAUGE, "Agents running a step now"),
    Spec("threadbound_thread_pool_bound", GAUGE, "Agents bound to a task"),
    Spec("threadbound_thread_pool_size", GAUGE, "The most agents the pool may run at once (max_agents)"),
    Spec("threadbound_agent_actors", GAUGE, "Agent actors (processes) alive now; each hosts up to "
         "agents_per_actor agents"),
    Spec("threadbound_agent_actors_size", GAUGE, "The most agent actors the pool may have "
         "(ceil(max_agents / agents_per_actor))"),
    Spec("threadbound_reasoning_level", GAUGE, "Unfinished admitted tasks by their current reasoning level",
         ("level",)),
    Spec("threadbound_level_choices_total", COUNTER, "Reasoning levels chosen for steps", ("level",)),
    Spec("threadbound_tasks", GAUGE, "Tasks the pool remembers, by status", ("status",)),
    Spec("threadbound_queue_depth", GAUGE, "Tasks waiting in the admission queue"),
    Spec("threadbound_steps_total", COUNTER, "Step attempts that ended, by role and outcome", ("role", "outcome")),
    Spec("threadbound_retries_total", COUNTER, "Step attempts retried, by the failure's retry class",
         ("error_class",)),
    Spec("threadbound_health_mode", GAUGE, "Pool health mode: 0 normal, 1 degraded, 2 paused"),
    Spec("threadbound_health_transitions_total", COUNTER, "Health mode changes, by the mode entered", ("mode",)),
    Spec("threadbound_snapshots_total", COUNTER, "Snapshots written"),
    Spec("threadbound_snapshot_seconds", HISTOGRAM, "Time to write one snapshot", (), WRITE_BUCKETS),
    Spec("threadbound_snapshot_bytes", GAUGE, "Size of the last snapshot written"),
    Spec("threadbound_last_snapshot_timestamp_seconds", GAUGE, "Unix time of the last snapshot written "
         "(0: none yet)"),
    Spec("threadbound_snapshot_interval_seconds", GAUGE, "The configured snapshot_interval_s"),
    Spec("threadbound_journal_fsync_seconds", HISTOGRAM, "Time to append and sync one journal frame", (),
         WRITE_BUCKETS),
    Spec("threadbound_resumes_total", COUNTER, "Times this pool resumed from its snapshots"),
    Spec("threadbound_sandbox_runs_total", COUNTER, "Sandboxed test runs, by the limit that ended one "
         "(none: it ended on its own)", ("limit",)),
)

BY_NAME = {m.name: m for m in METRICS}
POOL_LABEL = "pool"
