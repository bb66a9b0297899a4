"""The Grafana dashboard of ``configs/grafana-dashboard.json``, built from the metric catalog.

    python -m threadbound.runtime.metrics.dashboard > configs/grafana-dashboard.json

Import it in Grafana (Dashboards > New > Import); pick the Prometheus data source and the
pools (``$pool``, from ``threadbound_health_mode``) at the top. Every query names metrics
through :func:`.alerts.series`, so a renamed metric fails here, not on an empty panel.
"""

from __future__ import annotations

import json
from typing import Any

from ..config import AlertsConfig
from .alerts import series

UID = "threadbound-pool"
POOL = 'pool=~"$pool"'
RATE = "$__rate_interval"
WIDTH, HEIGHT = 8, 8  # three panels a row on Grafana's 24 columns


def _target(expr: str, legend: str, ref: str) -> dict[str, Any]:
    return {"datasource": {"type": "prometheus", "uid": "${datasource}"}, "expr": expr,
            "legendFormat": legend, "refId": ref}


def _quantile(q: float, name: str, by: str) -> str:
    return (f"histogram_quantile({q}, sum by (le, {by}) "
            f"(rate({series(name, '_bucket')}{{{POOL}}}[{RATE}])))")


class _Layout:
    """Panels placed left to right, three a row, with a full-width row header per section."""

    def __init__(self) -> None:
        self.panels: list[dict[str, Any]] = []
        self.x = self.y = 0

    def row(self, title: str) -> None:
        if self.x:
            self.x, self.y = 0, self.y + HEIGHT
        self.panels.append({"type": "row", "title": title, "collapsed": False, "panels": [],
                            "id": len(self.panels) + 1, "gridPos": {"x": 0, "y": self.y, "w": 24, "h": 1}})
        self.y += 1

    def panel(self, title: str, description: str, targets: list[tuple[str, str]], *, unit: str = "short",
              kind: str = "timeseries", stack: bool = False, **extra: Any) -> None:
        defaults: dict[str, Any] = {"unit": unit, **extra.pop("defaults", {})}
        if stack:
            defaults["custom"] = {"stacking": {"mode": "normal"}, "fillOpacity": 30}
        self.panels.append({
            "type": kind, "title": title, "description": description, "id": len(self.panels) + 1,
            "datasource": {"type": "prometheus", "uid": "${datasource}"},
            "gridPos": {"x": self.x, "y": self.y, "w": WIDTH, "h": HEIGHT},
            "targets": [_target(expr, legend, chr(ord("A") + i)) for i, (expr, legend) in enumerate(targets)],
            "fieldConfig": {"defaults": defaults, "overrides": []},
            "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                        "tooltip": {"mode": "multi", "sort": "desc"}},
            **extra,
        })
        self.x += WIDTH
        if self.x >= 24:
            self.x, self.y = 0, self.y + HEIGHT


def _thresholds(*steps: tuple[float | None, str]) -> dict[str, Any]:
    return {"mode": "absolute", "steps": [{"value": v, "color": c} for v, c in steps]}


def dashboard() -> dict[str, Any]:
    """The dashboard as Grafana's JSON model (schemaVersion 39).

    Examples:
        >>> d = dashboard()
        >>> d["templating"]["list"][1]["query"]["query"]
        'label_values(threadbound_health_mode, pool)'
    """
    alerts = AlertsConfig()  # the default thresholds, drawn as red lines where they apply
    m = series
    lay = _Layout()

    lay.row("Steps")
    lay.panel("Step latency by role (p50, p95, p99)", "Step attempts from request to end, by role. "
              "ThreadboundStepLatencyHigh fires on the pool-wide p99.",
              [(_quantile(q, "threadbound_latency_seconds", "role"), f"{{{{role}}}} p{round(q * 100)}")
               for q in (0.5, 0.95, 0.99)], unit="s",
              defaults={"thresholds": _thresholds((None, "green"), (alerts.step_latency_p99_s, "red")),
                        "custom": {"thresholdsStyle": {"mode": "line"}}})
    lay.panel("Time to first token (p95)", "From a step's request to its first streamed token, by role.",
              [(_quantile(0.95, "threadbound_time_to_first_token_seconds", "role"), "{{role}}")], unit="s")
    lay.panel("Tokens per second", "Pool-wide, over metrics.tokens_window_s as the pool measures it, and "
              "as Prometheus' rate of the token counter.",
              [(f"sum by (pool) ({m('threadbound_tokens_per_second')}{{{POOL}}})", "{{pool}} (pool's window)"),
               (f"sum by (pool) (rate({m('threadbound_tokens_total')}{{{POOL}}}[{RATE}]))", "{{pool}} (rate)")])
    lay.panel("Steps by outcome", "Step attempts that ended per second: ok, or the failure's retry class. "
              "ThreadboundStepErrorsHigh fires on the share that is not ok.",
              [(f"sum by (outcome) (rate({m('threadbound_steps_total')}{{{POOL}}}[{RATE}]))", "{{outcome}}")],
              unit="ops", stack=True)
    lay.panel("Retries by class", "Step attempts retried per second, by the failure's retry class.",
              [(f"sum by (error_class) (rate({m('threadbound_retries_total')}{{{POOL}}}[{RATE}]))",
                "{{error_class}}")], unit="ops", stack=True)
    lay.panel("Reasoning level", "Unfinished admitted tasks by their current level, and the levels chosen "
              "for steps per second.",
              [(f"sum by (level) ({m('threadbound_reasoning_level')}{{{POOL}}})", "tasks at level {{level}}"),
               (f"sum by (level) (rate({m('threadbound_level_choices_total')}{{{POOL}}}[{RATE}]))",
                "chosen level {{level}} /s")])

    lay.row("Pool")
    lay.panel("Agents", "Agents running a step (active), bound to a task, and the most the pool may "
              "run (max_agents); the agent actors (processes) hosting them, agents_per_actor each at most.",
              [(f"sum by (pool) ({m('threadbound_thread_pool_active')}{{{POOL}}})", "{{pool}} active"),
               (f"sum by (pool) ({m('threadbound_thread_pool_bound')}{{{POOL}}})", "{{pool}} bound"),
               # max_agents, which every shard of a pool of several reports alike
               (f"max by (pool) ({m('threadbound_thread_pool_size')}{{{POOL}}})", "{{pool}} size"),
               (f"sum by (pool) ({m('threadbound_agent_actors')}{{{POOL}}})", "{{pool}} actors"),
               (f"sum by (pool) ({m('threadbound_agent_actors_size')}{{{POOL}}})", "{{pool}} actors max")])
    lay.panel("Utilisation", "Busy agents / max_agents. ThreadboundPoolSaturated fires above the red line.",
              [(f"sum by (pool) ({m('threadbound_thread_pool_active')}{{{POOL}}}) / "
                f"max by (pool) ({m('threadbound_thread_pool_size')}{{{POOL}}})", "{{pool}}")],
              unit="percentunit",
              defaults={"min": 0, "max": 1,
                        "thresholds": _thresholds((None, "green"), (alerts.utilisation, "red")),
                        "custom": {"thresholdsStyle": {"mode": "line"}}})
    lay.panel("Tasks by status", "Tasks the pool remembers, by status.",
              [(f"sum by (status) ({m('threadbound_tasks')}{{{POOL}}})", "{{status}}")], stack=True)
    lay.panel("Queue depth", "Tasks waiting for admission. ThreadboundQueueGrowing fires when it keeps "
              "growing.", [(f"sum by (pool) ({m('threadbound_queue_depth')}{{{POOL}}})", "{{pool}}")])
    lay.panel("Health mode", "0 normal, 1 degraded (level 1, no streaming), 2 paused (no new task admitted).",
              [(f"max by (pool) ({m('threadbound_health_mode')}{{{POOL}}})", "{{pool}}")],
              kind="state-timeline",
              defaults={"mappings": [{"type": "value", "options": {
                  "0": {"text": "normal", "color": "green", "index": 0},
                  "1": {"text": "degraded", "color": "orange", "index": 1},
                  "2": {"text": "paused", "color": "red", "index": 2}}}],
                  "thresholds": _thresholds((None, "green"), (1, "orange"), (2, "red"))})
    lay.panel("Health transitions", "Mode changes in each interval, by the mode entered.",
              [(f"sum by (mode) (increase({m('threadbound_health_transitions_total')}{{{POOL}}}[{RATE}]))",
                "into {{mode}}")],
              defaults={"custom": {"drawStyle": "bars", "fillOpacity": 80}})

    lay.row("Durability")
    lay.panel("Snapshots", "Snapshots written per second, and the pool's resumes from its snapshots in "
              "each interval.",
              [(f"sum by (pool) (rate({m('threadbound_snapshots_total')}{{{POOL}}}[{RATE}]))", "{{pool}} written /s"),
               (f"sum by (pool) (increase({m('threadbound_resumes_total')}{{{POOL}}}[{RATE}]))", "{{pool}} resumes")])
    lay.panel("Snapshot write time (p50, p99)", "Time to write one snapshot.",
              [(_quantile(q, "threadbound_snapshot_seconds", "pool"), f"{{{{pool}}}} p{round(q * 100)}")
               for q in (0.5, 0.99)], unit="s")
    lay.panel("Snapshot size", "Size of the last snapshot written.",
              [(f"max by (pool) ({m('threadbound_snapshot_bytes')}{{{POOL}}})", "{{pool}}")], unit="bytes")
    lay.panel("Snapshot age", "Seconds since the last snapshot, against snapshot_interval_s. A snapshot is "
              "written only after a change, so an idle pool's age grows; "
              "ThreadboundSnapshotsStalled fires only while steps end.",
              [(f"time() - max by (pool) ({m('threadbound_last_snapshot_timestamp_seconds')}{{{POOL}}} > 0)",
                "{{pool}} age"),
               (f"max by (pool) ({m('threadbound_snapshot_interval_seconds')}{{{POOL}}})", "{{pool}} interval")],
              unit="s")
    lay.panel("Journal fsync (p99)", "Time to append and sync one journal frame.",
              [(_quantile(0.99, "threadbound_journal_fsync_seconds", "pool"), "{{pool}} p99")], unit="s")

    lay.row("Sandbox")
    lay.panel("Sandbox runs by limit", "Sandboxed test runs per second, by the limit that ended one (none: "
              "it ended on its own).",
              [(f"sum by (limit) (rate({m('threadbound_sandbox_runs_total')}{{{POOL}}}[{RATE}]))", "{{limit}}")],
              unit="ops", stack=True)

    return {
        "uid": UID, "title": "threadbound", "tags": ["threadbound", "ray"], "timezone": "browser",
        "schemaVersion": 39, "version": 1, "editable": True, "graphTooltip": 1, "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": [
            {"type": "datasource", "name": "datasource", "label": "Prometheus", "query": "prometheus",
             "current": {}, "hide": 0, "refresh": 1},
            {"type": "query", "name": "pool", "label": "Pool",
             "datasource": {"type": "prometheus", "uid": "${datasource}"},
             "query": {"query": f"label_values({m('threadbound_health_mode')}, pool)", "refId": "pool"},
             "definition": f"label_values({m('threadbound_health_mode')}, pool)",
             "multi": True, "includeAll": True, "allValue": ".*", "current": {}, "refresh": 2, "sort": 1,
             "hide": 0},
        ]},
        "annotations": {"list": [
            {"name": "Health transitions", "enable": True, "iconColor": "orange",
             "datasource": {"type": "prometheus", "uid": "${datasource}"},
             "expr": f"changes(max by (pool) ({m('threadbound_health_mode')}{{{POOL}}})[2m:]) > 0",
             "titleFormat": "health mode changed", "textFormat": "pool {{pool}}", "step": "1m"},
        ]},
        "panels": lay.panels,
    }


def render() -> str:
    """:func:`dashboard` as the JSON file Grafana imports."""
    return json.dumps(dashboard(), indent=2) + "\n"


if __name__ == "__main__":  # pragma: no cover
    print(render(), end="")
