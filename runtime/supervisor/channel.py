"""One event stream per agent actor, and a step's first batch in its start call's reply.

A step is started with a plain ``start_step`` call (named ``<role>/<task id>``, as the
dashboard shows it); its request, its reply and each stream message cross as bytes
(:mod:`threadbound.agents.wire`). On an actor of one agent its reply is the step's first
batch: its first tokens or event, or the whole step, outcome included, when it ends that
soon. What follows goes on the actor's one long-lived streaming call, ``events``, which
sends the pending events of all its agents' steps together, one message per flush. So a short step
costs one Ray call and no stream message (a streaming call per step costs about twice a
plain call in Ray's own CPU on both sides, even for one item; see ``scripts/bench.py
--speed``), and k agents on one actor cost one message per flush, not k. On an actor of
several agents the reply is empty and all of a step's batches come on the stream: there a
reply per step would add a message per step, and hold the step's stream batches for it
(measured: 1,000 agents on 20 actors started their steps seconds later).

:class:`ActorChannel` reads that stream on the supervisor's loop and hands each step's
batches to the attempt that listens for it (by the step's idempotency key), the reply's
batch first, then the stream's in the order the actor sent them. When the actor dies the
stream breaks and the reply fails, and every listener hears the Ray error.

A listener is either queued (``await listener.__anext__()`` gives the next batch, as a
step's own stream does) or direct: its step's attempt gives a handler that the channel
calls with each batch as it reads the message, on the loop, with no await and no task
woken per batch. A direct handler puts the events it relays into the channel's
:attr:`ActorChannel.pending`; the channel appends them with one call (``append``, the
task shard's ``append_many``) once it has read the whole message: one append for all
the agents' tokens of an actor's flush, not one per agent. An attempt that gives up
its step (deadline, cancel) detaches its handler, and what follows is queued for the
slot table, which reads the step's end there.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable

from ray.exceptions import ActorDiedError, RayError, RaySystemError

from threadbound.agents.host import ERROR, INTERRUPT, RESULT
from threadbound.agents.wire import pack, unpack

log = logging.getLogger("threadbound.channel")

_ENDS = (RESULT, ERROR, INTERRUPT)


def _decoded(data: bytes) -> Any:
    """An actor's packed reply or stream message, unpacked. One this process cannot unpickle
    (say, an agent's output of a class the supervisor cannot import) is the error Ray's own
    deserializer raised for it when Ray unpickled the reply: a ``RaySystemError``, which
    the step hears as a broken stream (retried by policy) rather than waiting for an end
    that will not come."""
    try:
        return unpack(data)
    except Exception as exc:
        raise RaySystemError(f"could not unpickle an agent actor's message: {type(exc).__name__}: {exc}") from exc


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

    def __init__(self, channel: "ActorChannel", key: str,
                 on_batch: Callable[[list[tuple[str, Any]]], None] | None = None,
                 on_error: Callable[[BaseException], None] | None = None) -> None:
        self.channel, self.key = channel, key
        self.queue: asyncio.Queue = asyncio.Queue()
        self.ended = False
        self.on_batch, self.on_error = on_batch, on_error  # direct delivery (None: queued)
        # Until the start call's reply (the step's first batch) is in, what the stream
        # brings for the step waits here: the two come by different ways.
        self.early: list[list[tuple[str, Any]]] | None = None
        self.broke: BaseException | None = None  # the stream broke before the reply came

    def replied(self, reply: asyncio.Future) -> None:
        """The start call's reply: its batch first, then what the stream brought meanwhile,
        then the stream's error if it broke meanwhile (what the step sent before its actor
        died is kept)."""
        early, self.early = self.early or [], None
        broke, self.broke = self.broke, None
        error = None if reply.cancelled() else reply.exception()
        if error is None and not reply.cancelled():
            try:
                first = _decoded(reply.result())
            except RayError as exc:
                error = exc
            else:
                for batch in (first, *early):
                    if batch:
                        self.deliver(batch)
                self.channel.flush()  # a direct handler's events, appended now (no stream message follows)
        error = error or broke
        if error is not None and not self.ended:
            self.fail(error)

    def deliver(self, batch: list[tuple[str, Any]]) -> None:
        """A batch of this step's events, in the order the actor sent them."""
        if self.early is not None:
            self.early.append(batch)
            return
        if self.on_batch is None:
            self.queue.put_nowait(batch)
            return
        if any(kind in _ENDS for kind, _ in batch):
            self.close()  # the step's last batch: nothing follows
        self.on_batch(batch)

    def fail(self, error: BaseException) -> None:
        """The actor's stream broke (or the start call failed): the step hears the error,
        once its start call's reply is in."""
        if self.early is not None:
            self.broke = self.broke or error
            return
        if self.on_error is None:
            self.queue.put_nowait(error)
        else:
            self.on_error(error)

    def detach(self) -> None:
        """Back to queued delivery: the batches that follow wait for ``__anext__``."""
        self.on_batch = self.on_error = None

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

    def __init__(self, handle: Any, name: str, counts: dict[str, int] | None = None, *, replies: bool = True) -> None:
        self.handle, self.name = handle, name
        # The actor's start calls reply with their step's first batch (an actor of one
        # place); False: they reply [] and all of a step's batches come on the stream.
        self.replies = replies
        self.listeners: dict[str, Listener] = {}
        # Ray messages that carried steps' events, counted for the whole pool: ``replies``
        # (start calls, each with a step's first batch) and ``stream`` (the actors'
        # stream messages, each with the batches of one or more steps).
        self.counts = counts if counts is not None else {"replies": 0, "stream": 0}
        self.error: BaseException | None = None
        # Events the direct listeners relayed from the message being read, appended together
        # by ``append`` once it is read (a handler that must append before it goes on, e.g.
        # ahead of a step's failure, appends them itself and clears this list in place).
        self.pending: list[Any] = []
        self.append: Callable[[list[Any]], None] | None = None
        self.task = asyncio.get_running_loop().create_task(self._pump(), name=f"threadbound/{name}/events")

    def listen(self, key: str, on_batch: Callable[[list[tuple[str, Any]]], None] | None = None,
               on_error: Callable[[BaseException], None] | None = None) -> Listener:
        """Register a step's listener (direct when ``on_batch`` is given): call before
        starting the step. A direct listener of a channel already broken hears its error
        at the next loop turn, not inside this call."""
        listener = Listener(self, key, on_batch, on_error)
        if self.error is not None:
            if on_error is None:
                listener.queue.put_nowait(self.error)
            else:
                asyncio.get_running_loop().call_soon(listener.fail, self.error)
        else:
            self.listeners[key] = listener
        return listener

    def start(self, req: Any, name: str, on_batch: Callable[[list[tuple[str, Any]]], None] | None = None,
              on_error: Callable[[BaseException], None] | None = None,
              append: Callable[[list[Any]], None] | None = None) -> Listener:
        """Listen for the step, then start it on the actor. With ``on_batch`` the step's
        batches are handed to it as they are read (the reply's first), and ``append``
        appends what the handlers put in :attr:`pending`, once per message."""
        if append is not None:
            self.append = append
        listener = self.listen(req.idempotency_key, on_batch, on_error)
        call = self.handle.start_step.options(name=name).remote(pack(req))
        if self.replies:
            listener.early = []
            reply = asyncio.wrap_future(call.future())
            self.counts["replies"] += 1
            reply.add_done_callback(listener.replied)
        return listener

    def flush(self) -> None:
        """Append what direct handlers relayed (see :attr:`pending`)."""
        if self.pending and self.append is not None:
            items = self.pending[:]
            self.pending.clear()
            self.append(items)

    async def _pump(self) -> None:
        error: BaseException
        try:
            stream = self.handle.events.options(name=f"{self.name}/events").remote()
            pending = self.pending
            async for ref in stream:
                self.counts["stream"] += 1
                listeners = self.listeners
                for key, batch in _decoded(await ref):
                    listener = listeners.get(key)
                    if listener is not None:  # else: a step no one waits for any more (it was given up)
                        listener.deliver(batch)
                if pending:  # one append for every agent's events of this message
                    self.flush()
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
        self.flush()  # what was relayed before the break
        listeners = list(self.listeners.values())
        self.listeners.clear()
        for listener in listeners:
            listener.fail(error)

    def close(self) -> None:
        """The actor is being replaced: stop reading; steps still listening hear it died."""
        if not self.task.done():
            self.task.cancel()
        self._fail(self.error or ActorDiedError())
