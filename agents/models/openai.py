"""``model: {backend: openai, ...}``: any OpenAI-compatible chat-completions server.

vLLM, Ollama, llama.cpp's server, OpenAI itself. Streams with server-sent events.
``base_url`` and ``api_key`` default to ``OPENAI_BASE_URL`` / ``OPENAI_API_KEY`` as
seen by the agent actor's process. 429 raises :class:`RateLimitError` with the
server's Retry-After; 5xx and connect/read timeouts raise :class:`TransientModelError`;
other failures raise :class:`ModelError`. The reasoning level's ``model``,
``max_tokens`` and ``temperature`` arrive as call options and win over this config's
(``max_tokens``: the lower of the two).
"""

from __future__ import annotations

import json
import os
import socket
import urllib.error
import urllib.request
from typing import Any, Iterator, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..errors import ModelError, RateLimitError, TransientModelError
from .base import Message, Model


class OpenAIModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    backend: Literal["openai"] = "openai"
    base_url: str | None = Field(default=None, description="default: $OPENAI_BASE_URL or https://api.openai.com/v1")
    api_key: str | None = Field(default=None, description="default: $OPENAI_API_KEY")
    model: str = "gpt-4o-mini"
    temperature: float = Field(default=0.2, ge=0, le=2)
    max_tokens: int | None = Field(default=None, ge=1)
    timeout_s: float = Field(default=60.0, gt=0, description="connect and per-read timeout")


def _retry_after(headers: Any) -> float | None:
    value = headers.get("Retry-After") if headers is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


class OpenAIModel(Model):
    name = "openai"

    def __init__(self, config: OpenAIModelConfig) -> None:
        self.config = config
        self.base_url = (config.base_url or os.environ.get("OPENAI_BASE_URL") or "https://api.openai.com/v1").rstrip("/")
        self.api_key = config.api_key or os.environ.get("OPENAI_API_KEY") or ""

    def _request(self, messages: list[Message], stream: bool, options: dict[str, Any]):
        cfg = self.config
        temperature = options.get("temperature")
        body: dict[str, Any] = {
            "model": options.get("model") or cfg.model, "messages": messages,
            "temperature": cfg.temperature if temperature is None else temperature, "stream": stream,
        }
        limits = [n for n in (cfg.max_tokens, options.get("max_tokens")) if n]
        if limits:
            body["max_tokens"] = min(limits)
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream" if stream else "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(f"{self.base_url}/chat/completions", data=json.dumps(body).encode(),
                                     headers=headers, method="POST")
        where = f"{self.base_url} (model {body['model']})"
        try:
            return urllib.request.urlopen(req, timeout=cfg.timeout_s)
        except urllib.error.HTTPError as exc:
            detail = exc.read()[:500].decode("utf-8", "replace")
            if exc.code == 429:
                raise RateLimitError(f"model server {where} is rate limiting (429): {detail}",
                                     retry_after_s=_retry_after(exc.headers)) from None
            if exc.code >= 500:
                raise TransientModelError(f"model server {where} answered {exc.code}: {detail}",
                                          retry_after_s=_retry_after(exc.headers)) from None
            raise ModelError(f"model server {where} refused the request ({exc.code}): {detail}") from None
        except (urllib.error.URLError, socket.timeout, ConnectionError, TimeoutError) as exc:
            reason = getattr(exc, "reason", exc)
            raise TransientModelError(f"cannot reach model server {where}: {reason}") from None

    def stream(self, messages: list[Message], **options: Any) -> Iterator[str]:
        resp = self._request(messages, True, options)
        try:
            for raw in resp:
                line = raw.decode("utf-8", "replace").strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    return
                try:
                    chunk = json.loads(data)
                except json.JSONDecodeError:
                    raise ModelError(f"model server sent a malformed stream chunk: {data[:200]!r}") from None
                if "error" in chunk:
                    raise TransientModelError(f"model server error mid-stream: {chunk['error']}")
                for choice in chunk.get("choices", []):
                    piece = (choice.get("delta") or {}).get("content")
                    if piece:
                        yield piece
        except (socket.timeout, TimeoutError, ConnectionError) as exc:
            raise TransientModelError(f"model stream from {self.base_url} broke: {exc}") from None
        finally:
            resp.close()

    def complete(self, messages: list[Message], **options: Any) -> str:
        resp = self._request(messages, False, options)
        try:
            payload = json.loads(resp.read())
        except (json.JSONDecodeError, socket.timeout, TimeoutError) as exc:
            raise TransientModelError(f"bad or slow answer from {self.base_url}: {exc}") from None
        finally:
            resp.close()
        try:
            return payload["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise ModelError(f"model server answer has no choices[0].message.content: {str(payload)[:300]}") from None
