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
defects (duplicate or missing offsets, must be 0), effects done twice (must be 0),
and the resume time: from the kill to the first ``resumed`` event a client saw.
Exit code 1 if any run broke a promise.
"""

from __future__ import annotations

import argparse
import collections
import os
import secrets
import signal
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

POINTS = ("mid-stream", "between-steps", "mid-snapshot-write", "agent-actors")


def _isolate() -> str:
    scratch = tempfile.mkdtemp(prefix="threadbound-chaos-")
    if "RAY_AUTH_TOKEN_PATH" not in os.environ and "RAY_AUTH_TOKEN" not in os.environ:
        token = os.path.join(scratch, "auth_token")  # keep ~/.ray untouched
        with open(os.open(token, os.O_WRONLY | os.O_CREAT, 0o600), "w") as fh:
            fh.write(secrets.token_hex(32))
        os.environ["RAY_AUTH_TOKEN_PATH"] = token
    os.environ.setdefault("THREADBOUND_SNAPSHOT_KEY", secrets.token_hex(32))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [sys.path[0], os.environ.get("PYTHONPATH")]))
    return scratch


class Reader(threading.Thread):
    def __init__(self, handle) -> None:
        super().__init__(daemon=True)
        self.handle, self.events, self.arrivals, self.error = handle, [], [], None

    def run(self) -> None:
        try:
            for ev in self.handle.stream():
                self.events.append(ev)
                self.arrivals.append(time.time())
        except BaseException as exc:  # noqa: BLE001 - reported
            self.error = exc


def _wait(cond, timeout_s: float, interval_s: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(interval_s)
    return False


def one_run(point: str, run: int, n_tasks: int, snapshots: str, scratch: str) -> dict:
    import ray
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
        readers = [Reader(h) for h in handles]
        for r in readers:
            r.start()
        events = lambda: [ev for r in readers for ev in list(r.events)]  # noqa: E731
        pid = ray.get(pool._sup.info.remote())["pid"]
        killed_at = None
        if point == "agent-actors":
            kills = 0
            deadline = time.monotonic() + 60
            while kills < 3 and time.monotonic() < deadline:
                busy = [s for s in pool.stats()["slots"] if s["busy"] and s["pid"]]
                if busy:
                    os.kill(busy[0]["pid"], signal.SIGKILL)
                    kills += 1
                    time.sleep(0.6)
                time.sleep(0.05)
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
        with open(os.path.join(mark, "runs.log")) as fh:
            executions = collections.Counter(line.strip() for line in fh)
        effects = os.listdir(os.path.join(mark, "effects"))
        committed = rerun = restarted = defects = 0
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
                if resumed is None or ev.offset < resumed.offset:
                    rerun += executions[key] > 1
            for role in "abc":
                finished = sum(1 for ev in r.events if ev.kind == "step_finished" and ev.agent == role)
                defects += res.outputs[role]["calls"] != finished
        return {"point": point, "run": run, "succeeded": sum(r.status == "succeeded" for r in results),
                "tasks": n_tasks, "committed": committed, "rerun": rerun, "restarted": restarted,
                "defects": defects, "effects_twice": len(effects) - len(set(effects)),
                "resume_s": resume_s}
    finally:
        pool.shutdown(grace_s=0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--tasks", type=int, default=4)
    ap.add_argument("--points", default=",".join(POINTS))
    args = ap.parse_args()
    scratch = _isolate()
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
                      f"resume {rs}", flush=True)
    finally:
        ray.shutdown()
    bad = [r for r in rows if r["succeeded"] != r["tasks"] or r["rerun"] or r["defects"] or r["effects_twice"]]
    times = sorted(r["resume_s"] for r in rows if r["resume_s"] is not None)
    if times:
        print(f"resume time (kill -> first resumed event at a client): median {times[len(times) // 2]:.2f}s, "
              f"worst {times[-1]:.2f}s over {len(times)} supervisor kills")
    print("OK: nothing lost, nothing re-run" if not bad else f"BROKEN in {len(bad)} run(s)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
