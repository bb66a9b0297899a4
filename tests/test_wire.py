"""A step crosses between the supervisor and its agent actor as bytes (agents.wire):
everything an agent sends arrives as it was, what only cloudpickle can pickle too, and
text or bytes a model wrote that happen to be a pickle stay data: nothing unpickles them."""

from __future__ import annotations

import os
import pickle

import pytest

from threadbound.agents import Agent
from threadbound.agents.host import RESULT, StepRequest
from threadbound.agents.wire import pack, unpack


class _Opens:
    """Unpickling this calls ``open(path, "w")``: the file appearing means it was unpickled."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def hostile_payload(marker: str) -> str:
    """A model's text that is, byte for byte, a pickle which creates ``marker`` if loaded."""
    return pickle.dumps(_Opens(marker), protocol=5).decode("latin-1")


def request(**over) -> StepRequest:
    fields = dict(binding="b", agent_blob=None, task_id="t1", role="a", goal="g", workspace=None, round=1,
                  attempt=1, idempotency_key="t1:1:a:1", inputs={}, outputs={}, feedback=[], level=2,
                  streaming=True, model_config=None, token_batch_size=8, token_interval_s=0.05)
    return StepRequest(**{**fields, **over})


def test_a_request_and_a_reply_come_back_as_they_were_even_what_only_cloudpickle_can_pickle():
    class Local:  # defined in a function: the standard pickler refuses it, cloudpickle takes it by value
        def __init__(self, n: int) -> None:
            self.n = n

    req = request(inputs={"a": {"n": 3}}, state=Local(5), has_state=True, outputs={"x": [1, "two", None]})
    back = unpack(pack(req))
    assert isinstance(back, StepRequest) and back.inputs == req.inputs and back.outputs == req.outputs
    assert back.state.n == 5
    reply = [("tokens", {"text": "héllo \x1b[2J", "n": 2}), (RESULT, {"output": Local(9), "state": None})]
    kinds, data = zip(*unpack(pack(reply)))
    assert kinds == ("tokens", RESULT) and data[0] == {"text": "héllo \x1b[2J", "n": 2} and data[1]["output"].n == 9


def test_a_pickle_a_model_wrote_is_carried_as_data_and_never_loaded(tmp_path):
    proof = str(tmp_path / "proof")
    pickle.loads(hostile_payload(proof).encode("latin-1")).close()
    assert os.path.exists(proof)  # the payload is live: loaded, it creates its file
    marker = str(tmp_path / "unpickled")
    text = hostile_payload(marker)
    # Given a step's reply and a request that carry the model's text, as str and as bytes
    reply = [("tokens", {"text": text, "n": 1}), (RESULT, {"output": {"text": text, "raw": text.encode("latin-1")}})]
    got = unpack(pack(reply))
    req = unpack(pack(request(feedback=[text], outputs={"coder": text.encode("latin-1")})))
    # Then they arrive as the same text and bytes, and nothing was unpickled from them
    assert got[0][1]["text"] == text and got[1][1]["output"]["raw"] == text.encode("latin-1")
    assert req.feedback == [text] and req.outputs["coder"] == text.encode("latin-1")
    assert not os.path.exists(marker)


class Echoes(Agent):
    """Streams its ``inputs[role]["payload"]`` as a token, emits it as bytes, and returns it with an
    object of a class local to the step (only cloudpickle can pickle that)."""

    def step(self, ctx):
        class Box:
            def __init__(self, value):
                self.value = value

        payload = ctx.inputs[ctx.role]["payload"]
        yield payload
        ctx.emit("raw", {"bytes": payload.encode("latin-1")})
        return {"text": payload, "box": Box(len(payload))}


@pytest.mark.ray
def test_through_a_real_pool_a_models_pickle_arrives_as_text_and_runs_nowhere(ray_session, tmp_path):
    from conftest import pool_settings

    from threadbound.runtime import AgentPool, RuntimeConfig, Task

    marker = str(tmp_path / "unpickled")
    payload = hostile_payload(marker)
    pool = AgentPool(RuntimeConfig.from_mapping(pool_settings("wire")), agents={"a": Echoes})
    try:
        # Given an agent whose model's text is a pickle that would create a file if loaded
        handle = pool.submit(Task(goal="echo", agents=["a"], inputs={"a": {"payload": payload}}))
        events = list(handle.stream())
        result = handle.result(timeout=60)
        from threadbound.runtime.client import _sync
        rows, status = _sync(pool._client.call("read", handle.task_id, 0, 0.0))  # one task's plain read
    finally:
        pool.shutdown()
    # Then the client got it back as text and bytes, exactly, through the step's reply and the log
    assert result.ok, result
    assert "".join(e.data["text"] for e in events if e.kind == "tokens") == payload
    assert [e.data["bytes"] for e in events if e.kind == "raw"] == [payload.encode("latin-1")]
    assert result.outputs["a"]["text"] == payload and result.outputs["a"]["box"].value == len(payload)
    assert status == "succeeded" and [r[1] for r in rows] == [e.kind for e in events]
    # And no process (client, supervisor, agent: they share this file system) unpickled it
    assert not os.path.exists(marker)
