"""The slot table's actor lifecycle: starting, replacing, recycling's kill, a step asked
to stop then its actor killed, shutdown. A part of :class:`~.slots.SlotTable`, which holds
the fields these methods use."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import ray
from ray.exceptions import RayError

from threadbound.agents.host import ERROR, INTERRUPT, RESULT

from .channel import Listener
from .places import Proc, Slot, _draining

log = logging.getLogger("threadbound.slots")

# With several agents per actor, a step past its deadline is asked to stop, then given
# this long to end before its actor (and with it the co-tenants' steps) is killed.
STOP_GRACE_S = 2.0
_ENDS = (RESULT, ERROR, INTERRUPT)


class SlotActors:
    """The actor side of :class:`~.slots.SlotTable` (mixed into it)."""

    def replace(self, slot: "Slot | Proc", *, kill: bool, recycle: bool = False, cause: str | None = None) -> None:
        """Kill (if asked) and replace the process of ``slot`` (a place or an actor) in the
        background; every place on it loses its agent. ``cause``: why it is killed, told to
        the co-tenants whose steps it ends (:meth:`cause`)."""
        proc = slot.proc if isinstance(slot, Slot) else slot
        if proc.replacing:
            return
        if cause is not None:
            proc.causes[proc.generation] = cause
            for old in [g for g in proc.causes if g < proc.generation - 3]:
                del proc.causes[old]
        proc.recycling = recycle
        old = proc.handle
        proc.ready = self._spawn(self._replace(proc, old, kill))

    def stop_or_kill(self, slot: Slot, stream: Any, key: str, cause: str) -> None:
        """A step on ``slot`` did not end (deadline, cancel) and its actor hosts other agents:
        ask it to stop, give it :data:`STOP_GRACE_S` to end, and only then kill the actor
        (its co-tenants' steps crash, told ``cause``). Until then the place serves no one."""
        if _draining(slot) or slot.handle is None or slot.proc.replacing:
            return
        slot.draining = self._spawn(self._stop_or_kill(slot, stream, key, cause))

    async def _stop_or_kill(self, slot: Slot, stream: Any, key: str, cause: str) -> None:
        proc, generation = slot.proc, slot.generation
        deadline = self.clock.monotonic() + STOP_GRACE_S
        ended = False
        try:
            await self.clock.wait_for(proc.handle.stop.remote(slot.place, key), STOP_GRACE_S)
            while not ended:
                ref = await self.clock.wait_for(stream.__anext__(), max(0.0, deadline - self.clock.monotonic()))
                ended = any(kind in _ENDS for kind, _ in await ref)
        except StopAsyncIteration:
            ended = True
        except (RayError, asyncio.TimeoutError):
            pass
        finally:
            if isinstance(stream, Listener):  # stop listening on the actor's one stream
                stream.close()
        if not ended and proc.generation == generation and not proc.replacing and not self._closed:
            log.warning("the step %s on %s did not stop within %.1fs: its actor is killed (%s)",
                        key, slot.name, STOP_GRACE_S, cause)
            self.replace(proc, kill=True, cause=cause)

    def cause(self, slot: Slot, generation: int) -> str | None:
        """Why the process ``generation`` of ``slot``'s actor was killed (None: not known to
        have been killed on purpose, e.g. it crashed)."""
        return slot.proc.causes.get(generation)

    async def _let_go(self, proc: Proc, old: Any) -> None:
        """Kill ``old`` (``proc``'s process, if any) and wait until Ray confirms it dead;
        ``proc`` is then left with no process and no event stream."""
        if old is not None:
            await self._kill_and_confirm(old)
        proc.handle = None
        if proc.channel is not None:
            proc.channel.close()
            proc.channel = None

    async def _replace(self, proc: Proc, old: Any, kill: bool) -> None:
        await self._let_go(proc, old)
        self.replacements += 1
        if not proc.recycling and self.placement is not None:
            self.placement.invalidate()  # killed or crashed: perhaps its node is gone
        await self._start(proc)

    async def _stop_idle(self, proc: Proc) -> None:
        """Stop an idle actor's process (:meth:`~.slots.SlotTable.trim_idle`). Its places
        are then not started; one reserved while it stopped gets a fresh process at once."""
        await self._let_go(proc, proc.handle)
        proc.pid, proc.node = None, None
        if not proc.idle() and not self._closed:
            await self._start(proc)

    async def _start(self, proc: Proc) -> None:
        node = self._node_for(proc) if self.placement is not None else None
        for attempt in range(3):
            try:
                handle = self._make_actor(proc.name) if node is None else self._make_actor(proc.name, node)
                try:
                    info = await handle.ping.remote()
                except asyncio.CancelledError:  # a shutdown: it kills this one with the others
                    self._orphans.append(handle)
                    raise
                except RayError:  # e.g. its node died while it started: look at the cluster again
                    if self.placement is not None:
                        self.placement.invalidate()
                    raise
                break
            except ValueError:  # name still held by a stale actor (e.g. an earlier run)
                try:
                    stale = ray.get_actor(proc.name, namespace=self.namespace)
                except ValueError:
                    await self.clock.sleep(0.1 * (attempt + 1))
                    continue
                await self._kill_and_confirm(stale)
        else:
            raise RuntimeError(f"could not create agent actor {proc.name}")
        proc.handle, proc.pid, proc.uses = handle, info["pid"], 0
        proc.last_used = self.clock.monotonic()
        proc.generation += 1
        if self._on_start is not None:
            self._on_start(proc)

    async def _kill_and_confirm(self, handle: Any) -> None:
        try:
            ray.kill(handle, no_restart=True)
        except Exception:  # already gone
            return
        # A call on a killed actor fails once Ray has marked it dead: only then does
        # the actor's place (and name) become free again.
        for _ in range(100):
            try:
                await self.clock.wait_for(handle.ping.remote(), 1.0)
            except (RayError, asyncio.TimeoutError):
                return
            await self.clock.sleep(0.05)

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._bg.add(task)

        def done(t: asyncio.Task) -> None:
            self._bg.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.error("agent actor start failed: %r", t.exception())
            self._on_free()
            self._sweep()  # the next due actor's turn

        task.add_done_callback(done)
        return task

    async def shutdown(self) -> None:
        """Kill every slot actor and wait until Ray confirms each one dead."""
        self._closed = True
        for t in list(self._bg):
            t.cancel()
        await asyncio.gather(*list(self._bg), return_exceptions=True)
        handles = [p.handle for p in self.procs if p.handle is not None] + self._orphans
        self._orphans = []
        for p in self.procs:
            if p.channel is not None:
                p.channel.close()
                p.channel = None
            p.handle, p.node = None, None
        for s in self.slots:
            s.owner = None
        await asyncio.gather(*(self._kill_and_confirm(h) for h in handles), return_exceptions=True)
        self.homes.clear()
        self.moved.clear()
        if self.placement is not None:  # the model actors its agents started on each node
            try:
                await self.placement.stop_models(self._kill_and_confirm)
            except Exception:
                log.exception("could not stop the pool's model actors")
