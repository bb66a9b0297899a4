"""The benchmark compares like with like: every system delivers the same tokens.

Not a timing test: it checks that each runner of scripts/bench.py does the whole
workload (3 steps per task, every token to the client), so the ratios it prints
compare the same work.
"""

import os
import sys

import pytest

SCRIPTS = os.path.join(os.path.dirname(__file__), "..", "scripts")
sys.path.insert(0, SCRIPTS)
os.environ["PYTHONPATH"] = os.pathsep.join([SCRIPTS, os.environ["PYTHONPATH"]])

import bench  # noqa: E402
import bench_baselines as base  # noqa: E402
import bench_capacity  # noqa: E402

pytestmark = [pytest.mark.usefixtures("ray_session"), pytest.mark.timeout(120)]

N, TOKENS = 3, 7
EXPECTED = N * len(base.ROLES) * TOKENS


@pytest.mark.parametrize("runner", ["ray_warm", "ray_relay", "ray_fresh", "threads", "langgraph"])
def test_every_baseline_delivers_every_token(runner):
    if runner == "langgraph" and not base.langgraph_available():
        pytest.skip("LangGraph is a bench-only dependency: pip install -e '.[bench]'")
    n = 1 if runner == "ray_fresh" else N  # three process starts per task
    res = getattr(base, f"run_{runner}")(n, 2, TOKENS, 0.0)
    assert res["tokens"] == n * len(base.ROLES) * TOKENS and res["wall_s"] > 0


def test_threadbound_runner_delivers_every_token(tmp_path):
    b = bench.Bench(str(tmp_path))
    res = b.run_threadbound(N, 1, TOKENS, 0.0)
    assert res["tokens"] == EXPECTED


def test_every_system_runs_the_three_steps_as_one_chain():
    # threadbound's tasks say so explicitly, so they never get a parallel default graph
    assert bench.CHAIN == {"code": (), "test": ("code",), "review": ("test",)}


def test_recycling_runner_delivers_every_token_while_processes_are_replaced(tmp_path):
    b = bench.Bench(str(tmp_path))
    res = b.run_threadbound(N, 1, TOKENS, 0.0, recycle_after=1)
    # recycles are begun as slots come back (a replacement is counted once its old
    # process is gone, which a short run may end before)
    assert res["tokens"] == EXPECTED and res["recycles"] >= 1


def test_capacity_level_delivers_every_token_once_in_order_and_prints_every_field(tmp_path, capsys):
    # Given a tiny capacity level: 8 one-agent tasks streaming 20 tokens/s for 1 s
    cap = bench_capacity.series(str(tmp_path), (8,), seconds=1.0, k=None, limit_ms=1e9)
    # Then every task succeeded and every token reached the client once, in order
    (row,) = cap["levels"]
    assert row["checks_ok"], row
    assert row["succeeded"] == row["in_order"] == row["no_repeat"] == 8
    assert row["tokens_delivered"] == row["tokens_expected"] == 8 * 20
    assert row["events_per_s"] > 0 and row["p50_ms"] <= row["p95_ms"]
    assert row["processes"] == 8 and row["agent_rss_mb"] > 0
    assert set(row["cpu"]) == {"supervisor", "client", "agents", "ray"} and row["cpu"]["supervisor"] > 0
    # And the level's line names every figure
    out = capsys.readouterr().out
    assert 0 < row["reads"]  # the client's long-polls, for all 8 tasks at once
    for field in ("delay p50", "p95", "events/s", "tokens/s", "long-polls/s", "CPU (% of a core): supervisor", "client",
                  "agents", "ray", "CPU per event: supervisor", "all", "agent RSS",
                  "all succeeded, every token once and in order"):
        assert field in out, field


def test_the_bare_plane_does_the_same_level_and_the_pool_is_quoted_against_it(tmp_path, capsys):
    import capacity_floor

    # Given the capacity workload on the bare Ray plane: 8 agents, 4 to a process, 1 s
    bare = capacity_floor.floor_level(8, seconds=1.0, k=4)
    # Then it did the same work the pool's level does, under the same checks
    assert bare["checks_ok"], bare
    assert bare["processes"] == 2 and bare["tokens_delivered"] == bare["tokens_expected"] == 8 * 20
    # (its log actor's CPU over 1 s can round to 0: psutil counts in 10 ms ticks)
    assert set(bare["cpu"]) == {"supervisor", "client", "agents", "ray"} and bare["all_us_per_event"] > 0
    assert bare["reads"] > 0  # the client's long-polls, for all 8 tasks at once
    # And a pool's row carrying it names the ratio of the two
    row = {**bare, "all_us_per_event": 2 * bare["all_us_per_event"], "floor": bare}
    assert bench_capacity.floor_ratio(row) == pytest.approx(2.0)
    line = bench_capacity.describe_floor(row)
    assert "bare Ray plane" in line and "2.00x the bare plane's" in line
    md = "\n".join(bench_capacity.markdown({"series": [{"k": 4, "rate": 20.0, "seconds": 1.0, "stopped": "x",
                                                        "levels": [row]}]}))
    assert "| 8 | " in md and "2.00x" in md


def test_the_bare_plane_log_keeps_each_senders_order_when_ray_delivers_calls_out_of_order():
    import ray

    import capacity_floor

    log = capacity_floor.FloorLog.remote(1)
    try:
        # flush 1 (the task's last tokens and its end) arrives before flush 0
        ray.get(log.append.remote(0, 1, [(0, "2:0 ", 1)], [0]))
        news, ended = ray.get(log.read_many.remote([0], 0.0))
        assert news == {} and ended == []  # held back: nothing read past the gap, the end not yet seen
        ray.get(log.append.remote(0, 0, [(0, "0:0 1:0 ", 2)], []))
        news, ended = ray.get(log.read_many.remote([0], 0.0))
        assert [text for _, text, _ in news[0]] == ["0:0 1:0 ", "2:0 "] and ended == [0]
    finally:
        ray.kill(log)


@pytest.mark.parametrize("flags, named", [
    (["--levels", "0"], "--levels"), (["--levels", "ten"], "--levels"), (["--seconds", "nan"], "--seconds"),
    (["--seconds", "-1"], "--seconds"), (["--agents-per-actor", "0"], "--agents-per-actor"),
])
def test_the_bare_plane_script_names_a_bad_flag(flags, named, tmp_path):
    import subprocess

    res = subprocess.run([sys.executable, os.path.join(SCRIPTS, "capacity_floor.py"), *flags],
                         capture_output=True, text=True, timeout=60)
    # argparse's usage error (exit 2, the flag named), not a traceback from a started Ray
    assert res.returncode == 2 and named in res.stderr and "Traceback" not in res.stderr, res.stderr


def test_the_bare_plane_turn_is_the_pools(tmp_path):
    # the bare actors flush as often as the pool's actor stream does, so both send as many events
    from threadbound.agents.host import _pace
    from types import SimpleNamespace as S

    import capacity_floor

    for k in (1, 4, 8, 16, 50, 500):
        assert capacity_floor.pace_s(k) == pytest.approx(_pace([S(req=S(token_interval_s=0.05))] * k))


@pytest.mark.parametrize("got, broken", [
    ({"status": "failed", "order": [0, 1, 2], "offsets": [0, 1, 2]}, "succeeded"),
    ({"status": "succeeded", "order": [0, 2, 1], "offsets": [0, 1, 2]}, "in_order"),
    ({"status": "succeeded", "order": [0, 1, 1, 2], "offsets": [0, 1, 2]}, "in_order"),
    ({"status": "succeeded", "order": [0, 1], "offsets": [0, 1, 2]}, "in_order"),
    ({"status": "succeeded", "order": [0, 1, 2], "offsets": [0, 1, 1, 2]}, "no_repeat"),
    ({"status": "succeeded", "order": [0, 1, 2], "offsets": [0, 2, 3]}, "no_repeat"),
])
def test_capacity_checks_catch_a_failed_task_a_lost_repeated_or_reordered_token(got, broken):
    checks = bench_capacity.check_stream(got, 3)
    assert not checks[broken] and all(v for k, v in checks.items() if k != broken)


def test_capacity_refuses_agents_per_actor_where_the_config_has_no_such_field(monkeypatch):
    import argparse

    monkeypatch.setattr(bench_capacity, "has_agents_per_actor", lambda: False)
    args = argparse.Namespace(seconds=None, agents_per_actor=4)
    with pytest.raises(SystemExit, match="agents_per_actor"):
        bench_capacity.check_arguments(args)


def test_the_metrics_work_of_a_step_is_timed_on_the_hook_the_supervisor_runs():
    # bench.py --quick times the metrics hook directly; it must call the hook as the
    # supervisor does (a batch of Rows), so a move or a change of the hook breaks this test,
    # not a benchmark run
    assert bench.metrics_work_per_step_us(n=50) > 0


def test_the_speed_lines_give_the_per_step_ratio_against_the_relay_and_the_journals_floor(tmp_path):
    # The per-step target is against the bare relay: each run's threadbound/floor over the
    # same run's relay/floor. The journal floor writes and fdatasyncs real frames, then
    # leaves nothing behind in the snapshot directory.
    jf = bench.journal_floor_ms(str(tmp_path), n=5)
    assert jf["n"] == 5 and jf["median_ms"] > 0 and not os.listdir(tmp_path)
    hl = {"step_vs_floor": {"median": 2.0, "runs": [2.4, 1.8]}, "relay_vs_floor": {"median": 1.5, "runs": [2.0, 1.5]},
          "c4_vs_langgraph": {"median": 1.1, "runs": [1.1]}, "repeats": 2}
    lines = bench.speed_lines(hl, {"median_ms": 0.5, "p90_ms": 2.0, "n": 5}, 2.5)
    assert lines[0].startswith("per-step cost at c=1, threadbound / bare relay: median 1.20x [1.2, 1.2]")
    assert "tasks/s at c=4 vs LangGraph + SQLite: median 1.10x" in lines[1]
    assert lines[-1].endswith("is 1.20x the relay (median write)")
    # The agents_per_actor 3 row comes as context, never with a target.
    k3 = bench.speed_lines({**hl, "c4_k3_vs_langgraph": {"median": 1.3, "runs": [1.3]}}, None, None)
    assert any("agents_per_actor 3" in line and "median 1.30x" in line and "target" not in line for line in k3)


def test_the_written_ratios_state_the_per_step_target_against_the_relay_not_the_floor():
    # BENCHMARKS.md's list gives the per-step target (<= 1.2x the bare relay, each
    # run against its own relay); the ratios to the warm-actor floor come only as context.
    hl = {"step_vs_floor": {"median": 2.0, "runs": [2.4, 1.8]}, "relay_vs_floor": {"median": 1.5, "runs": [2.0, 1.5]},
          "c4_vs_langgraph": {"median": 1.1, "runs": [1.1]}, "repeats": 2}
    lines = bench.ratios([], {"headline": hl})
    assert lines[0].startswith("per-step cost at c=1, threadbound / a bare relay actor")
    assert "median 1.20x of 2 runs taking turns [1.2, 1.2] (target <= 1.2x)" in lines[0]
    assert lines[1].startswith("token-streaming tasks/s at c=4") and lines[1].endswith("(target >= 1x)")
    floor = [line for line in lines if "warm-actor Ray floor" in line]
    assert len(floor) == 2 and not any("target" in line for line in floor)


def test_ray_call_cost_names_a_bad_argument_before_ray_starts(capsys):
    import ray_call_cost

    with pytest.raises(SystemExit) as exc:
        ray_call_cost.main(["--calls", "2"])
    assert exc.value.code == 2 and "--calls must be 4 or more" in capsys.readouterr().err


@pytest.mark.parametrize("argv, names", [(["--actors", "0"], "--actors"), (["--actors", "501"], "--actors"),
                                         (["--seconds", "0"], "--seconds"),
                                         (["--events-per-s", "nan"], "--events-per-s"),
                                         (["--restarts", "-1"], "--restarts")])
def test_idle_cost_names_a_bad_argument_before_ray_starts(capsys, argv, names):
    import idle_cost

    with pytest.raises(SystemExit) as exc:
        idle_cost.main(argv)
    assert exc.value.code == 2 and names in capsys.readouterr().err


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="reads /proc/<pid>/task: Linux only")
def test_idle_cost_counts_the_wake_ups_and_cpu_of_a_thread_by_its_name():
    import threading
    import time

    import idle_cost

    named, stop = threading.Event(), threading.Event()

    def sleeper() -> None:
        with open("/proc/thread-self/comm", "w") as f:
            f.write("wake-probe")
        named.set()
        while not stop.is_set():
            time.sleep(0.001)  # each sleep is a voluntary context switch

    t = threading.Thread(target=sleeper, daemon=True)
    t.start()
    try:
        assert named.wait(5)
        w0, c0 = idle_cost.thread_counts([os.getpid()])
        time.sleep(0.3)
        w1, c1 = idle_cost.thread_counts([os.getpid()])
    finally:
        stop.set()
        t.join(5)
    assert w1["wake-probe"] - w0["wake-probe"] >= 30  # ~300 sleeps of 1 ms; far fewer on a loaded machine
    assert c1["wake-probe"] >= c0["wake-probe"] and "wake-probe" not in idle_cost.thread_counts([os.getpid()])[0]
