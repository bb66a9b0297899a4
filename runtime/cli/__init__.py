"""``threadbound``: run a task from the terminal, follow or inspect a pool, check a config.

    threadbound run examples/fizzbuzz --config examples/scripted/fizzbuzz.yaml   # the demo
    threadbound run examples/fizzbuzz --json          # events as JSON lines, for scripts
    threadbound run examples/fizzbuzz --level auto    # let the task's size pick its reasoning level
    threadbound tasks --address auto                  # tasks of a running (detached) pool
    threadbound health --address auto                 # its health mode and signals
    threadbound metrics --address auto                # where it serves Prometheus metrics
    threadbound top --address auto                    # a live view of it, refreshed in place; q quits
    threadbound resume                                # restart a crashed pool from its snapshots
    threadbound snapshots ls                          # what is in the snapshot directory
    threadbound config check configs/runtime.yaml     # validate a config file
    threadbound doctor                                # which sandbox layers work here, proved by probes
    threadbound alerts --config runtime.yaml > alerts.yml   # Prometheus alert rules from its thresholds
    threadbound serve                                 # the HTTP gateway: REST, SSE, WebSocket, a web page
    threadbound approve TASK --address auto           # a person's part: approve, reject, respond, send

Exit codes: 0 the task succeeded, 1 it did not, 2 bad input or configuration, 130
interrupted (Ctrl-C).

The package, by floor: ``main`` builds the parser (every command's flags and examples)
and runs the command named. One module per group of commands: ``run`` (``run`` and
``resume``: input checks before Ray, following, Ctrl-C, the prompt of ``run --approve``),
``serve`` (the gateway, and ``run --gateway``), ``top``, ``status`` (``tasks``,
``health``, ``metrics``), ``answers`` (``respond``, ``approve``, ``reject``, ``send``) and
``offline`` (``snapshots``, ``config``, ``alerts``, ``doctor``: no Ray). Commands import
only ``common`` (what they share: bad input, config, Ray, attaching to a pool) and
``render`` (a task shown to a person), never ``main`` nor each other.
"""

# The function (the console script's ``threadbound.runtime.cli:main``); the module of the
# same name stays importable as ``threadbound.runtime.cli.main``.
from .main import main

__all__ = ["main"]
