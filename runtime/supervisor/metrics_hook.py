"""How the metrics attach to the supervisor: one hook, no special case in the core."""

from __future__ import annotations

from typing import Any, Callable

from threadbound.agents import events as ev

from .hooks import Hook, Outcome, StepInfo
from ..metrics.recorder import PoolMetrics, View


class MetricsHook(Hook):
    """Feeds :class:`PoolMetrics` from the hooks; ``view()`` reads the supervisor's
    state for the gauges, every tick."""

    def __init__(self, metrics: PoolMetrics, view: Callable[[], View], clock: Callable[[], float]) -> None:
        self.metrics = metrics
        self.view = view
        self.clock = clock

    def on_event(self, task: Any, row: tuple) -> None:
        kind = row[1]
        if kind == ev.TOKENS:
            self.metrics.add_tokens(row[3].get("n", 1))
        elif kind == ev.LEVEL:
            self.metrics.level_chosen(row[3].get("level"))
        elif kind == ev.SANDBOX and isinstance(row[3], dict):
            self.metrics.sandbox_run(row[3].get("killed"))

    def after_step(self, task: Any, step: StepInfo, outcome: Outcome) -> None:
        end = self.clock()
        first = None if step.first_token is None else step.first_token - step.started
        self.metrics.step(step.role, step.level, outcome.kind, max(0.0, end - step.started), first,
                          retried=not outcome.ok and not outcome.exhausted)

    def on_transition(self, transition: Any) -> None:
        self.metrics.transition(transition.new)

    def on_snapshot(self, cost: dict[str, Any]) -> None:
        self.metrics.snapshot(cost)

    def on_tick(self, supervisor: Any) -> None:
        self.metrics.refresh(self.view())
