"""Attempts and retries: one step of one role, tried until it commits or the retry
policy gives up.

:class:`StepAttempt` is one attempt: it sends the request to the bound actor, relays
the actor's event stream into the task's log (every event tagged with the attempt),
and turns how the stream ended into an :class:`Outcome`. Whether its actor goes back
to the task or is killed is decided in one place, its ``finally``: an attempt that did
not hear its step's end (deadline, crash, broken stream, cancellation) kills the actor,
since a running step cannot be interrupted any other way.

:func:`run_step` is the retry loop around it and the commit of a step's result.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Protocol

from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayError

from threadbound.agents import events as ev

from .health import ACTOR_DEATH, STREAM_FAILURE, TIMEOUT
from .admission import SlotLost
from .hooks import Outcome, StepInfo
from .retry import backoff_s
from threadbound.agents.host import ERROR, INTERRUPT, RESULT, StepRequest
from ..task import FAILED, TIMED_OUT, ancestors
from .task_state import TaskEnds, TaskState, TaskWaits, apply_commit

if TYPE_CHECKING:
    from .slots import Slot


class Core(Protocol):
    """What the step path needs of the supervisor (which provides exactly this)."""

    cfg: Any
    clock: Any
    rng: Any
    slots: Any
    blobs: dict[str, bytes]
    sandbox: Any
    budget: Any
    hooks: Any

    def emit(self, ts: TaskState, kind: str, agent: str | None, **data: Any) -> None: ...
    def append(self, ts: TaskState, kind: str, agent: str | None, data: dict[str, Any]) -> None: ...
    def mode_for(self, ts: TaskState) -> tuple[bool, bool]: ...  # (streaming, degraded)
    def degraded_now(self, ts: TaskState) -> bool: ...
    async def bind(self, ts: TaskState, role: str) -> "Slot": ...
    async def barrier(self) -> None: ...


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

    def __init__(self, core: Core, ts: TaskState, info: StepInfo, slot: "Slot", outputs: dict[str, Any],
                 inbox: tuple[int, int] = (0, 0)) -> None:
        self.core, self.ts, self.info, self.slot, self.outputs = core, ts, info, slot, outputs
        self.inbox = inbox  # the messages this step sees: ts.inbox[from:to]
        self.partial: list[str] = []
        self.streamed = 0  # tokens received, for the cost of a step that ends without a result
        self.held: list[str] = []  # tokens of a streaming step the pool stopped streaming

    def request(self) -> StepRequest:
        core, ts, info = self.core, self.ts, self.info
        role = info.role
        lv = core.cfg.reasoning.spec(info.level)
        options = {k: v for k, v in (("model", lv.model), ("max_tokens", lv.max_tokens),
                                     ("temperature", lv.temperature)) if v is not None}
        return StepRequest(
            binding=ts.bind_keys[role], agent_blob=core.blobs[ts.blob_ids[role]], task_id=ts.id, role=role,
            goal=ts.spec.goal, workspace=ts.spec.workspace, round=info.round, attempt=info.attempt,
            idempotency_key=f"{ts.id}:{info.round}:{role}:{info.attempt}", inputs=ts.spec.inputs,
            outputs=self.outputs, feedback=list(ts.feedback), level=info.level,
            streaming=info.streaming, model_config=core.cfg.model, model_options=options,
            token_batch_size=core.cfg.token_batch_size,
            token_interval_s=core.cfg.token_interval_ms / 1000.0,
            state=ts.states.get(role), has_state=role in ts.states,
            tokens_left=core.budget.tokens_left(ts, info.level), sandbox=core.sandbox,
            answers=list(ts.answers.get(role, ())), inbox=ts.inbox[self.inbox[0]:self.inbox[1]],
        )

    def _emit(self, kind: str, **data: Any) -> None:
        self.core.emit(self.ts, kind, self.info.role, attempt=self.info.attempt, **data)

    def _release_held(self) -> None:
        if self.held:
            self._emit(ev.MESSAGE, text="".join(self.held), degraded=True)
            self.held.clear()

    async def run(self) -> Outcome:
        core, ts, info, slot = self.core, self.ts, self.info, self.slot
        role, level = info.role, info.level
        timeout = ts.spec.step_timeout_s or core.cfg.step_timeout_s
        req = self.request()
        self._emit(ev.STEP_STARTED, round=info.round, slot=slot.name, pid=slot.pid, level=level,
                   streaming=info.streaming, running=sorted(ts.running))
        core.hooks.before_step(ts, info)
        info.started = started = core.clock()
        deadline = started + timeout
        heard_end = False  # the actor reported the step's end: it may serve the task again
        slot.busy = True  # for stats(); this attempt is the only writer
        try:
            gen = slot.handle.run_step.options(name=f"{role}/{ts.id}").remote(req)
            while True:
                remaining = deadline - core.clock()
                if remaining <= 0:
                    raise asyncio.TimeoutError
                ref = await asyncio.wait_for(gen.__anext__(), remaining)
                if ts.cancel_reason is not None:
                    # Python < 3.12: wait_for drops a cancel that lands as its inner await
                    # completes; the reason set by cancel() makes the cancel stick anyway.
                    raise asyncio.CancelledError
                for kind, data in await ref:
                    if kind == RESULT:
                        heard_end = True
                        return Outcome("ok", data, elapsed_s=core.clock() - started)
                    if kind == ERROR:
                        heard_end = True
                        return self._failed(data)
                    if kind == INTERRUPT:
                        heard_end = True
                        return Outcome("interrupt", data, elapsed_s=data.get("elapsed_s") or 0.0)
                    if kind == ev.TOKENS:
                        if info.first_token is None:
                            info.first_token = core.clock()
                        self.partial.append(data["text"])
                        self.streamed += data.get("n", 1)
                        if core.degraded_now(ts):
                            self.held.append(data["text"])  # degraded mid-step: the rest comes as one message
                            continue
                    else:
                        self._release_held()
                    # An agent's own event: relayed with its fields as they are, plus the attempt.
                    fields = dict(data) if isinstance(data, dict) else {"value": data}
                    fields["attempt"] = info.attempt
                    core.append(ts, kind, role, fields)
        except asyncio.TimeoutError:
            elapsed = core.clock() - started
            self._release_held()
            self._emit(ev.STEP_TIMED_OUT, round=info.round, limit_s=timeout, elapsed_s=round(elapsed, 3),
                       partial="".join(self.partial)[-4000:], slot=slot.name, **core.budget.cost(self.streamed, level))
            return Outcome("timeout", {"why": f"exceeded its step timeout of {timeout:.3f}s "
                                              f"(elapsed: {elapsed:.1f}s)"}, signal=TIMEOUT, elapsed_s=elapsed)
        except StopAsyncIteration:
            heard_end = True  # the actor is fine; its step returned nothing we understand
            return Outcome("crash", {"why": "ended its step without a result"})
        except RayError as exc:
            died = isinstance(exc, (RayActorError, ActorDiedError, ActorUnavailableError))
            self._release_held()
            self._emit(ev.AGENT_CRASHED if died else ev.STREAM_FAILED, round=info.round, slot=slot.name,
                       error=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:500],
                       **core.budget.cost(self.streamed, level))
            if died:
                return Outcome("crash", {"why": f"crashed (its actor {slot.name} died)"}, signal=ACTOR_DEATH)
            return Outcome("crash", {"why": f"lost its event stream ({type(exc).__name__}); its actor "
                                            f"{slot.name} was replaced"}, signal=STREAM_FAILURE)
        finally:
            slot.busy = False
            self._release_held()
            if not heard_end:  # the step may still be running in there: end its process
                core.slots.replace(slot, kill=True)

    def _failed(self, data: dict[str, Any]) -> Outcome:
        info = self.info
        klass = data["error_class"] or "error"
        self._release_held()
        self._emit(ev.STEP_FAILED, round=info.round, error=f"{data['type']}: {data['message']}",
                   transient=data["transient"], error_class=klass, retry_after_s=data.get("retry_after_s"),
                   traceback=data["traceback"][-4000:], **self.core.budget.cost(data.get("tokens"), info.level))
        return Outcome(klass, {"why": f"failed: {data['type']}: {data['message']}",
                               "retry_after_s": data.get("retry_after_s")},
                       elapsed_s=data.get("elapsed_s") or 0.0)


def step_outputs(ts: TaskState, role: str) -> dict[str, Any]:
    """What a step of ``role`` sees: this round's committed outputs of the roles it comes
    after (directly or not), and the other roles' outputs as this round began."""
    before = ancestors(ts.graph, role)
    out = {r: v for r, v in ts.round_outputs.items() if r not in before}
    for r in before:
        if r in ts.committed and r in ts.outputs:
            out[r] = ts.outputs[r]
    return out


async def run_step(core: Core, ts: TaskState, role: str, rnd: int) -> None:
    """Run ``role``'s step of round ``rnd`` until it commits; :class:`TaskEnds` when the
    retry policy gives up, :class:`TaskWaits` when the step asked a person
    (``ctx.interrupt``). A step interrupted by a crash, or by its own question, runs
    again under its own attempt number, so its idempotency key is the same and an
    idempotent side effect is not repeated."""
    attempt = ts.inflight.get(role, 1) - 1
    while True:
        attempt += 1
        streaming, degraded = core.mode_for(ts)
        level = 1 if degraded else core.budget.fit(ts, role, core.emit)
        info = StepInfo(task_id=ts.id, role=role, round=rnd, attempt=attempt, level=level,
                        streaming=streaming, degraded=degraded)
        inbox = (ts.inbox_seen.get(role, 0), len(ts.inbox))  # the messages this attempt sees
        try:
            slot = await core.bind(ts, role)
        except SlotLost as lost:  # counts as a crash of this attempt: retried by policy
            info.slot = lost.slot.name
            core.emit(ts, ev.AGENT_CRASHED, role, attempt=attempt, round=rnd, slot=lost.slot.name,
                      error=str(lost), **core.budget.cost(0, level))
            out = Outcome("crash", {"why": f"crashed ({lost})"}, signal=ACTOR_DEATH)
        else:
            info.slot = slot.name
            out = await StepAttempt(core, ts, info, slot, step_outputs(ts, role), inbox).run()
        policy = core.cfg.retry.for_class(out.kind)
        out.retryable = out.kind in core.cfg.retry.retry_on
        out.exhausted = not out.ok and (not out.retryable or attempt >= policy.max_attempts)
        await core.hooks.after_step(ts, info, out)
        if out.kind == "interrupt":  # it asked a person: it runs again, same attempt, once answered
            payload = out.data.get("payload")
            core.emit(ts, ev.INPUT_REQUESTED, role, request=ts.asked + 1, round=rnd, attempt=attempt,
                      index=out.data.get("index", 0), payload=payload if plain(payload) else repr(payload)[:2000],
                      **core.budget.cost(out.data.get("tokens"), level))
            raise TaskWaits
        if out.ok:
            output, requests = out.data["output"], list(out.data["round_requests"])
            core.hooks.on_commit(ts, role, output, out.data["state"], requests)
            apply_commit(ts, role, output, out.data["state"], requests)
            core.emit(ts, ev.STEP_FINISHED, role, round=rnd, attempt=attempt, elapsed_s=out.data.get("elapsed_s"),
                      output=output if plain(output) else repr(output)[:2000], round_requests=requests,
                      inbox_upto=inbox[1], **core.budget.cost(out.data.get("tokens"), level))
            await core.barrier()  # committed = durable
            return
        if out.exhausted:
            tried = f" after {attempt} attempt(s)" if attempt > 1 else ""
            raise TaskEnds(TIMED_OUT if out.kind == "timeout" else FAILED,
                           f"agent {role!r} of task {ts.id} {out.data['why']}{tried}",
                           reason="step_timeout" if out.kind == "timeout" else "step_failed")
        delay = backoff_s(policy, attempt, core.rng, out.data.get("retry_after_s"))
        core.emit(ts, ev.RETRYING, role, round=rnd, attempt=attempt + 1, reason=out.kind,
                  delay_s=round(delay, 3), retry_after_s=out.data.get("retry_after_s"))
        await asyncio.sleep(delay)
