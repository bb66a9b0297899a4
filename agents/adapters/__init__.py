"""Agents written for other frameworks, run as threadbound roles.

Each adapter is an :class:`~threadbound.agents.Agent` subclass that runs the framework's
agent inside one step, with what the runtime gives every role: its own actor, the caps,
the step deadline, the sandbox, the stream, the task's model config and cost budget, and
committed state. Each framework is an optional extra; the classes import without it, and
a pool refuses a role whose extra is missing (a ``ConfigError`` naming the role and the
``pip install`` line) before Ray starts.

Public names::

    # The adapters
    MiniSweAgent          pip install -e '.[mini-swe-agent]'
    OpenAIAgentsRole      pip install -e '.[openai-agents]'
    LangGraphRole         pip install -e '.[langgraph]'
    # Helpers
    chat_model            a LangChain chat model on the task's model config
    import_openai_agents  the Agents SDK's ``agents`` module, whatever the working directory
    # Events they emit and the error of a missing extra
    TOOL_CALL, TOOL_RESULT, NODE_UPDATE, AGENT_UPDATED, AdapterNotInstalled
"""

from ._common import (
    AGENT_UPDATED, NODE_UPDATE, TOOL_CALL, TOOL_RESULT, AdapterNotInstalled, import_openai_agents,
)
from ._langgraph import LangGraphRole, chat_model
from ._minisweagent import MiniSweAgent
from ._openai_agents import OpenAIAgentsRole

__all__ = [
    # The adapters
    "MiniSweAgent", "OpenAIAgentsRole", "LangGraphRole",
    # Helpers
    "chat_model", "import_openai_agents",
    # Events and errors
    "TOOL_CALL", "TOOL_RESULT", "NODE_UPDATE", "AGENT_UPDATED", "AdapterNotInstalled",
]
