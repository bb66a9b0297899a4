"""The Python client of the HTTP gateway (``threadbound.client``): submit, follow,
result, cancel, and a person's part (respond, approve, reject, send), as ``AsyncGatewayClient`` (asyncio, httpx) and ``GatewayClient`` (the
same coroutines run on a private event loop thread).

``follow`` reads the task's Server-Sent Events; when the connection breaks (a network
drop, a gateway restart) it reconnects with exponential backoff and jitter, sending
``Last-Event-ID`` = the last offset it yielded, so every event comes exactly once.
It imports neither Ray nor the pool: a machine without Ray can use it.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import threading
import time
from dataclasses import asdict, is_dataclass
from typing import Any, AsyncIterator, Coroutine, Iterator, TypeVar

import httpx

from threadbound.agents.errors import ThreadboundError

from ..errors import InputNotExpected, InvalidInput, InvalidTask, PoolClosed, ResultTimeout, TaskNotFound
from ..task import Event, TaskResult, result_or_raise

_T = TypeVar("_T")


class GatewayError(ThreadboundError):
    """The gateway answered with an error (``status``, ``message``) or cannot be reached."""

    def __init__(self, message: str, status: int | None = None, **fields: Any) -> None:
        super().__init__(message, **fields)
        self.status = status


def _raise_for(resp: httpx.Response, task_id: str | None = None) -> None:
    """Our own errors back from an error answer: InvalidTask or InvalidInput (422),
    TaskNotFound (404), InputNotExpected (409), PoolClosed (503), else GatewayError."""
    if resp.status_code < 400:
        return
    try:
        err = resp.json()["error"]
        message, field = str(err["message"]), err.get("field")
    except (ValueError, KeyError, TypeError):
        message, field = resp.text[:300] or resp.reason_phrase, None
    if resp.status_code == 422 and field and "InvalidInput" in resp.text:
        raise InvalidInput(field, message.removeprefix(f"invalid {field}: "), task_id=task_id)
    if resp.status_code == 422 and field:
        raise InvalidTask(field, message.removeprefix(f"invalid task: {field}: "))
    if resp.status_code == 409:
        raise InputNotExpected(message, task_id=task_id)
    if resp.status_code == 404:
        raise TaskNotFound(message, task_id=task_id)
    if resp.status_code == 503 and "PoolClosed" in resp.text:
        raise PoolClosed(message)
    raise GatewayError(f"{resp.request.method} {resp.request.url.path}: {resp.status_code} {message}",
                       resp.status_code)


def _task_body(task: Any) -> dict[str, Any]:
    if is_dataclass(task):
        body = asdict(task)
    elif isinstance(task, dict):
        body = dict(task)
    else:
        raise TypeError(f"task must be a Task or a dict of its fields, got {type(task).__name__}")
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in body.items()
            if not (k not in ("goal",) and v is None)}




class AsyncGatewayClient:
    """A client of one gateway for asyncio code.

    Args:
        url: the gateway, e.g. ``http://127.0.0.1:8420``.
        token: a bearer token; default ``THREADBOUND_GATEWAY_TOKEN``.
        max_backoff_s: the longest pause between two reconnects of ``follow``.
        give_up_s: how long ``follow`` keeps reconnecting without getting anything.

    Examples:
        >>> async with AsyncGatewayClient("http://127.0.0.1:8420", token) as gw:   # doctest: +SKIP
        ...     task_id = (await gw.submit({"goal": "fix it", "agents": ["coder"]}))["task_id"]
        ...     async for event in gw.follow(task_id):
        ...         print(event.offset, event.kind)
        ...     print((await gw.result(task_id)).status)
    """

    def __init__(self, url: str, token: str | None = None, *, timeout_s: float = 30.0,
                 max_backoff_s: float = 5.0, give_up_s: float = 120.0) -> None:
        token = token if token is not None else os.environ.get("THREADBOUND_GATEWAY_TOKEN")
        if not token:
            raise GatewayError("no token: pass token= or set THREADBOUND_GATEWAY_TOKEN")
        self.url = url.rstrip("/")
        self.max_backoff_s = max_backoff_s
        self.give_up_s = give_up_s
        self._headers = {"Authorization": f"Bearer {token}"}
        self._timeout = httpx.Timeout(timeout_s, read=None)
        self._http: httpx.AsyncClient | None = None

    @property
    def http(self) -> httpx.AsyncClient:
        if self._http is None:
            self._http = httpx.AsyncClient(base_url=self.url, headers=self._headers, timeout=self._timeout,
                                           limits=httpx.Limits(max_connections=None, max_keepalive_connections=20))
        return self._http

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    async def __aenter__(self) -> "AsyncGatewayClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    async def _send(self, method: str, path: str, task_id: str | None = None, **kw: Any) -> httpx.Response:
        try:
            resp = await self.http.request(method, path, **kw)
        except httpx.TransportError as exc:
            raise GatewayError(f"{method} {self.url}{path}: {type(exc).__name__}: {exc}") from None
        _raise_for(resp, task_id)
        return resp

    async def submit(self, task: Any, idempotency_key: str | None = None) -> dict[str, Any]:
        """Submit a :class:`Task` (or a dict of its fields); returns ``{"task_id", "status",
        "created"}``. With ``idempotency_key``, a retried submit returns the same task."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return (await self._send("POST", "/v1/tasks", json=_task_body(task), headers=headers)).json()

    async def task(self, task_id: str) -> dict[str, Any]:
        """The task's summary (and ``result``, null until it has ended)."""
        return (await self._send("GET", f"/v1/tasks/{task_id}", task_id)).json()

    async def tasks(self, status: str | None = None) -> list[dict[str, Any]]:
        """Every task's summary, oldest first (all pages), optionally of some statuses."""
        rows: list[dict[str, Any]] = []
        params: dict[str, Any] = {"limit": 500, **({"status": status} if status else {})}
        while True:
            page = (await self._send("GET", "/v1/tasks", params=params)).json()
            rows += page["tasks"]
            if not page["next"]:
                return rows
            params["after"] = page["next"]

    async def cancel(self, task_id: str) -> str:
        """Cancel the task (idempotent); returns its status after the cancel."""
        return (await self._send("POST", f"/v1/tasks/{task_id}/cancel", task_id)).json()["status"]

    async def respond(self, task_id: str, value: Any, request: int | None = None) -> int:
        """Answer the task's question; returns the offset of its ``input_received`` event."""
        body = {"value": value, **({"request": request} if request is not None else {})}
        return (await self._send("POST", f"/v1/tasks/{task_id}/respond", task_id, json=body)).json()["offset"]

    async def approve(self, task_id: str, request: int | None = None) -> int:
        body = {"request": request} if request is not None else {}
        return (await self._send("POST", f"/v1/tasks/{task_id}/approve", task_id, json=body)).json()["offset"]

    async def reject(self, task_id: str, reason: str = "", request: int | None = None) -> int:
        body = {"reason": reason, **({"request": request} if request is not None else {})}
        return (await self._send("POST", f"/v1/tasks/{task_id}/reject", task_id, json=body)).json()["offset"]

    async def send(self, task_id: str, message: Any) -> int:
        """Send input to the task; returns the offset of its ``message_received`` event."""
        return (await self._send("POST", f"/v1/tasks/{task_id}/messages", task_id,
                                 json={"message": message})).json()["offset"]

    async def result(self, task_id: str, timeout: float | None = None) -> TaskResult:
        """Wait for the task to end; its :class:`TaskResult`, or TaskFailed / TaskTimedOut /
        TaskCancelled as in Python, or ResultTimeout after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            wait = 30.0 if deadline is None else max(0.0, min(30.0, deadline - time.monotonic()))
            d = (await self._send("GET", f"/v1/tasks/{task_id}", task_id, params={"wait": wait})).json()
            if d["result"] is not None:
                return result_or_raise(d["result"])
            if deadline is not None and time.monotonic() >= deadline:
                raise ResultTimeout(f"task {task_id} did not finish within {timeout}s; it is still running",
                                    task_id=task_id, limit=timeout)

    async def follow(self, task_id: str, after: int = -1) -> AsyncIterator[Event]:
        """Every event after offset ``after`` to the terminal one, each exactly once,
        reconnecting (with backoff) and resuming where a broken connection stopped."""
        last = after
        failures = 0
        quiet_since = time.monotonic()
        while True:
            try:
                headers = {"Last-Event-ID": str(last), "Accept": "text/event-stream"}
                async with self.http.stream("GET", f"/v1/tasks/{task_id}/events", headers=headers) as resp:
                    if resp.status_code >= 500 or resp.status_code == 429:
                        await resp.aread()
                        raise _Retry(resp.headers.get("retry-after"))
                    if resp.status_code >= 400:
                        await resp.aread()
                        _raise_for(resp, task_id)
                    async for ev in _sse_events(task_id, resp):
                        if ev.offset <= last:
                            continue  # cannot happen with a correct gateway; never yield twice
                        last = ev.offset
                        failures, quiet_since = 0, time.monotonic()
                        yield ev
                        if ev.terminal:
                            return
            except (httpx.TransportError, _Retry) as exc:
                wait = exc.after if isinstance(exc, _Retry) and exc.after else None
            else:
                wait = None  # ended without the terminal event: reconnect
            if time.monotonic() - quiet_since > self.give_up_s:
                raise GatewayError(f"following task {task_id}: nothing from {self.url} for {self.give_up_s:g}s "
                                   f"(last offset {last}); follow again with after={last}")
            failures += 1
            backoff = min(self.max_backoff_s, 0.1 * 2 ** min(failures - 1, 10))
            await asyncio.sleep(wait if wait is not None else backoff * random.uniform(0.5, 1.0))


class _Retry(Exception):
    def __init__(self, after: str | None) -> None:
        super().__init__(after)
        self.after = float(after) if after and after.isdigit() else None


async def _sse_events(task_id: str, resp: httpx.Response) -> AsyncIterator[Event]:
    """Events of an SSE response (``event: error`` frames raise)."""
    kind, data = None, []
    async for line in resp.aiter_lines():
        if line == "":
            if data:
                payload = json.loads("\n".join(data))
                if kind == "error":
                    raise _Retry(None)  # the gateway lost the pool for a moment: reconnect
                yield Event(task_id=task_id, offset=payload["offset"], kind=payload["kind"],
                            agent=payload["agent"], data=payload["data"], ts=payload["ts"])
            kind, data = None, []
        elif line.startswith(":"):
            continue
        else:
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "event":
                kind = value
            elif name == "data":
                data.append(value)


# -- the sync client: the same coroutines on a private loop -----------------------------

_loop_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None
_loop_pid: int | None = None


def _run(coro: Coroutine[Any, Any, _T]) -> _T:
    global _loop, _loop_pid
    with _loop_lock:
        if _loop is None or _loop_pid != os.getpid():
            _loop = asyncio.new_event_loop()
            threading.Thread(target=_loop.run_forever, name="threadbound-gateway-client", daemon=True).start()
            _loop_pid = os.getpid()
    future = asyncio.run_coroutine_threadsafe(coro, _loop)
    try:
        return future.result()
    except BaseException:
        future.cancel()
        raise


class GatewayClient:
    """``AsyncGatewayClient`` for code without asyncio: the same methods, blocking.

    Examples:
        >>> gw = GatewayClient("http://127.0.0.1:8420", token)                 # doctest: +SKIP
        >>> task_id = gw.submit({"goal": "fix it", "agents": ["coder"]})["task_id"]  # doctest: +SKIP
        >>> for event in gw.follow(task_id):                                  # doctest: +SKIP
        ...     print(event.offset, event.kind)
        >>> gw.result(task_id).status                                        # doctest: +SKIP
        'succeeded'
    """

    def __init__(self, url: str, token: str | None = None, **options: Any) -> None:
        self.aio = AsyncGatewayClient(url, token, **options)

    def close(self) -> None:
        _run(self.aio.aclose())

    def __enter__(self) -> "GatewayClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def submit(self, task: Any, idempotency_key: str | None = None) -> dict[str, Any]:
        return _run(self.aio.submit(task, idempotency_key))

    def task(self, task_id: str) -> dict[str, Any]:
        return _run(self.aio.task(task_id))

    def tasks(self, status: str | None = None) -> list[dict[str, Any]]:
        return _run(self.aio.tasks(status))

    def cancel(self, task_id: str) -> str:
        return _run(self.aio.cancel(task_id))

    def result(self, task_id: str, timeout: float | None = None) -> TaskResult:
        return _run(self.aio.result(task_id, timeout))

    def respond(self, task_id: str, value: Any, request: int | None = None) -> int:
        return _run(self.aio.respond(task_id, value, request))

    def approve(self, task_id: str, request: int | None = None) -> int:
        return _run(self.aio.approve(task_id, request))

    def reject(self, task_id: str, reason: str = "", request: int | None = None) -> int:
        return _run(self.aio.reject(task_id, reason, request))

    def send(self, task_id: str, message: Any) -> int:
        return _run(self.aio.send(task_id, message))

    def follow(self, task_id: str, after: int = -1) -> Iterator[Event]:
        events = self.aio.follow(task_id, after).__aiter__()
        try:
            while True:
                try:
                    yield _run(events.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            try:
                _run(events.aclose())
            except RuntimeError:  # already running/closed
                pass
