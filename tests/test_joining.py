"""Who owns a pool, and which Ray it runs on, as users meet it: a pool kept up by
`serve` on a Ray started with `ray start`, runs that join it, two runs at once on one
machine, fresh drivers that join by address, and a Ray of someone else's.

The Ray here is a `ray start --head` of this module's own (its own temp directory,
ports and token, no dashboard), started with this interpreter and stopped by PID at the
end; this session's Ray (conftest) is never used: every child gets an environment
without RAY_ADDRESS, its own HOME and state directory. A `ray.cluster_utils.Cluster`
(token authentication off, as it starts it) runs in a child process, as in
tests/test_multinode.py. Tests wait for what a process prints, never for a time.

The tests that start Rays (marked ``in_child``) run in a child pytest in the background
while the session's first tests run (``tests/background.py``); the last test here waits for
its report. ``THREADBOUND_TEST_CHILD=1 pytest tests/test_joining.py`` runs them here.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import background
from ports import free_ports

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# The gate agent holds each task open until the file its goal names exists.
GATE_CONFIG = """\
max_agents: 4
max_agents_per_task: 1
step_timeout_s: 300
task_timeout_s: 600
agents: {gate: "joining_agents:Gate"}
default_agents: [gate]
health: {enabled: false}
"""


def user_env(home: Path) -> dict[str, str]:
    """A user's shell: no Ray of this session, a home and a state directory of its own."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    (home / "home").mkdir(parents=True, exist_ok=True)
    env.update(HOME=str(home / "home"), XDG_STATE_HOME=str(home / "state"), RAY_USAGE_STATS_ENABLED="0",
               PATH=os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")]))
    return env


def descendants(pid: int) -> list:
    import psutil

    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def stop_tree(procs: list, grace_s: float = 20.0) -> None:
    """TERM the first process (a node's `ray start --block` stops its node), then TERM
    and KILL whatever of the recorded processes is left: by PID, nothing else."""
    import psutil

    if not procs:
        return
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10)):
        for p in procs[:1] if sig == signal.SIGTERM else procs:
            try:
                p.send_signal(sig)
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(procs, timeout=wait_s)
        if not alive:
            return
        procs = alive


class RayHead:
    """`ray start --head --block` with its own temp directory, ports and token."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        # Unix socket paths stay under 108 bytes: a short temp root, not pytest's.
        self.root = tempfile.mkdtemp(prefix="tbj", dir="/tmp")
        gcs, client, dash = free_ports(3)
        self.address = f"127.0.0.1:{gcs}"
        self.log = open(os.path.join(self.root, "start.log"), "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", f"--temp-dir={self.root}",
             f"--port={gcs}", f"--ray-client-server-port={client}", f"--dashboard-port={dash}",
             "--include-dashboard=false", "--dashboard-agent-listen-port=0", "--min-worker-port=0",
             "--max-worker-port=0", "--num-cpus=2", "--object-store-memory=200000000",
             "--node-ip-address=127.0.0.1", "--disable-usage-stats"],
            env=env, stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs: list = []
        deadline = time.monotonic() + 150
        text = ""
        while "Ray runtime started" not in text:
            assert self.proc.poll() is None and time.monotonic() < deadline, f"ray start failed:\n{text[-3000:]}"
            time.sleep(0.3)
            text = Path(self.root, "start.log").read_text()
        self.procs = descendants(self.proc.pid)

    def stop(self) -> None:
        stop_tree(self.procs + [p for p in descendants(self.proc.pid) if p not in self.procs])
        self.log.close()
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    root = tmp_path_factory.mktemp("user")
    env = user_env(root)
    token = root / "ray_token"
    token.write_text(os.urandom(32).hex())
    token.chmod(0o600)
    env["RAY_AUTH_TOKEN_PATH"] = str(token)
    config = root / "gate.yaml"
    config.write_text(GATE_CONFIG)
    return {"env": env, "root": root, "config": str(config)}


@pytest.fixture(scope="module")
def head(user):
    ray = RayHead(user["env"])
    try:
        yield ray
    finally:
        ray.stop()


class Cmd:
    """A `threadbound` command in a subprocess, its stderr and stdout in files."""

    def __init__(self, env: dict[str, str], *args: str, cwd: Path) -> None:
        self.args = args
        self.err_path, self.out_path = cwd / f"err-{id(self)}", cwd / f"out-{id(self)}"
        self.proc = subprocess.Popen([sys.executable, "-m", "threadbound.runtime.cli", *args], env=env, cwd=cwd,
                                     stdin=subprocess.DEVNULL, stdout=open(self.out_path, "w"),
                                     stderr=open(self.err_path, "w"), start_new_session=True)

    @property
    def err(self) -> str:
        return self.err_path.read_text()

    @property
    def out(self) -> str:
        return self.out_path.read_text()

    def says(self, text: str, timeout_s: float = 240) -> None:
        """Wait until the command has printed ``text`` (it may not end before)."""
        deadline = time.monotonic() + timeout_s
        while text not in self.err + self.out:
            assert self.proc.poll() is None, f"{self.args} ended ({self.proc.returncode}) before saying {text!r}:\n" \
                                             f"{self.err[-3000:]}\n{self.out[-2000:]}"
            assert time.monotonic() < deadline, f"{self.args} did not say {text!r}:\n{self.err[-3000:]}"
            time.sleep(0.2)

    def wait(self, timeout_s: float = 240) -> int:
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"{self.args} still runs after {timeout_s}s:\n{self.err[-3000:]}") from None

    def kill(self) -> None:
        stop_tree(descendants(self.proc.pid), grace_s=10)


def healthz(port: int, serve: "Cmd", timeout_s: float = 120) -> dict:
    """The gateway's /healthz, once its server accepts connections ("serving on" is said
    just before it binds)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=30) as reply:
                return {"code": reply.status, **json.loads(reply.read())}
        except urllib.error.HTTPError as exc:
            return {"code": exc.code, **json.loads(exc.read() or b"{}")}
        except (urllib.error.URLError, ConnectionError):
            assert serve.proc.poll() is None and time.monotonic() < deadline, serve.err[-3000:]
            time.sleep(0.2)


def gated_run(user, *extra: str, gate: Path) -> Cmd:
    return Cmd(user["env"], "run", "--config", user["config"], "--goal", str(gate), *extra, cwd=user["root"])


# -- before Ray: a second pool on this machine fits next to the first ----------------------


@pytest.fixture
def state(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.delenv("THREADBOUND_METRICS_PORT", raising=False)
    from threadbound.runtime import RuntimeConfig

    return RuntimeConfig.from_mapping({"snapshot_dir": str(tmp_path / "snapshots")}).with_absolute_paths()


def test_a_snapshot_location_another_pool_holds_gives_this_run_a_pool_of_its_own(state):
    from threadbound.runtime.cli.pools import own_pool
    from threadbound.snapshots.stores import LocalStore

    # Given: a supervisor holds the default pool's snapshot location
    lease = LocalStore(state.snapshot_location).acquire_lease(30)
    try:
        # When: a run that starts its own pool fits it in
        cfg, lines = own_pool(state.replace(metrics={"port": 0}), name_chosen=False, port_chosen=False)
        # Then: it gets the next name, and says why and where its snapshots go
        assert cfg.name == "threadbound-2"
        assert f"pid {os.getpid()}" in lines[0] and "starts pool 'threadbound-2' of its own" in lines[0]
        # and a third run, while the second has claimed its name, gets the one after
        cfg3, _ = own_pool(state.replace(metrics={"port": 0}), name_chosen=False, port_chosen=False)
        assert cfg3.name == "threadbound-3"
    finally:
        lease.release()


def test_a_pool_name_the_user_chose_that_runs_already_is_refused_naming_the_flag(state):
    from threadbound.runtime.cli.common import BadInput
    from threadbound.runtime.cli.pools import own_pool
    from threadbound.snapshots.stores import LocalStore

    lease = LocalStore(state.snapshot_location).acquire_lease(30)
    try:
        with pytest.raises(BadInput) as refused:
            own_pool(state, name_chosen=True, port_chosen=False)
        assert refused.value.flag == "--name" and "already runs on this machine" in str(refused.value)
    finally:
        lease.release()


def _two_free_ports_in_a_row(start: int) -> tuple[socket.socket, socket.socket]:
    """Listening sockets on two neighbouring ports from ``start`` up (the caller closes them)."""
    for port in range(start, start + 400):
        held = []
        try:
            for p in (port, port + 1):
                s = socket.socket()
                held.append(s)
                s.bind(("127.0.0.1", p))
                s.listen()
            return held[0], held[1]
        except OSError:
            for s in held:
                s.close()
    pytest.fail(f"no two free ports in a row from {start}")


def test_the_default_metrics_port_in_use_gives_way_to_a_free_one_above_it_and_a_chosen_one_is_refused(
        state, monkeypatch):
    from threadbound.runtime.cli.common import BadInput
    from threadbound.runtime.cli.pools import own_pool
    from threadbound.runtime.metrics import server

    # Given: other processes listen on the pool's metrics port and the one above it
    taken, above = _two_free_ports_in_a_row(server.DEFAULT_PORT)
    with taken, above:
        port = taken.getsockname()[1]
        plain = state.replace(snapshots={"enabled": False}, metrics={"port": port})
        # When the port is the default one: the next free port above, said in one line
        cfg, lines = own_pool(plain, name_chosen=False, port_chosen=False)
        assert port + 1 < cfg.metrics.port <= port + server.FALLBACK_SPAN
        assert lines == [line for line in lines if f"port {port} is in use by pid {os.getpid()}" in line] != []
        # never one of the OS's ephemeral range, which the Ray started next hands to its workers
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        assert not low <= cfg.metrics.port <= high
        # and a second run at once, which cannot claim that one, gets another
        cfg2, _ = own_pool(plain, name_chosen=False, port_chosen=False)
        assert cfg2.metrics.port not in (port, port + 1, cfg.metrics.port)
        # When the user chose it: refused, naming the flag and the holder, before Ray
        with pytest.raises(BadInput) as refused:
            own_pool(plain, name_chosen=False, port_chosen=True)
        assert refused.value.flag == "--metrics-port" and "choose a free port" in str(refused.value)
        # When no port above it is free either: refused, naming the flag and the ports tried
        monkeypatch.setattr(server, "FALLBACK_SPAN", 1)
        with pytest.raises(BadInput) as refused:
            own_pool(plain, name_chosen=False, port_chosen=False)
        assert refused.value.flag == "--metrics-port" and f"port {port + 1} is not free" in str(refused.value)


def test_a_pool_of_two_shards_whose_second_metrics_port_is_taken_moves_both_above_it(state):
    from threadbound.runtime.cli.pools import own_pool
    from threadbound.runtime.metrics import server

    # Given: the default port is free, the one above it (shard 1's) is taken
    free, taken = _two_free_ports_in_a_row(server.DEFAULT_PORT)
    with taken:
        port = free.getsockname()[1]
        free.close()
        cfg, lines = own_pool(state.replace(snapshots={"enabled": False}, metrics={"port": port}, shards=2),
                              name_chosen=False, port_chosen=False)
        # Then: both shards' ports move above the taken one, and the line names the taken one
        assert cfg.metrics.port > port + 1
        assert len(lines) == 1 and f"port {port + 1} is in use by pid {os.getpid()}" in lines[0]


def test_the_metrics_port_has_an_environment_override(monkeypatch):
    from threadbound.runtime import RuntimeConfig

    monkeypatch.setenv("THREADBOUND_METRICS_PORT", "9999")
    assert RuntimeConfig.from_env().metrics.port == 9999


def test_auto_refuses_a_ray_another_user_started_naming_the_field(monkeypatch):
    from threadbound.runtime import ConfigError
    from threadbound.runtime.connect import check_owner

    check_owner("127.0.0.1:6379", uid=os.getuid())  # one's own: joined
    with pytest.raises(ConfigError) as refused:
        check_owner("127.0.0.1:6379", uid=os.getuid() + 4242)
    (field, message), = refused.value.problems
    assert field == "ray.address" and "not you" in message and "--address 127.0.0.1:6379" in message


def test_a_ray_of_its_own_is_local_and_on_loopback():
    from threadbound.runtime import RuntimeConfig
    from threadbound.runtime.connect import local_ray_options

    opts = local_ray_options(RuntimeConfig(ray={"num_cpus": 2}))
    # "local": never the Ray /tmp/ray/ray_current_cluster names; its node and dashboard on 127.0.0.1
    assert opts == {"address": "local", "_node_ip_address": "127.0.0.1", "dashboard_host": "127.0.0.1",
                    "num_cpus": 2}


# -- a pool kept up on a Ray that stays up ----------------------------------------------------


@pytest.mark.slow
@pytest.mark.in_child
@pytest.mark.timeout(600)
def test_a_run_that_joins_a_served_pool_leaves_it_serving(user, head):
    # Given: `serve` started a pool on a Ray that stays up
    port = free_ports(1)[0]
    serve = Cmd(user["env"], "serve", "--config", user["config"], "--address", head.address, "--port", str(port),
                "--tokens-file", str(user["root"] / "tokens"), cwd=user["root"])
    try:
        serve.says("serving on")
        assert "started pool 'threadbound'" in serve.err
        # When: a run joins that Ray, and so the pool, and its task ends
        gate = user["root"] / "served-gate"
        gate.touch()
        run = gated_run(user, "--address", head.address, gate=gate)
        assert run.wait() == 0, run.err[-3000:]
        # Then: it said it joined the pool, not started it...
        assert f"joined pool 'threadbound' at {head.address}" in run.err
        assert "started pool" not in run.err
        # ...and the gateway's pool still answers
        assert healthz(port, serve) == {"code": 200, "status": "ok", "mode": "normal"}
    finally:
        serve.proc.send_signal(signal.SIGINT)
        try:
            serve.proc.wait(60)
        except subprocess.TimeoutExpired:
            serve.kill()


@pytest.mark.slow
@pytest.mark.in_child
@pytest.mark.timeout(600)
def test_a_run_that_joined_a_pool_ends_without_ending_the_task_of_the_run_that_started_it(user, head):
    first_gate, second_gate = user["root"] / "gate-1", user["root"] / "gate-2"
    # Given: a run that started the pool, its task held open
    first = gated_run(user, "--address", head.address, "--name", "shared", gate=first_gate)
    second = None
    try:
        first.says("started pool 'shared'")
        # and a second, identical run that joined it, its task held open too
        second = gated_run(user, "--address", head.address, "--name", "shared", gate=second_gate)
        second.says("joined pool 'shared'")
        second.says("waiting")  # its task runs
        # When: the joined run's task ends, and the run with it
        second_gate.touch()
        assert second.wait() == 0, second.err[-3000:]
        # Then: the first run's task is still running, and ends well when let go
        assert first.proc.poll() is None, first.err[-3000:]
        first_gate.touch()
        assert first.wait() == 0, first.err[-3000:]
        assert "cancelled" not in first.out + first.err
        assert "succeeded" in first.out
    finally:
        for cmd in (first, second):
            if cmd is not None and cmd.proc.poll() is None:
                cmd.kill()


@pytest.mark.slow
@pytest.mark.in_child
@pytest.mark.timeout(600)
def test_the_run_that_started_a_pool_waits_for_the_task_of_a_run_that_joined_it(user, head):
    first_gate, second_gate = user["root"] / "gate-3", user["root"] / "gate-4"
    first = gated_run(user, "--address", head.address, "--name", "waits", gate=first_gate)
    second = None
    try:
        first.says("started pool 'waits'")
        second = gated_run(user, "--address", head.address, "--name", "waits", gate=second_gate)
        second.says("joined pool 'waits'")
        second.says("waiting")
        # When: the task of the run that started the pool ends first
        first_gate.touch()
        first.says("waiting for them to end before stopping it")
        # Then: the pool is not stopped under the joined run's task
        assert second.proc.poll() is None
        second_gate.touch()
        assert second.wait() == 0, second.err[-3000:]
        assert first.wait() == 0, first.err[-3000:]
        assert "cancelled" not in second.out + second.err
    finally:
        for cmd in (first, second):
            if cmd is not None and cmd.proc.poll() is None:
                cmd.kill()


JOBS = textwrap.dedent("""
    import json, sys, ray
    ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
    from ray._private.state import jobs
    print(json.dumps(sorted(j["DriverPid"] for j in jobs())))
""")


def driver_pids(env: dict[str, str], address: str) -> list[int]:
    """The PIDs of every driver that ever joined the Ray at ``address``."""
    proc = subprocess.run([sys.executable, "-c", JOBS, address], env={**env, "RAY_AUTH_MODE": "token"},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [int(p) for p in json.loads(proc.stdout.strip().splitlines()[-1])]


def ray_listens(pid: int) -> dict[str, set[str]]:
    """What the Ray that ``pid`` (a `threadbound run`) started listens on: its dashboard
    and the node address its processes were told, by process name."""
    import psutil

    procs = {p.pid: p.name() for p in descendants(pid)[1:]}
    found: dict[str, set[str]] = {}
    for conn in psutil.net_connections(kind="inet"):
        if conn.status == psutil.CONN_LISTEN and conn.pid in procs:
            found.setdefault(procs[conn.pid], set()).add(conn.laddr.ip)
    return found


@pytest.mark.slow
@pytest.mark.in_child
@pytest.mark.timeout(900)
def test_two_plain_runs_at_once_each_start_a_ray_and_pool_of_their_own_next_to_a_running_ray(user, head):
    # Given: a Ray this user keeps up on the machine, and nothing asks to join it
    env = {k: v for k, v in user["env"].items() if k != "RAY_ADDRESS"}
    env["XDG_STATE_HOME"] = str(user["root"] / "plain-state")  # one user's state: one snapshot_dir, one claims dir
    gates = [user["root"] / "plain-1", user["root"] / "plain-2"]
    runs = [Cmd(env, "run", "--config", user["config"], "--goal", str(g), cwd=user["root"]) for g in gates]
    try:
        # When: two plain runs start at once
        for run in runs:
            run.says("started pool")
        # Then: each started a Ray of its own on 127.0.0.1, saying the other Ray is left alone...
        for run in runs:
            assert "starting a local Ray of this command's own on 127.0.0.1" in run.err
        # ...and the second got a pool, a snapshot location and a metrics port of its own
        moved = [r for r in runs if "this run starts pool 'threadbound-2' of its own" in r.err]
        assert len(moved) == 1, [r.err for r in runs]
        assert any("metrics: port 9464 is in use" in r.err for r in runs), [r.err for r in runs]
        # and its Ray's dashboard listens on loopback only (the node was told 127.0.0.1)
        for run in runs:
            listens = ray_listens(run.proc.pid)
            dashboard = {name: ips for name, ips in listens.items() if "dashboard" in name.lower()
                         and "agent" not in name.lower()}
            assert all(ips <= {"127.0.0.1"} for ips in dashboard.values()), listens
        for gate in gates:
            gate.touch()
        # and both tasks succeed
        for run in runs:
            assert run.wait() == 0, run.err[-3000:]
            assert "succeeded" in run.out
        # and neither joined the Ray that was running here
        assert not {r.proc.pid for r in runs} & set(driver_pids(env, head.address))
    finally:
        for run in runs:
            if run.proc.poll() is None:
                run.kill()


FRESH_DRIVER = textwrap.dedent("""
    import json, sys
    import ray
    from threadbound.runtime import AgentPool, RuntimeConfig, Task
    address, how, name, snapshots = sys.argv[1:5]
    if how == "init-first":
        ray.init(address=address, namespace="threadbound", logging_level="ERROR", log_to_driver=False)
    if how == "attach":
        pool = AgentPool.attach(name, address=address)
    else:
        settings = {"name": name, "max_agents": 3, "snapshot_dir": snapshots, "metrics": {"port": 0},
                    "health": {"enabled": False}, "agents": {"a": "scripted_agents:Scripted"}}
        if how == "config":
            settings["ray"] = {"address": address}
        pool = AgentPool(RuntimeConfig.from_mapping(settings))
    result = pool.submit(Task(goal=how, agents=["a"])).result(timeout=120)
    print(json.dumps({"how": how, "status": result.status, "started": pool.started,
                      "tasks": len(pool.tasks())}), flush=True)
    with pool:  # leaving it: the pool stops only if this driver started it
        pass
""")


def fresh_driver(env: dict[str, str], address: str, how: str, name: str, snapshots: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", FRESH_DRIVER, address, how, name, snapshots], env=env,
                          capture_output=True, text=True, timeout=240)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert proc.returncode == 0 and lines, f"{how}: exit {proc.returncode}\n{proc.stderr[-4000:]}"
    return json.loads(lines[-1])


def fresh_drivers_join(env: dict[str, str], address: str, snapshots: str, *, tokens: bool = False) -> list[dict]:
    """A fresh driver starts a pool by ``ray.address`` in its config, and keeps it; fresh
    drivers then attach to it, and join it with ``ray.init`` called first (which, given
    an address, uses a token only when told: ``RAY_AUTH_MODE=token`` for a cluster
    with ``tokens``)."""
    keeper = subprocess.Popen(
        [sys.executable, "-c", FRESH_DRIVER.replace("    pass\n", "    sys.stdin.read()\n"), address, "config",
         "joined", snapshots], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    try:
        line = keeper.stdout.readline()
        if not line:  # it ended without a result: show why
            keeper.wait(60)
        first = json.loads(line or "{}")
        assert first.get("status") == "succeeded", keeper.stderr.read()[-4000:] if keeper.poll() is not None else first
        found = [first]
        found.append(fresh_driver(env, address, "attach", "joined", snapshots))
        found.append(fresh_driver({**env, "RAY_AUTH_MODE": "token"} if tokens else env, address, "init-first",
                                  "joined", snapshots))
        found.append(fresh_driver(env, address, "attach", "joined", snapshots))  # still there after both left
        keeper.stdin.close()
        assert keeper.wait(120) == 0, keeper.stderr.read()[-4000:]
        return found
    finally:
        if keeper.poll() is None:
            keeper.kill()
            keeper.wait(30)


def _joined_as_expected(found: list[dict]) -> None:
    assert [f["status"] for f in found] == ["succeeded"] * 4
    # the first started the pool; the others joined it, and leaving did not stop it
    assert [f["started"] for f in found] == [True, False, False, False]
    assert [f["tasks"] for f in found] == [1, 2, 3, 4]


@pytest.mark.slow
@pytest.mark.in_child
@pytest.mark.timeout(600)
def test_fresh_drivers_join_a_ray_start_head_by_config_by_attach_and_after_ray_init(user, head):
    env = {**user["env"], "PYTHONPATH": os.pathsep.join([str(HERE), user["env"].get("PYTHONPATH", "")])}
    _joined_as_expected(fresh_drivers_join(env, head.address, str(user["root"] / "snapshots"), tokens=True))


@pytest.mark.slow
@pytest.mark.in_child
@pytest.mark.timeout(300)
def test_auto_finds_who_started_the_ray_on_this_machine(head):
    from threadbound.runtime.connect import check_owner, gcs_owner

    # The Ray this test started is this user's: `auto` may join it...
    assert gcs_owner(head.address) == os.getuid()
    check_owner(head.address)
    # ...and an address no GCS of this machine serves has no owner to refuse
    assert gcs_owner(f"127.0.0.1:{free_ports(1)[0]}") is None


# -- a Ray without token authentication, joined with a token at hand --------------------------

def _cluster_child(out: str) -> None:
    """Run as a script: a Cluster (token authentication off, as cluster_utils starts it)
    of a head and a worker node, joined by fresh drivers, by `run` and by `serve`, each
    with a token at hand (RAY_AUTH_TOKEN_PATH)."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        found = {"python": fresh_drivers_join(env, cluster.address, os.path.join(out, "snapshots"))}
        gate = Path(out) / "gate"
        gate.touch()
        config = Path(out) / "gate.yaml"
        config.write_text(GATE_CONFIG)
        run = subprocess.run([sys.executable, "-m", "threadbound.runtime.cli", "run", "--config", str(config),
                              "--goal", str(gate), "--address", cluster.address, "--name", "by-run"],
                             env=env, capture_output=True, text=True, timeout=240, cwd=out)
        found["run"] = {"code": run.returncode, "err": run.stderr[-3000:], "out": run.stdout[-2000:]}
        port = free_ports(1)[0]
        serve = Cmd(env, "serve", "--config", str(config), "--address", cluster.address, "--port", str(port),
                    "--name", "by-serve", "--tokens-file", os.path.join(out, "tokens"), cwd=Path(out))
        try:
            serve.says("serving on")
            found["serve"] = healthz(port, serve)
        except AssertionError as exc:
            found["serve"] = {"error": str(exc)}
        finally:
            serve.proc.send_signal(signal.SIGINT)
            try:
                serve.proc.wait(60)
            except subprocess.TimeoutExpired:
                serve.kill()
        print(json.dumps(found), flush=True)
    finally:
        cluster.shutdown()


@pytest.mark.slow
@pytest.mark.in_child
@pytest.mark.timeout(900)
def test_fresh_drivers_run_and_serve_join_a_cluster_without_token_auth_while_a_token_is_at_hand(user, tmp_path):
    # Given: a token at hand (RAY_AUTH_TOKEN_PATH) and a cluster that does not use one
    env = {**user["env"], "PYTHONPATH": os.pathsep.join([str(HERE), user["env"].get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, __file__, str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=880, cwd=tmp_path)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert proc.returncode == 0 and lines, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    found = json.loads(lines[-1])
    # Then: fresh drivers started the pool by config, attached, joined after ray.init
    _joined_as_expected(found["python"])
    # and `run` and `serve` started theirs by --address
    assert found["run"]["code"] == 0, found["run"]
    assert "started pool 'by-run'" in found["run"]["err"]
    assert found["serve"].get("status") == "ok", found["serve"]


# -- the tests above that start Rays: run in a child pytest --------------------------------


def background_job(scratch: str) -> background.Job:
    return background.child_pytest(__file__, 1500)


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(1600)
def test_the_tests_that_start_rays_of_their_own_pass_in_a_child_pytest():
    background.passed(background_job(""))


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    _cluster_child(sys.argv[1])
