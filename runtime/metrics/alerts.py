"""Prometheus alerting rules generated from the config's thresholds (``metrics.alerts``).

    threadbound alerts --config configs/runtime.yaml > alerts.yml

One group, ``threadbound``; every rule aggregates ``by (pool)``, so one file covers every
pool that Prometheus scrapes and each alert names its pool. Metric names come from
:mod:`.catalog`, so a renamed metric fails here rather than leaving a rule that never fires.
``tests/test_alerts.py`` proves each rule with ``promtool test rules``: it fires on a
synthetic series that should fire it and stays quiet on a healthy one.
"""

from __future__ import annotations

import math
from typing import Any

import yaml

from ..errors import ConfigError
from .catalog import BY_NAME, COUNTER, HISTOGRAM, STEP_BUCKETS

GROUP = "threadbound"
# The window of rate(), deriv() and histogram_quantile() (the thresholds say "over 5 minutes").
RATE_WINDOW_S = 300.0
# A range vector needs two scrapes in it to give anything: 1m is four of Prometheus'
# default 15 s scrape interval. The snapshot window is never shorter.
MIN_RANGE_S = 60.0
# How long a pool that vanished is remembered (and ThreadboundDown fires for it).
DOWN_LOOKBACK_S = 3600.0


def series(name: str, suffix: str = "") -> str:
    """A series name of the catalog: ``name`` itself, or a histogram's ``_bucket``/``_sum``/
    ``_count``. An unknown name is a KeyError, so a rule cannot name a metric nobody exports."""
    spec = BY_NAME[name]
    if suffix and (spec.kind != HISTOGRAM or suffix not in ("_bucket", "_sum", "_count")):
        raise KeyError(f"{name} is a {spec.kind}; it has no {suffix} series")
    if spec.kind == COUNTER and not name.endswith("_total"):
        raise KeyError(f"counter {name} does not end in _total")
    return name + suffix


def duration(seconds: float) -> str:
    """Seconds as a Prometheus duration: ``duration(300) == '5m'``, ``duration(90.5) == '1m30s500ms'``."""
    ms = round(seconds * 1000)
    if ms <= 0:
        return "0s"
    out = []
    for unit, size in (("h", 3_600_000), ("m", 60_000), ("s", 1000), ("ms", 1)):
        n, ms = divmod(ms, size)
        if n:
            out.append(f"{n}{unit}")
    return "".join(out)


def number(x: float) -> str:
    """A threshold as PromQL reads it, without float noise: ``60``, ``0.05``."""
    x = float(x)
    return str(int(x)) if x.is_integer() else repr(x)


def _rule(name: str, expr: str, for_s: float, severity: str, summary: str, description: str) -> dict[str, Any]:
    rule: dict[str, Any] = {"alert": name, "expr": expr}
    if for_s > 0:
        rule["for"] = duration(for_s)
    rule["labels"] = {"severity": severity}
    rule["annotations"] = {"summary": summary, "description": description}
    return rule


def snapshot_window_s(config: Any) -> float:
    """The window ThreadboundSnapshotsStalled looks at: ``snapshot_intervals`` ×
    ``snapshot_interval_s``, at least :data:`MIN_RANGE_S`."""
    return max(config.metrics.alerts.snapshot_intervals * config.snapshot_interval_s, MIN_RANGE_S)


def alert_rules(config: Any, *, source: str = "<config>") -> dict[str, Any]:
    """The Prometheus rules document (``groups: [...]``) for ``config``'s thresholds.

    Raises :class:`ConfigError` (naming ``source``, the config's file) for a threshold no
    series can ever cross.

    Examples:
        >>> from threadbound.runtime.config import RuntimeConfig
        >>> doc = alert_rules(RuntimeConfig())
        >>> [r["alert"] for r in doc["groups"][0]["rules"]][:2]
        ['ThreadboundStepLatencyHigh', 'ThreadboundStepErrorsHigh']
    """
    a = config.metrics.alerts
    if a.step_latency_p99_s >= STEP_BUCKETS[-1]:
        # histogram_quantile() never reports more than the largest finite bucket.
        raise ConfigError(source, [(
            "metrics.alerts.step_latency_p99_s", f"{number(a.step_latency_p99_s)}s can never be exceeded: the latency "
            f"histogram's largest bucket is {number(STEP_BUCKETS[-1])}s; use a smaller threshold")])
    window = duration(RATE_WINDOW_S)
    on_pool = "{{ $labels.pool }}"
    health = f"`threadbound health --address auto --name {on_pool}`"

    latency = series("threadbound_latency_seconds", "_bucket")
    steps = series("threadbound_steps_total")
    active, size = series("threadbound_thread_pool_active"), series("threadbound_thread_pool_size")
    mode = series("threadbound_health_mode")
    queue = series("threadbound_queue_depth")

    rules = [
        _rule("ThreadboundStepLatencyHigh",
              f"histogram_quantile(0.99, sum by (pool, le) (rate({latency}[{window}]))) "
              f"> {number(a.step_latency_p99_s)}",
              a.for_s, "warning",
              f"Pool {on_pool}: p99 step latency is {{{{ $value | humanizeDuration }}}}, over "
              f"{duration(a.step_latency_p99_s)}",
              f"The slowest 1% of step attempts over the last {window} took longer than "
              f"{number(a.step_latency_p99_s)}s (metrics.alerts.step_latency_p99_s). On the dashboard, compare "
              "step latency by role with time to first token: both slow points at the model backend or an "
              "overloaded node, one role alone at that role's tools or tests. Fix the backend, lower the "
              "reasoning level, or raise the threshold if such steps are expected."),
        _rule("ThreadboundStepErrorsHigh",
              f'sum by (pool) (rate({steps}{{outcome!~"ok|interrupt"}}[{window}])) / sum by (pool) (rate({steps}[{window}])) '
              f"> {number(a.error_rate)}",
              a.for_s, "critical",
              f"Pool {on_pool}: {{{{ $value | humanizePercentage }}}} of step attempts failed over {window}",
              f"More than {number(a.error_rate * 100)}% of step attempts ended in a failure "
              "(metrics.alerts.error_rate). The dashboard's steps by outcome and retries by class say which: "
              "rate_limit or transient point at the model backend, timeout at step_timeout_s or a slow model, "
              "crash at agent actors dying (`ray list actors`, the pool's log). "
              f"{health} shows whether the pool degraded."),
        _rule("ThreadboundPoolSaturated",
              # busy agents summed over a pool's shards (one series each), over its max_agents
              f"sum by (pool) ({active}) / max by (pool) ({size}) > {number(a.utilisation)}",
              a.for_s, "warning",
              f"Pool {on_pool}: {{{{ $value | humanizePercentage }}}} of its agents are busy",
              f"Busy agent actors / max_agents has been above {number(a.utilisation * 100)}% "
              "(metrics.alerts.utilisation) for a while: new steps wait for an agent and tasks queue. Watch "
              "queue depth and agents on the dashboard; raise max_agents (with the CPUs for it) or lower "
              "max_agents_per_task."),
        _rule("ThreadboundDegraded",
              f"max by (pool) ({mode}) >= 1",
              a.degraded_for, "warning",
              f"Pool {on_pool} has been degraded or paused for more than {duration(a.degraded_for)}",
              "The health monitor took the pool out of normal mode (metrics.alerts.degraded_for): steps run "
              f"at reasoning level 1 without streaming. {health} shows the signals over their thresholds and "
              "the transitions; fix their cause (model backend errors, timeouts, dying actors, node memory). "
              "The pool recovers by itself after health.healthy_period_s without trouble."),
        _rule("ThreadboundPaused",
              f"max by (pool) ({mode}) == 2",
              a.paused_for, "critical",
              f"Pool {on_pool} has been paused for more than {duration(a.paused_for)}: it admits no new task",
              "Even the degraded pool's level-1 steps kept failing, so it stopped admitting tasks "
              "(submissions queue) (metrics.alerts.paused_for). "
              f"{health} names the failing signals; the steps by outcome and retries by class panels show the "
              "failures. Fix the model backend or the failing agents; the pool resumes admitting after "
              "health.healthy_period_s without trouble."),
    ]
    if config.snapshots.enabled:
        snap_window = duration(snapshot_window_s(config))
        written = series("threadbound_snapshots_total")
        # Snapshots are written only after a change, so an idle pool writes none and the age
        # of the last one (threadbound_last_snapshot_timestamp_seconds, on the dashboard) says
        # nothing alone; nor does a series a pool creates with its first snapshot. The rule
        # asks instead for steps that ended in the window (each is a change) and no snapshot.
        rules.append(_rule(
            "ThreadboundSnapshotsStalled",
            f"sum by (pool) (increase({steps}[{snap_window}])) > 0"
            f" unless on (pool) sum by (pool) (increase({written}[{snap_window}])) > 0",
            a.for_s, "critical",
            f"Pool {on_pool}: {{{{ $value | humanize }}}} step attempts ended in the last {snap_window} "
            "and no snapshot was written",
            f"A snapshot is due within snapshot_interval_s ({number(config.snapshot_interval_s)}s) of a "
            f"change, yet none was written in the last {snap_window} ({a.snapshot_intervals} intervals, "
            f"metrics.alerts.snapshot_intervals; at least {duration(MIN_RANGE_S)}) while step attempts ended. "
            "A crash now resumes from an older "
            "snapshot and a longer journal. Look for 'snapshot to ... failed' in the pool's log, the free "
            "space and permissions of snapshot_dir (or the fsspec store's credentials), and the snapshot "
            "seconds panel."))
    rules += [
        _rule("ThreadboundQueueGrowing",
              f"max by (pool) (deriv({queue}[{window}])) > 0 and on (pool) max by (pool) ({queue}) > 0",
              a.queue_growing_for, "warning",
              f"Pool {on_pool}: the admission queue has kept growing for {duration(a.queue_growing_for)}",
              "Tasks arrive faster than the pool finishes them (metrics.alerts.queue_growing_for). A paused "
              "pool admits nothing (see ThreadboundPaused); otherwise the agents are busy (utilisation panel) "
              "or steps are slow (latency panel). Raise max_agents, lower max_agents_per_task, or slow the "
              "submitters."),
        # A pool's health mode is always exported; seen in the last hour but not now, the
        # pool stopped, or Prometheus lost it (a failed scrape marks its series stale).
        _rule("ThreadboundDown",
              f"group by (pool) (max_over_time({mode}[{duration(DOWN_LOOKBACK_S)}])) "
              f"unless on (pool) group by (pool) ({mode})",
              a.for_s, "critical",
              f"Pool {on_pool}: its metrics have vanished",
              f"{mode}, which a running pool always exports, was scraped in the last "
              f"{duration(DOWN_LOOKBACK_S)} but not now: the pool stopped, its supervisor died, or "
              "Prometheus cannot reach its /metrics (see `up` on Prometheus' targets page). "
              f"{health} says whether it runs; `threadbound metrics` prints the endpoint's URL. "
              f"A pool shut down on purpose stops this alert {duration(DOWN_LOOKBACK_S)} later; silence it "
              "meanwhile."),
    ]
    return {"groups": [{"name": GROUP, "rules": rules}]}


HEADER = """\
# Prometheus alerting rules for threadbound pools, generated by `threadbound alerts`
# from a runtime config's metrics.alerts thresholds. Regenerate rather than edit:
#   threadbound alerts --config configs/runtime.yaml > alerts.yml
# Load with rule_files: [alerts.yml] in prometheus.yml; check with `promtool check rules`.
"""


def render(config: Any, *, source: str = "<config>") -> str:
    """:func:`alert_rules` as the YAML file Prometheus loads (``rule_files``)."""
    doc = alert_rules(config, source=source)
    return HEADER + yaml.safe_dump(doc, sort_keys=False, width=math.inf, allow_unicode=True)
