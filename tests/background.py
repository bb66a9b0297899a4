"""Child processes of the test session that run in the background, one after another.

Some test modules run their scenario in a child process of its own (a multi-node Ray, the
suites again at four agents per actor): a test module names its child with a module-level
``background_job(scratch)`` returning a :class:`Job`. When collection ends, the session
(``conftest.pytest_collection_finish``) queues the jobs of the modules that will run, and
one thread runs them in turn while the tests without Ray run first in the session (those
and these children wait on subprocesses and pools far more than they compute: each uses
under a core of this machine's two). A module's tests then wait for its job's result
(:func:`result`), which is usually in by the time they run.

A module may also move its tests that start Rays in subprocesses of their own (the CLI,
``ray start``) into a child pytest (:func:`child_pytest`): they carry the ``in_child``
marker, the session deselects them, and one test of the module waits for the child's
report (:func:`passed`).

Each child runs in a process group of its own; a child still running when the session
ends is stopped, with everything it started, by that group's id.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field


@dataclass(eq=False)
class Job:
    name: str
    argv: list[str]
    cwd: str
    env: dict[str, str]
    timeout_s: float
    # Filled in as it runs:
    returncode: int | None = None
    output: str = ""
    seconds: float = 0.0
    done: threading.Event = field(default_factory=threading.Event)
    proc: subprocess.Popen | None = None


_jobs: dict[str, Job] = {}
_queue: list[Job] = []
_lock = threading.Lock()
_thread: threading.Thread | None = None
_stopping = False


def queue(job: Job) -> None:
    """Queue ``job`` (once per name) and make sure the runner thread is going."""
    global _thread
    with _lock:
        if job.name in _jobs:
            return
        _jobs[job.name] = job
        _queue.append(job)
        if _thread is None:  # (the runner clears it, under the lock, as it ends)
            _thread = threading.Thread(target=_run_all, name="background-children", daemon=True)
            _thread.start()


def _run_all() -> None:
    global _thread
    while True:
        with _lock:
            if not _queue or _stopping:
                _thread = None
                return
            job = _queue.pop(0)
        _run(job)


def _run(job: Job) -> None:
    fd, path = tempfile.mkstemp(prefix=f"threadbound-{job.name}-", suffix=".txt")
    start = time.monotonic()
    try:
        with os.fdopen(fd, "w") as out:
            with _lock:
                if _stopping:
                    return
                # A process group of its own: stopped with everything it started.
                job.proc = subprocess.Popen(job.argv, cwd=job.cwd, env=job.env, stdout=out,
                                            stderr=subprocess.STDOUT, start_new_session=True)
            try:
                job.returncode = job.proc.wait(job.timeout_s)
            except subprocess.TimeoutExpired:
                _kill(job.proc)
                job.returncode = None
        with open(path, errors="replace") as fh:
            job.output = fh.read()
    finally:
        job.seconds = time.monotonic() - start
        os.unlink(path)
        job.done.set()


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    for sig, wait_s in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def result(job: Job) -> Job:
    """Wait for ``job`` (queued now if it was not) and return it, finished: ``returncode``
    None when it ran past its timeout or was stopped."""
    queue(job)
    got = _jobs[job.name]
    with _lock:  # at most every job's own timeout, the ones queued before it included
        limit = sum(j.timeout_s for j in _jobs.values()) + 60
    if not got.done.wait(limit):
        raise TimeoutError(f"background job {got.name} did not finish")
    return got


CHILD = "THREADBOUND_TEST_CHILD"  # set in a child pytest's environment (see child_pytest)


def pytest_job(name: str, args: list[str], timeout_s: float, env: dict[str, str] | None = None) -> Job:
    """A child pytest of ``args`` (test files by absolute path, options), run from the
    repository's root on a Ray of its own (never the session's: no RAY_ADDRESS), with
    ``env`` added to this process's environment; :func:`passed` reads its report."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    child_env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    child_env.update(env or {})
    argv = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *args]
    return Job(name, argv, root, child_env, timeout_s)


def child_pytest(module_file: str, timeout_s: float) -> Job:
    """The tests of ``module_file`` marked ``in_child``, in a child pytest of their own: tests
    that start Rays in subprocesses of their own (the CLI, ``ray start``) and use the
    session's Ray not at all. The session deselects them (``conftest``) and the module's one
    test that waits for this job (:func:`passed`) stands for them."""
    name = os.path.splitext(os.path.basename(module_file))[0]
    return pytest_job(f"{name}-in-a-child", ["-m", "in_child", os.path.abspath(module_file)], timeout_s,
                      {CHILD: "1"})


def passed(job: Job) -> None:
    """Fail unless ``job``, a child pytest, ran its tests and every one passed (its report
    quoted: failures and their tracebacks)."""
    import pytest

    got = result(job)
    tail = got.output[-6000:]
    assert got.returncode == 0, f"{job.name} failed (exit {got.returncode}, {got.seconds:.0f} s):\n{tail}"
    assert " passed" in tail and "no tests ran" not in tail, tail
    skips = [line for line in got.output.splitlines() if line.startswith("SKIPPED")]
    if skips:  # a tool missing here: said as the child said it
        pytest.skip(f"{job.name}: " + "; ".join(skips))


def stop() -> None:
    """The session ends: stop the running child and run no more."""
    global _stopping
    with _lock:
        _stopping = True
        _queue.clear()
        running = [j for j in _jobs.values() if j.proc is not None and not j.done.is_set()]
    for job in running:
        _kill(job.proc)
        job.done.wait(30)
