"""``threadbound serve`` (the HTTP gateway in front of a pool) and ``threadbound run
--gateway URL`` (a task run through a gateway instead of a pool of one's own; ``main``
sends ``run`` here when ``--gateway`` is given).

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

from ..config import state_dir
from .common import (DEFAULT_GOAL, INTERRUPTED, BadInput, base_config, ray_was_up, say, start_ray, stop_ray,
                     task_inputs)
from .render import Live, summary_lines

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


def secret_places(cfg: Any) -> tuple[str, ...]:
    """The pool's own secrets no served workspace may hold: its local snapshot store and
    its key file's folder (threadbound's state directory, ``~/.ray``, ``~/.ssh`` are added
    by the gateway)."""
    out = []
    snaps = cfg.snapshot_dir
    if snaps and "://" not in snaps:
        out.append(os.path.abspath(os.path.expanduser(snaps)))
    key = getattr(getattr(cfg, "snapshots", None), "key_file", None)
    if key:
        out.append(os.path.dirname(os.path.abspath(os.path.expanduser(key))))
    return tuple(out)


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from ..errors import ConfigError, PoolClosed
    from ..gateway.app import Gateway, GatewaySettings, protected_dirs, server_config
    from ..gateway.auth import ENV, Tokens, TokenError, load
    from ..pool import AgentPool

    # Everything that can be wrong with the flags is said before Ray starts.
    if not isinstance(args.port, int) or not 1 <= args.port <= 65535:
        raise BadInput("--port", f"must be a TCP port from 1 to 65535, got {args.port!r}; e.g. --port {DEFAULT_PORT}")
    cfg = base_config(args)
    if bool(args.ssl_certfile) != bool(args.ssl_keyfile):
        raise BadInput("--ssl-certfile" if not args.ssl_certfile else "--ssl-keyfile",
                       "TLS needs both --ssl-certfile and --ssl-keyfile")
    roots = [os.path.realpath(r) for r in (args.workspace_root or [])]
    protected = protected_dirs(secret_places(cfg))
    for root in roots:
        if not os.path.isdir(root):
            raise BadInput("--workspace-root", f"{root!r} is not a directory")
        for secret in protected:
            if root == "/" or secret == root or secret.startswith(root.rstrip("/") + "/"):
                raise BadInput("--workspace-root", f"{root!r} is or contains {secret}, which holds secrets of "
                                                   "this user (tokens, keys, snapshots); serve a directory of "
                                                   "projects instead, e.g. --workspace-root ~/src")
    try:  # the gateway's limits, range-checked before Ray starts
        settings = GatewaySettings(max_body_bytes=args.max_body_bytes, rate_per_s=args.rate,
                                   rate_burst=args.burst, workspace_roots=tuple(roots),
                                   protected=secret_places(cfg))
    except ConfigError as exc:
        flag = {"max_body_bytes": "--max-body-bytes", "rate_per_s": "--rate", "rate_burst": "--burst"}
        name, why = exc.problems[0]
        raise BadInput(flag.get(name, name), why) from None
    if roots:
        say(f"workspaces: tasks may name project directories under {', '.join(roots)}")
    else:
        say("workspaces: none served (no --workspace-root): tasks may not name a workspace; pass "
            "--workspace-root DIR to serve the projects under DIR")
    try:
        tokens, made = load(args.tokens_file or token_file())
    except (TokenError, OSError) as exc:
        raise BadInput("--tokens-file" if not os.environ.get(ENV) else ENV, str(exc)) from None
    where = args.tokens_file or token_file()
    if made:
        say(f"created {where} (mode 0600) with two tokens; they are shown this once:")
        say(f"  submit (may submit and cancel): {made['submit']}")
        say(f"  read-only:                      {made['read']}")
    elif os.environ.get(ENV):
        say(f"tokens: from {ENV} (the token file is not read)")
    else:
        say(f"tokens: {where} (submit and read-only tokens, one per line; delete it to make new ones)")
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
        app = Gateway(pool, Tokens(tokens), settings).app
        scheme = "https" if args.ssl_certfile else "http"
        say(f"serving on {scheme}://{args.host}:{args.port}/ (API under /v1, web page at /, Ctrl-C stops)")
        server = uvicorn.Server(server_config(
            app, args.host, args.port, settings, log_level="info" if args.verbose else "warning",
            ssl_certfile=args.ssl_certfile, ssl_keyfile=args.ssl_keyfile, timeout_graceful_shutdown=2))
        server.run()
        return 0
    except KeyboardInterrupt:
        return INTERRUPTED
    finally:
        if pool is not None:
            pool.shutdown(grace_s=1) if started and pool.started else pool.close()  # a pool it joined: left running
        stop_ray(was_up)


def cmd_run_gateway(args: argparse.Namespace) -> int:
    """``threadbound run --gateway URL``: submit through the gateway and follow the task."""
    from ..errors import TaskError
    from ..gateway.client import GatewayClient, GatewayError

    body: dict[str, Any] = {"goal": args.goal or DEFAULT_GOAL}
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
