"""A property-based run of schemathesis against the gateway's own OpenAPI document:
no input it generates makes the gateway answer 500."""

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
            # the pool took whatever was valid and is still serving
            assert httpx.get(f"{gw.url}/healthz").json()["status"] == "ok"
            assert httpx.get(f"{gw.url}/v1/tasks", headers=auth()).status_code == 200
    finally:
        pool.shutdown(grace_s=1)
