"""The pool's JSONL log: one line per event with the fields operators filter on, rotated."""

from __future__ import annotations

import json
import os
import stat

from fake_actors import fails_once
from test_supervisor_unit import fakes, result, run, submit  # noqa: F401  (fakes: the fixture)

from threadbound.runtime.supervisor.structured_log import log_path


def lines(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_every_event_but_tokens_is_a_json_line_naming_task_role_actor_level_kind_and_attempt(
        fakes, tmp_path):  # noqa: F811
    fakes.script("a", fails_once(tokens=3))
    seen = {}

    async def body(sup):
        task_id = await submit(sup, ["a", "b"])
        assert (await result(sup, task_id)).ok
        seen["task"], seen["events"] = task_id, [row[1] for row in sup.tasks[task_id].events]
        seen["path"] = sup.event_log.path

    run(fakes, body, log={"dir": str(tmp_path / "logs")})
    path = seen["path"]
    assert path == str(tmp_path / "logs" / "pool-threadbound.jsonl") == log_path_for(tmp_path)
    got = lines(path)
    # one line per event, in order, tokens left out
    assert [g["kind"] for g in got] == [k for k in seen["events"] if k != "tokens"]
    assert all(g["task"] == seen["task"] and g["pool"] == "threadbound" for g in got)
    failed = next(g for g in got if g["kind"] == "step_failed")
    assert failed["role"] == "a" and failed["attempt"] == 1 and failed["actor"].startswith("agent/")
    assert failed["level"] == 2 and "try again" in failed["data"]["error"]
    finished = [g for g in got if g["kind"] == "step_finished"]
    assert [(g["role"], g["attempt"]) for g in finished] == [("a", 2), ("b", 1)]
    assert got[-1]["kind"] == "succeeded" and got[-1]["role"] is None
    # the directory is private: goals and errors may say things about the user's code
    assert stat.S_IMODE(os.stat(tmp_path / "logs").st_mode) == 0o700


def log_path_for(tmp_path) -> str:
    from threadbound.runtime.config import RuntimeConfig

    return log_path(RuntimeConfig(log={"dir": str(tmp_path / "logs")}))


def test_the_log_rotates_past_its_size_keeping_the_configured_backups(fakes, tmp_path):  # noqa: F811
    async def body(sup):
        for _ in range(30):
            await result(sup, await submit(sup, ["a"]))

    run(fakes, body, log={"dir": str(tmp_path), "max_mb": 0.002, "backups": 2})
    names = sorted(os.listdir(tmp_path))
    assert names == ["pool-threadbound.jsonl", "pool-threadbound.jsonl.1", "pool-threadbound.jsonl.2"]
    for name in names:  # every line of every file is whole JSON
        assert lines(str(tmp_path / name))
        assert os.path.getsize(tmp_path / name) <= 0.002 * 1024 * 1024 + 4096


def test_tokens_are_logged_when_asked(fakes, tmp_path):  # noqa: F811
    async def body(sup):
        await result(sup, await submit(sup, ["a"]))

    run(fakes, body, log={"dir": str(tmp_path), "tokens": True})
    assert "tokens" in [g["kind"] for g in lines(str(tmp_path / "pool-threadbound.jsonl"))]


def test_with_no_backups_the_log_is_cut_back_not_grown_without_end(fakes, tmp_path):  # noqa: F811
    async def body(sup):
        for _ in range(30):
            await result(sup, await submit(sup, ["a"]))

    run(fakes, body, log={"dir": str(tmp_path), "max_mb": 0.002, "backups": 0})
    assert os.listdir(tmp_path) == ["pool-threadbound.jsonl"]
    assert 0 < os.path.getsize(tmp_path / "pool-threadbound.jsonl") <= 0.002 * 1024 * 1024 + 4096
    assert lines(str(tmp_path / "pool-threadbound.jsonl"))[-1]["kind"] == "succeeded"  # the newest lines kept


def test_a_link_planted_where_the_log_goes_is_not_written_through_and_the_pool_runs_on(
        fakes, tmp_path, caplog):  # noqa: F811
    # Given: someone who can write the log directory put a link where the log file goes,
    # pointing at a file of the user's
    logs = tmp_path / "logs"
    logs.mkdir()
    victim = tmp_path / "keep-me.txt"
    victim.write_text("precious\n")
    os.symlink(victim, logs / "pool-threadbound.jsonl")
    seen = {}

    async def body(sup):
        seen["result"] = await result(sup, await submit(sup, ["a"]))

    # When: the pool runs a task
    run(fakes, body, log={"dir": str(logs)})
    # Then: the task succeeded, the linked file is as it was, and the log says why it wrote nothing
    assert seen["result"].ok
    assert victim.read_text() == "precious\n"
    assert any("cannot be written" in r.getMessage() and "log.dir" in r.getMessage() for r in caplog.records)


def test_a_line_keeps_short_fields_as_they_are_cuts_long_ones_and_stamps_the_millisecond(tmp_path):
    # Given the log of a pool, and events with short fields, long ones, and long ones in a list
    import types

    from threadbound.agents.events import Row
    from threadbound.runtime.config import RuntimeConfig
    from threadbound.runtime.supervisor.structured_log import MAX_FIELD, StructuredLog

    log = StructuredLog(RuntimeConfig(log={"dir": str(tmp_path / "logs")}))
    task = types.SimpleNamespace(id="t00001-ab3f", level=2)
    long = "x" * (MAX_FIELD + 10)
    short = {"attempt": 1, "slot": "agent/0", "ok": True, "cost": 0.5, "none": None, "running": ["a", "b"]}

    def line(data, ts):
        return json.loads(log._line(task, Row(0, "step_started", "a", data, ts)))

    # When they are written as lines, across a second's boundary
    a = line(short, 1_700_000_000.999)
    b = line({"error": long}, 1_700_000_001.0005)
    c = line({"running": ["a", long], "n": 2}, 1_700_000_001.25)
    d = line({"nested": {"deep": long}}, 0.0)
    # Then short fields go out as they are, long strings are cut wherever they are
    assert a["data"] == short
    assert b["data"]["error"] == "x" * MAX_FIELD + f"... ({MAX_FIELD + 10} chars)"
    assert c["data"] == {"running": ["a", "x" * MAX_FIELD + f"... ({MAX_FIELD + 10} chars)"], "n": 2}
    assert d["data"]["nested"]["deep"].endswith(f"... ({MAX_FIELD + 10} chars)")
    # and each line is stamped with its own second and millisecond, in UTC
    assert [x["ts"] for x in (a, b, c, d)] == [
        "2023-11-14T22:13:20.999+00:00", "2023-11-14T22:13:21.000+00:00", "2023-11-14T22:13:21.250+00:00",
        "1970-01-01T00:00:00.000+00:00"]
    log.close()
