"""A small OpenAI-compatible chat-completions server for tests: real HTTP, real SSE.

The requested ``model`` name picks the behaviour:
    anything else  stream (or return) "Hello from the test server: <last user message>"
    rate-limit     429 with Retry-After: 2
    rate-limit-once  429 with Retry-After: 1 to the first request, then answers
    overloaded     503
    bad-request    400
    slow           sleeps 5 s before answering (read timeouts)
    garbage        a stream chunk that is not JSON

``OpenAITestServer(script=fn)`` answers with ``fn(request_body)`` instead, when it returns
a reply: ``{"content": str, "tool_calls": [{"name": ..., "arguments": <JSON text>}, ...]}``,
optionally with its own ``usage`` (``{"prompt_tokens", "completion_tokens"}``), or
``{"status": 429, "retry_after": "3"}`` for that HTTP status.

``OpenAITestServer(turns=[...])`` answers a conversation turn by turn: the answer to a
request is ``turns[i]``, where ``i`` is how many assistant messages its history holds
(whatever process asks); past the end, the last turn again. A turn is ``{"text": ...}``,
``{"tool_calls": [{"name", "arguments": {...}}]}`` (optionally with ``text`` too) or
``{"status": 429, "retry_after": "3"}``. Its text is cut at the request's ``max_tokens``
words, and its usage is 10 prompt tokens plus a completion token a word and 5 a call.

Text streams word by word. Tool calls stream as OpenAI's ``tool_calls`` deltas do: the
first delta of a call has its index, id, type and name, the arguments follow in small
pieces. Streams end with a usage chunk when the request asks for
``stream_options.include_usage``; whole answers carry usage. Every request is kept in
``requests`` as ``{"body": <request JSON>, "auth": <Authorization header or None>}``.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def turn_by_turn(turns: list[dict]):
    """The script that answers ``turns`` as :class:`OpenAITestServer` documents."""
    turns = list(turns)

    def script(req: dict) -> dict:
        i = sum(1 for m in req.get("messages", []) if m.get("role") == "assistant")
        turn = turns[min(i, len(turns) - 1)]
        if "status" in turn:
            return {k: turn[k] for k in ("status", "retry_after") if k in turn}
        words = turn.get("text", "").split(" ") if turn.get("text") else []
        cap = req.get("max_tokens") or req.get("max_completion_tokens")
        words = words[:cap] if cap else words
        calls = [{"name": c["name"], "arguments": json.dumps(c.get("arguments", {}))}
                 for c in turn.get("tool_calls", [])]
        return {"content": " ".join(words), "tool_calls": calls,
                "usage": {"prompt_tokens": 10, "completion_tokens": len(words) + 5 * len(calls)}}
    return script


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # quiet
        pass

    def _send(self, code, body, headers=None):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append({"body": req, "auth": self.headers.get("Authorization")})
        model = req.get("model")
        first = model not in self.server.models_seen
        self.server.models_seen.add(model)
        if model == "rate-limit-once" and first:
            return self._send(429, {"error": {"message": "slow down"}}, {"Retry-After": "1"})
        if model == "rate-limit":
            return self._send(429, {"error": {"message": "slow down"}}, {"Retry-After": "2"})
        if model == "overloaded":
            return self._send(503, {"error": {"message": "overloaded"}})
        if model == "bad-request":
            return self._send(400, {"error": {"message": "unknown parameter"}})
        if model == "slow":
            time.sleep(5)
        reply = self.server.script(req) if self.server.script else None
        if reply is None:
            reply = {"content": "Hello from the test server: " + str(req["messages"][-1].get("content"))}
        if "status" in reply:
            headers = {"Retry-After": reply["retry_after"]} if "retry_after" in reply else {}
            return self._send(reply["status"], {"error": {"message": f"scripted {reply['status']}"}}, headers)
        text, calls = reply.get("content") or "", reply.get("tool_calls") or []
        usage = dict(reply.get("usage") or {
            "prompt_tokens": sum(len(str(m.get("content") or "").split()) for m in req["messages"]),
            "completion_tokens": len(text.split()) + sum(len(c["arguments"]) // 4 + 1 for c in calls)})
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        ids = [f"call_{len(self.server.requests)}_{i}" for i in range(len(calls))]
        head = {"id": f"chatcmpl-{len(self.server.requests)}", "created": int(time.time()), "model": model}
        if not req.get("stream"):
            message = {"role": "assistant", "content": text or None}
            if calls:
                message["tool_calls"] = [{"id": i, "type": "function", "function": c} for i, c in zip(ids, calls)]
            return self._send(200, {**head, "object": "chat.completion",
                                    "choices": [{"index": 0, "message": message,
                                                 "finish_reason": "tool_calls" if calls else "stop"}],
                                    "usage": usage})
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        if model == "garbage":
            self.wfile.write(b"data: {not json\n\n")
            return
        head["object"] = "chat.completion.chunk"

        def send(chunk):
            self.wfile.write(f"data: {json.dumps({**head, **chunk})}\n\n".encode())
            self.wfile.flush()

        def choice(**fields):
            return {"choices": [{"index": 0, "finish_reason": None, **fields}]}

        for word in text.split(" ") if text else ():
            send(choice(delta={"role": "assistant", "content": word + " "}))
        for index, (call_id, call) in enumerate(zip(ids, calls)):
            send(choice(delta={"tool_calls": [{"index": index, "id": call_id, "type": "function",
                                               "function": {"name": call["name"], "arguments": ""}}]}))
            args = call["arguments"]
            for at in range(0, len(args), 7):
                send(choice(delta={"tool_calls": [{"index": index, "function": {"arguments": args[at:at + 7]}}]}))
        send(choice(delta={}, finish_reason="tool_calls" if calls else "stop"))
        if (req.get("stream_options") or {}).get("include_usage"):
            send({"choices": [], "usage": usage})
        self.wfile.write(b"data: [DONE]\n\n")
        self.close_connection = True


class OpenAITestServer:
    """Start with ``with OpenAITestServer() as srv: srv.url``; stops on exit.
    ``script`` or ``turns`` (not both) script its answers, as the module says."""

    def __init__(self, script=None, turns: list[dict] | None = None) -> None:
        if script is not None and turns is not None:
            raise ValueError("OpenAITestServer: give script or turns, not both")
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.script = turn_by_turn(turns) if turns is not None else script
        self.httpd.daemon_threads = True
        self.httpd.requests = []
        self.httpd.models_seen = set()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def requests(self):
        return self.httpd.requests

    def __enter__(self) -> "OpenAITestServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)
