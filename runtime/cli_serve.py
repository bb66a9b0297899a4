"""``threadbound serve`` (the HTTP gateway in front of a pool) and ``threadbound run
--gateway URL`` (a task run through a gateway instead of a pool of one's own).

``serve`` attaches to the pool named by the config if it runs, else starts it (and
stops it on exit). The gateway keeps no state of its own: stop and start it again,
and clients resume their streams from their last offset.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import sys
from typing import Any

from .cli_run import INTERRUPTED, BadInput, base_config, ray_was_up, say, start_ray, stop_ray
from .config import state_dir

DEFAULT_PORT = 8420


def token_file() -> str:
    """Where ``serve`` keeps its tokens unless THREADBOUND_GATEWAY_TOKENS is set."""
    return os.path.join(state_dir(), "gateway_tokens")


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .errors import PoolClosed
    from .gateway.app import Gateway, GatewaySettings, server_config
    from .gateway.auth import ENV, Tokens, TokenError, load
    from .pool import AgentPool

    cfg = base_config(args)
    if bool(args.ssl_certfile) != bool(args.ssl_keyfile):
        raise BadInput("--ssl-certfile" if not args.ssl_certfile else "--ssl-keyfile",
                       "TLS needs both --ssl-certfile and --ssl-keyfile")
    roots = [os.path.abspath(r) for r in (args.workspace_root or [os.getcwd()])]
    for root in roots:
        if not os.path.isdir(root):
            raise BadInput("--workspace-root", f"{root!r} is not a directory")
    try:
        tokens, made = load(args.tokens_file or token_file())
    except (TokenError, OSError) as exc:
        raise BadInput("--tokens-file" if not os.environ.get(ENV) else ENV, str(exc)) from None
    if made:
        where = args.tokens_file or token_file()
        say(f"created {where} (mode 0600) with two tokens; they are shown this once:")
        say(f"  submit (may submit and cancel): {made['submit']}")
        say(f"  read-only:                      {made['read']}")
    if not _loopback(args.host) and not args.ssl_certfile:
        say(f"threadbound serve: WARNING: serving on {args.host} without TLS: tokens and task data cross the "
            "network in clear text; pass --ssl-certfile and --ssl-keyfile, or bind 127.0.0.1 behind a TLS proxy")
    was_up = ray_was_up()
    pool = None
    started = False
    try:
        start_ray(cfg, args.verbose)
        try:
            pool = AgentPool.attach(cfg.name, namespace=cfg.ray.namespace)
            say(f"attached to pool {cfg.name!r}")
        except PoolClosed:
            pool, started = AgentPool(cfg), True
            say(f"started pool {cfg.name!r}; it stops when this command ends")
        settings = GatewaySettings(max_body_bytes=args.max_body_bytes, rate_per_s=args.rate,
                                   rate_burst=args.burst, workspace_roots=tuple(roots))
        app = Gateway(pool, Tokens(tokens), settings).app
        scheme = "https" if args.ssl_certfile else "http"
        say(f"serving on {scheme}://{args.host}:{args.port}/ (API under /v1, web page at /, Ctrl-C stops)")
        server = uvicorn.Server(server_config(
            app, args.host, args.port, log_level="info" if args.verbose else "warning",
            ssl_certfile=args.ssl_certfile, ssl_keyfile=args.ssl_keyfile, timeout_graceful_shutdown=2))
        server.run()
        return 0
    except KeyboardInterrupt:
        return INTERRUPTED
    finally:
        if pool is not None:
            pool.shutdown(grace_s=1) if started else pool.close()
        stop_ray(was_up)


def cmd_run_gateway(args: argparse.Namespace) -> int:
    """``threadbound run --gateway URL``: submit through the gateway and follow the task."""
    from .cli_render import Live, summary_lines
    from .cli_run import task_inputs
    from .errors import TaskError
    from .gateway.client import GatewayClient, GatewayError

    body: dict[str, Any] = {"goal": args.goal or "Make the failing tests pass."}
    if args.workspace:
        body["workspace"] = args.workspace  # a directory the gateway's machine serves
    if args.agents:
        body["agents"] = [a.strip() for a in args.agents.split(",")]
    body["inputs"] = task_inputs(args)  # as `run` without a gateway: --apply, --approve, --test-command
    for name, value in (("max_rounds", args.max_rounds), ("cost_budget", args.budget),
                        ("level", None if args.level is None else
                         (args.level if args.level == "auto" else int(args.level)))):
        if value is not None:
            body[name] = value
    token = os.environ.get("THREADBOUND_GATEWAY_TOKEN")
    if not token:
        raise BadInput("--gateway", "set THREADBOUND_GATEWAY_TOKEN to a submit token of that gateway "
                                    "(threadbound serve prints one when it creates its token file)")
    gw = GatewayClient(args.gateway, token)
    task_id = None
    final = None
    try:
        try:
            task_id = gw.submit(body)["task_id"]
        except GatewayError as exc:
            raise BadInput("--gateway", str(exc)) from None
        say(f"submitted {task_id} to {args.gateway}")
        live = None if args.json else Live(sys.stdout).start()
        try:
            for ev in gw.follow(task_id):
                if live is None:
                    print(json.dumps(ev.to_dict(), default=str), flush=True)
                else:
                    live(ev)
                final = ev if ev.terminal else final
        finally:
            if live is not None:
                live.stop()
        if not args.json:
            try:
                res = gw.result(task_id, timeout=10)
            except TaskError as exc:
                res = exc.result
            print("\n" + "\n".join(summary_lines(res, final)), flush=True)
        return 0 if final is not None and final.kind == "succeeded" else 1
    except KeyboardInterrupt:
        if task_id is not None:
            try:
                status = gw.cancel(task_id)
                say(f"threadbound: interrupted; task {task_id} {status} (Ctrl-C)")
            except GatewayError as exc:
                say(f"threadbound: interrupted; could not cancel task {task_id}: {exc}")
        return INTERRUPTED
    finally:
        gw.close()


def add_parser(command: Any, ray_flags: argparse.ArgumentParser, positive: Any) -> None:
    """The ``serve`` subcommand (``command`` is the CLI's subparser factory)."""
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
                            "default: the current directory)")
    serve.add_argument("--ssl-certfile", default=None, help="TLS certificate (PEM), with --ssl-keyfile")
    serve.add_argument("--ssl-keyfile", default=None, help="TLS private key (PEM)")
    serve.add_argument("--max-body-bytes", type=positive(int, "a size in bytes above 0"), default=1 << 20,
                       help="larger request bodies get 413 (default 1 MiB)")
    serve.add_argument("--rate", type=positive(float, "requests per second above 0"), default=20.0,
                       help="requests per second per token (default 20)")
    serve.add_argument("--burst", type=positive(int, "a count above 0"), default=100,
                       help="requests a token may make at once (default 100)")
    serve.set_defaults(func=cmd_serve)


EXAMPLES = """examples:
  threadbound serve                                  # 127.0.0.1:8420; prints tokens on first start
  threadbound serve --config configs/runtime.yaml --port 9000
  THREADBOUND_GATEWAY_TOKENS=$SUBMIT,$READ:read threadbound serve --address auto
  threadbound serve --host 0.0.0.0 --ssl-certfile cert.pem --ssl-keyfile key.pem"""

