"""Slowloris without a token: connections that send half a request and then nothing are
closed after the header deadline, a client address past its cap of connections has the
new ones closed at once, and a normal request is served all the while. Real sockets on
loopback, a real uvicorn; no pool is needed for the page these requests ask for."""

from __future__ import annotations

import socket

import httpx
import pytest
from gateway_tools import InProcessGateway

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
