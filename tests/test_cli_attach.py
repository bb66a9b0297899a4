"""Commands that attach to a running Ray with token authentication, as a user runs them
from another shell: the token is found as Ray's own CLI finds it, a refused token is
named as such (not as "no cluster"), and Ray's own lines stay off the terminal unless -v."""

import os
import shutil
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.usefixtures("ray_session"), pytest.mark.timeout(120)]


def shell(home, *argv, **env_changes):
    """`threadbound ...` in a new shell of a user whose home is ``home``: none of the
    test session's Ray settings, only what ``env_changes`` adds."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_", "THREADBOUND_")) and k not in ("PYTHONPATH", "XDG_STATE_HOME")}
    env.update(HOME=str(home), **env_changes)
    return subprocess.run([sys.executable, "-m", "threadbound.runtime.cli", *argv], env=env, capture_output=True,
                          text=True, timeout=100)


@pytest.fixture
def cluster():
    return os.environ["RAY_ADDRESS"]  # the session's Ray, token auth on, its token in a temp file


def test_the_token_in_the_users_home_is_found_without_any_setting(tmp_path, cluster):
    # Given: the cluster's token where Ray keeps it, RAY_AUTH_MODE unset
    (tmp_path / ".ray").mkdir()
    shutil.copy(os.environ["RAY_AUTH_TOKEN_PATH"], tmp_path / ".ray" / "auth_token")
    # When: another shell asks for a pool's tasks at the cluster's address
    proc = shell(tmp_path, "tasks", "--address", cluster, "--name", "no-such-pool")
    # Then: it got in (the pool is what is missing) and printed nothing of Ray's own
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert proc.stderr.startswith("threadbound: no pool named 'no-such-pool' in namespace 'threadbound' on this Ray")


@pytest.mark.parametrize("token", [None, "0123456789abcdef" * 4])
def test_a_refused_token_is_reported_as_authentication_with_the_fix(tmp_path, cluster, token):
    env = {}
    if token:
        (tmp_path / "wrong").write_text(token)
        env["RAY_AUTH_TOKEN_PATH"] = str(tmp_path / "wrong")
    proc = shell(tmp_path, "health", "--address", cluster, **env)
    assert proc.returncode == 2
    assert "refused this client: token authentication failed" in proc.stderr
    assert "ray get-auth-token" in proc.stderr and "RAY_AUTH_TOKEN" in proc.stderr
    assert "no Ray cluster answers" not in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.splitlines()) == 2  # the error, once: not Ray's retry lines


def test_rays_token_notice_goes_to_the_log_and_to_no_terminal_even_with_verbose(tmp_path, cluster):
    (tmp_path / ".ray").mkdir()
    shutil.copy(os.environ["RAY_AUTH_TOKEN_PATH"], tmp_path / ".ray" / "auth_token")
    quiet = shell(tmp_path, "tasks", "--address", cluster, "--name", "none")
    loud = shell(tmp_path, "tasks", "--address", cluster, "--name", "none", "-v")
    # Ray's notice that token authentication is on (the safe default) is kept in the log
    # file with Ray's other lines, and shown on no terminal, not even with -v
    assert "Token authentication is enabled" not in quiet.stderr
    assert "Token authentication is enabled" not in loud.stderr
    log = tmp_path / ".local" / "state" / "threadbound" / "logs" / "threadbound.log"
    assert "Token authentication is enabled" in log.read_text()
