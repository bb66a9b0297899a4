"""Metrics the supervisor reports through ``ray.util.metrics``.

Ray's metrics agent exports them in Prometheus format and the Ray dashboard shows
them. They are created on first use inside the supervisor actor; outside a Ray
worker (unit tests of the plain class) every call is a no-op. A failing metric is
logged once and never takes the supervisor down.
"""

from __future__ import annotations

import logging
from typing import Any

from .health import MODES
from .hooks import Hook

log = logging.getLogger("threadbound.metrics")


class Metrics:
    """The supervisor's metrics, tagged with the pool's name."""

    def __init__(self, pool: str) -> None:
        self.pool = pool
        self._made: dict[str, Any] | None = None
        self._broken = False

    def _get(self) -> dict[str, Any] | None:
        if self._made is None and not self._broken:
            try:
                import ray
                from ray.util.metrics import Counter, Gauge

                if not ray.is_initialized():
                    self._broken = True
                    return None
                self._made = {
                    "mode": Gauge("threadbound_health_mode",
                                  "Pool health mode: 0 normal, 1 degraded, 2 paused", tag_keys=("pool",)),
                    "transitions": Counter("threadbound_health_transitions_total",
                                           "Health mode changes, by the mode entered", tag_keys=("pool", "mode")),
                }
            except Exception as exc:
                log.warning("metrics are off: %r", exc)
                self._broken = True
        return self._made

    def health_mode(self, mode: str, *, entered: bool = True) -> None:
        made = self._get()
        if made is None:
            return
        try:
            made["mode"].set(MODES.index(mode), tags={"pool": self.pool})
            if entered:
                made["transitions"].inc(1, tags={"pool": self.pool, "mode": mode})
        except Exception as exc:
            log.warning("metric update failed: %r", exc)


class MetricsHook(Hook):
    """Keeps the Ray metrics current: a transition sets the mode at once, and every
    tick sets it again, so the gauge never drops out of a scrape while the pool is up."""

    def __init__(self, metrics: Metrics, mode: Any) -> None:
        self.metrics = metrics
        self.mode = mode  # () -> the current health mode

    def on_transition(self, transition: Any) -> None:
        self.metrics.health_mode(transition.new)

    def on_tick(self, supervisor: Any) -> None:
        self.metrics.health_mode(self.mode(), entered=False)
