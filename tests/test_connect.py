"""Joining a cluster at an address nothing answers at fails at once, naming ray.address:
one TCP connect tells a refused port or an unknown host (Ray's own client would retry for
about 40 s before saying only that the GCS did not become available)."""

import os
import socket
import subprocess
import sys

import pytest
from ports import free_port

from threadbound.runtime.connect import _refused

pytestmark = pytest.mark.timeout(30)  # Ray's own wait (~40 s) would not fit


def closed_port() -> int:
    return free_port()  # nothing listens there


def test_a_command_given_an_address_nobody_listens_at_names_ray_address_without_waiting(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "THREADBOUND_"))}
    env["HOME"] = str(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "threadbound.runtime.cli", "tasks", "--address",
                           f"127.0.0.1:{closed_port()}", "--name", "p"], env=env, capture_output=True,
                          text=True, timeout=25)
    assert proc.returncode == 2, proc.stderr
    assert "ray.address" in proc.stderr and "connection refused" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_the_probe_refuses_only_what_surely_has_no_cluster():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        assert _refused(f"127.0.0.1:{server.getsockname()[1]}") is None  # something listens
    assert "refused" in _refused(f"127.0.0.1:{closed_port()}")
    assert "does not resolve" in _refused("no-such-host.invalid:6379")
    assert "not a TCP port" in _refused("127.0.0.1:70000")
    assert _refused("not an address") is None  # left to ray.init, which names it
