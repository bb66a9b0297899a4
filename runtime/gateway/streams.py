"""The gateway's event streams: SSE (``GET /v1/tasks/{id}/events``) and WebSocket
(``/v1/tasks/{id}/stream``), both resuming by offset, with keep-alives."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import AsyncIterator

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.websockets import WebSocket, WebSocketDisconnect

from threadbound.agents.errors import ThreadboundError

from ..task import Event
from .auth import READ, SUBMIT, Token
from .wire import Problem, _int_param, _sse_frame, event_json

WS_PROTOCOL = "threadbound.v1"  # the subprotocol a WebSocket client offers ...
WS_BEARER = "bearer."  # ... with "bearer.<token>" when it cannot send an Authorization header
CLOSE_NORMAL, CLOSE_UNAUTHORIZED, CLOSE_NOT_FOUND, CLOSE_BAD_REQUEST = 1000, 4401, 4404, 4400
WS_MAX_BYTES = 4096  # the largest message a WebSocket client may send (its only one is {"cancel": true})
CLOSE_TRY_AGAIN = 1013


class StreamRoutes:
    """The stream routes of :class:`~.app.Gateway` (a mixin: ``self`` is the gateway)."""

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
