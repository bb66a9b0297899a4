"""``threadbound.client``: the Python client of the HTTP gateway.

This directory is installed as the package ``threadbound.client`` (see pyproject.toml);
the implementation lives in ``threadbound.runtime.gateway.client``, so both names give
the very same classes.

Examples:
    >>> from threadbound.client import GatewayClient          # doctest: +SKIP
    >>> gw = GatewayClient("http://127.0.0.1:8420", token)   # doctest: +SKIP
    >>> task_id = gw.submit({"goal": "fix it", "agents": ["coder"]})["task_id"]   # doctest: +SKIP
    >>> [e.kind for e in gw.follow(task_id)][-1]             # doctest: +SKIP
    'succeeded'
"""

from threadbound.runtime.gateway.client import AsyncGatewayClient, GatewayClient, GatewayError

__all__ = ["GatewayClient", "AsyncGatewayClient", "GatewayError"]
