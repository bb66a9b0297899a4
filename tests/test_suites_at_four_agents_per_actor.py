"""The pool (caps and faults), parallel, resume, person and gateway suites hold with four agents
per actor too.

They run once more in a child pytest with ``--agents-per-actor=4`` (its own session Ray), so
the README's one test command, which CI runs, covers both settings. The child starts in the
background when the session's collection ends (``tests/background.py``); the test here waits
for its end and reads its report."""

from __future__ import annotations

import os

import pytest

import background

SUITES = ["test_pool_caps.py", "test_pool_faults.py", "test_parallel.py", "test_resume.py", "test_person.py",
          "test_gateway.py"]

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(1500)]


def background_job(scratch: str) -> background.Job:
    here = os.path.dirname(os.path.abspath(__file__))
    return background.pytest_job("suites-at-four-agents-per-actor",
                                 ["--agents-per-actor=4", *(os.path.join(here, s) for s in SUITES)], 1400)


def test_the_pool_parallel_resume_person_and_gateway_suites_pass_with_four_agents_per_actor(tmp_path):
    background.passed(background_job(str(tmp_path)))
