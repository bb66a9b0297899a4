"""Model backends behind one interface; :func:`build_model` turns config into one."""

from __future__ import annotations

from typing import Annotated, Union

from pydantic import Field

from .base import Message, Model, ToolCall, Usage
from .callable import CallableModel, CallableModelConfig
from .local import LocalModel, LocalModelConfig
from .openai import OpenAIModel, OpenAIModelConfig
from .simulated import FaultRule, ScriptedCall, ScriptedTurn, SimulatedModel, SimulatedModelConfig

# The `model:` section of the runtime config: one member per backend, keyed by `backend`.
ModelConfig = Annotated[
    Union[SimulatedModelConfig, OpenAIModelConfig, CallableModelConfig, LocalModelConfig],
    Field(discriminator="backend"),
]

_BACKENDS = {
    SimulatedModelConfig: SimulatedModel,
    OpenAIModelConfig: OpenAIModel,
    CallableModelConfig: CallableModel,
    LocalModelConfig: LocalModel,
}


def build_model(config) -> Model:
    """Make the backend a ``model:`` config section describes.

    Examples:
        >>> build_model(SimulatedModelConfig()).name
        'simulated'
    """
    try:
        return _BACKENDS[type(config)](config)
    except KeyError:
        raise TypeError(f"no model backend for {type(config).__name__}") from None


__all__ = [
    "Message", "Model", "ModelConfig", "build_model", "ToolCall", "Usage",
    "SimulatedModel", "SimulatedModelConfig", "FaultRule", "ScriptedTurn", "ScriptedCall",
    "OpenAIModel", "OpenAIModelConfig", "CallableModel", "CallableModelConfig",
    "LocalModel", "LocalModelConfig",
]
