"""``AgentPool`` and ``TaskHandle``: the thin client side of the supervisor actor.

Several clients (this process, another process, the CLI) may attach to one
supervisor by its name; all state lives in the supervisor.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from typing import Any, AsyncIterator, Callable, Iterator, Mapping

import ray
from ray.exceptions import RayActorError, RayTaskError

from threadbound.agents.errors import ThreadboundError

from .config import RuntimeConfig
from .errors import ConfigError, PoolClosed, ResultTimeout, TaskCancelled, TaskFailed, TaskTimedOut
from .policy import check as check_policy
from .registry import role_blobs
from .task import CANCELLED, SUCCEEDED, TERMINAL, TIMED_OUT, Event, Task, TaskResult, TaskSummary

log = logging.getLogger("threadbound.pool")

_POLL_S = 10.0  # longest a single long-poll read waits inside the supervisor
_RECONNECT_S = 120.0  # how long a reader waits for a restarting supervisor


def _unwrap(exc: BaseException) -> BaseException:
    """Ray wraps errors raised in actors; hand the user our own error back."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, ThreadboundError):
        return cause
    if isinstance(exc, RayActorError):
        return PoolClosed("the pool's supervisor is gone (shut down or crashed)")
    return exc


def _get(ref: Any, timeout: float | None = None) -> Any:
    try:
        return ray.get(ref, timeout=timeout)
    except (RayTaskError, RayActorError) as exc:
        raise _unwrap(exc) from None


async def _aget(ref: Any) -> Any:
    try:
        return await ref
    except (RayTaskError, RayActorError) as exc:
        raise _unwrap(exc) from None


def _restarting(name: tuple[str, str] | None, exc: BaseException) -> bool:
    """True if the supervisor died but Ray is restarting it (its name still resolves)."""
    if not isinstance(exc, RayActorError):
        return False
    if name is None:
        return False
    try:
        ray.get_actor(name[0], namespace=name[1])
    except ValueError:
        return False
    return True


def _reading(name: tuple[str, str] | None, call: Callable[[], Any]) -> Any:
    """``call()``, retried while a crashed supervisor is restarted and resumes."""
    deadline = time.monotonic() + _RECONNECT_S
    warned = False
    while True:
        try:
            return ray.get(call())
        except (RayTaskError, RayActorError) as exc:
            if time.monotonic() > deadline or not _restarting(name, exc):
                raise _unwrap(exc) from None
            if not warned:
                log.warning("pool %r: supervisor unavailable (%s); waiting for Ray to restart it",
                            name[0] if name else "?", type(exc).__name__)
                warned = True
            time.sleep(0.5)


async def _areading(name: tuple[str, str] | None, call: Callable[[], Any]) -> Any:
    deadline = time.monotonic() + _RECONNECT_S
    while True:
        try:
            return await call()
        except (RayTaskError, RayActorError) as exc:
            if time.monotonic() > deadline or not _restarting(name, exc):
                raise _unwrap(exc) from None
            await asyncio.sleep(0.5)


def _await_gone(name: str, namespace: str, timeout_s: float = 30.0) -> None:
    """Wait until no supervisor named ``name`` lives (a crashed one may take a moment
    to be reaped); refuse if one is alive and answering."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            handle = ray.get_actor(name, namespace=namespace)
        except ValueError:
            return
        try:
            ray.get(handle.info.remote(), timeout=2)
        except (RayActorError, ray.exceptions.GetTimeoutError):
            pass  # dying
        except RayTaskError:
            raise PoolClosed(f"pool {name!r} has a supervisor that cannot serve; stop it with "
                             f"ray.kill(ray.get_actor({name!r}, namespace={namespace!r})) first") from None
        else:
            raise PoolClosed(f"pool {name!r} is running (Ray may have restarted and resumed it already); "
                             "attach to it with AgentPool(config) instead of resuming")
        if time.monotonic() > deadline:
            raise PoolClosed(f"pool {name!r}: the crashed supervisor is still being reaped after {timeout_s:.0f}s")
        time.sleep(0.2)


def connect_ray(config: RuntimeConfig, *, log_file: str | None = None) -> bool:
    """Join ``config.ray.address`` (or start a local Ray) unless Ray is initialised here.

    Returns True when this call started or joined Ray (the caller then owns it).
    An address nobody answers at is a :class:`ConfigError` naming ``ray.address``; so is
    one whose cluster refuses this client's token, with where the token is looked for.

    A client joining an address finds the cluster's token as Ray's own CLI does: when
    ``RAY_AUTH_MODE`` is unset and a token is at hand (``RAY_AUTH_TOKEN``,
    ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``), token authentication is turned on.

    ``log_file``: send Ray's own log lines and warnings there instead of the terminal,
    and keep the agents' output out of this process (it stays in Ray's session logs).
    """
    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"namespace": config.ray.namespace, "logging_level": logging.WARNING}
    address = config.ray.address
    if address:
        kwargs["address"] = address
    elif config.ray.num_cpus:
        kwargs["num_cpus"] = config.ray.num_cpus
    with _ray_logs_to(log_file) as quiet:
        if quiet:
            kwargs.update(configure_logging=False, log_to_driver=False)
        target = _bootstrap(address)
        if target is not None:  # joining a cluster, not starting one
            _use_token_if_found()
            _check_answers(target)
        try:
            ray.init(**kwargs)
        except ConnectionError as exc:
            where = address or os.environ.get("RAY_ADDRESS") or "this machine"
            raise _no_cluster(where, str(exc).splitlines()[0]) from None
        except ray.exceptions.AuthenticationError as exc:
            raise _auth_failed(address or os.environ.get("RAY_ADDRESS") or "this machine", exc) from None
    return True


def _no_cluster(where: str, why: str) -> ConfigError:
    return ConfigError("Ray connection", [(
        "ray.address",
        f"no Ray cluster answers at {where!r} ({why}); start one with `ray start --head`, fix the address "
        "(or RAY_ADDRESS), or leave ray.address unset to start a local Ray")])


def _auth_failed(where: str, exc: BaseException) -> ConfigError:
    mode = os.environ.get("RAY_AUTH_MODE") or "unset"
    source = ("RAY_AUTH_TOKEN" if os.environ.get("RAY_AUTH_TOKEN") else
              f"RAY_AUTH_TOKEN_PATH={os.environ['RAY_AUTH_TOKEN_PATH']}" if os.environ.get("RAY_AUTH_TOKEN_PATH")
              else "~/.ray/auth_token")
    return ConfigError("Ray connection", [(
        "ray.address",
        f"the Ray cluster at {where!r} refused this client: token authentication failed "
        f"(RAY_AUTH_MODE {mode}; token looked for in {source}). Give this client the cluster's token: "
        "on the head node `ray get-auth-token` prints it; put it in ~/.ray/auth_token here, or set "
        "RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH to a file holding it). "
        f"Ray said: {str(exc).splitlines()[0][:160]}")])


def _bootstrap(address: str | None) -> str | None:
    """The ``host:port`` ``ray.init(address)`` would join (RAY_ADDRESS, or a Ray started on
    this machine with ``ray start``), or None when it would start a local Ray."""
    if address and address.startswith("ray://"):
        return None
    try:
        from ray._private.services import canonicalize_bootstrap_address
    except ImportError:
        return None
    try:
        return canonicalize_bootstrap_address(address)
    except Exception:  # no cluster for "auto", a bad address: ray.init says it
        return None


def _use_token_if_found() -> None:
    """What ``ray start`` and the dashboard do: with RAY_AUTH_MODE unset, a token at hand
    turns token authentication on (``ray.init`` does that only for ``auto``)."""
    if os.environ.get("RAY_AUTH_MODE") is not None:
        return
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )
    except ImportError:  # another Ray: leave it to Ray
        return
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def _check_answers(address: str) -> None:
    """Ask the cluster's GCS once, so a refused token is told as such (``ray.init`` would
    retry for 20 s and then say only that nobody answers)."""
    try:
        from ray._raylet import GcsClient
    except ImportError:
        return
    try:
        GcsClient(address=address)
    except ray.exceptions.AuthenticationError as exc:
        raise _auth_failed(address, exc) from None
    except ray.exceptions.RpcError as exc:
        raise _no_cluster(address, str(exc).splitlines()[0]) from None
    except Exception:  # anything else: let ray.init say it
        pass


@contextlib.contextmanager
def _ray_logs_to(log_file: str | None) -> Iterator[bool]:
    """While Ray starts or connects: its Python log lines and its C++ core's stderr lines
    go to ``log_file`` (appended), not to the terminal. Yields whether they are routed."""
    if not log_file:
        yield False
        return
    os.makedirs(os.path.dirname(os.path.abspath(log_file)), exist_ok=True)
    ray_logger = logging.getLogger("ray")
    handler = logging.FileHandler(log_file)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for h in list(ray_logger.handlers):  # Ray's own stderr handler, installed when ray is imported
        ray_logger.removeHandler(h)
    ray_logger.addHandler(handler)
    ray_logger.setLevel(logging.INFO)
    ray_logger.propagate = False
    import sys

    sys.stderr.flush()
    saved = os.dup(2)
    fd = os.open(log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.dup2(fd, 2)
        yield True
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(fd)


def _event(task_id: str, row: tuple) -> Event:
    offset, kind, agent, data, ts = row
    return Event(task_id=task_id, offset=offset, kind=kind, agent=agent, data=data, ts=ts)


def _result(d: dict[str, Any]) -> TaskResult:
    res = TaskResult(**d)
    if res.status == SUCCEEDED:
        return res
    cls = {CANCELLED: TaskCancelled, TIMED_OUT: TaskTimedOut}.get(res.status, TaskFailed)
    err = cls(f"task {res.task_id} {res.status}: {res.error}", task_id=res.task_id, elapsed=res.elapsed_s)
    err.result = res
    if isinstance(err, TaskCancelled):
        err.reason = (res.error or "").removeprefix("cancelled (").rstrip(")") or "cancelled"
    raise err


def _crashed_config(location: str, key_file: str | None) -> RuntimeConfig:
    """The config a crashed pool ran with (from its newest verified manifest), with
    ``snapshot_dir`` and ``name`` pointing at ``location``."""
    from threadbound.snapshots import NoSnapshot, SnapshotLocation, load_key, open_store

    manifest = SnapshotLocation(open_store(location, create=False), load_key(key_file)).newest_verified()
    cfg = RuntimeConfig.from_mapping(manifest.get("config") or {}, source=f"{location} (newest manifest)")
    parent, _, base = location.rstrip("/").rpartition("/")
    if base != cfg.name:
        raise NoSnapshot(location, f"holds the snapshots of pool {cfg.name!r}, but the directory is "
                                   f"named {base!r}; rename it back to {cfg.name!r}")
    return cfg.replace(snapshot_dir=parent or "/")


class TaskHandle:
    """A submitted task: stream its events, wait for its result, cancel it.

    Examples:
        >>> handle = pool.submit(Task(goal="fix it", agents=["coder"]))   # doctest: +SKIP
        >>> for event in handle.stream():                                # doctest: +SKIP
        ...     print(event.offset, event.kind, event.agent, event.data)
        >>> handle.result(timeout=60).outputs["coder"]                    # doctest: +SKIP
    """

    def __init__(self, supervisor: Any, task_id: str, name: tuple[str, str] | None = None) -> None:
        self._sup = supervisor
        self.task_id = task_id
        self._name = name  # (pool name, namespace): lets readers ride out a supervisor restart

    def __repr__(self) -> str:
        return f"TaskHandle({self.task_id!r})"

    @property
    def status(self) -> str:
        """pending, admitted, running, succeeded, failed, cancelled or timed_out."""
        return self.summary().status

    def summary(self) -> TaskSummary:
        return _get(self._sup.task_summary.remote(self.task_id))

    def stream(self, from_offset: int = 0) -> Iterator[Event]:
        """Every event from ``from_offset`` on, in order, following live until the task ends.

        Reconnecting with the offset after the last one seen continues exactly there.
        """
        offset = from_offset
        while True:
            rows, _ = _reading(self._name, lambda: self._sup.read.remote(self.task_id, offset, _POLL_S))
            for row in rows:
                ev = _event(self.task_id, row)
                offset = ev.offset + 1
                yield ev
                if ev.terminal:
                    return

    async def astream(self, from_offset: int = 0) -> AsyncIterator[Event]:
        """``stream`` for asyncio: ``async for event in handle.astream(): ...``"""
        offset = from_offset
        while True:
            rows, _ = await _areading(self._sup, lambda: self._sup.read.remote(self.task_id, offset, _POLL_S))
            for row in rows:
                ev = _event(self.task_id, row)
                offset = ev.offset + 1
                yield ev
                if ev.terminal:
                    return

    def result(self, timeout: float | None = None) -> TaskResult:
        """Wait for the task to end and return its result.

        Raises :class:`TaskFailed`, :class:`TaskTimedOut` or :class:`TaskCancelled`
        (each with ``.result``) if it did not succeed, and :class:`ResultTimeout` if
        ``timeout`` seconds pass first (the task keeps running).
        """
        d = _reading(self._name, lambda: self._sup.wait.remote(self.task_id, timeout))
        if d is None:
            raise ResultTimeout(f"task {self.task_id} did not finish within {timeout}s; "
                                "it is still running: wait again or cancel it",
                                task_id=self.task_id, limit=timeout)
        return _result(d)

    async def aresult(self, timeout: float | None = None) -> TaskResult:
        """``result`` for asyncio."""
        d = await _areading(self._sup, lambda: self._sup.wait.remote(self.task_id, timeout))
        if d is None:
            raise ResultTimeout(f"task {self.task_id} did not finish within {timeout}s",
                                task_id=self.task_id, limit=timeout)
        return _result(d)

    def cancel(self) -> str:
        """Cancel the task (a running step's actor is killed); returns the final status."""
        return _get(self._sup.cancel.remote(self.task_id))

    async def acancel(self) -> str:
        return await _aget(self._sup.cancel.remote(self.task_id))


class AgentPool:
    """The pool of agent actors, driven by one supervisor actor.

    Starts Ray if it is not running (or joins ``config.ray.address``), then creates
    the supervisor named ``config.name`` in ``config.ray.namespace`` or attaches to
    the one already there.

    Args:
        config: a :class:`RuntimeConfig`; defaults to ``RuntimeConfig.from_env()``.
        agents: extra roles, ``{"role": AgentSubclass or "pkg.mod:Class"}``.

    Examples:
        >>> from threadbound.runtime import AgentPool, RuntimeConfig, Task   # doctest: +SKIP
        >>> with AgentPool(RuntimeConfig(max_agents=4)) as pool:                 # doctest: +SKIP
        ...     print(pool.submit(Task(goal="hello", agents=["coder"])).result().status)
        succeeded
    """

    def __init__(self, config: RuntimeConfig | None = None, *,
                 agents: Mapping[str, Any] | None = None, _resume: bool = False) -> None:
        config = config if config is not None else RuntimeConfig.from_env()
        config = config.with_absolute_paths()
        blobs = role_blobs(config.agents, agents)  # fail on bad roles before touching Ray
        self._owns_ray = connect_ray(config)
        from .actors import SupervisorActor, supervisor_options

        opts = supervisor_options(config)
        if _resume:
            try:
                _await_gone(config.name, config.ray.namespace)
            except PoolClosed:
                self._stop_owned_ray()
                raise
        self._sup = SupervisorActor.options(**opts).remote(config, blobs, resume=_resume)
        self._sup_name = (config.name, config.ray.namespace)
        try:
            info = _get(self._sup.info.remote())
        except ThreadboundError:  # e.g. a snapshot location held by another supervisor
            ray.kill(self._sup, no_restart=True)
            self._stop_owned_ray()
            raise
        _get(self._sup.register_roles.remote(blobs))
        self.config: RuntimeConfig = info["config"]
        self.name: str = info["name"]
        self.resumed: dict[str, Any] | None = info.get("resumed")
        if self.resumed and self.resumed.get("skipped"):
            log.error("resumed from an older snapshot; newer ones were refused: %s",
                      "; ".join(self.resumed["skipped"]))
        if config.prewarm:
            _get(self._sup.prewarm.remote())
        self._closed = False

    def _stop_owned_ray(self) -> None:
        if self._owns_ray:
            ray.shutdown()

    @classmethod
    def resume(cls, location: str | os.PathLike, *, name: str | None = None,
               config: RuntimeConfig | None = None, agents: Mapping[str, Any] | None = None) -> "AgentPool":
        """Restart a crashed pool from the newest snapshot at ``location`` that verifies.

        Committed steps are not run again; the step that was in flight restarts from its
        beginning with its agent's last committed state; queued tasks keep their order;
        task ids and event offsets continue. ``location`` is the ``snapshot_dir`` (or a
        URL) the crashed pool wrote to, or its own ``<snapshot_dir>/<name>`` directory;
        ``name`` picks a pool when several wrote there. Without ``config``, the crashed
        pool's own config (from the snapshot manifest) is used. If the newest snapshot
        is damaged, an older one is used and ``pool.resumed["skipped"]`` says why.

        Examples:
            >>> pool = AgentPool.resume(".threadbound/snapshots")          # doctest: +SKIP
            >>> [h.task_id for h in pool.unfinished()]                      # doctest: +SKIP
        """
        from threadbound.snapshots.location import find_location

        where = find_location(os.fspath(location), name)
        found = _crashed_config(where, (config or RuntimeConfig.from_env()).snapshots.key_file)
        if config is not None:
            found = config.replace(snapshot_dir=found.snapshot_dir, name=found.name)
        return cls(found, agents=agents, _resume=True)

    def unfinished(self) -> list["TaskHandle"]:
        """Handles of every task that has not ended (e.g. to follow them after a resume)."""
        return [TaskHandle(self._sup, t.task_id, self._sup_name) for t in self.tasks()
                if t.status not in TERMINAL]

    def snapshot(self) -> dict[str, Any]:
        """Write a snapshot now; returns what it cost (``bytes``, ``copy_ms``, ``write_ms``)."""
        return _get(self._sup.snapshot_now.remote())

    @classmethod
    def from_config(cls, path: str | os.PathLike, *, agents: Mapping[str, Any] | None = None) -> "AgentPool":
        """A pool configured by a YAML file (with ``THREADBOUND_*`` overrides applied)."""
        return cls(RuntimeConfig.from_yaml(path), agents=agents)

    def __enter__(self) -> "AgentPool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    # -- tasks ------------------------------------------------------------------------

    def submit(self, task: Task) -> TaskHandle:
        """Queue a task; returns at once with its handle. Bad input raises here."""
        # Validated here, before a round trip: the workspace becomes absolute against this
        # process's directory, not the supervisor's (a joined Ray's workers run elsewhere).
        task = task.validated(self.config.default_agents)
        check_policy(task, self.config.policy)
        return TaskHandle(self._sup, _get(self._sup.submit.remote(task)), self._sup_name)

    async def asubmit(self, task: Task) -> TaskHandle:
        task = task.validated(self.config.default_agents)
        check_policy(task, self.config.policy)
        return TaskHandle(self._sup, await _aget(self._sup.submit.remote(task)), self._sup_name)

    def task(self, task_id: str) -> TaskHandle:
        """A handle to a task already submitted (by any client of this pool)."""
        _get(self._sup.task_summary.remote(task_id))  # raises TaskNotFound
        return TaskHandle(self._sup, task_id, self._sup_name)

    def tasks(self) -> list[TaskSummary]:
        """Summaries of every task the pool remembers, oldest first."""
        return _get(self._sup.tasks_summary.remote())

    def register(self, role: str, agent: Any) -> None:
        """Add or replace a role: an Agent subclass or ``"package.module:Class"``."""
        blobs = role_blobs({role: agent})
        _get(self._sup.register_roles.remote({role: blobs[role]}))

    def roles(self) -> list[str]:
        return _get(self._sup.info.remote())["roles"]

    def stats(self) -> dict[str, Any]:
        """Queue depth, task counts by status, and every slot (owner, pid, alive, ...)."""
        return _get(self._sup.stats.remote())

    def health(self) -> dict[str, Any]:
        """The pool's health: its mode, every signal with its threshold, recent transitions.

        ``mode`` is ``normal``, ``degraded`` (steps run at level 1 without streaming) or
        ``paused`` (as degraded, and nothing new is admitted). ``signals`` maps each
        signal to ``{"value", "threshold", "over"}``; ``recovers_in_s`` says how long
        the pool must stay healthy before it leaves its mode.

        Examples:
            >>> pool.health()["mode"]  # doctest: +SKIP
            'normal'
        """
        return _get(self._sup.health_report.remote())

    # -- lifecycle ------------------------------------------------------------------

    def close(self) -> None:
        """Detach this client; the supervisor and its tasks keep running."""
        self._closed = True

    def shutdown(self, grace_s: float | None = None) -> None:
        """Stop the pool: cancel queued tasks, give running ones ``grace_s`` to finish,
        cancel the rest, kill every agent actor and the supervisor. Stops Ray too if
        this pool started it."""
        if self._closed:
            return
        self._closed = True
        try:
            _get(self._sup.shutdown.remote(grace_s), timeout=(grace_s or self.config.shutdown_grace_s) + 30)
        except (PoolClosed, ray.exceptions.GetTimeoutError):
            pass
        finally:
            try:
                ray.kill(self._sup, no_restart=True)
            except Exception:
                pass
            self._stop_owned_ray()
