"""Kill the supervisor (or agent actors) mid-run and check that resume loses nothing
and re-runs nothing, on a local Ray.

    python scripts/resume_chaos.py              # each kill point 2 times, 4 tasks each
    python scripts/resume_chaos.py --repeat 5 --tasks 6

Kill points: ``mid-stream`` (tokens flowing), ``between-steps`` (right after a step
committed), ``mid-snapshot-write`` (a snapshot temp file is being written; tasks
carry 8 MB of inputs so the write takes a while) and ``agent-actors`` (SIGKILL of
busy agent actors, no supervisor crash). The supervisor is SIGKILLed; Ray restarts
it and it resumes from its own snapshots while clients keep streaming.

Per run it prints: tasks that succeeded, committed steps, committed steps executed
more than once (must be 0), steps that were in flight and restarted, stream
defects (duplicate or missing offsets, must be 0), committed steps whose external
effect is missing (must be 0), and the resume time: from the kill to the first ``resumed`` event a client saw.
Exit code 1 if any run broke a promise.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

from local_ray import isolate  # also puts tests/ (scripted agents, chaos tools) on the path

POINTS = ("mid-stream", "between-steps", "mid-snapshot-write", "agent-actors")


def _wait(cond, timeout_s: float, interval_s: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(interval_s)
    return False


def one_run(point: str, run: int, n_tasks: int, snapshots: str, scratch: str) -> dict:
    from chaos_tools import follow, kill_busy_agents, runs
    from scripted_agents import Scripted

    from threadbound.runtime import AgentPool, RuntimeConfig, Task

    mark = os.path.join(scratch, f"{point}-{run}")
    os.makedirs(mark)
    name = f"chaos-{point}-{run}"
    spec = {"tokens": 8, "token_sleep_s": 0.03, "mark": mark, "rounds": 2}
    if point == "mid-snapshot-write":
        spec["ballast"] = "x" * (8 << 20)
    cfg = RuntimeConfig.from_mapping({
        "name": name, "max_agents": 3, "max_agents_per_task": 3, "snapshot_dir": snapshots,
        "snapshot_interval_s": 0.2 if point == "mid-snapshot-write" else 0.5, "token_interval_ms": 20,
        "retry": {"max_attempts": 6, "backoff_s": 0.05, "max_backoff_s": 0.2}})
    pool = AgentPool(cfg, agents={r: Scripted for r in "abc"})
    where = os.path.join(snapshots, name)
    try:
        handles = [pool.submit(Task(goal=f"task {i}", agents=["a", "b", "c"], inputs={"*": spec}))
                   for i in range(n_tasks)]
        readers = follow(handles)
        events = lambda: [ev for r in readers for ev in list(r.events)]  # noqa: E731
        pid = pool.info()["pid"]
        killed_at = None
        if point == "agent-actors":
            kill_busy_agents(pool, 3)
        else:
            if point == "mid-stream":
                ok = _wait(lambda: sum(ev.kind == "tokens" for ev in events()) > 10, 60)
            elif point == "between-steps":
                ok = _wait(lambda: sum(ev.kind == "step_finished" for ev in events()) >= 3, 60, 0.001)
            else:
                ok = _wait(lambda: any(n.startswith(".snap-") for n in os.listdir(where)), 60, 0.001)
            assert ok, f"{point}: the kill point was never reached"
            killed_at = time.time()
            os.kill(pid, signal.SIGKILL)
        results = [h.result(timeout=180) for h in handles]
        for r in readers:
            r.join(60)
        executions = runs(mark)
        effects = set(os.listdir(os.path.join(mark, "effects")))
        committed = rerun = restarted = defects = missing = 0
        resume_s = None
        for h, r, res in zip(handles, readers, results):
            offsets = [ev.offset for ev in r.events]
            defects += offsets != list(range(len(offsets))) or r.error is not None
            resumed = next((ev for ev in r.events if ev.kind == "resumed"), None)
            if resumed is not None and killed_at is not None:
                seen = r.arrivals[r.events.index(resumed)] - killed_at
                resume_s = seen if resume_s is None else min(resume_s, seen)
                restarted += len(resumed.data["restarting"])
            for ev in r.events:
                if ev.kind != "step_finished":
                    continue
                committed += 1
                key = f"{h.task_id}:{ev.data['round']}:{ev.agent}:{ev.data['attempt']}"
                missing += key.replace(":", "_") not in effects
                if resumed is None or ev.offset < resumed.offset:
                    rerun += executions[key] > 1
            for role in "abc":
                finished = sum(1 for ev in r.events if ev.kind == "step_finished" and ev.agent == role)
                defects += res.outputs[role]["calls"] != finished
        return {"point": point, "run": run, "succeeded": sum(r.status == "succeeded" for r in results),
                "tasks": n_tasks, "committed": committed, "rerun": rerun, "restarted": restarted,
                "defects": defects, "effects_missing": missing,
                "resume_s": resume_s}
    finally:
        pool.shutdown(grace_s=0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--tasks", type=int, default=4)
    ap.add_argument("--points", default=",".join(POINTS))
    args = ap.parse_args()
    scratch = isolate("chaos")
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    snapshots = os.path.join(scratch, "snapshots")
    rows = []
    try:
        for point in args.points.split(","):
            for run in range(args.repeat):
                row = one_run(point, run, args.tasks, snapshots, scratch)
                rows.append(row)
                rs = "-" if row["resume_s"] is None else f"{row['resume_s']:.2f}s"
                print(f"{point:<19} run {run}: {row['succeeded']}/{row['tasks']} succeeded, "
                      f"{row['committed']} committed steps, {row['rerun']} re-run, "
                      f"{row['restarted']} in-flight restarted, {row['defects']} stream/state defects, "
                      f"{row['effects_missing']} effects missing, "
                      f"resume {rs}", flush=True)
    finally:
        ray.shutdown()
    bad = [r for r in rows if r["succeeded"] != r["tasks"] or r["rerun"] or r["defects"] or r["effects_missing"]]
    times = sorted(r["resume_s"] for r in rows if r["resume_s"] is not None)
    if times:
        print(f"resume time (kill -> first resumed event at a client): median {times[len(times) // 2]:.2f}s, "
              f"worst {times[-1]:.2f}s over {len(times)} supervisor kills")
    print("OK: nothing lost, nothing re-run" if not bad else f"BROKEN in {len(bad)} run(s)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
