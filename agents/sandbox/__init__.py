"""The trust boundary: untrusted commands (tests a model wrote) run here.

See :mod:`threadbound.agents.sandbox.runner` for the layers and why bubblewrap.
"""

from .probe import Capabilities, capabilities
from .runner import run
from .settings import (
    ISOLATION_MODES, Layer, SandboxLimits, SandboxResult, SandboxSettings, SandboxUnavailable,
)

__all__ = [
    "run", "SandboxLimits", "SandboxSettings", "SandboxResult", "Layer", "SandboxUnavailable",
    "ISOLATION_MODES", "capabilities", "Capabilities",
]
