"""The built-in roles: coder, tester, reviewer.

Each asks the task's model for its part and streams the answer. (The workspace
editing, sandboxed test runs and static review arrive with the agents work.)
"""

from __future__ import annotations

from typing import Any, Generator

from .base import Agent, StepContext


class _ModelRole(Agent):
    instruction = ""

    def step(self, ctx: StepContext) -> Generator[str, None, Any]:
        prompt = f"{self.instruction}\n\nGoal: {ctx.goal}"
        if ctx.feedback:
            prompt += "\n\nFeedback from the last round:\n" + "\n".join(ctx.feedback)
        text = yield from ctx.ask([{"role": "system", "content": f"You are the {ctx.role}."},
                                   {"role": "user", "content": prompt}])
        return {"text": text}


class Coder(_ModelRole):
    instruction = "Propose the code changes that achieve the goal."


class Tester(_ModelRole):
    instruction = "Say how to test the change."


class Reviewer(_ModelRole):
    instruction = "Review the change."
