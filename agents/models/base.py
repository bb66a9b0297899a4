"""The one small interface every model backend implements."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterator

Message = dict[str, Any]  # OpenAI-style {"role": ..., "content": ...} (and tool_calls / tool_call_id)

_TOKENISH = re.compile(r"\w+|[^\w\s]+")


def count_tokens(text: str) -> int:
    """A rough token count (words and runs of punctuation) for answers that came whole."""
    return len(_TOKENISH.findall(text))


@dataclass(frozen=True)
class ToolCall:
    """A tool call the model made: the tool's ``name`` and its ``arguments`` as the JSON
    text the model sent (it may be malformed: the caller tells the model so, as a tool error).

    ``id`` pairs the call with its result (OpenAI's ``tool_call_id``)."""

    name: str
    arguments: str
    id: str = ""


@dataclass(frozen=True)
class Usage:
    """Token counts the model server reported for one answer (OpenAI's ``usage``)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0


class Model:
    """A chat model that can stream its answer token by token, or not.

    Backends implement :meth:`stream`; :meth:`complete` joins it unless a backend
    has a cheaper non-streaming call. ``options`` carry at least ``agent`` (the
    role), ``task_id``, ``level`` and ``stream``, and the level's ``model``,
    ``max_tokens`` and ``temperature`` when it sets them; backends ignore what they do
    not use.

    Tool calling: :meth:`turn` is one assistant turn with tools offered (OpenAI's
    ``tools`` list); it yields text tokens, then :class:`ToolCall` items, then at most
    one :class:`Usage`. Backends whose ``supports_tools`` is False answer in text only
    (the default :meth:`turn`); the tool-using coder then speaks a plain-text tool
    protocol with them.

    Examples:
        >>> class Parrot(Model):
        ...     def stream(self, messages, **options):
        ...         yield from messages[-1]["content"].split()
        >>> Parrot().complete([{"role": "user", "content": "hi there"}])
        'hithere'
        >>> list(Parrot().turn([{"role": "user", "content": "hi"}], tools=[]))
        ['hi']
    """

    name: str = "model"
    supports_tools: bool = False

    def stream(self, messages: list[Message], **options: Any) -> Iterator[str]:
        raise NotImplementedError

    def complete(self, messages: list[Message], **options: Any) -> str:
        options["stream"] = False
        return "".join(self.stream(messages, **options))

    def turn(self, messages: list[Message], tools: list[dict[str, Any]] | None = None,
             **options: Any) -> Iterator[str | ToolCall | Usage]:
        """One assistant turn: text tokens, then the tool calls (if the backend supports
        them), then the server's token usage (if it reports it)."""
        if options.get("stream", True):
            yield from self.stream(messages, **options)
        else:
            yield self.complete(messages, **options)

    def close(self) -> None:
        """Release connections or memory; the default has nothing to release."""
