"""The one small interface every model backend implements."""

from __future__ import annotations

from typing import Any, Iterator

Message = dict[str, str]  # OpenAI-style {"role": ..., "content": ...}


class Model:
    """A chat model that can stream its answer token by token, or not.

    Backends implement :meth:`stream`; :meth:`complete` joins it unless a backend
    has a cheaper non-streaming call. ``options`` carry at least ``agent`` (the
    role), ``task_id``, ``level`` and ``stream``; backends ignore what they do not use.

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
