"""Slowloris without a token: connections that send half a request and then nothing are
closed after the header deadline, a body trickled a byte at a time (with a token or
without) is cut off after the body deadline, a client address past its cap of
connections has the new ones closed at once, and a normal request is served all the while. Real sockets on
loopback, a real uvicorn; no pool is needed for the page these requests ask for."""

from __future__ import annotations

import socket
import threading

import httpx
import pytest
from gateway_tools import SUBMIT, InProcessGateway, auth

from threadbound.runtime.errors import ConfigError
from threadbound.runtime.gateway.app import GatewaySettings

pytestmark = pytest.mark.timeout(90)


def half_sent(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ")  # and never the rest
    return s


def closed_by_server(s: socket.socket) -> bool:
    """Blocks until the server closes ``s`` (True) or 30 s pass (False)."""
    try:
        return s.recv(1024) == b""
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def still_open(s: socket.socket) -> bool:
    s.setblocking(False)
    try:
        s.recv(1024)
        return False  # EOF or data: not a held, silent connection
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        s.settimeout(30)


def test_half_sent_headers_are_closed_after_the_deadline_and_a_normal_request_is_served_meanwhile():
    settings = GatewaySettings(header_timeout_s=3, max_connections_per_client=500)
    with InProcessGateway(None, settings) as gw:
        # Given: many connections that sent half their headers
        slow = [half_sent(gw.port) for _ in range(150)]
        try:
            # When: a normal client asks for the page while they are held
            page = httpx.get(f"{gw.url}/", timeout=30)
            held_then = sum(still_open(s) for s in slow)
            # Then: it is served, and afterwards every slow connection is closed by the server
            assert page.status_code == 200 and "<html" in page.text.lower()
            assert held_then > 0  # they were still held when the normal request was answered
            assert all(closed_by_server(s) for s in slow)
            # and the gateway still serves
            assert httpx.get(f"{gw.url}/", timeout=30).status_code == 200
        finally:
            for s in slow:
                s.close()


def test_a_keep_alive_connection_whose_next_request_stalls_is_closed_too():
    with InProcessGateway(None, GatewaySettings(header_timeout_s=2, idle_timeout_s=60)) as gw:
        s = socket.create_connection(("127.0.0.1", gw.port), timeout=30)
        try:
            s.sendall(b"GET /static/style.css HTTP/1.1\r\nHost: x\r\n\r\n")
            first = s.recv(65536)
            assert first.startswith(b"HTTP/1.1 200")
            s.sendall(b"GET / HTTP/1.1\r\nHo")  # a second request, stalled in its headers
            data = b""
            while True:  # whatever is left of the first answer, then the close
                try:
                    chunk = s.recv(65536)
                except ConnectionResetError:
                    break
                if not chunk:
                    break
                data += chunk
            assert b"HTTP/1.1 200" not in data  # the stalled request was never answered
        finally:
            s.close()


def test_a_client_past_its_cap_has_new_connections_closed_and_gets_in_again_when_one_ends():
    with InProcessGateway(None, GatewaySettings(header_timeout_s=60, max_connections_per_client=5)) as gw:
        held = [socket.create_connection(("127.0.0.1", gw.port), timeout=30) for _ in range(5)]
        try:
            extra = socket.create_connection(("127.0.0.1", gw.port), timeout=30)
            assert closed_by_server(extra)  # the sixth is closed at once
            extra.close()
            with pytest.raises(httpx.TransportError):
                httpx.get(f"{gw.url}/", timeout=30)
            held.pop().close()
            for _ in range(50):  # the server sees the close on its next loop turn
                try:
                    assert httpx.get(f"{gw.url}/", timeout=30).status_code == 200
                    break
                except httpx.TransportError:
                    continue
            else:
                raise AssertionError("never served after a connection ended")
        finally:
            for s in held:
                s.close()


class Trickler:
    """A POST that sends its headers, promises a 1,000,000-byte body and then sends it
    one byte at a time, for as long as the server keeps the connection; what the server
    answers is read on a thread of its own."""

    def __init__(self, port: int, token: str | None) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        head = "POST /v1/tasks HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000000\r\n"
        if token:
            head += f"Authorization: Bearer {token}\r\n"
        self.sock.sendall(head.encode() + b"\r\n{")
        self.answer = b""
        self.closed = threading.Event()  # the server ended the connection
        threading.Thread(target=self._drip, daemon=True).start()
        threading.Thread(target=self._read, daemon=True).start()

    def _drip(self) -> None:
        while not self.closed.is_set():
            try:
                self.sock.sendall(b" ")
            except OSError:
                break
            self.closed.wait(0.2)

    def _read(self) -> None:
        while True:
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                break
            if not chunk:
                break
            self.answer += chunk
        self.closed.set()


def test_a_body_sent_a_byte_at_a_time_is_cut_off_while_a_normal_client_is_served():
    # The header deadline is far away, so only the body deadline can end these connections.
    settings = GatewaySettings(header_timeout_s=600, body_timeout_s=4, idle_timeout_s=600)
    with InProcessGateway(None, settings) as gw:
        # Given: a token holder and a client without a token, both trickling a promised big body
        holder, stranger = Trickler(gw.port, SUBMIT), Trickler(gw.port, None)
        try:
            # When: a normal client sends a whole (malformed) body and asks for the page meanwhile
            normal = httpx.post(f"{gw.url}/v1/tasks", content=b"{", headers=auth(), timeout=30)
            page = httpx.get(f"{gw.url}/", timeout=30)
            held_then = not holder.closed.is_set() and not stranger.closed.is_set()
            # Then: it is served (its body read whole), while the tricklers are still held ...
            assert normal.status_code == 400 and normal.json()["error"]["field"] == "body"
            assert page.status_code == 200
            assert held_then
            # ... and afterwards the server closes both while they are still dripping
            assert holder.closed.wait(60) and stranger.closed.wait(60)
            assert holder.answer.startswith(b"HTTP/1.1 408 "), holder.answer[:200]
            assert b"body_timeout_s" in holder.answer
            assert stranger.answer.startswith(b"HTTP/1.1 401 ")  # refused before its body, then cut off too
            # and the gateway still serves
            assert httpx.get(f"{gw.url}/", timeout=30).status_code == 200
        finally:
            holder.sock.close()
            stranger.sock.close()


@pytest.mark.parametrize("value", [0, -1, float("nan"), float("inf"), 86_401, "30"])
def test_a_body_deadline_out_of_range_is_refused_naming_the_setting(value):
    with pytest.raises(ConfigError, match="body_timeout_s"):
        GatewaySettings(body_timeout_s=value)


@pytest.mark.parametrize(("name", "value"), [
    ("header_timeout_s", 0), ("header_timeout_s", float("nan")), ("header_timeout_s", 86_401),
    ("idle_timeout_s", 0), ("idle_timeout_s", 2.5), ("keepalive_s", 0), ("keepalive_s", float("inf")),
    ("max_body_bytes", 0), ("max_body_bytes", 1 << 31), ("max_body_bytes", True),
    ("rate_per_s", -1), ("rate_per_s", float("nan")), ("rate_burst", 0),
    ("max_connections", 0), ("max_connections", "many"), ("max_connections_per_client", -1),
    ("max_header_bytes", 10), ("max_header_bytes", 1 << 21)])
def test_every_gateway_limit_out_of_range_is_refused_naming_it(name, value):
    with pytest.raises(ConfigError, match=name):
        GatewaySettings(**{name: value})


def test_the_gateway_limits_in_range_are_taken_and_zero_switches_off_only_what_says_so():
    assert GatewaySettings() == GatewaySettings()
    GatewaySettings(rate_per_s=0, max_connections_per_client=0, header_timeout_s=0.5, idle_timeout_s=1,
                    max_body_bytes=1, max_header_bytes=1024, body_timeout_s=86_400)
