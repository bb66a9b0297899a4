"""scripts/cluster_local.sh: a real head and worker nodes on this machine, stopped by PID.

The script runs as a user runs it, in a scratch HOME and TMPDIR with its own Ray token,
so neither the real home nor this session's Ray is touched. A child process joins the
cluster it started, as any client would; everything the script recorded is checked gone
after `down`, and stopped by PID here if a step failed.

The two tests that start a cluster (marked ``in_child``) run in a child pytest in the
background while the session's first tests run (``tests/background.py``); the last test
here waits for its report.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import background

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "cluster_local.sh"

# Joins the cluster through RAY_ADDRESS, runs one task on the node named tb-node-2, and
# prints the nodes as Ray sees them.
PROBE = """
import json, ray
ray.init(logging_level="ERROR", log_to_driver=False)

@ray.remote(num_cpus=0, resources={"tb-node-2": 0.01})
def where():
    return ray.get_runtime_context().get_node_id()

task_node = ray.get(where.remote(), timeout=60)
nodes = [{"id": n["NodeID"], "alive": n["Alive"], "resources": n["Resources"]} for n in ray.nodes()]
print(json.dumps({"nodes": nodes, "task_node": task_node}))
"""


def script_env(tmp_path: Path) -> dict[str, str]:
    """A user's environment with no Ray of this session: scratch HOME, TMPDIR and token path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    for name in ("home", "tmp"):
        (tmp_path / name).mkdir(exist_ok=True)
    env.update(HOME=str(tmp_path / "home"), TMPDIR=str(tmp_path / "tmp"),
               RAY_AUTH_TOKEN_PATH=str(tmp_path / "auth_token"), CLUSTER_LOCAL_GRACE_S="10")
    return env


def run(env, *args, timeout=120):
    return subprocess.run([str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=timeout)


def recorded(env) -> list[tuple[int, str]]:
    """(pid, start time) of every process the script recorded."""
    pids = Path(env["TMPDIR"]) / f"threadbound-cluster-local-{os.getuid()}" / "pids"
    if not pids.exists():
        return []
    return [(int(line.split()[0]), line.split()[1]) for line in pids.read_text().splitlines() if line.strip()]


def still_runs(pid: int, start: str) -> bool:
    """The process recorded as (pid, start) runs: same PID, same start time, not a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return False
    return fields[0] != "Z" and fields[19] == start


def stop_by_pid(processes, grace_s=10.0):
    """TERM, then KILL after a grace period, only the given (pid, start) processes."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid, start in processes:
            if still_runs(pid, start):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace_s
        while any(still_runs(p, s) for p, s in processes) and time.monotonic() < deadline:
            time.sleep(0.2)


def test_down_with_nothing_up_says_so(tmp_path):
    proc = run(script_env(tmp_path), "down", timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert "no local cluster is up" in proc.stdout


@pytest.mark.parametrize("planted", ["other-writable", "someone-elses", "a-link"])
def test_a_state_directory_someone_else_planted_is_refused_before_it_is_read(tmp_path, planted):
    # Given: a state directory in the shared TMPDIR that another user could have made: its
    # env file would run their command in the shell that evals it, its pids file would
    # have `down` signal a process they chose
    env = script_env(tmp_path)
    state = Path(env["TMPDIR"]) / f"threadbound-cluster-local-{os.getuid()}"
    victim = subprocess.Popen(["sleep", "60"])
    target = tmp_path / "elsewhere"
    target.mkdir()
    made = target if planted == "a-link" else state
    made.mkdir(exist_ok=True)
    (made / "env").write_text(f"touch {tmp_path / 'pwned'}\n")
    (made / "pids").write_text(f"{victim.pid} {Path(f'/proc/{victim.pid}/stat').read_text().split()[21]} head\n")
    (made / "info").write_text("nodes=1\n")
    if planted == "a-link":
        state.symlink_to(target, target_is_directory=True)
    elif planted == "other-writable":
        state.chmod(0o777)
    else:
        state.chmod(0o700)
        os.chown(state, 65534, 65534)  # nobody's (the tests run as root)
    try:
        # When: the user runs each command
        for command in ("env", "down", "status", "up"):
            proc = run(env, command, *(["1"] if command == "up" else []))
            # Then: each refuses, naming the directory and what to do, and runs or signals nothing
            assert proc.returncode == 1, (command, proc.stdout, proc.stderr)
            assert str(state) in proc.stderr and ("remove it" in proc.stderr), proc.stderr
            assert "touch" not in proc.stdout
        assert victim.poll() is None and not (tmp_path / "pwned").exists()
    finally:
        victim.kill()
        victim.wait(10)


def test_bad_input_is_refused_before_anything_starts(tmp_path):
    env = script_env(tmp_path)
    bad = run(env, "up", "two", timeout=30)
    assert bad.returncode != 0 and "usage:" in bad.stderr and "up N" in bad.stderr
    none = run(env, "env", timeout=30)
    assert none.returncode != 0 and "no local cluster is up" in none.stderr
    assert recorded(env) == []


@pytest.mark.slow
@pytest.mark.in_child
@pytest.mark.timeout(150)
def test_up_2_gives_three_named_nodes_and_down_stops_exactly_them(tmp_path):
    env = script_env(tmp_path)
    # A bystander that looks like Ray: `ray stop` or `pkill -f raylet` would take it too.
    bystander = subprocess.Popen(["bash", "-c", 'exec -a "/x/ray/core/src/ray/raylet/raylet" sleep 300'])
    started: list[tuple[int, str]] = []
    try:
        # When: a head and two worker nodes start
        began = time.monotonic()
        up = run(env, "up", "2")
        started = recorded(env)
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        address = re.search(r"^RAY_ADDRESS=(\S+)$", up.stdout, re.M).group(1)
        print(f"up 2 took {time.monotonic() - began:.1f} s")
        # Then: the token was made where RAY_AUTH_TOKEN_PATH points, never in the home
        token = Path(env["RAY_AUTH_TOKEN_PATH"])
        assert token.stat().st_mode & 0o077 == 0 and len(token.read_text().strip()) >= 32
        assert not (Path(env["HOME"]) / ".ray").exists()

        # and a client that joins with the printed exports sees three live nodes, each named
        # by its custom resource, the supervisor's resource on the head only
        exports = run(env, "env", timeout=30).stdout
        assert f"RAY_ADDRESS={address}" in exports and "RAY_AUTH_MODE=token" in exports
        probe = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=90,
                               env={**env, "RAY_ADDRESS": address, "RAY_AUTH_MODE": "token"})
        assert probe.returncode == 0, probe.stderr[-3000:]
        seen = json.loads(probe.stdout.splitlines()[-1])
        nodes = {next(r for r in n["resources"] if r.startswith("tb-node-")): n for n in seen["nodes"]}
        assert sorted(nodes) == ["tb-node-0", "tb-node-1", "tb-node-2"]
        assert all(n["alive"] for n in nodes.values())
        assert [name for name, n in nodes.items() if "threadbound-supervisor" in n["resources"]] == ["tb-node-0"]
        assert nodes["tb-node-0"]["resources"]["CPU"] == 1 and nodes["tb-node-1"]["resources"]["CPU"] == 2
        assert len({n["id"] for n in nodes.values()}) == 3
        # a task that asks for tb-node-2 ran there: the names place work
        assert seen["task_node"] == nodes["tb-node-2"]["id"]

        # `up` again is a clear error, and changes nothing
        again = run(env, "up", "1", timeout=30)
        assert again.returncode == 1 and "already up" in again.stderr
        # `status` lists the nodes (and records the Ray workers started since `up`)
        status = run(env, "status", timeout=30)
        assert status.returncode == 0 and status.stdout.count(" up ") == 3
        started = recorded(env)
        assert len(started) > 3

        # When: down
        down = run(env, "down", timeout=90)
        # Then: every process it recorded is gone, and the bystander still runs
        assert down.returncode == 0, down.stdout + down.stderr
        assert [p for p, s in started if still_runs(p, s)] == []
        assert bystander.poll() is None
        assert run(env, "down", timeout=30).stdout.startswith("no local cluster is up")
    finally:
        stop_by_pid(started + recorded(env))
        bystander.kill()
        bystander.wait()


@pytest.mark.slow
@pytest.mark.in_child
@pytest.mark.timeout(150)
def test_env_quotes_what_it_prints_so_eval_sets_exactly_the_token_path(tmp_path):
    # Given: a token path with a space, a quote and a command substitution in it
    env = script_env(tmp_path)
    odd = tmp_path / "a dir" / f"it's $(touch {tmp_path / 'pwned'})" / "auth_token"
    env["RAY_AUTH_TOKEN_PATH"] = str(odd)
    started: list[tuple[int, str]] = []
    try:
        up = run(env, "up", "0")
        started = recorded(env)
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        # When: a shell evals what `env` prints, as the usage line says
        shell = subprocess.run(["bash", "-c", f'eval "$({SCRIPT} env)" && printf "%s\\n%s" '
                                              '"$RAY_AUTH_TOKEN_PATH" "$RAY_ADDRESS"'],
                               env=env, capture_output=True, text=True, timeout=30)
        # Then: it set the path exactly, and ran nothing of it
        assert shell.returncode == 0, shell.stderr
        assert shell.stdout.splitlines() == [str(odd), re.search(r"^RAY_ADDRESS=(\S+)$", up.stdout, re.M).group(1)]
        assert not (tmp_path / "pwned").exists()
        assert run(env, "down", timeout=90).returncode == 0
    finally:
        stop_by_pid(started + recorded(env))


def background_job(scratch: str) -> background.Job:
    return background.child_pytest(__file__, 400)


@pytest.mark.slow
@pytest.mark.timeout(500)
def test_the_tests_that_start_a_cluster_pass_in_a_child_pytest():
    background.passed(background_job(""))
