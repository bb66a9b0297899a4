"""A property-based run of schemathesis against the gateway's own OpenAPI document
(which states every bound: schemathesis probes just past each), then the escapes no
generator thinks of (400-digit integers, 1e400, ``--1``, ``²``, deep inputs): no input
makes the gateway answer 500."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time

import httpx
import pytest
from conftest import make_pool
from gateway_tools import SUBMIT, InProcessGateway, auth
from test_gateway_bounds import BAD_BODIES

from threadbound.runtime.gateway.app import GatewaySettings

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("ray_session"), pytest.mark.slow]


@pytest.mark.timeout(240)
def test_schemathesis_finds_no_server_error(tmp_path):
    st = shutil.which("st") or shutil.which("schemathesis")
    if st is None:
        pytest.skip("schemathesis is not installed (pip install -e '.[dev]')")
    pool = make_pool(f"gwst{time.monotonic_ns() % 100000}")
    try:
        with InProcessGateway(pool, GatewaySettings(rate_per_s=0, max_body_bytes=64 * 1024,
                                                    workspace_roots=(str(tmp_path),))) as gw:
            proc = subprocess.run(
                [st, "run", f"{gw.url}/openapi.json", "-H", f"Authorization: Bearer {SUBMIT}",
                 "--checks", "not_a_server_error", "--max-examples", "25", "--seed", "1",
                 "--request-timeout", "20", "--phases", "examples,coverage,fuzzing",
                 "--generation-database", "none"],
                capture_output=True, text=True, timeout=220, cwd=tmp_path,
                env={**os.environ, "SCHEMATHESIS_HOOKS": ""})
            assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
            # it did send requests to every operation (not an empty run that passes)
            ran = re.search(r"(\d+) generated, (\d+) passed", proc.stdout)
            assert ran and int(ran.group(2)) > 100, proc.stdout[-2000:]
            assert "/v1/tasks" in proc.stdout or "operations" in proc.stdout.lower()
            # the cases a generator does not think of (the escapes) get no 500 either
            for text, _field in BAD_BODIES:
                r = httpx.post(f"{gw.url}/v1/tasks", content=text.encode(), timeout=30,
                               headers={**auth(), "Content-Type": "application/json"})
                assert r.status_code < 500, (text[:80], r.text[:300])
            for value in ("--1", "²", "9" * 400, "1e400", "nan", "-inf"):
                for path in ("/v1/tasks?limit=", "/v1/tasks?after=", "/v1/tasks/t00001-none/events?after=",
                             "/v1/tasks/t00001-none?wait="):
                    r = httpx.get(f"{gw.url}{path}{value}", headers=auth(), timeout=30)
                    assert r.status_code < 500, (path, value, r.text[:300])
            # the pool took whatever was valid and is still serving
            assert httpx.get(f"{gw.url}/healthz").json()["status"] == "ok"
            assert httpx.get(f"{gw.url}/v1/tasks", headers=auth()).status_code == 200
    finally:
        pool.shutdown(grace_s=1)
