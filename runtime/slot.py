"""The inside of an agent actor ("slot"): binds an agent, runs its steps, batches tokens.

:class:`SlotWorker` is a plain class; ``runtime.actors`` wraps it with ``ray.remote``
(``max_concurrency=1``: one thread, its own process). One binding = one fresh agent
instance for one role of one task; its state is restored from the committed state
the supervisor sends. :meth:`SlotWorker.run_step` is a generator: every item it
yields is a list of ``(kind, data)`` events, and the last item carries the step's
outcome (``__result__`` or ``__error__``), so partial output is never lost.
"""

from __future__ import annotations

import gc
import inspect
import os
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Iterator

import cloudpickle

from threadbound.agents.base import Agent, StepContext
from threadbound.agents.errors import TransientError
from threadbound.agents.models import build_model

RESULT = "__result__"
ERROR = "__error__"


@dataclass
class StepRequest:
    """What the supervisor sends for one step (plain, picklable data only)."""

    binding: str
    agent_blob: bytes
    task_id: str
    role: str
    goal: str
    workspace: str | None
    round: int
    attempt: int
    idempotency_key: str
    inputs: dict[str, Any]
    outputs: dict[str, Any]
    feedback: list[str]
    level: int
    streaming: bool
    model_config: Any
    token_batch_size: int
    token_interval_s: float
    state: Any = None
    has_state: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


class _TokenBatcher:
    """Groups tokens: the first token goes out at once; later ones wait until
    ``batch_size`` tokens are pending or ``interval_s`` has passed since the last flush."""

    def __init__(self, batch_size: int, interval_s: float, clock=time.monotonic) -> None:
        self.batch_size = batch_size
        self.interval_s = interval_s
        self.clock = clock
        self.parts: list[str] = []
        self.last_flush = float("-inf")

    def add(self, token: str) -> bool:
        """Add a token; True when the pending tokens should be flushed now."""
        self.parts.append(token)
        return len(self.parts) >= self.batch_size or self.clock() - self.last_flush >= self.interval_s

    def take(self) -> tuple[str, Any] | None:
        if not self.parts:
            return None
        text, n = "".join(self.parts), len(self.parts)
        self.parts = []
        self.last_flush = self.clock()
        return ("tokens", {"text": text, "n": n})


class SlotWorker:
    """One agent actor's worth of logic. Not thread-safe: one step at a time, by design."""

    def __init__(self, slot_name: str) -> None:
        self.slot_name = slot_name
        self.binding: str | None = None
        self.agent: Agent | None = None
        self.bindings = 0
        self._classes: dict[bytes, type] = {}
        self._models: dict[str, Any] = {}

    def ping(self) -> dict[str, Any]:
        return {"slot": self.slot_name, "pid": os.getpid(), "binding": self.binding, "bindings": self.bindings}

    def release(self) -> int:
        """Drop the bound agent so the slot is clean for its next binding."""
        self.agent = None
        self.binding = None
        gc.collect()
        return self.bindings

    def _bind(self, req: StepRequest) -> Agent:
        if self.binding == req.binding and self.agent is not None:
            return self.agent
        self.release()
        cls = self._classes.get(req.agent_blob)
        if cls is None:
            cls = cloudpickle.loads(req.agent_blob)
            self._classes[req.agent_blob] = cls
        agent = cls()
        if req.has_state:
            agent.set_state(req.state)
        self.agent, self.binding = agent, req.binding
        self.bindings += 1
        return agent

    def _model(self, config: Any):
        if config is None:
            return None
        key = config.model_dump_json() if hasattr(config, "model_dump_json") else repr(config)
        model = self._models.get(key)
        if model is None:
            model = self._models[key] = build_model(config)
        return model

    def run_step(self, req: StepRequest) -> Iterator[list[tuple[str, Any]]]:
        """Run one step of the bound agent, yielding batches of events, outcome last."""
        started = time.monotonic()
        batcher = _TokenBatcher(req.token_batch_size, req.token_interval_s)
        collected: list[str] = []  # non-streaming: tokens become one final message
        ctx: StepContext | None = None

        def drain(out: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
            if ctx is not None and ctx._pending:
                tok = batcher.take()
                if tok:
                    out.append(tok)
                out.extend(ctx._pending)
                ctx._pending.clear()
            return out

        try:
            agent = self._bind(req)
            ctx = StepContext(
                task_id=req.task_id, role=req.role, goal=req.goal, workspace=req.workspace,
                round=req.round, attempt=req.attempt, idempotency_key=req.idempotency_key,
                inputs=req.inputs, outputs=req.outputs, feedback=list(req.feedback),
                level=req.level, streaming=req.streaming, model=self._model(req.model_config),
            )
            result = agent.step(ctx)
            if inspect.isgenerator(result):
                gen = result
                while True:
                    try:
                        item = next(gen)
                    except StopIteration as stop:
                        output = stop.value
                        break
                    out = drain([])
                    if isinstance(item, str):
                        if not req.streaming:
                            collected.append(item)
                        elif batcher.add(item):
                            out.append(batcher.take())
                    elif item is not None:
                        raise TypeError(
                            f"agent {req.role!r} yielded {type(item).__name__}; a step yields "
                            "str tokens (use ctx.emit(kind, data) for other events)"
                        )
                    if out:
                        yield out
            else:
                output = result
            final = drain([])
            tok = batcher.take()
            if tok:
                final.append(tok)
            if collected:
                final.append(("message", {"text": "".join(collected)}))
            state = agent.get_state()
            final.append((RESULT, {
                "output": output, "state": state, "round_requests": list(ctx._round_requests),
                "elapsed_s": time.monotonic() - started,
            }))
            yield final
        except GeneratorExit:
            raise
        except BaseException as exc:  # the agent's failure becomes data, never a lost stream
            out = drain([]) if ctx is not None else []
            tok = batcher.take()
            if tok:
                out.append(tok)
            if collected:
                out.append(("message", {"text": "".join(collected)}))
            out.append((ERROR, {
                "type": type(exc).__name__,
                "message": str(exc) or type(exc).__name__,
                "transient": isinstance(exc, TransientError),
                "retry_after_s": getattr(exc, "retry_after_s", None),
                "traceback": traceback.format_exc(limit=20),
                "elapsed_s": time.monotonic() - started,
            }))
            yield out
