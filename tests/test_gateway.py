"""The HTTP gateway over real HTTP on loopback, in front of a real pool on the session's Ray."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import httpx
import pytest
import websockets
from conftest import make_pool
from gateway_tools import READ, SUBMIT, InProcessGateway, auth, read_sse, scripted

from threadbound.agents.events import CANCELLED, INPUT_REQUESTED, PENDING, STEP_FINISHED, SUCCEEDED, TERMINAL, TOKENS
from threadbound.runtime import InvalidTask, Task, TaskCancelled, TaskFailed, TaskNotFound
from threadbound.runtime.gateway.app import GatewaySettings

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("ray_session"), pytest.mark.timeout(60)]


@pytest.fixture(scope="module")
def pool(ray_session, tmp_path_factory):
    p = make_pool(f"gw{time.monotonic_ns() % 100000}")
    yield p
    p.shutdown(grace_s=1)


@pytest.fixture(scope="module")
def workspace_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    (root / "project").mkdir()
    return root


@pytest.fixture(scope="module")
def gw(pool, workspace_root):
    settings = GatewaySettings(max_body_bytes=4096, rate_per_s=0, keepalive_s=0.3,
                               workspace_roots=(str(workspace_root),))
    with InProcessGateway(pool, settings) as g:
        yield g


def submit(gw, body, token=SUBMIT, **headers) -> httpx.Response:
    return httpx.post(f"{gw.url}/v1/tasks", json=body, headers={**auth(token), **headers}, timeout=30)


def wire(frames):
    """(offset, kind, agent, data) of SSE frames, checking id/event against the data."""
    out = []
    for id_, event, data in frames:
        assert id_ == str(data["offset"]) and event == data["kind"]
        assert set(data) == {"offset", "kind", "agent", "data", "ts"}
        out.append((data["offset"], data["kind"], data["agent"], data["data"]))
    return out


def in_process(pool, task_id):
    return [(e.offset, e.kind, e.agent, e.data) for e in pool.task(task_id).stream()]


# -- submit, stream, result -----------------------------------------------------------


def test_a_submitted_task_streams_every_event_over_sse_and_its_result_is_served(gw, pool):
    # When: a task is submitted over HTTP and followed over SSE from the start
    resp = submit(gw, scripted(tokens=5, pace_s=0.02, agents=["a", "b"]))
    assert resp.status_code == 201, resp.text
    task_id = resp.json()["task_id"]
    assert resp.headers["location"] == f"/v1/tasks/{task_id}" and resp.json()["created"] is True
    got = wire(read_sse(f"{gw.url}/v1/tasks/{task_id}/events"))
    # Then: every event in order, exactly what the in-process client sees, ending with success
    assert [o for o, *_ in got] == list(range(len(got)))
    assert got == in_process(pool, task_id)
    assert got[0][1] == PENDING and got[-1][1] == SUCCEEDED
    text = {agent: "".join(d["text"] for _, k, agent_, d in got if k == TOKENS and agent_ == agent)
            for agent in ("a", "b")}
    assert text == {"a": "a0 a1 a2 a3 a4 ", "b": "b0 b1 b2 b3 b4 "}
    # and the task's summary carries the result
    d = httpx.get(f"{gw.url}/v1/tasks/{task_id}?wait=10", headers=auth(READ)).json()
    assert d["status"] == SUCCEEDED and d["result"]["outputs"]["b"]["role"] == "b"
    assert d["events"] == len(got)


def test_a_stream_resumed_with_last_event_id_from_the_middle_has_no_gap_and_no_duplicate(gw):
    task_id = submit(gw, scripted(tokens=30, pace_s=0.03)).json()["task_id"]
    # Given: a client that read part of the live stream and dropped
    first = read_sse(f"{gw.url}/v1/tasks/{task_id}/events", limit=7)
    # When: it reconnects with the last id it saw
    rest = read_sse(f"{gw.url}/v1/tasks/{task_id}/events", headers={**auth(), "Last-Event-ID": first[-1][0]})
    # Then: the two parts are the whole log, each event once
    whole = read_sse(f"{gw.url}/v1/tasks/{task_id}/events")
    assert wire(first) + wire(rest) == wire(whole)
    assert whole[-1][1] == SUCCEEDED
    # and ?after=N resumes the same way; Last-Event-ID wins over it
    after = read_sse(f"{gw.url}/v1/tasks/{task_id}/events?after=3")
    assert wire(after) == wire(whole)[4:]
    both = read_sse(f"{gw.url}/v1/tasks/{task_id}/events?after=3", headers={**auth(), "Last-Event-ID": "10"})
    assert wire(both) == wire(whole)[11:]


def test_an_idle_stream_gets_keep_alive_comments(gw):
    task_id = submit(gw, scripted(tokens=1, pace_s=1.0)).json()["task_id"]
    raw = []
    frames = read_sse(f"{gw.url}/v1/tasks/{task_id}/events", raw=raw)
    assert ": keep-alive" in raw and frames[-1][1] == SUCCEEDED


# -- WebSocket ------------------------------------------------------------------------


def ws_url(gw, task_id, query=""):
    return f"ws://127.0.0.1:{gw.port}/v1/tasks/{task_id}/stream{query}"


async def ws_frames(url, **kw):
    frames = []
    async with websockets.connect(url, **kw) as ws:
        async for msg in ws:
            frames.append(json.loads(msg))
        return frames, ws.close_code


def test_websocket_frames_are_the_events_and_the_socket_closes_normally_after_the_terminal_one(gw, pool):
    task_id = submit(gw, scripted(tokens=4, pace_s=0.02)).json()["task_id"]
    frames, code = asyncio.run(ws_frames(ws_url(gw, task_id), additional_headers=auth(READ)))
    assert code == 1000
    assert all(set(f) == {"offset", "kind", "agent", "data", "ts"} for f in frames)
    assert [(f["offset"], f["kind"], f["agent"], f["data"]) for f in frames] == in_process(pool, task_id)
    # from ?after=N, with the token offered as a subprotocol (what a browser can do)
    later, code = asyncio.run(ws_frames(ws_url(gw, task_id, "?after=5"),
                                        subprotocols=["threadbound.v1", f"bearer.{READ}"]))
    assert code == 1000 and later == frames[6:]


def test_a_websocket_client_cancels_with_a_message_and_the_stream_ends_with_cancelled(gw):
    task_id = submit(gw, scripted(tokens=200, pace_s=0.05)).json()["task_id"]

    async def go(token):
        kinds = []
        async with websockets.connect(ws_url(gw, task_id), additional_headers=auth(token)) as ws:
            async for msg in ws:
                f = json.loads(msg)
                if "error" in f:  # the read-only token's cancel is refused; the stream goes on
                    assert "read-only" in f["error"]["message"]
                    return kinds, "refused"
                kinds.append(f["kind"])
                if f["kind"] == TOKENS and kinds.count(TOKENS) == 2:
                    await ws.send(json.dumps({"cancel": True}))
            return kinds, ws.close_code

    _, refused = asyncio.run(go(READ))
    assert refused == "refused"
    kinds, code = asyncio.run(go(SUBMIT))
    assert code == 1000 and kinds[-1] == CANCELLED and TOKENS in kinds
    assert kinds.index(CANCELLED) == len(kinds) - 1 and SUCCEEDED not in kinds


def test_websocket_refuses_a_bad_token_an_unknown_task_and_a_bad_offset_with_close_codes(gw):
    task_id = submit(gw, scripted(tokens=1)).json()["task_id"]

    async def code_of(url, **kw):
        async with websockets.connect(url, **kw) as ws:
            with pytest.raises(websockets.ConnectionClosed):
                await ws.recv()
            return ws.close_code

    assert asyncio.run(code_of(ws_url(gw, task_id), additional_headers=auth("x" * 30))) == 4401
    assert asyncio.run(code_of(ws_url(gw, task_id, f"?token={SUBMIT}"))) == 4401  # no tokens in URLs
    assert asyncio.run(code_of(ws_url(gw, "t99999-nope"), additional_headers=auth())) == 4404
    assert asyncio.run(code_of(ws_url(gw, task_id, "?after=-7"), additional_headers=auth())) == 4400


# -- cancel -----------------------------------------------------------------------------


def test_a_task_cancelled_while_it_starts_ends_its_stream_with_cancelled(gw, pool):
    # Given: the pool busy, so the new task is still being admitted
    blockers = [submit(gw, scripted(tokens=1, agents=["c"], sleep_s=3)).json()["task_id"]
                for _ in range(3)]
    task_id = submit(gw, scripted(tokens=3)).json()["task_id"]
    # When: it is cancelled at once, twice (idempotent)
    first = httpx.post(f"{gw.url}/v1/tasks/{task_id}/cancel", headers=auth())
    again = httpx.post(f"{gw.url}/v1/tasks/{task_id}/cancel", headers=auth())
    # Then: 202 both times, and its stream is pending ... cancelled, with no step after it
    assert first.status_code == again.status_code == 202
    assert first.json()["status"] == again.json()["status"] == CANCELLED
    kinds = [k for _, k, *_ in wire(read_sse(f"{gw.url}/v1/tasks/{task_id}/events"))]
    assert kinds[0] == PENDING and kinds[-1] == CANCELLED and STEP_FINISHED not in kinds
    for b in blockers:
        httpx.post(f"{gw.url}/v1/tasks/{b}/cancel", headers=auth())


def test_a_task_cancelled_while_streaming_ends_its_stream_with_cancelled(gw):
    task_id = submit(gw, scripted(tokens=300, pace_s=0.03)).json()["task_id"]
    kinds = []
    with httpx.stream("GET", f"{gw.url}/v1/tasks/{task_id}/events", headers=auth(READ), timeout=30) as resp:
        for line in resp.iter_lines():
            if line.startswith("event: "):
                kinds.append(line[7:])
                if kinds.count(TOKENS) == 3:
                    assert httpx.post(f"{gw.url}/v1/tasks/{task_id}/cancel", headers=auth()).status_code == 202
    assert kinds[-1] == CANCELLED and kinds.count(CANCELLED) == 1
    assert TOKENS in kinds[:kinds.index(CANCELLED)]
    with pytest.raises(TaskCancelled):
        from threadbound.client import GatewayClient

        with GatewayClient(gw.url, READ) as c:
            c.result(task_id, timeout=10)


# -- bad input ------------------------------------------------------------------------


def python_error(pool, task: Task) -> InvalidTask:
    with pytest.raises(InvalidTask) as info:
        pool.submit(task)
    return info.value


def test_bad_input_gets_400_422_and_404_naming_the_problem_and_the_pool_stays_healthy(gw, pool):
    h = {**auth(), "Content-Type": "application/json"}
    # malformed JSON: 400 naming the position
    r = httpx.post(f"{gw.url}/v1/tasks", content=b'{"goal": "x",\n "agents": [a]}', headers=h)
    assert r.status_code == 400 and "line 2, column 13" in r.json()["error"]["message"]
    assert r.json()["error"]["field"] == "body"
    for bad in (b"", b"NaN", b'{"goal": Infinity}', b"\xff\xfe", b"[" * 100000):
        r = httpx.post(f"{gw.url}/v1/tasks", content=bad, headers=h)
        assert r.status_code in (400, 413) and r.json()["error"]["field"] == "body", (bad[:10], r.text)
    # an invalid task: 422 with InvalidTask's own message, as Python gives it
    cases = [
        (Task(goal="   ", agents=["a"]), {"goal": "   ", "agents": ["a"]}),
        (Task(goal="x", agents=["nosuchrole"]), {"goal": "x", "agents": ["nosuchrole"]}),
        (Task(goal="x", agents=["a", "b"], after={"a": ["b"], "b": ["a"]}),
         {"goal": "x", "agents": ["a", "b"], "after": {"a": ["b"], "b": ["a"]}}),
        (Task(goal="x", agents=["a"], level=7), {"goal": "x", "agents": ["a"], "level": 7}),
    ]
    for task, body in cases:
        expected = python_error(pool, task)
        r = submit(gw, body)
        assert r.status_code == 422, r.text
        assert r.json()["error"] == {"type": type(expected).__name__, "message": str(expected),
                                     "field": expected.field}
    for body, field in (([1, 2], "body"), ({"gaol": "x"}, "gaol"), ({"agents": ["a"]}, "goal"),
                        ({"goal": "x", "agents": {"a": 1}}, "agents"), ({"goal": "x", "workspace": 5}, "workspace"),
                        ({"goal": "x", "workspace": "/etc"}, "workspace"),
                        ({"goal": "x", "workspace": "../../.."}, "workspace")):
        r = submit(gw, body)
        assert r.status_code == 422 and r.json()["error"]["field"] == field, (body, r.text)
    assert "did you mean 'goal'" in submit(gw, {"gaol": "x"}).json()["error"]["message"]
    # unknown task: 404 with TaskNotFound's message
    for method, path in (("GET", ""), ("GET", "/events"), ("POST", "/cancel")):
        r = httpx.request(method, f"{gw.url}/v1/tasks/t99999-nope{path}", headers=auth())
        assert r.status_code == 404 and "no task 't99999-nope'" in r.json()["error"]["message"]
    # Then: the pool is still healthy and runs the next task
    assert pool.health()["mode"] == "normal"
    ok = submit(gw, {"goal": "x", "agents": ["a"], "workspace": "project"})
    assert ok.status_code == 201, ok.text
    assert wire(read_sse(f"{gw.url}/v1/tasks/{ok.json()['task_id']}/events"))[-1][1] == SUCCEEDED


def test_hostile_offsets_and_page_parameters_get_400_naming_them(gw):
    task_id = submit(gw, scripted(tokens=1)).json()["task_id"]
    read_sse(f"{gw.url}/v1/tasks/{task_id}/events")
    for query, header, field in (("?after=-2", None, "after"), ("?after=abc", None, "after"),
                                 ("?after=" + "9" * 30, None, "after"), ("?after=1e3", None, "after"),
                                 ("?after=100000", None, "after"), ("", "-5", "Last-Event-ID"),
                                 ("", "999999999", "Last-Event-ID"), ("", "1 OR 1", "Last-Event-ID")):
        headers = {**auth(), **({"Last-Event-ID": header} if header else {})}
        r = httpx.get(f"{gw.url}/v1/tasks/{task_id}/events{query}", headers=headers)
        assert r.status_code == 400 and r.json()["error"]["field"] == field, (query, header, r.text)
    for query, field in (("?limit=0", "limit"), ("?limit=100000", "limit"), ("?limit=x", "limit"),
                         ("?status=bogus", "status"), ("?after=t0-gone", "after")):
        r = httpx.get(f"{gw.url}/v1/tasks{query}", headers=auth())
        assert r.status_code == 400 and r.json()["error"]["field"] == field, (query, r.text)
    for wait in ("-1", "nan", "61", "x"):
        r = httpx.get(f"{gw.url}/v1/tasks/{task_id}?wait={wait}", headers=auth())
        assert r.status_code == 400 and r.json()["error"]["field"] == "wait"


def test_tasks_are_listed_in_pages_and_by_status(gw):
    ids = [submit(gw, scripted(tokens=1)).json()["task_id"] for _ in range(3)]
    for i in ids:
        read_sse(f"{gw.url}/v1/tasks/{i}/events")
    seen, after = [], None
    while True:
        page = httpx.get(f"{gw.url}/v1/tasks", params={"limit": 2, **({"after": after} if after else {})},
                         headers=auth(READ)).json()
        assert len(page["tasks"]) <= 2
        seen += [t["task_id"] for t in page["tasks"]]
        if not (after := page["next"]):
            break
    assert seen[-3:] == ids and len(seen) == len(set(seen))
    done = httpx.get(f"{gw.url}/v1/tasks?status={SUCCEEDED}", headers=auth(READ)).json()["tasks"]
    assert {t["status"] for t in done} == {SUCCEEDED} and set(ids) <= {t["task_id"] for t in done}


# -- auth and limits ------------------------------------------------------------------


def test_auth_401_without_or_with_a_wrong_token_and_403_for_a_read_only_submit(gw):
    body = scripted(tokens=1)
    url = f"{gw.url}/v1/tasks"
    for headers in ({}, auth("wrong" * 6), auth(SUBMIT[:-1]), auth(SUBMIT + "x"), {"Authorization": SUBMIT},
                    {"Authorization": f"Basic {SUBMIT}"}, {"Authorization": "Bearer"}, {"Authorization": "Bearer \t x"}):
        r = httpx.post(url, json=body, headers=headers)
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer"), headers
        assert httpx.get(url, headers=headers).status_code == 401
    assert httpx.post(f"{url}?token={SUBMIT}", json=body).status_code == 401  # never from the URL
    r = httpx.post(url, json=body, headers=auth(READ))
    assert r.status_code == 403 and "read-only" in r.json()["error"]["message"]
    task_id = submit(gw, body).json()["task_id"]
    assert httpx.post(f"{url}/{task_id}/cancel", headers=auth(READ)).status_code == 403
    assert httpx.get(f"{url}/{task_id}", headers=auth(READ)).status_code == 200
    for path in ("/openapi.json", "/metrics", f"/v1/tasks/{task_id}/events"):
        assert httpx.get(f"{gw.url}{path}").status_code == 401, path
    # the health check and the page's static files need no token, and hold no data
    assert httpx.get(f"{gw.url}/healthz").json() == {"status": "ok", "mode": "normal"}
    page = httpx.get(f"{gw.url}/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "default-src 'self'" in page.headers["content-security-policy"]
    vocab = httpx.get(f"{gw.url}/static/vocabulary.js").text
    assert f'"TOKENS": "{TOKENS}"' in vocab and all(k in vocab for k in TERMINAL)


def test_a_body_over_the_limit_gets_413_with_or_without_a_content_length(gw):
    big = scripted(tokens=1, pad="x" * 5000)
    assert submit(gw, big).status_code == 413

    def chunks():
        for _ in range(10):
            yield b" " * 1000

    r = httpx.post(f"{gw.url}/v1/tasks", content=chunks(), headers={**auth(), "Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["field"] == "body"


def test_a_token_past_its_rate_gets_429_with_retry_after_and_other_tokens_do_not(pool):
    with InProcessGateway(pool, GatewaySettings(rate_per_s=0.5, rate_burst=3)) as g:
        codes = [httpx.get(f"{g.url}/v1/tasks", headers=auth(READ)) for _ in range(4)]
        assert [r.status_code for r in codes] == [200, 200, 200, 429]
        assert int(codes[-1].headers["retry-after"]) >= 1
        assert httpx.get(f"{g.url}/v1/tasks", headers=auth(SUBMIT)).status_code == 200


def test_an_idempotency_key_returns_the_same_task_201_then_200_and_refuses_another_task(gw):
    body = scripted(tokens=1)
    first = submit(gw, body, **{"Idempotency-Key": "order-42"})
    again = submit(gw, body, **{"Idempotency-Key": "order-42"})
    assert (first.status_code, again.status_code) == (201, 200)
    assert first.json()["task_id"] == again.json()["task_id"] and again.json()["created"] is False
    other = submit(gw, scripted(tokens=2), **{"Idempotency-Key": "order-42"})
    assert other.status_code == 422 and other.json()["error"]["field"] == "idempotency_key"
    assert submit(gw, body, **{"Idempotency-Key": "x" * 300}).status_code == 422


def test_metrics_proxy_the_pools_prometheus_text_or_say_they_are_unavailable(gw, pool):
    from threadbound.runtime.supervisor.core import Supervisor

    r = httpx.get(f"{gw.url}/metrics", headers=auth(READ))
    if hasattr(Supervisor, "metrics_text"):
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    else:
        assert r.status_code == 503 and "metrics are not available" in r.json()["error"]["message"]


def test_the_openapi_document_validates_and_names_every_route(gw):
    from openapi_spec_validator import validate

    doc = httpx.get(f"{gw.url}/openapi.json", headers=auth(READ)).json()
    validate(doc)
    assert {"/v1/tasks", "/v1/tasks/{task_id}", "/v1/tasks/{task_id}/cancel",
            "/v1/tasks/{task_id}/events", "/healthz", "/metrics"} <= set(doc["paths"])


# -- the Python client and the CLI ------------------------------------------------------


def test_threadbound_client_submits_follows_and_waits_sync_and_async(gw, pool):
    from threadbound.client import AsyncGatewayClient, GatewayClient

    with GatewayClient(gw.url, SUBMIT) as c:
        task_id = c.submit(Task(goal="x", agents=["a"], inputs={"*": {"tokens": 4}}))["task_id"]
        events = list(c.follow(task_id))
        assert [(e.offset, e.kind, e.agent, e.data) for e in events] == in_process(pool, task_id)
        assert c.result(task_id, timeout=10).outputs["a"]["role"] == "a"
        assert any(t["task_id"] == task_id for t in c.tasks(status=SUCCEEDED))
        failing = c.submit(scripted(tokens=1, error_on=[1, 2]))["task_id"]
        with pytest.raises(TaskFailed):
            c.result(failing, timeout=20)
        with pytest.raises(TaskNotFound):
            c.task("t99999-nope")
        with pytest.raises(InvalidTask) as info:
            c.submit({"goal": ""})
        assert info.value.field == "goal"

    async def go():
        async with AsyncGatewayClient(gw.url, SUBMIT) as c:
            task_id = (await c.submit(scripted(tokens=3)))["task_id"]
            kinds = [e.kind async for e in c.follow(task_id, after=2)]
            return task_id, kinds, (await c.result(task_id)).status

    task_id, kinds, status = asyncio.run(go())
    assert status == SUCCEEDED and kinds == [k for _, k, *_ in in_process(pool, task_id)][3:]


def test_threadbound_run_through_a_gateway_follows_the_task_to_its_end(gw):
    env = {"THREADBOUND_GATEWAY_TOKEN": SUBMIT, "PATH": "/usr/bin:/bin"}
    import os

    env = {**os.environ, **env}
    proc = subprocess.run([sys.executable, "-m", "threadbound.runtime.cli", "run", "--gateway", gw.url,
                           "--agents", "a", "--json"], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    kinds = [json.loads(line)["kind"] for line in proc.stdout.splitlines()]
    assert kinds[0] == PENDING and kinds[-1] == SUCCEEDED and TOKENS in kinds
    bad = subprocess.run([sys.executable, "-m", "threadbound.runtime.cli", "run", "--gateway", gw.url,
                          "--agents", "nosuchrole"], capture_output=True, text=True, timeout=60, env=env)
    assert bad.returncode == 2 and "unknown role 'nosuchrole'" in bad.stderr


def test_run_through_a_gateway_takes_approve_and_test_command_as_run_does(gw):
    import os

    env = {**os.environ, "THREADBOUND_GATEWAY_TOKEN": SUBMIT}
    cli = [sys.executable, "-m", "threadbound.runtime.cli", "run", "--gateway", gw.url, "--agents", "a"]
    # A test command that is not a command line is named, as without a gateway
    bad = subprocess.run([*cli, "--test-command", "pytest 'unclosed"], capture_output=True, text=True,
                         timeout=60, env=env)
    assert bad.returncode == 2 and "--test-command" in bad.stderr and "cannot split" in bad.stderr
    # --approve: the task asks for approval before it succeeds, and ends once approved over HTTP
    proc = subprocess.Popen([*cli, "--approve", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    try:
        asked = None
        for line in proc.stdout:
            ev = json.loads(line)
            if ev["kind"] == INPUT_REQUESTED:
                asked = ev
                break
        assert asked is not None and asked["data"]["payload"]["kind"] == "approval", proc.stderr.read()
        task_id = next(t["task_id"] for t in httpx.get(f"{gw.url}/v1/tasks", headers=auth(READ)).json()["tasks"]
                       if t["status"] == "waiting")
        assert httpx.post(f"{gw.url}/v1/tasks/{task_id}/approve", headers=auth(), timeout=10).status_code == 200
        rest = [json.loads(line)["kind"] for line in proc.stdout]
        assert proc.wait(timeout=60) == 0 and rest[-1] == SUCCEEDED
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_websocket_message_too_big_to_be_a_cancel_closes_that_connection_and_nothing_else(gw):
    # Given: a client following a long task over WebSocket
    task_id = submit(gw, scripted(tokens=200, pace_s=0.05)).json()["task_id"]

    async def go():
        async with websockets.connect(ws_url(gw, task_id), additional_headers=auth(READ)) as ws:
            await ws.recv()
            # When: it sends a message far larger than {"cancel": true}
            await ws.send("x" * 1_000_000)
            with pytest.raises(websockets.ConnectionClosed):
                while True:
                    await ws.recv()
            return ws.close_code

    # Then: the gateway closes that connection as "message too big" (1009) without reading it
    # whole, and goes on serving: the task is still there and still running
    assert asyncio.run(go()) == 1009
    got = httpx.get(f"{gw.url}/v1/tasks/{task_id}", headers=auth(READ), timeout=10)
    assert got.status_code == 200 and got.json()["status"] in ("pending", "running")
    httpx.post(f"{gw.url}/v1/tasks/{task_id}/cancel", headers=auth(), timeout=10)
