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

    def on_events(self, batch: list[tuple[Any, ev.Row]]) -> None:
        tokens = 0
        for _, row in batch:
            kind, data = row.kind, row.data
            if kind == ev.TOKENS:
                tokens += data.get("n", 1)
            elif kind == ev.LEVEL:
                self.metrics.level_chosen(data.get("level"))
            elif kind == ev.SANDBOX and isinstance(data, dict):
                self.metrics.sandbox_run(data.get("killed"))
        if tokens:  # one counter update per batch
            self.metrics.add_tokens(tokens)

    def after_step(self, task: Any, step: StepInfo, outcome: Outcome) -> None:
        end = self.clock()
        first = None if step.first_token is None else step.first_token - step.started
        self.metrics.step(step.role, step.level, outcome.kind, max(0.0, end - step.started), first,
                          retried=not outcome.ok and not outcome.exhausted)

    def on_transition(self, transition: Any) -> None:
        self.metrics.transition(transition.new)

    def on_snapshot(self, cost: dict[str, Any]) -> None:
        self.metrics.snapshot(cost)

    def on_tick(self) -> None:
        self.metrics.refresh(self.view())
