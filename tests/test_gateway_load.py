"""What one submit token can do to everyone, over real HTTP on loopback in front of a
real pool: a burst of tasks that fail on their own input leaves the pool normal and a
fine task after them runs; a list of tasks with large goals stays bounded in bytes."""

from __future__ import annotations

import time

import httpx
import pytest
from conftest import make_pool
from gateway_tools import READ, InProcessGateway, auth, read_sse, scripted

from threadbound.agents.events import FAILED, HEALTH, SUCCEEDED
from threadbound.runtime.gateway.app import GatewaySettings
from threadbound.runtime.gateway.tasks import MAX_PAGE_BYTES, PREVIEW_CHARS

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("ray_session"), pytest.mark.timeout(180)]


def test_a_burst_of_tasks_failing_on_their_own_input_leaves_the_pool_normal_and_a_fine_task_runs(ray_session):
    # Given: a pool whose health watch would pause it after a couple of failed steps
    pool = make_pool(f"gwhealth{time.monotonic_ns() % 100000}", max_agents=3,
                     health={"enabled": True, "min_steps": 2, "error_rate": 0.5, "retry_exhausted": 2,
                             "window_s": 60, "pause": True, "check_interval_s": 0.2})
    try:
        with InProcessGateway(pool, GatewaySettings(rate_per_s=0)) as gw:
            # When: a submit token sends twelve coder tasks with no workspace at once, then a fine task
            bad = [httpx.post(f"{gw.url}/v1/tasks", json={"goal": f"bad {i}", "agents": ["coder"]},
                              headers=auth(), timeout=30) for i in range(12)]
            assert all(r.status_code == 201 for r in bad), [r.text for r in bad]
            good = httpx.post(f"{gw.url}/v1/tasks", json=scripted(tokens=1), headers=auth(), timeout=30)
            good_id = good.json()["task_id"]
            frames = read_sse(f"{gw.url}/v1/tasks/{good_id}/events", headers=auth(READ), timeout_s=150)
            ends = [read_sse(f"{gw.url}/v1/tasks/{r.json()['task_id']}/events", headers=auth(READ))[-1]
                    for r in bad]
        # Then: the fine task succeeded and never saw the pool change mode; each bad one failed, naming why
        assert frames[-1][1] == SUCCEEDED, frames[-3:]
        assert [f for f in frames if f[1] == HEALTH] == []
        assert all(e[1] == FAILED for e in ends)
        errors = {t.task_id: t.error or "" for t in pool.tasks()}
        assert all("needs a workspace" in errors[r.json()["task_id"]] for r in bad)
        assert pool.health()["mode"] == "normal"
    finally:
        pool.shutdown(grace_s=1)


def test_a_page_of_tasks_with_large_goals_is_bounded_in_bytes_and_paging_reaches_every_task(ray_session):
    pool = make_pool(f"gwpage{time.monotonic_ns() % 100000}")
    try:
        with InProcessGateway(pool, GatewaySettings(rate_per_s=0)) as gw:
            # Given: forty tasks, each with a goal just under the policy's ceiling
            ids = []
            for i in range(40):
                body = {**scripted(tokens=1), "goal": f"{i:02d}" + "g" * 60_000}
                r = httpx.post(f"{gw.url}/v1/tasks", json=body, headers=auth(), timeout=30)
                assert r.status_code == 201, r.text
                ids.append(r.json()["task_id"])
            # When: a reader asks for one page of up to 500, and follows `next`
            seen, after, sizes = [], None, []
            while True:
                params = {"limit": "500", **({"after": after} if after else {})}
                r = httpx.get(f"{gw.url}/v1/tasks", params=params, headers=auth(READ), timeout=30)
                assert r.status_code == 200, r.text
                sizes.append(len(r.content))
                page = r.json()
                seen += page["tasks"]
                after = page["next"]
                if after is None:
                    break
            # Then: every page is bounded, goals are previews, and every task is reached once
            assert max(sizes) <= MAX_PAGE_BYTES + 4096 and max(sizes) < 400_000, sizes  # was 2.4 MB in one page
            assert [t["task_id"] for t in seen if t["task_id"] in ids] == ids
            assert all(len(t["goal"]) <= PREVIEW_CHARS + 1 and t["truncated"] for t in seen if t["task_id"] in ids)
            whole = httpx.get(f"{gw.url}/v1/tasks/{ids[0]}", headers=auth(READ), timeout=30).json()
            assert len(whole["goal"]) == 60_002 and whole["goal"].startswith("00")
    finally:
        pool.shutdown(grace_s=1)
