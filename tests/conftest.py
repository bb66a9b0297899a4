"""One local Ray per test session, with its auth token kept out of the real home."""

from __future__ import annotations

import itertools
import os
import secrets
import sys
import tempfile

import pytest

import background

_ISOLATED = tempfile.mkdtemp(prefix="threadbound-tests-")
# Ray 2.60 turns token auth on for local clusters and would write ~/.ray/auth_token.
# Point it at a token of our own in a temporary directory instead.
_TOKEN = os.path.join(_ISOLATED, "auth_token")
with open(os.open(_TOKEN, os.O_WRONLY | os.O_CREAT, 0o600), "w") as fh:
    fh.write(secrets.token_hex(32))
os.environ["RAY_AUTH_TOKEN_PATH"] = _TOKEN
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Snapshot signing key for every pool of the session (actors inherit it from Ray),
# so nothing reads or writes ~/.threadbound/snapshot.key.
os.environ["THREADBOUND_SNAPSHOT_KEY"] = secrets.token_hex(32)
# A pool's default snapshot_dir is the per-user state directory: keep it in the scratch too.
os.environ["XDG_STATE_HOME"] = os.path.join(_ISOLATED, "state")
SNAPSHOTS = os.path.join(_ISOLATED, "snapshots")
# Agent actors import the test agents by module name.
sys.path.insert(0, os.path.dirname(__file__))
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [os.path.dirname(__file__), os.environ.get("PYTHONPATH")]))

_names = itertools.count()


def pytest_addoption(parser):
    parser.addoption("--agents-per-actor", type=int, default=None, metavar="K",
                     help="run the pools of the suites with agents_per_actor K (capped at each pool's "
                          "max_agents); sets THREADBOUND_AGENTS_PER_ACTOR for the session")


def pytest_configure(config):
    k = config.getoption("--agents-per-actor", default=None)
    if k is not None:
        if k < 1:
            raise pytest.UsageError(f"--agents-per-actor must be 1 or more (got {k})")
        os.environ["THREADBOUND_AGENTS_PER_ACTOR"] = str(k)  # pools built from the environment, and actors


def agents_per_actor(max_agents: int) -> int:
    """The session's agents_per_actor for a pool of ``max_agents`` (1 unless asked for)."""
    k = int(os.environ.get("THREADBOUND_AGENTS_PER_ACTOR") or 1)
    return max(1, min(k, max_agents))


@pytest.fixture(scope="session", autouse=True)
def _outside_the_repo():
    """Run from a scratch directory: a pool's default snapshot_dir is relative to it."""
    here = os.getcwd()
    scratch = os.path.join(_ISOLATED, "cwd")
    os.makedirs(scratch, exist_ok=True)
    os.chdir(scratch)
    yield
    os.chdir(here)


# Modules whose tests start a Ray of their own in a child process (the CLI, a cluster of
# several nodes, the README's commands) rather than through the ray_session fixture.
_STARTS_RAY = {"test_cluster_local", "test_multinode", "test_readme"}


def pytest_collection_modifyitems(config, items):
    """Every test that starts Ray carries the ``ray`` marker, so ``pytest -m "not ray"`` is a
    fast tier: set here from the fixture a test uses (directly or through another fixture),
    or from its module when it starts Ray in a child process, or from ``in_child``.

    Then the modules without a Ray test run first, each module's tests together and in
    their order: they share the machine with the background children (a multi-node Ray, the
    suites at four agents per actor; see ``pytest_collection_finish``), which start when
    collection ends, rather than the session's own Ray competing with them. Last, the tests
    marked ``in_child`` leave the session (deselected): their module's child pytest runs them
    (``background.child_pytest``), unless this is that child."""
    with_ray = set()
    for item in items:
        module = item.module.__name__.rpartition(".")[2] if getattr(item, "module", None) else ""
        if ("ray_session" in getattr(item, "fixturenames", ()) or module in _STARTS_RAY
                or item.get_closest_marker("in_child") is not None):
            item.add_marker(pytest.mark.ray)
        if item.get_closest_marker("ray") is not None:
            with_ray.add(item.nodeid.split("::")[0])
    items.sort(key=lambda item: item.nodeid.split("::")[0] in with_ray)  # stable: keeps each module's order
    if not os.environ.get(background.CHILD):  # in_child tests run in their module's child pytest (one test waits)
        moved = [item for item in items if item.get_closest_marker("in_child") is not None]
        if moved:
            config.hook.pytest_deselected(items=moved)
            items[:] = [item for item in items if item.get_closest_marker("in_child") is None]


def pytest_collection_finish(session):
    """Queue the background children (``tests/background.py``) of the modules that will run:
    a module names its child with a ``background_job(scratch)`` function."""
    if session.config.option.collectonly or os.environ.get(background.CHILD):
        return
    seen = set()
    for item in session.items:  # (a module's tests that wait for its child carry the ray marker)
        module = getattr(item, "module", None)
        if (module is None or module.__name__ in seen or not hasattr(module, "background_job")
                or item.get_closest_marker("ray") is None):
            continue
        seen.add(module.__name__)
        background.queue(module.background_job(tempfile.mkdtemp(prefix="background-", dir=_ISOLATED)))


def pytest_sessionfinish(session):
    """A background child still running when the session ends (stopped early, say) is stopped."""
    background.stop()


@pytest.fixture(scope="session")
def ray_session():
    import ray

    # address="local": always a Ray of our own, even when `ray start` left one running here.
    ray.init(address="local", num_cpus=2, namespace="threadbound-tests", include_dashboard=True,
             logging_level="ERROR", log_to_driver=False)
    # State-API calls and child processes name this Ray explicitly, so that another
    # local Ray on the machine never confuses them.
    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    yield ray
    ray.shutdown()


@pytest.fixture
def pool_name():
    return f"test{next(_names)}"


def pool_settings(name: str, **overrides) -> dict:
    """Config of a test pool: small caps, short timeouts, snapshots in the session's scratch.

    Health monitoring is off: these pools fail on purpose, test after test, and a
    degraded pool would stop streaming for the next test. tests/test_health.py turns
    it on with the thresholds it needs. Metrics are recorded but not served: many pools
    share this machine, and one port (tests/test_metrics.py serves on free ones)."""
    settings = dict(name=name, max_agents=3, max_agents_per_task=3, step_timeout_s=10,
                    task_timeout_s=60, token_batch_size=4, token_interval_ms=20,
                    retry={"max_attempts": 2, "backoff_s": 0.05, "max_backoff_s": 0.2},
                    snapshot_dir=SNAPSHOTS, health={"enabled": False}, metrics={"port": 0})
    settings.update(overrides)
    settings.setdefault("agents_per_actor", agents_per_actor(settings["max_agents"]))
    return settings


def make_pool(name: str, **overrides):
    """A pool of test agents (roles a..e, and ``ask`` which calls the model) with small caps
    and short timeouts."""
    from scripted_agents import Asker, Scripted

    from threadbound.runtime import AgentPool, RuntimeConfig

    roles = {**{r: Scripted for r in "abcde"}, "ask": Asker, "ask2": Asker, "ask3": Asker}
    return AgentPool(RuntimeConfig.from_mapping(pool_settings(name, **overrides)), agents=roles)


def eventually(fn, timeout_s=15.0, interval_s=0.2):
    """Poll ``fn`` until it returns a truthy value (Ray's state API reports with a delay)."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        value = fn()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval_s)
