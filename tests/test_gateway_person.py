"""A person's part over HTTP, on loopback in front of a real pool: respond, approve,
reject and messages, with the errors a client relies on (409 late or unasked, 422 a
bad body, 403 a read-only token), and the Python gateway client's twins."""

from __future__ import annotations

import time

import httpx
import pytest
from conftest import pool_settings
from gateway_tools import READ, SUBMIT, InProcessGateway, auth
from scripted_agents import Approver, Listener, Questioner

from threadbound.client import GatewayClient
from threadbound.runtime import AgentPool, InputNotExpected, InvalidInput, RuntimeConfig, Task
from threadbound.runtime.gateway.app import GatewaySettings

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("ray_session"), pytest.mark.timeout(90)]


@pytest.fixture(scope="module")
def pool(ray_session):
    p = AgentPool(RuntimeConfig.from_mapping(pool_settings(f"gwp{time.monotonic_ns() % 100000}")),
                  agents={"q": Questioner, "l": Listener, "ok": Approver})
    yield p
    p.shutdown(grace_s=1)


@pytest.fixture(scope="module")
def gw(pool):
    with InProcessGateway(pool, GatewaySettings(rate_per_s=0, max_body_bytes=4096)) as g:
        yield g


def post(gw, path, body=None, token=SUBMIT) -> httpx.Response:
    return httpx.post(f"{gw.url}{path}", json=body, headers=auth(token), timeout=30)


def waiting(pool, task_id):
    for e in pool.task(task_id).stream():
        if e.kind == "waiting":
            return e
    raise AssertionError("never waited")


def test_respond_over_http_answers_once_then_409_names_the_request(gw, pool):
    handle = pool.submit(Task(goal="g", agents=["q"], inputs={"q": {"questions": ["which?"]}}))
    waiting(pool, handle.task_id)
    path = f"/v1/tasks/{handle.task_id}/respond"
    assert post(gw, path, {"value": "x"}, token=READ).status_code == 403
    bad = post(gw, path, {"answer": "x"})
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "answer"
    missing = post(gw, path, {})
    assert missing.status_code == 422 and missing.json()["error"]["field"] == "value"
    ok = post(gw, path, {"value": {"db": "postgres"}})
    assert ok.status_code == 200, ok.text
    events = list(handle.stream())
    assert events[ok.json()["offset"]].kind == "input_received"
    late = post(gw, path, {"value": "again", "request": 1})
    assert late.status_code == 409 and "#1" in late.json()["error"]["message"]
    assert late.json()["error"]["field"] == "request"
    assert handle.result(timeout=60).outputs["q"]["answers"] == [{"db": "postgres"}]


def test_messages_reach_the_next_step_and_a_finished_task_takes_none(gw, pool):
    handle = pool.submit(Task(goal="g", agents=["q", "l"], inputs={"l": {"tokens": 1}}))
    waiting(pool, handle.task_id)
    sent = post(gw, f"/v1/tasks/{handle.task_id}/messages", {"message": "read me"})
    assert sent.status_code == 202, sent.text
    handle.respond("go")
    assert handle.result(timeout=60).outputs["l"]["inbox"] == ["read me"]
    ended = post(gw, f"/v1/tasks/{handle.task_id}/messages", {"message": "too late"})
    assert ended.status_code == 409 and "has ended" in ended.json()["error"]["message"]
    unknown = post(gw, "/v1/tasks/t99999-none/messages", {"message": "x"})
    assert unknown.status_code == 404


def test_approve_and_reject_over_http_and_through_the_python_client(gw, pool, tmp_path):
    handles = []
    for name in ("yes", "no"):
        ws = tmp_path / name
        ws.mkdir()
        (ws / "f.txt").write_text("old\n")
        handles.append(pool.submit(Task(goal="g", workspace=str(ws), agents=["ok"],
                                        inputs={"approve": True, "apply": True, "proposal": {"f.txt": "new\n"}})))
    for h in handles:
        waiting(pool, h.task_id)
    with GatewayClient(gw.url, SUBMIT) as client:
        with pytest.raises(InvalidInput):
            client.respond(handles[0].task_id, {"maybe": True})
        client.approve(handles[0].task_id)
        client.reject(handles[1].task_id, "keep the old text")
        with pytest.raises(InputNotExpected):
            client.approve(handles[1].task_id)
        yes = client.result(handles[0].task_id, timeout=60)
        assert yes.ok and yes.applied == ["f.txt"]
        from threadbound.runtime import TaskFailed

        with pytest.raises(TaskFailed) as no:
            client.result(handles[1].task_id, timeout=60)
        assert no.value.result.reason == "rejected" and "keep the old text" in no.value.result.error
    assert (tmp_path / "yes" / "f.txt").read_text() == "new\n"
    assert (tmp_path / "no" / "f.txt").read_text() == "old\n"


def _bare_post(gw, path: str, body: bytes | None) -> tuple[int, dict]:
    """A POST as curl -X POST sends it: no Content-Length, no body (or ``body`` as sent)."""
    import http.client
    import json

    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=30)
    try:
        conn.putrequest("POST", path)
        conn.putheader("Authorization", f"Bearer {SUBMIT}")
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"{}")
    finally:
        conn.close()


def test_approve_and_reject_without_a_body_mean_no_reason_and_an_unknown_task_is_404(gw, pool, tmp_path):
    # Given: two tasks waiting for approval
    handles = []
    for name in ("yes", "no"):
        ws = tmp_path / name
        ws.mkdir()
        (ws / "f.txt").write_text("old\n")
        handles.append(pool.submit(Task(goal="g", workspace=str(ws), agents=["ok"],
                                        inputs={"approve": True, "proposal": {"f.txt": "new\n"}})))
    for h in handles:
        waiting(pool, h.task_id)
    # When: approve and reject are posted with no body at all, or only white space
    for verb in ("approve", "reject"):
        status, body = _bare_post(gw, f"/v1/tasks/t99999-none/{verb}", None)
        assert status == 404 and body["error"]["type"] == "TaskNotFound", body
    status, body = _bare_post(gw, f"/v1/tasks/{handles[0].task_id}/approve", None)
    assert status == 200 and body["answer"] == "approve", body
    status, body = _bare_post(gw, f"/v1/tasks/{handles[1].task_id}/reject", b" \n")
    assert status == 200 and body["answer"] == "reject", body
    # Then: the first succeeds, the second fails as rejected with no reason given
    assert handles[0].result(timeout=60).ok
    from threadbound.runtime import TaskFailed

    with pytest.raises(TaskFailed) as no:
        handles[1].result(timeout=60)
    assert no.value.result.reason == "rejected" and "no reason given" in no.value.result.error
