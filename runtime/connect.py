"""How a client joins Ray (or starts a local one): the address, the cluster's token,
and Ray's own log lines kept off the terminal."""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, Iterator

import ray

from .config import RuntimeConfig
from .errors import ConfigError

log = logging.getLogger("threadbound.pool")


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
            with _no_token_notice():
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
    with _no_token_notice():
        maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


class _TokenNotice(logging.Filter):
    """Ray's notice that token authentication is on ("Token authentication is enabled for
    this Ray cluster. Set RAY_AUTH_MODE=disabled to opt out") says that the safe default
    holds, yet comes as a WARNING on every start of a script or `-v` command: it is kept
    where Ray's lines go to a file (the CLI's log, see _ray_logs_to) and not shown on a
    terminal. Every other line of Ray's, its warning that authentication is *disabled*
    among them, passes as it is."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith("Token authentication is enabled for this Ray cluster"):
            return True
        return any(isinstance(h, logging.FileHandler) for h in logging.getLogger("ray").handlers)


@contextlib.contextmanager
def _no_token_notice() -> Iterator[None]:
    """While our own ray.init runs: Ray's notice that token authentication is on stays off the terminal."""
    notice = _TokenNotice()
    logger = logging.getLogger("ray._private.authentication.authentication_token_setup")
    logger.addFilter(notice)
    try:
        yield
    finally:
        logger.removeFilter(notice)


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


# -- the one client: asyncio calls, one background loop for sync callers ---------------------
