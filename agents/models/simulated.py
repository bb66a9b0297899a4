"""A deterministic simulated model for tests and benchmarks: no network, no weights.

Answers come from ``answers`` (per role; a list is indexed by round), else from a
fixed template, optionally padded to ``tokens`` tokens and cut at the call's
``max_tokens`` (the reasoning level's). ``latency_ms`` delays the
first token, ``tokens_per_s`` paces the rest, ``cpu_ms`` burns GIL-holding CPU per
call, and ``faults`` inject errors, hangs and crashes for chosen agents/attempts.

``turns`` script tool-using agents: per role, one turn per model call within a step (the
caller passes ``turn``, from 1; past the end the last one repeats), each some text and
tool calls, the same in every round.
"""

from __future__ import annotations

import json
import os
import re
import time
from typing import Any, Iterator, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..errors import ModelError, RateLimitError, TransientModelError
from .base import Message, Model, ToolCall

_TOKEN = re.compile(r"\s*\S+\s*|\s+")


class FaultRule(BaseModel):
    """Make matching calls fail. Unset matchers match everything."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["error", "transient", "rate_limit", "hang", "crash"] = Field(
        description="error: non-retryable ModelError; transient: TransientModelError; "
        "rate_limit: RateLimitError (429) with retry_after_s; hang: sleep hang_s; crash: the process exits"
    )
    agent: str | None = None
    level: int | None = Field(default=None, ge=1, le=4, description="only calls at this reasoning level")
    streaming: bool | None = Field(default=None, description="only streaming (true) or non-streaming calls")
    attempt: int | None = Field(default=None, ge=1)
    round: int | None = Field(default=None, ge=1)
    goal_contains: str | None = None
    after_tokens: int = Field(default=0, ge=0, description="tokens streamed before the fault")
    hang_s: float = Field(default=3600.0, gt=0)
    retry_after_s: float | None = Field(default=None, ge=0)

    def matches(self, options: dict[str, Any]) -> bool:
        return (
            (self.agent is None or self.agent == options.get("agent"))
            and (self.attempt is None or self.attempt == options.get("attempt"))
            and (self.round is None or self.round == options.get("round"))
            and (self.goal_contains is None or self.goal_contains in str(options.get("goal", "")))
            and (self.level is None or self.level == options.get("level"))
            and (self.streaming is None or self.streaming == bool(options.get("stream", True)))
        )


class ScriptedCall(BaseModel):
    """One tool call of a scripted turn; ``arguments`` as a mapping, or as raw text (which
    may be malformed on purpose)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    arguments: dict[str, Any] | str = Field(default_factory=dict)


class ScriptedTurn(BaseModel):
    """One scripted model answer of a tool-using step: text, then tool calls."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    text: str = ""
    tool_calls: list[ScriptedCall] = Field(default_factory=list)


class SimulatedModelConfig(BaseModel):
    """``model: {backend: simulated, ...}``: the deterministic test model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    backend: Literal["simulated"] = "simulated"
    latency_ms: float = Field(default=0.0, ge=0, description="delay before the first token")
    tokens_per_s: float = Field(default=0.0, ge=0, description="pace of tokens; 0 = no pacing")
    tokens: int | None = Field(default=None, ge=0, description="pad/trim every answer to N tokens")
    cpu_ms: float = Field(default=0.0, ge=0, description="GIL-holding CPU work per call")
    answers: dict[str, str | list[str]] = Field(default_factory=dict)
    turns: dict[str, list[ScriptedTurn]] = Field(default_factory=dict, description="per role: the turns "
                                                 "of a tool-using step, one per model call")
    faults: list[FaultRule] = Field(default_factory=list)


def split_tokens(text: str) -> list[str]:
    """Split text into word-like tokens that join back to the same text."""
    return _TOKEN.findall(text)


def _burn_cpu(ms: float) -> None:
    end = time.perf_counter() + ms / 1000.0
    x = 0
    while time.perf_counter() < end:
        for i in range(200):
            x += i * i


class SimulatedModel(Model):
    """Deterministic scripted model.

    Examples:
        >>> m = SimulatedModel(SimulatedModelConfig(answers={"coder": "done."}))
        >>> m.complete([{"role": "user", "content": "fix it"}], agent="coder")
        'done.'
    """

    name = "simulated"
    supports_tools = True

    def __init__(self, config: SimulatedModelConfig | None = None) -> None:
        self.config = config or SimulatedModelConfig()

    def _answer(self, messages: list[Message], options: dict[str, Any]) -> list[str]:
        role = options.get("agent") or "assistant"
        scripted = self.config.answers.get(role)
        if isinstance(scripted, list) and scripted:
            rnd = max(1, int(options.get("round") or 1))
            text = scripted[min(rnd, len(scripted)) - 1]
        elif isinstance(scripted, str):
            text = scripted
        else:
            prompt = messages[-1]["content"] if messages else ""
            text = f"[{role}] simulated answer to: {prompt[:200]}"
        toks = split_tokens(text)
        n = self.config.tokens
        if n is not None:
            toks = (toks + [f" t{i}" for i in range(len(toks), n)])[:n]
        cap = options.get("max_tokens")
        return toks[:cap] if cap else toks

    def turn(self, messages: list[Message], tools: list[dict[str, Any]] | None = None,
             **options: Any) -> Iterator[str | ToolCall]:
        script = self.config.turns.get(options.get("agent") or "assistant")
        if not script:
            yield from super().turn(messages, tools, **options)
            return
        turn = script[min(max(1, int(options.get("turn") or 1)), len(script)) - 1]
        toks = split_tokens(turn.text)
        cap = options.get("max_tokens")
        toks = toks[:cap] if cap else toks
        if options.get("stream", True):
            yield from self._paced(toks, options)
        else:
            yield "".join(self._paced(toks, options))
        for i, call in enumerate(turn.tool_calls):
            args = call.arguments if isinstance(call.arguments, str) else json.dumps(call.arguments)
            yield ToolCall(name=call.name, arguments=args, id=f"call_{options.get('turn') or 1}_{i}")

    def stream(self, messages: list[Message], **options: Any) -> Iterator[str]:
        yield from self._paced(self._answer(messages, options), options)

    def _paced(self, toks: list[str], options: dict[str, Any]) -> Iterator[str]:
        cfg = self.config
        fault = next((f for f in cfg.faults if f.matches(options)), None)
        if cfg.cpu_ms:
            _burn_cpu(cfg.cpu_ms)
        if cfg.latency_ms:
            time.sleep(cfg.latency_ms / 1000.0)
        delay = 1.0 / cfg.tokens_per_s if cfg.tokens_per_s else 0.0
        fired = False
        for i, tok in enumerate(toks):
            if fault is not None and i == fault.after_tokens:
                fired = True
                self._fail(fault, options)
            if delay and i:
                time.sleep(delay)
            yield tok
        if fault is not None and not fired:
            self._fail(fault, options)

    def _fail(self, fault: FaultRule, options: dict[str, Any]) -> None:
        where = f"agent={options.get('agent')} attempt={options.get('attempt')}"
        if fault.kind == "hang":
            time.sleep(fault.hang_s)
            return
        if fault.kind == "crash":
            os._exit(17)
        if fault.kind == "rate_limit":
            raise RateLimitError(f"simulated rate limit ({where})", retry_after_s=fault.retry_after_s)
        if fault.kind == "transient":
            raise TransientModelError(
                f"simulated transient model failure ({where})", retry_after_s=fault.retry_after_s
            )
        raise ModelError(f"simulated model failure ({where})")
