"""Agents for tests, driven by the task's inputs so one class covers many behaviours.

``ctx.inputs[role]`` (or ``ctx.inputs["*"]``) may hold:
    tokens: int            tokens to stream (default 3)
    token_sleep_s: float   pause before each token
    hang_on: [attempts]    sleep for an hour on these attempts (after streaming tokens)
    crash_on: [attempts]   exit the process on these attempts (after streaming tokens)
    transient_on: [attempts] raise TransientError on these attempts
    error_on: [attempts]   raise ValueError on these attempts
    sleep_s: float         sleep before returning (holds the slot)
    rounds: int            request another round until this round
    emit: int              custom events to emit between tokens
    mark: str              a directory: every call appends its idempotency key to runs.log
                           (counts executions), and makes one external effect idempotent
                           by that key (creates effects/<key> unless it exists)
"""

from __future__ import annotations

import os
import time

from threadbound.agents import Agent, TransientError


def mark(directory: str, key: str) -> None:
    """Count a run of a step (runs.log gets its idempotency key) and make one external
    effect idempotent by that key (effects/<key> is created unless it exists)."""
    with open(os.path.join(directory, "runs.log"), "a") as fh:
        fh.write(key + "\n")
    effects = os.path.join(directory, "effects")
    os.makedirs(effects, exist_ok=True)
    try:
        fd = os.open(os.path.join(effects, key.replace(":", "_").replace("/", "_")),
                     os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    except FileExistsError:
        pass  # done by an earlier run of this very step: do not repeat it
    else:
        os.write(fd, b"1")
        os.close(fd)


class Scripted(Agent):
    def __init__(self) -> None:
        self.calls = 0  # committed state: survives actor replacement through set_state

    def get_state(self):
        return {"calls": self.calls}

    def set_state(self, state):
        self.calls = state["calls"]

    def step(self, ctx):
        spec = dict(ctx.inputs.get("*", {}))
        spec.update(ctx.inputs.get(ctx.role, {}))
        for i in range(spec.get("tokens", 3)):
            if spec.get("token_sleep_s"):
                time.sleep(spec["token_sleep_s"])
            if i < spec.get("emit", 0):
                ctx.emit("progress", {"i": i})
            yield f"{ctx.role}{i} "
        if ctx.attempt in spec.get("hang_on", []):
            time.sleep(3600)
        if ctx.attempt in spec.get("crash_on", []):
            os._exit(3)
        if ctx.attempt in spec.get("transient_on", []):
            raise TransientError("service busy", retry_after_s=spec.get("retry_after_s"))
        if ctx.attempt in spec.get("error_on", []):
            raise ValueError("bad thing")
        if spec.get("sleep_s"):
            time.sleep(spec["sleep_s"])
        if ctx.round < spec.get("rounds", 0):
            ctx.request_round(f"{ctx.role} wants round {ctx.round + 1}")
        self.calls += 1
        if spec.get("mark"):
            mark(spec["mark"], ctx.idempotency_key)
        return {"role": ctx.role, "pid": os.getpid(), "calls": self.calls, "round": ctx.round,
                "attempt": ctx.attempt, "feedback": ctx.feedback}


class Asker(Agent):
    """Calls the pool's model ``inputs["asks"]`` times (default 1) and reports what it saw."""

    def step(self, ctx):
        texts = []
        for _ in range(int(ctx.inputs.get("asks", 1))):
            texts.append((yield from ctx.ask([{"role": "user", "content": ctx.goal}])))
        return {"text": "".join(texts), "level": ctx.level, "streaming": ctx.streaming,
                "tokens_used": ctx.tokens_used}


class NotAnAgent:
    def step(self, ctx):
        return None


def shouting_model(messages, **options):
    """A callable model backend: streams the last message back in capitals."""
    for word in messages[-1]["content"].upper().split():
        yield word + " "


class Approver(Agent):
    """Approves ``inputs["proposal"]`` (path -> text, None: delete) for write-back, as a
    reviewer approves a change."""

    def step(self, ctx):
        return {"apply": dict(ctx.inputs["proposal"])}


class Questioner(Agent):
    """Asks a person ``inputs[role]["questions"]`` (payloads, in order) with ``ctx.interrupt``.

    ``mark``: a directory: every run of the step appends its idempotency key to runs.log
    before asking (code before an interrupt runs again on re-entry), and creates
    effects/<key> unless it exists (a side effect made idempotent by that key).
    ``tokens``: tokens to stream before asking; ``sleep_s``: pause before asking."""

    def step(self, ctx):
        spec = ctx.inputs.get(ctx.role, {})
        for i in range(spec.get("tokens", 2)):
            yield f"{ctx.role}{i} "
        if spec.get("sleep_s"):
            time.sleep(spec["sleep_s"])
        if spec.get("mark"):
            mark(spec["mark"], ctx.idempotency_key)
        answers = [ctx.interrupt(q) for q in spec.get("questions", [{"question": "go on?"}])]
        return {"answers": answers, "key": ctx.idempotency_key, "attempt": ctx.attempt, "round": ctx.round}


class Listener(Agent):
    """Reports the messages it sees (``ctx.inbox``); streams ``tokens`` tokens with
    ``token_sleep_s`` between them; asks for round 2 when a message says "again"."""

    def step(self, ctx):
        spec = ctx.inputs.get(ctx.role, {})
        for i in range(spec.get("tokens", 2)):
            if spec.get("token_sleep_s"):
                time.sleep(spec["token_sleep_s"])
            yield f"{ctx.role}{i} "
        if ctx.round == 1 and "again" in ctx.inbox:
            ctx.request_round("a person said again")
        return {"inbox": list(ctx.inbox), "round": ctx.round}


class Reviewing(Agent):
    """Two rounds, as a tester and reviewer would: round 1 streams a verdict, reports
    failing test counts (a ``test_result`` event, as the built-in tester emits) and asks
    for another round; round 2 streams another text, reports passing tests and returns a
    ``diff`` (``inputs["diff"]``) and an ``apply`` map (``inputs["proposal"]``)."""

    def step(self, ctx):
        if ctx.round == 1:
            yield "VERDICT: REQUEST_CHANGES"
            ctx.emit("test_result", {"ok": False, "passed": 2, "failed": 1, "errors": 0, "killed": None,
                                     "summary": "2 passed, 1 failed"})
            ctx.request_round("one test fails")
            return {"round": 1}
        yield "The change is small"
        ctx.emit("test_result", {"ok": True, "passed": 3, "failed": 0, "errors": 0, "killed": None,
                                 "summary": "3 passed"})
        return {"diff": ctx.inputs.get("diff", ""), "apply": dict(ctx.inputs.get("proposal", {}))}
