"""The health monitor: signals over a sliding window, and the pool's mode.

Modes::

    normal    steps run at their task's level, streaming as configured
    degraded  steps run at level 1 without streaming (one final message per step)
    paused    as degraded, and no new task is admitted (submissions still queue)

``normal -> degraded`` as soon as any signal reaches its threshold. ``degraded ->
paused`` (when ``health.pause``) if the steps run since the pool degraded -- level 1,
no streaming -- fail badly enough to cross a threshold on their own. Recovery is one
mode at a time, and only after ``healthy_period_s`` in which no signal was over its
threshold: a pool that keeps failing now and then stays degraded instead of flapping.

Signals, counted over the last ``window_s``: ``error_rate`` (failed step attempts /
finished step attempts, once ``min_steps`` have finished), ``timeouts``,
``actor_deaths``, ``stream_failures`` (event batches that could not be fetched or
recorded), ``retry_exhausted`` (steps that used up their retries on a retryable
error), and ``memory_percent`` (memory in use, from psutil, sampled at most every
``check_interval_s``; it degrades the pool but does not pause it). On a cluster it is
the worst of the nodes that hold the pool's agents (:class:`NodesMemory`).

The monitor is a plain object with an injected clock (and memory probe), so its
hysteresis is unit-tested in milliseconds. :class:`Health` is what the supervisor
calls: the step path reports each attempt's end to it directly (it is not a hook), and
the supervisor acts on the transition it returns -- outside the step path's own code,
on the next turn of its loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from typing import Any, Awaitable, Callable, Iterable

import psutil

from threadbound.agents.events import DEGRADED, NORMAL, PAUSED
from threadbound.agents.events import HEALTH_MODES as MODES

from ..config import HealthConfig
from ..task import FAILED
from .hooks import Outcome, StepInfo, Transition
from .task_state import TaskEnds

# What the supervisor records, and which count signal each feeds.
STEP_OK, STEP_FAILED = "step_ok", "step_failed"
TIMEOUT, ACTOR_DEATH, STREAM_FAILURE, RETRY_EXHAUSTED = "timeout", "actor_death", "stream_failure", "retry_exhausted"
_COUNTS = {TIMEOUT: "timeouts", ACTOR_DEATH: "actor_deaths", STREAM_FAILURE: "stream_failures",
           RETRY_EXHAUSTED: "retry_exhausted"}
SIGNALS = ("error_rate", "timeouts", "actor_deaths", "stream_failures", "retry_exhausted", "memory_percent")


log = logging.getLogger("threadbound.health")


def node_memory_percent() -> float:
    return float(psutil.virtual_memory().percent)


class NodesMemory:
    """A memory probe over every node that holds the pool's agents: the worst one counts.

    This node's memory is read here, as on one machine; each other node in ``hosts()``
    is read there by ``read(node)`` (an awaitable; on Ray a small task on that node),
    in the background: a check uses the last value each node reported and never waits
    for one. A node that no longer holds agents is forgotten.

    Examples:
        >>> probe = NodesMemory(hosts=lambda: {"here"}, here=lambda: "here", read=None, local=lambda: 41.0)
        >>> probe()
        41.0
    """

    def __init__(self, hosts: Callable[[], Iterable[str]], here: Callable[[], str | None],
                 read: Callable[[str], Awaitable[float]] | None,
                 local: Callable[[], float] = node_memory_percent, timeout_s: float = 10.0) -> None:
        self.hosts, self.here, self.read, self.local = hosts, here, read, local
        self.timeout_s = timeout_s
        self.values: dict[str, float] = {}  # other node -> its last reading
        self._pending: asyncio.Task | None = None

    def __call__(self) -> float:
        value = self.local()
        others = set(self.hosts()) - {self.here()}
        for gone in set(self.values) - others:
            del self.values[gone]
        if others and self.read is not None and self._pending is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                loop = None
            if loop is not None:
                self._pending = loop.create_task(self._refresh(sorted(others)))
        return max([value, *self.values.values()])

    async def _refresh(self, nodes: list[str]) -> None:
        try:
            got = await asyncio.gather(*(asyncio.wait_for(self.read(n), self.timeout_s) for n in nodes),
                                       return_exceptions=True)
            for node, value in zip(nodes, got):
                if isinstance(value, (int, float)):
                    self.values[node] = float(value)
                else:  # a node going away: its agents are replaced elsewhere
                    log.debug("no memory reading from node %s: %r", node, value)
        finally:
            self._pending = None


class _Window:
    """Records of the last ``window_s`` with running counts: a check costs O(1), not O(records)."""

    def __init__(self) -> None:
        self.records: deque[tuple[float, str]] = deque()
        self.counts: Counter[str] = Counter()

    def add(self, at: float, kind: str) -> None:
        self.records.append((at, kind))
        self.counts[kind] += 1

    def prune(self, horizon: float) -> None:
        while self.records and self.records[0][0] < horizon:
            _, kind = self.records.popleft()
            self.counts[kind] -= 1

    def clear(self) -> None:
        self.records.clear()
        self.counts.clear()


class HealthMonitor:
    """Sliding-window signals and the mode they put the pool in.

    Examples:
        >>> from threadbound.runtime.config import HealthConfig
        >>> now = [0.0]
        >>> m = HealthMonitor(HealthConfig(timeouts=2, healthy_period_s=10), clock=lambda: now[0],
        ...                   memory=lambda: 10.0)
        >>> m.record(TIMEOUT); m.record(TIMEOUT)
        >>> m.evaluate().new, m.mode
        ('degraded', 'degraded')
        >>> now[0] = 59.0; m.evaluate()  # still in the 60 s window: still unhealthy
        >>> now[0] = 61.0; m.evaluate()  # aged out: healthy, but not for healthy_period_s yet
        >>> now[0] = 69.0; m.evaluate().new
        'normal'
    """

    def __init__(self, cfg: HealthConfig, *, clock: Callable[[], float] = time.monotonic,
                 memory: Callable[[], float] = node_memory_percent,
                 wall: Callable[[], float] | None = None) -> None:
        self.cfg = cfg
        self.clock = clock  # monotonic; a supervisor Clock gives its wall time too
        self.memory = memory
        self.wall = wall or getattr(clock, "time", time.time)
        self.mode = NORMAL
        self.since = clock()
        self.last_bad: float | None = None
        self.window = _Window()
        self.level1 = _Window()  # what degraded steps did since the pool last changed mode
        self.transitions: deque[Transition] = deque(maxlen=100)
        self._memory_at = float("-inf")
        self._memory_value = 0.0

    # -- input ----------------------------------------------------------------------

    def record(self, kind: str, degraded: bool = False) -> None:
        """Note one thing that happened; ``degraded`` if it happened to a degraded step."""
        if self.cfg.enabled:
            now = self.clock()
            self.window.add(now, kind)
            if degraded:
                self.level1.add(now, kind)

    # -- signals --------------------------------------------------------------------

    def _prune(self, now: float) -> None:
        self.window.prune(now - self.cfg.window_s)
        self.level1.prune(max(now - self.cfg.window_s, self.since))

    def _memory_percent(self, now: float) -> float:
        if now - self._memory_at >= self.cfg.check_interval_s:
            try:
                self._memory_value = self.memory()
            except Exception:  # a probe that fails must not take the pool down
                self._memory_value = 0.0
            self._memory_at = now
        return self._memory_value

    def _values(self, window: _Window, memory: float | None) -> dict[str, float]:
        c = window.counts
        failed = c[STEP_FAILED]
        done = c[STEP_OK] + failed
        values: dict[str, float] = {"error_rate": failed / done if done >= self.cfg.min_steps else 0.0}
        values.update({name: c[kind] for kind, name in _COUNTS.items()})
        if memory is not None:
            values["memory_percent"] = memory
        return values

    def thresholds(self) -> dict[str, float]:
        return {s: getattr(self.cfg, s) for s in SIGNALS}

    def _over(self, values: dict[str, float]) -> list[str]:
        limits = self.thresholds()
        out = []
        for name, value in values.items():
            if value >= limits[name]:
                shown = f"{value:.0%}" if name == "error_rate" else (
                    f"{value:.1f}%" if name == "memory_percent" else f"{value:g}")
                limit = f"{limits[name]:.0%}" if name == "error_rate" else f"{limits[name]:g}"
                out.append(f"{name} {shown} >= {limit}")
        return out

    # -- decisions ------------------------------------------------------------------

    def evaluate(self) -> Transition | None:
        """Update the mode from the signals now; the transition made, if any."""
        if not self.cfg.enabled:
            return None
        now = self.clock()
        self._prune(now)
        over = self._over(self._values(self.window, self._memory_percent(now)))
        if over:
            self.last_bad = now
        calm = self.last_bad is None or now - self.last_bad >= self.cfg.healthy_period_s
        if self.mode == NORMAL and over:
            return self._move(DEGRADED, over, now)
        if self.mode == DEGRADED:
            if self.cfg.pause:
                worse = self._over(self._values(self.level1, None))
                if worse:
                    return self._move(PAUSED, [f"level 1 fails too: {w}" for w in worse], now)
            if calm:
                return self._move(NORMAL, [f"healthy for {self.cfg.healthy_period_s:g}s"], now)
        if self.mode == PAUSED and calm:
            return self._move(DEGRADED, [f"healthy for {self.cfg.healthy_period_s:g}s; admitting at level 1"], now)
        return None

    def _move(self, new: str, reasons: list[str], now: float) -> Transition:
        t = Transition(self.wall(), self.mode, new, tuple(reasons))
        self.mode, self.since = new, now
        self.level1.clear()
        if new != NORMAL:
            self.last_bad = now  # the healthy period counts from here at the earliest
        self.transitions.append(t)
        return t

    def restore(self, mode: str) -> None:
        """Take up the mode a previous supervisor was in (resume); it must earn its way back."""
        if mode in MODES:
            self.mode, self.since = mode, self.clock()
            self.last_bad = self.since if mode != NORMAL else None

    def report(self) -> dict[str, Any]:
        """The mode, each signal with its threshold, and recent transitions (``pool.health()``)."""
        now = self.clock()
        self._prune(now)
        values = self._values(self.window, self._memory_percent(now))
        limits = self.thresholds()
        calm_in = None
        if self.mode != NORMAL and self.last_bad is not None:
            calm_in = max(0.0, self.cfg.healthy_period_s - (now - self.last_bad))
        return {
            "mode": self.mode, "enabled": self.cfg.enabled, "since_s": round(now - self.since, 3),
            "signals": {s: {"value": round(values.get(s, 0.0), 4), "threshold": limits[s],
                            "over": values.get(s, 0.0) >= limits[s]} for s in SIGNALS},
            "steps_in_window": self.window.counts[STEP_OK] + self.window.counts[STEP_FAILED],
            "window_s": self.cfg.window_s, "healthy_period_s": self.cfg.healthy_period_s,
            "recovers_in_s": None if calm_in is None else round(calm_in, 3),
            "transitions": [t.to_dict() for t in self.transitions],
        }


class Health:
    """The pool's health as the supervisor uses it: the monitor, fed by the step path and
    the timer, and what its mode means for a task's next step.

    :meth:`step_ended` and :meth:`tick` return the transition they caused (None: none);
    the supervisor tells its tasks and observers and acts on it.
    """

    def __init__(self, monitor: HealthMonitor, streaming: bool) -> None:
        self.monitor = monitor
        self.streaming = streaming  # the config's: what a normal pool does

    @property
    def mode(self) -> str:
        return self.monitor.mode

    def step_ended(self, step: StepInfo, outcome: Outcome) -> Transition | None:
        """Record how an attempt ended. A failure the task caused by its own input (no
        workspace, bad inputs: ``input``) is the submitter's, not the pool's: health does
        not count it, so bad tasks cannot degrade or pause the pool for everyone."""
        if outcome.kind == "input":
            return None
        m = self.monitor
        m.record(STEP_OK if outcome.ok else STEP_FAILED, step.degraded)
        if outcome.signal is not None:
            m.record(outcome.signal, step.degraded)
        if outcome.exhausted and outcome.retryable:
            m.record(RETRY_EXHAUSTED, step.degraded)
        return m.evaluate()

    def tick(self) -> Transition | None:
        return self.monitor.evaluate()

    def mode_for(self, task: Any) -> tuple[bool, bool]:
        """``(streaming, degraded)`` for the next attempt of a step of ``task``; a task that
        opted out of degradation (``degrade: false``) ends instead (:class:`TaskEnds`)."""
        if self.mode != NORMAL:
            if not task.spec.degrade:
                raise TaskEnds(FAILED, self.opted_out(task), reason="degraded")
            return False, True
        return self.streaming, False

    def degraded_now(self, task: Any) -> bool:
        return self.mode != NORMAL and task.spec.degrade

    def opted_out(self, task: Any) -> str:
        m = self.monitor
        why = "; ".join(m.transitions[-1].reasons) if m.transitions else m.mode
        return (f"task {task.id} opted out of degradation (degrade: false) and the pool is {m.mode} "
                f"({why}); resubmit it when pool.health() reports normal, or allow degrade")
