"""Every number a submitter sends is range-checked, over real HTTP on loopback in front
of a real pool: huge integers, 1e400, negative values, ``--1`` and ``²`` get a 400/422
naming the field, never a 500, a task that never ends, or a stream that sends
``Infinity``. The pool's policy caps rounds, goal and inputs size and depth, and
sandbox limits."""

from __future__ import annotations

import asyncio
import json
import math
import time

import httpx
import pytest
import websockets
from conftest import make_pool
from gateway_tools import InProcessGateway, auth, read_sse, scripted

from threadbound.agents.events import SUCCEEDED
from threadbound.runtime import Task
from threadbound.runtime.config import PolicyConfig, RuntimeConfig
from threadbound.runtime.errors import InvalidTask
from threadbound.runtime.gateway.app import GatewaySettings
from threadbound.runtime.gateway.wire import dumps, event_json
from threadbound.runtime.policy import check
from threadbound.runtime.task import Event

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("ray_session"), pytest.mark.timeout(90)]

HUGE = "9" * 400  # a 400-digit integer, as JSON sends it


@pytest.fixture(scope="module")
def pool(ray_session):
    p = make_pool(f"gwb{time.monotonic_ns() % 100000}")
    yield p
    p.shutdown(grace_s=1)


@pytest.fixture(scope="module")
def gw(pool):
    with InProcessGateway(pool, GatewaySettings(rate_per_s=0)) as g:
        yield g


def post_raw(gw, text: str) -> httpx.Response:
    return httpx.post(f"{gw.url}/v1/tasks", content=text.encode(), timeout=30,
                      headers={**auth(), "Content-Type": "application/json"})


def nested(depth: int) -> str:
    return '{"x": ' * depth + "1" + "}" * depth


BAD_BODIES = [  # (the body's JSON text, the field the answer must name)
    (f'{{"goal": "g", "agents": ["a"], "wait_timeout_s": {HUGE}, "inputs": {{"approve": true}}}}',
     "wait_timeout_s"),
    ('{"goal": "g", "agents": ["a"], "wait_timeout_s": 1e400}', "wait_timeout_s"),
    ('{"goal": "g", "agents": ["a"], "step_timeout_s": -1}', "step_timeout_s"),
    (f'{{"goal": "g", "agents": ["a"], "task_timeout_s": {HUGE}}}', "task_timeout_s"),
    ('{"goal": "g", "agents": ["a"], "max_rounds": 1e400}', "max_rounds"),
    (f'{{"goal": "g", "agents": ["a"], "max_rounds": {HUGE}}}', "max_rounds"),
    ('{"goal": "g", "agents": ["a"], "max_rounds": 2.5}', "max_rounds"),
    ('{"goal": "g", "agents": ["a"], "max_rounds": 51}', "max_rounds"),  # past the policy's ceiling
    (f'{{"goal": "g", "agents": ["a"], "priority": {HUGE}}}', "priority"),
    ('{"goal": "g", "agents": ["a"], "cost_budget": 1e400}', "cost_budget"),
    ('{"goal": "g", "agents": ["a"], "inputs": {"sandbox": {"wall_s": 1e400}}}', "inputs.sandbox.wall_s"),
    (f'{{"goal": "g", "agents": ["a"], "inputs": {{"sandbox": {{"memory_mb": {HUGE}}}}}}}',
     "inputs.sandbox.memory_mb"),
    ('{"goal": "g", "agents": ["a"], "inputs": {"sandbox": {"max_procs": 100000000}}}',
     "inputs.sandbox.max_procs"),
    ('{"goal": "g", "agents": ["a"], "inputs": {"sandbox": {"cpu_s": -3}}}', "inputs.sandbox.cpu_s"),
    ('{"goal": "g", "agents": ["a"], "inputs": {"sandbox": {"wal_s": 3}}}', "inputs.sandbox.wal_s"),
    ('{"goal": "g", "agents": ["a"], "inputs": {"deep": [1e400]}}', "inputs.deep[0]"),
    ('{"goal": "g", "agents": ["a"], "inputs": ' + nested(600) + "}", "inputs"),
    ('{"goal": "g", "agents": ["a"], "inputs": ' + nested(40) + "}", "inputs"),  # past the policy's depth
    ('{"goal": "' + "x" * 70_000 + '", "agents": ["a"]}', "goal"),
    ('{"goal": "g", "agents": ["a"], "inputs": {"blob": "' + "x" * 300_000 + '"}}', "inputs"),
]


def test_every_number_and_size_a_submitter_sends_is_checked_naming_the_field(gw, pool):
    for text, field in BAD_BODIES:
        r = post_raw(gw, text)
        assert r.status_code == 422, (text[:90], r.status_code, r.text[:300])
        assert r.json()["error"]["field"] == field, (text[:90], r.text[:300])
    # Then: nothing was taken, and the pool still runs a fine task
    assert pool.health()["mode"] == "normal"
    assert not [t for t in pool.tasks() if t.status not in ("succeeded", "failed", "cancelled")]
    ok = httpx.post(f"{gw.url}/v1/tasks", json=scripted(tokens=1), headers=auth(), timeout=30)
    assert ok.status_code == 201, ok.text
    assert read_sse(f"{gw.url}/v1/tasks/{ok.json()['task_id']}/events")[-1][1] == SUCCEEDED


def test_offsets_and_paging_that_isdigit_passes_and_int_refuses_get_400_not_500(gw):
    task_id = httpx.post(f"{gw.url}/v1/tasks", json=scripted(tokens=1), headers=auth()).json()["task_id"]
    read_sse(f"{gw.url}/v1/tasks/{task_id}/events")
    for value in ("--1", "²", "-²", "١", "1 1", HUGE, "-" + HUGE):
        r = httpx.get(f"{gw.url}/v1/tasks/{task_id}/events", params={"after": value}, headers=auth())
        assert r.status_code == 400 and r.json()["error"]["field"] == "after", (value, r.text)
        try:  # as a browser would send it: one byte per character where it can
            raw = value.encode("latin-1")
        except UnicodeEncodeError:
            raw = value.encode("utf-8")
        r = httpx.get(f"{gw.url}/v1/tasks/{task_id}/events", headers={**auth(), "Last-Event-ID": raw})
        assert r.status_code == 400 and r.json()["error"]["field"] == "Last-Event-ID", (value, r.text)
        for name in ("limit", "after"):
            r = httpx.get(f"{gw.url}/v1/tasks", params={name: value}, headers=auth())
            assert r.status_code == 400 and r.json()["error"]["field"] == name, (value, name, r.text)


def test_a_websocket_with_a_bad_offset_is_closed_cleanly_with_a_reason(gw):
    task_id = httpx.post(f"{gw.url}/v1/tasks", json=scripted(tokens=1), headers=auth()).json()["task_id"]

    async def close_of(after: str):
        url = f"ws://127.0.0.1:{gw.port}/v1/tasks/{task_id}/stream?after={after}"
        async with websockets.connect(url, additional_headers=auth()) as ws:
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 20)
        return closed.value.rcvd

    for after in ("--1", "%C2%B2", HUGE):
        rcvd = asyncio.run(close_of(after))
        assert rcvd is not None and rcvd.code == 4400 and "after" in rcvd.reason, (after, rcvd)


def test_the_stream_and_the_answers_never_carry_infinity_or_nan():
    # Given: an event whose data holds numbers JSON does not have (an agent may emit them)
    ev = Event(task_id="t1", offset=3, kind="custom", agent="a",
               data={"x": math.inf, "y": [float("nan"), 1.5], "z": {"w": -math.inf}}, ts=1.0)

    def strict(text):
        return json.loads(text, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))

    # Then: the wire form is strict JSON (what a browser's JSON.parse takes)
    assert strict(event_json(ev))["data"] == {"x": None, "y": [None, 1.5], "z": {"w": None}}
    assert strict(dumps({"limit_s": math.inf})) == {"limit_s": None}


def test_a_response_or_message_with_a_number_json_has_not_is_refused_naming_it():
    from threadbound.runtime.errors import InvalidInput
    from threadbound.runtime.supervisor.inputs import check_input

    with pytest.raises(InvalidInput) as err:
        check_input("value", {"n": math.inf})
    assert err.value.field == "value"


def test_a_wait_timeout_no_float_can_hold_never_breaks_the_supervisors_arithmetic():
    """What was validated at submit cannot be trusted forever (an older journal, a
    restored snapshot): the supervisor's own reading of a task's limits never raises."""
    from types import SimpleNamespace

    from threadbound.runtime.supervisor.inputs import PersonInTheLoop
    from threadbound.runtime.supervisor.rounds import _seconds

    cfg = RuntimeConfig(wait_timeout_s=60)
    person = PersonInTheLoop(cfg, None, None, requeue=None, finish=None, barrier=None)
    for bad in (10 ** 400, math.inf, math.nan, -5):
        ts = SimpleNamespace(spec=SimpleNamespace(wait_timeout_s=bad))
        assert person.limit(ts) == 60.0
        assert _seconds(bad, 30.0) == 30.0
    assert person.limit(SimpleNamespace(spec=SimpleNamespace(wait_timeout_s=5))) == 5.0


def test_the_policy_ceilings_are_settings_and_python_gets_the_same_errors():
    loose = PolicyConfig(max_rounds=200, max_goal_bytes=100_000, max_inputs_depth=50,
                         sandbox_limits={"wall_s": 7200})
    check(Task(goal="x" * 90_000, max_rounds=150, inputs={"sandbox": {"wall_s": 7000}}), loose)
    for task, field in ((Task(goal="x" * 90_000), "goal"), (Task(goal="g", max_rounds=150), "max_rounds"),
                        (Task(goal="g", inputs={"sandbox": {"wall_s": 7000}}), "inputs.sandbox.wall_s")):
        with pytest.raises(InvalidTask) as err:
            check(task, PolicyConfig())
        assert err.value.field == field
    with pytest.raises(InvalidTask) as err:
        Task(goal="g", wait_timeout_s=10 ** 400, inputs={"approve": True}).validated(["a"])
    assert err.value.field == "wait_timeout_s" and "digits" in str(err.value)
