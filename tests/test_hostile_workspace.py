"""A hostile workspace, run by the built-in tester on a real pool, gets nothing out of the sandbox.

Each test is an attack a model could write into a workspace's tests (test_attack.py,
which imports tests/hostile_probe.py copied next to it). The built-in tester runs it
in the sandbox on a real local Ray pool; the test then decides from facts -- what the
attack wrote into its report in the task's copy, the task's events, and the host's
files and processes -- that the attack failed and that the pool still serves.

The pool is configured the way a careless user might: its ``sandbox.read_only``
exposes a directory holding the snapshot store, the snapshot key file and the user's
workspace, and also the workspaces root, Ray's session directory and the directory
of Ray's token. The design says those are hidden even under a bound path, so every
secret here is world-readable on the host: only the sandbox can keep it out.

``test_the_checks_fire_when_the_sandbox_is_off`` runs the same attacks through a pool
with ``sandbox.isolation: none`` and shows the same checks fail: the suite can tell.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import secrets
import shutil
import socket
import stat
import sys
import textwrap
import threading
import time
from pathlib import Path

import psutil
import pytest

from conftest import pool_settings
from unprivileged import read_report
from threadbound.agents.workspace import TRIAL_SUFFIX, Workspace, workspaces_root
from threadbound.runtime import AgentPool, InvalidTask, RuntimeConfig, Task, TaskFailed

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("ray_session")]

PROBE = Path(__file__).with_name("hostile_probe.py")
SITE_PACKAGES = next(p for p in sys.path if p.endswith("site-packages") and os.path.isdir(p))


# --- the host: secrets where the pool keeps them, a listening server, the pool ------------


@dataclasses.dataclass
class Box:
    """Everything an attack wants, on the host, with the strings that must never come out."""

    base: Path
    exposed: Path  # in the pool's sandbox.read_only
    private: Path  # nowhere in the config
    snapshots: Path
    key_file: Path
    home: Path  # a temporary HOME of the pool user (its .bashrc, its .threadbound)
    secrets: dict[str, str]  # name -> a string that must not appear in any report, output or event

    def plant(self, path: Path, text: str, mode: int = 0o644) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        for d in [path.parent, *path.parent.parents]:
            if d == self.base.parent:
                break
            os.chmod(d, 0o755)
        path.write_text(text)
        os.chmod(path, mode)
        return path


@pytest.fixture(scope="module")
def box():
    base = Path(os.path.realpath(os.path.join("/var/tmp" if os.path.isdir("/var/tmp") else "/tmp",
                                              f"threadbound-hostile-{secrets.token_hex(4)}")))
    base.mkdir(mode=0o755)
    os.chmod(base, 0o755)
    exposed = base / "exposed"
    b = Box(base=base, exposed=exposed, private=base / "private", snapshots=exposed / "snapshots",
            key_file=exposed / "home" / ".threadbound" / "snapshot.key", home=exposed / "home", secrets={})
    b.secrets["key_file"] = "KEYFILE-" + secrets.token_hex(16)
    b.secrets["snapshot_canary"] = "SNAPSHOT-" + secrets.token_hex(16)
    b.secrets["private_file"] = "PRIVATE-" + secrets.token_hex(16)
    b.plant(b.key_file, b.secrets["key_file"] + "\n")  # 0644 on purpose: only the sandbox hides it
    b.plant(b.snapshots / "canary.txt", b.secrets["snapshot_canary"] + "\n")
    b.plant(b.home / ".bashrc", "# the pool user's shell start-up file\n")
    b.plant(b.private / "secret.txt", b.secrets["private_file"] + "\n")
    # What the session's pools really hold: the snapshot key (in every actor's environment)
    # and Ray's token (conftest keeps both out of the real home).
    b.secrets["env_snapshot_key"] = os.environ["THREADBOUND_SNAPSHOT_KEY"]
    b.secrets["ray_token"] = Path(os.environ["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    yield b
    shutil.rmtree(base, ignore_errors=True)


class Listener:
    """A TCP and a UDP server on the host's loopback that hand out a secret to whoever reaches them."""

    def __init__(self) -> None:
        self.banner = "BANNER-" + secrets.token_hex(16)
        self.tcp = socket.create_server(("127.0.0.1", 0))
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("127.0.0.1", 0))
        self.tcp.settimeout(0.2)
        self.udp.settimeout(0.2)
        self.reached: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def tcp_port(self) -> int:
        return self.tcp.getsockname()[1]

    @property
    def udp_port(self) -> int:
        return self.udp.getsockname()[1]

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, peer = self.tcp.accept()
                self.reached.append(f"tcp from {peer}")
                conn.sendall(self.banner.encode())
                conn.close()
            except OSError:
                pass
            try:
                data, peer = self.udp.recvfrom(200)
                self.reached.append(f"udp from {peer}: {data!r}")
                self.udp.sendto(self.banner.encode(), peer)
            except OSError:
                pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.tcp.close()
        self.udp.close()


@pytest.fixture(scope="module")
def listener():
    srv = Listener()
    yield srv
    srv.close()


@dataclasses.dataclass
class RayPlaces:
    raylet_socket: str
    store_socket: str
    session_dir: str
    gcs: tuple[str, int]
    token_dir: str


@pytest.fixture(scope="module")
def ray_places(ray_session) -> RayPlaces:
    node = next(n for n in ray_session.nodes() if n["Alive"])
    raylet = node["RayletSocketName"]
    host, port = os.environ["RAY_ADDRESS"].rsplit(":", 1)
    return RayPlaces(raylet_socket=raylet, store_socket=node["ObjectStoreSocketName"],
                     session_dir=os.path.dirname(os.path.dirname(raylet)), gcs=(host, int(port)),
                     token_dir=os.path.dirname(os.environ["RAY_AUTH_TOKEN_PATH"]))


REVIEW = "The change is small and every test passes.\nVERDICT: APPROVE"


def hostile_config(name: str, box: Box, places: RayPlaces, **changes) -> RuntimeConfig:
    settings = pool_settings(
        name, max_agents=2, max_agents_per_task=2, step_timeout_s=60, task_timeout_s=120, max_rounds=1,
        retry={"max_attempts": 1}, snapshot_dir=str(box.snapshots), snapshot_interval_s=1,
        snapshots={"key_file": str(box.key_file)}, workspace={"keep_copies": True},
        model={"backend": "simulated", "answers": {"reviewer": REVIEW}},
        # A careless config: every one of these must stay hidden all the same.
        sandbox={"isolation": "required", "read_only": [str(box.exposed), str(workspaces_root()),
                                                         places.session_dir, places.token_dir]})
    settings.update(changes)
    return RuntimeConfig.from_mapping(settings)


class Pool:
    """The module's pool, and every task copy it kept (deleted at the end)."""

    def __init__(self, config: RuntimeConfig) -> None:
        self.pool = AgentPool(config)
        self.task_ids: list[str] = []
        self.n = 0

    def close(self) -> None:
        self.pool.shutdown()
        for tid in self.task_ids:
            try:
                Workspace.discard(tid)
            except Exception:
                pass


@pytest.fixture(scope="module")
def pool(ray_session, box, ray_places):
    p = Pool(hostile_config(f"hostile-{os.getpid()}", box, ray_places))
    yield p
    p.close()


# --- one attack through the pool --------------------------------------------------------


ATTACK_TEST = '''\
import json
import hostile_probe

ARGS = json.loads({args!r})


def test_attack():
    hostile_probe.main(ARGS)
'''


@dataclasses.dataclass
class Attack:
    ok: bool
    error: str | None
    events: list
    tester: dict
    report: dict
    copy: Path
    original: Path
    task_id: str

    @property
    def everything(self) -> str:
        """All the task said (events, outputs) and all the attack wrote down, as one text."""
        return json.dumps([e.to_dict() for e in self.events], default=str) + json.dumps(self.report) + \
            (self.error or "")


def workspace(where: Path, args: dict, extra: dict[str, str] | None = None) -> Path:
    where.mkdir(parents=True)
    os.chmod(where, 0o755)
    (where / "hostile_probe.py").write_text(PROBE.read_text())
    (where / "test_attack.py").write_text(ATTACK_TEST.format(args=json.dumps(args)))
    for rel, text in (extra or {}).items():
        (where / rel).write_text(text)
    return where


def attack(pool: Pool, original: Path, *, agents=("tester",), inputs=None, timeout_s=120) -> Attack:
    handle = pool.pool.submit(Task(goal="make the tests pass", workspace=str(original), agents=list(agents),
                                   inputs=inputs or {}))
    pool.task_ids.append(handle.task_id)
    ok, error = True, None
    try:
        handle.result(timeout=timeout_s)
    except TaskFailed as exc:
        ok, error = False, str(exc)
    events = list(handle.stream())
    tester = next((e.data["output"] for e in events if e.kind == "step_finished" and e.agent == "tester"), {})
    final = next(e for e in events if e.terminal)
    copy = Path(final.data.get("workspace_copy") or workspaces_root() / handle.task_id)
    tests_ran_in = copy.with_name(copy.name + TRIAL_SUFFIX)  # the tests run on a copy of the copy
    return Attack(ok, error, events, tester, read_report(tests_ran_in), copy, original, handle.task_id)


def next_original(pool: Pool, box: Box, args: dict, **kw) -> Path:
    pool.n += 1
    return workspace(box.exposed / f"ws{pool.n}", args, **kw)


def benign_task_succeeds(pool: Pool, box: Box) -> None:
    pool.n += 1
    where = box.private / f"benign{pool.n}"
    where.mkdir(parents=True)
    (where / "test_ok.py").write_text("def test_ok():\n    assert 1 + 1 == 2\n")
    handle = pool.pool.submit(Task(goal="benign", workspace=str(where), agents=["tester"]))
    pool.task_ids.append(handle.task_id)
    res = handle.result(timeout=60)
    assert res.ok and res.outputs["tester"]["passed"] == 1, res


def no_crash_or_timeout(a: Attack) -> None:
    bad = [e.kind for e in a.events if e.kind in ("agent_crashed", "step_timed_out", "step_failed")]
    assert not bad, f"the attack took the agent down: {bad}"


def sandboxed_as_designed(a: Attack) -> None:
    layers = {layer["name"]: layer["applied"] for layer in a.tester["layers"]}
    assert layers["namespaces"] and layers["user"] and layers["seccomp"], a.tester["layers"]
    sandbox_events = [e.data for e in a.events if e.kind == "sandbox"]
    assert sandbox_events and sandbox_events[0]["isolation"] == "required"


# --- the checks (also run against an unconfined pool, where they must fire) ---------------


def check_no_secret_came_out(a: Attack, secret_values: dict[str, str]) -> None:
    text = a.everything
    leaked = [name for name, value in secret_values.items() if value in text]
    assert not leaked, f"secrets leaked into the report/events: {leaked}"


def check_reads_got_nothing(a: Attack, paths: list[str]) -> None:
    got = {p: r.get("content") for p, r in a.report["read"].items() if p in paths and (r.get("content") or "").strip()}
    assert not got, f"the attack read: {got}"


def check_process_attacks_failed(a: Attack) -> None:
    r = a.report
    won = [f"ptrace {k}" for k, v in r["ptrace"].items() if v["ok"]]
    won += [f"process_vm_readv {k}" for k, v in r["process_vm_readv"].items() if v["ok"]]
    won += [f"write /proc/{k}/mem" for k, v in r["proc_mem"].items() if v["ok"]]
    won += ["setns /proc/1/ns/net"] if r["setns"]["ok"] else []
    won += [f"unshare {k}" for k, v in r["unshare"].items() if v["ok"]]
    assert not won, f"these succeeded: {won}"


def check_network_unreachable(a: Attack, reached: list[str]) -> None:
    """``reached``: what the host's listener saw while the attack ran."""
    won = [k for k, v in a.report["tcp"].items() if v["connected"]]
    won += [k for k, v in a.report.get("udp", {}).items() if v.get("answer")]
    won += [k for k, v in a.report.get("unix", {}).items() if v["connected"]]
    assert not won and not reached, f"reached: {won} {reached}"


def fingerprint(path: Path) -> object:
    """What a path is on the host, without following links (to see any change)."""
    if not os.path.lexists(path):
        return None
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        return ("link", os.readlink(path))
    if stat.S_ISDIR(st.st_mode):
        return ("dir", sorted(os.listdir(path)))
    return ("file", hashlib.sha256(path.read_bytes()).hexdigest())


# --- the attacks ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def other_copy(pool, box):
    """Where another task's tests ran (the copy of its copy, kept on the host), holding a
    secret its tests made."""
    where = box.private / "other"
    where.mkdir(parents=True)
    (where / "test_other.py").write_text(textwrap.dedent("""
        import secrets
        def test_make_a_secret():
            with open("private.txt", "w") as fh:
                fh.write("OTHER-" + secrets.token_hex(16))
    """))
    handle = pool.pool.submit(Task(goal="other", workspace=str(where), agents=["tester"]))
    pool.task_ids.append(handle.task_id)
    assert handle.result(timeout=60).ok
    copy = workspaces_root() / (handle.task_id + TRIAL_SUFFIX)
    assert (copy / "private.txt").read_text().startswith("OTHER-")
    return copy


@pytest.fixture(scope="module")
def big_attack(pool, box, ray_places, listener, other_copy):
    """One task that tries to read, list, trace, connect and write its way out; plus the host before it."""
    home = os.path.expanduser("~")
    sup = pool.pool
    import ray

    sup_pid = ray.get(ray.get_actor(sup.name, namespace=sup.config.ray.namespace).info.remote())["pid"]
    site_pth = Path(SITE_PACKAGES) / f"zz_threadbound_hostile_{secrets.token_hex(4)}.pth"
    pool.n += 1
    original = box.exposed / f"ws{pool.n}"
    targets = {
        "snapshot dir": box.snapshots / "planted.txt",
        "key file": box.key_file,
        "site-packages .pth": site_pth,
        "original workspace (new file)": original / "planted.txt",
        "original workspace (its test)": original / "test_attack.py",
        "other task's copy (new file)": other_copy / "planted.txt",
        "other task's copy (its file)": other_copy / "private.txt",
        "~/.bashrc of the temp HOME": box.home / ".bashrc",
        "workspaces root": workspaces_root() / "planted.txt",
        "Ray's session dir": Path(ray_places.session_dir) / "planted.txt",
    }
    reads = [str(box.key_file), str(box.snapshots / "canary.txt"), os.environ["RAY_AUTH_TOKEN_PATH"],
             "/etc/shadow", str(other_copy / "private.txt"), os.path.join(home, ".bashrc"),
             os.path.join(home, ".gitconfig"), os.path.join(home, ".profile"), os.path.join(home, ".ray", "auth_token"),
             str(box.private / "secret.txt")]
    args = {
        "read": reads,
        "list": [str(box.snapshots), str(box.snapshots.parent), str(workspaces_root()), ray_places.session_dir,
                 ray_places.token_dir, home, str(original)],
        "environ": [sup_pid],
        "ptrace": [1, sup_pid], "process_vm_readv": [1, sup_pid], "proc_mem": [1, sup_pid],
        "setns": "/proc/1/ns/net", "unshare": ["CLONE_NEWUSER", "CLONE_NEWNET", "CLONE_NEWNS"],
        "tcp": [["127.0.0.1", listener.tcp_port], list(ray_places.gcs)],
        "udp": [["127.0.0.1", listener.udp_port]],
        "unix": [ray_places.raylet_socket, ray_places.store_socket],
        "write": [[str(p), "# planted by a hostile test\n"] for p in targets.values()],
    }
    workspace(original, args)
    before = {name: fingerprint(p) for name, p in targets.items()}
    listener.reached.clear()
    try:
        a = attack(pool, original)
    finally:
        if site_pth.exists():  # never leave a planted .pth behind, even when the test fails
            site_pth.unlink()
    reached = list(listener.reached)
    after = {name: fingerprint(p) for name, p in targets.items()}
    actor_pids = {e.data["pid"] for e in a.events if e.kind == "step_started"}
    return dict(attack=a, before=before, after=after, reads=reads, sup_pid=sup_pid, actor_pids=actor_pids,
                reached=reached, other_secret=(other_copy / "private.txt").read_text())


def test_the_attack_ran_sandboxed_and_finished(big_attack):
    a = big_attack["attack"]
    assert a.ok, a.error
    assert a.report.get("done"), a.tester.get("output")
    assert a.report["hostname"] == "sandbox" and a.report["uid"] != 0
    sandboxed_as_designed(a)
    no_crash_or_timeout(a)


def test_snapshot_key_token_shadow_and_home_are_not_readable(big_attack, box):
    a = big_attack["attack"]
    # Given: each of them is really there on the host, readable by anyone but the sandbox
    assert box.key_file.read_text().strip() == box.secrets["key_file"]
    assert stat.S_IMODE(box.key_file.stat().st_mode) & 0o004
    # Then: nothing came back, in the report, the tester's output or any event
    check_reads_got_nothing(a, big_attack["reads"])
    check_no_secret_came_out(a, {**box.secrets, "other task's secret": big_attack["other_secret"]})
    shadow = a.report["read"]["/etc/shadow"]
    assert "content" not in shadow and shadow["error"] == "EACCES"  # not root inside
    # The pool user's real home: nothing of it inside but the way to Python's prefix (pyenv)
    home = os.path.expanduser("~")
    assert not a.report["read"][os.path.join(home, ".gitconfig")]["exists"]
    assert not a.report["read"][os.path.join(home, ".bashrc")]["exists"]
    python_dirs = {Path(p).relative_to(home).parts[0] for p in (sys.prefix, sys.base_prefix, SITE_PACKAGES)
                   if p.startswith(home + "/")}
    assert set(a.report["list"][home].get("entries", [])) <= python_dirs


def test_snapshot_store_workspaces_root_and_rays_places_cannot_be_listed(big_attack, box, ray_places):
    a = big_attack["attack"]
    # Given: on the host each holds something (snapshots of this very pool, other copies, Ray's sockets)
    assert len(os.listdir(box.snapshots)) > 1 and len(os.listdir(workspaces_root())) > 1
    assert os.listdir(ray_places.session_dir)
    listed = a.report["list"]
    assert listed[str(box.snapshots)].get("entries", []) == []
    # at most the copy its tests run in
    assert listed[str(workspaces_root())].get("entries", []) in ([], [a.copy.name + TRIAL_SUFFIX])
    assert listed[ray_places.session_dir].get("entries", []) == []
    assert listed[ray_places.token_dir].get("entries", []) == []
    assert listed[str(a.original)].get("entries", []) == []


def test_no_process_environment_of_the_pool_is_readable(big_attack, box):
    a = big_attack["attack"]
    # Given: the supervisor and the tester's actor do hold the snapshot key in their environment
    for pid in [big_attack["sup_pid"], *big_attack["actor_pids"]]:
        env = psutil.Process(pid).environ()
        assert env.get("THREADBOUND_SNAPSHOT_KEY") == box.secrets["env_snapshot_key"], pid
    # Then: inside, only the sandbox's own processes are visible, with a cleared environment
    env = a.report["environ"]
    assert env["visible"] <= 4, env  # bwrap's init, the test run and its helpers
    assert box.secrets["env_snapshot_key"] not in env["text"] and "RAY_" not in env["text"]
    assert "content" not in env["explicit"][str(big_attack["sup_pid"])]


def test_ptrace_process_vm_readv_proc_mem_setns_and_unshare_all_fail(big_attack):
    a = big_attack["attack"]
    check_process_attacks_failed(a)
    assert a.report["ptrace"]["own_child"]["errno"] == "EPERM"  # seccomp, not only uids
    assert a.report["unshare"]["CLONE_NEWUSER"]["errno"] == "EPERM"


def test_loopback_server_gcs_and_raylet_socket_are_unreachable(big_attack, listener, ray_places):
    a = big_attack["attack"]
    # Given: each is really reachable from the host
    with socket.create_connection(("127.0.0.1", listener.tcp_port), timeout=2) as s:
        assert s.recv(100).decode() == listener.banner
    socket.create_connection(ray_places.gcs, timeout=2).close()
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(ray_places.raylet_socket)
    # Then: not from inside
    check_network_unreachable(a, big_attack["reached"])
    assert listener.banner not in a.everything


def test_writes_outside_the_copy_change_nothing_on_the_host(big_attack):
    before, after = big_attack["before"], big_attack["after"]
    changed = {k: (before[k], after[k]) for k in before if before[k] != after[k]}
    assert not changed, f"the attack changed these on the host: {changed}"


@pytest.mark.timeout(90)
def test_a_double_forked_daemon_does_not_outlive_the_run(pool, box):
    marker = f"threadbound-hostile-daemon-{secrets.token_hex(6)}"
    outside = box.exposed / f"{marker}.txt"
    pool.n += 1
    original = box.exposed / f"ws{pool.n}"
    args = {"daemon": {"marker": marker, "files": ["daemon-was-here.txt", str(outside)], "delay_s": 2.0}}
    workspace(original, args)
    a = attack(pool, original)
    copy_marker = a.copy.with_name(a.copy.name + TRIAL_SUFFIX) / "daemon-was-here.txt"
    assert a.ok and a.report["daemon"]["started"], (a.error, a.report)
    # The pid namespace is torn down as bwrap exits: a process of it may still be seen in its
    # last milliseconds (killed, not yet reaped), never a second later.
    t_done = time.monotonic()
    seen = []
    while time.monotonic() < t_done + 3:  # past the daemon's delay: had it lived, it would have written by now
        for p in psutil.process_iter(["cmdline", "status"]):
            if marker in " ".join(p.info["cmdline"] or []) and p.info["status"] != psutil.STATUS_ZOMBIE:
                seen.append((time.monotonic() - t_done, p.pid))
        time.sleep(0.1)
    survivors = sorted({pid for t, pid in seen if t > 1.0})
    try:
        assert not survivors, f"the daemon survived the run: pids {survivors}"
        assert not copy_marker.exists() and not outside.exists()
    finally:
        for pid in survivors:  # ours, found by a marker only this test made
            try:
                psutil.Process(pid).kill()
            except psutil.Error:
                pass


@pytest.mark.parametrize("what, limits, args, killed", [
    ("many small files", {"max_files": 300}, {"fill_files": {"count": 5000, "hold_s": 30}}, "max_files"),
    ("a big total size", {"disk_mb": 8}, {"fill_bytes": {"mb": 96, "hold_s": 30}}, "disk"),
], ids=["max_files", "disk"])
@pytest.mark.timeout(90)
def test_filling_the_disk_is_killed_and_the_pool_survives(pool, box, what, limits, args, killed):
    original = next_original(pool, box, args)
    t0 = time.monotonic()
    a = attack(pool, original, inputs={"sandbox": {"wall_s": 40, **limits}})
    assert not a.ok and a.tester["killed"] == killed, (what, a.tester.get("killed"), a.tester.get("output", "")[-500:])
    assert time.monotonic() - t0 < 30  # killed by the watchdog, not the wall clock
    no_crash_or_timeout(a)
    benign_task_succeeds(pool, box)


@pytest.mark.timeout(90)
def test_a_fork_bomb_is_contained_and_leaves_no_process(pool, box):
    original = next_original(pool, box, {"fork_bomb": {"seconds": 20}})
    a = attack(pool, original, inputs={"sandbox": {"wall_s": 40, "max_procs": 32, "cpu_s": 20}})
    assert not a.ok and a.tester["killed"] == "max_procs", (a.tester.get("killed"), a.tester.get("output", "")[-500:])
    no_crash_or_timeout(a)
    left = []
    for p in psutil.process_iter(["cwd"]):
        if p.info["cwd"] and p.info["cwd"].startswith(str(a.copy)):
            left.append(p.pid)
    assert not left, f"processes of the bomb are still running: {left}"
    benign_task_succeeds(pool, box)


@pytest.mark.timeout(90)
def test_a_memory_hog_hits_its_limit_and_the_pool_survives(pool, box):
    original = next_original(pool, box, {"memory": {"mb": 8192}})
    a = attack(pool, original, inputs={"sandbox": {"wall_s": 40, "memory_mb": 512}})
    got = a.report.get("memory", {})
    assert got.get("error") == "MemoryError" and got["allocated_mb"] <= 512, (got, a.tester.get("output", "")[-500:])
    no_crash_or_timeout(a)
    benign_task_succeeds(pool, box)


SYMLINK_ATTACK = '''\
import os


def test_plant_links_for_the_agents_outside():
    os.symlink({secret!r}, "notes.txt")        # the reviewer would show it, apply would copy it
    os.symlink("/dev/zero", "data")             # a reader that follows it never ends
    os.mkfifo("pipe.txt")                       # a reader that opens it blocks
    os.unlink("linked.py")                      # a link in the user's workspace, made a file here:
    with open("linked.py", "w") as fh:          # applying it would write through the user's link
        fh.write("pwned = True\\n")
    os.unlink("ldir")                           # a linked directory of the user's, made a real one
    os.mkdir("ldir")
    with open("ldir/new.py", "w") as fh:
        fh.write("pwned = True\\n")
    with open("fix.py", "w") as fh:             # and one honest change, which apply must write
        fh.write("VALUE = 42\\n")
'''


@pytest.mark.timeout(120)
def test_what_the_tests_write_never_reaches_the_reviewer_or_apply(pool, box):
    # Given: a user's workspace with a link to a file and one to a directory outside it,
    # and tests that plant links, a FIFO and a "fix" where they run
    pool.n += 1
    original = box.private / f"linked-ws{pool.n}"
    target = box.plant(box.private / f"target{pool.n}" / "target.py", "ORIGINAL = True\n")
    target_dir = target.parent
    original.mkdir(parents=True)
    secret = box.private / "secret.txt"
    (original / "test_links.py").write_text(SYMLINK_ATTACK.format(secret=str(secret)))
    os.symlink(target, original / "linked.py")
    os.symlink(target_dir, original / "ldir")
    before = {p: fingerprint(p) for p in [target, target_dir, secret]}
    # When: the tests run, then the reviewer reviews the copy and the task applies what it approved
    t0 = time.monotonic()
    a = attack(pool, original, agents=("tester", "reviewer"), inputs={"apply": True})
    assert a.ok, (a.error, a.tester.get("output", "")[-800:])
    # Then: the tests did plant it all, in the copy they ran in ...
    trial = a.copy.with_name(a.copy.name + TRIAL_SUFFIX)
    assert os.path.islink(trial / "notes.txt") and (trial / "fix.py").is_file()
    # ... but none of it reached the copy the reviewer read, nor the user: nothing to approve or apply
    review = next(e.data["output"] for e in a.events if e.kind == "step_finished" and e.agent == "reviewer")
    assert review["changed"] == [] and not review["not_reviewed"], review
    assert a.events[-1].data["applied"] == [] and not (original / "fix.py").exists()
    # ... the secret a link pointed at is nowhere in what the task said ...
    assert box.secrets["private_file"] not in a.everything
    # ... nothing was written through the user's links, and no link or FIFO reached the user ...
    assert {p: fingerprint(p) for p in before} == before
    assert os.readlink(original / "linked.py") == str(target) and os.readlink(original / "ldir") == str(target_dir)
    assert not any(os.path.lexists(original / n) for n in ("notes.txt", "data", "pipe.txt"))
    # ... and nothing hung
    no_crash_or_timeout(a)
    assert time.monotonic() - t0 < 60


def test_a_task_asking_for_the_network_is_refused_at_submit(pool, box):
    original = next_original(pool, box, {"tcp": [["1.1.1.1", 443]]})
    with pytest.raises(InvalidTask) as err:
        pool.pool.submit(Task(goal="g", workspace=str(original), agents=["tester"],
                              inputs={"sandbox": {"network": True}}))
    assert err.value.field == "inputs.sandbox.network"
    assert "inputs.sandbox.network" in str(err.value) and "policy.network" in str(err.value)
    assert not [t for t in pool.pool.tasks() if t.task_id not in pool.task_ids]  # nothing was queued


def test_the_pool_still_serves_after_every_attack(pool, box):
    benign_task_succeeds(pool, box)
    assert pool.pool.stats()["queue_depth"] == 0
    assert pool.pool.health()["mode"] == "normal"


# --- the suite can tell: the same checks against a pool that does not sandbox ------------


@pytest.mark.timeout(120)
def test_the_checks_fire_when_the_sandbox_is_off(ray_session, box, ray_places, listener):
    unconfined = Pool(hostile_config(f"hostile-unconfined-{os.getpid()}", box, ray_places,
                                     max_agents=1, max_agents_per_task=1,
                                     sandbox={"isolation": "none"}))
    scratch = box.base / "unconfined"
    scratch.mkdir()
    target = box.plant(scratch / "outside.txt", "untouched\n")
    try:
        import ray

        sup_pid = ray.get(ray.get_actor(unconfined.pool.name,
                                        namespace=unconfined.pool.config.ray.namespace).info.remote())["pid"]
        original = workspace(scratch / "ws", {
            "read": [str(box.key_file), str(box.snapshots / "canary.txt")],
            "environ": [sup_pid],
            "ptrace": [sup_pid], "process_vm_readv": [], "proc_mem": [], "setns": "/proc/1/ns/net",
            "unshare": ["CLONE_NEWNET"],
            "tcp": [["127.0.0.1", listener.tcp_port]],
            "write": [[str(target), "pwned\n"]],
        })
        listener.reached.clear()
        a = attack(unconfined, original)
        reached = list(listener.reached)
        assert a.ok, a.error
        assert any("no isolation at all" in n for n in a.tester["notes"])
        with pytest.raises(AssertionError):
            check_reads_got_nothing(a, [str(box.key_file)])
        with pytest.raises(AssertionError):
            check_no_secret_came_out(a, {"env_snapshot_key": box.secrets["env_snapshot_key"]})
        with pytest.raises(AssertionError):
            check_process_attacks_failed(a)
        with pytest.raises(AssertionError):
            check_network_unreachable(a, reached)
        assert target.read_text() != "untouched\n"  # the host check of writes fires too
    finally:
        listener.reached.clear()
        unconfined.close()
