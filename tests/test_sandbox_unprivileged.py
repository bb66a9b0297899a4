"""The sandbox holds for an unprivileged pool too: the same attacks, run as ``nobody``.

Most users run pools as themselves, not root: then bubblewrap needs a user namespace,
and where it cannot start, ``best_effort`` leaves Landlock and seccomp alone to hold.
These tests run tests/hostile_probe.py through ``threadbound.agents.sandbox.run`` (what
the tester calls) as nobody (tests/unprivileged.py stages the package and switches
user; as a non-root user the suite runs as itself), in the two modes:

``required``     bwrap with a user namespace, Landlock and seccomp inside;
``best_effort``  no bwrap (``bwrap="/nonexistent"``): Landlock and seccomp only.

Every secret and every target here is one that nobody *could* read or write without
the sandbox (world-readable files, nobody's own files, nobody's own processes), so a
failed attack is the sandbox's doing. ``test_the_checks_fire_without_isolation`` runs
the same attacks with ``isolation="none"`` and shows the same checks then fail.
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
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest

import unprivileged

ROOT = os.geteuid() == 0
WHY_NOT = unprivileged.why_not_as_nobody()
pytestmark = pytest.mark.skipif(WHY_NOT is not None, reason=WHY_NOT or "")

MODES = ["required", "best_effort"]
SETTINGS = {"required": {"isolation": "required"},
            "best_effort": {"isolation": "best_effort", "bwrap": "/nonexistent"},
            "none": {"isolation": "none"}}


def own(path: Path, mode: int) -> Path:
    """Make ``path`` the unprivileged user's (when we are root) with ``mode``."""
    if ROOT:
        os.chown(path, unprivileged.NOBODY, unprivileged.NOBODY)
    os.chmod(path, mode)
    return path


def directory(path: Path, owned: bool = False) -> Path:
    """A 0755 directory (the unprivileged user's own if ``owned``)."""
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o755)
    return own(path, 0o755) if owned else path


def put(path: Path, text: str, mode: int = 0o644, owned: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    os.chmod(path, mode)
    return own(path, mode) if owned else path


class Servers:
    """A TCP and a UDP server on loopback, and a unix socket anyone may connect to."""

    def __init__(self, unix_path: Path) -> None:
        self.tcp = socket.create_server(("127.0.0.1", 0))
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("127.0.0.1", 0))
        self.unix = socket.socket(socket.AF_UNIX)
        self.unix.bind(str(unix_path))
        os.chmod(unix_path, 0o777)
        self.unix.listen(5)
        self.unix_path = str(unix_path)
        for s in (self.tcp, self.udp, self.unix):
            s.settimeout(0.1)
        self.reached: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            for name, s in (("tcp", self.tcp), ("unix", self.unix)):
                try:
                    conn, _ = s.accept()
                    self.reached.append(name)
                    conn.close()
                except OSError:
                    pass
            try:
                _, peer = self.udp.recvfrom(100)
                self.reached.append("udp")
                self.udp.sendto(b"answer", peer)
            except OSError:
                pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        for s in (self.tcp, self.udp, self.unix):
            s.close()


@dataclasses.dataclass
class World:
    root: Path
    staged: Path | None
    site: Path  # where a planted .pth would go
    servers: Servers
    secrets: dict[str, str]
    env_canaries: dict[str, str]
    paths: dict[str, Path]


@pytest.fixture(scope="module")
def world():
    root = Path(tempfile.mkdtemp(prefix="threadbound-unprivileged-"))
    os.chmod(root, 0o755)
    staged = root if ROOT else None
    site = unprivileged.stage(root) if ROOT else Path(next(p for p in sys.path if p.endswith("site-packages")))
    if ROOT:
        own(site, 0o755)  # nobody may add a file there (a .pth): only the sandbox may stop it
    s = {name: f"{name.upper()}-{secrets.token_hex(12)}" for name in
         ("secret", "hidden", "inner", "keyfile", "token", "original", "other")}
    home = directory(root / "home", owned=True)  # the driver's HOME
    p = {
        "secret": put(directory(root / "secrets") / "secret.txt", s["secret"]),
        "visible": put(directory(root / "exposed") / "visible.txt", "VISIBLE to the sandbox on purpose"),
        "hidden": put(root / "exposed" / "hidden.txt", s["hidden"]),
        "inner": put(directory(root / "exposed" / "hidden_dir") / "inner.txt", s["inner"]),
        "keyfile": put(directory(home / ".threadbound") / "snapshot.key", s["keyfile"]),
        "token": put(directory(home / ".ray") / "auth_token", s["token"]),
        "bashrc": put(home / ".bashrc", "# nobody's shell start-up file\n", owned=True),
        "original": put(directory(root / "original", owned=True) / "file.txt", s["original"], owned=True),
        "other": put(directory(directory(root / "copies", owned=True) / "other", owned=True) / "private.txt",
                     s["other"], owned=True),
        "outside": put(directory(root / "outside", owned=True) / "target.txt", "untouched\n", owned=True),
    }
    servers = Servers(directory(root / "sock") / "listener.sock")
    canaries = {"OPENAI_API_KEY": "sk-canary-" + secrets.token_hex(12),
                "THREADBOUND_SNAPSHOT_KEY": "canary-" + secrets.token_hex(16)}
    w = World(root=root, staged=staged, site=site, servers=servers, secrets=s, env_canaries=canaries, paths=p)
    yield w
    servers.close()
    for f in site.glob("zz_threadbound_hostile_*.pth"):
        f.unlink()
    shutil.rmtree(root, ignore_errors=True)


def attack_args(w: World, mode: str) -> dict:
    p = w.paths
    writes = [p["outside"], p["bashrc"], p["original"], p["original"].parent / "planted.txt", p["other"],
              p["keyfile"], p["hidden"], p["visible"]]
    if ROOT or mode != "none":  # never let the unconfined run plant a .pth in a real site-packages
        writes.append(w.site / f"zz_threadbound_hostile_{mode}.pth")
    return {
        "read": [str(p[k]) for k in ("secret", "hidden", "inner", "keyfile", "token", "original", "other",
                                     "visible")] + ["/etc/hostname"],
        "list": [str(p["inner"].parent), str(p["original"].parent), str(p["other"].parent.parent), str(w.root)],
        "environ": ["$DRIVER_PID"],
        "ptrace": ["$DRIVER_PID"], "process_vm_readv": ["$DRIVER_PID"], "proc_mem": ["$DRIVER_PID"],
        "setns": "/proc/1/ns/net", "unshare": ["CLONE_NEWUSER", "CLONE_NEWNET", "CLONE_NEWNS"],
        "signal": ["$DRIVER_PID"],
        "tcp": [["127.0.0.1", w.servers.tcp.getsockname()[1]]],
        "udp": [["127.0.0.1", w.servers.udp.getsockname()[1]]],
        "unix": [w.servers.unix_path],
        "write": [[str(t), "# planted by a hostile test\n"] for t in writes] + [["inside.txt", "ok\n"]],
    }


def cases(w: World, mode: str, marker: str) -> list[dict]:
    settings = {**SETTINGS[mode], "read_only": [str(w.root / "exposed"), str(w.root / "home")],
                "hide": [str(w.paths["hidden"]), str(w.paths["inner"].parent)]}
    outside = str(w.root / "outside" / f"daemon-{mode}.txt")
    daemon = {"daemon": {"marker": marker, "files": ["daemon-was-here.txt", outside], "delay_s": 2.0}}
    out = [{"name": f"{mode}/attacks", "args": attack_args(w, mode), "limits": {"wall_s": 60}}]
    if mode != "none":
        out += [
            {"name": f"{mode}/max_files", "args": {"fill_files": {"count": 5000, "hold_s": 30}},
             "limits": {"wall_s": 40, "max_files": 300}},
            {"name": f"{mode}/disk", "args": {"fill_bytes": {"mb": 96, "hold_s": 30}},
             "limits": {"wall_s": 40, "disk_mb": 8}},
            {"name": f"{mode}/fork_bomb", "args": {"fork_bomb": {"seconds": 8}},
             "limits": {"wall_s": 40, "max_procs": 32, "cpu_s": 20}},
            {"name": f"{mode}/memory", "args": {"memory": {"mb": 8192}}, "limits": {"wall_s": 40, "memory_mb": 512}},
        ]
    out.append({"name": f"{mode}/daemon", "args": daemon, "limits": {"wall_s": 30}})
    for c in out:
        c["settings"] = settings
    return out


def fingerprint(path: Path):
    if not os.path.lexists(path):
        return None
    st = os.lstat(path)
    if stat.S_ISDIR(st.st_mode):
        return ("dir", sorted(os.listdir(path)))
    return ("file", hashlib.sha256(path.read_bytes()).hexdigest())


@dataclasses.dataclass
class Run:
    results: dict[str, dict]
    before: dict
    after: dict
    reached: list[str]
    daemon_seen: list[tuple[float, int]]  # (seconds after the driver ended, pid) of its processes
    marker: str
    elapsed_s: float

    def case(self, name: str) -> dict:
        return self.results[name]

    def text(self, name: str) -> str:
        r = self.results[name]
        return json.dumps(r.get("report", {})) + r.get("output", "")


def watched_paths(w: World, mode: str) -> dict[str, Path]:
    p = w.paths
    return {"outside": p["outside"], "bashrc": p["bashrc"], "original": p["original"],
            "original dir": p["original"].parent, "other copy": p["other"], "key file": p["keyfile"],
            "hidden": p["hidden"], "visible": p["visible"],
            "site-packages": w.site / f"zz_threadbound_hostile_{mode}.pth",
            "daemon outside": w.root / "outside" / f"daemon-{mode}.txt"}


_runs: dict[str, Run] = {}


def run_mode(w: World, mode: str) -> Run:
    """Run every case of ``mode`` once (unprivileged) and look at the host before and after."""
    if mode in _runs:
        return _runs[mode]
    marker = f"threadbound-unpriv-daemon-{mode}-{secrets.token_hex(6)}"
    watched = watched_paths(w, mode)
    before = {k: fingerprint(p) for k, p in watched.items()}
    config = {"copies": str(w.root / "copies"), "original": str(w.paths["original"].parent),
              "cases": cases(w, mode, marker)}
    w.servers.reached.clear()
    t0 = time.monotonic()
    results = unprivileged.run_driver(w.staged, config, w.env_canaries, timeout_s=240)
    elapsed = time.monotonic() - t0
    reached = list(w.servers.reached)
    # The daemon writes 2 s after it starts; look for it (by the marker only it carries) until then.
    ended = time.monotonic()
    seen = []
    while time.monotonic() < ended + 2.5:
        for proc in psutil.process_iter(["cmdline", "status"]):
            if marker in " ".join(proc.info["cmdline"] or []) and proc.info["status"] != psutil.STATUS_ZOMBIE:
                seen.append((time.monotonic() - ended, proc.pid))
        time.sleep(0.1)
    for pid in {pid for _, pid in seen}:  # ours (the unconfined run's daemon): stop it by its pid
        try:
            psutil.Process(pid).kill()
        except psutil.Error:
            pass
    after = {k: fingerprint(p) for k, p in watched.items()}
    _runs[mode] = Run(results, before, after, reached, seen, marker, elapsed)
    return _runs[mode]


@pytest.fixture(scope="module")
def runs(world):
    yield lambda mode: run_mode(world, mode)
    _runs.clear()


def layers(r: dict) -> dict[str, dict]:
    return {layer["name"]: layer for layer in r["layers"]}


# --- the checks (must fire without isolation: see the last test) -----------------------------


def check_no_secret(text: str, values: dict[str, str]) -> None:
    leaked = [k for k, v in values.items() if v in text]
    assert not leaked, f"leaked: {leaked}"


def check_process_attacks_failed(report: dict) -> None:
    won = [f"ptrace {k}" for k, v in report["ptrace"].items() if v["ok"]]
    won += [f"process_vm_readv {k}" for k, v in report["process_vm_readv"].items() if v["ok"]]
    won += [f"/proc/{k}/mem" for k, v in report["proc_mem"].items() if v["ok"]]
    won += ["setns"] if report["setns"]["ok"] else []
    won += [f"unshare {k}" for k, v in report["unshare"].items() if v["ok"]]
    won += [f"signal {k}" for k, v in report["signal"].items() if v["ok"]]
    assert not won, f"these succeeded: {won}"


def check_host_unchanged(run: Run, ignore=()) -> None:
    changed = {k: (run.before[k], run.after[k]) for k in run.before
               if run.before[k] != run.after[k] and k not in ignore}
    assert not changed, f"changed on the host: {changed}"


def check_tcp_unreachable(report: dict, reached: list[str]) -> None:
    won = [k for k, v in report["tcp"].items() if v["connected"]]
    assert not won and "tcp" not in reached, f"reached over TCP: {won} {reached}"


# --- the tests ----------------------------------------------------------------------------------


@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode", MODES)
def test_the_layers_are_the_ones_the_mode_promises(runs, mode):
    run = runs(mode)
    r = run.case(f"{mode}/attacks")
    assert "unavailable" not in r, r.get("unavailable")
    assert r["report"].get("done"), r["output"]
    held = layers(r)
    uid = unprivileged.NOBODY if ROOT else os.getuid()
    assert r["uid"] == uid and r["report"]["uid"] == uid  # the pool and its command: unprivileged
    assert held["landlock"]["applied"] and held["seccomp"]["applied"], r["layers"]
    assert held["environment"]["applied"] and held["limits"]["applied"]
    if mode == "required":
        assert held["namespaces"]["applied"] and ", user" in held["namespaces"]["detail"], held["namespaces"]
        assert held["user"]["applied"] and held["network"]["applied"]
        assert r["network_isolated"] and r["report"]["hostname"] == "sandbox"
        assert not any("best_effort" in n for n in r["notes"])
    else:
        assert not held["namespaces"]["applied"] and "/nonexistent" in held["namespaces"]["detail"]
        assert any("best_effort" in n and "no namespaces" in n for n in r["notes"])
        assert r["report"]["hostname"] != "sandbox"  # no UTS namespace: the host's own name


def test_best_effort_without_bubblewrap_still_applies_landlock_and_seccomp_and_says_so(runs, world):
    """tests/test_sandbox.py's case of this name (skipped as root), run here unprivileged."""
    r = runs("best_effort").case("best_effort/attacks")
    report, held = r["report"], layers(r)
    # the run happened with the layers that work, and every missing one is named
    assert r["exit_code"] == 0, r["output"]
    assert not held["namespaces"]["applied"] and "bwrap" in held["namespaces"]["detail"]
    assert held["landlock"]["applied"] and held["seccomp"]["applied"]
    assert any("best_effort" in n for n in r["notes"])
    assert world.secrets["secret"] not in runs("best_effort").text("best_effort/attacks")
    assert report["write"][str(world.paths["outside"])]["wrote"] is False
    assert world.paths["outside"].read_text() == "untouched\n"
    assert report["read"]["/etc/hostname"].get("content")  # the allow-listed system files stay readable
    assert report["ptrace"]["own_child"]["errno"] == "EPERM"  # seccomp
    assert report["write"]["inside.txt"]["wrote"] and (Path(r["copy"]) / "inside.txt").read_text() == "ok\n"


@pytest.mark.parametrize("mode", MODES)
def test_files_the_user_could_read_outside_the_allow_list_stay_out_of_sight(runs, world, mode):
    r = runs(mode).case(f"{mode}/attacks")
    # A world-readable file, the user's own workspace, another task's copy: none is bound or allowed
    check_no_secret(runs(mode).text(f"{mode}/attacks"), {k: world.secrets[k] for k in ("secret", "original", "other")})
    listed = r["report"]["list"]
    assert listed[str(world.paths["original"].parent)].get("entries", []) == []
    assert listed[str(world.paths["other"].parent.parent)].get("entries", []) in ([], [Path(r["copy"]).name])


@pytest.mark.parametrize("mode", MODES)
def test_hidden_paths_under_a_read_only_path_stay_hidden(runs, world, mode):
    """``hide`` wins over ``read_only``: SandboxSettings.hide is "never visible inside, even where
    they lie under a path that is" -- here a file and a directory listed in hide, and the key
    file and Ray token under the user's home (default_hidden), all under read-only paths."""
    r = runs(mode).case(f"{mode}/attacks")
    # Given: the read-only path really is readable inside, so what stays hidden under it is the sandbox's doing
    assert r["report"]["read"][str(world.paths["visible"])].get("content", "").startswith("VISIBLE")
    # Then
    check_no_secret(runs(mode).text(f"{mode}/attacks"),
                    {k: world.secrets[k] for k in ("hidden", "inner", "keyfile", "token")})
    assert r["report"]["list"][str(world.paths["inner"].parent)].get("entries", []) == []


@pytest.mark.parametrize("mode", MODES)
def test_the_environment_of_the_process_that_runs_it_is_not_readable(runs, world, mode):
    r = runs(mode).case(f"{mode}/attacks")
    env = r["report"]["environ"]
    # Given: the driver holds the canaries, and it is nobody's own process
    assert r["driver_pid"] and r["uid"] == (unprivileged.NOBODY if ROOT else os.getuid())
    check_no_secret(json.dumps(env) + r["output"], world.env_canaries)
    assert "content" not in env["explicit"][str(r["driver_pid"])]


@pytest.mark.parametrize("mode", MODES)
def test_ptrace_vm_readv_proc_mem_setns_unshare_and_signals_fail(runs, mode):
    report = runs(mode).case(f"{mode}/attacks")["report"]
    check_process_attacks_failed(report)
    assert report["unshare"]["CLONE_NEWUSER"]["errno"] == "EPERM"


@pytest.mark.parametrize("mode", MODES)
def test_the_hosts_loopback_and_unix_socket_are_unreachable(runs, world, mode):
    run = runs(mode)
    r = run.case(f"{mode}/attacks")
    check_tcp_unreachable(r["report"], run.reached)
    net = layers(r)["network"]
    unix = r["report"]["unix"][world.servers.unix_path]
    udp_answered = any(v.get("answer") for v in r["report"]["udp"].values())
    if mode == "required":
        assert not unix["connected"] and not udp_answered and not run.reached, (unix, run.reached)
    else:
        # Landlock holds TCP only; the layer says so, and that is what this mode promises.
        assert "UDP and unix sockets are not held" in net["detail"]
        assert "tcp" not in run.reached


@pytest.mark.parametrize("mode", MODES)
def test_writes_outside_the_copy_change_nothing_on_the_host(runs, mode):
    check_host_unchanged(runs(mode))


@pytest.mark.parametrize("mode", MODES)
def test_a_double_forked_daemon_does_not_outlive_the_run(runs, mode):
    run = runs(mode)
    r = run.case(f"{mode}/daemon")
    assert r["report"]["daemon"]["started"], r
    # (a process of a pid namespace being torn down may be seen for a few ms; not half a second)
    survivors = sorted({pid for t, pid in run.daemon_seen if t > 0.5})
    lasted = max((t for t, _ in run.daemon_seen), default=0.0)
    wrote = [str(p) for p in (Path(r["copy"]) / "daemon-was-here.txt",) if p.exists()]
    assert not survivors and not wrote and run.after["daemon outside"] is None, (
        f"the daemon (pids {survivors}) was still running {lasted:.1f} s after the run (watched for 2.5 s, "
        f"then killed by the test); it wrote: {wrote or 'nothing'}")


@pytest.mark.parametrize("kind", ["max_files", "disk"])
@pytest.mark.parametrize("mode", MODES)
def test_filling_the_disk_is_killed(runs, mode, kind):
    r = runs(mode).case(f"{mode}/{kind}")
    assert r["killed"] == kind and r["elapsed_s"] < 30, (r["killed"], r["elapsed_s"], r["output"][-500:])


@pytest.mark.parametrize("mode", MODES)
def test_a_fork_bomb_is_contained_and_leaves_nothing(runs, mode):
    r = runs(mode).case(f"{mode}/fork_bomb")
    bomb = r["report"].get("fork_bomb", {})
    if mode == "required":
        assert r["killed"] == "max_procs", (r["killed"], r["output"][-500:])
    else:
        # Without a user namespace RLIMIT_NPROC counts every process of the pool's uid, so the
        # bomb is refused forks before the watchdog sees max_procs of its own: held, not killed.
        assert r["killed"] == "max_procs" or bomb.get("failures", 0) > 0, (r["killed"], bomb, r["output"][-500:])
    left = [p.pid for p in psutil.process_iter(["cwd"]) if (p.info["cwd"] or "").startswith(r["copy"])]
    assert not left, f"left running: {left}"


@pytest.mark.parametrize("mode", MODES)
def test_a_memory_hog_hits_its_limit(runs, mode):
    r = runs(mode).case(f"{mode}/memory")
    got = r["report"]["memory"]
    assert got.get("error") == "MemoryError" and got["allocated_mb"] <= 512, (got, r["output"][-500:])


@pytest.mark.timeout(180)
def test_the_checks_fire_without_isolation(runs, world):
    # Given: the same attacks with isolation none (nothing but the user's own permissions)
    run = runs("none")
    r = run.case("none/attacks")
    assert any("no isolation at all" in n for n in r["notes"])
    # Then: every check above would have failed
    with pytest.raises(AssertionError):
        check_no_secret(run.text("none/attacks"), world.secrets)
    with pytest.raises(AssertionError):
        check_no_secret(json.dumps(r["report"]["environ"]), world.env_canaries)
    with pytest.raises(AssertionError):
        check_process_attacks_failed(r["report"])
    with pytest.raises(AssertionError):
        check_tcp_unreachable(r["report"], run.reached)
    with pytest.raises(AssertionError):
        check_host_unchanged(run)
    assert run.daemon_seen  # the daemon outlived the run (and was killed by this test)


# --- a virtualenv inside a hidden folder (Ray's token folder) ---------------------------------


def test_a_virtualenv_inside_rays_token_folder_is_named_not_run_as_a_test(world):
    """The driver runs from a virtualenv at <home>/.cache/tb/venv with RAY_AUTH_TOKEN_PATH
    in the same folder: ``required`` refuses with SandboxUnavailable naming the folder
    (before, the launcher never started and the run came back as exit 1 with layers
    "not applied"); ``best_effort`` (bwrap, and Landlock alone) shows the venv read-only
    and the token beside it, readable by this user without the sandbox, stays unreadable."""
    import subprocess

    base = directory(world.root / "tokenhome")
    tb = directory(base / ".cache" / "tb")
    venv = tb / "venv"
    subprocess.run([unprivileged.base_python(), "-m", "venv", "--without-pip", "--system-site-packages", str(venv)],
                   check=True, timeout=120)
    unprivileged.world_readable(venv)
    token = put(tb / "ray_auth_token", world.secrets["token"] + "-tb")
    staged = world.staged if ROOT else unprivileged.stage(directory(world.root / "stage-hidden")).parent
    copies = directory(world.root / "copies-hidden", owned=True)
    case_settings = {"required": {"isolation": "required"}, "best_effort": {"isolation": "best_effort"},
                     "landlock_only": {"isolation": "best_effort", "bwrap": "/nonexistent"}}
    config = {"copies": str(copies),
              "cases": [{"name": name, "args": {"read": [str(token)]}, "settings": s, "limits": {"wall_s": 60}}
                        for name, s in case_settings.items()]}
    results = unprivileged.run_driver(staged, config, {"RAY_AUTH_TOKEN_PATH": str(token)}, timeout_s=240,
                                      python=str(venv / "bin" / "python"))
    required = results["required"]
    assert "unavailable" in required, required
    assert str(tb) in required["unavailable"] and "the interpreter" in required["unavailable"]
    assert "RAY_AUTH_TOKEN_PATH" in required["unavailable"]
    for name in ("best_effort", "landlock_only"):
        r = results[name]
        assert r.get("exit_code") == 0, r
        read = r["report"]["read"][str(token)]
        assert "content" not in read and read.get("error") in ("ENOENT", "EACCES"), read
        assert any(str(venv) in note for note in r["notes"]), r["notes"]
        check_no_secret(json.dumps(r), {"token": world.secrets["token"] + "-tb"})
