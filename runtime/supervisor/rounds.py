"""A task's rounds over its agent graph.

Every round runs each role once. A role starts when the roles it comes after
(``Task.after``) have committed in this round; roles that do not wait for each other
run at the same time, each on its own bound actor, at most as many at once as the task
holds slots (``max_agents_per_task``); a ready role waits for a slot, it never fails
for want of one. The round ends when every role has committed. If any role asked for
another round (``ctx.request_round``), the next round starts with that feedback;
otherwise the task succeeds, and with ``inputs={"apply": True}`` the change its agents
approved is written back to the user's workspace.

A step that fails for good ends the task, and with it every other running step of the
task (their actors are killed by their attempts); so does a cancel or the task's
timeout. After a resume, a round continues with the roles not committed in it.

A person in the loop: a step that calls ``ctx.interrupt`` stops and its role is parked
until answered; the other roles go on where the graph lets them. When nothing can run
but parked roles, the task's run ends ``waiting`` (:class:`TaskWaits`) and gives its
actors back; an answer queues it again, and the round continues with the roles not
committed (the answered step runs again from its beginning). With
``inputs={"approve": True}`` a round that would succeed first asks a person to approve
the change: approve applies it and succeeds, reject fails the task with the person's
reason, a text answer is feedback for another round.
"""

from __future__ import annotations

import asyncio
import logging
import math
from pathlib import Path
from typing import Any

from threadbound.agents import events as ev
from threadbound.agents.copies import copy_path
from threadbound.agents.workspace import Workspace, WorkspaceError

from ..task import CANCELLED, FAILED, MAX_ROUNDS, RUNNING, SUCCEEDED, TIMED_OUT
from .attempt import StepEnv, run_step
from .binding import WorkspaceLost
from .task_state import TaskEnds, TaskRecord, TaskWaits

log = logging.getLogger("threadbound.rounds")


async def run_task(env: StepEnv, ts: TaskRecord) -> None:
    """The whole run of an admitted task, from ``running`` to its final status."""
    timeout = _seconds(ts.spec.task_timeout_s, env.cfg.task_timeout_s)
    clock, run, life = env.clock, ts.run, env.life
    run.started_at = clock.monotonic()
    try:  # the time it waited for a person before does not count, the time it ran does
        await clock.wait_for(_rounds(env, ts), max(0.0, timeout - ts.ran_s))
    except TaskWaits:
        ts.ran_s += clock.monotonic() - run.started_at
        try:
            life.task_waits(ts)
        except Exception as exc:  # noqa: BLE001  -- a task that cannot wait must end, not hang deaf
            log.exception("task %s could not begin to wait", ts.id)
            life.finish(ts, FAILED, error=f"internal error while the task began to wait for a person: {exc!r}",
                        reason="internal")
    except asyncio.TimeoutError:
        life.finish(ts, TIMED_OUT, limit_s=timeout, elapsed_s=ts.ran_s + clock.monotonic() - run.started_at,
                    reason="timeout", error=f"task {ts.id} exceeded its timeout of {timeout:.3f}s")
    except asyncio.CancelledError:
        reason = run.cancel_reason or "shutdown"
        if reason == "degraded":
            life.finish(ts, FAILED, error=env.health.opted_out(ts), reason=reason)
        else:
            life.finish(ts, CANCELLED, error=f"cancelled ({reason})", reason=reason)
    except TaskEnds as end:
        life.finish(ts, end.status, error=str(end), reason=end.reason)
    except Exception as exc:  # a bug of ours, or a journal that cannot be written: fail the task loudly
        log.exception("task %s failed inside the supervisor", ts.id)
        life.finish(ts, FAILED, error=f"internal error: {exc!r}", reason="internal")
    finally:
        life.task_ended(ts)


def _seconds(value: Any, fallback: float) -> float:
    """A task's own timeout in seconds (validated at submit); one that is not a finite
    number a float can hold counts as the config's ``fallback``, so the supervisor's
    arithmetic with it can never raise."""
    try:
        seconds = float(value or fallback)
    except (OverflowError, TypeError, ValueError):
        return float(fallback)
    return seconds if math.isfinite(seconds) and seconds > 0 else float(fallback)


async def _rounds(env: StepEnv, ts: TaskRecord) -> None:
    env.emit(ts, RUNNING, None)
    if ts.level is None:
        await env.budget.choose_level(ts, env.emit)
    max_rounds = ts.spec.max_rounds or ts.max_rounds or env.cfg.max_rounds
    if isinstance(max_rounds, bool) or not isinstance(max_rounds, int) or not 0 < max_rounds <= MAX_ROUNDS:
        max_rounds = env.cfg.max_rounds  # validated at submit; never a loop without end (e.g. 1e400 = inf)
    rnd = max(ts.round, 1)
    while rnd <= max_rounds:
        if ts.round != rnd:
            env.emit(ts, ev.ROUND_STARTED, None, round=rnd, feedback=list(ts.feedback))
        try:
            await run_round(env, ts, rnd)
        except WorkspaceLost as lost:  # its copy died with a node: the round again, from the original
            env.emit(ts, ev.WORKSPACE_LOST, None, round=rnd, lost_node=lost.lost, node=lost.node,
                     discarded=list(ts.committed))
            continue
        if not ts.requests and ts.spec.inputs.get("approve"):
            await approval(env, ts, rnd)  # waits for a person; may add feedback to ts.requests
        if not ts.requests:
            data = await _apply(env, ts)
            env.life.finish(ts, SUCCEEDED, **data)
            return
        ts.feedback = list(ts.requests)
        rnd += 1
    raise TaskEnds(FAILED, f"no success after {max_rounds} round(s); last feedback: "
                   + "; ".join(ts.feedback)[:500], reason="rounds")


async def run_round(env: StepEnv, ts: TaskRecord, rnd: int) -> None:
    """Run every role of the round not yet committed, in graph order, in parallel where
    the graph allows and the task's slots suffice."""
    graph, run = ts.graph, ts.run
    width = max(1, len(run.slots))
    parked = asking(ts)  # roles whose step waits for a person's answer
    waiting = [r for r in ts.spec.agents if r not in ts.committed and r not in parked]
    steps: dict[asyncio.Task, str] = {}
    try:
        while True:
            answered = parked - asking(ts)
            if answered:  # answered meanwhile: they run again (in list order, as they were)
                parked -= answered
                waiting = [r for r in ts.spec.agents if r in answered or r in waiting]
            for role in list(waiting):
                if len(steps) >= width:
                    break
                if all(d in ts.committed for d in graph.get(role, ())):
                    waiting.remove(role)
                    step = asyncio.get_running_loop().create_task(run_step(env, ts, role, rnd),
                                                                  name=f"{role}/{ts.id}")
                    steps[step] = role
                    run.running[role] = step
            if not steps:
                if parked:  # nothing can run until a person answers
                    raise TaskWaits
                if waiting:  # cannot happen with a validated graph
                    raise TaskEnds(FAILED, f"roles {waiting} of task {ts.id} wait for roles that never run",
                                   reason="internal")
                return
            done, _ = await asyncio.wait(steps, return_when=asyncio.FIRST_COMPLETED)
            failure: BaseException | None = None
            for step in done:
                role = steps.pop(step)
                run.running.pop(role, None)
                exc = step.exception() if not step.cancelled() else asyncio.CancelledError()
                if isinstance(exc, TaskWaits):
                    parked.add(role)
                elif exc is not None and failure is None:
                    failure = exc
            if failure is not None:
                raise failure
    finally:
        for step in steps:
            step.cancel()
        if steps:
            await asyncio.gather(*steps, return_exceptions=True)
        run.running.clear()


def asking(ts: TaskRecord) -> set[str]:
    """The roles whose step asked a person and has no answer yet."""
    return {a["role"] for a in ts.asks.values() if a["role"]}


# -- approval before apply ----------------------------------------------------------------

APPROVAL_KEY = ""  # the approval's answers, in ts.answers (no role asks it: the runtime does)
_YES = frozenset({"approve", "approved", "yes", "y"})
_NO = frozenset({"reject", "rejected", "no", "n"})


def decision(value: Any) -> tuple[str, str] | None:
    """What an answer to an approval says: ``("approve", "")``, ``("reject", reason)`` or
    ``("feedback", text)``; None if it says none of these.

    ``True``, ``"approve"``, ``{"approve": true}``: approve. ``False``, ``"reject"``,
    ``{"approve": false, "reason": "..."}``: reject. Any other text, or
    ``{"feedback": "..."}``: another round with that feedback."""
    if isinstance(value, bool):
        return ("approve", "") if value else ("reject", "")
    if isinstance(value, str) and value.strip():
        word = value.strip().lower()
        if word in _YES:
            return "approve", ""
        if word in _NO:
            return "reject", ""
        return "feedback", value.strip()
    if isinstance(value, dict):
        reason = value.get("reason", "")
        if not isinstance(reason, str):
            return None
        if set(value) <= {"approve", "reason"} and isinstance(value.get("approve"), bool):
            return ("approve", reason) if value["approve"] else ("reject", reason)
        if set(value) == {"feedback"} and isinstance(value["feedback"], str) and value["feedback"].strip():
            return "feedback", value["feedback"].strip()
    return None


def approval_payload(ts: TaskRecord) -> dict[str, Any]:
    """What a person sees when asked to approve: the diff, the files, what is refused."""
    files, refused = proposed_change(ts)
    diffs = [out["diff"] for role in ts.spec.agents
             if isinstance(out := ts.outputs.get(role), dict) and isinstance(out.get("diff"), str) and out["diff"]]
    return {"kind": "approval", "question": "approve this change?", "diff": "\n".join(diffs)[:200_000],
            "files": sorted(files), "refused": refused, "apply": bool(ts.spec.inputs.get("apply")),
            "round": ts.round, "answers": "approve | reject (with a reason) | a text: feedback for another round"}


async def approval(env: StepEnv, ts: TaskRecord, rnd: int) -> None:
    """A round that would succeed asks a person first: returns on approval, adds the
    person's text to ``ts.requests`` (another round), or ends the task on a reject."""
    answers = ts.answers.get(APPROVAL_KEY)
    if not answers:
        if not any(a["role"] is None for a in ts.asks.values()):
            env.emit(ts, ev.INPUT_REQUESTED, None, request=ts.asked + 1, round=rnd, index=0,
                      payload=approval_payload(ts))
        raise TaskWaits
    said = decision(answers[0]) or ("reject", f"an answer that says neither approve, reject nor feedback: "
                                              f"{answers[0]!r:.200}")
    if said[0] == "reject":
        raise TaskEnds(FAILED, f"task {ts.id}: the change was rejected: {said[1] or 'no reason given'}",
                       reason="rejected")
    if said[0] == "feedback":
        ts.requests = ts.requests + [f"A person asked for changes: {said[1]}"]


def proposed_change(ts: TaskRecord) -> tuple[dict[str, str | None], list[str]]:
    """The files the task's agents approved for write-back (an output's ``apply`` map:
    path -> text, or None to delete), and the paths two agents disagree on (refused)."""
    files: dict[str, str | None] = {}
    conflicts: list[str] = []
    for role in ts.spec.agents:
        out = ts.outputs.get(role)
        change = out.get("apply") if isinstance(out, dict) else None
        if not isinstance(change, dict):
            continue
        for rel, text in change.items():
            if not isinstance(rel, str) or not (text is None or isinstance(text, str)):
                conflicts.append(f"{rel!r}: not a path and a text (from {role}); not applied")
            elif rel in files and files[rel] != text:
                conflicts.append(f"{rel}: two agents approved different contents; not applied")
            else:
                files[rel] = text
    for bad in conflicts:
        files.pop(bad.split(":", 1)[0], None)
    return files, conflicts


async def _apply(env: StepEnv, ts: TaskRecord) -> dict[str, Any]:
    """At a successful end, with ``inputs.apply``: write the approved change back."""
    if not (ts.spec.inputs.get("apply") and ts.spec.workspace):
        return {}
    files, refused = proposed_change(ts)
    ws = Workspace(Path(ts.spec.workspace), copy_path(ts.id))
    try:
        touched, more = await asyncio.to_thread(ws.write_files, files)
    except (WorkspaceError, OSError) as exc:
        touched, more = [], [f"{ts.spec.workspace}: {exc}; nothing applied"]
    refused = refused + more
    env.emit(ts, ev.APPLIED, None, applied=touched, refused=refused)
    return {"applied": touched, "refused": refused}
