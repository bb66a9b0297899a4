"""How a step crosses between the supervisor and an agent actor: as bytes.

A step's request goes to the actor's ``start_step`` as ``pack(request)``; the actor's
reply (the step's first batch) and each item of its event stream come back packed the
same way. Ray moves bytes as they are, but serializes a Python object through its own
layers (msgpack, then cloudpickle, whose per-object hook runs in Python for every dict,
list and string). Measured on this project's 2-core machine, 4 callers, a pool-sized
request and a short step's reply: 0.87-1.02 ms of the actor's CPU and 0.63-0.75 ms of
the caller's per call as objects, 0.61 and 0.53 ms as bytes (``scripts/bench.py
--speed`` shows what it does to the pool).

:func:`pack` uses the standard pickler, and cloudpickle for what that cannot do (a class
defined in a script or shipped by value, a lambda in an agent's output): the same two
ways Ray would have used, in the same trust: :func:`unpack` is ``pickle.loads``, and
is only ever called on what the pool's own processes packed (the supervisor and its
agent actors: Ray's own deserializer would have unpickled the same bytes). Text a model
wrote travels inside as ``str`` data and is never unpickled as code
(``tests/test_wire.py`` proves it).
"""

from __future__ import annotations

import pickle
from typing import Any

import cloudpickle

PROTOCOL = 5


def pack(obj: Any) -> bytes:
    """``obj`` as bytes for the other side of a step's call (see the module docstring)."""
    try:
        return pickle.dumps(obj, protocol=PROTOCOL)
    except Exception:  # e.g. a class defined by value: what only cloudpickle can pickle
        return cloudpickle.dumps(obj, protocol=PROTOCOL)


def unpack(data: bytes) -> Any:
    """What :func:`pack` made, back as objects."""
    return pickle.loads(data)
