"""agents_per_actor: bad values are a ConfigError naming the field, before Ray starts."""

import pytest

from threadbound.runtime.config import RuntimeConfig
from threadbound.runtime.errors import ConfigError


def test_default_is_one_agent_per_process():
    assert RuntimeConfig().agents_per_actor == 1


@pytest.mark.parametrize("value, says", [
    (0, "greater than or equal to 1"),
    (-3, "greater than or equal to 1"),
    (11, "cannot exceed max_agents (10)"),
    ("four", "valid integer"),
    (True, "not a boolean"),
    (2.5, "fractional"),
])
def test_a_bad_agents_per_actor_names_the_field(value, says):
    with pytest.raises(ConfigError) as err:
        RuntimeConfig.from_mapping({"agents_per_actor": value})
    (path, message), = err.value.problems
    assert path == "agents_per_actor" and says in message


def test_agents_per_actor_from_the_environment():
    assert RuntimeConfig.from_env({"THREADBOUND_AGENTS_PER_ACTOR": "5"}).agents_per_actor == 5
    with pytest.raises(ConfigError, match="agents_per_actor"):
        RuntimeConfig.from_env({"THREADBOUND_AGENTS_PER_ACTOR": "0"})


def test_a_bad_agents_per_actor_fails_before_ray_starts(monkeypatch):
    import ray

    from threadbound.runtime import AgentPool

    monkeypatch.setenv("THREADBOUND_AGENTS_PER_ACTOR", "50")  # more than max_agents (10)
    started = []
    monkeypatch.setattr(ray, "init", lambda *a, **k: started.append(1))
    with pytest.raises(ConfigError, match="agents_per_actor"):
        AgentPool()
    assert started == []
