"""The supervisor's one clock: monotonic time, wall time, sleeps, timers and timeouts.

Every part of the supervisor that measures or waits (deadlines, retry backoff, a task's
wait for a person, health windows and hysteresis, snapshot intervals, event stamps)
asks the clock it was given, never ``time`` or ``asyncio`` directly, so that tests can
run it on :class:`FakeClock` and see an hour pass in a millisecond (Trio's
``MockClock`` is the model).

Examples:
    >>> import asyncio
    >>> clock = FakeClock()
    >>> async def main():
    ...     fired = []
    ...     clock.call_later(3600, fired.append, "an hour")
    ...     clock.advance(3600)
    ...     await asyncio.sleep(0)
    ...     return fired
    >>> asyncio.run(main())
    ['an hour']
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from typing import Any, Awaitable, Callable, Protocol, TypeVar

_T = TypeVar("_T")


class Timer(Protocol):
    def cancel(self) -> None: ...


class Clock(Protocol):
    """What the supervisor asks of time. Calling the clock gives :meth:`monotonic`."""

    def __call__(self) -> float: ...
    def monotonic(self) -> float: ...
    def time(self) -> float: ...
    async def sleep(self, seconds: float) -> None: ...
    def call_later(self, delay: float, fn: Callable[..., Any], *args: Any) -> Timer: ...
    async def wait_for(self, aw: Awaitable[_T], timeout: float | None) -> _T: ...


class SystemClock:
    """The real clock: ``time.monotonic``, ``time.time`` and the running event loop."""

    def __call__(self) -> float:
        return time.monotonic()

    monotonic = staticmethod(time.monotonic)
    time = staticmethod(time.time)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    def call_later(self, delay: float, fn: Callable[..., Any], *args: Any) -> Timer:
        return asyncio.get_running_loop().call_later(max(0.0, delay), fn, *args)

    async def wait_for(self, aw: Awaitable[_T], timeout: float | None) -> _T:
        return await asyncio.wait_for(aw, timeout)


class _FakeTimer:
    __slots__ = ("when", "fn", "args", "cancelled", "_real")

    def __init__(self, when: float, fn: Callable[..., Any], args: tuple) -> None:
        self.when, self.fn, self.args = when, fn, args
        self.cancelled = False
        self._real: asyncio.TimerHandle | None = None

    def cancel(self) -> None:
        self.cancelled = True
        if self._real is not None:
            self._real.cancel()
            self._real = None


class FakeClock:
    """A clock for tests: time moves when :meth:`advance` moves it and, with ``rate``,
    with real time too (``rate=0``: only by :meth:`advance`; ``rate=1``: as fast as
    real time, plus every jump). Timers and sleeps due at the new time fire at once.

    ``monotonic()`` starts at ``start``; ``time()`` (wall) at ``wall_start``, and both
    move together.
    """

    def __init__(self, start: float = 1000.0, *, rate: float = 1.0, wall_start: float = 1_700_000_000.0) -> None:
        self.rate = rate
        self._base = start
        self._real0 = time.monotonic()
        self._jumped = 0.0
        self._wall0 = wall_start - start
        self._timers: list[tuple[float, int, _FakeTimer]] = []
        self._seq = itertools.count()

    # -- reading ----------------------------------------------------------------------

    def __call__(self) -> float:
        return self.monotonic()

    def monotonic(self) -> float:
        return self._base + self._jumped + self.rate * (time.monotonic() - self._real0)

    def time(self) -> float:
        return self._wall0 + self.monotonic()

    @property
    def now(self) -> float:
        return self.monotonic()

    # -- moving -----------------------------------------------------------------------

    def advance(self, seconds: float) -> None:
        """Move time forward; every timer due by then fires (in order, on the loop)."""
        if seconds < 0:
            raise ValueError("time only moves forward")
        self._jumped += seconds
        self._fire_due()

    def _fire_due(self) -> None:
        now = self.monotonic()
        while self._timers and self._timers[0][0] <= now:
            _, _, t = heapq.heappop(self._timers)
            if t.cancelled:
                continue
            if t._real is not None:
                t._real.cancel()
                t._real = None
            t.cancelled = True  # fired: a later cancel() is a no-op
            try:
                asyncio.get_running_loop().call_soon(t.fn, *t.args)
            except RuntimeError:  # no loop (a plain unit test): fire here
                t.fn(*t.args)

    # -- waiting ----------------------------------------------------------------------

    def call_later(self, delay: float, fn: Callable[..., Any], *args: Any) -> Timer:
        t = _FakeTimer(self.monotonic() + max(0.0, delay), fn, args)
        heapq.heappush(self._timers, (t.when, next(self._seq), t))
        if self.rate > 0:  # real time moves it too: wake when it is due by real time
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                loop = None
            if loop is not None:
                t._real = loop.call_later(max(0.0, delay) / self.rate + 1e-4, self._fire_due)
        return t

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        fut = asyncio.get_running_loop().create_future()
        timer = self.call_later(seconds, lambda: fut.done() or fut.set_result(None))
        try:
            await fut
        finally:
            timer.cancel()

    async def wait_for(self, aw: Awaitable[_T], timeout: float | None) -> _T:
        """``asyncio.wait_for`` on this clock: ``asyncio.TimeoutError`` once ``timeout``
        has passed on it; a cancel from outside passes through as a cancel."""
        if timeout is None:
            return await aw
        inner = asyncio.ensure_future(aw)
        expired = False

        def expire() -> None:
            nonlocal expired
            if not inner.done():
                expired = True
                inner.cancel()

        timer = self.call_later(timeout, expire)
        try:
            return await inner
        except asyncio.CancelledError:
            if expired:
                raise asyncio.TimeoutError from None
            raise
        finally:
            timer.cancel()
            if not inner.done():
                inner.cancel()

    async def elapse(self, seconds: float, *, settle: int = 10) -> None:
        """Let ``seconds`` pass as they would: jump to each timer due within them in turn,
        letting the loop run what it woke (``settle`` turns) before the next jump -- a
        timer set meanwhile (a ticker's next sleep) fires in its turn too."""
        end = self.monotonic() + seconds
        while True:
            for _ in range(settle):
                await asyncio.sleep(0)
            due = [w for w, _, t in self._timers if not t.cancelled]
            nxt = min(due, default=None)
            if nxt is None or nxt > end:
                break
            self.advance(max(0.0, nxt - self.monotonic()))
        self.advance(max(0.0, end - self.monotonic()))
        for _ in range(settle):
            await asyncio.sleep(0)

    def pending(self) -> int:
        """Timers not yet fired (for tests)."""
        return sum(1 for *_, t in self._timers if not t.cancelled)
