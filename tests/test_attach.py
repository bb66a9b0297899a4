"""A second process joins the running Ray (address="auto") and attaches to the same pool."""

import subprocess
import sys
import textwrap

import pytest
from conftest import make_pool

from threadbound.runtime import Task

pytestmark = pytest.mark.usefixtures("ray_session")

CLIENT = textwrap.dedent("""
    import sys
    from threadbound.runtime import AgentPool, Task
    pool = AgentPool.attach("attach", namespace="threadbound", address="auto")
    seen = [e.kind for e in pool.task(sys.argv[1]).stream()]
    mine = pool.submit(Task(goal="from another process", agents=["a"])).result(timeout=60)
    print(seen[-1], mine.status, len(pool.tasks()))
    pool.close()
""")


def test_another_process_joins_ray_and_shares_the_pool(ray_session):
    pool = make_pool("attach", max_agents=2, max_agents_per_task=2, ray={"namespace": "threadbound"})
    try:
        first = pool.submit(Task(goal="from this process", agents=["a", "b"]))
        out = subprocess.run([sys.executable, "-c", CLIENT, first.task_id], capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.split() == ["succeeded", "succeeded", "2"]
        assert len(pool.tasks()) == 2
    finally:
        pool.shutdown()
