"""What the CLI's commands share: the bad-input error and the exit code of Ctrl-C, the
config the common flags describe, Ray started or joined quietly (its own log lines go
to :func:`log_file` unless ``-v``), and a client of a running pool attached for a call.

Commands import this module and ``render`` (and the runtime's own modules), never
``main`` nor each other: ``main`` registers them, and what two of them need lives here.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import signal
from typing import Any, Iterator

from threadbound.agents.errors import ThreadboundError

from ..config import RuntimeConfig, state_dir
from ..errors import ConfigError
from .render import say  # noqa: F401 (commands say things through common, as before)

DEFAULT_GOAL = "Make the failing tests pass."
INTERRUPTED = 130  # the shell's code for a command ended by Ctrl-C


class BadInput(ThreadboundError, ValueError):
    """A command-line argument is wrong; ``flag`` names it as the user typed it."""

    def __init__(self, flag: str, problem: str) -> None:
        super().__init__(f"{flag}: {problem}")
        self.flag = flag


def log_file() -> str:
    """Where the CLI sends Ray's own log lines: ``<state_dir>/logs/threadbound.log``."""
    return os.path.join(state_dir(), "logs", "threadbound.log")


# -- config and task inputs, before Ray ------------------------------------------------


def base_config(args: argparse.Namespace) -> RuntimeConfig:
    """The config file (or the defaults) with the environment and the common flags applied."""
    cfg = RuntimeConfig.from_yaml(args.config) if getattr(args, "config", None) else RuntimeConfig.from_env()
    changes: dict[str, Any] = {}
    if getattr(args, "address", None):
        changes["ray"] = {**cfg.ray.model_dump(), "address": args.address}
    if getattr(args, "name", None):
        changes["name"] = args.name
    if getattr(args, "metrics_port", None) is not None:
        changes["metrics"] = {**cfg.metrics.model_dump(), "port": args.metrics_port}
    if getattr(args, "no_stream", False):
        changes["streaming"] = False
    if getattr(args, "keep_workspace", False):
        changes["workspace"] = {**cfg.workspace.model_dump(), "keep_copies": True}
    if getattr(args, "verbose", False):  # the events as short lines too, shown with Ray's own
        changes["log"] = {**cfg.log.model_dump(), "stderr": True}
    for key in ("max_agents", "max_agents_per_task"):  # the caps, as flags of `run`
        if getattr(args, key, None) is not None:
            changes[key] = getattr(args, key)
    if not changes:
        return cfg
    try:
        return cfg.replace(**changes)
    except ConfigError as exc:  # the caps the flags set can disagree with each other or the file: name the flag
        given = [key for key in ("max_agents_per_task", "max_agents") if getattr(args, key, None) is not None]
        if not given:
            raise
        problem = "; ".join(msg if not path or path in given else f"{path}: {msg}" for path, msg in exc.problems)
        raise BadInput("--" + given[0].replace("_", "-"), problem) from None


def task_inputs(args: argparse.Namespace) -> dict[str, Any]:
    """The task's ``inputs`` from ``--apply``, ``--approve`` and ``--test-command`` (checked):
    the same for ``run`` on a pool of its own and ``run --gateway``."""
    inputs: dict[str, Any] = {"apply": bool(args.apply)}
    if getattr(args, "approve", False):
        inputs["approve"] = True
    if args.test_command is not None:
        try:
            command = shlex.split(args.test_command)
        except ValueError as exc:
            raise BadInput("--test-command", f"cannot split {args.test_command!r} into words: {exc}") from None
        if not command:
            raise BadInput("--test-command", "is empty; give a command line such as 'python -m pytest -x'")
        inputs["test_command"] = command
    return inputs


# -- Ray, quietly ---------------------------------------------------------------------


def start_ray(cfg: RuntimeConfig, verbose: bool) -> bool:
    """Start or join Ray unless it is up in this process; True if this call did. Ray's
    log lines go to :func:`log_file` unless ``verbose``."""
    import ray

    from ..connect import LOOPBACK, _bootstrap, connect_ray, gcs_owner, requested_address

    if ray.is_initialized():
        return False
    address = requested_address(cfg)
    target = _bootstrap(address)
    if address == "auto" and target is not None:
        mine = gcs_owner(target) == os.getuid()  # another user's is refused by connect_ray
        say(f"joining the Ray at {target} (found running on this machine{', started by you' if mine else ''})")
    elif address:
        say(f"joining the Ray at {target or address}")
    else:
        other = _bootstrap("auto")  # a Ray already on this machine: left alone unless asked for
        say(f"starting a local Ray of this command's own on {LOOPBACK} (about 10 s; it stops when this command ends)"
            + (f"; the Ray already running on this machine at {other} is not used (--address {other} joins it)"
               if other else ""))
    return connect_ray(cfg, log_file=None if verbose else log_file())


def ray_was_up() -> bool:
    import ray

    return ray.is_initialized()


def stop_ray(was_up: bool) -> None:
    """Stop the Ray this command started or joined (also one whose start was interrupted)."""
    import ray

    if not was_up and ray.is_initialized():
        ray.shutdown()


@contextlib.contextmanager
def no_interrupts(message: str) -> Iterator[None]:
    """While cleaning up: a second Ctrl-C says what is happening, a third stops at once."""
    presses = []

    def handler(signum: int, frame: Any) -> None:
        presses.append(1)
        if len(presses) == 1:
            say(f"threadbound: {message}; press Ctrl-C again to stop at once")
        else:
            say("threadbound: stopped at once; Ray's processes end with this one")
            os._exit(INTERRUPTED)

    try:
        previous = signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread (tests): nothing to guard
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


# -- a running pool ---------------------------------------------------------------------


def attach(args: argparse.Namespace) -> Any:
    """A client of the running pool (``AgentPool.attach``), or None (after saying so)."""
    import ray

    from ..errors import PoolClosed
    from ..pool import AgentPool, _bootstrap, connect_ray

    cfg = base_config(args)
    address = cfg.ray.address or "auto"
    if address == "auto" and not ray.is_initialized() and _bootstrap(address) is None:
        say("threadbound: no Ray is running on this machine, so no pool to ask. A pool can be inspected "
            "while it runs on a Ray that stays up: `ray start --head`, then `threadbound run ... --address "
            "auto` (README, \"Ray\"); or pass --address of a cluster")
        return None
    # Joined here, not by attach: Ray's own lines go to the log file unless -v.
    connect_ray(cfg.replace(ray={**cfg.ray.model_dump(), "address": address}),
                log_file=None if args.verbose else log_file())
    try:
        return AgentPool.attach(cfg.name, namespace=cfg.ray.namespace)
    except PoolClosed:
        say(no_pool_line(cfg.name, cfg.ray.namespace))
        return None


def no_pool_line(name: str, namespace: str) -> str:
    """What to say when no pool of that name runs: which pools do, and how to name or start one."""
    import ray

    try:
        names = sorted({a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                        if a.get("namespace") == namespace and "/" not in a.get("name", "")})
    except Exception:  # noqa: BLE001 (the hint is a courtesy; the error is said either way)
        names = []
    running = (f"pools running there: {', '.join(names)} (pick one with --name)" if names
               else "no pool runs there")
    return (f"threadbound: no pool named {name!r} in namespace {namespace!r} on this Ray; {running}. "
            "Start one that stays up with `threadbound serve --address auto` (or `threadbound run WORKSPACE "
            "--address auto` while it runs), or name another with --name or `name:` in --config")


NO_POOL = object()


def ask(args: argparse.Namespace, method: str) -> Any:
    """``pool.<method>()`` of the pool ``args`` names, attached for just that call;
    ``NO_POOL`` when there is none to ask (said on stderr by :func:`attach`)."""
    pool = attach(args)
    if pool is None:
        return NO_POOL
    try:
        return getattr(pool, method)()
    finally:
        pool.close()
