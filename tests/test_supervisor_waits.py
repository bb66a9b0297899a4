"""A task that cannot begin to wait ends, naming why, instead of staying `running` for
ever, deaf to approve and cancel (the supervisor on a fake clock and fake actors)."""

from __future__ import annotations

from supervisor_harness import fakes, kinds, result, run, submit, until  # noqa: F401  (fakes: a fixture)

from threadbound.runtime import Task

def test_a_task_whose_wait_cannot_start_ends_failed_and_the_pool_goes_on(fakes):
    from test_supervisor_clock import asks as asking

    fakes.script("b", asking)

    async def body(sup):
        # Given: beginning to wait raises, as float(a 400-digit wait_timeout_s) once did
        real = sup.life.task_waits

        def broken(ts):
            raise OverflowError("int too large to convert to float")

        sup.life.task_waits = broken
        stuck = await submit(sup, ["b"])
        # Then: the task ends failed, its error naming the cause, and is not left running
        ended = await result(sup, stuck)
        assert ended.status == "failed" and ended.reason == "internal"
        assert "began to wait" in ended.error and "OverflowError" in ended.error
        # and the pool still runs a task that waits, once waiting works again
        sup.life.task_waits = real
        fine = await submit(sup, ["b"])
        await until(lambda: sup.tasks[fine].status == "waiting", "the next task waits")
        await sup.respond(fine, "yes")
        assert (await result(sup, fine)).ok

    run(fakes, body)

def test_the_huge_wait_timeout_of_the_escape_is_refused_at_submit():
    import pytest

    from threadbound.runtime.errors import InvalidTask

    with pytest.raises(InvalidTask) as err:
        Task(goal="g", wait_timeout_s=int("9" * 400), inputs={"approve": True}).validated(["a"])
    assert err.value.field == "wait_timeout_s"
