"""Reasoning levels: which level a task runs at, and why; what a step may cost.

``level: auto`` scores a task, deterministically, from its goal text and its workspace:

    score = goal words / words_per_point
          + keyword_points x (distinct ``keywords`` found in the goal, case-insensitive)
          + workspace files / files_per_point
          + workspace kilobytes / kb_per_point

and the level is 1 plus the number of ``thresholds`` the score reaches (defaults 2, 5, 9:
a one-line fix in a small project is level 1; a refactor of a concurrent module in a
large one is level 3 or 4). The workspace walk skips hidden directories and caches
(``.git``, ``__pycache__``, ``node_modules``, ...) and stops counting at 20,000 files.

``max_level`` then caps the level. With a cost budget the level is pushed down until
the task's estimate fits: a step is estimated at its level's ``max_tokens`` x
``price_per_1k_tokens`` / 1000, a task at that times its agents times its rounds
budget. Before every step the budget is checked again against what the task has
really spent; when not even a level-1 step fits, the task fails instead of
exceeding its budget.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from ..config import ReasoningConfig

SKIP_DIRS = frozenset({"__pycache__", "node_modules", ".git", ".hg", ".venv", "venv", ".tox",
                       ".mypy_cache", ".pytest_cache", ".ruff_cache", "build", "dist"})
MAX_FILES = 20_000
_WORD = re.compile(r"\w+")


@dataclass(frozen=True)
class WorkspaceSize:
    files: int = 0
    bytes: int = 0


def workspace_size(path: str | None) -> WorkspaceSize:
    """Files and bytes under ``path`` (hidden and cache directories skipped)."""
    if not path or not os.path.isdir(path):
        return WorkspaceSize()
    files = total = 0
    for root, dirs, names in os.walk(path):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.startswith(".")]
        for name in names:
            try:
                total += os.stat(os.path.join(root, name), follow_symlinks=False).st_size
            except OSError:
                continue
            files += 1
            if files >= MAX_FILES:
                return WorkspaceSize(files, total)
    return WorkspaceSize(files, total)


@dataclass(frozen=True)
class Choice:
    """A task's level and every reason that shaped it (shown in its ``level`` event)."""

    level: int
    requested: int | str
    max_rounds: int  # the rounds budget of ``level``
    reasons: tuple[str, ...] = ()
    score: float | None = None
    estimate: float | None = None  # the task's estimated cost at ``level``, when budgeted

    def event(self) -> dict:
        out: dict = {"level": self.level, "requested": self.requested, "reasons": list(self.reasons),
                     "max_rounds": self.max_rounds}
        if self.score is not None:
            out["score"] = round(self.score, 3)
        if self.estimate is not None:
            out["estimated_cost"] = round(self.estimate, 6)
        return out


def score(cfg: ReasoningConfig, goal: str, size: WorkspaceSize) -> tuple[float, str]:
    """The ``auto`` score of a task and a one-line account of it."""
    a = cfg.auto
    words = len(_WORD.findall(goal))
    low = goal.lower()
    hits = sorted({k for k in a.keywords if k.lower() in low})
    parts = {
        f"{words} goal words": words / a.words_per_point,
        f"keywords {', '.join(hits) or 'none'}": a.keyword_points * len(hits),
        f"{size.files} files": size.files / a.files_per_point,
        f"{size.bytes / 1024:.0f} KB": size.bytes / 1024 / a.kb_per_point,
    }
    total = sum(parts.values())
    return total, " + ".join(f"{k} ({v:.2f})" for k, v in parts.items()) + f" = {total:.2f}"


def level_for_score(cfg: ReasoningConfig, value: float) -> int:
    return 1 + sum(1 for t in cfg.auto.thresholds if value >= t)


def step_cost(cfg: ReasoningConfig, level: int) -> float:
    """The most one step at ``level`` is estimated to cost: its max_tokens at its price."""
    spec = cfg.spec(level)
    return spec.max_tokens * spec.price_per_1k_tokens / 1000.0


def rounds_at(cfg: ReasoningConfig, level: int, default_rounds: int) -> int:
    return cfg.spec(level).max_rounds or default_rounds


def choose(cfg: ReasoningConfig, requested: int | str | None, goal: str, size: WorkspaceSize | None,
           *, n_agents: int, max_rounds: int | None, default_rounds: int,
           budget: float | None) -> Choice:
    """The level a task starts at: fixed or scored, capped by max_level, fitted to the budget.

    ``max_rounds`` is the task's own rounds override (None: its level's budget).

    Examples:
        >>> from threadbound.runtime.config import ReasoningConfig
        >>> choose(ReasoningConfig(), "auto", "fix the typo", WorkspaceSize(2, 900),
        ...        n_agents=3, max_rounds=None, default_rounds=3, budget=None).level
        1
    """
    req = requested if requested is not None else cfg.level
    reasons: list[str] = []
    value = None
    if req == "auto":
        value, account = score(cfg, goal, size or WorkspaceSize())
        level = level_for_score(cfg, value)
        t = cfg.auto.thresholds
        reasons.append(f"auto: score {account}; thresholds {t[0]:g}/{t[1]:g}/{t[2]:g} give level {level}")
    else:
        level = int(req)
        reasons.append(f"fixed: level {level} {'requested by the task' if requested is not None else 'from config'}")
    if level > cfg.max_level:
        reasons.append(f"max_level {cfg.max_level} caps level {level}")
        level = cfg.max_level
    estimate = None
    if budget is not None:
        def task_cost(lv: int) -> float:
            return step_cost(cfg, lv) * n_agents * (max_rounds or rounds_at(cfg, lv, default_rounds))

        start = level
        while level > 1 and task_cost(level) > budget:
            level -= 1
        estimate = task_cost(level)
        if level < start:
            reasons.append(f"cost budget {budget:g}: level {start} is estimated at {task_cost(start):.4g}, "
                           f"level {level} at {estimate:.4g}")
        elif estimate > budget:
            reasons.append(f"cost budget {budget:g}: even level 1 is estimated at {estimate:.4g}; "
                           "the level is checked again before every step")
    return Choice(level=level, requested=req, max_rounds=rounds_at(cfg, level, default_rounds),
                  reasons=tuple(reasons), score=value, estimate=estimate)


def fit_step(cfg: ReasoningConfig, level: int, spent: float, budget: float) -> int | None:
    """The highest level <= ``level`` whose next step still fits the budget, or None."""
    for lv in range(level, 0, -1):
        if spent + step_cost(cfg, lv) <= budget:
            return lv
    return None

