"""Running a multi-node scenario in a child process (a process joins one Ray, and the
session's Ray is not a cluster): the test file runs itself as a script against a
``ray.cluster_utils.Cluster`` of its own and prints its findings as one JSON line."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def run_scenario(script: str, out: str, timeout_s: float) -> dict:
    """Run ``script out`` in a child process (never on the session's Ray; workspace copies
    under ``out``); the JSON of its last ``{`` line, or a failure showing its output."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # never the session's Ray
    env["THREADBOUND_WORKSPACES"] = os.path.join(out, "copies")
    proc = subprocess.run([sys.executable, os.path.abspath(script), out], cwd=out, env=env,
                          capture_output=True, text=True, timeout=timeout_s)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert proc.returncode == 0 and lines, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads(lines[-1])
