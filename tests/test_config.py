"""Config: a bad file gets one clear error naming the file, field and what is allowed."""

from pathlib import Path

import pytest

from threadbound.runtime import ConfigError, RuntimeConfig


def write(tmp_path, text):
    p = tmp_path / "runtime.yaml"
    p.write_text(text)
    return p


def test_shipped_config_loads_with_documented_defaults():
    cfg = RuntimeConfig.from_yaml(Path(__file__).resolve().parent.parent / "configs" / "runtime.yaml", env={})
    assert (cfg.max_agents, cfg.max_agents_per_task, cfg.step_timeout_s) == (10, 3, 30.0)
    assert cfg.snapshot_interval_s == 5.0 and cfg.streaming is True
    assert cfg.model.backend == "simulated"
    assert cfg == RuntimeConfig()  # the file documents the defaults, it does not change them


def test_typo_gets_did_you_mean_and_names_file(tmp_path):
    p = write(tmp_path, "step_timout_s: 3\n")
    with pytest.raises(ConfigError) as err:
        RuntimeConfig.from_yaml(p, env={})
    msg = str(err.value)
    assert str(p) in msg and "step_timout_s" in msg and "did you mean `step_timeout_s`" in msg


def test_nested_typo_names_the_field_path(tmp_path):
    p = write(tmp_path, "ray:\n  adress: auto\n")
    with pytest.raises(ConfigError, match=r"ray\.adress: unknown key; did you mean `address`"):
        RuntimeConfig.from_yaml(p, env={})


@pytest.mark.parametrize("text, field", [
    ("max_agents: 0\n", "max_agents"),
    ("max_agents_per_task: -1\n", "max_agents_per_task"),
    ("step_timeout_s: -5\n", "step_timeout_s"),
    ("task_timeout_s: 0s\n", "task_timeout_s"),
    ("retry:\n  max_attempts: 0\n", "retry.max_attempts"),
    ("token_interval_ms: soon\n", "token_interval_ms"),
    ("idle_actor_ttl_s: 0\n", "idle_actor_ttl_s"),
    ("idle_actor_ttl_s: soon\n", "idle_actor_ttl_s"),
    ("idle_actor_ttl_s: .nan\n", "idle_actor_ttl_s"),
    ("idle_actor_ttl_s: true\n", "idle_actor_ttl_s"),
    ("reasoning:\n  level: 7\n", "reasoning.level"),
    ("reasoning:\n  levels:\n    2: {max_tokens: 0}\n", "reasoning.levels.2.max_tokens"),
    ("reasoning:\n  auto: {thresholds: [1, 2]}\n", "reasoning.auto"),
    ("health:\n  error_rate: 2\n", "health.error_rate"),
    ("retry:\n  classes: {ratelimit: {max_attempts: 2}}\n", "retry.classes.ratelimit"),
])
def test_zero_or_negative_limits_are_refused(tmp_path, text, field):
    with pytest.raises(ConfigError) as err:
        RuntimeConfig.from_yaml(write(tmp_path, text), env={})
    assert f"  {field}:" in str(err.value)


def test_all_problems_are_reported_at_once(tmp_path):
    with pytest.raises(ConfigError) as err:
        RuntimeConfig.from_yaml(write(tmp_path, "max_agents: 0\nstreaming: maybe\n"), env={})
    assert {p for p, _ in err.value.problems} == {"max_agents", "streaming"}


def test_unknown_model_backend_lists_allowed(tmp_path):
    with pytest.raises(ConfigError, match=r"model\.backend: must be one of 'simulated'"):
        RuntimeConfig.from_yaml(write(tmp_path, "model:\n  backend: gpt9\n"), env={})


def test_yaml_that_is_not_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match="must be a mapping"):
        RuntimeConfig.from_yaml(write(tmp_path, "- a\n- b\n"), env={})


def test_yaml_syntax_error_gives_line(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML: line 2"):
        RuntimeConfig.from_yaml(write(tmp_path, "a: 1\n b: [\n"), env={})


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        RuntimeConfig.from_yaml(tmp_path / "nope.yaml", env={})


def test_per_task_cap_cannot_exceed_pool_cap():
    with pytest.raises(ConfigError, match=r"max_agents_per_task \(3\) cannot exceed max_agents \(2\)"):
        RuntimeConfig.from_mapping({"max_agents": 2})


def test_durations_accept_units():
    cfg = RuntimeConfig(step_timeout_s="2m", task_timeout_s="1h", token_interval_ms="0.1s",
                        retry={"backoff_s": "250ms"})
    assert (cfg.step_timeout_s, cfg.task_timeout_s, cfg.token_interval_ms) == (120.0, 3600.0, 100.0)
    assert cfg.retry.backoff_s == 0.25


def test_env_overrides_apply_and_bad_ones_name_the_variable(tmp_path):
    p = write(tmp_path, "max_agents: 6\n")
    cfg = RuntimeConfig.from_yaml(p, env={"THREADBOUND_MAX_AGENTS": "8", "THREADBOUND_STREAMING": "false"})
    assert cfg.max_agents == 8 and cfg.streaming is False
    with pytest.raises(ConfigError, match="THREADBOUND_STEP_TIMEOUT_S"):
        RuntimeConfig.from_yaml(p, env={"THREADBOUND_STEP_TIMEOUT_S": "-1"})


def test_config_is_frozen():
    cfg = RuntimeConfig()
    with pytest.raises(Exception):
        cfg.max_agents = 3
