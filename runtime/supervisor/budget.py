"""Cost and budget, next to the levels: what a step's tokens cost, what is left of a
task's budget, and the level a step may run at without going over it."""

from __future__ import annotations

import asyncio
from typing import Any, Callable

from threadbound.agents.events import LEVEL

from ..config import RuntimeConfig
from .levels import choose, fit_step, step_cost, workspace_size
from ..task import FAILED
from .task_state import TaskEnds, TaskRecord

Emit = Callable[..., None]


class Budget:
    """The reasoning config's prices and levels applied to one task at a time."""

    def __init__(self, cfg: RuntimeConfig) -> None:
        self.cfg = cfg

    def of(self, ts: TaskRecord) -> float | None:
        """The task's cost budget (its own, else the config's), or None."""
        return ts.spec.cost_budget if ts.spec.cost_budget is not None else self.cfg.reasoning.cost_budget

    def tokens_left(self, ts: TaskRecord, level: int) -> int | None:
        """What is left of the task's budget, in tokens at ``level``: a hard cap for the step."""
        budget, price = self.of(ts), self.cfg.reasoning.spec(level).price_per_1k_tokens
        if budget is None or price <= 0:
            return None
        return max(0, int((budget - ts.spent) * 1000.0 / price + 1e-9))

    def cost(self, tokens: int | None, level: int) -> dict[str, Any]:
        """What a step's model tokens cost at its level (the fields of its end event)."""
        tokens = int(tokens or 0)
        price = self.cfg.reasoning.spec(level).price_per_1k_tokens
        return {"level": level, "tokens": tokens, "cost": round(tokens * price / 1000.0, 9)}

    def fit(self, ts: TaskRecord, role: str, emit: Emit) -> int:
        """The level the next step of ``role`` runs at: the task's, pushed down to fit
        what is left of its budget (a ``level`` event says so); :class:`TaskEnds` if not
        even a level-1 step fits."""
        budget, level = self.of(ts), ts.level or 1
        if budget is None:
            return level
        fits = fit_step(self.cfg.reasoning, level, ts.spent, budget)
        if fits is None:
            raise TaskEnds(FAILED, (
                f"task {ts.id} would exceed its cost budget of {budget:g}: it has spent {ts.spent:.4g} and "
                f"a level-1 step of {role!r} is estimated at {step_cost(self.cfg.reasoning, 1):.4g}; "
                "raise cost_budget or lower reasoning.levels.1.max_tokens"), reason="budget")
        if fits < level:
            emit(ts, LEVEL, None, level=fits, requested=level, reasons=[
                f"cost budget {budget:g}: spent {ts.spent:.4g}; a level-{level} step is estimated at "
                f"{step_cost(self.cfg.reasoning, level):.4g}, a level-{fits} step at "
                f"{step_cost(self.cfg.reasoning, fits):.4g}"])
        return min(level, fits)

    async def choose_level(self, ts: TaskRecord, emit: Emit) -> None:
        """Pick the task's level (fixed or scored, capped, fitted to its budget): a ``level`` event."""
        spec, rcfg = ts.spec, self.cfg.reasoning
        requested = spec.level if spec.level is not None else rcfg.level
        size = None
        if requested == "auto":  # a big workspace takes a while to walk: not on the loop
            size = await asyncio.to_thread(workspace_size, spec.workspace)
        choice = choose(rcfg, spec.level, spec.goal, size, n_agents=len(spec.agents),
                        max_rounds=spec.max_rounds, default_rounds=self.cfg.max_rounds, budget=self.of(ts))
        emit(ts, LEVEL, None, **choice.event())
