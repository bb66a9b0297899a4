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


def test_capacity_figure_reads_the_delay_of_every_agent(tmp_path):
    b = bench.Bench(str(tmp_path))
    cap = bench.capacity(b, (2,), stream_s=0.6, limit_ms=10_000)
    (level,) = cap["levels"]
    assert level["agents"] == 2 and cap["agents"] == 2 and cap["capped"]
    assert level["events_per_s"] > 0 and level["tokens_per_s"] >= level["events_per_s"]
    assert level["p50_ms"] <= level["p95_ms"]
