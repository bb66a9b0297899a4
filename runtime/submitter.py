"""Submitting in bursts: the tasks one event loop submits to one pool in the same turn go
in one ``submit_many`` call (see :func:`.client.submit`, which finds the loop's submitter)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from .client import _Client

_SUBMIT_MAX = 256  # tasks per submit_many call


class _Submitter:
    """Sends the tasks one event loop submits to one pool in the same turn of the loop
    in one ``submit_many`` call (a burst of submits is one round trip and one write to
    disk, not one each). Tasks with an idempotency key go in calls of their own: only
    those may be sent again across a supervisor restart. It lives while it has tasks to
    send (a later pool of the same name gets a new one, never an old handle)."""

    def __init__(self, client: _Client, on_idle: Callable[["_Submitter"], None]) -> None:
        self.client = client
        self.pending: list[tuple[Any, asyncio.Future]] = []
        self.sending: set[asyncio.Task] = set()
        self._on_idle = on_idle

    def submit(self, task: Any) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        if not self.pending:
            loop.call_soon(self._flush, loop)
        self.pending.append((task, fut))
        return fut

    def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        batch, self.pending = self.pending, []
        for retry in (True, False):
            group = [p for p in batch if (p[0].idempotency_key is not None) is retry]
            for i in range(0, len(group), _SUBMIT_MAX):
                send = loop.create_task(self._send(group[i:i + _SUBMIT_MAX], retry))
                self.sending.add(send)
                send.add_done_callback(self._sent)

    def _sent(self, send: asyncio.Task) -> None:
        self.sending.discard(send)
        if not self.sending and not self.pending:
            self._on_idle(self)

    async def _send(self, group: list[tuple[Any, asyncio.Future]], retry: bool) -> None:
        try:
            answers = await self.client.call("submit_many", [task for task, _ in group], retry=retry)
        except BaseException as exc:  # (cancelled too: the loop is closing) every caller learns it
            for _, fut in group:
                if not fut.done():
                    fut.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        for (_, fut), answer in zip(group, answers):
            if fut.done():
                continue  # its caller stopped waiting
            if isinstance(answer, BaseException):
                fut.set_exception(answer)
            else:
                fut.set_result(tuple(answer))
