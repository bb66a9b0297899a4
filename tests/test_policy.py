"""Who may ask for what: the policy section refuses powers a submitter was not granted,
and a bad sandbox or policy setting is a ConfigError naming the field."""

import pytest

from threadbound.runtime import RuntimeConfig, Task
from threadbound.runtime.config import PolicyConfig
from threadbound.runtime.errors import ConfigError, InvalidTask
from threadbound.runtime.policy import check
from threadbound.runtime.sandboxing import sandbox_settings


def test_a_task_may_not_have_the_network_by_default():
    with pytest.raises(InvalidTask) as err:
        check(Task(goal="g", inputs={"sandbox": {"network": True}}), PolicyConfig())
    assert err.value.field == "inputs.sandbox.network" and "policy.network" in str(err.value)


def test_the_network_is_granted_only_by_the_pool_config():
    check(Task(goal="g", inputs={"sandbox": {"network": True}}), PolicyConfig(network=True))
    check(Task(goal="g", inputs={"sandbox": {"network": False}}), PolicyConfig())


@pytest.mark.parametrize("inputs, field, key", [
    ({"test_command": ["make", "test"]}, "inputs.test_command", "policy.test_command"),
    ({"apply": True}, "inputs.apply", "policy.apply"),
])
def test_a_power_the_policy_withholds_is_refused_naming_field_and_key(inputs, field, key):
    policy = PolicyConfig(test_command=False, apply=False)
    with pytest.raises(InvalidTask) as err:
        check(Task(goal="g", inputs=inputs), policy)
    assert err.value.field == field and key in str(err.value)


def test_a_workspace_outside_the_allowed_roots_is_refused(tmp_path):
    allowed, other = tmp_path / "allowed", tmp_path / "other"
    (allowed / "proj").mkdir(parents=True)
    other.mkdir()
    policy = PolicyConfig(workspace_roots=(str(allowed),))
    check(Task(goal="g", workspace=allowed / "proj"), policy)
    with pytest.raises(InvalidTask) as err:
        check(Task(goal="g", workspace=other), policy)
    assert err.value.field == "workspace" and "policy.workspace_roots" in str(err.value)
    # a link inside the allowed root that points outside does not get through
    (allowed / "sneaky").symlink_to(other)
    with pytest.raises(InvalidTask):
        check(Task(goal="g", workspace=allowed / "sneaky"), policy)


@pytest.mark.parametrize("data, field", [
    ({"sandbox": {"isolation": "strict"}}, "sandbox.isolation"),
    ({"policy": {"netwrok": True}}, "policy.netwrok"),
    ({"policy": {"shell": True}}, "policy.shell"),
    ({"sandbox": {"uid": 0}}, "sandbox.uid"),
])
def test_a_bad_sandbox_or_policy_setting_is_a_config_error_naming_the_field(data, field):
    with pytest.raises(ConfigError) as err:
        RuntimeConfig.from_mapping(data, source="pool.yaml")
    assert field in str(err.value) and "pool.yaml" in str(err.value)


def test_the_sandbox_hides_the_snapshot_store_and_the_key_the_config_names(tmp_path):
    cfg = RuntimeConfig(snapshot_dir=str(tmp_path / "snaps"),
                        snapshots={"key_file": str(tmp_path / "keys" / "k")},
                        sandbox={"hide": [str(tmp_path / "more")], "isolation": "best_effort"})
    settings = sandbox_settings(cfg)
    assert settings.isolation == "best_effort"
    assert {str(tmp_path / "snaps"), str(tmp_path / "keys" / "k"), str(tmp_path / "more")} <= set(settings.hide)
