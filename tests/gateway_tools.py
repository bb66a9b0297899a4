"""Gateways for tests: one in this process (a uvicorn thread) or one as a real
`threadbound serve` subprocess; and a plain SSE reader that checks the wire format on
its own, without the client under test."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time

import httpx
from ports import free_port  # noqa: F401  (the gateway tests take it from here)

SUBMIT = secrets.token_urlsafe(24)
READ = secrets.token_urlsafe(24)
TOKENS_ENV = f"{SUBMIT},{READ}:read"


def auth(token: str = SUBMIT) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def scripted(tokens: int = 3, pace_s: float = 0.0, agents=("a",), **extra) -> dict:
    """A task body of the scripted test agents (tests/scripted_agents.py)."""
    return {"goal": "scripted", "agents": list(agents),
            "inputs": {"*": {"tokens": tokens, "token_sleep_s": pace_s, **extra}}}


class InProcessGateway:
    """The gateway app on uvicorn in a thread of this process, on a free loopback port."""

    def __init__(self, pool, settings=None, tokens=None) -> None:
        import uvicorn

        from threadbound.runtime.gateway.app import Gateway, server_config
        from threadbound.runtime.gateway.auth import Tokens, parse_env

        self.gateway = Gateway(pool, Tokens(tokens or parse_env(TOKENS_ENV)), settings)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(server_config(self.gateway.app, "127.0.0.1", self.port, self.gateway.settings,
                                                   log_level="error",
                                                   timeout_graceful_shutdown=1))
        self.thread = threading.Thread(target=lambda: asyncio.run(self.server.serve()), daemon=True,
                                       name=f"gateway:{self.port}")

    def __enter__(self) -> "InProcessGateway":
        self.thread.start()
        deadline = time.monotonic() + 15
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the in-process gateway did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)


class ServeProcess:
    """`threadbound serve` as a subprocess attached to the pool ``name`` of the session's Ray."""

    def __init__(self, name: str, port: int | None = None, env: dict | None = None, args=()) -> None:
        self.name = name
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "THREADBOUND_GATEWAY_TOKENS": TOKENS_ENV, **(env or {})}
        self.args = list(args)
        self.proc: subprocess.Popen | None = None
        self.stderr_path = None

    def start(self, timeout_s: float = 60.0) -> "ServeProcess":
        import tempfile

        self.stderr_path = tempfile.mktemp(prefix="serve-", suffix=".err")
        with open(self.stderr_path, "w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "threadbound.runtime.cli", "serve", "--name", self.name,
                 "--port", str(self.port), "--address", os.environ["RAY_ADDRESS"], *self.args],
                env={k: v for k, v in self.env.items() if v is not None}, stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"threadbound serve did not come up: {self.stderr()}")
            time.sleep(0.1)

    def stderr(self) -> str:
        with open(self.stderr_path) as fh:
            return fh.read()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()


def read_sse(url: str, headers: dict | None = None, limit: int | None = None, timeout_s: float = 30.0,
             raw: list | None = None) -> list[tuple[str, str, dict]]:
    """``(id, event, data)`` of an SSE response until it ends (or ``limit`` frames); every
    line goes to ``raw`` when given."""
    frames: list[tuple[str, str, dict]] = []
    with httpx.stream("GET", url, headers=headers or auth(), timeout=timeout_s) as resp:
        assert resp.status_code == 200, resp.read()
        assert resp.headers["content-type"].startswith("text/event-stream")
        fields: dict[str, str] = {}
        for line in resp.iter_lines():
            if raw is not None:
                raw.append(line)
            if line == "":
                if "data" in fields:
                    frames.append((fields.get("id"), fields.get("event"), json.loads(fields["data"])))
                    if limit is not None and len(frames) >= limit:
                        return frames
                fields = {}
            elif not line.startswith(":"):
                name, _, value = line.partition(": ")
                fields[name] = value
    return frames
