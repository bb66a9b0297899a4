"""The gateway's wire: HTTP error answers (:class:`Problem`, and our own errors as
answers), strict JSON (no Infinity or NaN), the wire form of an event, and the
range check of an integer a client sends."""

from __future__ import annotations

import json
import math
import re
from typing import Any

from starlette.responses import JSONResponse

from threadbound.agents.errors import ThreadboundError

from ..errors import InputNotExpected, InvalidInput, InvalidTask, PoolClosed, TaskNotFound
from ..task import Event


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
