"""Bad input: a clear threadbound error naming the field, and the pool stays healthy."""

import pytest
from conftest import make_pool

from threadbound.runtime import AgentNotLoadable, AgentPool, InvalidTask, RuntimeConfig, Task, TaskNotFound, UnknownRole

pytestmark = pytest.mark.usefixtures("ray_session")


@pytest.fixture(scope="module")
def pool(ray_session):
    p = make_pool("badinput", max_agents=1, max_agents_per_task=1)
    yield p
    p.shutdown()


@pytest.mark.parametrize("task, field", [
    (Task(goal="", agents=["a"]), "goal"),
    (Task(goal="   ", agents=["a"]), "goal"),
    (Task(goal="x", agents=[]), "agents"),
    (Task(goal="x", agents=["a"], workspace="/no/such/dir"), "workspace"),
    (Task(goal="x", agents=["a"], step_timeout_s=0), "step_timeout_s"),
    (Task(goal="x", agents=["a"], task_timeout_s=-1), "task_timeout_s"),
    (Task(goal="x", agents=["a"], max_rounds=0), "max_rounds"),
    (Task(goal="x", agents=["a"], level=7), "level"),
    (Task(goal="x", agents=["a"], level="often"), "level"),
    (Task(goal="x", agents=["a"], cost_budget=0), "cost_budget"),
    (Task(goal="x", agents=["a"], degrade="no"), "degrade"),
    (Task(goal="x", agents=["a"], priority="high"), "priority"),
])
def test_invalid_task_names_the_field(pool, task, field):
    with pytest.raises(InvalidTask) as err:
        pool.submit(task)
    assert err.value.field == field and f"invalid task: {field}:" in str(err.value)


def test_unknown_role_lists_known_ones_and_pool_stays_healthy(pool):
    with pytest.raises(UnknownRole) as err:
        pool.submit(Task(goal="x", agents=["a", "planner"]))
    assert "planner" in str(err.value) and "'a'" not in str(err.value) and "a, ask, ask2, ask3, b" in str(err.value)
    assert pool.submit(Task(goal="still fine", agents=["a"])).result(timeout=30).ok


def test_unknown_task_id(pool):
    with pytest.raises(TaskNotFound, match="no task 'nope'"):
        pool.task("nope")


def test_agent_path_that_does_not_import(ray_session):
    with pytest.raises(AgentNotLoadable, match=r"agents\.planner: cannot import module 'no_such_pkg.mod'"):
        AgentPool(RuntimeConfig(name="bad1", agents={"planner": "no_such_pkg.mod:Planner"}))


def test_agent_path_that_is_not_an_agent(ray_session):
    with pytest.raises(AgentNotLoadable, match="not a subclass of threadbound.agents.Agent"):
        AgentPool(RuntimeConfig(name="bad2", agents={"planner": "scripted_agents:NotAnAgent"}))


def test_agent_path_without_colon(ray_session):
    with pytest.raises(AgentNotLoadable, match="'package.module:ClassName'"):
        AgentPool(RuntimeConfig(name="bad3", agents={"planner": "scripted_agents.Scripted"}))


def test_unpicklable_agent_class_is_refused_at_registration(pool):
    import threading

    from threadbound.agents import Agent

    class Locked(Agent):  # defined in a function: pickled by value, lock and all
        lock = threading.Lock()

        def step(self, ctx):
            return None

    with pytest.raises(AgentNotLoadable, match="cannot be pickled"):
        pool.register("locked", Locked)
    assert "locked" not in pool.roles()
