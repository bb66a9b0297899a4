"""``model: {backend: callable, callable: "pkg.mod:fn"}``: any Python function as the model.

The function takes OpenAI-style messages and options (at least ``agent``,
``task_id``, ``level``, ``stream``) and returns a string or an iterator of strings.
With ``tools: true`` it also gets ``tools`` (OpenAI's list) and may yield tool calls,
as :class:`ToolCall` items or ``{"name": ..., "arguments": ...}`` mappings, after its text.
"""

from __future__ import annotations

import importlib
import json
from typing import Any, Callable, Iterator, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..errors import ModelError
from .base import Message, Model, ToolCall, Usage


def resolve(target: Any) -> Callable[..., Any]:
    if callable(target):
        return target
    mod_name, _, attr = str(target).partition(":")
    try:
        fn = getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ModelError(f"model.callable: cannot load {target!r} ({exc}); "
                         "write it as 'package.module:function' importable on every node") from None
    if not callable(fn):
        raise ModelError(f"model.callable: {target!r} is not callable")
    return fn


class CallableModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    backend: Literal["callable"] = "callable"
    callable: Any = Field(description="a function, or 'package.module:function'")
    tools: bool = Field(default=False, description="the function takes tools= and may yield tool calls")

    @field_validator("callable")
    @classmethod
    def _check(cls, v: Any) -> Any:
        if callable(v):
            return v
        if isinstance(v, str) and ":" in v and all(v.partition(":")[::2]):
            return v
        raise ValueError("must be a function or an import path 'package.module:function'")


class CallableModel(Model):
    """Wraps ``fn(messages, **options) -> str | Iterator[str]``.

    Examples:
        >>> m = CallableModel(CallableModelConfig(callable=lambda messages, **o: "ok " + o["agent"]))
        >>> m.complete([], agent="coder")
        'ok coder'
    """

    name = "callable"

    def __init__(self, config: CallableModelConfig) -> None:
        self.fn = resolve(config.callable)
        self.supports_tools = config.tools

    def turn(self, messages: list[Message], tools: list[dict[str, Any]] | None = None,
             **options: Any) -> Iterator[str | ToolCall | Usage]:
        if not self.supports_tools:
            yield from super().turn(messages, tools, **options)
            return
        options.setdefault("stream", True)
        out = self.fn(messages, tools=tools, **options)
        for i, item in enumerate([out] if isinstance(out, str) else out):
            if isinstance(item, (ToolCall, Usage)):
                yield item
            elif isinstance(item, dict):
                args = item.get("arguments", "")
                yield ToolCall(name=str(item.get("name", "")), id=str(item.get("id") or f"call_{i}"),
                               arguments=args if isinstance(args, str) else json.dumps(args))
            else:
                yield str(item)

    def stream(self, messages: list[Message], **options: Any) -> Iterator[str]:
        options.setdefault("stream", True)
        out = self.fn(messages, **options)
        if isinstance(out, str):
            yield out
        else:
            for tok in out:
                yield str(tok)
