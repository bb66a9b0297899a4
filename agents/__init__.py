"""What runs inside an agent actor: the Agent contract, the built-in roles, model backends.

Public names::

    # The contract
    Agent, StepContext, Interrupt
    # Models
    Model, SimulatedModel, SimulatedModelConfig, build_model
    # Errors an agent may raise
    ThreadboundError, AgentError, TransientError, ModelError, TransientModelError, RateLimitError,
    BudgetExhausted
"""

from .base import Agent, Interrupt, StepContext
from .errors import (
    AgentError, BudgetExhausted, ModelError, RateLimitError, ThreadboundError, TransientError,
    TransientModelError,
)
from .models import Model, SimulatedModel, SimulatedModelConfig, build_model

__all__ = [
    # The contract
    "Agent", "StepContext", "Interrupt",
    # Models
    "Model", "SimulatedModel", "SimulatedModelConfig", "build_model",
    # Errors
    "ThreadboundError", "AgentError", "TransientError", "ModelError", "TransientModelError",
    "RateLimitError", "BudgetExhausted",
]
