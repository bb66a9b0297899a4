"""`threadbound serve` as a real process: killed and restarted under a following client,
its token file, and two hundred SSE clients on one gateway."""

from __future__ import annotations

import asyncio
import os
import stat
import threading
import time

import httpx
import pytest
from conftest import make_pool
from gateway_tools import READ, SUBMIT, ServeProcess, auth, free_port, scripted

from threadbound.agents.events import SUCCEEDED, TOKENS
from threadbound.client import AsyncGatewayClient, GatewayClient

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("ray_session")]


@pytest.fixture(scope="module")
def pool(ray_session):
    p = make_pool(f"gwserve{time.monotonic_ns() % 100000}")
    yield p
    p.shutdown(grace_s=1)


@pytest.mark.timeout(120)
def test_a_client_following_through_a_gateway_restart_gets_every_event_exactly_once(pool, tmp_path):
    tokens_file = tmp_path / "tokens"
    no_env = {"THREADBOUND_GATEWAY_TOKENS": None}
    # Given: a gateway started without tokens in the environment: it makes a 0600 token file
    serve = ServeProcess(pool.name, env=no_env, args=["--tokens-file", str(tokens_file)]).start()
    try:
        assert stat.S_IMODE(os.stat(tokens_file).st_mode) == 0o600
        lines = dict(line.split() for line in tokens_file.read_text().splitlines() if not line.startswith("#"))
        assert lines["submit"] in serve.stderr() and lines["read"] in serve.stderr()  # printed once
        token = lines["submit"]
        task_id = GatewayClient(serve.url, token).submit(scripted(tokens=60, pace_s=0.05))["task_id"]
        got = []
        done = threading.Event()

        def follow():
            for ev in GatewayClient(serve.url, token, max_backoff_s=0.5).follow(task_id):
                got.append(ev)
            done.set()

        threading.Thread(target=follow, daemon=True).start()
        while sum(e.kind == TOKENS for e in got) < 5:
            time.sleep(0.02)
        # When: the gateway is killed mid-stream and started again on the same port
        serve.kill()
        killed_at = len(got)
        serve = ServeProcess(pool.name, port=serve.port, env=no_env, args=["--tokens-file", str(tokens_file)])
        serve.start()
        assert token not in serve.stderr()  # the existing file is used, nothing printed ...
        assert f"tokens: {tokens_file}" in serve.stderr()  # ... but where it is, is said
        assert done.wait(60)
    finally:
        serve.stop()
    # Then: the client ended with the whole log, each event once, in order
    whole = [(e.offset, e.kind, e.agent, e.data) for e in pool.task(task_id).stream()]
    assert [(e.offset, e.kind, e.agent, e.data) for e in got] == whole
    assert whole[-1][1] == SUCCEEDED and 0 < killed_at < len(whole)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_two_hundred_sse_clients_on_one_gateway_receive_identical_sequences(pool):
    serve = ServeProcess(pool.name, args=["--rate", "1000", "--burst", "1000"]).start()
    try:
        task_id = httpx.post(f"{serve.url}/v1/tasks", json=scripted(tokens=40, pace_s=0.05, agents=["a", "b"]),
                             headers=auth()).json()["task_id"]

        async def one(client: AsyncGatewayClient):
            return [(e.offset, e.kind, e.agent, e.data) for e in [x async for x in client.follow(task_id)]]

        async def all_of_them():
            clients = [AsyncGatewayClient(serve.url, READ, timeout_s=60) for _ in range(200)]
            try:
                return await asyncio.gather(*(one(c) for c in clients))
            finally:
                await asyncio.gather(*(c.aclose() for c in clients))

        sequences = asyncio.run(all_of_them())
    finally:
        serve.stop()
    whole = [(e.offset, e.kind, e.agent, e.data) for e in pool.task(task_id).stream()]
    assert whole[-1][1] == SUCCEEDED
    assert all(s == whole for s in sequences)


@pytest.mark.timeout(60)
def test_serve_refuses_short_tokens_and_warns_when_bound_beyond_loopback_without_tls(pool, tmp_path):
    import subprocess
    import sys

    base = [sys.executable, "-m", "threadbound.runtime.cli", "serve", "--name", pool.name,
            "--address", os.environ["RAY_ADDRESS"]]
    short = subprocess.run(base, env={**os.environ, "THREADBOUND_GATEWAY_TOKENS": "abc"}, capture_output=True,
                           text=True, timeout=30)
    assert short.returncode == 2 and "at least 16 characters" in short.stderr
    serve = ServeProcess(pool.name, args=["--host", "0.0.0.0"])
    serve.url = f"http://127.0.0.1:{serve.port}"
    serve.start()
    try:
        assert "WARNING: serving on 0.0.0.0 without TLS" in serve.stderr()
        assert httpx.get(f"{serve.url}/v1/tasks", headers=auth(SUBMIT)).status_code == 200
    finally:
        serve.stop()
    assert free_port()  # the loopback still has ports: nothing was left bound


@pytest.mark.timeout(60)
@pytest.mark.parametrize("port", ["99999", "0", "-5", "65536"])
def test_serve_refuses_a_port_out_of_range_naming_the_flag_before_ray_starts(port, tmp_path):
    import subprocess
    import sys

    # An address nothing listens on: had it tried to reach Ray, it would say so instead.
    proc = subprocess.run([sys.executable, "-m", "threadbound.runtime.cli", "serve", "--port", port,
                           "--address", "127.0.0.1:1", "--tokens-file", str(tmp_path / "tokens")],
                          env={**os.environ, "THREADBOUND_GATEWAY_TOKENS": ""}, capture_output=True, text=True,
                          timeout=50)
    assert proc.returncode == 2, proc.stderr
    assert "--port" in proc.stderr and "1 to 65535" in proc.stderr and "Traceback" not in proc.stderr
    assert "serving on" not in proc.stderr and not (tmp_path / "tokens").exists()


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("flag", "value", "says"), [
    ("--rate", "nan", "requests per second above 0"), ("--rate", "inf", "requests per second above 0"),
    ("--burst", "2000000", "1 to 1,000,000"), ("--max-body-bytes", "2000000000", "1 to 1 GiB")])
def test_serve_refuses_a_gateway_limit_out_of_range_naming_the_flag_before_ray_starts(flag, value, says, tmp_path):
    import subprocess
    import sys

    # An address nothing listens on: had it tried to reach Ray, it would say so instead.
    proc = subprocess.run([sys.executable, "-m", "threadbound.runtime.cli", "serve", flag, value,
                           "--address", "127.0.0.1:1", "--tokens-file", str(tmp_path / "tokens")],
                          env={**os.environ, "THREADBOUND_GATEWAY_TOKENS": ""}, capture_output=True, text=True,
                          timeout=50)
    assert proc.returncode == 2, proc.stderr
    assert flag in proc.stderr and says in proc.stderr and "Traceback" not in proc.stderr
    assert "serving on" not in proc.stderr
