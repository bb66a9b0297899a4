"""What the sandbox adds to one test run, layer by layer, against an unsandboxed run.

    python scripts/sandbox_cost.py              # 30 runs of each variant
    python scripts/sandbox_cost.py --runs 100

Every variant runs the same command (``python -c pass``) in the same copy, in this
one process, interleaved round-robin so that machine noise hits all of them alike.
It prints the median and p90 wall time of each, and what each adds over the
unsandboxed baseline (``subprocess.run``). Target: the full sandbox adds <= 50 ms.

Variants, each one layer more than the last:

    baseline      subprocess.run, no confinement at all
    runner        sandbox.run with isolation none: rlimits, watchdog, output capture
    namespaces    + bubblewrap (mount, PID, network, IPC, UTS namespaces, allow-listed mounts)
    launcher      + the in-sandbox launcher (a root pool's uid drop happens here)
    landlock      + Landlock
    full          + seccomp: what the tester really runs (sandbox.run, isolation required)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from threadbound.agents import sandbox
from threadbound.agents.sandbox import mounts
from threadbound.agents.sandbox.probe import capabilities
from threadbound.agents.sandbox.plan import _LAUNCHER
from threadbound.agents.sandbox.seats import _chown_tree, sandbox_uid
from threadbound.agents.sandbox.watchdog import rlimits

COMMAND = [sys.executable, "-c", "pass"]


def _bwrap_argv(copy: str, launcher_cfg: dict | None) -> list[str]:
    caps = capabilities()
    root = os.geteuid() == 0
    args = mounts.bwrap_args(copy=copy, read_only=[], hidden=mounts.default_hidden(), env={"PATH": "/usr/bin"},
                             network=False, root=root, seccomp_fd=None, tmp_bytes=64 << 20)
    argv = [caps.bwrap, *args, "--"]
    if launcher_cfg is not None:
        argv += [sys.executable, "-I", "-S", "-c", _LAUNCHER, json.dumps(launcher_cfg)]
    return argv + COMMAND


def variants(copy: str) -> dict:
    caps = capabilities()
    if caps.bwrap is None:
        sys.exit(f"bubblewrap cannot start here ({caps.bwrap_reason}); nothing to measure")
    root = os.geteuid() == 0
    uid = sandbox_uid(sandbox.SandboxSettings()) if root else None
    if uid is not None:
        _chown_tree(copy, uid, uid)
    base_cfg = {"cwd": copy, "rlimits": rlimits(sandbox.SandboxLimits()), **({"uid": uid, "gid": uid} if uid else {})}
    ll_cfg = {**base_cfg, "landlock": {"deny_tcp": True, "ro": ["/"], "rw": [copy, "/tmp"], "dev": ["/dev"]}}
    limits = sandbox.SandboxLimits(wall_s=30)

    def run_argv(argv):
        return lambda: subprocess.run(argv, cwd=copy, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                      check=False)

    return {
        "baseline": lambda: subprocess.run(COMMAND, cwd=copy, check=True),
        "runner": lambda: sandbox.run(COMMAND, cwd=copy, limits=limits,
                                      settings=sandbox.SandboxSettings(isolation="none")),
        "namespaces": run_argv(_bwrap_argv(copy, None)),
        "launcher": run_argv(_bwrap_argv(copy, base_cfg)),
        "landlock": run_argv(_bwrap_argv(copy, ll_cfg)) if caps.landlock_abi else None,
        "full": lambda: sandbox.run(COMMAND, cwd=copy, limits=limits),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=30, help="runs of each variant (default 30)")
    args = ap.parse_args()
    copy = tempfile.mkdtemp(prefix="threadbound-sandbox-cost-")
    todo = {k: v for k, v in variants(copy).items() if v is not None}
    full = sandbox.run(COMMAND, cwd=copy)
    assert full.exit_code == 0, full.output
    times: dict[str, list[float]] = {k: [] for k in todo}
    for k, fn in todo.items():  # warm-up: page cache, the probe's cached capabilities
        fn()
    for _ in range(args.runs):
        for k, fn in todo.items():
            t = time.perf_counter()
            fn()
            times[k].append((time.perf_counter() - t) * 1000)
    base = statistics.median(times["baseline"])
    print(f"sandbox cost of one run of `python -c pass`, {args.runs} runs each, "
          f"{'root' if os.geteuid() == 0 else 'non-root'} pool, layers applied in the full run: "
          + ", ".join(l.name for l in full.layers if l.applied))
    print(f"{'variant':<12} {'median ms':>10} {'p90 ms':>8} {'added ms':>9} {'ratio':>6}")
    prev = base
    for k, ts in times.items():
        med = statistics.median(ts)
        p90 = sorted(ts)[int(0.9 * (len(ts) - 1))]
        print(f"{k:<12} {med:>10.1f} {p90:>8.1f} {med - base:>+9.1f} {med / base:>6.2f}"
              + ("" if k == "baseline" else f"   (this layer: {med - prev:+.1f} ms)"))
        prev = med
    added = statistics.median(times["full"]) - base
    print(f"full sandbox adds {added:.1f} ms per run (target <= 50 ms): {'OK' if added <= 50 else 'OVER'}")


if __name__ == "__main__":
    main()
