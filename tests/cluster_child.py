"""Running a multi-node scenario in a child process (a process joins one Ray, and the
session's Ray is not a cluster): the test file runs itself as a script against a
``ray.cluster_utils.Cluster`` of its own and prints its findings as one JSON line. The
child runs in the background while the session's first tests run (``tests/background.py``)."""

from __future__ import annotations

import json
import os
import sys

import background


def scenario_job(script: str, out: str, timeout_s: float) -> background.Job:
    """The child that runs ``script out`` (never on the session's Ray; workspace copies
    under ``out``)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # never the session's Ray
    env["THREADBOUND_WORKSPACES"] = os.path.join(out, "copies")
    os.makedirs(out, exist_ok=True)
    name = os.path.splitext(os.path.basename(script))[0]
    return background.Job(name, [sys.executable, os.path.abspath(script), out], out, env, timeout_s)


def run_scenario(job: background.Job) -> dict:
    """The JSON of the child's last ``{`` line (waiting for it), or a failure showing its output."""
    got = background.result(job)
    lines = [ln for ln in got.output.splitlines() if ln.startswith("{")]
    assert got.returncode == 0 and lines, f"exit {got.returncode} after {got.seconds:.0f} s\n{got.output[-9000:]}"
    return json.loads(lines[-1])
