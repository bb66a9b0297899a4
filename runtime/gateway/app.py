"""The gateway's ASGI app: REST for tasks, SSE and WebSocket streams, the web page.

Why Starlette on uvicorn: the gateway is a thin client of the supervisor, and
Starlette gives exactly the three things it needs (routing, streaming responses,
WebSockets) on one asyncio loop, without FastAPI's model layer, which would restate
the task fields :meth:`Task.validated` already checks with the messages Python users
see. The streams then share the pool client's single long-poll per event loop
(``runtime.client``): two hundred SSE readers of a task cost the supervisor one call
per burst of events. A Ray Serve deployment would run this same app on a cluster;
one uvicorn process is what a single pool needs, and restarting it loses nothing,
because every state it shows lives in the supervisor.

Errors are JSON: ``{"error": {"type", "message", "field"}}`` with the status code.
"""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import dataclass, field
from typing import Any, Awaitable

from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, Response
from starlette.routing import Route, WebSocketRoute

from threadbound.agents.errors import ThreadboundError
from threadbound.agents import events as kinds

from ..config import state_dir
from ..errors import ConfigError
from .auth import READ, SUBMIT, RateLimit, Token, Tokens
from .openapi import document
from .person import PersonRoutes
from .streams import WS_MAX_BYTES, StreamRoutes
from .tasks import TaskRoutes
from .wire import Problem, SafeJSON, _from_error


STATIC = os.path.join(os.path.dirname(__file__), "static")
MAX_BODY_TIMEOUT_S = 86_400
DAY_S = 86_400

# The numeric limits, each (lowest, highest, whole number?, what the lowest means if it is 0).
# A deadline of 0 or a cap of a billion would switch a protection off by accident: only
# the settings whose 0 means "off" by design (rate_per_s, max_connections_per_client) take 0.
_RANGES: dict[str, tuple[float, float, bool, str]] = {
    "max_body_bytes": (1, 1 << 30, True, "a size in bytes from 1 to 1 GiB"),
    "rate_per_s": (0, 1_000_000, False, "requests per second from 0 (no limit) to 1,000,000"),
    "rate_burst": (1, 1_000_000, True, "a count from 1 to 1,000,000"),
    "keepalive_s": (0.01, 3_600, False, "seconds above 0 and at most an hour"),
    "header_timeout_s": (0.01, DAY_S, False, "seconds above 0 and at most a day"),
    "body_timeout_s": (0.01, MAX_BODY_TIMEOUT_S, False, "seconds above 0 and at most a day"),
    "idle_timeout_s": (1, DAY_S, True, "whole seconds from 1 to a day"),
    "max_connections": (1, 1_000_000, True, "a count from 1 to 1,000,000"),
    "max_connections_per_client": (0, 1_000_000, True, "a count from 0 (no cap) to 1,000,000"),
    "max_header_bytes": (1_024, 1 << 20, True, "a size in bytes from 1 KiB to 1 MiB"),
}


@dataclass(frozen=True)
class GatewaySettings:
    """Limits of one gateway.

    Attributes:
        max_body_bytes: a request body larger than this gets 413.
        rate_per_s, rate_burst: each token's request budget (429 with Retry-After past it);
            ``rate_per_s=0`` turns the limit off.
        keepalive_s: an idle SSE stream gets a comment line this often.
        workspace_roots: a submitted ``workspace`` must lie under one of these
            directories (relative ones are resolved against the first), and not be one
            of them; empty: no workspace may be named over HTTP.
        protected: directories a workspace may neither be, lie in, nor contain (the
            pool's snapshot store, its key file's folder); threadbound's state
            directory, ``~/.threadbound``, ``~/.ray``, ``~/.ssh`` and the home directory
            itself are always protected.
        header_timeout_s: a connection whose request headers are not complete this long
            after it opened (or after the first byte of its next request) is closed:
            above 0, at most a day.
        body_timeout_s: a request whose whole body has not arrived this long after its
            headers has its connection closed (with a 408 when no answer has started):
            above 0, at most a day.
        idle_timeout_s: an idle keep-alive connection is closed after this long.
        max_connections: the whole gateway's open connections and streams; past it, 503.
        max_connections_per_client: one client address's open HTTP connections; past it a
            new one is closed at once (0: no cap).
        max_header_bytes: the largest request line and headers taken (431/400 past it).

    Every number is range-checked when the settings are made (``_RANGES``): out of
    range, of the wrong type or a boolean, it is a :class:`ConfigError` naming it.
    """

    max_body_bytes: int = 1 << 20
    rate_per_s: float = 20.0
    rate_burst: int = 100
    keepalive_s: float = 15.0
    workspace_roots: tuple[str, ...] = field(default_factory=tuple)
    protected: tuple[str, ...] = field(default_factory=tuple)
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    idle_timeout_s: int = 5
    max_connections: int = 2048
    max_connections_per_client: int = 256
    max_header_bytes: int = 16_384

    def __post_init__(self) -> None:
        """Every numeric limit is range-checked: a wrong one is a ConfigError naming it."""
        bad = []
        for name, (low, high, whole, what) in _RANGES.items():
            value = getattr(self, name)
            kinds = int if whole else (int, float)
            if isinstance(value, bool) or not isinstance(value, kinds) or not low <= value <= high:
                bad.append((name, f"must be {what}, got {value!r}"))
        if bad:
            raise ConfigError("GatewaySettings", bad)


def protected_dirs(extra: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The real paths no workspace served over HTTP may be, lie in or contain."""
    home = os.path.expanduser("~")
    paths = (state_dir(), os.path.join(home, ".threadbound"), os.path.join(home, ".ray"),
             os.path.join(home, ".ssh"), *extra, home)
    real = (os.path.realpath(os.path.expanduser(p)) for p in paths if p and "://" not in p)
    return tuple(dict.fromkeys(p for p in real if p != "/"))


class Gateway(TaskRoutes, PersonRoutes, StreamRoutes):
    """The app and what it holds: the pool client, the tokens, the limits.

    Its routes live by concern: tasks in :mod:`.tasks`, a person in the loop in
    :mod:`.person`, event streams in :mod:`.streams`.

    Examples:
        >>> app = Gateway(AgentPool.attach("threadbound"), Tokens(tokens)).app   # doctest: +SKIP
        >>> uvicorn.run(app, host="127.0.0.1", port=8420)                        # doctest: +SKIP
    """

    def __init__(self, pool: Any, tokens: Tokens, settings: GatewaySettings | None = None) -> None:
        self.pool = pool
        self.tokens = tokens
        self.settings = settings or GatewaySettings()
        self.limit = RateLimit(self.settings.rate_per_s, self.settings.rate_burst)
        self.roots = tuple(os.path.realpath(r) for r in self.settings.workspace_roots)
        self.protected = protected_dirs(self.settings.protected)
        routes = [
            Route("/healthz", self.healthz),
            Route("/openapi.json", self.openapi),
            Route("/metrics", self.metrics),
            Route("/v1/tasks", self.submit, methods=["POST"]),
            Route("/v1/tasks", self.list_tasks, methods=["GET"]),
            Route("/v1/tasks/{task_id}", self.get_task, methods=["GET"]),
            Route("/v1/tasks/{task_id}/cancel", self.cancel, methods=["POST"]),
            Route("/v1/tasks/{task_id}/respond", self.respond, methods=["POST"]),
            Route("/v1/tasks/{task_id}/approve", self.approve, methods=["POST"]),
            Route("/v1/tasks/{task_id}/reject", self.reject, methods=["POST"]),
            Route("/v1/tasks/{task_id}/messages", self.send, methods=["POST"]),
            Route("/v1/tasks/{task_id}/events", self.events, methods=["GET"]),
            WebSocketRoute("/v1/tasks/{task_id}/stream", self.stream),
            Route("/", self.page("index.html", "text/html; charset=utf-8")),
            Route("/static/app.js", self.page("app.js", "text/javascript; charset=utf-8")),
            Route("/static/style.css", self.page("style.css", "text/css; charset=utf-8")),
            Route("/static/vocabulary.js", self.vocabulary),
        ]
        self.app = Starlette(routes=routes, exception_handlers={Problem: lambda r, e: e.response()})

    # -- helpers ----------------------------------------------------------------------

    @staticmethod
    async def answer(call: Awaitable[Any]) -> Any:
        """``call`` awaited; our errors become HTTP answers."""
        try:
            return await call
        except ThreadboundError as exc:
            raise _from_error(exc) from None

    def who(self, request: Request, need: str = READ) -> Token:
        """The caller's token (401 without a valid one, 403 without the scope, 429 past its rate)."""
        header = request.headers.get("authorization", "")
        scheme, _, presented = header.partition(" ")
        token = self.tokens.find(presented.strip()) if scheme.lower() == "bearer" and presented.strip() else None
        if token is None:
            raise Problem(401, "Authorization: send 'Authorization: Bearer <token>' with a token this gateway "
                               "knows (THREADBOUND_GATEWAY_TOKENS or its token file)", "Authorization",
                          "unauthorized", {"WWW-Authenticate": 'Bearer realm="threadbound"'})
        self._allowed(token, need)
        return token

    def _allowed(self, token: Token, need: str) -> None:
        if need == SUBMIT and token.scope != SUBMIT:
            raise Problem(403, "Authorization: this token is read-only; submitting and cancelling need a "
                               "submit token", "Authorization", "forbidden")
        wait = self.limit.take(token.id)
        if wait:
            raise Problem(429, f"rate limit: this token may make {self.settings.rate_per_s:g} requests a second "
                               f"(bursts of {self.settings.rate_burst}); retry after {wait}s", None,
                          "rate_limited", {"Retry-After": str(wait)})

    async def _json_body(self, request: Request, empty: Any = None) -> Any:
        """The request's JSON body; ``empty`` (when not None) stands for a body with nothing in it."""
        limit = self.settings.max_body_bytes
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            raise Problem(413, f"body: larger than this gateway accepts ({limit} bytes)", "body", "too_large")
        chunks, size = [], 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise Problem(413, f"body: larger than this gateway accepts ({limit} bytes)", "body", "too_large")
                chunks.append(chunk)
        except ClientDisconnect:  # gone, or cut off by the body deadline (guard.py): nobody to answer
            raise Problem(408, "body: the connection ended before the whole body arrived", "body",
                          "body_timeout") from None
        raw = b"".join(chunks)
        if empty is not None and not raw.strip():
            return empty
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise Problem(400, f"body: not UTF-8 (byte {exc.start})", "body") from None

        def refuse(name: str) -> None:
            raise ValueError(f"{name} is not JSON")

        try:
            return json.loads(text, parse_constant=refuse)  # 1e400 is inf: the fields' checks name it
        except json.JSONDecodeError as exc:
            raise Problem(400, f"body: malformed JSON at line {exc.lineno}, column {exc.colno} "
                               f"(char {exc.pos}): {exc.msg}", "body") from None
        except (ValueError, RecursionError) as exc:
            raise Problem(400, f"body: malformed JSON: {str(exc)[:200]}", "body") from None

    def page(self, name: str, media_type: str):
        path = os.path.join(STATIC, name)

        async def serve(request: Request) -> Response:
            # Static files only, no data: the page asks for the token and sends it with
            # every API call, so it can load without one.
            return FileResponse(path, media_type=media_type, headers={
                "Content-Security-Policy": "default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data:",
                "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"})
        return serve

    async def vocabulary(self, request: Request) -> Response:
        """The event kinds the page renders, from the one events module (no kind is
        spelled in the page's JavaScript)."""
        known = {"TOKENS": kinds.TOKENS, "MESSAGE": kinds.MESSAGE, "STATUSES": list(kinds.STATUSES),
                 "TERMINAL": sorted(kinds.TERMINAL), "WAITING": kinds.WAITING,
                 "INPUT_REQUESTED": kinds.INPUT_REQUESTED, "INPUT_RECEIVED": kinds.INPUT_RECEIVED,
                 "MESSAGE_RECEIVED": kinds.MESSAGE_RECEIVED, "STEP_STARTED": kinds.STEP_STARTED,
                 "TEST_RESULT": kinds.TEST_RESULT}
        return Response(f"window.THREADBOUND_KINDS = Object.freeze({json.dumps(known)});\n",
                        media_type="text/javascript; charset=utf-8", headers={"X-Content-Type-Options": "nosniff"})

    # -- routes -------------------------------------------------------------------

    async def healthz(self, request: Request) -> Response:
        try:
            report = await asyncio.wait_for(self.pool.ahealth(), 5)
        except Exception as exc:  # noqa: BLE001  -- any failure means "not healthy", said plainly
            return SafeJSON({"status": "unavailable", "error": f"the pool does not answer: {type(exc).__name__}"},
                                503)
        return SafeJSON({"status": "ok", "mode": report.get("mode")})

    async def openapi(self, request: Request) -> Response:
        self.who(request)
        return SafeJSON(document())

    async def metrics(self, request: Request) -> Response:
        self.who(request)
        try:
            text = await self.pool.ametrics_text()
        except Exception as exc:  # noqa: BLE001  -- e.g. AttributeError: a supervisor without metrics
            raise Problem(503, f"metrics are not available from this pool ({type(exc).__name__}: {exc})"[:300],
                          None, "unavailable") from None
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")


def server_config(app: Starlette, host: str, port: int, settings: GatewaySettings | None = None,
                  **options: Any) -> Any:
    """The ``uvicorn.Config`` the gateway is served with (``options``: TLS, log level, ...):
    asyncio, h11 with the connection limits of ``settings`` (header, body and idle timeouts,
    a cap per client address and for the whole server, bounded headers: see
    :mod:`.guard`), the sans-I/O WebSocket implementation, and no client message over
    ``WS_MAX_BYTES`` (the only one a client sends is ``{"cancel": true}``)."""
    import uvicorn

    from .guard import guarded_http

    s = settings or GatewaySettings()
    return uvicorn.Config(app, host=host, port=port, loop="asyncio", ws="websockets-sansio", lifespan="off",
                          ws_max_size=WS_MAX_BYTES,
                          http=guarded_http(s.header_timeout_s, s.max_connections_per_client, s.body_timeout_s),
                          timeout_keep_alive=s.idle_timeout_s, limit_concurrency=s.max_connections,
                          h11_max_incomplete_event_size=s.max_header_bytes, **options)


def create_app(pool: Any, tokens: Tokens, settings: GatewaySettings | None = None) -> Starlette:
    """The gateway's ASGI app for ``pool`` (an ``AgentPool``), accepting ``tokens``."""
    return Gateway(pool, tokens, settings).app
