"""Observability: the pool's Prometheus metrics (``catalog``: every name, once), how they
are recorded (``recorder``) and fed from the supervisor's hooks (``hook``), the
``/metrics`` endpoint (``server``), and alert rules generated from the config
(``alerts``)."""

from .catalog import METRICS
from .hook import MetricsHook
from .recorder import PoolMetrics, View
from .server import MetricsServer, check_port

__all__ = ["METRICS", "MetricsHook", "MetricsServer", "PoolMetrics", "View", "check_port"]
