"""Prometheus metrics: what a scrape shows after real work, on the plain supervisor (fast)
and through the endpoint of a pool on the session's Ray; a port in use is a clear error."""

from __future__ import annotations

import asyncio
import os
import socket
import urllib.request

import pytest
import ray
from conftest import eventually, make_pool
from fake_actors import fails_once
from ports import free_port
from prometheus_client.parser import text_string_to_metric_families
from test_supervisor_unit import fakes, result, run, submit  # noqa: F401  (fakes: the fixture)

from threadbound.runtime import Task
from threadbound.runtime.errors import ConfigError
from threadbound.runtime.metrics import METRICS, PoolMetrics, View


def samples(text: str) -> dict[tuple, float]:
    """``{(sample name, ((label, value), ...)): value}`` of a Prometheus text page."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "pool")))] = s.value
    return out


def value(text: str, name: str, **labels) -> float:
    return samples(text).get((name, tuple(sorted((k, str(v)) for k, v in labels.items()))), 0.0)


# -- the recorder and the hook, without Ray ---------------------------------------------


def test_every_metric_of_the_catalog_is_on_the_page_before_anything_happened():
    page = PoolMetrics("p", ray_mirror=False).text()
    families = {f.name for f in text_string_to_metric_families(page)}
    for spec in METRICS:
        assert spec.name.removesuffix("_total") in families, spec.name
    # the gauges a dashboard divides by are there with their values, not absent
    assert value(page, "threadbound_health_mode") == 0
    assert ("threadbound_tasks", (("status", "pending"),)) in samples(page)


def test_tokens_per_second_is_the_rate_over_the_window():
    clock = [100.0]
    m = PoolMetrics("p", ray_mirror=False, tokens_window_s=10, clock=lambda: clock[0])
    m.add_tokens(50)
    clock[0] += 5
    m.add_tokens(100)
    m.refresh(View())
    assert m.tokens_per_s == pytest.approx(150 / 5)  # all of it came since the pool started
    clock[0] += 20  # nothing streamed for longer than the window
    m.refresh(View())
    clock[0] += 1
    m.refresh(View())
    assert m.tokens_per_s == 0
    assert value(m.text(), "threadbound_tokens_total") == 150


def test_steps_retries_tokens_and_first_token_are_counted_as_they_happen(fakes):  # noqa: F811
    # Given: role a streams 3 tokens then fails once with a transient error, then succeeds
    fakes.script("a", fails_once(tokens=3, clock_s=0.2))

    async def body(sup):
        # When: one task of roles a then b runs to its end
        res = await result(sup, await submit(sup, ["a", "b"]))
        assert res.ok
        sup.hooks.on_tick()
        return await sup.metrics_text()

    page = run(fakes, body)
    # Then: the page counts each attempt by role and outcome, the retry by its class
    assert value(page, "threadbound_steps_total", role="a", outcome="transient") == 1
    assert value(page, "threadbound_steps_total", role="a", outcome="ok") == 1
    assert value(page, "threadbound_steps_total", role="b", outcome="ok") == 1
    assert value(page, "threadbound_retries_total", error_class="transient") == 1
    assert value(page, "threadbound_latency_seconds_count", role="a", level=2, outcome="ok") == 1
    assert value(page, "threadbound_tokens_total") == 3 + 3 + 1  # a twice, b's one default token
    # a's first token came 0.2 s (the pool's clock, which real time moves a little too) after its request
    assert value(page, "threadbound_time_to_first_token_seconds_bucket", role="a", le="0.25") == 2
    assert value(page, "threadbound_time_to_first_token_seconds_bucket", role="a", le="0.1") == 0
    assert value(page, "threadbound_tasks", status="succeeded") == 1
    assert value(page, "threadbound_thread_pool_size") == 3
    assert value(page, "threadbound_level_choices_total", level=2) >= 1


def test_the_gauges_show_busy_and_bound_agents_and_the_queue_while_tasks_run(fakes):  # noqa: F811
    gate = asyncio.Event()

    async def held(call):
        await gate.wait()
        return "ok"

    fakes.default = held

    async def body(sup):
        ids = [await submit(sup, ["a", "b"], after={}) for _ in range(3)]  # 2 agents each, 3 actors
        for _ in range(200):
            await asyncio.sleep(0.001)
            if sum(len(sup.tasks[t].run.running) for t in ids) == 2:
                break
        sup.hooks.on_tick()
        page = await sup.metrics_text()
        gate.set()
        for t in ids:
            await result(sup, t)
        return page

    page = run(fakes, body, max_agents=3, max_agents_per_task=2)
    assert value(page, "threadbound_thread_pool_active") == 2
    assert value(page, "threadbound_thread_pool_bound") == 2
    assert value(page, "threadbound_queue_depth") == 2
    assert value(page, "threadbound_tasks", status="pending") == 2


# -- the endpoint of a pool on Ray ------------------------------------------------------


@pytest.mark.usefixtures("ray_session")
@pytest.mark.timeout(120)
def test_the_endpoint_serves_what_the_pool_did_and_comes_back_after_a_supervisor_restart(pool_name):
    # Given: a pool serving /metrics on a free port
    port = free_port()
    pool = make_pool(pool_name, metrics={"port": port})
    try:
        url = pool.stats()["metrics_url"]
        assert url == f"http://127.0.0.1:{port}/metrics"
        # When: tasks stream tokens and finish
        handles = [pool.submit(Task(goal=f"g{i}", agents=["a", "b"], inputs={"*": {"tokens": 5}}))
                   for i in range(3)]
        streamed = sum(ev.data["n"] for h in handles for ev in h.stream() if ev.kind == "tokens")
        assert all(h.result(timeout=60).ok for h in handles)
        written = pool.snapshot()
        # Then: a scrape shows the steps, the tokens and the pool's shape
        def scraped():
            return urllib.request.urlopen(url, timeout=5).read().decode()

        assert eventually(lambda: value(scraped(), "threadbound_tasks", status="succeeded") == 3, 10)
        page = scraped()
        assert value(page, "threadbound_steps_total", role="a", outcome="ok") == 3
        assert value(page, "threadbound_tokens_total") == streamed
        assert value(page, "threadbound_thread_pool_size") == 3
        assert value(page, "threadbound_health_mode") == 0
        assert value(page, "threadbound_snapshots_total") >= 1
        assert value(page, "threadbound_snapshot_bytes") > 0 and written["bytes"] > 0
        assert value(page, "threadbound_journal_fsync_seconds_count") > 0
        # When: the supervisor's process is killed and Ray restarts it from its snapshots
        pid = ray.get(pool._sup.info.remote())["pid"]
        os.kill(pid, 9)
        # Then: the endpoint is back (the pool's client waits for the restarted supervisor),
        # says it resumed, and still knows the finished tasks
        url2 = pool.stats()["metrics_url"]
        assert url2 == url and ray.get(pool._sup.info.remote())["pid"] != pid
        page = urllib.request.urlopen(url2, timeout=5).read().decode()
        assert value(page, "threadbound_resumes_total") == 1
        assert value(page, "threadbound_tasks", status="succeeded") == 3
    finally:
        pool.shutdown()
    # and a pool that shut down no longer listens
    with pytest.raises(OSError):
        urllib.request.urlopen(url, timeout=2)


@pytest.mark.usefixtures("ray_session")
@pytest.mark.timeout(60)
def test_a_metrics_port_in_use_is_refused_naming_the_field_and_the_process_holding_it(pool_name):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ConfigError) as err:
            make_pool(pool_name, metrics={"port": port})
    msg = str(err.value)
    assert "metrics.port" in msg and f"port {port}" in msg and f"pid {os.getpid()}" in msg
    # nothing was left running under that name: the same pool starts on a free port
    pool = make_pool(pool_name, metrics={"port": 0})
    try:
        assert pool.submit(Task(goal="g", agents=["a"])).result(timeout=60).ok
    finally:
        pool.shutdown()


@pytest.mark.usefixtures("ray_session")
@pytest.mark.timeout(120)
def test_the_metrics_command_prints_the_url_a_scrape_answers_at(pool_name, tmp_path):
    import shutil

    from test_cli_attach import shell

    port = free_port()
    pool = make_pool(pool_name, metrics={"port": port})
    try:
        (tmp_path / ".ray").mkdir()
        shutil.copy(os.environ["RAY_AUTH_TOKEN_PATH"], tmp_path / ".ray" / "auth_token")
        proc = shell(tmp_path, "metrics", "--address", os.environ["RAY_ADDRESS"], "--name", pool_name)
        assert proc.returncode == 0, proc.stderr
        url = proc.stdout.strip()
        assert url == f"http://127.0.0.1:{port}/metrics"
        assert "threadbound_health_mode" in urllib.request.urlopen(url, timeout=5).read().decode()
    finally:
        pool.shutdown()
    # a pool without an endpoint says so, naming the setting
    pool = make_pool(pool_name, metrics={"port": 0})
    try:
        proc = shell(tmp_path, "metrics", "--address", os.environ["RAY_ADDRESS"], "--name", pool_name)
        assert proc.returncode == 1 and "metrics.port: 0" in proc.stderr
    finally:
        pool.shutdown()


def test_a_metrics_port_out_of_range_is_a_config_error_naming_the_field():
    from threadbound.runtime import RuntimeConfig

    with pytest.raises(ConfigError) as err:
        RuntimeConfig.from_mapping({"metrics": {"port": 70000}})
    assert "metrics.port" in str(err.value)


# -- a real Prometheus server scraping a live pool, and Ray's own export -----------------


def _query(base: str, expr: str) -> list[dict]:
    import json
    import urllib.parse

    url = f"{base}/api/v1/query?query={urllib.parse.quote(expr)}"
    body = json.loads(urllib.request.urlopen(url, timeout=5).read())
    assert body["status"] == "success", body
    return body["data"]["result"]


def _scalar(base: str, expr: str) -> float | None:
    got = _query(base, expr)
    return float(got[0]["value"][1]) if got else None


@pytest.mark.slow
@pytest.mark.usefixtures("ray_session")
@pytest.mark.timeout(180)
def test_a_real_prometheus_scrapes_the_pool_and_the_ray_mirror(pool_name, tmp_path):
    import shutil
    import subprocess

    prometheus = shutil.which("prometheus")
    if prometheus is None:
        pytest.skip("prometheus is not installed (Debian: apt-get install prometheus; .ci/run installs it)")
    # Given: a pool serving /metrics, and a Prometheus scraping it and Ray's metrics export every second
    port = free_port()
    pool = make_pool(pool_name, metrics={"port": port, "refresh_s": 1})
    ray_port = next(n["MetricsExportPort"] for n in ray.nodes() if n["Alive"])
    web = free_port()
    (tmp_path / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        f"  - job_name: threadbound\n    static_configs: [{{targets: ['127.0.0.1:{port}']}}]\n"
        f"  - job_name: ray\n    static_configs: [{{targets: ['127.0.0.1:{ray_port}']}}]\n")
    proc = subprocess.Popen([prometheus, f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{web}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{web}"
    try:
        # When: tasks run on the pool
        handles = [pool.submit(Task(goal=f"g{i}", agents=["a", "b"], inputs={"*": {"tokens": 5}}))
                   for i in range(4)]
        assert all(h.result(timeout=60).ok for h in handles)
        sel = f'pool="{pool_name}"'
        # Then: Prometheus' query API returns what the pool did, read from its own scrapes
        assert eventually(lambda: _scalar(base, f'sum(threadbound_steps_total{{{sel},outcome="ok"}})') == 8, 60, 0.5)
        assert _scalar(base, f'threadbound_tasks{{{sel},status="succeeded"}}') == 4
        assert _scalar(base, f"threadbound_thread_pool_size{{{sel}}}") == 3
        assert _scalar(base, f"threadbound_health_mode{{{sel}}}") == 0
        assert _scalar(base, f"sum(threadbound_latency_seconds_count{{{sel}}})") == 8
        assert _scalar(base, 'up{job="threadbound"}') == 1
        # And the Ray mirror reaches Ray's own export (what the Ray dashboard reads), gauges included
        assert eventually(lambda: _scalar(base, f"ray_threadbound_thread_pool_size{{{sel}}}") == 3, 90, 1.0)
        assert eventually(lambda: _scalar(base, f'sum(ray_threadbound_steps_total{{{sel},outcome="ok"}})') == 8,
                          60, 1.0)
    finally:
        proc.terminate()
        proc.wait(10)
        pool.shutdown()
