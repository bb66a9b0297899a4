"""``model: {backend: openai, ...}``: any OpenAI-compatible chat-completions server.

vLLM, SGLang, Ollama, llama.cpp's server, OpenAI itself, through the ``openai`` package
(its ``OpenAI`` client, one per backend instance, thread-safe). ``base_url`` and
``api_key`` default to ``OPENAI_BASE_URL`` / ``OPENAI_API_KEY`` as seen by the agent
actor's process. 429 raises :class:`RateLimitError` with the server's Retry-After; 5xx,
refused connections and connect/read timeouts raise :class:`TransientModelError`; other
failures raise :class:`ModelError`. The client's own retries are off (``max_retries=0``):
the runtime's retry policy owns retries, so a failing call is retried once per policy
attempt, with its backoff, its events and its counts, never silently inside a step.

The reasoning level's ``model``, ``max_tokens`` and ``temperature`` arrive as call
options and win over this config's (``max_tokens``: the lower of the two). With
``tools``, :meth:`OpenAIModel.turn` streams the text and accumulates the ``tool_calls``
deltas into whole :class:`ToolCall` items; with ``stream_usage`` (default on) it asks
for ``stream_options: {include_usage: true}`` and yields the server's :class:`Usage`.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterator, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..errors import ModelError, RateLimitError, TransientModelError
from .base import Message, Model, ToolCall, Usage


class OpenAIModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    backend: Literal["openai"] = "openai"
    base_url: str | None = Field(default=None, description="default: $OPENAI_BASE_URL or https://api.openai.com/v1")
    api_key: str | None = Field(default=None, description="default: $OPENAI_API_KEY")
    model: str = "gpt-4o-mini"
    temperature: float = Field(default=0.2, ge=0, le=2)
    max_tokens: int | None = Field(default=None, ge=1)
    timeout_s: float = Field(default=60.0, gt=0, description="connect and per-read timeout")
    tools: bool = Field(default=True, description="the server takes OpenAI tool calls (false: the coder "
                        "speaks its plain-text tool protocol)")
    stream_usage: bool = Field(default=True, description="ask for token usage in streams "
                               "(stream_options.include_usage); false for servers that refuse it")


def _retry_after(headers: Any) -> float | None:
    value = headers.get("Retry-After") if headers is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _detail(exc: Any) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        body = body.get("message") or body
    if body is None:
        response = getattr(exc, "response", None)
        body = response.text if response is not None else exc
    return str(body)[:500]


def _http_errors() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """Timeout and transport exception classes of the HTTP library the openai client uses
    (``httpx``, or ``httpx2`` in newer releases): a stream that breaks mid-way raises them
    unwrapped."""
    import importlib

    timeouts, transport = [], []
    for name in ("httpx", "httpx2"):
        try:
            http = importlib.import_module(name)
        except ImportError:
            continue
        timeouts.append(http.TimeoutException)
        transport += [http.TransportError, http.StreamError]
    return tuple(timeouts), tuple(transport)


class OpenAIModel(Model):
    name = "openai"

    def __init__(self, config: OpenAIModelConfig) -> None:
        self.config = config
        self.base_url = (config.base_url or os.environ.get("OPENAI_BASE_URL") or "https://api.openai.com/v1").rstrip("/")
        self.api_key = config.api_key or os.environ.get("OPENAI_API_KEY") or ""
        self.supports_tools = config.tools
        self._client = None

    def client(self):
        """The ``openai.OpenAI`` client, made on first use (so a config builds without a server)."""
        if self._client is None:
            import openai

            self._client = openai.OpenAI(
                base_url=self.base_url, api_key=self.api_key or "none", max_retries=0,
                timeout=self.config.timeout_s)  # connect, read, write and pool, each
        return self._client

    def _body(self, messages: list[Message], stream: bool, tools: list[dict[str, Any]] | None,
              options: dict[str, Any]) -> dict[str, Any]:
        cfg = self.config
        temperature = options.get("temperature")
        body: dict[str, Any] = {
            "model": options.get("model") or cfg.model, "messages": messages,
            "temperature": cfg.temperature if temperature is None else temperature, "stream": stream,
        }
        limits = [n for n in (cfg.max_tokens, options.get("max_tokens")) if n]
        if limits:
            body["max_tokens"] = min(limits)
        if tools:
            body["tools"] = tools
        if stream and cfg.stream_usage:
            body["stream_options"] = {"include_usage": True}
        if not self.api_key:  # no key: no Authorization header at all (a local server needs none)
            import openai

            body["extra_headers"] = {"Authorization": openai.omit}
        return body

    def _errors(self, exc: Exception, where: str, started: bool) -> Exception:
        """The threadbound error for what the openai client raised."""
        import openai

        timeouts, transport = _http_errors()
        if isinstance(exc, openai.APIStatusError):
            code, detail, headers = exc.status_code, _detail(exc), exc.response.headers
            if code == 429:
                return RateLimitError(f"model server {where} is rate limiting (429): {detail}",
                                      retry_after_s=_retry_after(headers))
            if code >= 500:
                return TransientModelError(f"model server {where} answered {code}: {detail}",
                                           retry_after_s=_retry_after(headers))
            return ModelError(f"model server {where} refused the request ({code}): {detail}")
        if isinstance(exc, (openai.APITimeoutError, *timeouts)):
            return TransientModelError(f"model server {where} was too slow: no answer within "
                                       f"{self.config.timeout_s:g} s (model.timeout_s)")
        if isinstance(exc, openai.APIConnectionError):
            return TransientModelError(f"cannot reach model server {where}: {exc.__cause__ or exc}")
        if isinstance(exc, (*transport, ConnectionError)):
            return TransientModelError(f"model stream from {where} broke: {exc}")
        if isinstance(exc, openai.APIError):  # an error object in the middle of a stream
            return TransientModelError(f"model server {where} error mid-stream: {_detail(exc)}")
        if started and isinstance(exc, (json.JSONDecodeError, ValueError, TypeError, KeyError, AttributeError)):
            return ModelError(f"model server {where} sent a malformed answer"
                              f"{' (stream chunk)' if started else ''}: {type(exc).__name__}: {exc}")
        return exc

    def turn(self, messages: list[Message], tools: list[dict[str, Any]] | None = None,
             **options: Any) -> Iterator[str | ToolCall | Usage]:
        stream = bool(options.get("stream", True))
        body = self._body(messages, stream, tools if self.supports_tools else None, options)
        where = f"{self.base_url} (model {body['model']})"
        import openai

        started = False
        try:
            answer = self.client().chat.completions.create(**body)
            started = True
            if not stream:
                yield from self._whole(answer, where)
                return
            calls: dict[int, dict[str, str]] = {}
            usage = None
            try:
                for chunk in answer:
                    if getattr(chunk, "usage", None) is not None:
                        usage = chunk.usage
                    for choice in chunk.choices or ():
                        delta = choice.delta
                        if delta is None:
                            continue
                        if delta.content:
                            yield delta.content
                        for part in delta.tool_calls or ():
                            call = calls.setdefault(part.index if part.index is not None else len(calls),
                                                    {"id": "", "name": "", "arguments": ""})
                            call["id"] = part.id or call["id"]
                            fn = part.function
                            if fn is not None:
                                call["name"] += fn.name or ""  # sent once, in the first delta
                                call["arguments"] += fn.arguments or ""
            finally:
                answer.close()
            for index in sorted(calls):
                c = calls[index]
                yield ToolCall(name=c["name"], arguments=c["arguments"], id=c["id"] or f"call_{index}")
            if usage is not None:
                yield Usage(usage.prompt_tokens or 0, usage.completion_tokens or 0)
        except (openai.OpenAIError, Exception) as exc:  # noqa: B014  (mapped below; ours pass through)
            if isinstance(exc, ModelError) or isinstance(exc, TransientModelError):
                raise
            mapped = self._errors(exc, where, started)
            if mapped is exc:
                raise
            raise mapped from None

    def _whole(self, answer: Any, where: str) -> Iterator[str | ToolCall | Usage]:
        try:
            message = answer.choices[0].message
        except (AttributeError, IndexError, TypeError):
            raise ModelError(f"model server {where} answer has no choices[0].message: {str(answer)[:300]}") from None
        if message.content:
            yield message.content
        for i, call in enumerate(message.tool_calls or ()):
            fn = getattr(call, "function", None)
            if fn is not None:
                yield ToolCall(name=fn.name or "", arguments=fn.arguments or "", id=call.id or f"call_{i}")
        if getattr(answer, "usage", None) is not None:
            yield Usage(answer.usage.prompt_tokens or 0, answer.usage.completion_tokens or 0)

    def stream(self, messages: list[Message], **options: Any) -> Iterator[str]:
        for item in self.turn(messages, None, **options):
            if isinstance(item, str):
                yield item

    def complete(self, messages: list[Message], **options: Any) -> str:
        options["stream"] = False
        return "".join(self.stream(messages, **options))

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
