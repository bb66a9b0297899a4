"""Measure how fast hung steps are ended and cancelled tasks stop, on a local Ray.

    python scripts/deadlines.py            # 5 hangs, 10 cancels
    python scripts/deadlines.py --n 20

Prints, for hung steps, the time from the step's deadline to its `step_timed_out`
event (target: within 2 s), and for cancels the time from `handle.cancel()` to the
`cancelled` event (target: within 500 ms). Both from the event log's timestamps, so
they are what a client watching the stream would see.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from local_ray import isolate  # also puts tests/ (scripted agents) on the path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=5, help="hung steps to measure (cancels: 2n)")
    ap.add_argument("--step-timeout-s", type=float, default=1.0)
    args = ap.parse_args()

    scratch = isolate("deadlines")

    from scripted_agents import Scripted

    from threadbound.runtime import AgentPool, RuntimeConfig, Task, TaskError

    cfg = RuntimeConfig.from_mapping({"name": "deadlines", "max_agents": 4, "max_agents_per_task": 1,
                                      "step_timeout_s": args.step_timeout_s, "prewarm": True,
                                      "retry": {"max_attempts": 1}, "ray": {"num_cpus": 2},
                                      "snapshot_dir": os.path.join(scratch, "snapshots")})
    with AgentPool(cfg, agents={"a": Scripted}) as pool:
        overshoot = []
        for _ in range(args.n):
            h = pool.submit(Task(goal="hang", agents=["a"], inputs={"a": {"hang_on": [1]}}))
            try:
                h.result(timeout=60)
            except TaskError:
                pass
            ev = {e.kind: e for e in h.stream()}
            overshoot.append(ev["step_timed_out"].ts - ev["step_started"].ts - args.step_timeout_s)
        latency = []
        for _ in range(2 * args.n):
            # its own long step timeout: only the cancel may end this step
            h = pool.submit(Task(goal="stream", agents=["a"], step_timeout_s=120,
                                 inputs={"a": {"tokens": 10_000, "token_sleep_s": 0.005}}))
            for e in h.stream():
                if e.kind == "tokens":
                    break
            t0 = time.time()
            h.cancel()
            latency.append(list(h.stream())[-1].ts - t0)

    def row(name, xs, target):
        print(f"{name:<34} median {statistics.median(xs) * 1000:7.1f} ms   max {max(xs) * 1000:7.1f} ms"
              f"   target <= {target * 1000:.0f} ms   {'ok' if max(xs) <= target else 'MISSED'}")

    print(f"machine: {os.cpu_count()} cores; n={args.n}; step_timeout_s={args.step_timeout_s}")
    row("hung step: deadline -> timed_out", overshoot, 2.0)
    row("cancel() -> cancelled event", latency, 0.5)


if __name__ == "__main__":
    main()
