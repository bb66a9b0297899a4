"""The pool's metrics: a prometheus-client registry of its own, and a mirror in Ray.

:class:`PoolMetrics` holds every series of ``catalog.METRICS`` for one pool. Counters
and histograms are updated as things happen, through cheap pre-labelled children
(a step's end is a few increments, a token batch one); gauges are set by
:meth:`PoolMetrics.refresh` from a :class:`View` of the supervisor, on its timer, so
none of them vanishes from a scrape while the pool is up and none costs the step path.

The registry is per pool (not prometheus-client's global one): several pools, or a
restarted supervisor, in one process never collide. :class:`RayMirror` repeats the same
values through ``ray.util.metrics`` on each refresh (counter deltas, gauges, buffered
histogram samples), so they also show in the Ray dashboard; outside a Ray worker it
is off. A failing metric is logged once and never takes the supervisor down.
"""

from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from threadbound.agents.events import HEALTH_MODES as MODES  # threadbound_health_mode's value is the mode's index
from threadbound.agents.events import STATUSES

from .catalog import BY_NAME, COUNTER, GAUGE, HISTOGRAM, METRICS, POOL_LABEL

log = logging.getLogger("threadbound.metrics")


@dataclass
class View:
    """What the gauges show, read from the supervisor between two awaits of its loop."""

    active: int = 0
    bound: int = 0
    size: int = 0
    actors: int = 0  # agent processes alive
    actors_size: int = 0  # ceil(max_agents / agents_per_actor)
    queue_depth: int = 0
    tasks: dict[str, int] = field(default_factory=dict)  # status -> count
    levels: dict[int, int] = field(default_factory=dict)  # level -> unfinished admitted tasks
    mode: str = "normal"
    snapshot_interval_s: float = 0.0


class PoolMetrics:
    """Every series of one pool; see the module docstring."""

    def __init__(self, pool: str, *, tokens_window_s: float = 10.0, ray_mirror: bool = True,
                 ray_every_s: float = 5.0, clock: Any = time.monotonic) -> None:
        self.pool = pool
        self.clock = clock
        self.registry = CollectorRegistry(auto_describe=False)
        self._m: dict[str, Any] = {}
        for spec in METRICS:
            labels = (POOL_LABEL, *spec.labels)
            kw: dict[str, Any] = {"registry": self.registry, "labelnames": labels}
            if spec.kind == COUNTER:
                self._m[spec.name] = Counter(spec.name, spec.help, **kw)
            elif spec.kind == GAUGE:
                self._m[spec.name] = Gauge(spec.name, spec.help, **kw)
            else:
                self._m[spec.name] = Histogram(spec.name, spec.help, buckets=spec.buckets, **kw)
        self._children: dict[tuple, Any] = {}
        self.tokens = 0  # streamed so far (also the counter's value)
        self._window: collections.deque[tuple[float, int]] = collections.deque()
        self._window_s = tokens_window_s
        self.tokens_per_s = 0.0
        self.ray = RayMirror(pool) if ray_mirror else None
        self._ray_every_s = ray_every_s
        self._ray_pushed = float("-inf")
        # Gauges exist from the start: a pool that has done nothing yet still shows up.
        self.refresh(View())

    def child(self, name: str, *labels: Any) -> Any:
        key = (name, *labels)
        c = self._children.get(key)
        if c is None:
            c = self._children[key] = self._m[name].labels(self.pool, *map(str, labels))
        return c

    # -- as things happen --------------------------------------------------------

    def step(self, role: str, level: int, outcome: str, seconds: float, first_token_s: float | None,
             retried: bool) -> None:
        self.child("threadbound_latency_seconds", role, level, outcome).observe(seconds)
        self.child("threadbound_steps_total", role, outcome).inc()
        if first_token_s is not None:
            self.child("threadbound_time_to_first_token_seconds", role).observe(first_token_s)
        if retried:
            self.child("threadbound_retries_total", outcome).inc()
        if self.ray:
            self.ray.observe("threadbound_latency_seconds", seconds, role=role, level=level, outcome=outcome)
            if first_token_s is not None:
                self.ray.observe("threadbound_time_to_first_token_seconds", first_token_s, role=role)

    def add_tokens(self, n: int) -> None:
        self.tokens += n
        self.child("threadbound_tokens_total").inc(n)

    def level_chosen(self, level: int) -> None:
        self.child("threadbound_level_choices_total", level).inc()

    def transition(self, mode: str) -> None:
        self.child("threadbound_health_transitions_total", mode).inc()
        self.child("threadbound_health_mode").set(MODES.index(mode))

    def snapshot(self, cost: dict[str, Any]) -> None:
        seconds = float(cost.get("write_ms", 0.0)) / 1000.0
        self.child("threadbound_snapshots_total").inc()
        self.child("threadbound_snapshot_seconds").observe(seconds)
        self.child("threadbound_snapshot_bytes").set(float(cost.get("bytes", 0)))
        self.child("threadbound_last_snapshot_timestamp_seconds").set(float(cost.get("at") or time.time()))
        if self.ray:
            self.ray.observe("threadbound_snapshot_seconds", seconds)

    def journal_write(self, seconds: float) -> None:
        self.child("threadbound_journal_fsync_seconds").observe(seconds)
        if self.ray:
            self.ray.observe("threadbound_journal_fsync_seconds", seconds)

    def resumed(self) -> None:
        self.child("threadbound_resumes_total").inc()

    def sandbox_run(self, limit: str | None) -> None:
        self.child("threadbound_sandbox_runs_total", limit or "none").inc()

    # -- on the timer ------------------------------------------------------------

    def refresh(self, view: View) -> None:
        """Set every gauge from ``view``; recompute tokens/s; push the Ray mirror."""
        now = self.clock()
        self._window.append((now, self.tokens))
        while len(self._window) > 1 and now - self._window[0][0] > self._window_s:
            self._window.popleft()
        t0, n0 = self._window[0]
        self.tokens_per_s = (self.tokens - n0) / (now - t0) if now > t0 else 0.0
        self.child("threadbound_tokens_per_second").set(self.tokens_per_s)
        self.child("threadbound_thread_pool_active").set(view.active)
        self.child("threadbound_thread_pool_bound").set(view.bound)
        self.child("threadbound_thread_pool_size").set(view.size)
        self.child("threadbound_agent_actors").set(view.actors)
        self.child("threadbound_agent_actors_size").set(view.actors_size)
        self.child("threadbound_queue_depth").set(view.queue_depth)
        self.child("threadbound_health_mode").set(MODES.index(view.mode) if view.mode in MODES else 0)
        self.child("threadbound_snapshot_interval_seconds").set(view.snapshot_interval_s)
        for status in STATUSES:  # every status, zeros included: a rate over it never has gaps
            self.child("threadbound_tasks", status).set(view.tasks.get(status, 0))
        for level in (1, 2, 3, 4):
            self.child("threadbound_reasoning_level", level).set(view.levels.get(level, 0))
        if self.ray and now - self._ray_pushed >= self._ray_every_s:
            self._ray_pushed = now
            self.ray.push(self.registry)

    def text(self) -> str:
        """The Prometheus text exposition of this pool's metrics."""
        return generate_latest(self.registry).decode()


class RayMirror:
    """The same metrics through ``ray.util.metrics`` (shown by the Ray dashboard, whose
    exporter adds the ``ray_`` prefix and ``_total`` to counters)."""

    def __init__(self, pool: str) -> None:
        self.pool = pool
        self._made: dict[str, Any] | None = None
        self._broken = False
        self._sent: dict[tuple, float] = {}  # counter series -> value already sent
        self._pending: list[tuple[str, float, dict[str, str]]] = []  # histogram samples

    def _metrics(self) -> dict[str, Any] | None:
        if self._made is None and not self._broken:
            try:
                import ray
                from ray.util import metrics as rm

                if not ray.is_initialized():
                    self._broken = True
                    return None
                made: dict[str, Any] = {}
                for spec in METRICS:
                    tags = (POOL_LABEL, *spec.labels)
                    if spec.kind == COUNTER:
                        made[spec.name] = rm.Counter(spec.name.removesuffix("_total"), spec.help, tag_keys=tags)
                    elif spec.kind == GAUGE:
                        made[spec.name] = rm.Gauge(spec.name, spec.help, tag_keys=tags)
                    else:
                        made[spec.name] = rm.Histogram(spec.name, spec.help, boundaries=list(spec.buckets),
                                                       tag_keys=tags)
                self._made = made
            except Exception as exc:
                log.warning("the Ray mirror of the metrics is off: %r", exc)
                self._broken = True
        return self._made

    def observe(self, name: str, value: float, **labels: Any) -> None:
        if not self._broken and len(self._pending) < 100_000:
            self._pending.append((name, value, {k: str(v) for k, v in labels.items()}))

    def push(self, registry: CollectorRegistry) -> None:
        made = self._metrics()
        if made is None:
            self._pending.clear()
            return
        try:
            for family in registry.collect():
                spec = BY_NAME.get(family.name) or BY_NAME.get(family.name + "_total")
                if spec is None or spec.kind == HISTOGRAM:
                    continue
                for sample in family.samples:
                    if spec.kind == COUNTER and not sample.name.endswith("_total"):
                        continue  # the _created sample
                    tags = {k: v for k, v in sample.labels.items()}
                    if spec.kind == GAUGE:
                        made[spec.name].set(sample.value, tags=tags)
                        continue
                    key = (spec.name, *sorted(tags.items()))
                    delta = sample.value - self._sent.get(key, 0.0)
                    if delta > 0:
                        made[spec.name].inc(delta, tags=tags)
                        self._sent[key] = sample.value
            pending, self._pending = self._pending, []
            for name, value, labels in pending:
                made[name].observe(value, tags={POOL_LABEL: self.pool, **labels})
        except Exception as exc:
            if not self._broken:
                log.warning("the Ray mirror of the metrics failed and is off: %r", exc)
            self._broken = True
