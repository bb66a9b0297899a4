"""The `ray up` configs: Ray's own validation accepts them, and what a user relies on holds.

Nothing here starts a machine. Ray's cluster launcher validates a config the way
`ray up` does (its defaults merged in, then its JSON schema and its own checks), and the
configs' shell commands run for real in a scratch home with a stand-in `ray` on PATH
that records how it was called: token auth on for every `ray start`, the signing key only
on the head, the supervisor's resource on the head, the dashboard port the README states.
"""

from __future__ import annotations

import copy
import json
import os
import re
import stat
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml
import ray.autoscaler
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = {"local": ROOT / "configs" / "cluster.yaml", "aws": ROOT / "configs" / "cluster-aws.yaml"}
README = (ROOT / "README.md").read_text()
RAY_SCHEMA = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
HEAD_IP = "10.0.0.10"

# Stands in for the `ray` CLI: one JSON line per call, with the environment that matters.
FAKE_RAY = """#!/usr/bin/env python3
import json, os, sys
with open(os.environ["RAY_CALLS"], "a") as fh:
    fh.write(json.dumps({"argv": sys.argv[1:], "auth_mode": os.environ.get("RAY_AUTH_MODE"),
                         "snapshot_key": os.environ.get("THREADBOUND_SNAPSHOT_KEY")}) + "\\n")
"""


def load(name):
    return yaml.safe_load(CONFIGS[name].read_text())


def ray_validates(config):
    """What `ray up` does with a config before it touches a machine."""
    validate_config(prepare_config(copy.deepcopy(config)))


def readme_ports():
    dashboard = re.search(r"the dashboard is at http://127\.0\.0\.1:(\d+)", README)
    metrics = re.search(r"\(`metrics\.port`, default (\d+)", README)
    assert dashboard and metrics, "the README no longer states the dashboard or the metrics port"
    return int(dashboard.group(1)), int(metrics.group(1))


@pytest.fixture
def node(tmp_path):
    """A scratch node: its own home, a stand-in `ray`, and a way to run the config's commands."""
    home = tmp_path / "home"
    home.mkdir()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ray").write_text(FAKE_RAY)
    (bin_dir / "ray").chmod(0o755)
    calls = tmp_path / "calls.jsonl"

    class Node:
        def __init__(self):
            self.home = home
            # No RAY_* or THREADBOUND_* from this test session: only what the commands set.
            self.env = {"HOME": str(home), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
                        "RAY_CALLS": str(calls), "RAY_HEAD_IP": HEAD_IP}

        def run(self, commands, *, bashrc=False):
            """Run commands in order as Ray's updater does (`bash -c`; with bashrc, reading
            ~/.bashrc first as its login shells do); stop at the first that fails."""
            for command in commands:
                script = f"source ~/.bashrc; {command}" if bashrc else command
                proc = subprocess.run(["bash", "-c", script], env=self.env, cwd=home,
                                      capture_output=True, text=True, timeout=30)
                if proc.returncode != 0:
                    return proc
            return proc

        def ray_calls(self):
            lines = calls.read_text().splitlines() if calls.exists() else []
            return [json.loads(line) for line in lines]

        def starts(self):
            return [c for c in self.ray_calls() if c["argv"][:1] == ["start"]]

    return Node()


@pytest.mark.parametrize("name", CONFIGS)
def test_ray_accepts_the_config_as_ray_up_would(name):
    config = load(name)
    # the file as written, against Ray's JSON schema (ray/autoscaler/ray-schema.json)...
    jsonschema.validate(config, json.loads(RAY_SCHEMA.read_text()))
    # ...and as `ray up` sees it: Ray's defaults merged in, then the schema and Ray's own
    # checks (node types, the head's type, worker counts)
    ray_validates(config)


def test_a_broken_config_is_refused_naming_the_field():
    # Given: a resource count that is not a number, and a misspelt section
    bad_resource = load("aws")
    bad_resource["available_node_types"]["ray.head.default"]["resources"]["threadbound-supervisor"] = "one"
    misspelt = load("local")
    misspelt["head_start_commands"] = misspelt.pop("head_start_ray_commands")
    # Then: Ray refuses each, and the error names the field
    with pytest.raises(jsonschema.ValidationError) as exc:
        ray_validates(bad_resource)
    assert list(exc.value.absolute_path)[-1] == "threadbound-supervisor"
    assert "'one' is not of type 'integer'" in str(exc.value)
    with pytest.raises(jsonschema.ValidationError, match="'head_start_commands' was unexpected"):
        ray_validates(misspelt)


@pytest.mark.parametrize("name", CONFIGS)
def test_every_command_is_valid_shell(name):
    config = load(name)
    lists = ["initialization_commands", "setup_commands", "head_setup_commands",
             "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands"]
    for key in lists:
        for command in config.get(key, []):
            proc = subprocess.run(["bash", "-n", "-c", command], capture_output=True, text=True)
            assert proc.returncode == 0, f"{key}: {command!r}: {proc.stderr}"


@pytest.mark.parametrize("name", CONFIGS)
def test_every_node_starts_ray_with_token_auth(name, node):
    config = load(name)
    # Given: Ray's token reaches every node at Ray's default path (Ray's token-auth guide)
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    key = node.home / ".local" / "state" / "threadbound" / "snapshot.key"
    key.parent.mkdir(parents=True)
    key.write_text("k" * 64)
    # When: the head's and a worker's start commands run in plain shells (`ray up
    # --use-normal-shells`: no ~/.bashrc), so only the commands themselves can turn it on
    assert node.run(config["head_start_ray_commands"]).returncode == 0
    head_starts = node.starts()
    assert node.run(config["worker_start_ray_commands"]).returncode == 0
    worker_starts = node.starts()[len(head_starts):]
    # Then: every `ray start` ran with RAY_AUTH_MODE=token
    assert len(head_starts) == len(worker_starts) == 1
    for call in head_starts + worker_starts:
        assert call["auth_mode"] == "token", call
    # the head got the signing key (it wins over snapshots.key_file), a worker did not
    assert head_starts[0]["snapshot_key"] == "k" * 64
    assert worker_starts[0]["snapshot_key"] is None
    assert "--head" in head_starts[0]["argv"]
    assert f"--address={HEAD_IP}:6379" in worker_starts[0]["argv"]


@pytest.mark.parametrize("name", CONFIGS)
def test_the_environment_every_shell_gets_turns_token_auth_on(name, node):
    config = load(name)
    # When: the initialization commands run, twice (every `ray up` runs them again)
    for _ in range(2):
        assert node.run(config["initialization_commands"]).returncode == 0
    # Then: a shell that reads ~/.bashrc (Ray's login shells, `ray attach`) has token auth on,
    # and ~/.bashrc reads the cluster's file once, however often `ray up` ran
    proc = node.run(['echo "$RAY_AUTH_MODE"'], bashrc=True)
    assert proc.stdout.strip() == "token"
    assert (node.home / ".bashrc").read_text().count(".threadbound-cluster.sh") == 1


def test_only_the_head_has_the_supervisor_resource(node):
    # local provider: given to `ray start`, on the head only
    local = load("local")
    node.run(local["head_start_ray_commands"])
    node.run(local["worker_start_ray_commands"])
    head, worker = node.starts()
    resources = [a.split("=", 1)[1] for a in head["argv"] if a.startswith("--resources=")]
    assert resources and json.loads(resources[0]) == {"threadbound-supervisor": 1}
    assert not any(a.startswith("--resources") for a in worker["argv"])
    # aws: declared per node type, so the autoscaler knows what each type brings
    aws = load("aws")
    types = aws["available_node_types"]
    assert types[aws["head_node_type"]]["resources"] == {"threadbound-supervisor": 1}
    workers = [t for name, t in types.items() if name != aws["head_node_type"]]
    assert workers and all("threadbound-supervisor" not in t["resources"] for t in workers)
    assert all(t["max_workers"] >= t.get("min_workers", 0) for t in workers)


@pytest.mark.parametrize("name", CONFIGS)
def test_the_snapshot_store_is_a_shared_url(name, node):
    from threadbound.runtime import RuntimeConfig

    config = load(name)
    node.run(config["initialization_commands"])
    url = node.run(['echo "$THREADBOUND_SNAPSHOT_DIR"'], bashrc=True).stdout.strip()
    # Then: a URL (the store with a lease record, not flock) every node can reach, never a
    # node-local or temporary directory, and one the config layer takes as snapshot_dir
    scheme, _, rest = url.partition("://")
    assert scheme in {"s3", "gs", "file"}, url
    if scheme == "file":
        assert not rest.startswith(("/tmp", "/var/tmp", "/home", "/root", "~")), url
    assert RuntimeConfig.from_env({"THREADBOUND_SNAPSHOT_DIR": url}).snapshot_dir == url


def test_a_missing_shared_mount_stops_ray_up_naming_the_setting(node):
    # Given: the local config, on a machine where its NFS mount is not there
    config = load("local")
    assert not os.path.ismount("/mnt/threadbound")
    node.run(config["initialization_commands"])
    # When: the head's setup runs
    proc = node.run(config["head_setup_commands"], bashrc=True)
    # Then: it stops with the setting named, before anything writes to a local directory
    assert proc.returncode != 0
    assert "snapshot_dir (THREADBOUND_SNAPSHOT_DIR" in proc.stderr
    assert not os.path.exists("/mnt/threadbound/snapshots")


@pytest.mark.parametrize("name", CONFIGS)
def test_the_signing_key_stays_on_the_head_only(name, node):
    config = load(name)
    staged = "~/.threadbound-cluster/snapshot.key"
    assert config["file_mounts"][staged] == "~/.local/state/threadbound/snapshot.key"
    copy_on_node = node.home / ".threadbound-cluster" / "snapshot.key"

    def stage():
        copy_on_node.parent.mkdir(exist_ok=True)
        copy_on_node.write_text("k" * 64)

    # the head installs it at threadbound's default key file, 0600 (load_key refuses others)
    stage()
    install = [c for c in config["head_setup_commands"] if "snapshot.key" in c]
    assert node.run(install).returncode == 0
    key = node.home / ".local" / "state" / "threadbound" / "snapshot.key"
    assert key.read_text() == "k" * 64 and stat.S_IMODE(key.stat().st_mode) == 0o600
    # a worker deletes its copy
    key.unlink()
    stage()
    assert node.run(config["worker_setup_commands"]).returncode == 0
    assert not copy_on_node.exists() and not key.exists()


@pytest.mark.parametrize("name", CONFIGS)
def test_the_ports_are_the_ones_the_readme_states(name, node):
    from threadbound.runtime.config import MetricsConfig

    dashboard, metrics = readme_ports()
    config = load(name)
    node.run(config["head_start_ray_commands"])
    (head,) = node.starts()
    assert f"--dashboard-port={dashboard}" in head["argv"]
    assert MetricsConfig().port == metrics
    assert f"metrics.port, default {metrics}" in CONFIGS[name].read_text()
    if name == "aws":
        rules = config["provider"]["security_group"]["IpPermissions"]
        assert {(r["FromPort"], r["ToPort"]) for r in rules} == {(dashboard, dashboard), (metrics, metrics)}
        assert all(r["IpRanges"] and r["IpRanges"][0]["CidrIp"] != "0.0.0.0/0" for r in rules)


def test_ray_down_leaves_nothing_behind_on_aws():
    # terminated, not stopped: a stopped instance keeps its disk (and its bill)
    assert load("aws")["provider"]["cache_stopped_nodes"] is False


def test_the_aws_example_marks_what_must_be_edited():
    text = CONFIGS["aws"].read_text()
    install = next(c for c in load("aws")["setup_commands"] if "pip install" in c)
    assert "EXAMPLE-ORG" in install
    assert "PLACEHOLDER: where pip gets threadbound" in text
    assert "PLACEHOLDER: the bucket in THREADBOUND_SNAPSHOT_DIR" in text
    assert "s3://example-threadbound-snapshots/" in "".join(load("aws")["initialization_commands"])
