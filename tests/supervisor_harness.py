"""The harness of the supervisor's tests without Ray: the plain ``Supervisor`` on one
asyncio loop, fake agent actors (``fake_actors``), the supervisor's ``FakeClock`` and a
seeded random; ``run`` checks the invariants every run keeps (the caps held, one step
at a time per actor, nothing left alive)."""

from __future__ import annotations

import asyncio
import random

import pytest
import ray._private.auto_init_hook as ray_auto_init
from fake_actors import FakeActors

from threadbound.agents import Agent
from threadbound.runtime.config import RuntimeConfig
from threadbound.runtime.registry import agent_blob
from threadbound.runtime.supervisor import slot_actors as slots_module
from threadbound.runtime.supervisor.core import Supervisor
from threadbound.runtime.task import Task, TaskResult

SEED = 7
LIMIT_S = 10.0  # a test that takes longer is stuck (they take milliseconds)
ROLES = ("coder", "tester", "reviewer", "a", "b", "c")
# One distinct agent class per role, so a request carrying another role's class is caught.
BLOBS = {r: agent_blob(r, type(f"Fake_{r}", (Agent,), {})) for r in ROLES}


@pytest.fixture
def fakes(monkeypatch):
    """Fake slot actors; the slot table kills them through the fakes' ``ray``."""
    f = FakeActors(blobs=BLOBS)
    monkeypatch.setattr(slots_module, "ray", f.ray)
    # Guard: any other Ray call fails here instead of quietly starting a local cluster.
    monkeypatch.setattr(ray_auto_init, "enable_auto_connect", False)
    return f


def config(**overrides) -> RuntimeConfig:
    settings = dict(max_agents=3, max_agents_per_task=3, step_timeout_s=5, task_timeout_s=10,
                    token_batch_size=1, retry={"max_attempts": 3, "backoff_s": 0.001, "max_backoff_s": 0.002},
                    snapshots={"enabled": False}, health={"enabled": False}, metrics={"port": 0, "ray": False})
    settings.update(overrides)
    return RuntimeConfig(**settings)


def run(fakes: FakeActors, body, *, hooks=(), **overrides):
    """Run ``body(supervisor)`` on a fresh loop, then check the invariants every run keeps:
    the caps held, one step at a time per actor, and shutdown left no actor alive."""
    cfg = config(**overrides)

    async def main():
        sup = Supervisor(cfg, BLOBS, make_actor=fakes, clock=fakes.clock, rng=random.Random(SEED),
                         hooks=list(hooks))
        try:
            out = await asyncio.wait_for(body(sup), LIMIT_S)
        finally:
            await sup.shutdown(grace_s=0)
        assert fakes.violations == []
        assert fakes.max_alive <= cfg.max_agents
        assert fakes.clashes == 0, "an actor was created before its predecessor was confirmed dead"
        assert fakes.max_running_total <= cfg.max_agents
        assert all(n <= cfg.max_agents_per_task for n in fakes.max_running.values())
        assert fakes.alive() == 0, "shutdown left agent actors alive"
        return out

    return asyncio.run(main())


async def submit(sup: Supervisor, agents, goal: str = "make the tests pass", **kw) -> str:
    return (await sup.submit(Task(goal=goal, agents=list(agents), **kw)))[0]


async def result(sup: Supervisor, task_id: str) -> TaskResult:
    return TaskResult(**await sup.wait(task_id, None))


async def until(cond, what: str) -> None:
    for _ in range(3000):
        if cond():
            return
        await asyncio.sleep(0.001)
    raise AssertionError(f"never happened: {what}")


def log(sup: Supervisor, task_id: str, agent: str | None = "*") -> list[tuple]:
    """The task's events as ``(kind, agent, data)``; only ``agent``'s unless ``"*"``."""
    return [(k, a, d) for _, k, a, d, _ in sup.tasks[task_id].events if agent == "*" or a == agent]


def kinds(sup: Supervisor, task_id: str, agent: str | None = "*") -> list[str]:
    return [k for k, _, _ in log(sup, task_id, agent)]


def first(sup: Supervisor, task_id: str, kind: str, agent: str | None = "*", **match) -> dict:
    for k, _, d in log(sup, task_id, agent):
        if k == kind and all(d.get(f) == v for f, v in match.items()):
            return d
    raise AssertionError(f"no {kind} event of {agent} matching {match} in task {task_id}")


def index(sup: Supervisor, task_id: str, kind: str, agent: str | None, **match) -> int:
    for i, (k, a, d) in enumerate(log(sup, task_id)):
        if k == kind and a == agent and all(d.get(f) == v for f, v in match.items()):
            return i
    raise AssertionError(f"no {kind} event of {agent} matching {match} in task {task_id}")
