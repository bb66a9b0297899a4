"""The built-in coder -> tester -> reviewer loop on real workspaces, on a real local Ray."""

import shutil
import textwrap
from pathlib import Path

import pytest

from threadbound.runtime import AgentPool, RuntimeConfig, Task, TaskFailed

pytestmark = pytest.mark.usefixtures("ray_session")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def pool_from(path, name, **changes):
    cfg = RuntimeConfig.from_yaml(path, env={})
    return AgentPool(cfg.replace(name=name, **{"metrics": {"port": 0}, **changes}))  # many pools, one machine


@pytest.fixture(scope="module")
def scripted(ray_session):
    p = pool_from(EXAMPLES / "scripted" / "fizzbuzz.yaml", "scripted")
    yield p
    p.shutdown()


def test_loop_fixes_fizzbuzz_in_two_rounds_and_leaves_the_users_files_alone(scripted):
    original = (EXAMPLES / "fizzbuzz" / "fizzbuzz.py").read_text()
    handle = scripted.submit(Task(goal="make the tests pass", workspace=EXAMPLES / "fizzbuzz"))
    events = list(handle.stream())
    res = handle.result(timeout=60)
    assert res.ok and res.rounds == 2
    tests = [e.data for e in events if e.kind == "test_result"]
    assert [t["ok"] for t in tests] == [False, True] and tests[1]["passed"] == 3
    review = res.outputs["reviewer"]
    assert review["approved"] and "+    if n % 15 == 0:" in review["diff"]
    assert [r["verdict"] for r in review["rounds"]] == ["request_changes", "approve"]
    assert "FizzBuzz" in review["files"]["fizzbuzz.py"]
    assert (EXAMPLES / "fizzbuzz" / "fizzbuzz.py").read_text() == original


def test_apply_writes_the_approved_change_back(scripted, tmp_path):
    ws = tmp_path / "fizzbuzz"
    shutil.copytree(EXAMPLES / "fizzbuzz", ws)
    res = scripted.submit(Task(goal="fix", workspace=ws, inputs={"apply": True})).result(timeout=60)
    assert res.applied == ["fizzbuzz.py"] and res.refused == []
    assert "n % 15 == 0" in (ws / "fizzbuzz.py").read_text()


def test_unappliable_reply_is_feedback_not_a_crash(ray_session, tmp_path):
    p = AgentPool(RuntimeConfig(name="garbage", max_agents=3, metrics={"port": 0},
                                model={"backend": "simulated", "answers": {"coder": "¯\\_(ツ)_/¯ no idea"}}))
    try:
        handle = p.submit(Task(goal="fix", workspace=EXAMPLES / "fizzbuzz", max_rounds=1))
        with pytest.raises(TaskFailed, match="no success after 1 round"):
            handle.result(timeout=60)
        events = list(handle.stream())
        problems = [e.data for e in events if e.kind == "edit_problems"]
        assert problems and "no file block or diff" in problems[0]["problems"][0]
        assert not [e for e in events if e.kind in ("agent_crashed", "step_failed")]
    finally:
        p.shutdown()


@pytest.fixture(scope="module")
def tester_pool(ray_session):
    p = AgentPool(RuntimeConfig(name="tester", max_agents=1, max_agents_per_task=1, max_rounds=1, metrics={"port": 0},
                                retry={"max_attempts": 1}))
    yield p
    p.shutdown()


def workspace(tmp_path, test_code):
    (tmp_path / "test_generated.py").write_text(textwrap.dedent(test_code))
    return tmp_path


LIMITS = {"sandbox": {"wall_s": 20, "cpu_s": 3, "memory_mb": 768, "max_procs": 32}}


@pytest.mark.parametrize("name, code, expect", [
    ("infinite_loop", "def test_loop():\n    while True:\n        pass\n", "cpu_time"),
    ("fork_bomb", """
        import os
        def test_bomb():
            while True:
                try:
                    os.fork()
                except OSError:
                    pass
     """, "max_procs"),
    ("big_alloc", "def test_alloc():\n    x = bytearray(10 * 1024 ** 3)\n", "MemoryError"),
    ("socket", """
        import socket
        def test_connect():
            socket.create_connection(("127.0.0.1", 8265), timeout=2)
     """, "unreachable|Permission denied"),
], ids=["infinite_loop", "fork_bomb", "big_alloc", "socket"])
def test_tester_contains_hostile_tests_and_its_actor_survives(tester_pool, tmp_path, name, code, expect):
    handle = tester_pool.submit(Task(goal=name, workspace=workspace(tmp_path, code), agents=["tester"], inputs=LIMITS))
    with pytest.raises(TaskFailed):
        handle.result(timeout=90)
    events = list(handle.stream())
    out = handle_output(events)
    assert any(e in (out["killed"] or "") or e in out["output"] for e in expect.split("|"))
    assert not [e for e in events if e.kind in ("agent_crashed", "step_timed_out")]
    # the same agent process serves the next task: the actor survived
    pid = next(e.data["pid"] for e in events if e.kind == "step_started")
    (tmp_path / "ok").mkdir()
    fine = workspace(tmp_path / "ok", "def test_ok():\n    pass\n")
    ok = tester_pool.submit(Task(goal="fine", workspace=fine, agents=["tester"]))
    assert ok.result(timeout=60).outputs["tester"]["passed"] == 1
    assert next(e.data["pid"] for e in ok.stream() if e.kind == "step_started") == pid


def handle_output(events):
    return next(e.data["output"] for e in events if e.kind == "step_finished" and e.agent == "tester")


def test_workspace_without_tests_fails_clearly(tester_pool, tmp_path):
    (tmp_path / "code.py").write_text("x = 1\n")
    with pytest.raises(TaskFailed, match="has no tests"):
        tester_pool.submit(Task(goal="g", workspace=tmp_path, agents=["tester"])).result(timeout=60)


def test_test_command_not_found_fails_clearly(tester_pool, tmp_path):
    with pytest.raises(TaskFailed, match="'no-such-runner' was not found"):
        tester_pool.submit(Task(goal="g", workspace=workspace(tmp_path, "def test_a():\n    pass\n"),
                                agents=["tester"], inputs={"test_command": ["no-such-runner"]})).result(timeout=60)
