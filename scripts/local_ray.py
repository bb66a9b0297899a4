"""What every script under scripts/ does before it starts a local Ray.

``isolate(prefix)`` makes a scratch directory and, unless the caller already set
them: a Ray auth token in it (Ray 2.60 would otherwise write ``~/.ray/auth_token``)
and a snapshot signing key (otherwise ``~/.threadbound/snapshot.key``). It puts
``tests/`` (the scripted test agents) and ``scripts/`` on the import path of this
process and, through ``PYTHONPATH``, of the Ray workers it starts.
"""

from __future__ import annotations

import os
import secrets
import sys
import tempfile

SCRIPTS = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.join(os.path.dirname(SCRIPTS), "tests")

for _path in (TESTS, SCRIPTS):
    if _path not in sys.path:
        sys.path.insert(0, _path)


def isolate(prefix: str) -> str:
    """Prepare this process for a local Ray; returns the scratch directory."""
    scratch = tempfile.mkdtemp(prefix=f"threadbound-{prefix}-")
    if "RAY_AUTH_TOKEN_PATH" not in os.environ and "RAY_AUTH_TOKEN" not in os.environ:
        token = os.path.join(scratch, "auth_token")
        with open(os.open(token, os.O_WRONLY | os.O_CREAT, 0o600), "w") as fh:
            fh.write(secrets.token_hex(32))
        os.environ["RAY_AUTH_TOKEN_PATH"] = token
    os.environ.setdefault("THREADBOUND_SNAPSHOT_KEY", secrets.token_hex(32))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [TESTS, SCRIPTS, os.environ.get("PYTHONPATH")]))
    return scratch
