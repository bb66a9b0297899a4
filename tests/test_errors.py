"""Errors cross process boundaries (Ray pickles them): fields must survive."""

import pickle

import pytest

from threadbound.agents import errors as agent_errors
from threadbound.runtime import errors


def instances():
    yield errors.ConfigError("cfg.yaml", [("max_agents", "must be >= 1")])
    yield errors.InvalidTask("goal", "must be non-empty", task_id="t1")
    yield errors.UnknownRole("nope", ["a", "b"])
    yield errors.AgentNotLoadable("agents.x: cannot import", agent="x")
    yield errors.TaskNotFound("no task", task_id="t9")
    yield errors.PoolClosed("gone")
    yield errors.ResultTimeout("slow", task_id="t1", limit=3.0)
    yield errors.TaskFailed("failed", task_id="t1", elapsed=2.5)
    yield errors.TaskTimedOut("late", task_id="t1", limit=1.0, elapsed=1.2)
    c = errors.TaskCancelled("cancelled", task_id="t1")
    c.reason = "shutdown"
    yield c
    yield agent_errors.TransientModelError("503", retry_after_s=2.0, agent="coder")
    yield agent_errors.RateLimitError("429", retry_after_s=2.0, agent="coder")
    yield agent_errors.ModelError("bad request", agent="coder")
    yield agent_errors.BudgetExhausted("spent", task_id="t1", agent="coder")


@pytest.mark.parametrize("err", list(instances()), ids=lambda e: type(e).__name__)
def test_every_error_survives_pickling_with_its_fields(err):
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is type(err)
    assert str(back) == str(err)
    assert back.__dict__ == err.__dict__
    assert isinstance(back, errors.ThreadboundError)


def test_config_error_lists_every_problem():
    err = errors.ConfigError("x.yaml", [("a", "bad"), ("b.c", "worse")])
    assert str(err) == "x.yaml: invalid configuration\n  a: bad\n  b.c: worse"


def test_unknown_role_says_how_to_register():
    msg = str(errors.UnknownRole("planner", ["coder"]))
    assert "planner" in msg and "coder" in msg and "agents=" in msg
