"""The one small interface every model backend implements."""

from __future__ import annotations

import re
from typing import Any, Iterator

Message = dict[str, str]  # OpenAI-style {"role": ..., "content": ...}

_TOKENISH = re.compile(r"\w+|[^\w\s]+")


def count_tokens(text: str) -> int:
    """A rough token count (words and runs of punctuation) for answers that came whole."""
    return len(_TOKENISH.findall(text))


class Model:
    """A chat model that can stream its answer token by token, or not.

    Backends implement :meth:`stream`; :meth:`complete` joins it unless a backend
    has a cheaper non-streaming call. ``options`` carry at least ``agent`` (the
    role), ``task_id``, ``level`` and ``stream``, and the level's ``model``,
``max_tokens`` and ``temperature`` when it sets them; backends ignore what they do
not use.

    Examples:
        >>> class Parrot(Model):
        ...     def stream(self, messages, **options):
        ...         yield from messages[-1]["content"].split()
        >>> Parrot().complete([{"role": "user", "content": "hi there"}])
        'hithere'
    """

    name: str = "model"

    def stream(self, messages: list[Message], **options: Any) -> Iterator[str]:
        raise NotImplementedError

    def complete(self, messages: list[Message], **options: Any) -> str:
        options["stream"] = False
        return "".join(self.stream(messages, **options))

    def close(self) -> None:
        """Release connections or memory; the default has nothing to release."""
