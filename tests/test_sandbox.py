"""The sandbox contains what generated test code may do (real subprocesses)."""

import sys
import textwrap

import psutil
import pytest

from threadbound.agents import sandbox

LIMITS = sandbox.SandboxLimits(wall_s=10, cpu_s=2, memory_mb=768, max_procs=32)


def run_code(tmp_path, code, limits=LIMITS):
    (tmp_path / "snippet.py").write_text(textwrap.dedent(code))
    return sandbox.run([sys.executable, "snippet.py"], cwd=str(tmp_path), limits=limits)


def test_infinite_loop_is_stopped_by_the_cpu_limit(tmp_path):
    r = run_code(tmp_path, "while True:\n    pass\n")
    assert r.killed in ("cpu_time", "wall_clock") and r.exit_code != 0


def test_sleeping_forever_is_stopped_by_the_wall_clock(tmp_path):
    r = run_code(tmp_path, "import time\ntime.sleep(60)\n", sandbox.SandboxLimits(wall_s=1))
    assert r.killed == "wall_clock" and r.elapsed_s < 5


def live_processes():
    n = 0
    for p in psutil.process_iter(["status"]):
        n += p.info["status"] != psutil.STATUS_ZOMBIE
    return n


def test_fork_bomb_is_contained_and_leaves_nothing_behind(tmp_path):
    before = live_processes()
    r = run_code(tmp_path, """
        import os
        while True:
            try:
                os.fork()
            except OSError:
                pass
    """)
    assert r.killed == "max_procs"
    assert live_processes() < before + 10


def test_ten_gigabyte_allocation_fails_inside_the_sandbox(tmp_path):
    r = run_code(tmp_path, "x = bytearray(10 * 1024 ** 3)\n")
    assert r.exit_code != 0 and "MemoryError" in r.output


def test_no_network_not_even_loopback(tmp_path):
    ok, why = sandbox.namespaces_available()
    if not ok:
        pytest.skip(why)
    r = run_code(tmp_path, """
        import socket
        s = socket.socket()
        s.settimeout(2)
        s.connect(("127.0.0.1", 22))
        print("CONNECTED")
    """)
    assert r.network_isolated and "CONNECTED" not in r.output and "unreachable" in r.output


def test_environment_is_scrubbed(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "ray-secret")
    r = run_code(tmp_path, "import os\nprint(sorted(os.environ.items()))\n")
    assert "secret" not in r.output and "PATH" in r.output
    assert str(tmp_path) in r.output  # HOME and TMPDIR point into the workspace


def test_daemonised_grandchild_is_killed_too(tmp_path):
    marker = tmp_path / "alive"
    r = run_code(tmp_path, f"""
        import os, time
        if os.fork() == 0:
            os.setsid()
            time.sleep(2)
            open({str(marker)!r}, "w").write("still here")
            os._exit(0)
        print("parent done")
    """)
    assert r.exit_code == 0
    import time
    time.sleep(2.5)
    assert not marker.exists()


def test_missing_command_is_reported_not_raised(tmp_path):
    r = sandbox.run(["no-such-command-xyz"], cwd=str(tmp_path))
    assert r.exit_code == 127
