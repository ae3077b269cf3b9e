"""No token or resume token reaches the logs, at any level.

Everything runs at DEBUG (the ``websockets`` library then dumps handshake
headers, request lines and frame previews); every record of every logger is
captured and searched for the secrets.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterator

import pytest
from websockets.asyncio.client import connect

from tailnet.config import StackConfig
from tailnet.redact import REDACTED, redact_target
from tailnet.rpc.tailnet_client import TailnetClient
from tailnet.stack import TailnetStack
from tailnet.v2 import tailnet_pb2 as pb

from ..rawws import OP_CLOSE, OP_TEXT, read_http_head, ws_frame

T = 10.0


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def text(self) -> str:
        fmt = logging.Formatter("%(name)s %(levelname)s %(message)s")
        return "\n".join(fmt.format(r) for r in self.records)


@pytest.fixture
def debug_logs() -> Iterator[_Capture]:
    """Root at DEBUG with a capturing handler (set before any WebSocket is made)."""
    root = logging.getLogger()
    cap = _Capture()
    old = root.level
    root.setLevel(logging.DEBUG)
    root.addHandler(cap)
    try:
        yield cap
    finally:
        root.removeHandler(cap)
        root.setLevel(old)


@pytest.fixture
async def stack(debug_logs: _Capture) -> AsyncIterator[TailnetStack]:
    s = TailnetStack(
        StackConfig(http_addr="127.0.0.1:0", grpc_addr=None, stun_addr=None, data_dir=None)
    )
    await s.start()
    try:
        yield s
    finally:
        await s.stop()


def _upgrade_with_secrets(port: int, token: str, resume: str) -> bytes:
    """Upgrade /api/v2/debug/ws with the token in a header, a cookie and the query,
    echo a text message holding it, close; returns what the server sent."""
    import base64
    import os
    import socket

    sock = socket.create_connection(("127.0.0.1", port), timeout=T)
    try:
        key = base64.b64encode(os.urandom(16)).decode()
        req = (
            f"GET /api/v2/debug/ws?version=2.3&coder_session_token={token}"
            f"&resume_token={resume} HTTP/1.1\r\n"
            f"Host: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            f"Coder-Session-Token: {token}\r\n"
            f"Authorization: Bearer {token}\r\n"
            f"Cookie: a=1; coder_session_token={token}\r\n\r\n"
        )
        sock.sendall(req.encode())
        head, rest = read_http_head(sock)
        assert head.startswith(b"HTTP/1.1 101"), head
        sock.sendall(ws_frame(OP_TEXT, f"echo {token} {resume}".encode()))
        sock.sendall(ws_frame(OP_CLOSE, b"\x03\xe8"))
        out = rest
        while chunk := sock.recv(65536):
            out += chunk
        return out
    finally:
        sock.close()


async def test_tokens_never_logged_at_debug(stack: TailnetStack, debug_logs: _Capture) -> None:
    _, token = stack.create_user()
    resume = "eyJhbGciOiJIUzUxMiJ9.resume-secret-part.signature-part"
    out = await asyncio.wait_for(
        asyncio.to_thread(_upgrade_with_secrets, stack.http_port, token, resume), T * 2
    )
    assert token.encode() in out  # the echo came back: every stage ran
    # the health check's own WebSocket client sends the process token in a header
    assert stack.health is not None
    report = await asyncio.wait_for(stack.health.report(force=True), T * 2)
    assert report["websocket"]["healthy"] is True
    # a library client too (websockets' default client logger)
    async with connect(
        stack.ws_url + f"/api/v2/debug/ws?resume_token={resume}",
        additional_headers={"Coder-Session-Token": token},
    ) as ws:
        await ws.send(f"again {token}")
        assert token in str(await asyncio.wait_for(ws.recv(), T))
    # Coder's transport: a Coordinate stream, a resume token issued and presented
    url = stack.ws_url + "/api/v2/tailnet?version=2.3"
    c = await TailnetClient.connect(url, token)
    coord = c.coordinate()
    await coord.send(pb.CoordinateRequest())
    issued = (await asyncio.wait_for(c.refresh_resume_token(), T)).token
    await c.close()
    c = await TailnetClient.connect(url + f"&resume_token={issued}", token, cookie=True)
    await c.close()
    text = debug_logs.text()
    # the dumps did happen, redacted
    assert "Coder-Session-Token: " + REDACTED in text
    assert "resume_token=" + REDACTED in text
    secrets = (token, token.split("-", 1)[1], resume, "resume-secret-part", stack.admin_token,
               issued, issued.rsplit(".", 1)[1])
    for secret in secrets:
        assert secret not in text, f"{secret[:6]}… logged"


def test_redact_target() -> None:
    assert redact_target("/a") == "/a"
    assert redact_target("/a?version=2.3&resume_token=x&t") == (
        f"/a?version=2.3&resume_token={REDACTED}&t"
    )
