"""Observability: the pool's Prometheus metrics (``catalog``: every name, once), how they
are recorded (``recorder``), the ``/metrics`` endpoint (``server``), and alert rules
generated from the config (``alerts``). The supervisor feeds them through one hook of
its own (``runtime.supervisor.metrics_hook``); nothing here imports the supervisor."""

from .catalog import METRICS
from .recorder import PoolMetrics, View
from .server import MetricsServer, check_port

__all__ = ["METRICS", "MetricsServer", "PoolMetrics", "View", "check_port"]
