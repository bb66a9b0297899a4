"""How a client joins Ray (or starts a local one): the address, the cluster's token,
and Ray's own log lines kept off the terminal."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
from typing import Any, Iterator

import ray

from .config import RuntimeConfig
from .errors import ConfigError

log = logging.getLogger("threadbound.pool")


LOOPBACK = "127.0.0.1"
_PROBE_S = 5.0  # how long one TCP connect to a cluster's address may take


def requested_address(config: RuntimeConfig) -> str | None:
    """The Ray the user asked to join: ``ray.address`` (``--address``,
    THREADBOUND_RAY_ADDRESS), else RAY_ADDRESS; None when they asked for none."""
    return config.ray.address or os.environ.get("RAY_ADDRESS") or None


def connect_ray(config: RuntimeConfig, *, log_file: str | None = None) -> bool:
    """Join the Ray the user asked for, or start a local Ray of this process's own,
    unless Ray is initialised here.

    Returns True when this call started or joined Ray (the caller then owns it).
    An address nobody answers at is a :class:`ConfigError` naming ``ray.address``; so is
    one whose cluster refuses this client's token, with where the token is looked for.

    Without ``ray.address`` (or RAY_ADDRESS) a local Ray of its own is started, bound to
    127.0.0.1, even when another Ray runs on this machine (``ray.init()`` would join the
    one ``/tmp/ray/ray_current_cluster`` names, whoever started it). ``auto`` joins the
    Ray running on this machine only when it is this user's.

    A client joining a cluster uses a token only if the cluster asks for one, found as
    Ray's own CLI does (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``).

    ``log_file``: send Ray's own log lines and warnings there instead of the terminal,
    and keep the agents' output out of this process (it stays in Ray's session logs).
    """
    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"namespace": config.ray.namespace, "logging_level": logging.WARNING}
    address = requested_address(config)
    target = _bootstrap(address)
    if address:
        # The resolved address, so that ray.init neither looks for a Ray again nor turns
        # token authentication on by itself (it does that for "auto").
        kwargs["address"] = target or address
        if address == "auto" and target is not None:
            check_owner(target)
    else:
        kwargs.update(local_ray_options(config))
    with _ray_logs_to(log_file) as quiet:
        if quiet:
            kwargs.update(configure_logging=False, log_to_driver=False)
        if target is not None:  # joining a cluster, not starting one
            why = _refused(target)
            if why is not None:  # Ray's client would retry for ~40 s before saying so
                asked = address or os.environ.get("RAY_ADDRESS")  # named as the user wrote it
                raise _no_cluster(asked if asked and asked != "auto" else target, why)
            _check_answers(target)
        try:
            with _no_token_notice():
                ray.init(**kwargs)
        except ConnectionError as exc:
            raise _no_cluster(address or "this machine", str(exc).splitlines()[0]) from None
        except ray.exceptions.AuthenticationError as exc:
            raise _auth_failed(address or "this machine", exc) from None
    return True


def local_ray_options(config: RuntimeConfig) -> dict[str, Any]:
    """``ray.init`` arguments of a local Ray of this process's own: never another Ray of the
    machine, its node and dashboard on 127.0.0.1."""
    opts: dict[str, Any] = {"address": "local", "_node_ip_address": LOOPBACK, "dashboard_host": LOOPBACK}
    if config.ray.num_cpus:
        opts["num_cpus"] = config.ray.num_cpus
    return opts


def gcs_owner(address: str) -> int | None:
    """The uid of the process serving Ray's GCS at ``address`` on this machine (None if
    no such process is seen here)."""
    try:
        import psutil
    except ImportError:
        return None
    port = address.rpartition(":")[2]
    for proc in psutil.process_iter(["name", "cmdline", "uids"]):
        try:
            cmdline = proc.info["cmdline"] or []
            if proc.info["name"] == "gcs_server" and f"--gcs_server_port={port}" in cmdline:
                return proc.info["uids"].real
        except (psutil.Error, TypeError, AttributeError):
            continue
    return None


def check_owner(target: str, *, uid: int | None = None) -> None:
    """``auto`` found ``target`` on this machine: refuse it unless this user started it
    (another user's Ray would get the agents, the workspace copies and the model's keys)."""
    owner = gcs_owner(target) if uid is None else uid
    if owner is None or owner == os.getuid():
        return
    try:
        import pwd

        who = f"{pwd.getpwuid(owner).pw_name} (uid {owner})"
    except (ImportError, KeyError):
        who = f"uid {owner}"
    raise ConfigError("Ray connection", [(
        "ray.address",
        f"'auto' found the Ray at {target}, which {who} started, not you: the agents, the workspace copies "
        "and the model's credentials would go to it. Leave --address (ray.address, RAY_ADDRESS) out to start "
        f"a Ray of your own, or give --address {target} if you mean to join it")])


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
    """The ``host:port`` ``ray.init(address)`` would join (``address``, else RAY_ADDRESS;
    ``auto``: the Ray started on this machine with ``ray start``), or None when there is
    nothing to join (no address asked for, a ``ray://`` one, or ``auto`` finding none)."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    if not address or address.startswith("ray://"):
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


def _turn_token_auth_off() -> None:
    """This process joins a cluster without token authentication: say so to Ray, so that
    ``ray.init`` does not turn it on because a token file happens to exist here."""
    os.environ["RAY_AUTH_MODE"] = "disabled"
    try:
        from ray._raylet import Config

        Config.initialize("")
    except ImportError:
        pass


def _check_answers(address: str) -> None:
    """Ask the cluster's GCS once, first without a token, and use one only if the cluster
    asks for it. A refused token is told as such (``ray.init`` would retry for 20 s and then
    say only that nobody answers).

    Token authentication is turned on here only for a cluster that wants it: a client
    with token authentication on, joining a cluster without it, refuses the calls its
    own actors make back to it, so Ray cancels every actor it creates ("all references to
    the actor were removed") and the pool never starts."""
    try:
        from ray._raylet import GcsClient
    except ImportError:
        return
    mode = os.environ.get("RAY_AUTH_MODE")
    try:
        GcsClient(address=address)
    except ray.exceptions.AuthenticationError as exc:
        if mode is not None:  # the user chose the mode: say it failed
            raise _auth_failed(address, exc) from None
        _use_token_if_found()
        if os.environ.get("RAY_AUTH_MODE") is None:  # no token at hand
            raise _auth_failed(address, exc) from None
        _check_answers(address)  # again, with the token
        return
    except ray.exceptions.RpcError as exc:
        raise _no_cluster(address, str(exc).splitlines()[0]) from None
    except Exception:  # anything else: let ray.init say it
        return
    if mode is None:
        _turn_token_auth_off()


def _refused(address: str) -> str | None:
    """Why nothing can answer at ``host:port``, if one TCP connect says so for sure (refused,
    no such host, no route); None when something listens, or when it cannot be told at
    once (a dropped packet: Ray's own client then waits and says)."""
    host, _, port = address.rpartition(":")
    try:
        number = int(port)
    except ValueError:
        return None  # not host:port: ray.init says what it makes of it
    if not 0 < number < 65536:
        return f"port {number} is not a TCP port (1-65535)"
    try:
        with socket.create_connection((host.strip("[]"), number), timeout=_PROBE_S):
            return None
    except ConnectionRefusedError:
        return "nothing listens there: connection refused"
    except socket.gaierror as exc:
        return f"the host name does not resolve: {exc.strerror or exc}"
    except OSError as exc:
        if exc.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH):
            return f"no route to the host: {exc.strerror}"
        return None


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
