"""What runs inside the supervisor actor: the core that owns a pool's state, and its parts.

Nothing outside ``runtime`` imports this package; ``runtime.actors`` wraps
:class:`~.core.Supervisor` with ``ray.remote`` (the one place Ray options are given).
"""
