"""``GET /metrics`` on the supervisor's node: prometheus-client's own WSGI server on a
daemon thread of the supervisor's process, serving that pool's registry.

The thread only reads the registry (prometheus-client locks its values); the
supervisor's loop is never blocked by a scrape. :func:`check_port` runs before Ray
starts, so a port in use is reported with the process that holds it, naming the
config field, before anything else happens.
"""

from __future__ import annotations

import errno
import socket
from typing import Any, Callable

from prometheus_client import start_wsgi_server

from ..errors import ConfigError


def holder(port: int) -> str:
    """Who listens on ``port`` here: ``"pid 123 (python)"``, or a hint when unknown."""
    try:
        import psutil

        for conn in psutil.net_connections(kind="inet"):
            if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN:
                if conn.pid:
                    try:
                        return f"pid {conn.pid} ({psutil.Process(conn.pid).name()})"
                    except psutil.Error:
                        return f"pid {conn.pid}"
    except Exception:  # no permission to list sockets: say how to look
        pass
    return f"another process (see `ss -ltnp 'sport = :{port}'`)"


def _in_use(port: int, host: str, exc: OSError) -> ConfigError:
    if exc.errno == errno.EADDRINUSE:
        why = f"port {port} on {host} is in use by {holder(port)}"
    else:
        why = f"cannot listen on {host}:{port}: {exc.strerror or exc}"
    return ConfigError("<config>", [("metrics.port", f"{why}; choose a free port, or 0 to turn the endpoint off")])


def check_port(port: int, host: str) -> None:
    """Raise :class:`ConfigError` naming ``metrics.port`` if ``host:port`` cannot be listened on."""
    if not port:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise _in_use(port, host, exc) from None


DEFAULT_PORT = 9464  # metrics.port's default (prometheus-client's usual exporter port)
FALLBACK_SPAN = 100  # how many ports above a taken default one are tried


def _taken(port: int, count: int, host: str) -> tuple[int, ConfigError] | None:
    """The first of the ``count`` ports from ``port`` that cannot be listened on, and why;
    None when all can (shard k of a pool serves at port + k)."""
    for p in range(port, port + count):
        try:
            check_port(p, host)
        except ConfigError as exc:
            return p, exc
    return None


def choose_port(port: int, host: str, *, chosen: bool, taken_by: str | None = None, count: int = 1,
                claim: Callable[[int], bool] = lambda port: True) -> tuple[int, str | None]:
    """The port a pool about to start serves ``/metrics`` on, checked before Ray starts,
    and a line to tell the user when it is not the one asked for.

    ``port`` when it is free (or 0: no endpoint). When it is taken (or ``taken_by``
    says who has it already): a port the user chose (``chosen``: ``--metrics-port``,
    THREADBOUND_METRICS_PORT or a config file that sets another than the default) is a
    :class:`ConfigError` naming ``metrics.port`` and who holds it; the default one, taken
    by e.g. the pool of another ``threadbound run`` on this machine, gives way to the
    first port above it that is free and that ``claim`` grants (``count`` ports in a row
    from there: a pool of several shards serves at port + k).

    Never a port the OS picks (bind to port 0): the OS hands out its ephemeral range to
    every process that asks, and the Ray this run starts next has many; one of its
    workers was seen listening on the port a run had picked a moment before. The OS
    hands out no port just above the default one.

    Examples:
        >>> choose_port(0, "127.0.0.1", chosen=False)
        (0, None)
    """
    if not port:
        return 0, None
    busy = port
    if taken_by is None:
        refused = _taken(port, count, host)
        if refused is None:
            return port, None
        busy, why = refused
        if chosen:
            raise why
        taken_by = holder(busy)
    elif chosen:
        raise ConfigError("<config>", [("metrics.port", f"port {port} on {host} is taken by {taken_by}; choose a "
                                                        "free port, or 0 to turn the endpoint off")])
    last = min(port + FALLBACK_SPAN, 65536 - count)
    for free in range(port + 1, last + 1):
        if _taken(free, count, host) is None and claim(free):
            return free, (f"metrics: port {busy} is in use by {taken_by}, so this pool serves /metrics on "
                          f"http://{host}:{free}/metrics (--metrics-port or THREADBOUND_METRICS_PORT sets it; 0 "
                          "turns it off)")
    tried = f"port {port + 1} is" if last + count - 1 == port + 1 else f"ports {port + 1}-{last + count - 1} are"
    raise ConfigError("<config>", [("metrics.port", f"port {busy} on {host} is in use by {taken_by}, and {tried} "
                                                    "not free either; choose a free port, or 0 to turn the endpoint "
                                                    "off")])


class MetricsServer:
    """The endpoint, started and stopped with the supervisor."""

    def __init__(self, registry: Any, port: int, host: str) -> None:
        try:
            self._server, self._thread = start_wsgi_server(port, addr=host, registry=registry)
        except OSError as exc:
            raise _in_use(port, host, exc) from None
        self.host, self.port = host, self._server.server_port

    def url(self, node_ip: str | None = None) -> str:
        host = self.host
        if host in ("0.0.0.0", "::", "") and node_ip:
            host = node_ip  # listening everywhere: the node's address is the one to scrape
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
