"""Model backends behind one interface; :func:`build_model` turns config into one."""

from __future__ import annotations

from typing import Annotated, Union

from pydantic import Field

from .base import Message, Model
from .simulated import FaultRule, SimulatedModel, SimulatedModelConfig

# The `model:` section of the runtime config: one member per backend, keyed by `backend`.
ModelConfig = Annotated[Union[SimulatedModelConfig], Field(discriminator="backend")]


def build_model(config) -> Model:
    """Make the backend a ``model:`` config section describes.

    Examples:
        >>> build_model(SimulatedModelConfig()).name
        'simulated'
    """
    if isinstance(config, SimulatedModelConfig):
        return SimulatedModel(config)
    raise TypeError(f"no model backend for {type(config).__name__}")


__all__ = [
    "Message", "Model", "ModelConfig", "build_model",
    "SimulatedModel", "SimulatedModelConfig", "FaultRule",
]
