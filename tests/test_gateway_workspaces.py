"""A gateway cannot hand out the host's secrets: the served root itself is no workspace,
nor is a directory that holds threadbound's state, and a task's copy never contains the
state directory, ``.ray``, ``.ssh``, key or token files, so neither the tests (whose
output any read-only token reads) nor the coder's prompt ever see them. Over real
HTTP on loopback, in front of a real pool whose tester runs real commands."""

from __future__ import annotations

import subprocess
import sys
import os
import time
from pathlib import Path

import httpx
import pytest
from conftest import pool_settings
from gateway_tools import READ, InProcessGateway, auth, read_sse

from threadbound.agents.workspace import Workspace
from threadbound.runtime import AgentPool, RuntimeConfig
from threadbound.runtime.gateway.app import GatewaySettings

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("ray_session"), pytest.mark.timeout(120)]

SECRETS = {  # the four files of the escape, where they are under a home directory
    ".ray/auth_token": "RAYTOKEN-3f9a",
    ".local/state/threadbound/gateway_tokens": "GATEWAYTOKEN-77c1",
    ".local/state/threadbound/snapshot.key": "SNAPSHOTKEY-0b2e",
    ".ssh/id_ed25519": "SSHKEY-d41d",
}
CAT = ["sh", "-c", "cat " + " ".join(SECRETS) + "; echo CAT-RAN-$((40 + 2))"]


def home_like(base: Path) -> Path:
    """A directory laid out like a home directory, its secrets in place, and a project."""
    for rel, secret in SECRETS.items():
        (base / rel).parent.mkdir(parents=True, exist_ok=True)
        (base / rel).write_text(secret + "\n")
    (base / "test_ok.py").write_text("def test_ok():\n    assert True\n")
    return base


def test_a_copy_and_a_walk_leave_out_secrets_by_name_and_the_protected_places_by_path(tmp_path):
    original = home_like(tmp_path / "home")
    (original / "snaps" / "pool").mkdir(parents=True)
    (original / "snaps" / "pool" / "journal").write_text("JOURNAL-5e5e\n")
    (original / "id_utils.py").write_text("x = 1\n")  # a name like a key's, but not one
    ws = Workspace.for_task("t-secrets", str(original), root=tmp_path / "copies", protect=[original / "snaps"])
    copied = {str(p.relative_to(ws.path)) for p in ws.path.rglob("*") if p.is_file()}
    assert copied == {"test_ok.py", "id_utils.py"}, copied
    # the original's walk (the diff, what the coder reads) does not read them either
    assert set(ws.files(ws.original)) == {"test_ok.py", "id_utils.py"}
    assert ws.diff() == ""
    with ws.trial() as trial:
        assert {p.name for p in trial.rglob("*") if p.is_file()} == {"test_ok.py", "id_utils.py"}


@pytest.fixture(scope="module")
def pool(ray_session):
    cfg = RuntimeConfig.from_mapping(pool_settings(
        f"gwws{time.monotonic_ns() % 100000}", max_rounds=1, step_timeout_s=60, task_timeout_s=90,
        retry={"max_attempts": 1}, sandbox={"isolation": "best_effort"}))
    p = AgentPool(cfg)
    yield p
    p.shutdown(grace_s=1)


def test_the_escape_through_the_gateway_reads_no_secret_with_a_read_only_token(pool, tmp_path):
    # Given: a gateway serving a directory laid out like a home, whose state directory it protects
    root = home_like(tmp_path / "home")
    project = home_like(root / "project")  # a project that happens to hold the same files
    settings = GatewaySettings(rate_per_s=0, workspace_roots=(str(root),),
                               protected=(str(root / ".local" / "state" / "threadbound"),))
    with InProcessGateway(pool, settings) as gw:
        def submit(workspace):
            return httpx.post(f"{gw.url}/v1/tasks", headers=auth(), timeout=30, json={
                "goal": "run the tests", "workspace": workspace, "agents": ["tester"],
                "inputs": {"test_command": CAT}})

        # When: the escape of the issue names the root itself, or a directory that holds the state
        for name in (".", "", "./", ".local", ".local/state", ".local/state/threadbound", ".ssh"):
            r = submit(name)
            assert r.status_code == 422 and r.json()["error"]["field"] == "workspace", (name, r.text)
        # ... and then a project that holds the same four files
        r = submit("project")
        assert r.status_code == 201, r.text
        task_id = r.json()["task_id"]
        raw: list[str] = []
        read_sse(f"{gw.url}/v1/tasks/{task_id}/events", headers=auth(READ), raw=raw, timeout_s=100)
        seen = "\n".join(raw) + httpx.get(f"{gw.url}/v1/tasks/{task_id}", headers=auth(READ)).text
    # Then: the command ran and its output is what a read-only token reads, without a secret
    assert "CAT-RAN-42" in seen, seen[-3000:]  # (only its output says 42)
    leaked = [s for s in SECRETS.values() if s in seen]
    assert not leaked, leaked
    assert all((project / rel).read_text().strip() == s for rel, s in SECRETS.items())  # untouched


def test_serve_without_a_workspace_root_serves_none_and_says_so_and_refuses_a_root_holding_the_state(tmp_path):
    """Before Ray starts, and from a directory like a home: no workspace is served unless asked."""
    home = home_like(tmp_path / "home")
    env = {**os.environ, "HOME": str(home), "XDG_STATE_HOME": "", "THREADBOUND_GATEWAY_TOKENS": "",
           "RAY_ADDRESS": ""}
    refused = subprocess.run([sys.executable, "-m", "threadbound.runtime.cli", "serve", "--address", "127.0.0.1:1",
                              "--workspace-root", str(home)], env=env, cwd=home, capture_output=True, text=True,
                             timeout=60)
    assert refused.returncode == 2, refused.stderr
    assert "--workspace-root" in refused.stderr and ".local/state/threadbound" in refused.stderr, refused.stderr
    # with no --workspace-root it says, before Ray (an address nothing listens on), that it serves none
    plain = subprocess.run([sys.executable, "-m", "threadbound.runtime.cli", "serve", "--address", "127.0.0.1:1",
                            "--tokens-file", str(tmp_path / "tokens")], env=env, cwd=home, capture_output=True,
                           text=True, timeout=60)
    assert "workspaces: none served" in plain.stderr, plain.stderr
