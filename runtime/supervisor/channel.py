"""One event stream per agent actor hosting several agents (``agents_per_actor`` > 1).

With one agent per actor each step is its own streaming call (``run_step``): every flush
of its tokens is one Ray message. With k agents per actor that would be k messages per
flush interval; instead the actor keeps one long-lived streaming call, ``events``, that
sends the pending events of all its agents' steps together, one message per flush, and a
step is started with a short ``start_step`` call (named ``<role>/<task id>``, as the
dashboard shows it). :class:`ActorChannel` reads that stream on the supervisor's loop and
hands each step's batches to the attempt that listens for it (by the step's idempotency
key), in the order the actor sent them. When the actor dies the stream breaks, and every
listener hears the same Ray error a step's own stream would have raised.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from ray.exceptions import ActorDiedError, RayError

from threadbound.agents.host import ERROR, INTERRUPT, RESULT

log = logging.getLogger("threadbound.channel")

_ENDS = (RESULT, ERROR, INTERRUPT)


class _Ready:
    """An already-received batch, awaitable like the ObjectRef a step's stream gives."""

    __slots__ = ("batch",)

    def __init__(self, batch: list[tuple[str, Any]]) -> None:
        self.batch = batch

    def __await__(self):
        if False:  # pragma: no cover  (a generator: awaiting it takes no loop turn)
            yield
        return self.batch


class Listener:
    """One step's share of its actor's stream: ``await listener.__anext__()`` gives an
    awaitable batch, as a step's own ObjectRefGenerator does."""

    def __init__(self, channel: "ActorChannel", key: str) -> None:
        self.channel, self.key = channel, key
        self.queue: asyncio.Queue = asyncio.Queue()
        self.ended = False

    def __aiter__(self) -> "Listener":
        return self

    async def __anext__(self) -> _Ready:
        if self.ended:
            raise StopAsyncIteration
        item = await self.queue.get()
        if isinstance(item, BaseException):
            self.close()
            raise item
        if any(kind in _ENDS for kind, _ in item):
            self.close()
        return _Ready(item)

    def close(self) -> None:
        self.ended = True
        if self.channel.listeners.get(self.key) is self:
            del self.channel.listeners[self.key]


class ActorChannel:
    """Reads one actor's ``events`` stream and routes its batches to the listening steps."""

    def __init__(self, handle: Any, name: str) -> None:
        self.handle, self.name = handle, name
        self.listeners: dict[str, Listener] = {}
        self.messages = 0  # messages received (each carries the batches of several steps)
        self.error: BaseException | None = None
        self.task = asyncio.get_running_loop().create_task(self._pump(), name=f"threadbound/{name}/events")

    def listen(self, key: str) -> Listener:
        """Register a step's listener: call before starting the step."""
        listener = Listener(self, key)
        if self.error is not None:
            listener.queue.put_nowait(self.error)
        else:
            self.listeners[key] = listener
        return listener

    def start(self, req: Any, name: str) -> Listener:
        """Listen for the step, then start it on the actor."""
        listener = self.listen(req.idempotency_key)
        self.handle.start_step.options(name=name).remote(req)
        return listener

    async def _pump(self) -> None:
        error: BaseException
        try:
            stream = self.handle.events.options(name=f"{self.name}/events").remote()
            async for ref in stream:
                self.messages += 1
                for key, batch in await ref:
                    listener = self.listeners.get(key)
                    if listener is not None:  # else: a step no one waits for any more (it was given up)
                        listener.queue.put_nowait(batch)
            error = ActorDiedError()  # the stream ended: only a dead actor ends it
        except asyncio.CancelledError:
            error = ActorDiedError()
            self._fail(error)
            raise
        except RayError as exc:
            error = exc
        except Exception as exc:  # never leave a step waiting on a stream that is gone
            log.exception("the event stream of %s failed", self.name)
            error = ActorDiedError()
            error.__cause__ = exc
        self._fail(error)

    def _fail(self, error: BaseException) -> None:
        self.error = error
        for listener in list(self.listeners.values()):
            listener.queue.put_nowait(error)
        self.listeners.clear()

    def close(self) -> None:
        """The actor is being replaced: stop reading; steps still listening hear it died."""
        if not self.task.done():
            self.task.cancel()
        self._fail(self.error or ActorDiedError())
