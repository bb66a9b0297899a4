"""`threadbound top`: what its screen shows for a pool's stats, health and tasks (rendered
without Ray), and the real command in a real terminal (tmux) watching a pool on the
session's Ray: a task seen running with its busy agent, then finished, the pool going
away, and `q` or Ctrl-C giving the shell back with exit 0."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from conftest import make_pool
from rich.console import Console
from tmux_terminal import prompt_is_back, task_row, top_command, user_env, user_terminal

from threadbound.runtime import Task
from threadbound.runtime.cli.top import _Seen, _stale, render
from threadbound.runtime.task import TaskSummary


def screen(renderable, width=160):
    console = Console(width=width, record=True, file=open(os.devnull, "w"), color_system=None)
    console.print(renderable)
    console.file.close()
    return console.export_text()


def summary(task_id, status, agents, goal="make the tests pass", round=0):
    return TaskSummary(task_id=task_id, status=status, goal=goal, agents=tuple(agents), round=round, events=3,
                       submitted_at=0.0, finished_at=None, error=None)


def slot(name, owner=None, busy=False, pid=100, uses=1):
    return {"name": name, "owner": owner, "busy": busy, "pid": pid, "uses": uses, "alive": True,
            "replacing": False}


STATS = {
    "name": "nightly", "tasks": {"running": 1, "pending": 2, "succeeded": 1}, "queue_depth": 2,
    "max_agents": 4, "max_agents_per_task": 3, "busy": 1,
    "slots": [slot("agent/0", "t-run", busy=True), slot("agent/1", "t-run"), slot("agent/2"), slot("agent/3")],
    "running": {"t-run": ["coder"]},
}
HEALTH = {
    "pool": "nightly", "mode": "degraded", "enabled": True, "since_s": 42.0, "recovers_in_s": 18.0,
    "signals": {"timeouts": {"value": 3, "threshold": 2, "over": True},
                "errors": {"value": 0, "threshold": 5, "over": False}},
    "transitions": [{"at": 1_700_000_000.0, "from": "normal", "to": "degraded",
                     "reasons": ["timeouts 3 >= 2"]}],
}
TASKS = [summary("t-done", "succeeded", ["coder"]),
         summary("t-run", "running", ["coder", "tester"], goal="fix the flaky test " + "x" * 200, round=1),
         summary("t-wait", "pending", ["coder"])]


def row(text, task_id):
    return next(line for line in text.splitlines() if line.lstrip().startswith(task_id))


def test_the_screen_marks_the_agents_of_a_task_that_run_now():
    text = screen(render(STATS, HEALTH, TASKS))
    running = row(text, "t-run").split()
    assert running[:3] == ["t-run", "running", "1"]
    assert "coder*" in running and "tester" in running and "tester*" not in running
    assert running[running.index("tester") + 1] == "2"  # two agent slots bound to the task
    assert "fix the flaky test" in row(text, "t-run") and "x" * 100 not in text  # the goal, shortened
    assert "coder*" not in row(text, "t-wait")
    # the slots: the busy one, the bound one, the free ones
    states = {line.split()[0]: line.split()[2] for line in text.splitlines() if line.startswith("agent/")}
    assert states == {"agent/0": "busy", "agent/1": "bound", "agent/2": "idle", "agent/3": "idle"}
    assert "agents busy 1/4 (bound 2)" in text


def test_the_screen_shows_the_queue_the_mode_and_the_transitions():
    text = screen(render(STATS, HEALTH, TASKS))
    assert "pool nightly" in text and "mode degraded for 42s" in text and "recovers after 18s" in text
    assert "queue 2" in text
    assert "timeouts 3 >= 2" in text.split("health:")[1].splitlines()[0]  # the signal over its threshold
    when = time.strftime("%H:%M:%S", time.localtime(1_700_000_000.0))
    assert f"{when} normal -> degraded: timeouts 3 >= 2" in text


def test_unfinished_tasks_come_first_and_finished_ones_are_dimmed_last():
    text = screen(render(STATS, HEALTH, TASKS))
    order = [line.split()[0] for line in text.splitlines() if line.lstrip().startswith("t-")]
    assert order == ["t-run", "t-wait", "t-done"]
    many = [summary(f"t{i:03}", "succeeded", ["a"]) for i in range(30)]
    text = screen(render(STATS, HEALTH, many, max_tasks=5))
    assert [line.split()[0] for line in text.splitlines() if line.startswith("t0")] == [
        "t029", "t028", "t027", "t026", "t025"]
    assert "25 more finished task(s) not shown" in text


def test_tokens_per_second_shows_a_dash_until_the_pool_reports_it():
    assert "tokens/s -" in screen(render(STATS, HEALTH, TASKS))
    assert "tokens/s 123.5" in screen(render({**STATS, "tokens_per_s": 123.46}, HEALTH, TASKS))


def test_a_pool_that_went_away_is_said_above_what_was_last_seen():
    text = screen(render(STATS, HEALTH, TASKS, problem="pool 'nightly' is gone: shut down; trying again"))
    assert text.splitlines()[0] == "pool 'nightly' is gone: shut down; trying again"
    assert "t-run" in text  # the last view stays
    assert "waiting for the pool" in screen(render(None, None, None, problem="pool 'x' is gone"))


def test_a_supervisor_that_stops_answering_is_said_after_a_few_missed_refreshes():
    seen = _Seen(at=1000.0)
    assert _stale(seen, interval_s=1.0, now=1004.0) is None
    assert _stale(seen, interval_s=1.0, now=1012.0).startswith("no answer from the pool's supervisor for 12s")
    assert _stale(seen, interval_s=10.0, now=1012.0) is None  # a slow refresh is not a silent supervisor
    assert _stale(_Seen(), interval_s=1.0, now=1012.0) is None  # nothing seen yet: "waiting" says it


def test_an_idle_pool_says_no_tasks_and_no_transitions():
    text = screen(render({**STATS, "tasks": {}, "running": {}, "busy": 0, "queue_depth": 0},
                         {**HEALTH, "mode": "normal", "recovers_in_s": None, "transitions": [],
                          "signals": {}}, []))
    assert "no tasks" in text and "no transitions" in text and "no signal over its threshold" in text
    assert "mode normal" in text and "queue 0" in text


# -- the real command, in a real terminal ----------------------------------------------------


@pytest.fixture
def terminal(tmp_path):
    with user_terminal(tmp_path / "home") as term:
        yield term


@pytest.mark.usefixtures("ray_session")
@pytest.mark.timeout(60)
def test_top_shows_a_task_running_then_finished_rides_out_the_pool_going_away_and_q_quits(terminal, pool_name):
    pool = make_pool(pool_name, ray={"namespace": "threadbound"})
    try:
        # Given: top watching an idle pool from a user's terminal
        terminal.type(top_command(pool_name))
        terminal.wait_for("the idle pool", lambda t: f"pool {pool_name}" in t and "no tasks" in t)
        # When: a task whose agent a streams slowly while b is done at once
        handle = pool.submit(Task(goal="watch me stream", agents=["a", "b"], after={},
                                  inputs={"a": {"tokens": 12, "token_sleep_s": 0.25}, "b": {"tokens": 1}}))
        tid = handle.task_id
        # Then: the task is shown running with a busy and b not, then finished with none busy
        running = terminal.wait_for("the task running with only a busy", lambda t: (
            task_row(t, tid).split()[1:2] == ["running"] and "a*" in task_row(t, tid).split()
            and "b" in task_row(t, tid).split()))
        assert "watch me stream" in task_row(running, tid) and "agents busy 1/3" in running
        assert handle.result(timeout=30).status == "succeeded"
        done = terminal.wait_for("the task finished", lambda t: task_row(t, tid).split()[1:2] == ["succeeded"])
        assert "a*" not in task_row(done, tid) and "agents busy 0/3" in done
        # When the pool goes away: it says so, and keeps the last view up
        pool.shutdown()
        terminal.wait_for("that the pool is gone", lambda t: f"pool {pool_name!r} is gone" in t
                          and "trying to attach again" in t and tid in t)
        # ... until a pool of that name runs again: attached to, without a restart of top
        pool = make_pool(pool_name, ray={"namespace": "threadbound"})
        terminal.wait_for("the new pool", lambda t: "is gone" not in t and "no tasks" in t and tid not in t)
        # q quits: exit 0 and the shell's prompt back, no traceback
        terminal.keys("q")
        after = terminal.wait_for("the shell prompt after top", lambda t: "top exited" in t and prompt_is_back(t))
        assert "top exited 0" in after
    finally:
        pool.shutdown()


@pytest.mark.usefixtures("ray_session")
@pytest.mark.timeout(60)
def test_ctrl_c_quits_top_cleanly_with_exit_0(terminal, pool_name):
    pool = make_pool(pool_name, ray={"namespace": "threadbound"})
    try:
        terminal.type(top_command(pool_name))
        terminal.wait_for("the pool", lambda t: f"pool {pool_name}" in t and "q quits" in t)
        terminal.keys("C-c")
        after = terminal.wait_for("the shell prompt after top", lambda t: "top exited" in t and prompt_is_back(t))
        assert "top exited 0" in after and "interrupted" not in after
    finally:
        pool.shutdown()


@pytest.mark.usefixtures("ray_session")
@pytest.mark.timeout(60)
def test_top_of_a_pool_that_does_not_exist_says_so_and_exits_2(tmp_path):
    env = user_env(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "threadbound.runtime.cli", "top", "--address",
                           os.environ["RAY_ADDRESS"], "--name", "no-such-pool"], env=env, capture_output=True,
                          text=True, timeout=50, stdin=subprocess.DEVNULL)
    assert proc.returncode == 2 and proc.stderr.startswith(
        "threadbound: no pool named 'no-such-pool' in namespace 'threadbound' on this Ray; ")
    assert "--name" in proc.stderr and "threadbound serve --address auto" in proc.stderr
    assert proc.stdout == ""
