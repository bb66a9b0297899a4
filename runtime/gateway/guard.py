"""Connection limits uvicorn does not have: a deadline for a request's headers, one for
its body, and a cap on the connections one client address holds.

uvicorn closes an idle keep-alive connection (``timeout_keep_alive``) and bounds the
size of an incomplete request (``h11_max_incomplete_event_size``) and the connections
of the whole server (``limit_concurrency``, answered 503), but a connection that sends
half a request line and then nothing is held for ever: 1,500 of them hold 1,500
sockets, without a token. :func:`guarded_http` is uvicorn's own h11 protocol with a
timer armed when a connection opens, or when bytes of a new request arrive, and
disarmed when the request's headers are complete; when it fires the connection is
closed. A second timer is armed when a request's headers are complete and its body is
not, and disarmed when the body is complete: a client that promises a large body and
sends it a byte a minute (holding a connection and, with a token, a request handler
waiting for it) is answered 408 and closed when it fires, or only closed if an answer
has started (a 401 sent before the body was read: the rest of the body must still
arrive in time). A client address past its cap of open connections has the new one
closed at once. The WebSocket stream a connection upgrades to is not counted: its own frames
and pings bound it.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("threadbound.gateway")


def guarded_http(header_timeout_s: float, max_per_client: int,
                 body_timeout_s: float = 0.0) -> type[asyncio.Protocol]:
    """An h11 protocol class for ``uvicorn.Config(http=...)`` that closes a connection
    whose request headers are not complete ``header_timeout_s`` after it opened (or after
    the first byte of its next request), or whose request body is not complete
    ``body_timeout_s`` after its headers (408 when no answer has started; 0: no body
    deadline), and refuses a client address's connection past its ``max_per_client``
    open ones (0: no cap)."""
    held: dict[str, int] = {}  # client address -> open connections (one dict per server)

    class Guarded(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None
        _body_timer: asyncio.TimerHandle | None = None
        _upgraded = False
        _counted: str | None = None
        _seen_cycle: Any = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            host = self.client[0] if self.client else "?"
            if max_per_client and held.get(host, 0) >= max_per_client:
                log.warning("gateway: %s holds %d connections, the most one client may; closing a new one",
                            host, max_per_client)
                transport.close()
                return
            held[host] = held.get(host, 0) + 1
            self._counted = host
            self._arm()

        def _arm(self) -> None:
            if self._header_timer is None and header_timeout_s > 0:
                self._header_timer = self.loop.call_later(header_timeout_s, self._headers_late)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _in_request(self) -> bool:
            return self.cycle is not None and self.cycle is not self._seen_cycle and not self.cycle.response_complete

        def _headers_late(self) -> None:
            self._header_timer = None
            if self._in_request() or self.transport.is_closing():
                return
            log.info("gateway: %s sent no complete request headers in %gs; closing", self.client, header_timeout_s)
            self.transport.close()

        def _watch_body(self) -> None:
            """Arm the body timer while a request's body is incomplete, disarm it once not."""
            if self.conn.their_state is h11.SEND_BODY and not self._upgraded and not self.transport.is_closing():
                if self._body_timer is None and body_timeout_s > 0:
                    self._body_timer = self.loop.call_later(body_timeout_s, self._body_late)
            elif self._body_timer is not None:
                self._body_timer.cancel()
                self._body_timer = None

        def _body_late(self) -> None:
            self._body_timer = None
            if self.conn.their_state is not h11.SEND_BODY or self._upgraded or self.transport.is_closing():
                return
            log.info("gateway: %s sent no complete request body in %gs; closing", self.client, body_timeout_s)
            if self.conn.our_state is h11.SEND_RESPONSE and (self.cycle is None or not self.cycle.response_started):
                message = (f"body: not complete {body_timeout_s:g}s after the request's headers (this gateway's "
                           f"body_timeout_s); send the whole body at once")
                body = json.dumps({"error": {"type": "body_timeout", "message": message, "field": "body"}}).encode()
                for event in (h11.Response(status_code=408, reason=b"Request Timeout", headers=[
                                  (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                  (b"connection", b"close"), (b"cache-control", b"no-store")]),
                              h11.Data(data=body), h11.EndOfMessage()):
                    self.transport.write(self.conn.send(event))
            self.transport.close()  # the handler waiting for the body gets a disconnect

        def data_received(self, data: bytes) -> None:
            if not self._in_request():
                self._arm()  # bytes of a new request: its headers have a deadline
            super().data_received(data)
            if self._in_request():  # its headers are complete
                self._disarm()
            self._watch_body()

        def on_response_complete(self) -> None:
            self._seen_cycle = self.cycle  # the next bytes start a new request
            super().on_response_complete()
            if not self._in_request() and self.conn.trailing_data[0]:
                self._arm()  # part of the next request came while this one was answered
            self._watch_body()  # a pipelined request taken from the buffer may wait for its body

        def _release(self) -> None:
            self._disarm()
            if self._body_timer is not None:
                self._body_timer.cancel()
                self._body_timer = None
            if self._counted is not None:
                n = held.get(self._counted, 1) - 1
                if n > 0:
                    held[self._counted] = n
                else:
                    held.pop(self._counted, None)
                self._counted = None

        def connection_lost(self, exc: Exception | None) -> None:
            self._release()
            super().connection_lost(exc)

        def handle_websocket_upgrade(self, event: Any) -> None:
            self._upgraded = True
            self._release()  # the WebSocket protocol takes the transport over
            super().handle_websocket_upgrade(event)

    Guarded.held = held  # for tests and for a look from a debugger
    return Guarded
