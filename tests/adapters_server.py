"""A scripted OpenAI-compatible chat-completions server for the adapters' tests: real HTTP,
real server-sent events, ``tool_calls`` deltas and a usage chunk.

``ScriptedServer(turns)``: the answer to a request is ``turns[i]``, where ``i`` is how many
assistant messages the request's history holds (so a conversation is answered turn by
turn, whatever process asks). A turn is ``{"text": "..."}``, or ``{"tool_calls": [{"name",
"arguments": {...}}]}`` (optionally with ``text`` too); past the end, the last turn again.
Text streams word by word, cut at the request's ``max_tokens`` words.
``{"status": 429, "retry_after": "3"}`` answers with that HTTP status. Every request body is
kept in ``requests``.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # quiet
        pass

    def _json(self, code, body, headers=None):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _sse(self, chunk):
        self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
        self.wfile.flush()

    def do_POST(self):
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append(req)
        turns = self.server.turns
        i = sum(1 for m in req.get("messages", []) if m.get("role") == "assistant")
        turn = turns[min(i, len(turns) - 1)]
        if "status" in turn:
            headers = {"Retry-After": turn["retry_after"]} if "retry_after" in turn else {}
            return self._json(turn["status"], {"error": {"message": f"scripted {turn['status']}"}}, headers)
        text, calls = turn.get("text", ""), turn.get("tool_calls", [])
        words = [w + " " for w in text.split(" ")] if text else []
        cap = req.get("max_tokens") or req.get("max_completion_tokens")
        words = words[:cap] if cap else words
        usage = {"prompt_tokens": 10, "completion_tokens": len(words) + 5 * len(calls),
                 "total_tokens": 10 + len(words) + 5 * len(calls)}
        tool_calls = [{"id": f"call_{i}_{n}", "type": "function",
                       "function": {"name": c["name"], "arguments": json.dumps(c.get("arguments", {}))}}
                      for n, c in enumerate(calls)]
        if not req.get("stream"):
            message = {"role": "assistant", "content": "".join(words) or None}
            if tool_calls:
                message["tool_calls"] = tool_calls
            return self._json(200, {"id": "scripted", "object": "chat.completion", "created": 0, "model": req["model"],
                                    "choices": [{"index": 0, "message": message,
                                                 "finish_reason": "tool_calls" if calls else "stop"}],
                                    "usage": usage})
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        head = {"id": "scripted", "object": "chat.completion.chunk", "created": 0, "model": req["model"]}
        for word in words:
            self._sse({**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": word},
                                            "finish_reason": None}]})
        for n, call in enumerate(tool_calls):  # the name first, then the arguments in two pieces
            args = call["function"]["arguments"]
            self._sse({**head, "choices": [{"index": 0, "delta": {"tool_calls": [
                {"index": n, "id": call["id"], "type": "function",
                 "function": {"name": call["function"]["name"], "arguments": ""}}]}, "finish_reason": None}]})
            for piece in (args[: len(args) // 2], args[len(args) // 2:]):
                self._sse({**head, "choices": [{"index": 0, "delta": {"tool_calls": [
                    {"index": n, "function": {"arguments": piece}}]}, "finish_reason": None}]})
        self._sse({**head, "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls" if calls else "stop"}]})
        if (req.get("stream_options") or {}).get("include_usage"):
            self._sse({**head, "choices": [], "usage": usage})
        self.wfile.write(b"data: [DONE]\n\n")
        self.close_connection = True


class ScriptedServer:
    """``with ScriptedServer([{"text": "hi"}]) as srv: srv.url``; stops on exit."""

    def __init__(self, turns: list[dict]) -> None:
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.requests = []
        self.httpd.turns = list(turns)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def requests(self) -> list[dict]:
        return self.httpd.requests

    def __enter__(self) -> "ScriptedServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)
