"""An agent for tests of pools shared by several clients: it holds its task open until a
file appears, so a test decides, by creating files, which task ends first."""

from __future__ import annotations

import os
import time

from threadbound.agents import Agent


class Gate(Agent):
    """Streams one token, then waits (at most ``gate_s``, 240 s) until the file its
    task's goal names exists; returns whether it did."""

    gate_s = 240.0

    def step(self, ctx):
        yield "waiting\n"  # a whole line: run shows an agent's text a line at a time
        deadline = time.monotonic() + self.gate_s
        while not os.path.exists(ctx.goal) and time.monotonic() < deadline:
            time.sleep(0.1)
        return {"opened": os.path.exists(ctx.goal), "pid": os.getpid()}
