"""Attempts and retries: one step of one role, tried until it commits or the retry
policy gives up.

:class:`StepAttempt` is one attempt: it sends the request to the bound actor, relays
the actor's event stream into the task's log (every event tagged with the attempt),
and turns how the step ended into an :class:`Outcome`. Whether its actor goes back
to the task or is killed is decided in one place, its ``finally``: an attempt that did
not hear its step's end (deadline, crash, broken stream, cancellation) kills the actor
when it hosts this agent alone; an actor shared with other agents (``agents_per_actor``
> 1) is first asked to stop the step and killed only if it does not within a grace
period (``SlotTable.stop_or_kill``), naming this step as the cause to the co-tenants
whose steps die with it.

:func:`run_step` is the retry loop around it and the commit of a step's result.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Protocol

from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayError

from threadbound.agents import events as ev
from threadbound.agents.host import ERROR, INTERRUPT, RESULT, StepRequest

from ..config import RuntimeConfig
from ..task import FAILED, TIMED_OUT, ancestors
from .binding import Binder, SlotLost
from .budget import Budget
from .channel import Listener
from .clock import Clock
from .health import ACTOR_DEATH, STREAM_FAILURE, TIMEOUT, Health
from .hooks import Hooks, Outcome, StepInfo, Transition
from .retry import backoff_s
from .shard import TaskShard
from .slots import SlotTable
from .task_state import TaskEnds, TaskRecord, TaskWaits, apply_commit

if TYPE_CHECKING:
    from threadbound.agents.sandbox import SandboxSettings

    from .durability import Durability
    from .places import Slot


class Lifecycle(Protocol):
    """What a task's run tells the supervisor about the task as a whole."""

    def finish(self, ts: TaskRecord, status: str, **data: Any) -> None: ...
    def task_ended(self, ts: TaskRecord) -> None: ...
    def task_waits(self, ts: TaskRecord) -> None: ...


@dataclass
class StepEnv:
    """What the step path and a task's rounds use: the parts they call, typed, and
    nothing else of the supervisor (which builds one and keeps it)."""

    cfg: RuntimeConfig
    clock: Clock
    rng: random.Random
    budget: Budget
    sandbox: "SandboxSettings"
    shard: TaskShard  # the tasks' event logs
    binder: Binder  # a role's slot for its next step
    slots: SlotTable  # replaces the process of a slot whose step did not end
    blobs: dict[str, bytes]  # digest -> agent class blob
    health: Health  # what the pool's mode means for a step; hears how each attempt ended
    observers: Hooks
    durable: "Durability | None"  # the journal (None: snapshots off)
    life: Lifecycle
    on_transition: Callable[[Transition], None]  # the health mode changed: the supervisor acts on it

    def emit(self, ts: TaskRecord, kind: str, agent: str | None, **data: Any) -> None:
        self.shard.emit(ts, kind, agent, **data)

    async def barrier(self) -> None:
        """Return once everything recorded so far is durable (no-op without snapshots);
        raises if the journal cannot be written: nothing more counts as committed."""
        if self.durable is not None:
            await self.durable.flush()

    async def step_ended(self, ts: TaskRecord, info: StepInfo, out: Outcome) -> None:
        """Health hears of it first (directly: the pool acts on what it says), then the observers."""
        change = self.health.step_ended(info, out)
        await self.observers.after_step(ts, info, out)
        if change is not None:  # acted on outside this step's own code path
            asyncio.get_running_loop().call_soon(self.on_transition, change)

    async def commit(self, ts: TaskRecord, info: StepInfo, out: Outcome, inbox_upto: int) -> None:
        """The step's result becomes the task's, durably: journaled, then acknowledged."""
        role, level = info.role, info.level
        output, state, requests = out.data["output"], out.data["state"], list(out.data["round_requests"])
        self.observers.on_commit(ts, role, output, state, requests)
        if self.durable is not None:
            self.durable.committed(ts, role, output, state, requests)
        apply_commit(ts, role, output, state, requests)
        self.emit(ts, ev.STEP_FINISHED, role, round=info.round, attempt=info.attempt,
                  elapsed_s=out.data.get("elapsed_s"), output=output if plain(output) else repr(output)[:2000],
                  round_requests=requests, inbox_upto=inbox_upto, **self.budget.cost(out.data.get("tokens"), level))
        await self.barrier()  # committed = durable


def plain(value: Any, depth: int = 0) -> bool:
    """True if ``value`` is plain data a client can print or encode as JSON."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return True
    if depth > 6:
        return False
    if isinstance(value, (list, tuple)):
        return all(plain(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and plain(v, depth + 1) for k, v in value.items())
    return False


class StepAttempt:
    """One attempt of one step: request -> stream -> outcome; see the module docstring."""

    def __init__(self, env: StepEnv, ts: TaskRecord, info: StepInfo, slot: "Slot", outputs: dict[str, Any],
                 inbox: tuple[int, int] = (0, 0)) -> None:
        self.env, self.ts, self.info, self.slot, self.outputs = env, ts, info, slot, outputs
        self.inbox = inbox  # the messages this step sees: ts.inbox[from:to]
        self.partial: list[str] = []
        self.streamed = 0  # tokens received, for the cost of a step that ends without a result
        self.held: list[str] = []  # tokens of a streaming step the pool stopped streaming

    def request(self) -> StepRequest:
        """The step's request; the agent's class goes with the first step of a binding on
        a process only (the actor keeps the bound agent between steps)."""
        env, ts, info, slot = self.env, self.ts, self.info, self.slot
        role = info.role
        lv = env.cfg.reasoning.spec(info.level)
        options = {k: v for k, v in (("model", lv.model), ("max_tokens", lv.max_tokens),
                                     ("temperature", lv.temperature)) if v is not None}
        binding = ts.run.bind_keys[role]
        first = slot.sent != (binding, slot.generation)
        return StepRequest(
            binding=binding, agent_blob=env.blobs[ts.blob_ids[role]] if first else None, task_id=ts.id, role=role,
            goal=ts.spec.goal, workspace=ts.spec.workspace, round=info.round, attempt=info.attempt,
            idempotency_key=f"{ts.id}:{info.round}:{role}:{info.attempt}", inputs=ts.spec.inputs,
            outputs=self.outputs, feedback=list(ts.feedback), level=info.level,
            streaming=info.streaming, model_config=env.cfg.model, model_options=options,
            token_batch_size=env.cfg.token_batch_size,
            token_interval_s=env.cfg.token_interval_ms / 1000.0,
            state=ts.states.get(role), has_state=role in ts.states,
            tokens_left=env.budget.tokens_left(ts, info.level), sandbox=env.sandbox,
            answers=list(ts.answers.get(role, ())), inbox=ts.inbox[self.inbox[0]:self.inbox[1]],
            place=slot.place,
        )

    def _emit(self, kind: str, **data: Any) -> None:
        self.env.emit(self.ts, kind, self.info.role, attempt=self.info.attempt, **data)

    def _release_held(self) -> None:
        if self.held:
            self._emit(ev.MESSAGE, text="".join(self.held), degraded=True)
            self.held.clear()

    async def run(self) -> Outcome:
        env, ts, info, slot = self.env, self.ts, self.info, self.slot
        role, level, clock = info.role, info.level, env.clock
        timeout = ts.spec.step_timeout_s or env.cfg.step_timeout_s
        req = self.request()
        info.started = started = clock.monotonic()
        deadline = started + timeout
        self.heard_end = False  # the actor reported the step's end: it may serve the task again
        slot.busy = True  # for stats(); this attempt is the only writer
        generation = slot.generation  # the process this step runs on
        why_ended = "cancelled"  # what ends the step if it does not end by itself
        gen = None
        try:
            channel = slot.proc.channel
            running = sorted(ts.run.running)
            done = asyncio.get_running_loop().create_future()
            try:  # the call goes out first, its event right after: the actor starts sooner
                gen = channel.start(req, f"{role}/{ts.id}", *self._direct(done, channel.pending),
                                    append=env.shard.append_many)
            finally:  # (before anything the step streams: that is read at the next loop turn at the soonest)
                self._emit(ev.STEP_STARTED, round=info.round, slot=slot.name, pid=slot.pid, level=level,
                           streaming=info.streaming, running=running)
                env.observers.before_step(ts, info)
            if req.agent_blob is not None:
                slot.sent = (req.binding, slot.generation)
            # The channel hands this step's batches to _take as they come (the start call's
            # reply first, then the actor's stream): this attempt wakes once, when its step
            # ends (or its deadline passes).
            remaining = deadline - clock.monotonic()
            if remaining <= 0:
                raise asyncio.TimeoutError
            out = await clock.wait_for(done, remaining)
            if ts.run.cancel_reason is not None:
                # Python < 3.12: wait_for drops a cancel that lands as its inner await
                # completes; the reason set by cancel() makes the cancel stick anyway.
                raise asyncio.CancelledError
            return out
        except asyncio.TimeoutError:
            why_ended = "deadline"
            elapsed = clock.monotonic() - started
            self._release_held()
            self._emit(ev.STEP_TIMED_OUT, round=info.round, limit_s=timeout, elapsed_s=round(elapsed, 3),
                       partial="".join(self.partial)[-4000:], slot=slot.name, **env.budget.cost(self.streamed, level))
            return Outcome("timeout", {"why": f"exceeded its step timeout of {timeout:.3f}s "
                                              f"(elapsed: {elapsed:.1f}s)"}, signal=TIMEOUT, elapsed_s=elapsed)
        except RayError as exc:
            died = isinstance(exc, (RayActorError, ActorDiedError, ActorUnavailableError))
            why_ended = "stream"
            cause = env.slots.cause(slot, generation) if died else None  # a co-tenant's step killed it
            self._release_held()
            extra = {"cause": cause} if cause else {}
            self._emit(ev.AGENT_CRASHED if died else ev.STREAM_FAILED, round=info.round, slot=slot.name,
                       error=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:500],
                       **extra, **env.budget.cost(self.streamed, level))
            if died:
                actor = slot.proc.name
                return Outcome("crash", {"why": f"crashed (its actor {actor} was {cause})" if cause else
                                         f"crashed (its actor {actor} died)"}, signal=ACTOR_DEATH)
            return Outcome("crash", {"why": f"lost its event stream ({type(exc).__name__}); its actor "
                                            f"{slot.name} was replaced"}, signal=STREAM_FAILURE)
        finally:
            slot.busy = False
            self._release_held()
            if isinstance(gen, Listener):
                gen.detach()  # what still comes is queued: for the slot table, or for no one
            if not self.heard_end:  # the step may still be running in there: end it
                slot.sent = None
                cause = {"deadline": f"killed at the step deadline of {role}/{ts.id}",
                         "cancelled": f"killed when the step of {role}/{ts.id} was cancelled"}.get(why_ended)
                if env.slots.per_actor > 1 and gen is not None and why_ended != "stream":
                    env.slots.stop_or_kill(slot, gen, req.idempotency_key, cause)  # co-tenants: stop first
                    gen = None  # its stream is the slot table's now
                else:
                    env.slots.replace(slot, kill=True, cause=cause)
            if isinstance(gen, Listener):
                gen.close()  # stop listening on the actor's stream

    def _take(self, batch: list[tuple[str, Any]],
              relayed: list[tuple[TaskRecord, str, str | None, dict[str, Any]]]) -> Outcome | None:
        """One batch the actor sent for this step: its events go into ``relayed`` (each
        tagged with the attempt), for the caller to append; the step's outcome if the
        batch ends it (events before a failure are appended first, then the failure)."""
        env, ts, info = self.env, self.ts, self.info
        role, attempt = info.role, info.attempt
        for kind, data in batch:
            if kind == ev.TOKENS:
                if info.first_token is None:
                    info.first_token = env.clock.monotonic()
                self.partial.append(data["text"])
                self.streamed += data.get("n", 1)
                if env.health.degraded_now(ts):
                    self.held.append(data["text"])  # degraded mid-step: the rest comes as one message
                    continue
                fields = dict(data)
                fields["attempt"] = attempt
                relayed.append((ts, kind, role, fields))
                continue
            if kind == RESULT:
                self.heard_end = True
                return Outcome("ok", data, elapsed_s=env.clock.monotonic() - info.started)
            if kind == ERROR:
                self.heard_end = True
                self._flush(relayed)
                return self._failed(data)
            if kind == INTERRUPT:
                self.heard_end = True
                return Outcome("interrupt", data, elapsed_s=data.get("elapsed_s") or 0.0)
            if self.held:
                self._flush(relayed)
                self._release_held()
            # An agent's own event: relayed with its fields as they are, plus the attempt.
            fields = dict(data) if isinstance(data, dict) else {"value": data}
            fields["attempt"] = attempt
            relayed.append((ts, kind, role, fields))
        return None

    def _direct(self, done: asyncio.Future, relayed: list[Any]) -> tuple[Any, Any]:
        """The handlers a channel calls with this step's batches (``relayed``: the
        channel's pending events) and with the error of its broken stream; ``done`` gets
        the step's outcome, or the exception it raised."""

        def on_batch(batch: list[tuple[str, Any]]) -> None:
            if done.done():
                return
            try:
                out = self._take(batch, relayed)
            except BaseException as exc:  # as the loop would have raised it
                done.set_exception(exc)
                return
            if out is not None:
                done.set_result(out)

        def on_error(error: BaseException) -> None:
            if not done.done():
                done.set_exception(error)

        return on_batch, on_error

    def _flush(self, relayed: list[tuple[TaskRecord, str, str | None, dict[str, Any]]]) -> None:
        if relayed:
            self.env.shard.append_many(relayed)
            relayed.clear()

    def _failed(self, data: dict[str, Any]) -> Outcome:
        info = self.info
        klass = data["error_class"] or "error"
        self._release_held()
        self._emit(ev.STEP_FAILED, round=info.round, error=f"{data['type']}: {data['message']}",
                   transient=data["transient"], error_class=klass, retry_after_s=data.get("retry_after_s"),
                   traceback=data["traceback"][-4000:], **self.env.budget.cost(data.get("tokens"), info.level))
        return Outcome(klass, {"why": f"failed: {data['type']}: {data['message']}",
                               "retry_after_s": data.get("retry_after_s")},
                       elapsed_s=data.get("elapsed_s") or 0.0)


def step_outputs(ts: TaskRecord, role: str) -> dict[str, Any]:
    """What a step of ``role`` sees: this round's committed outputs of the roles it comes
    after (directly or not), and the other roles' outputs as this round began."""
    before = ancestors(ts.graph, role)
    out = {r: v for r, v in ts.round_outputs.items() if r not in before}
    for r in before:
        if r in ts.committed and r in ts.outputs:
            out[r] = ts.outputs[r]
    return out


async def run_step(env: StepEnv, ts: TaskRecord, role: str, rnd: int) -> None:
    """Run ``role``'s step of round ``rnd`` until it commits; :class:`TaskEnds` when the
    retry policy gives up, :class:`TaskWaits` when the step asked a person
    (``ctx.interrupt``). A step interrupted by a crash, or by its own question, runs
    again under its own attempt number, so its idempotency key is the same and an
    idempotent side effect is not repeated."""
    attempt = ts.inflight.get(role, 1) - 1
    while True:
        attempt += 1
        streaming, degraded = env.health.mode_for(ts)
        level = 1 if degraded else env.budget.fit(ts, role, env.emit)
        info = StepInfo(task_id=ts.id, role=role, round=rnd, attempt=attempt, level=level,
                        streaming=streaming, degraded=degraded)
        inbox = (ts.inbox_seen.get(role, 0), len(ts.inbox))  # the messages this attempt sees
        try:
            slot = await env.binder.bind(ts, role)
        except SlotLost as lost:  # counts as a crash of this attempt: retried by policy
            info.slot = lost.slot.name
            env.emit(ts, ev.AGENT_CRASHED, role, attempt=attempt, round=rnd, slot=lost.slot.name,
                     error=str(lost), **env.budget.cost(0, level))
            out = Outcome("crash", {"why": f"crashed ({lost})"}, signal=ACTOR_DEATH)
        else:
            info.slot = slot.name
            out = await StepAttempt(env, ts, info, slot, step_outputs(ts, role), inbox).run()
        policy = env.cfg.retry.for_class(out.kind)
        out.retryable = out.kind in env.cfg.retry.retry_on
        out.exhausted = not out.ok and (not out.retryable or attempt >= policy.max_attempts)
        await env.step_ended(ts, info, out)
        if out.kind == "interrupt":  # it asked a person: it runs again, same attempt, once answered
            payload = out.data.get("payload")
            env.emit(ts, ev.INPUT_REQUESTED, role, request=ts.asked + 1, round=rnd, attempt=attempt,
                     index=out.data.get("index", 0), payload=payload if plain(payload) else repr(payload)[:2000],
                     **env.budget.cost(out.data.get("tokens"), level))
            raise TaskWaits
        if out.ok:
            await env.commit(ts, info, out, inbox[1])
            return
        if out.exhausted:
            tried = f" after {attempt} attempt(s)" if attempt > 1 else ""
            raise TaskEnds(TIMED_OUT if out.kind == "timeout" else FAILED,
                           f"agent {role!r} of task {ts.id} {out.data['why']}{tried}",
                           reason="step_timeout" if out.kind == "timeout" else "step_failed")
        delay = backoff_s(policy, attempt, env.rng, out.data.get("retry_after_s"))
        env.emit(ts, ev.RETRYING, role, round=rnd, attempt=attempt + 1, reason=out.kind,
                 delay_s=round(delay, 3), retry_after_s=out.data.get("retry_after_s"))
        await env.clock.sleep(delay)
