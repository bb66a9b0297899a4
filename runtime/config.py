"""Runtime configuration: explicit, validated, frozen.

Build one with ``RuntimeConfig(...)`` in Python, or ``RuntimeConfig.from_yaml(path)``
from a file (see ``configs/runtime.yaml`` for every knob, documented). Durations
accept numbers or strings such as ``30s``, ``5m``, ``250ms``; they are converted
once, here. Unknown keys are errors with a "did you mean" hint; a bad file raises
one :class:`ConfigError` that names the file and every bad field.

State that is not the user's project (snapshots, the snapshot signing key) goes to a
per-user state directory unless the config says otherwise: ``$XDG_STATE_HOME/threadbound``,
by default ``~/.local/state/threadbound`` (see :func:`state_dir`). It is resolved when a
config is built, never at import.

The sections (``retry``, ``snapshots``, ``reasoning``, ``health``, ``sandbox``, ``policy``,
``metrics``, ``log``, ...) and the duration and path helpers live in ``config_sections.py``;
this module holds :class:`RuntimeConfig`, its loading and environment overrides, and the
error report, and exports every public name of both.

Environment overrides (applied by ``from_yaml`` and ``from_env``, never at import):

    THREADBOUND_MAX_AGENTS, THREADBOUND_MAX_AGENTS_PER_TASK, THREADBOUND_AGENTS_PER_ACTOR,
    THREADBOUND_SHARDS, THREADBOUND_STEP_TIMEOUT_S,
    THREADBOUND_TASK_TIMEOUT_S, THREADBOUND_SNAPSHOT_DIR, THREADBOUND_SNAPSHOT_INTERVAL_S,
    THREADBOUND_SNAPSHOT_KEY_FILE,
    THREADBOUND_STREAMING, THREADBOUND_RAY_ADDRESS, THREADBOUND_RAY_NAMESPACE,
    THREADBOUND_MODEL_BACKEND, THREADBOUND_LEVEL, THREADBOUND_SANDBOX_ISOLATION,
    THREADBOUND_METRICS_PORT
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Annotated, Any, Mapping, get_args

import yaml
from pydantic import BaseModel, BeforeValidator, Field, ValidationError, ValidationInfo, field_validator, model_validator

from threadbound.agents.models import ModelConfig, SimulatedModelConfig

from .config_sections import (
    LEGACY_KEY_FILE, SANDBOX_CEILINGS, AlertsConfig, AutoLevelConfig, ErrorClass, HealthConfig, Level,
    LevelConfig, LogConfig, MetricsConfig, Millis, PolicyConfig, RayConfig, ReasoningConfig, RetryClassConfig,
    RetryConfig, SandboxConfig, Seconds, SnapshotConfig, WorkspaceConfig, _Section, default_key_file, state_dir,
    to_seconds,
)
from .errors import ConfigError

__all__ = [
    # The configuration and its loading
    "RuntimeConfig", "ENV_OVERRIDES", "BUILTIN_TRIO",
    # Its sections (defined in config_sections.py)
    "RetryConfig", "RetryClassConfig", "ErrorClass", "SnapshotConfig", "RayConfig", "ReasoningConfig",
    "LevelConfig", "AutoLevelConfig", "Level", "HealthConfig", "SandboxConfig", "SANDBOX_CEILINGS",
    "PolicyConfig", "WorkspaceConfig", "MetricsConfig", "AlertsConfig", "LogConfig",
    # Durations and paths
    "Seconds", "Millis", "to_seconds", "state_dir", "default_key_file", "LEGACY_KEY_FILE",
]


def _snapshot_dir(value: Any) -> Any:
    return os.path.join(state_dir(), "snapshots") if value is None else value


def _not_bool(expected: str) -> Any:
    """A validator refusing a boolean where ``expected`` (a count, a duration) is due:
    pydantic would take true as 1."""
    def check(value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError(f"must be {expected}, not a boolean (got {value!r})")
        return value

    return check


BUILTIN_TRIO = ("coder", "tester", "reviewer")


class RuntimeConfig(_Section):
    """Everything the pool needs; see ``configs/runtime.yaml`` for each field's meaning.

    Examples:
        >>> cfg = RuntimeConfig(max_agents=4, step_timeout_s="2m")
        >>> cfg.step_timeout_s
        120.0
    """

    name: str = Field(default="threadbound", min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    max_agents: int = Field(default=10, ge=1)
    max_agents_per_task: int = Field(default=3, ge=1)
    recycle_after: int = Field(default=100, ge=1)
    # Agents one slot actor (one process) hosts at once, each on a thread of its own
    # (docs/many-agents.md); 1 = a process per agent.
    agents_per_actor: Annotated[int, BeforeValidator(_not_bool("a whole number of agents"))] = Field(default=1, ge=1)
    # Supervisor shards: the pool's tasks split by id over this many supervisor actors,
    # each with its own journal, snapshots and lease, under global caps (docs/clusters.md).
    shards: Annotated[int, BeforeValidator(_not_bool("a whole number"))] = Field(default=1, ge=1, le=64)
    prewarm: bool = False
    # An agent actor none of whose agents has had a task for this long is stopped (its
    # process and memory given back); it starts again when a task needs it. null: actors
    # stay warm for the pool's life.
    idle_actor_ttl_s: Annotated[Seconds | None,
                                BeforeValidator(_not_bool("a duration such as 90s or 10m, or null"))] = None
    step_timeout_s: Seconds = 30.0
    task_timeout_s: Seconds = 600.0  # time a task runs; time it waits for a person does not count
    wait_timeout_s: Seconds = 86400.0  # how long a task may wait for a person's input (then: timed_out)
    max_rounds: int = Field(default=3, ge=1)
    default_agents: tuple[str, ...] = ("coder", "tester", "reviewer")
    # A task with default_agents and no `after` of its own gets this graph; null: for the
    # built-in trio, coder then tester and reviewer together, else list order.
    default_after: dict[str, list[str]] | None = None
    retry: RetryConfig = RetryConfig()
    snapshot_interval_s: Seconds = 5.0
    # null: <state_dir>/snapshots (per user, XDG style), resolved when the config is built
    snapshot_dir: Annotated[str, BeforeValidator(_snapshot_dir)] = Field(default=None, min_length=1,
                                                                         validate_default=True)
    snapshots: SnapshotConfig = Field(default_factory=SnapshotConfig)  # its key_file is resolved per config
    streaming: bool = True
    token_batch_size: int = Field(default=32, ge=1)
    token_interval_ms: Millis = 50.0
    keep_finished_tasks: int = Field(default=1000, ge=1)
    shutdown_grace_s: Seconds = 5.0
    agents: dict[str, str] = Field(default_factory=dict)
    model: ModelConfig = SimulatedModelConfig()
    reasoning: ReasoningConfig = ReasoningConfig()
    health: HealthConfig = HealthConfig()
    sandbox: SandboxConfig = SandboxConfig()
    policy: PolicyConfig = PolicyConfig()
    workspace: WorkspaceConfig = WorkspaceConfig()
    metrics: MetricsConfig = MetricsConfig()
    log: LogConfig = LogConfig()
    ray: RayConfig = RayConfig()

    @field_validator("agents_per_actor")
    @classmethod
    def _per_actor_fits(cls, value: int, info: ValidationInfo) -> int:
        most = info.data.get("max_agents")
        if most is not None and value > most:
            raise ValueError(f"cannot exceed max_agents ({most}): an actor hosts at most max_agents agents; "
                             f"lower agents_per_actor or raise max_agents")
        return value

    def task_graph_defaults(self) -> tuple[tuple[str, ...], dict[str, list[str]] | None]:
        """``(default_agents, default_after)`` as a task without its own fills them in."""
        if self.default_after is not None:
            return self.default_agents, self.default_after
        if tuple(self.default_agents) == BUILTIN_TRIO:
            return self.default_agents, {"tester": ["coder"], "reviewer": ["coder"]}
        return self.default_agents, None

    def validate_task(self, task: Any) -> Any:
        """``task`` checked field by field, with this config's defaults filled in."""
        return task.validated(*self.task_graph_defaults())

    @model_validator(mode="after")
    def _caps_fit(self) -> "RuntimeConfig":
        if self.max_agents_per_task > self.max_agents:
            raise ValueError(
                f"max_agents_per_task ({self.max_agents_per_task}) cannot exceed "
                f"max_agents ({self.max_agents}); lower it or raise max_agents"
            )
        if isinstance(self.reasoning.level, int) and self.reasoning.level > self.reasoning.max_level:
            raise ValueError(f"reasoning.level ({self.reasoning.level}) cannot exceed reasoning.max_level "
                             f"({self.reasoning.max_level}); lower it, raise max_level, or use level: auto")
        return self

    # -- constructors ---------------------------------------------------------------

    @classmethod
    def from_mapping(cls, data: Any, *, source: str = "<config>") -> "RuntimeConfig":
        """Validate a mapping (e.g. parsed YAML); errors name ``source`` and each field."""
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError(
                source,
                [("", f"the file must be a mapping of settings (key: value), got {type(data).__name__}")],
            )
        try:
            return cls.model_validate(dict(data))
        except ValidationError as exc:
            raise ConfigError(source, _problems(exc)) from None

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, *, env: Mapping[str, str] | None = None) -> "RuntimeConfig":
        """Load a YAML file, then apply ``THREADBOUND_*`` overrides from ``env``.

        ``env`` defaults to ``os.environ``; pass ``{}`` to ignore the environment.
        """
        p = Path(path)
        try:
            text = p.read_text()
        except FileNotFoundError:
            raise ConfigError(str(p), [("", "file not found; pass an existing YAML file")]) from None
        except OSError as exc:
            raise ConfigError(str(p), [("", f"cannot read file: {exc.strerror}")]) from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
            raise ConfigError(str(p), [("", f"not valid YAML: {where}{getattr(exc, 'problem', exc)}")]) from None
        cfg = cls.from_mapping(data, source=str(p))
        return cfg.with_env(os.environ if env is None else env)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "RuntimeConfig":
        """The defaults with ``THREADBOUND_*`` overrides applied."""
        return cls().with_env(os.environ if env is None else env)

    def with_env(self, env: Mapping[str, str]) -> "RuntimeConfig":
        """A copy with the overrides found in ``env`` applied (see module docstring)."""
        data = self.model_dump(mode="python")
        used = []
        for var, path in ENV_OVERRIDES.items():
            if var in env and env[var] != "":
                node = data
                for key in path[:-1]:
                    node = node[key]
                node[path[-1]] = env[var]
                used.append(var)
        if not used:
            return self
        if "THREADBOUND_MODEL_BACKEND" in used:
            data["model"] = {"backend": data["model"]["backend"]}
        return self.from_mapping(data, source="environment (" + ", ".join(used) + ")")

    @property
    def snapshot_location(self) -> str:
        """This pool's own snapshot location: ``<snapshot_dir>/<name>``."""
        return f"{self.snapshot_dir.rstrip('/')}/{self.name}"

    def with_absolute_paths(self) -> "RuntimeConfig":
        """A copy whose local paths are absolute (actors may run in another directory)."""
        changes: dict[str, Any] = {}
        if "://" not in self.snapshot_dir and not os.path.isabs(self.snapshot_dir):
            changes["snapshot_dir"] = os.path.abspath(os.path.expanduser(self.snapshot_dir))
        key_file = self.snapshots.key_file
        if key_file and not os.path.isabs(os.path.expanduser(key_file)):
            changes["snapshots"] = {**self.snapshots.model_dump(), "key_file": os.path.abspath(key_file)}
        absolute = lambda paths: tuple(os.path.abspath(os.path.expanduser(p)) for p in paths)  # noqa: E731
        if self.sandbox.read_only or self.sandbox.hide:
            changes["sandbox"] = {**self.sandbox.model_dump(), "read_only": absolute(self.sandbox.read_only),
                                  "hide": absolute(self.sandbox.hide)}
        if self.policy.workspace_roots:
            changes["policy"] = {**self.policy.model_dump(), "workspace_roots": absolute(self.policy.workspace_roots)}
        return self.replace(**changes) if changes else self

    def replace(self, **changes: Any) -> "RuntimeConfig":
        """A validated copy with some fields changed."""
        data = self.model_dump(mode="python")
        data.update(changes)
        return self.from_mapping(data)


ENV_OVERRIDES: dict[str, tuple[str, ...]] = {
    "THREADBOUND_MAX_AGENTS": ("max_agents",),
    "THREADBOUND_MAX_AGENTS_PER_TASK": ("max_agents_per_task",),
    "THREADBOUND_AGENTS_PER_ACTOR": ("agents_per_actor",),
    "THREADBOUND_SHARDS": ("shards",),
    "THREADBOUND_STEP_TIMEOUT_S": ("step_timeout_s",),
    "THREADBOUND_TASK_TIMEOUT_S": ("task_timeout_s",),
    "THREADBOUND_WAIT_TIMEOUT_S": ("wait_timeout_s",),
    "THREADBOUND_SNAPSHOT_DIR": ("snapshot_dir",),
    "THREADBOUND_SNAPSHOT_INTERVAL_S": ("snapshot_interval_s",),
    "THREADBOUND_SNAPSHOT_KEY_FILE": ("snapshots", "key_file"),
    "THREADBOUND_STREAMING": ("streaming",),
    "THREADBOUND_RAY_ADDRESS": ("ray", "address"),
    "THREADBOUND_RAY_NAMESPACE": ("ray", "namespace"),
    "THREADBOUND_MODEL_BACKEND": ("model", "backend"),
    "THREADBOUND_LEVEL": ("reasoning", "level"),
    "THREADBOUND_SANDBOX_ISOLATION": ("sandbox", "isolation"),
    "THREADBOUND_METRICS_PORT": ("metrics", "port"),
}


def _walk(loc: tuple[Any, ...]) -> tuple[str, type[BaseModel] | None]:
    """Follow a validation error's location through the config models.

    Returns the path as a user writes it (pydantic puts a discriminated union's tag,
    e.g. ``openai`` in ``model.openai.base_ur``, into the location; the file has no
    such key) and the model of the section it ends in, or None past plain values.
    """
    model: Any = RuntimeConfig
    path: list[str] = []
    i = 0
    while i < len(loc):
        part = loc[i]
        path.append(str(part))
        field = getattr(model, "model_fields", {}).get(part) if model is not None else None
        i += 1
        if field is None:
            model = None
        elif field.discriminator and i < len(loc):  # the next part is the union's tag
            tag_name = str(field.discriminator)
            members = {m.model_fields[tag_name].default: m for m in get_args(field.annotation)}
            model = members.get(loc[i])
            i += 1
        else:
            model = _section(field.annotation)
            if model is None and i < len(loc):  # list[Section] / dict[str, Section]: the next part is an index or key
                items = [a for a in get_args(field.annotation) if _section(a) is not None]
                if items:
                    path.append(str(loc[i]))
                    model = items[0]
                    i += 1
    return ".".join(path), model


def _section(annotation: Any) -> type[BaseModel] | None:
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _problems(exc: ValidationError) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for err in exc.errors(include_url=False):
        loc = tuple(err["loc"])
        path, _ = _walk(loc)
        path = path.replace(".[key]", "")
        typ = err["type"]
        if typ == "extra_forbidden":
            _, section = _walk(loc[:-1])
            known = list(section.model_fields) if section is not None else []
            close = difflib.get_close_matches(str(loc[-1]), known, n=1)
            hint = f"; did you mean `{close[0]}`?" if close else ""
            msg = f"unknown key{hint} Allowed here: {', '.join(known)}" if known else f"unknown key{hint}"
        elif typ == "union_tag_invalid":
            ctx = err.get("ctx", {})
            path = ".".join(filter(None, [path, str(ctx.get("discriminator", "")).strip("'")]))
            tags = re.findall(r"'([^']*)'", str(ctx.get("expected_tags")))
            close = difflib.get_close_matches(str(ctx.get("tag")), tags, n=1)
            msg = (f"must be one of {ctx.get('expected_tags')} (got {ctx.get('tag')!r})"
                   + (f"; did you mean `{close[0]}`?" if close else ""))
        elif typ == "value_error":
            msg = err["msg"].removeprefix("Value error, ")
        else:
            msg = err["msg"].replace("Input should be", "must be") + f" (got {err.get('input')!r})"
        out.append((path, msg))
    return out
