"""The sandbox contains what generated test code may do (real subprocesses)."""

import os
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


def processes_with(marker):
    return [p for p in psutil.process_iter(["cmdline", "status"])
            if marker in " ".join(p.info["cmdline"] or []) and p.info["status"] != psutil.STATUS_ZOMBIE]


def test_fork_bomb_is_contained_and_leaves_nothing_behind(tmp_path):
    marker = f"threadbound-fork-bomb-{os.getpid()}"
    (tmp_path / "bomb.py").write_text(textwrap.dedent("""
        import os
        while True:
            try:
                os.fork()
            except OSError:
                pass
    """))
    r = sandbox.run([sys.executable, "bomb.py", marker], cwd=str(tmp_path), limits=LIMITS)
    assert r.killed == "max_procs"
    assert not processes_with(marker)  # every copy of the bomb is gone when run() returns


def test_ten_gigabyte_allocation_fails_inside_the_sandbox(tmp_path):
    r = run_code(tmp_path, "x = bytearray(10 * 1024 ** 3)\n")
    assert r.exit_code != 0 and "MemoryError" in r.output


def test_no_network_not_even_loopback(tmp_path):
    r = run_code(tmp_path, """
        import socket
        s = socket.socket()
        s.settimeout(2)
        s.connect(("127.0.0.1", 22))
        print("CONNECTED")
    """)
    assert r.network_isolated and r.layer("network").applied
    assert "CONNECTED" not in r.output
    assert "unreachable" in r.output or "Permission denied" in r.output  # no route, or Landlock refused it


def test_environment_is_scrubbed(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "ray-secret")
    r = run_code(tmp_path, "import os\nprint(sorted(os.environ.items()))\n")
    assert "secret" not in r.output and "PATH" in r.output
    assert "('HOME', '/tmp')" in r.output  # the sandbox's own empty /tmp, not the pool user's home


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


def test_required_isolation_refuses_to_run_when_bubblewrap_cannot_start(tmp_path):
    # Given: a pool whose bwrap is missing, with the default isolation (required)
    marker = tmp_path / "ran"
    settings = sandbox.SandboxSettings(bwrap=str(tmp_path / "no-such-bwrap"))
    # When / Then: the command never runs, and the error says how to fix it
    with pytest.raises(sandbox.SandboxUnavailable) as err:
        sandbox.run([sys.executable, "-c", f"open({str(marker)!r}, 'w')"], cwd=str(tmp_path), settings=settings)
    assert not marker.exists()
    message = str(err.value)
    assert "install bubblewrap" in message and "user namespaces" in message and "best_effort" in message


@pytest.mark.skipif(os.geteuid() == 0, reason="as root without bwrap the run drops to a uid that cannot reach this "
                    "interpreter; tests/test_sandbox_unprivileged.py runs this case as nobody")
def test_best_effort_without_bubblewrap_still_applies_landlock_and_seccomp_and_says_so(tmp_path):
    # Given: no bwrap, isolation best_effort
    settings = sandbox.SandboxSettings(isolation="best_effort", bwrap=str(tmp_path / "no-such-bwrap"))
    outside = tmp_path.parent / f"{tmp_path.name}-outside.txt"
    outside.write_text("secret")
    work = tmp_path / "copy"
    work.mkdir()
    (work / "snippet.py").write_text(textwrap.dedent(f"""
        import ctypes, os
        for p in [{str(outside)!r}, "/etc/hostname"]:
            try:
                print("READ", p, open(p).read()[:10])
            except OSError as e:
                print("no read", p, e.errno)
        try:
            open({str(outside)!r}, "a").write("x")
            print("WROTE OUTSIDE")
        except OSError as e:
            print("no write", e.errno)
        libc = ctypes.CDLL(None, use_errno=True)
        print("ptrace", libc.ptrace(16, 1, 0, 0), ctypes.get_errno())
        open("inside.txt", "w").write("ok")
    """))
    # When
    r = sandbox.run([sys.executable, "snippet.py"], cwd=str(work), limits=LIMITS, settings=settings)
    # Then: the run happened with the layers that work, and every missing one is named
    assert r.exit_code == 0, r.output
    assert not r.layer("namespaces").applied and "bwrap" in r.layer("namespaces").detail
    assert r.layer("landlock").applied and r.layer("seccomp").applied
    assert any("best_effort" in n for n in r.notes)
    assert "secret" not in r.output and "WROTE OUTSIDE" not in r.output and outside.read_text() == "secret"
    assert "READ /etc/hostname" in r.output  # the allow-listed system files stay readable
    assert "ptrace -1 1" in r.output  # EPERM from seccomp
    assert (work / "inside.txt").read_text() == "ok"


def test_isolation_none_runs_unconfined_and_warns_on_every_run(tmp_path):
    r = run_code(tmp_path, "print('plain')\n", LIMITS)
    assert not any("isolation is none" in n for n in r.notes)
    r = sandbox.run([sys.executable, "snippet.py"], cwd=str(tmp_path), limits=LIMITS,
                    settings=sandbox.SandboxSettings(isolation="none"))
    assert r.exit_code == 0 and any("no isolation at all" in n for n in r.notes)


def test_every_layer_is_reported_applied_with_what_it_did(tmp_path):
    r = run_code(tmp_path, "print('ok')\n")
    names = [l.name for l in r.layers]
    assert names == ["namespaces", "user", "landlock", "seccomp", "limits", "cgroup", "network", "environment"]
    held = {l.name for l in r.layers if l.applied}
    assert {"namespaces", "user", "seccomp", "limits", "network", "environment"} <= held
    assert "uid 0" not in r.layer("user").detail


def test_an_unknown_isolation_mode_is_refused_by_name():
    with pytest.raises(ValueError, match="sandbox.isolation"):
        sandbox.SandboxSettings(isolation="strict")


def test_the_sandbox_dies_with_the_process_that_started_it(tmp_path):
    # Given: an agent process running a command in the sandbox that would run for a minute
    import signal
    import subprocess
    import time
    marker = f"threadbound-orphan-{os.getpid()}"
    (tmp_path / "snippet.py").write_text(textwrap.dedent(f"""
        import os, time
        open("started", "w").write("1")
        if os.fork() == 0:
            os.setsid()  # a daemon of its own, too
        time.sleep(60)  # {marker}
    """))
    runner = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys
        from threadbound.agents import sandbox
        sandbox.run([sys.executable, "snippet.py", "{marker}"], cwd={str(tmp_path)!r},
                    limits=sandbox.SandboxLimits(wall_s=120))
    """)])
    try:
        for _ in range(300):
            if (tmp_path / "started").exists():
                break
            time.sleep(0.05)
        assert (tmp_path / "started").exists()
        assert any(marker in " ".join(p.info["cmdline"] or []) for p in psutil.process_iter(["cmdline"]))
        # When: that process is killed outright (as Ray kills an actor past its deadline)
        runner.send_signal(signal.SIGKILL)
        runner.wait(10)
        # Then: nothing of the sandbox outlives it, the daemon included
        for _ in range(100):
            alive = [p for p in psutil.process_iter(["cmdline"]) if marker in " ".join(p.info["cmdline"] or [])]
            if not alive:
                break
            time.sleep(0.1)
        assert not alive
    finally:
        runner.kill()
