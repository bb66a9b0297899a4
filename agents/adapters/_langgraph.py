"""``LangGraphRole``: a compiled LangGraph graph as a threadbound role.

Each step runs the graph on a thread of its own (a ``thread_id`` per task and role) with
``stream_mode=["messages", "updates"]``: message chunks become the step's tokens, each
node's update a ``node_update`` event. The graph's checkpoint is the role's committed
state: the next step (a new round, or the same step on a resumed pool) restores it into a
fresh in-memory checkpointer, so the graph continues from it -- where it paused
(``interrupt_before``/``interrupt_after``, ``interrupt()``) or, once it has finished, with
a new input on the same thread -- and no node that committed runs again.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Generator, Iterator

from ..base import StepContext
from ..errors import AgentError, BudgetExhausted
from ..models.base import count_tokens
from ._common import (
    LANGGRAPH, NODE_UPDATE, AdapterRole, check_budget, plain, positive_int, require, resolve_factory,
    settings_of, tokens_left,
)

DEFAULTS: dict[str, Any] = {
    "graph": None,             # the name of one of the role's ``graphs`` (a task never names code to import)
    "input": None,             # the graph's input on a fresh thread (default: the goal as a user message)
    "recursion_limit": 25,     # LangGraph's super-step limit for one step
    "continue_paused": True,   # a graph that paused at a breakpoint asks for another round, which continues it
}


def chat_model(ctx: StepContext):
    """A LangChain chat model on the task's model config (``ctx.model``): the graph's model
    calls then go to the same backend, level and budget as every role's. Text in, text out."""
    from langchain_core.language_models import BaseChatModel
    from langchain_core.messages import AIMessage, AIMessageChunk, convert_to_openai_messages
    from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult

    def options(stop: Any) -> dict[str, Any]:
        opts = {"agent": ctx.role, "task_id": ctx.task_id, "level": ctx.level, "round": ctx.round,
                "attempt": ctx.attempt, "goal": ctx.goal, "stream": ctx.streaming, **ctx.model_options}
        check_budget(ctx)
        left = tokens_left(ctx)
        if left is not None:
            opts["max_tokens"] = min(opts.get("max_tokens") or left, left)
        return opts

    def wire(messages: list) -> list[dict[str, str]]:
        out = []
        for m in convert_to_openai_messages(messages):
            content = m.get("content")
            if not isinstance(content, str):
                content = "".join(p.get("text", "") for p in content or [] if isinstance(p, dict))
            out.append({"role": m["role"] if m["role"] in ("system", "user", "assistant") else "user",
                        "content": content})
        return out

    class ThreadboundChatModel(BaseChatModel):
        @property
        def _llm_type(self) -> str:
            return "threadbound"

        def _generate(self, messages, stop=None, run_manager=None, **kwargs) -> ChatResult:
            if ctx.model is None:
                raise AgentError("this step has no model configured", task_id=ctx.task_id, agent=ctx.role)
            text = ctx.model.complete(wire(messages), **{**options(stop), "stream": False})
            return ChatResult(generations=[ChatGeneration(message=AIMessage(content=text))])

        def _stream(self, messages, stop=None, run_manager=None, **kwargs) -> Iterator[ChatGenerationChunk]:
            if ctx.model is None:
                raise AgentError("this step has no model configured", task_id=ctx.task_id, agent=ctx.role)
            for token in ctx.model.stream(wire(messages), **options(stop)):
                chunk = ChatGenerationChunk(message=AIMessageChunk(content=token))
                if run_manager is not None:
                    run_manager.on_llm_new_token(token, chunk=chunk)
                yield chunk

    return ThreadboundChatModel(disable_streaming=not ctx.streaming)


def _call_factory(factory: Callable, ctx: StepContext) -> Any:
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    kwargs: dict[str, Any] = {}
    if "model" in params:
        kwargs["model"] = chat_model(ctx)
    if "ctx" in params:
        kwargs["ctx"] = ctx
    return factory(**kwargs)


class LangGraphRole(AdapterRole):
    """Runs a compiled LangGraph graph as a role; its checkpoint is the committed state.

    Set ``graph`` to a function (or ``"package.module:function"``) that returns the compiled
    graph; it gets ``model=`` (a LangChain chat model on the task's model config) and
    ``ctx=`` if it has parameters of those names. ``graphs`` maps names a task may pick with
    ``inputs[<role>]["graph"]``. Settings (class attribute ``settings``, then
    ``inputs[<role>]``): ``input`` (the input of a fresh thread; default
    ``{"messages": [{"role": "user", "content": <goal>}]}``), ``recursion_limit`` and
    ``continue_paused`` (default true: a graph that stopped at a breakpoint,
    ``interrupt_before``/``interrupt_after``, asks for another round, which continues it).
    Override :meth:`make_input` for another input.

    Output: ``values`` (the graph's state as plain data), ``next`` (nodes it paused before),
    ``updates`` (node updates this step). Needs ``pip install -e '.[langgraph]'``.

    Examples:
        >>> def build():
        ...     from langgraph.graph import StateGraph, START, END
        ...     g = StateGraph(dict)
        ...     g.add_node("hello", lambda state: {"greeting": "hello"})
        ...     g.add_edge(START, "hello"); g.add_edge("hello", END)
        ...     return g.compile()
        >>> class Hello(LangGraphRole):
        ...     graph = build
    """

    extra = LANGGRAPH
    graph: Any = None
    graphs: dict[str, Any] = {}
    settings: dict[str, Any] = {}

    def __init__(self) -> None:
        # The committed graph state: {"checkpoint", "metadata"}, each [type, bytes] as the
        # checkpointer's serializer writes them (what LangGraph's own savers store).
        self.checkpoint: dict[str, Any] | None = None

    def get_state(self) -> Any:
        return self.checkpoint

    def set_state(self, state: Any) -> None:
        self.checkpoint = state if isinstance(state, dict) and "checkpoint" in state else None

    def make_input(self, ctx: StepContext, conf: dict[str, Any], fresh: bool) -> Any:
        """The graph's input for this step: ``conf["input"]`` on a fresh thread, else the goal
        (or, on a thread that already ran, last round's feedback) as a user message."""
        if fresh and conf["input"] is not None:
            return conf["input"]
        text = "\n".join(ctx.feedback) if (ctx.feedback and not fresh) else ctx.goal
        return {"messages": [{"role": "user", "content": text}]}

    def step(self, ctx: StepContext) -> Generator[str, None, dict[str, Any]]:
        require(self.extra, ctx)
        from langgraph.checkpoint.memory import InMemorySaver

        conf = settings_of(ctx, DEFAULTS, dict(self.settings))
        limit = positive_int(ctx, conf, "recursion_limit", 10_000)
        factory = resolve_factory(ctx, "graph", type(self).graph, dict(self.graphs), conf["graph"])
        graph = _call_factory(factory, ctx)
        if not (hasattr(graph, "stream") and hasattr(graph, "copy") and hasattr(graph, "get_state")):
            raise AgentError(f"the {ctx.role} role's graph function returned {type(graph).__name__}, not a compiled "
                             "LangGraph graph (call .compile() on the StateGraph)", task_id=ctx.task_id, agent=ctx.role)
        saver = InMemorySaver()
        graph = graph.copy(update={"checkpointer": saver})
        config = {"configurable": {"thread_id": f"{ctx.task_id}/{ctx.role}", "checkpoint_ns": ""},
                  "recursion_limit": limit}
        fresh = self.checkpoint is None
        if not fresh:
            checkpoint = saver.serde.loads_typed(tuple(self.checkpoint["checkpoint"]))
            metadata = saver.serde.loads_typed(tuple(self.checkpoint["metadata"]))
            saver.put(config, checkpoint, metadata, checkpoint.get("channel_versions", {}))
        paused = bool(not fresh and graph.get_state(config).next)
        stream_input = None if paused else self.make_input(ctx, conf, fresh)
        updates = 0
        for mode, chunk in graph.stream(stream_input, config, stream_mode=["messages", "updates"]):
            if mode == "messages":
                message, _meta = chunk
                text = message.content if isinstance(message.content, str) else ""
                if not text or getattr(message, "type", "") not in ("AIMessageChunk", "ai"):
                    continue
                n = 1 if ctx.streaming else count_tokens(text)
                if ctx.tokens_left is not None and ctx.tokens_used + n > ctx.tokens_left:  # a model of the graph's own
                    raise BudgetExhausted(
                        f"task {ctx.task_id} has spent its cost budget ({ctx.tokens_used} tokens this step); "
                        "raise the task's cost_budget to let it go on", task_id=ctx.task_id, agent=ctx.role)
                ctx.tokens_used += n
                yield text
            elif mode == "updates" and isinstance(chunk, dict):
                for node, update in chunk.items():
                    updates += 1
                    ctx.emit(NODE_UPDATE, {"node": str(node), "update": plain(update)})
        snap = graph.get_state(config)
        tup = saver.get_tuple(config)
        if tup is not None:  # in LangGraph's own serialized form: the supervisor needs no LangGraph to hold it
            self.checkpoint = {"checkpoint": list(saver.serde.dumps_typed(tup.checkpoint)),
                               "metadata": list(saver.serde.dumps_typed(tup.metadata))}
        if snap.next and conf["continue_paused"]:
            ctx.request_round(f"the graph paused before {', '.join(snap.next)}; the next round continues it")
        return {"values": plain(snap.values), "next": list(snap.next), "updates": updates}

