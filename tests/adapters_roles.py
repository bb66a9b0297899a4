"""Adapter roles the adapters' tests run on a real pool (importable by agent actors and by
driver processes: tests/ is on their PYTHONPATH). No framework is imported at module level."""

from __future__ import annotations

import operator
import os
import time
from typing import Annotated, TypedDict

from threadbound.agents.adapters import LangGraphRole, MiniSweAgent, OpenAIAgentsRole, import_openai_agents


# -- mini-swe-agent ----------------------------------------------------------------------------

class Swe(MiniSweAgent):
    settings = {"step_limit": 8, "command_timeout_s": 30}


# -- the OpenAI Agents SDK ----------------------------------------------------------------------

def calculator():
    sdk = import_openai_agents()

    @sdk.function_tool
    def add(a: int, b: int) -> int:
        """Add two whole numbers."""
        return a + b

    return sdk.Agent(name="calculator", instructions="Use the add tool, then say the sum.", tools=[add])


def poet():
    sdk = import_openai_agents()
    return sdk.Agent(name="poet", instructions="Answer in one line.")


def sleeper():
    sdk = import_openai_agents()

    @sdk.function_tool
    def wait_forever() -> str:
        """Wait for something that never comes."""
        time.sleep(3600)
        return "never"

    return sdk.Agent(name="sleeper", instructions="Wait.", tools=[wait_forever])


class Calc(OpenAIAgentsRole):
    agent = calculator
    agents = {"poet": poet, "sleeper": sleeper}
    settings = {"max_turns": 4}


# -- LangGraph ----------------------------------------------------------------------------------

class Steps(TypedDict, total=False):
    messages: Annotated[list, operator.add]
    log: Annotated[list, operator.add]


def _record(ctx, node: str) -> None:
    mark = ctx.inputs.get("mark")
    if mark:
        with open(os.path.join(mark, "nodes.log"), "a") as fh:
            fh.write(f"{node}\n")


def talker(model):
    """One node that asks the task's model (its chunks are the step's tokens), then a plain one."""
    from langgraph.graph import END, START, StateGraph

    g = StateGraph(Steps)
    g.add_node("think", lambda s: {"messages": [model.invoke(s["messages"])], "log": ["think"]})
    g.add_node("done", lambda s: {"log": ["done"]})
    g.add_edge(START, "think")
    g.add_edge("think", "done")
    g.add_edge("done", END)
    return g.compile()


def three_rounds(ctx):
    """plan -> edit -> check, pausing after plan and after edit: one node per round. ``edit``
    waits for ``<mark>/gate`` (so a test can kill the pool while it runs)."""
    from langgraph.graph import END, START, StateGraph

    def plan(s):
        _record(ctx, "plan")
        return {"log": ["plan"]}

    def edit(s):
        _record(ctx, "edit-start")
        gate = os.path.join(ctx.inputs["mark"], "gate")
        for _ in range(1200):
            if os.path.exists(gate):
                break
            time.sleep(0.05)
        _record(ctx, "edit")
        return {"log": ["edit"]}

    def check(s):
        _record(ctx, "check")
        return {"log": ["check"]}

    g = StateGraph(Steps)
    for name, fn in (("plan", plan), ("edit", edit), ("check", check)):
        g.add_node(name, fn)
    g.add_edge(START, "plan")
    g.add_edge("plan", "edit")
    g.add_edge("edit", "check")
    g.add_edge("check", END)
    return g.compile(interrupt_after=["plan", "edit"])


def stuck(model):
    """Streams the model's answer, then hangs in a node that never returns."""
    from langgraph.graph import END, START, StateGraph

    def hang(s):
        time.sleep(3600)
        return {}

    g = StateGraph(Steps)
    g.add_node("think", lambda s: {"messages": [model.invoke(s["messages"])]})
    g.add_node("hang", hang)
    g.add_edge(START, "think")
    g.add_edge("think", "hang")
    g.add_edge("hang", END)
    return g.compile()


def chatty(model):
    """Three nodes in a row, each asking the task's model."""
    from langgraph.graph import END, START, StateGraph

    g = StateGraph(Steps)
    previous = START
    for name in ("one", "two", "three"):
        g.add_node(name, lambda s, name=name: {"messages": [model.invoke(s["messages"])], "log": [name]})
        g.add_edge(previous, name)
        previous = name
    g.add_edge(previous, END)
    return g.compile()


class Talk(LangGraphRole):
    graph = talker


class ThreeRounds(LangGraphRole):
    graph = three_rounds


class Stuck(LangGraphRole):
    graph = stuck
    graphs = {"talker": talker, "chatty": chatty}
