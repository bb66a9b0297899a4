"""``OpenAIAgentsRole``: an OpenAI Agents SDK agent as a threadbound role.

The step runs ``Runner.run_streamed`` on the role's agent: text deltas become the step's
tokens, tool calls and their outputs ``tool_call``/``tool_result`` events, a handoff an
``agent_updated`` event. The SDK's model is the task's model config:

- ``model: {backend: openai, ...}``: the SDK's chat-completions model on an ``AsyncOpenAI``
  client with the config's ``base_url``, ``api_key`` and ``timeout_s`` (no retries of its
  own: the pool's retry policy retries), the level's model name and temperature; tools work
  as the server supports them. A 429 is a ``RateLimitError`` with the server's Retry-After,
  5xx and timeouts ``TransientModelError``, as for every role.
- any other backend (simulated, callable, local): the same client over a transport that
  answers chat completions with the threadbound backend in this process (text only: such a
  model does not call tools).

The SDK's tracing is disabled (its exporter would send traces over the network). The run's
conversation (``to_input_list()``) is the committed state: the next round continues it.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from typing import Any, Callable

from ..base import StepContext
from ..errors import AgentError, BudgetExhausted, ModelError, RateLimitError, TransientModelError
from ..models.base import count_tokens
from ._common import (
    AGENT_UPDATED, OPENAI_AGENTS, TOOL_CALL, TOOL_RESULT, AdapterRole, check_budget, goal_text, import_openai_agents,
    plain, positive_int, require, resolve_factory, settings_of, token_sink, tokens_left, trimmed,
)

DEFAULTS: dict[str, Any] = {
    "agent": None,      # the name of one of the role's ``agents`` (a task never names code to import)
    "max_turns": 10,    # model turns in one step (the SDK's max_turns)
}
_END = object()


def _backend_transport(ctx: StepContext, failures: list[BaseException]):
    """An httpx transport that answers ``POST .../chat/completions`` with ``ctx.model``."""
    import httpx

    class _Stream(httpx.AsyncByteStream):
        def __init__(self, body: dict[str, Any]) -> None:
            self.body = body

        async def __aiter__(self):
            model = self.body.get("model") or "threadbound"
            head = {"id": "threadbound", "object": "chat.completion.chunk", "created": int(time.time()), "model": model}
            tokens = iter(ctx.model.stream(_messages(self.body), **_options(ctx, self.body, True)))
            while True:
                try:
                    token = await asyncio.to_thread(next, tokens, _END)
                except BaseException as exc:
                    failures.append(exc)
                    raise
                if token is _END:
                    break
                chunk = {**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": token},
                                              "finish_reason": None}]}
                yield f"data: {json.dumps(chunk)}\n\n".encode()
            end = {**head, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
            yield f"data: {json.dumps(end)}\n\ndata: [DONE]\n\n".encode()

    class BackendTransport(httpx.AsyncBaseTransport):
        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            if not request.url.path.endswith("/chat/completions"):
                return httpx.Response(404, json={"error": {"message": f"{request.url.path}: only chat completions"}})
            body = json.loads(await request.aread())
            if body.get("stream"):
                return httpx.Response(200, headers={"content-type": "text/event-stream"}, stream=_Stream(body))
            try:
                text = await asyncio.to_thread(ctx.model.complete, _messages(body), **_options(ctx, body, False))
            except BaseException as exc:
                failures.append(exc)
                raise
            return httpx.Response(200, json={
                "id": "threadbound", "object": "chat.completion", "created": int(time.time()),
                "model": body.get("model") or "threadbound",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]})

    return BackendTransport()


def _messages(body: dict[str, Any]) -> list[dict[str, str]]:
    out = []
    for m in body.get("messages", []):
        content = m.get("content")
        if not isinstance(content, str):
            content = "".join(p.get("text", "") for p in content or [] if isinstance(p, dict))
        role = m.get("role")
        out.append({"role": role if role in ("system", "user", "assistant") else "user", "content": content})
    return out


def _options(ctx: StepContext, body: dict[str, Any], stream: bool) -> dict[str, Any]:
    opts = {"agent": ctx.role, "task_id": ctx.task_id, "level": ctx.level, "round": ctx.round,
            "attempt": ctx.attempt, "goal": ctx.goal, **ctx.model_options, "stream": stream}
    for key in ("max_tokens", "temperature"):
        if body.get(key) is not None:
            opts[key] = body[key]
    if body.get("max_completion_tokens") is not None:
        opts["max_tokens"] = body["max_completion_tokens"]
    return opts


def _client(ctx: StepContext, failures: list[BaseException]):
    """The ``AsyncOpenAI`` client and model name the SDK uses for this step."""
    import httpx
    from openai import AsyncOpenAI

    cfg = getattr(ctx.model, "config", None)
    if getattr(cfg, "backend", None) == "openai":
        base_url = (cfg.base_url or os.environ.get("OPENAI_BASE_URL") or "https://api.openai.com/v1").rstrip("/")
        api_key = cfg.api_key or os.environ.get("OPENAI_API_KEY") or "unused"
        timeout = float(getattr(cfg, "timeout_s", 60.0))
        client = AsyncOpenAI(base_url=base_url, api_key=api_key, timeout=timeout, max_retries=0)
        return client, ctx.model_options.get("model") or cfg.model, base_url
    if ctx.model is None:
        raise AgentError("this step has no model configured", task_id=ctx.task_id, agent=ctx.role)
    client = AsyncOpenAI(base_url="http://threadbound.backend/v1", api_key="unused", max_retries=0,
                         http_client=httpx.AsyncClient(transport=_backend_transport(ctx, failures)))
    return client, ctx.model_options.get("model") or getattr(ctx.model, "name", "threadbound"), "the task's model"


def _translate(exc: BaseException, where: str, ctx: StepContext) -> BaseException:
    """An ``openai`` error as the threadbound model error every role raises."""
    import openai

    fields = {"task_id": ctx.task_id, "agent": ctx.role}
    if isinstance(exc, openai.RateLimitError):
        value = exc.response.headers.get("Retry-After") if exc.response is not None else None
        try:
            retry_after = float(value) if value is not None else None
        except ValueError:
            retry_after = None
        return RateLimitError(f"model server {where} is rate limiting (429): {exc}", retry_after_s=retry_after, **fields)
    if isinstance(exc, openai.APIStatusError):
        if exc.status_code >= 500:
            return TransientModelError(f"model server {where} answered {exc.status_code}: {exc}", **fields)
        return ModelError(f"model server {where} refused the request ({exc.status_code}): {exc}", **fields)
    if isinstance(exc, openai.APIConnectionError):  # refused, reset, timed out
        return TransientModelError(f"cannot reach model server {where}: {exc}", **fields)
    return exc


class OpenAIAgentsRole(AdapterRole):
    """Runs an OpenAI Agents SDK agent as a role, streamed, on the task's model config.

    Set ``agent`` to a function (or ``"package.module:function"``) that returns the SDK
    ``Agent``; ``agents`` maps names a task may pick with ``inputs[<role>]["agent"]``.
    Settings (class attribute ``settings``, then ``inputs[<role>]``): ``max_turns``
    (default 10). The input is the goal (and last round's feedback, after the conversation
    so far). Output: ``final_output``, ``last_agent``, ``tool_calls``, ``turns``. Needs
    ``pip install -e '.[openai-agents]'``.

    Examples:
        >>> def helper():
        ...     from threadbound.agents.adapters import import_openai_agents
        ...     sdk = import_openai_agents()
        ...     return sdk.Agent(name="helper", instructions="Answer in one line.")
        >>> class Helper(OpenAIAgentsRole):
        ...     agent = helper
    """

    extra = OPENAI_AGENTS
    agent: Any = None
    agents: dict[str, Any] = {}
    settings: dict[str, Any] = {}

    def __init__(self) -> None:
        self.history: list[Any] = []  # the conversation so far (``to_input_list()``), committed

    def get_state(self) -> Any:
        return {"history": self.history}

    def set_state(self, state: Any) -> None:
        self.history = list(state.get("history", [])) if isinstance(state, dict) else []

    def step(self, ctx: StepContext) -> dict[str, Any]:
        require(self.extra, ctx)
        conf = settings_of(ctx, DEFAULTS, dict(self.settings))
        max_turns = positive_int(ctx, conf, "max_turns", 1000)
        factory: Callable = resolve_factory(ctx, "agent", type(self).agent, dict(self.agents), conf["agent"])
        sdk = import_openai_agents()
        starting = factory()
        if not isinstance(starting, sdk.Agent):
            raise AgentError(f"the {ctx.role} role's agent function returned {type(starting).__name__}, not an "
                             "Agents SDK Agent", task_id=ctx.task_id, agent=ctx.role)
        check_budget(ctx)
        failures: list[BaseException] = []
        client, model_name, where = _client(ctx, failures)
        settings = {k: v for k, v in (("temperature", ctx.model_options.get("temperature")),
                                      ("max_tokens", _max_tokens(ctx))) if v is not None}
        run_config = sdk.RunConfig(model=sdk.OpenAIChatCompletionsModel(model=model_name, openai_client=client),
                                   model_settings=sdk.ModelSettings(**settings), tracing_disabled=True,
                                   workflow_name=f"threadbound {ctx.role}")
        given = (self.history + [{"role": "user", "content": goal_text(ctx) if not self.history else
                                  ("\n".join(ctx.feedback) or ctx.goal)}])
        counts = {"tool_calls": 0, "deltas": 0}
        try:
            result = _run_in_thread(self._run(sdk, ctx, starting, given, max_turns, run_config, counts))
        except BaseException as exc:
            if failures:  # the threadbound backend's own error, under the transport's wrapping
                raise failures[0] from None
            if isinstance(exc, sdk.MaxTurnsExceeded):
                raise AgentError(f"the {ctx.role} agent did not finish within max_turns {max_turns}; raise "
                                 f"inputs.{ctx.role}.max_turns", task_id=ctx.task_id, agent=ctx.role,
                                 limit=max_turns) from None
            translated = _translate(exc, where, ctx)
            if translated is exc:
                raise
            raise translated from None
        usage = getattr(getattr(result, "context_wrapper", None), "usage", None)
        reported = int(getattr(usage, "output_tokens", 0) or 0)
        ctx.tokens_used += max(reported - counts["deltas"], 0)  # the server's count when it gives one
        self.history = plain(result.to_input_list())
        return {"final_output": plain(result.final_output), "last_agent": result.last_agent.name,
                "tool_calls": counts["tool_calls"], "turns": getattr(result, "current_turn", None)}

    async def _run(self, sdk, ctx: StepContext, starting, given, max_turns: int, run_config, counts: dict) -> Any:
        say, names = token_sink(ctx), {}
        result = sdk.Runner.run_streamed(starting, given, max_turns=max_turns, run_config=run_config)
        try:
            async for event in result.stream_events():
                if event.type == "raw_response_event":
                    data = event.data
                    if getattr(data, "type", "") == "response.output_text.delta" and data.delta:
                        n = 1 if ctx.streaming else count_tokens(data.delta)
                        if ctx.tokens_left is not None and ctx.tokens_used + n > ctx.tokens_left:
                            raise BudgetExhausted(
                                f"task {ctx.task_id} has spent its cost budget ({ctx.tokens_used} tokens this "
                                "step); raise the task's cost_budget to let it go on",
                                task_id=ctx.task_id, agent=ctx.role)
                        counts["deltas"] += 1
                        ctx.tokens_used += n
                        say(data.delta)
                elif event.type == "agent_updated_stream_event":
                    ctx.emit(AGENT_UPDATED, {"agent": event.new_agent.name})
                elif event.type == "run_item_stream_event":
                    raw = getattr(event.item, "raw_item", None)
                    if event.name == "tool_called":
                        counts["tool_calls"] += 1
                        names[_field(raw, "call_id")] = _field(raw, "name")
                        ctx.emit(TOOL_CALL, {"name": _field(raw, "name"), "id": _field(raw, "call_id"),
                                             "arguments": _arguments(_field(raw, "arguments"))})
                    elif event.name == "tool_output":
                        call_id = _field(raw, "call_id")
                        ctx.emit(TOOL_RESULT, {"name": names.get(call_id), "id": call_id, "ok": True,
                                               "output": trimmed(getattr(event.item, "output", ""))})
        except BaseException:
            result.cancel()
            raise
        if result.run_loop_exception is not None:  # pragma: no cover - stream_events raises it already
            raise result.run_loop_exception
        return result


def _field(raw: Any, name: str) -> Any:
    return raw.get(name) if isinstance(raw, dict) else getattr(raw, name, None)


def _arguments(text: Any) -> Any:
    if not isinstance(text, str):
        return plain(text)
    try:
        return plain(json.loads(text))
    except ValueError:
        return trimmed(text)


def _max_tokens(ctx: StepContext) -> int | None:
    limits = [n for n in (ctx.model_options.get("max_tokens"), tokens_left(ctx)) if n]
    return min(limits) if limits else None


def _run_in_thread(coro) -> Any:
    """Run ``coro`` to its end on an event loop of its own (the step's thread may be one
    with no loop, or, in a test, one with a loop already running)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = asyncio.run(coro)
        except BaseException as exc:
            box["error"] = exc

    worker = threading.Thread(target=target, name="openai-agents-run")
    worker.start()
    worker.join()
    if "error" in box:
        raise box["error"]
    return box["value"]
