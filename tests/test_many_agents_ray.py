"""Many agents on a few actors, on a real Ray: 200 streaming agents on 4 actors (50 each),
a supervisor SIGKILLed in the middle, and every task ending with every token once, in order."""

from __future__ import annotations

import os
import signal

import pytest
import ray
from chaos_tools import follow
from conftest import eventually, make_pool

from threadbound.runtime import Task

TOKENS = 120  # 12 s of streaming each: the 200 tasks overlap while they are submitted


def _restarted(pool, old_pid) -> bool:
    try:
        return ray.get(pool._sup.info.remote(), timeout=5)["pid"] != old_pid
    except Exception:
        return False


def _check_log(events, expected: str) -> None:
    # the log: offsets 0..n-1 with no gap or repeat, across the crash
    assert [e.offset for e in events] == list(range(len(events)))
    finished = [e for e in events if e.kind == "step_finished"]
    assert len(finished) == 1
    attempt = finished[0].data["attempt"]
    # a run of a step is its attempt's tokens between two `resumed` events: the run the
    # crash cut short streamed a prefix, and the step restarted from its beginning after it
    runs: dict[tuple[int, int], str] = {}
    segment = 0
    for e in events:
        if e.kind == "resumed":
            segment += 1
        elif e.kind == "tokens":
            key = (segment, e.data["attempt"])
            runs[key] = runs.get(key, "") + e.data["text"]
    committed = [text for (seg, att), text in runs.items() if att == attempt]
    assert committed[-1] == expected  # the run that committed: every token once, in order
    assert all(expected.startswith(text) for text in runs.values())
    assert finished[0].offset > max(i for i, e in enumerate(events) if e.kind == "tokens")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_200_streaming_agents_on_4_actors_survive_a_supervisor_sigkill(ray_session, pool_name):
    # Given a pool of 200 agents, 50 per actor (4 processes), and 200 one-agent tasks streaming
    pool = make_pool(pool_name, max_agents=200, max_agents_per_task=1, agents_per_actor=50, step_timeout_s=120,
                     task_timeout_s=600, snapshot_interval_s=0.5, token_batch_size=8, token_interval_ms=50)
    expected = "".join(f"a{i} " for i in range(TOKENS))
    try:
        handles = [pool.submit(Task(goal=f"stream {i}", agents=["a"],
                                    inputs={"a": {"tokens": TOKENS, "token_sleep_s": 0.1}}))
                   for i in range(200)]
        live = follow(handles[:10])  # a few clients follow their tasks live, across the crash
        assert eventually(lambda: pool.stats()["agents"]["busy"] >= 80, 240, 0.2), pool.stats()["agents"]
        stats = pool.stats()
        assert stats["actors"]["total"] == 4 and stats["actors"]["alive"] <= 4
        assert stats["agents"]["total"] == 200
        # When the supervisor is SIGKILLed while they stream
        pid = ray.get(pool._sup.info.remote())["pid"]
        os.kill(pid, signal.SIGKILL)
        assert eventually(lambda: _restarted(pool, pid), 120, 0.5)
        # Then every task succeeds, with every token of its committed attempt once and in order
        results = [h.result(timeout=600) for h in handles]
        assert [r.status for r in results] == ["succeeded"] * 200
        for h in handles:
            _check_log(list(h.stream()), expected)
        for r in live:
            r.join(60)
            assert r.error is None
            _check_log(r.events, expected)
        assert any(e.kind == "resumed" for h in handles for e in h.stream())
        assert pool.stats()["actors"]["total"] == 4
    finally:
        pool.shutdown()
