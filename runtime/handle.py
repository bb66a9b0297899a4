"""``TaskHandle``: one submitted task, seen from the user's side (stream its events,
wait for its result, cancel it, answer it as a person in the loop). Made by
:class:`~.pool.AgentPool`; its calls go through ``runtime.client``."""

from __future__ import annotations

import contextlib
from typing import Any, AsyncIterator, Iterator

from .client import _aopen_stream, _check_offset, _Client, _open_stream, _result, _sync
from .errors import ResultTimeout
from .task import Event, TaskResult, TaskSummary


class TaskHandle:
    """A submitted task: stream its events, wait for its result, cancel it.

    ``stream``, ``result``, ``cancel``, ``respond`` and ``send`` have asyncio twins
    (``astream``, ``aresult``, ``acancel``, ``arespond``, ``asend``); the sync methods
    run the same coroutines on this process's client loop. A supervisor restart is ridden out: a stream continues at the offset after
    the last event it yielded.

    ``created`` is False when ``submit`` returned a task its idempotency key had
    already made (True otherwise, and for handles from ``pool.task``).

    Examples:
        >>> handle = pool.submit(Task(goal="fix it", agents=["coder"]))   # doctest: +SKIP
        >>> for event in handle.stream():                                # doctest: +SKIP
        ...     print(event.offset, event.kind, event.agent, event.data)
        >>> handle.result(timeout=60).outputs["coder"]                    # doctest: +SKIP
    """

    def __init__(self, supervisor: Any, task_id: str, name: tuple[str, str] | None = None) -> None:
        # name = (pool name, namespace): lets calls ride out a supervisor restart
        self._client = _Client(supervisor, name)
        self.task_id = task_id
        self.created = True

    def __repr__(self) -> str:
        return f"TaskHandle({self.task_id!r})"

    @property
    def status(self) -> str:
        """pending, admitted, running, succeeded, failed, cancelled or timed_out."""
        return self.summary().status

    def summary(self) -> TaskSummary:
        """The task's row of ``pool.tasks()``: status, round, event count, error."""
        return _sync(self._client.call("task_summary", self.task_id))

    def stream(self, from_offset: int = 0) -> Iterator[Event]:
        """Every event from ``from_offset`` on, in order, following live until the task ends.

        Reconnecting with the offset after the last one seen continues exactly there.
        Events come from this process's client loop a batch at a time.

        Examples:
            >>> kinds = [e.kind for e in handle.stream()]                # doctest: +SKIP
            >>> kinds[-1]                                                # doctest: +SKIP
            'succeeded'
        """
        _check_offset(from_offset)
        stream = _sync(_aopen_stream(self._client, self.task_id, from_offset))
        try:
            while (events := _sync(stream.take())) is not None:
                for event in events:
                    yield event
                    if event.terminal:
                        return
        finally:
            with contextlib.suppress(RuntimeError):  # the loop is gone (interpreter exit)
                stream.follower.loop.call_soon_threadsafe(stream.close)

    async def astream(self, from_offset: int = 0) -> AsyncIterator[Event]:
        """``stream`` for asyncio: ``async for event in handle.astream(): ...``

        Streams of one pool on one event loop share a single long-poll.
        """
        _check_offset(from_offset)
        stream = _open_stream(self._client, self.task_id, from_offset)
        try:
            while (events := await stream.take()) is not None:
                for event in events:
                    yield event
                    if event.terminal:
                        return
        finally:
            stream.close()

    def result(self, timeout: float | None = None) -> TaskResult:
        """Wait for the task to end and return its result.

        Raises :class:`TaskFailed`, :class:`TaskTimedOut` or :class:`TaskCancelled`
        (each with ``.result``; a cancellation's ``.reason`` says why) if it did not
        succeed, and :class:`ResultTimeout` if ``timeout`` seconds pass first (the task
        keeps running).
        """
        return _sync(self.aresult(timeout))

    async def aresult(self, timeout: float | None = None) -> TaskResult:
        """``result`` for asyncio: ``result = await handle.aresult(timeout=60)``."""
        d = await self._client.call("wait", self.task_id, timeout)
        if d is None:
            raise ResultTimeout(f"task {self.task_id} did not finish within {timeout}s; "
                                "it is still running: wait again or cancel it",
                                task_id=self.task_id, limit=timeout)
        return _result(d)

    # -- a person in the loop ---------------------------------------------------------

    def respond(self, value: Any, request: int | None = None) -> int:
        """Answer the task's question (an agent's ``ctx.interrupt``, or the approval of
        a task submitted with ``inputs={"approve": True}``); returns the offset of the
        ``input_received`` event. The step that asked runs again from its beginning and
        its ``ctx.interrupt`` returns ``value`` (plain data).

        ``request`` names the request (its number, from the ``input_requested`` event)
        when several are open. Raises :class:`InputNotExpected` when the task is not
        waiting for input or the request was already answered (the first answer wins).

        Examples:
            >>> for event in handle.stream():                               # doctest: +SKIP
            ...     if event.kind == "input_requested":
            ...         handle.respond({"use_cache": True})
        """
        return _sync(self.arespond(value, request))

    async def arespond(self, value: Any, request: int | None = None) -> int:
        """``respond`` for asyncio."""
        return await self._client.call("respond", self.task_id, value, request, retry=False)

    def approve(self, request: int | None = None) -> int:
        """Approve the change the task asks about (``inputs={"approve": True}``): it is
        applied (with ``inputs.apply``) and the task succeeds."""
        return self.respond({"approve": True}, request)

    def reject(self, reason: str = "", request: int | None = None) -> int:
        """Reject the change the task asks about: the task ends ``failed`` with ``reason``."""
        return self.respond({"approve": False, "reason": reason}, request)

    def send(self, message: Any) -> int:
        """Send input to the running task: appended to its inbox (a ``message_received``
        event, durable and in order); every later step of its agents sees the messages
        that arrived since that role's previous step in ``ctx.inbox``. Returns the
        event's offset. Raises :class:`InputNotExpected` if the task has ended."""
        return _sync(self.asend(message))

    async def asend(self, message: Any) -> int:
        """``send`` for asyncio."""
        return await self._client.call("send", self.task_id, message, retry=False)

    def cancel(self) -> str:
        """Cancel the task (a running step's actor is killed); returns the final status."""
        return _sync(self.acancel())

    async def acancel(self) -> str:
        """``cancel`` for asyncio: ``status = await handle.acancel()``."""
        return await self._client.call("cancel", self.task_id)

