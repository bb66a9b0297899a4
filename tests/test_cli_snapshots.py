"""`threadbound snapshots ls/show` and `threadbound resume`, as a user types them."""

import json
import os

import pytest
import ray
from conftest import SNAPSHOTS, make_pool

from threadbound.runtime import Task
from threadbound.runtime.cli import main

pytestmark = [pytest.mark.usefixtures("ray_session"), pytest.mark.timeout(120)]


def crashed_pool(name):
    pool = make_pool(name, snapshot_interval_s=60)
    handle = pool.submit(Task(goal="g", agents=["a", "b"], inputs={"*": {"tokens": 2}, "b": {"sleep_s": 2}}))
    pool.snapshot()
    ray.kill(pool._sup, no_restart=True)
    return handle.task_id


def test_snapshots_ls_and_show_read_manifests_and_flag_a_damaged_one(pool_name, capsys):
    task_id = crashed_pool(pool_name)
    assert main(["snapshots", "ls", SNAPSHOTS, "--pool", pool_name]) == 0
    out = capsys.readouterr().out
    assert "verified" in out and "REFUSED" not in out
    where = os.path.join(SNAPSHOTS, pool_name)
    newest = sorted(n for n in os.listdir(where) if n.startswith("snap-"))[-1]
    with open(os.path.join(where, newest), "r+b") as fh:
        fh.seek(-3, os.SEEK_END)
        fh.write(b"\0\0\0")
    assert main(["snapshots", "ls", where]) == 0
    assert "REFUSED: the payload's SHA-256 does not match" in capsys.readouterr().out
    assert main(["snapshots", "show", where]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert task_id in shown["tasks"] and shown["verification"].startswith("REFUSED")


def test_resume_command_finishes_the_crashed_pools_tasks(pool_name, capsys):
    task_id = crashed_pool(pool_name)
    assert main(["resume", SNAPSHOTS, "--pool", pool_name, "--json"]) == 0
    captured = capsys.readouterr()
    events = [json.loads(line) for line in captured.out.splitlines()]
    assert {e["task_id"] for e in events} == {task_id}
    kinds = [e["kind"] for e in events]
    assert "resumed" in kinds and kinds[-1] == "succeeded"
    assert "resumed pool" in captured.err


def test_resume_with_nothing_to_resume_says_where_it_looked(tmp_path, capsys):
    assert main(["resume", str(tmp_path)]) == 2
    assert f"{tmp_path}: no snapshot here" in capsys.readouterr().err
