"""One request, one route: the API port decides per request on a keep-alive connection.

Raw sockets with an h11 client on 127.0.0.1 against a real in-memory stack.
"""

from __future__ import annotations

import asyncio
import json
import socket

import h11

from tailnet.stack import TailnetStack

T = 10.0


class KeepAlive:
    """A blocking HTTP/1.1 client that keeps one connection (h11 on a raw socket)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=T)
        self.conn = h11.Connection(h11.CLIENT)

    def send(self, method: str, target: str, headers: dict[str, str] | None = None) -> bytes:
        hdrs = [("Host", "127.0.0.1"), *(headers or {}).items()]
        out = self.conn.send(h11.Request(method=method, target=target, headers=hdrs)) or b""
        return out + (self.conn.send(h11.EndOfMessage()) or b"")

    def response(self) -> tuple[int, dict[str, str], bytes]:
        status, headers, body = 0, {}, b""
        while True:
            ev = self.conn.next_event()
            if ev is h11.NEED_DATA:
                self.conn.receive_data(self.sock.recv(65536))
                continue
            assert ev is not h11.PAUSED, "response without a request"
            if isinstance(ev, h11.Response):
                status = ev.status_code
                headers = {k.decode(): v.decode() for k, v in ev.headers}
            elif isinstance(ev, h11.Data):
                body += ev.data
            elif isinstance(ev, h11.EndOfMessage):
                if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
                    self.conn.start_next_cycle()
                return status, headers, body
            elif isinstance(ev, h11.ConnectionClosed):
                raise ConnectionError("server closed the connection")

    def get(self, target: str, headers: dict[str, str] | None = None, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
        self.sock.sendall(self.send(method, target, headers))
        return self.response()

    def close(self) -> None:
        self.sock.close()


async def test_probe_then_api_on_one_keepalive_connection(stack: TailnetStack) -> None:
    tok = {"Coder-Session-Token": stack.admin_token}

    def run() -> None:
        c = KeepAlive(stack.http_port)
        try:
            status, headers, _ = c.get("/derp/probe")
            assert status == 200 and headers["access-control-allow-origin"] == "*"
            status, _, body = c.get("/api/v2/workspaceagents/connection", tok)
            assert status == 200, body
            assert "derp_map" in json.loads(body)
            status, headers, body = c.get("/generate_204", {"X-Tailscale-Challenge": "abc"})
            assert status == 204 and headers["x-tailscale-response"] == "response abc"
            assert "content-length" not in headers
            status, _, body = c.get("/healthz")
            assert (status, body) == (200, b"OK")
            status, _, _ = c.get("/derp/latency-check", method="HEAD")
            assert status == 200
            status, _, body = c.get("/derp")  # no upgrade: the relay's 426, still ours
            assert status == 426
            # /metrics is the stack's own exposition (coordinator + relay + process),
            # answered on this connection, which keeps serving the API afterwards
            status, headers, body = c.get("/metrics")
            assert status == 200 and headers["content-type"].startswith("text/plain")
            assert b"tailnet_coordinator_" in body
            status, _, body = c.get("/api/v2/debug/coordinator", {**tok, "Accept": "application/json"})
            assert status == 200 and "peers" in json.loads(body)
        finally:
            c.close()

    await asyncio.wait_for(asyncio.to_thread(run), T * 2)


async def test_pipelined_probe_and_api_requests(stack: TailnetStack) -> None:
    """Requests sent back to back in one write are each routed on their own."""

    def run() -> None:
        c = KeepAlive(stack.http_port)
        try:
            blob = (
                c.send("GET", "/generate_204")
                + _raw_request("/api/v2/workspaceagents/connection", stack.admin_token)
                + _raw_request("/derp/probe")
                + _raw_request("/api/v2/derp-map/nothing-here")
            )
            c.sock.sendall(blob)
            assert c.response()[0] == 204
            # the h11 client must know of each request before it parses its response
            c.send("GET", "/api/v2/workspaceagents/connection")
            status, _, body = c.response()
            assert status == 200 and "derp_map" in json.loads(body)
            c.send("GET", "/derp/probe")
            assert c.response()[0] == 200
            c.send("GET", "/api/v2/derp-map/nothing-here")
            status, headers, _ = c.response()
            assert status == 404 and headers["content-type"] == "application/json"
        finally:
            c.close()

    await asyncio.wait_for(asyncio.to_thread(run), T * 2)


def _raw_request(target: str, token: str | None = None) -> bytes:
    lines = [f"GET {target} HTTP/1.1", "Host: 127.0.0.1"]
    if token:
        lines.append(f"Coder-Session-Token: {token}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def test_derp_upgrade_after_api_request_still_reaches_the_relay(stack: TailnetStack) -> None:
    """An upgrade is a per-request decision too: an API request first, then DERP."""
    from derp.frames import HEADER_LEN, FrameType

    def run() -> None:
        c = KeepAlive(stack.http_port)
        try:
            assert c.get("/healthz")[0] == 200
            c.sock.sendall(
                b"GET /derp HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: DERP\r\n"
                b"Connection: Upgrade\r\n\r\n"
            )
            buf = b""
            while b"\r\n\r\n" not in buf or len(buf.partition(b"\r\n\r\n")[2]) < HEADER_LEN:
                chunk = c.sock.recv(65536)
                assert chunk
                buf += chunk
            head, _, rest = buf.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 101") and b"Upgrade: DERP" in head
            assert rest[0] == FrameType.SERVER_KEY
        finally:
            c.close()

    await asyncio.wait_for(asyncio.to_thread(run), T * 2)
