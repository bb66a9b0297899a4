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
import contextlib
import dataclasses
import difflib
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from threadbound.agents.errors import ThreadboundError
from threadbound.agents.hostile_fs import SECRET_DIRS
from threadbound.agents import events as kinds
from threadbound.agents.events import STATUSES

from ..config import state_dir
from ..errors import InputNotExpected, InvalidInput, InvalidTask, PoolClosed, TaskNotFound
from ..task import Event, Task, TaskResult
from .auth import READ, SUBMIT, RateLimit, Token, Tokens
from .openapi import document


STATIC = os.path.join(os.path.dirname(__file__), "static")
TASK_FIELDS = tuple(f.name for f in dataclasses.fields(Task))
WS_PROTOCOL = "threadbound.v1"  # the subprotocol a WebSocket client offers ...
WS_BEARER = "bearer."  # ... with "bearer.<token>" when it cannot send an Authorization header
MAX_WAIT_S = 60.0  # longest GET /v1/tasks/{id}?wait=S holds a request
MAX_PAGE = 500
MAX_PAGE_BYTES = 256 * 1024  # a page of GET /v1/tasks ends past this many bytes (its `next` goes on)
PREVIEW_CHARS = 500  # of a goal or an error, in a page of GET /v1/tasks
CLOSE_NORMAL, CLOSE_UNAUTHORIZED, CLOSE_NOT_FOUND, CLOSE_BAD_REQUEST = 1000, 4401, 4404, 4400
WS_MAX_BYTES = 4096  # the largest message a WebSocket client may send (its only one is {"cancel": true})
CLOSE_TRY_AGAIN = 1013
TEST_RESULT = "test_result"  # the built-in tester's own event (agents/builtin.py): counts, ok, summary


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
            after it opened (or after the first byte of its next request) is closed.
        idle_timeout_s: an idle keep-alive connection is closed after this long.
        max_connections: the whole gateway's open connections and streams; past it, 503.
        max_connections_per_client: one client address's open HTTP connections; past it a
            new one is closed at once (0: no cap).
        max_header_bytes: the largest request line and headers taken (431/400 past it).
    """

    max_body_bytes: int = 1 << 20
    rate_per_s: float = 20.0
    rate_burst: int = 100
    keepalive_s: float = 15.0
    workspace_roots: tuple[str, ...] = field(default_factory=tuple)
    protected: tuple[str, ...] = field(default_factory=tuple)
    header_timeout_s: float = 10.0
    idle_timeout_s: int = 5
    max_connections: int = 2048
    max_connections_per_client: int = 256
    max_header_bytes: int = 16_384


def protected_dirs(extra: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The real paths no workspace served over HTTP may be, lie in or contain."""
    home = os.path.expanduser("~")
    paths = (state_dir(), os.path.join(home, ".threadbound"), os.path.join(home, ".ray"),
             os.path.join(home, ".ssh"), *extra, home)
    real = (os.path.realpath(os.path.expanduser(p)) for p in paths if p and "://" not in p)
    return tuple(dict.fromkeys(p for p in real if p != "/"))


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


class Problem(Exception):
    """An HTTP error answer: status, a message that says what to do, the field it is about."""

    def __init__(self, status: int, message: str, field: str | None = None, type: str = "bad_request",
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.field, self.type = status, message, field, type
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        body = {"error": {"type": self.type, "message": self.message, "field": self.field}}
        return SafeJSON(body, self.status, headers={**self.headers, "Cache-Control": "no-store"})


def _from_error(exc: ThreadboundError) -> Problem:
    """Our own errors as HTTP answers, with the message Python gives."""
    if isinstance(exc, InvalidTask):
        return Problem(422, str(exc), exc.field, type(exc).__name__)
    if isinstance(exc, InvalidInput):
        return Problem(422, str(exc), exc.field, "InvalidInput")
    if isinstance(exc, InputNotExpected):  # not waiting, or answered already: the state, not the request, is wrong
        return Problem(409, str(exc), "request" if exc.request is not None else None, "InputNotExpected")
    if isinstance(exc, TaskNotFound):
        return Problem(404, str(exc), None, "TaskNotFound")
    if isinstance(exc, PoolClosed):
        return Problem(503, str(exc), None, "PoolClosed")
    return Problem(500, str(exc), None, type(exc).__name__)


def event_json(ev: Event) -> str:
    """The wire form of an event (SSE ``data:`` and WebSocket frames)."""
    return dumps({"offset": ev.offset, "kind": ev.kind, "agent": ev.agent, "data": ev.data, "ts": ev.ts})


def _sse_frame(ev: Event) -> bytes:
    kind = "".join(c for c in ev.kind if c not in "\r\n")  # one line, whatever an agent named it
    return f"id: {ev.offset}\nevent: {kind}\ndata: {event_json(ev)}\n\n".encode()


_INT = re.compile(r"-?[0-9]{1,18}")  # ASCII digits only: str.isdigit() passes "²", int() then fails


def _int_param(text: str, name: str, lowest: int, highest: int = 10**18) -> int:
    """``text`` as an integer from ``lowest`` to ``highest``, or a 400 naming ``name``."""
    if not _INT.fullmatch(text):
        raise Problem(400, f"{name}: must be an integer >= {lowest}, got {text[:40]!r}", name)
    value = int(text)
    if not lowest <= value <= highest:
        raise Problem(400, f"{name}: must be an integer from {lowest} to {highest}, got {value}", name)
    return value


def _finite(value: Any, depth: int = 0) -> Any:
    """``value`` with every float that is not finite as None, for JSON (which has no
    Infinity or NaN; a browser's JSON.parse refuses them)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if depth > 100:
        return str(value)[:200]
    if isinstance(value, dict):
        return {k: _finite(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v, depth + 1) for v in value]
    return value


def dumps(value: Any) -> str:
    """Strict JSON of ``value`` (what is not JSON becomes its text; no Infinity or NaN)."""
    try:
        return json.dumps(value, default=str, separators=(",", ":"), allow_nan=False)
    except ValueError:
        return json.dumps(_finite(value), default=str, separators=(",", ":"), allow_nan=False)


class SafeJSON(JSONResponse):
    """A JSON answer that is always strict JSON (Starlette's raises on a float that is not finite)."""

    def render(self, content: Any) -> bytes:
        return dumps(content).encode("utf-8")


class Gateway:
    """The app and what it holds: the pool client, the tokens, the limits.

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
                 "TEST_RESULT": TEST_RESULT}
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

    async def submit(self, request: Request) -> Response:
        self.who(request, SUBMIT)
        body = await self._json_body(request)
        task = self._task(body, request.headers.get("idempotency-key"))
        try:
            handle = await self.pool.asubmit(task)
        except ThreadboundError as exc:
            raise _from_error(exc) from None
        summary = await self.answer(self.pool.asummary(handle.task_id))
        return SafeJSON({"task_id": handle.task_id, "status": summary.status, "created": handle.created},
                            201 if handle.created else 200,
                            headers={"Location": f"/v1/tasks/{handle.task_id}", "Cache-Control": "no-store"})

    async def _json_body(self, request: Request, empty: Any = None) -> Any:
        """The request's JSON body; ``empty`` (when not None) stands for a body with nothing in it."""
        limit = self.settings.max_body_bytes
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            raise Problem(413, f"body: larger than this gateway accepts ({limit} bytes)", "body", "too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise Problem(413, f"body: larger than this gateway accepts ({limit} bytes)", "body", "too_large")
            chunks.append(chunk)
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

    def _task(self, body: Any, key: str | None) -> Task:
        """The JSON body as a :class:`Task`; field types checked here, the rest by
        ``Task.validated`` in ``asubmit`` (same messages as in Python)."""
        if not isinstance(body, dict):
            raise Problem(422, "invalid task: body: must be a JSON object of the task's fields, e.g. "
                               '{"goal": "make the tests pass", "agents": ["coder"]}', "body", "InvalidTask")
        for name in body:
            if name not in TASK_FIELDS:
                near = difflib.get_close_matches(name, TASK_FIELDS, 1)
                hint = f"; did you mean {near[0]!r}?" if near else f"; known fields: {', '.join(TASK_FIELDS)}"
                raise _from_error(InvalidTask(str(name)[:80], "is not a field of a task" + hint))
        if key is not None:
            if body.get("idempotency_key") not in (None, key):
                raise _from_error(InvalidTask("idempotency_key", "the Idempotency-Key header and the body's "
                                                                 "idempotency_key differ; send one of them"))
            body = {**body, "idempotency_key": key}
        if "goal" not in body:
            raise _from_error(InvalidTask("goal", "must be a non-empty string saying what to achieve"))
        ws = body.get("workspace")
        if ws is not None:
            body = {**body, "workspace": self._workspace(ws)}
        agents = body.get("agents")
        if agents is not None and not isinstance(agents, (str, list)):
            raise _from_error(InvalidTask("agents", f"must be a list of role names, got {type(agents).__name__}"))
        try:
            return Task(**body)
        except (TypeError, ValueError) as exc:
            raise Problem(422, f"invalid task: {exc}", None, "InvalidTask") from None

    def _workspace(self, ws: Any) -> str:
        if not isinstance(ws, str) or not ws or "\0" in ws:
            raise _from_error(InvalidTask("workspace", f"must be a directory path or null, got {ws!r:.80}"))
        if not self.roots:
            raise _from_error(InvalidTask("workspace", "this gateway serves no workspace directories; start it "
                                                       "with --workspace-root DIR to allow some"))
        path = os.path.realpath(os.path.join(self.roots[0], ws))
        if not any(_within(path, root) for root in self.roots):
            raise _from_error(InvalidTask("workspace", f"{ws!r} is outside the directories this gateway serves "
                                                       f"({', '.join(self.roots)})"))
        if path in self.roots:
            raise _from_error(InvalidTask("workspace", f"{ws!r} is the served directory itself; name a project "
                                                       "directory under it"))
        root = next(r for r in self.roots if _within(path, r))
        secret_dir = next((p for p in os.path.relpath(path, root).split(os.sep) if p in SECRET_DIRS), None)
        if secret_dir:
            raise _from_error(InvalidTask("workspace", f"{ws!r} lies in a {secret_dir} directory, which holds "
                                                       "secrets; name a project directory"))
        for secret in self.protected:
            if _within(path, secret) or _within(secret, path):
                raise _from_error(InvalidTask("workspace", f"{ws!r} is, lies in or contains {secret}, which holds "
                                                           "secrets of the pool's user; name a project directory"))
        return path

    async def list_tasks(self, request: Request) -> Response:
        self.who(request)
        q = request.query_params
        statuses = None
        if q.get("status"):
            statuses = set(q["status"].split(","))
            bad = sorted(statuses - set(STATUSES))
            if bad:
                raise Problem(400, f"status: unknown status {bad[0][:40]!r}; one or more of {', '.join(STATUSES)}, "
                                   "comma-separated", "status")
        limit = _int_param(q["limit"], "limit", 1, MAX_PAGE) if "limit" in q else 50
        rows = [t for t in await self.answer(self.pool.atasks()) if statuses is None or t.status in statuses]
        if q.get("after"):
            ids = [t.task_id for t in rows]
            if q["after"] not in ids:
                raise Problem(400, f"after: no task {q['after'][:80]!r} among these (forgotten, or another "
                                   "status); start from the first page", "after")
            rows = rows[ids.index(q["after"]) + 1:]
        # Bounded by bytes as well as by count: each goal and error is cut to a preview
        # (GET /v1/tasks/{id} has them whole), and a page ends at MAX_PAGE_BYTES with a cursor.
        page, size = [], 0
        for t in rows[:limit]:
            row = _summary(t, preview=True)
            size += len(dumps(row))
            if page and size > MAX_PAGE_BYTES:
                break
            page.append(row)
        more = len(rows) > len(page)
        return SafeJSON({"tasks": page, "next": page[-1]["task_id"] if more else None},
                        headers={"Cache-Control": "no-store"})

    async def get_task(self, request: Request) -> Response:
        self.who(request)
        task_id = request.path_params["task_id"]
        wait = 0.0
        if "wait" in request.query_params:
            text = request.query_params["wait"]
            try:
                wait = float(text)
            except ValueError:
                wait = -1.0
            if not 0 <= wait <= MAX_WAIT_S:  # also NaN
                raise Problem(400, f"wait: seconds from 0 to {MAX_WAIT_S:g}, got {text[:40]!r}", "wait")
        result = await self.answer(self.pool.await_result(task_id, wait))
        summary = await self.answer(self.pool.asummary(task_id))  # after the wait: its status is the result's
        return SafeJSON({**_summary(summary), "result": _result(result)},
                            headers={"Cache-Control": "no-store"})

    async def cancel(self, request: Request) -> Response:
        self.who(request, SUBMIT)
        task_id = request.path_params["task_id"]
        status = await self.answer(self.pool.acancel(task_id))
        return SafeJSON({"task_id": task_id, "status": status}, 202, headers={"Cache-Control": "no-store"})

    # -- a person in the loop ---------------------------------------------------------

    async def _input_body(self, request: Request, allowed: dict[str, bool]) -> dict[str, Any]:
        """A JSON object with only the ``allowed`` fields (name -> required); an empty body
        (no body at all, or only white space) is {}: approve and reject with no reason."""
        body = await self._json_body(request, empty={})
        if not isinstance(body, dict):
            raise Problem(422, f"body: must be a JSON object with {', '.join(allowed)}", "body", "InvalidInput")
        for name in body:
            if name not in allowed:
                raise Problem(422, f"{str(name)[:40]}: not a field here; the fields are {', '.join(allowed)}",
                              str(name)[:40], "InvalidInput")
        for name, required in allowed.items():
            if required and name not in body:
                raise Problem(422, f"{name}: missing", name, "InvalidInput")
        req = body.get("request")
        if req is not None and (isinstance(req, bool) or not isinstance(req, int) or req < 1):
            raise Problem(422, f"request: must be a request number (1, 2, ...) or null, got {req!r:.40}",
                          "request", "InvalidInput")
        return body

    async def _answer(self, request: Request, value: Any, req: int | None, what: str) -> Response:
        task_id = request.path_params["task_id"]
        # Through the task's handle: an answer is not sent twice across a supervisor restart.
        offset = await self.answer(self.pool.handle(task_id).arespond(value, req))
        return SafeJSON({"task_id": task_id, "offset": offset, "answer": what},
                            headers={"Cache-Control": "no-store"})

    async def respond(self, request: Request) -> Response:
        """Answer the task's open question (``value``, for request ``request`` when several are open)."""
        self.who(request, SUBMIT)
        body = await self._input_body(request, {"value": True, "request": False})
        return await self._answer(request, body["value"], body.get("request"), "respond")

    async def approve(self, request: Request) -> Response:
        self.who(request, SUBMIT)
        body = await self._input_body(request, {"request": False})
        return await self._answer(request, {"approve": True}, body.get("request"), "approve")

    async def reject(self, request: Request) -> Response:
        self.who(request, SUBMIT)
        body = await self._input_body(request, {"reason": False, "request": False})
        reason = body.get("reason") or ""
        if not isinstance(reason, str):
            raise Problem(422, "reason: must be a text", "reason", "InvalidInput")
        return await self._answer(request, {"approve": False, "reason": reason}, body.get("request"), "reject")

    async def send(self, request: Request) -> Response:
        """Append ``message`` to the task's inbox; its agents' later steps see it."""
        self.who(request, SUBMIT)
        body = await self._input_body(request, {"message": True})
        task_id = request.path_params["task_id"]
        offset = await self.answer(self.pool.handle(task_id).asend(body["message"]))  # (not sent twice either)
        return SafeJSON({"task_id": task_id, "offset": offset}, 202, headers={"Cache-Control": "no-store"})

    async def _start(self, task_id: str, after_text: str | None, name: str) -> int:
        """The offset a stream starts at, from ``after`` (the last offset the client has,
        -1 for none); 404 for an unknown task, 400 for an offset it cannot have seen."""
        summary = await self.answer(self.pool.asummary(task_id))
        after = -1 if after_text in (None, "") else _int_param(after_text.strip(), name, -1)
        if after >= summary.events:
            raise Problem(400, f"{name}: {after} is past the task's last event (offset {summary.events - 1}); "
                               "resume from an offset this task has sent", name)
        return after + 1

    async def events(self, request: Request) -> Response:
        self.who(request)
        task_id = request.path_params["task_id"]
        last = request.headers.get("last-event-id")
        # Last-Event-ID is what a reconnecting EventSource sends: it wins over ?after=
        start = await (self._start(task_id, last, "Last-Event-ID") if last is not None
                       else self._start(task_id, request.query_params.get("after"), "after"))
        return StreamingResponse(self._sse(task_id, start), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    async def _follow(self, task_id: str, start: int) -> AsyncIterator[Event | None]:
        """The task's events from ``start`` to the terminal one; None when idle for
        ``keepalive_s`` (time for a keep-alive)."""
        events = self.pool.handle(task_id).astream(start).__aiter__()
        pending: asyncio.Future | None = None
        try:
            while True:
                if pending is None:
                    pending = asyncio.ensure_future(events.__anext__())
                done, _ = await asyncio.wait({pending}, timeout=self.settings.keepalive_s)
                if not done:
                    yield None
                    continue
                try:
                    ev = pending.result()
                except StopAsyncIteration:
                    return
                finally:
                    if pending.done():
                        pending = None
                yield ev
                if ev.terminal:
                    return
        finally:
            if pending is not None:
                pending.cancel()
                with contextlib.suppress(BaseException):
                    await pending
            with contextlib.suppress(BaseException):
                await events.aclose()

    async def _sse(self, task_id: str, start: int) -> AsyncIterator[bytes]:
        yield b"retry: 1000\n\n"
        try:
            async for ev in self._follow(task_id, start):
                yield b": keep-alive\n\n" if ev is None else _sse_frame(ev)
        except ThreadboundError as exc:  # e.g. the pool went away: say so, the client reconnects
            data = json.dumps({"type": type(exc).__name__, "message": str(exc)})
            yield f"event: error\ndata: {data}\n\n".encode()

    async def stream(self, websocket: WebSocket) -> None:
        offered = list(websocket.scope.get("subprotocols") or [])
        header = websocket.headers.get("authorization", "")
        scheme, _, presented = header.partition(" ")
        secret = presented.strip() if scheme.lower() == "bearer" else ""
        for proto in offered:
            if proto.startswith(WS_BEARER) and not secret:
                secret = proto[len(WS_BEARER):]
        await websocket.accept(subprotocol=WS_PROTOCOL if WS_PROTOCOL in offered else None)
        token = self.tokens.find(secret) if secret else None
        if token is None:
            await websocket.close(CLOSE_UNAUTHORIZED, "send Authorization: Bearer <token>, or offer the "
                                                      f"subprotocols {WS_PROTOCOL} and {WS_BEARER}<token>")
            return
        task_id = websocket.path_params["task_id"]
        try:
            self._allowed(token, READ)
            start = await self._start(task_id, websocket.query_params.get("after"), "after")
        except Problem as p:
            code = {404: CLOSE_NOT_FOUND, 429: CLOSE_TRY_AGAIN}.get(p.status, CLOSE_BAD_REQUEST)
            await websocket.close(code, p.message[:120])
            return
        sender = asyncio.ensure_future(self._ws_send(websocket, task_id, start))
        receiver = asyncio.ensure_future(self._ws_receive(websocket, task_id, token))
        try:
            await asyncio.wait({sender, receiver}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            receiver.cancel()
            if not sender.done():  # the client left first
                sender.cancel()
            for t in (sender, receiver):
                with contextlib.suppress(BaseException):
                    await t
        if sender.done() and not sender.cancelled() and sender.exception() is None:
            with contextlib.suppress(Exception):
                await websocket.close(CLOSE_NORMAL)

    async def _ws_send(self, websocket: WebSocket, task_id: str, start: int) -> None:
        try:
            async for ev in self._follow(task_id, start):
                if ev is not None:
                    await websocket.send_text(event_json(ev))
        except ThreadboundError as exc:
            with contextlib.suppress(Exception):
                await websocket.close(CLOSE_TRY_AGAIN, str(exc)[:120])
            raise

    async def _ws_receive(self, websocket: WebSocket, task_id: str, token: Token) -> None:
        """The client's messages: ``{"cancel": true}`` cancels the task (with a submit token)."""
        while True:
            try:
                text = await websocket.receive_text()
            except (WebSocketDisconnect, RuntimeError, KeyError):
                return
            try:
                msg = json.loads(text) if len(text) <= WS_MAX_BYTES else None
            except ValueError:
                msg = None
            try:
                if not isinstance(msg, dict) or msg.get("cancel") is not True:
                    self._allowed(token, READ)  # a stream of bad messages counts against the token's rate
                    raise Problem(400, 'message: the only message a client sends is {"cancel": true}', "message")
                self._allowed(token, SUBMIT)
                await self.answer(self.pool.acancel(task_id))
            except Problem as p:
                await websocket.send_text(json.dumps({"error": {"type": p.type, "field": p.field,
                                                                "message": p.message}}))


def _summary(t: Any, preview: bool = False) -> dict[str, Any]:
    """A task's summary as JSON; with ``preview`` (a page of the list) its goal and error
    are cut to PREVIEW_CHARS characters, and ``truncated`` says whether they were."""
    d = dataclasses.asdict(t)
    d["agents"] = list(d["agents"])
    if preview:
        cut = False
        for name in ("goal", "error"):
            text = d.get(name)
            if isinstance(text, str) and len(text) > PREVIEW_CHARS:
                d[name], cut = text[:PREVIEW_CHARS] + "…", True
        d["truncated"] = cut
    return d


def _result(r: TaskResult | None) -> dict[str, Any] | None:
    """A result's fields, its outputs as the agents gave them (``asdict`` would copy them
    deeply and turn a dataclass among them into a dict)."""
    return None if r is None else {f.name: getattr(r, f.name) for f in dataclasses.fields(r)}


def server_config(app: Starlette, host: str, port: int, settings: GatewaySettings | None = None,
                  **options: Any) -> Any:
    """The ``uvicorn.Config`` the gateway is served with (``options``: TLS, log level, ...):
    asyncio, h11 with the connection limits of ``settings`` (header and idle timeouts,
    a cap per client address and for the whole server, bounded headers: see
    :mod:`.guard`), the sans-I/O WebSocket implementation, and no client message over
    ``WS_MAX_BYTES`` (the only one a client sends is ``{"cancel": true}``)."""
    import uvicorn

    from .guard import guarded_http

    s = settings or GatewaySettings()
    return uvicorn.Config(app, host=host, port=port, loop="asyncio", ws="websockets-sansio", lifespan="off",
                          ws_max_size=WS_MAX_BYTES,
                          http=guarded_http(s.header_timeout_s, s.max_connections_per_client),
                          timeout_keep_alive=s.idle_timeout_s, limit_concurrency=s.max_connections,
                          h11_max_incomplete_event_size=s.max_header_bytes, **options)


def create_app(pool: Any, tokens: Tokens, settings: GatewaySettings | None = None) -> Starlette:
    """The gateway's ASGI app for ``pool`` (an ``AgentPool``), accepting ``tokens``."""
    return Gateway(pool, tokens, settings).app
