"""Which sandbox layers work on this machine, each proved by a tiny probe run through it.

``threadbound doctor`` prints :func:`check`'s rows. The probe is one short Python run
in the sandbox (``best_effort``, so it shows what works even where ``required``
would refuse) that tries, from inside, what each layer must stop.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import tempfile
import textwrap
from dataclasses import dataclass

from ..workspace import workspaces_root
from . import mounts
from .probe import capabilities
from .runner import run
from .settings import SandboxLimits, SandboxSettings, SandboxUnavailable

_PROBE = textwrap.dedent("""
    import ctypes, errno, json, os, socket, resource, sys
    libc = ctypes.CDLL(None, use_errno=True)
    out = {"uid": os.getuid(), "hostname": socket.gethostname()}
    try:
        out["pids"] = len([p for p in os.listdir("/proc") if p.isdigit()])
    except OSError:
        out["pids"] = None
    try:
        open(sys.argv[1]).read()
        out["canary"] = "READ"
    except OSError as e:
        out["canary"] = errno.errorcode.get(e.errno, str(e.errno))
    out["unshare"] = libc.unshare(0x00020000)
    out["unshare_errno"] = errno.errorcode.get(ctypes.get_errno(), "")
    s = socket.socket()
    s.settimeout(2)
    try:
        s.connect(("127.0.0.1", int(sys.argv[2])))
        out["tcp"] = "CONNECTED"
    except OSError as e:
        out["tcp"] = errno.errorcode.get(e.errno, str(e.errno))
    try:
        open("/usr/threadbound-probe", "w")
        out["write_usr"] = "WROTE"
    except OSError as e:
        out["write_usr"] = errno.errorcode.get(e.errno, str(e.errno))
    out["nproc"] = resource.getrlimit(resource.RLIMIT_NPROC)[0]
    out["env"] = sorted(os.environ)
    print("PROBE" + json.dumps(out))
""")


@dataclass(frozen=True)
class Row:
    layer: str
    ok: bool
    detail: str


def hidden_check(settings: SandboxSettings) -> tuple[Row, list[mounts.Covered]]:
    """The ``hidden`` row: does a path the pool hides (with the workspaces root, as the
    tester hides it) cover the interpreter, Python's prefixes or this package? The
    runner's own check (:func:`mounts.covering`), from this process's environment."""
    hidden = mounts.hidden_paths(settings.hiding(str(workspaces_root())).hide)
    found = mounts.covering(hidden)
    if not found:
        return Row("hidden", True, f"no hidden path covers Python ({sys.executable}) or this package; "
                                   f"hidden: {', '.join(hidden)}"), []
    stuck = [c for c in found if not mounts.revealable(c)]
    if settings.isolation == "best_effort" and not stuck:
        return Row("hidden", False, "; ".join(str(c) for c in found) + ": best_effort shows "
                   + ", ".join(mounts.reveal_paths(found)) + " read-only inside it and keeps the rest hidden; "
                   "to run required, move the virtualenv (or the package) out of it or point what is hidden "
                   "elsewhere"), found
    return Row("hidden", False, mounts.covered_message(stuck or found, best_effort_helps=not stuck)), found


def check(settings: SandboxSettings | None = None) -> tuple[list[Row], bool]:
    """(one row per layer, whether ``settings.isolation`` can run sandboxed commands here)."""
    settings = settings or SandboxSettings()
    caps = capabilities(settings.bwrap)
    hidden_row, found = hidden_check(settings)
    rows: list[Row] = [hidden_row]
    work = tempfile.mkdtemp(prefix="threadbound-doctor-")
    secret_dir = tempfile.mkdtemp(prefix="threadbound-doctor-secret-")
    canary = os.path.join(secret_dir, "canary")
    with open(canary, "w") as fh:
        fh.write("canary")
    os.chmod(secret_dir, 0o755)
    os.chmod(canary, 0o644)  # readable by anyone: only the sandbox may stop the read
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    try:
        with open(os.path.join(work, "probe.py"), "w") as fh:
            fh.write(_PROBE)
        probe_settings = SandboxSettings("best_effort", settings.hide + (secret_dir,), settings.read_only,
                                         settings.pass_env, settings.bwrap, settings.uid)
        try:
            res = run([sys.executable, "probe.py", canary, str(port)], cwd=work,
                      limits=SandboxLimits(wall_s=30, cpu_s=10), settings=probe_settings)
        except SandboxUnavailable as exc:  # a hidden path that is Python's prefix, or a launcher that did not start
            return [*rows, Row("probe", False, str(exc))], False
        line = next((l for l in res.output.splitlines() if l.startswith("PROBE")), None)
        seen = json.loads(line[5:]) if line else {}
        layers = {l.name: l for l in res.layers}
        if not seen:
            rows.append(Row("probe", False, "the probe did not run: " + res.output.strip()[-500:]))
        ns = layers.get("namespaces")
        rows.append(Row("namespaces", bool(ns and ns.applied and seen.get("hostname") == "sandbox"),
                        (ns.detail if ns else "?") + (f" | probe: hostname {seen.get('hostname')!r}, "
                                                      f"{seen.get('pids')} processes visible, a hidden file: "
                                                      f"{seen.get('canary')}" if seen else "")))
        user = layers.get("user")
        rows.append(Row("user", bool(user and user.applied and seen.get("uid", 0) != 0),
                        (user.detail if user else "?") + (f" | probe: uid {seen.get('uid')}" if seen else "")))
        ll = layers.get("landlock")
        rows.append(Row("landlock", bool(ll and ll.applied), (ll.detail if ll else "?")
                        + (f" | probe: TCP connect -> {seen.get('tcp')}" + (" (refused by Landlock)" if seen.get("tcp") == "EACCES"
                                                                    else "") if seen else "")))
        sc = layers.get("seccomp")
        rows.append(Row("seccomp", bool(sc and sc.applied and seen.get("unshare_errno") == "EPERM"),
                        (sc.detail if sc else "?") + (f" | probe: unshare() -> {seen.get('unshare_errno') or 'allowed'}"
                                                      if seen else "")))
        net = layers.get("network")
        rows.append(Row("network", bool(seen) and seen.get("tcp") != "CONNECTED",
                        (net.detail if net else "?") + (f" | probe: TCP to a host port -> {seen.get('tcp')}"
                                                        if seen else "")))
        rows.append(Row("secrets", bool(seen) and seen.get("canary") != "READ",
                        f"a world-readable file in a hidden directory -> {seen.get('canary', '?')}; "
                        f"writing /usr -> {seen.get('write_usr', '?')}"))
        lim = layers.get("limits")
        rows.append(Row("limits", bool(lim), (lim.detail if lim else "?")
                        + (f" | probe: RLIMIT_NPROC {seen.get('nproc')}" if seen else "")))
        cg = layers.get("cgroup")
        rows.append(Row("cgroup", bool(cg and cg.applied), cg.detail if cg else "?"))
        env = layers.get("environment")
        rows.append(Row("environment", bool(env), "probe saw only: " + ", ".join(seen.get("env", []))))
    finally:
        listener.close()
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(secret_dir, ignore_errors=True)
    can_run = settings.isolation == "none" or (
        (settings.isolation != "required" or caps.bwrap is not None)
        and (not found or (settings.isolation == "best_effort" and all(mounts.revealable(c) for c in found))))
    return rows, can_run


def refusal(settings: SandboxSettings, rows: list[Row]) -> str:
    """Why ``settings.isolation`` refuses sandboxed commands here, and what to do."""
    hidden = next((r for r in rows if r.layer == "hidden" and not r.ok), None)
    if hidden is not None:
        return hidden.detail
    return "install bubblewrap, enable unprivileged user namespaces, or set sandbox.isolation: best_effort"
