"""The one client (asyncio, with a sync wrapper) on a real local Ray: following tasks
across a supervisor restart, one long-poll for many streams, attaching by name."""

import asyncio
import os
import threading

import pytest
import ray
from chaos_tools import follow
from conftest import eventually, make_pool

from threadbound.runtime import (
    AgentPool, ConfigError, PoolClosed, ResultTimeout, Task, TaskCancelled, TaskHandle, TaskNotFound, UnknownRole,
)

pytestmark = [pytest.mark.usefixtures("ray_session"), pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def pool(ray_session):
    p = make_pool("client")
    yield p
    p.shutdown()


class AsyncReaders(threading.Thread):
    """Clients following tasks with ``astream`` on one event loop of their own (a thread,
    so that the test goes on meanwhile). ``events[i]`` grows as task ``i``'s events come."""

    def __init__(self, handles) -> None:
        super().__init__(daemon=True)
        self.handles = handles
        self.events = [[] for _ in handles]
        self.errors = [None for _ in handles]

    def run(self) -> None:
        async def one(i, handle):
            try:
                async for ev in handle.astream():
                    self.events[i].append(ev)
            except BaseException as exc:  # noqa: BLE001 - reported by the test
                self.errors[i] = exc

        async def all_of_them():
            await asyncio.gather(*(one(i, h) for i, h in enumerate(self.handles)))

        asyncio.run(all_of_them())


def assert_whole_log(pool, handle, events):
    """``events`` is the task's log exactly: offsets 0..n-1, ending with the terminal event."""
    assert [ev.offset for ev in events] == list(range(len(events))), "a gap or a duplicate"
    assert events[-1].terminal and sum(ev.terminal for ev in events) == 1
    assert events == list(pool.task(handle.task_id).stream())


@pytest.mark.timeout(240)
def test_asyncio_and_sync_clients_follow_their_tasks_across_a_supervisor_restart(pool_name):
    # Given: 20 tasks whose agent streams tokens from a simulated model, a pool that Ray
    # restarts from its snapshots, and 10 asyncio clients and 10 sync clients following
    pool = make_pool(pool_name, snapshot_interval_s=0.5, ray={"supervisor_max_restarts": 3},
                     model={"backend": "simulated", "tokens": 40, "tokens_per_s": 100})
    try:
        handles = [pool.submit(Task(goal=f"stream {i}", agents=["ask"])) for i in range(20)]
        async_readers = AsyncReaders(handles[:10])
        async_readers.start()
        sync_readers = follow(handles[10:])
        assert eventually(lambda: any(ev.kind == "tokens" for evs in async_readers.events for ev in evs)
                          and any(ev.kind == "tokens" for r in sync_readers for ev in r.events), 60, 0.02)
        before = ray.get(pool._sup.info.remote())["pid"]
        # When: the supervisor is killed mid-stream (and Ray restarts it)
        ray.kill(pool._sup, no_restart=False)
        # Then: every client carries on and sees its task's whole log once, in order
        async_readers.join(180)
        for r in sync_readers:
            r.join(180)
        assert ray.get(pool._sup.info.remote())["pid"] != before
        logs = async_readers.events + [r.events for r in sync_readers]
        assert async_readers.errors == [None] * 10 and [r.error for r in sync_readers] == [None] * 10
        for handle, events in zip(handles, logs):
            assert_whole_log(pool, handle, events)
            assert events[-1].kind == "succeeded"
        assert any(ev.kind == "resumed" for events in logs for ev in events)  # the restart was mid-task
    finally:
        pool.shutdown()


@pytest.mark.parametrize("clients", ["threads", "asyncio"])
def test_following_twenty_tasks_costs_a_few_reads_not_twenty_per_burst(pool_name, clients):
    # Given: 20 queued tasks (the only slot is held), each with its `pending` event
    pool = make_pool(pool_name, max_agents=1, max_agents_per_task=1)
    try:
        blocker = pool.submit(Task(goal="hold the slot", agents=["a"], inputs={"a": {"sleep_s": 60}}))
        handles = [pool.submit(Task(goal=f"queued {i}", agents=["a"])) for i in range(20)]
        before = pool.stats()["reads"]
        # When: one process follows all 20 (a burst: their past events), then they are
        # all cancelled at once (a second burst)
        if clients == "threads":
            readers = follow(handles)
            logs = lambda: [r.events for r in readers]  # noqa: E731
        else:
            readers = [AsyncReaders(handles)]
            readers[0].start()
            logs = lambda: readers[0].events  # noqa: E731
        assert eventually(lambda: all(logs()), 30, 0.02)

        async def cancel_all():
            return await asyncio.gather(*(h.acancel() for h in handles))

        assert asyncio.run(cancel_all()) == ["cancelled"] * 20
        for r in readers:
            r.join(60)
        reads = pool.stats()["reads"] - before
        # Then: every stream saw both bursts, with a handful of reads: one long-poll per
        # task per burst would have taken 2 * 20
        assert [[ev.kind for ev in events] for events in logs()] == [["pending", "cancelled"]] * 20
        assert reads <= 8, f"{reads} reads for 20 streams and 2 bursts"
        # ... and every sync call of this process went through one background event loop
        assert [t.name for t in threading.enumerate()].count("threadbound-client") == 1
        blocker.cancel()
    finally:
        pool.shutdown()


def test_a_burst_of_submits_is_one_call_and_a_bad_task_in_it_is_refused_alone(pool):
    # Given: 30 tasks submitted at once from one event loop: one names a role the pool
    # does not have, and two carry the same idempotency key
    tasks = [Task(goal=f"burst {i}", agents=["a"]) for i in range(30)]
    tasks[7] = Task(goal="bad", agents=["nobody"])
    tasks[20] = tasks[21] = Task(goal="keyed", agents=["a"], idempotency_key="burst-key")
    before = pool.stats()["submit_calls"]

    async def burst():
        return await asyncio.gather(*(pool.asubmit(t) for t in tasks), return_exceptions=True)

    got = asyncio.run(burst())
    # Then: two calls reached the supervisor (the keyed tasks in one of their own, the
    # only kind a client may send again across a restart), not thirty
    assert pool.stats()["submit_calls"] - before == 2
    # ... the bad task alone was refused, with an error naming the role
    assert isinstance(got[7], UnknownRole) and "nobody" in str(got[7])
    handles = [h for i, h in enumerate(got) if i != 7]
    assert all(isinstance(h, TaskHandle) for h in handles)
    # ... the key made one task: the second submit of it got the first one's handle
    assert got[20].task_id == got[21].task_id and (got[20].created, got[21].created) == (True, False)
    assert len({h.task_id for h in handles}) == 28
    # ... and every accepted task runs
    assert all(h.result(timeout=60).ok for h in handles)


def test_a_pool_started_again_under_the_same_name_takes_the_next_submit(pool_name):
    # Given: a pool that took a task and was shut down (this process's one client loop
    # sent that submit), then a new pool under the same name
    for run in range(2):
        pool = make_pool(pool_name)
        try:
            # Then: each takes and runs its task: no submit goes to the old supervisor
            assert pool.submit(Task(goal=f"run {run}", agents=["a"])).result(timeout=60).ok
        finally:
            pool.shutdown()


def test_attach_by_name_is_a_client_of_the_same_pool(pool):
    # Given: a task submitted by the pool's first client
    handle = pool.submit(Task(goal="seen by both", agents=["a"], inputs={"a": {"tokens": 5}}))
    # When: this process attaches to the pool by its name alone
    other = AgentPool.attach("client")
    try:
        # Then: it has the pool's own config and sees the same task and events
        assert other.config == pool.config and other.name == "client"
        assert handle.task_id in {t.task_id for t in other.tasks()}
        assert other.task(handle.task_id).result(timeout=60).ok
        assert list(other.task(handle.task_id).stream()) == list(handle.stream())
    finally:
        other.close()


def test_attaching_to_a_name_nobody_runs_names_the_pool_and_the_namespace(ray_session):
    with pytest.raises(PoolClosed, match=r"no pool named 'nobody' in namespace 'elsewhere'"):
        AgentPool.attach("nobody", namespace="elsewhere")


def test_a_different_config_on_a_running_name_is_refused_and_points_to_attach(pool_name):
    pool = make_pool(pool_name)
    try:
        # When: another client brings other settings under the same name
        with pytest.raises(ConfigError) as refused:
            make_pool(pool_name, max_agents=5, model={"backend": "simulated", "tokens": 7})
        # Then: it is refused, naming each difference and how to use the running pool
        problems = dict(refused.value.problems)
        assert problems["max_agents"] == "5 in this config, 3 in the running pool"
        assert problems["model.tokens"] == "7 in this config, None in the running pool"
        assert set(problems) == {"max_agents", "model.tokens", "name"}
        assert f"AgentPool.attach('{pool_name}')" in str(refused.value)
        assert pool.stats()["max_agents"] == 3  # the running pool is untouched
        # ... while the same config (reaching Ray another way) attaches silently
        same = make_pool(pool_name, ray={"address": os.environ["RAY_ADDRESS"]})
        assert same.stats()["max_agents"] == 3
        same.close()
    finally:
        pool.shutdown()


def test_asyncio_cancel_and_result_carry_the_reason(pool):
    async def main():
        handle = await pool.asubmit(Task(goal="long", agents=["a"], inputs={"a": {"sleep_s": 30}}))
        with pytest.raises(ResultTimeout):
            await handle.aresult(timeout=0.2)
        status = await handle.acancel()
        with pytest.raises(TaskCancelled) as cancelled:
            await handle.aresult(timeout=30)
        return status, cancelled.value

    status, err = asyncio.run(main())
    assert status == "cancelled"
    assert err.reason == "cancelled" and err.result.reason == "cancelled"


def test_an_unknown_task_ends_only_its_own_stream(pool):
    handle = pool.submit(Task(goal="real", agents=["a"], inputs={"a": {"tokens": 20, "token_sleep_s": 0.01}}))

    async def main():
        async def collect(h):
            return [ev async for ev in h.astream()]

        bogus = TaskHandle(pool._sup, "t99999-none", (pool.name, pool.config.ray.namespace))
        return await asyncio.gather(collect(handle), collect(bogus), return_exceptions=True)

    real, missing = asyncio.run(main())
    assert isinstance(missing, TaskNotFound) and missing.task_id == "t99999-none"
    assert real[-1].kind == "succeeded" and [ev.offset for ev in real] == list(range(len(real)))


def test_a_stream_past_the_end_of_a_finished_task_ends_at_once(pool):
    handle = pool.submit(Task(goal="short", agents=["a"]))
    events = list(handle.stream())
    assert list(handle.stream(from_offset=len(events))) == []
    assert list(handle.stream(from_offset=len(events) - 1)) == events[-1:]
