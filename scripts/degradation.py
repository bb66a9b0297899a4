"""Replay a fault schedule against a local pool and print its health-mode timeline.

    python scripts/degradation.py                       # the default schedule below
    python scripts/degradation.py --schedule "5:0,5:1,8:flap,12:0" --window-s 3 --healthy-s 3

A schedule is comma-separated ``seconds:faults`` phases. ``faults`` is the share of
submitted tasks whose model calls fail (the simulated model's fault injection), or
``flap``: one second all failing, one second all healthy, and so on. Tasks are
submitted continuously (``--concurrency`` in flight); each streams ``--tokens`` tokens
when healthy.

Prints every mode transition as it happens (time since start, old -> new, why), a
per-second timeline (mode, error rate, tasks finished, how they were delivered), and a
summary: time from the first failure to degraded, from the last failure to normal, how
many times the pool entered degraded, and whether degraded tasks streamed tokens (they
must not).
"""

from __future__ import annotations

import argparse
import os
import random
import threading
import time

from local_ray import isolate


def parse_schedule(text: str) -> list[tuple[float, str]]:
    phases = []
    for part in text.split(","):
        seconds, _, faults = part.partition(":")
        faults = faults.strip() or "0"
        try:
            ok = float(seconds) > 0 and (faults == "flap" or 0 <= float(faults) <= 1)
        except ValueError:
            ok = False
        if not ok:
            raise SystemExit(f"--schedule: {part!r} is not seconds:faults (seconds > 0; faults 0..1 or flap), "
                             "e.g. 5:0,5:1,8:flap")
        phases.append((float(seconds), faults))
    return phases


def phase_at(phases: list[tuple[float, str]], t: float) -> tuple[str, float] | None:
    """The phase ``t`` seconds into the schedule: its label and the share of failing tasks
    (flap: 1 in even seconds of the phase, 0 in odd ones); None once the schedule is over."""
    start = 0.0
    for seconds, faults in phases:
        if t < start + seconds:
            if faults == "flap":
                return "flap", 1.0 if int(t - start) % 2 == 0 else 0.0
            return f"{float(faults):.0%}", float(faults)
        start += seconds
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--schedule", default="4:0,4:1,8:flap,14:0")
    ap.add_argument("--window-s", type=float, default=3.0, help="health.window_s")
    ap.add_argument("--healthy-s", type=float, default=3.0, help="health.healthy_period_s")
    ap.add_argument("--concurrency", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=40)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    phases = parse_schedule(args.schedule)

    scratch = isolate("degradation")

    from scripted_agents import Asker

    from threadbound.runtime import AgentPool, RuntimeConfig, Task

    cfg = RuntimeConfig.from_mapping({
        "name": "degradation", "max_agents": args.concurrency, "max_agents_per_task": 1, "prewarm": True,
        "retry": {"max_attempts": 1}, "ray": {"num_cpus": 2},
        "snapshot_dir": os.path.join(scratch, "snapshots"),
        "model": {"backend": "simulated", "tokens": args.tokens, "tokens_per_s": args.tokens * 5,
                  "faults": [{"kind": "error", "goal_contains": "FAIL"}]},
        "health": {"window_s": args.window_s, "healthy_period_s": args.healthy_s, "min_steps": 3,
                   "error_rate": 0.5, "check_interval_s": 0.1, "pause": False},
    })
    rng = random.Random(args.seed)
    finished: list[dict] = []  # one row per task: when, failing?, ok?, streamed?
    lock = threading.Lock()
    with AgentPool(cfg, agents={"ask": Asker}) as pool:
        t0 = time.time()
        stop = threading.Event()
        last_failure_submit = [None]
        first_failure_submit = [None]

        def worker() -> None:
            while not stop.is_set():
                phase = phase_at(phases, time.time() - t0)
                if phase is None:
                    return
                failing = rng.random() < phase[1]
                if failing:
                    now = time.time() - t0
                    first_failure_submit[0] = first_failure_submit[0] if first_failure_submit[0] is not None else now
                    last_failure_submit[0] = now
                h = pool.submit(Task(goal="FAIL" if failing else "work", agents=["ask"]))
                events = list(h.stream())
                kinds = {e.kind for e in events}
                with lock:
                    finished.append({"t": events[-1].ts - t0, "failing": failing, "ok": events[-1].kind == "succeeded",
                                     "tokens": "tokens" in kinds, "message": "message" in kinds,
                                     "level": next((e.data["level"] for e in events if e.kind == "step_started"), None)})

        threads = [threading.Thread(target=worker, daemon=True) for _ in range(args.concurrency)]
        for th in threads:
            th.start()
        total = sum(s for s, _ in phases)
        print(f"schedule {args.schedule} ({total:g} s); window {args.window_s:g} s, healthy period "
              f"{args.healthy_s:g} s; error_rate >= 50% over >= 3 steps degrades\n")
        print("   t  faults  mode      error_rate  finished  ok  streamed  message-only")
        timeline = []
        shown = 0
        second = 0
        # run the schedule, then give the pool time to recover
        while time.time() - t0 < total + args.window_s + args.healthy_s + 3:
            time.sleep(max(0.0, t0 + second + 1 - time.time()))
            second += 1
            h = pool.health()
            for tr in h["transitions"][shown:]:
                print(f"  ** {tr['at'] - t0:6.2f}s  {tr['from']} -> {tr['to']}: {'; '.join(tr['reasons'])}")
            shown = len(h["transitions"])
            with lock:
                rows = [r for r in finished if second - 1 <= r["t"] < second]
            phase = phase_at(phases, second - 0.5)
            timeline.append((second, h["mode"]))
            print(f"{second:4d}  {phase[0] if phase else '-':>6}  {h['mode']:<9} {h['signals']['error_rate']['value']:>9.0%}"
                  f"  {len(rows):>8}  {sum(r['ok'] for r in rows):>2}  {sum(r['tokens'] for r in rows):>8}"
                  f"  {sum(r['message'] and not r['tokens'] for r in rows):>12}")
            if phase is None and h["mode"] == "normal" and h["transitions"] and second > total + 1:
                break
        stop.set()
        for th in threads:
            th.join(timeout=30)
        transitions = pool.health()["transitions"]

    entered = [t for t in transitions if t["to"] == "degraded" and t["from"] == "normal"]
    left = [t for t in transitions if t["to"] == "normal"]
    print("\nsummary")
    print(f"  transitions: {' -> '.join(['normal'] + [t['to'] for t in transitions])}")
    print(f"  entered degraded {len(entered)} time(s)")
    if entered and first_failure_submit[0] is not None:
        print(f"  first failing submit -> degraded: {entered[0]['at'] - t0 - first_failure_submit[0]:.2f} s "
              f"(window {args.window_s:g} s)")
    if left and last_failure_submit[0] is not None:
        print(f"  last failing submit -> normal: {left[-1]['at'] - t0 - last_failure_submit[0]:.2f} s "
              f"(window + healthy period = {args.window_s + args.healthy_s:g} s)")
    degraded_spans = []
    start = None
    for t in transitions:
        if t["to"] != "normal" and start is None:
            start = t["at"] - t0
        elif t["to"] == "normal" and start is not None:
            degraded_spans.append((start, t["at"] - t0))
            start = None

    def during(r):
        return any(a + 0.3 < r["t"] and r["t"] < b for a, b in degraded_spans)

    healthy_in_degraded = [r for r in finished if not r["failing"] and during(r)]
    streamed_anyway = [r for r in healthy_in_degraded if r["tokens"] and r["level"] != 1]
    print(f"  healthy tasks finished while degraded: {len(healthy_in_degraded)}, of which level-1 message-only: "
          f"{sum(1 for r in healthy_in_degraded if r['level'] == 1 and not r['tokens'])}, "
          f"started before the transition (streamed, then one message): {len(streamed_anyway)}")
    print(f"  tasks: {len(finished)} finished, {sum(r['ok'] for r in finished)} succeeded, "
          f"{sum(r['failing'] for r in finished)} injected to fail")


if __name__ == "__main__":
    main()
