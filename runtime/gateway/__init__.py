"""The HTTP gateway (``threadbound serve``): tasks over REST, event streams over SSE and
WebSocket that resume by offset, bearer-token auth, a live web page; and its Python
client (also importable as ``threadbound.client``).

Public names::

    # Serving
    Gateway, GatewaySettings, create_app, Tokens
    # The client
    GatewayClient, AsyncGatewayClient, GatewayError
"""

from typing import TYPE_CHECKING

from .._lazy import lazy_names

# The client is light (httpx); the app pulls Starlette in: each loads on first use.
_WHERE = {"Gateway": "app", "GatewaySettings": "app", "create_app": "app", "Tokens": "auth",
          "GatewayClient": "client", "AsyncGatewayClient": "client", "GatewayError": "client"}

if TYPE_CHECKING:
    from .app import Gateway, GatewaySettings, create_app
    from .auth import Tokens
    from .client import AsyncGatewayClient, GatewayClient, GatewayError


__getattr__, __dir__ = lazy_names(__name__, _WHERE, globals())


__all__ = [
    # Serving
    "Gateway", "GatewaySettings", "create_app", "Tokens",
    # The client
    "GatewayClient", "AsyncGatewayClient", "GatewayError",
]
