"""HTTP front door of the DERP server: upgrade bytes, fast start, extras endpoints."""

from __future__ import annotations

import asyncio

import pytest

from derp.frames import MAGIC, encode_server_key
from derp.server import DerpServer

from .conftest import UPGRADE_REQUEST, WAIT, ClientFactory, RawClient


async def _request(port: int, raw: bytes) -> tuple[bytes, bytes]:
    """Send one raw request with ``Connection: close``; return (head, body)."""
    r, w = await asyncio.open_connection("127.0.0.1", port)
    try:
        w.write(raw)
        data = await asyncio.wait_for(r.read(), WAIT)  # until the server closes
    finally:
        w.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return head, body


def _get(path: str, method: str = "GET", extra: str = "") -> bytes:
    return (
        f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}Connection: close\r\n\r\n"
    ).encode()


def _headers(head: bytes) -> dict[str, str]:
    lines = head.decode("latin-1").split("\r\n")[1:]
    return {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines)}


async def test_upgrade_101_exact_bytes_then_server_key(server: DerpServer) -> None:
    c = await RawClient.open(server.port)
    try:
        c.send(UPGRADE_REQUEST + b"\r\n")
        expected = (
            b"HTTP/1.1 101 Switching Protocols\r\n"
            b"Upgrade: DERP\r\n"
            b"Connection: Upgrade\r\n"
            b"Derp-Version: 2\r\n"
            b"Derp-Public-Key: " + server.public_key.raw.hex().encode() + b"\r\n\r\n"
        )
        got = await asyncio.wait_for(c.reader.readexactly(len(expected) + 45), WAIT)
        assert got == expected + encode_server_key(server.public_key.raw)
        assert got[len(expected) :] == b"\x01\x00\x00\x00\x28" + MAGIC + server.public_key.raw
    finally:
        await c.close()


@pytest.mark.parametrize("upgrade", [b"derp", b"DeRp", b"websocket", b"WebSocket"])
async def test_upgrade_value_case_insensitive_and_legacy_websocket(
    server: DerpServer, clients: list[RawClient], upgrade: bytes
) -> None:
    c = await RawClient.open(server.port)
    clients.append(c)
    c.send(
        b"GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: " + upgrade + b"\r\nConnection: Upgrade\r\n\r\n"
    )
    head = await c.read_http_head()
    assert head.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert await c.read_server_key() == server.public_key.raw


async def test_fast_start_no_http_response_and_client_info_in_same_write(
    server: DerpServer, clients: list[RawClient]
) -> None:
    a = await RawClient.open(server.port)
    clients.append(a)
    a.server_key = server.public_key.raw  # known from the TLS meta-cert in real life
    b = await RawClient.open(server.port)
    clients.append(b)
    await b.handshake()
    # Request head, ClientInfo and a packet in ONE write.
    a.send(
        UPGRADE_REQUEST
        + b"Derp-Fast-Start: 1\r\n\r\n"
        + a.client_info_frame()
        + b"\x04\x00\x00\x00\x25"  # SendPacket header, 32 + 5 bytes
        + b.pub
        + b"early"
    )
    # No HTTP response at all: the very first bytes are the ServerKey frame.
    first = await asyncio.wait_for(a.reader.readexactly(45), WAIT)
    assert first == encode_server_key(server.public_key.raw)
    info = await a.read_server_info()
    assert info == {"version": 2}
    assert await b.recv_packet() == (a.pub, b"early")


async def test_fast_start_header_split_from_client_info(
    server: DerpServer, connect: ClientFactory
) -> None:
    a = await connect(handshake=False)
    a.server_key = server.public_key.raw
    a.send(UPGRADE_REQUEST + b"Derp-Fast-Start: 1\r\n\r\n")
    await a.read_server_key()
    a.send(a.client_info_frame())
    assert await a.read_server_info() == {"version": 2}


@pytest.mark.parametrize("extra", ["", "Upgrade: h2c\r\n"])
async def test_derp_without_upgrade_is_426(server: DerpServer, extra: str) -> None:
    head, body = await _request(server.port, _get("/derp", extra=extra))
    assert head.startswith(b"HTTP/1.1 426 ")
    assert body.rstrip(b"\n") == b"DERP requires connection upgrade"


async def test_websocket_with_derp_subprotocol_is_upgraded(server: DerpServer) -> None:
    # Full coverage of DERP over WebSocket is in test_websocket.py.
    extra = (
        "Upgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: derp\r\n"
    )
    r, w = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        w.write(f"GET /derp HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}\r\n".encode())
        head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), WAIT)
    finally:
        w.close()
    assert head.startswith(b"HTTP/1.1 101 "), head
    assert b"sec-websocket-protocol: derp" in head.lower()


@pytest.mark.parametrize("path", ["/derp/probe", "/derp/latency-check"])
@pytest.mark.parametrize("method", ["GET", "HEAD"])
async def test_probe_endpoints(server: DerpServer, path: str, method: str) -> None:
    head, body = await _request(server.port, _get(path, method))
    assert head.startswith(b"HTTP/1.1 200 ")
    assert _headers(head)["access-control-allow-origin"] == "*"
    assert body == b""


async def test_probe_bogus_method_is_405(server: DerpServer) -> None:
    head, body = await _request(server.port, _get("/derp/probe", "POST", "Content-Length: 0\r\n"))
    assert head.startswith(b"HTTP/1.1 405 ")
    assert body.rstrip(b"\n") == b"bogus probe method"


@pytest.mark.parametrize(
    ("challenge", "echoed"),
    [
        ("ts_derp1.example.com", True),
        ("a:b-c_d.e", True),
        ("x" * 64, True),
        ("x" * 65, False),
        ("bad challenge!", False),
        (None, False),
    ],
)
async def test_generate_204(server: DerpServer, challenge: str | None, echoed: bool) -> None:
    extra = f"X-Tailscale-Challenge: {challenge}\r\n" if challenge is not None else ""
    head, body = await _request(server.port, _get("/generate_204", extra=extra))
    assert head.startswith(b"HTTP/1.1 204 ")
    h = _headers(head)
    assert h["cache-control"] == "no-cache, no-store, must-revalidate, no-transform, max-age=0"
    if echoed:
        assert h["x-tailscale-response"] == f"response {challenge}"
    else:
        assert "x-tailscale-response" not in h
    assert body == b""


async def test_robots_home_and_404(server: DerpServer) -> None:
    head, body = await _request(server.port, _get("/robots.txt"))
    assert head.startswith(b"HTTP/1.1 200 ") and body == b"User-agent: *\nDisallow: /"
    head, body = await _request(server.port, _get("/"))
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"<html" in body and server.public_key.raw.hex().encode() in body
    head, _ = await _request(server.port, _get("/nope"))
    assert head.startswith(b"HTTP/1.1 404 ")


async def test_keep_alive_then_upgrade_on_same_connection(
    server: DerpServer, clients: list[RawClient]
) -> None:
    c = await RawClient.open(server.port)
    clients.append(c)
    c.send(b"GET /derp/probe HTTP/1.1\r\nHost: x\r\n\r\n")
    head = await c.read_http_head()
    assert head.startswith(b"HTTP/1.1 200 ")
    await c.handshake()
    assert server.client_count == 1


async def test_malformed_http_gets_400_and_close(server: DerpServer) -> None:
    head, _ = await _request(server.port, b"NOT HTTP AT ALL\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ")


async def test_server_stop_closes_derp_and_idle_http(
    server: DerpServer, connect: ClientFactory
) -> None:
    a = await connect()
    idle = await connect(handshake=False)
    await server.stop()
    await a.expect_closed()
    await idle.expect_closed()
    assert server.client_count == 0



@pytest.mark.single_worker("one HTTP connection's read/write buffers on one worker (2.5 s)")
async def test_pipelined_probes_from_a_non_reader_stop_being_read(server: DerpServer) -> None:
    """bench/soak.py: pipelined probes were all answered in one callback, with
    no regard for a client that never reads the answers (the write buffer grew
    as fast as it sent, the event loop stalled for seconds). Now the relay
    stops reading while its answers are unread."""
    import socket
    import time

    request = b"GET /derp/probe HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", server.port))
    sock.setblocking(False)

    def flood() -> None:  # until the socket stays unwritable for a second
        import select

        chunk = request * 1000
        while True:
            _, w, _ = select.select([], [sock], [], 1.0)
            if not w:
                return
            try:
                sock.send(chunk)
            except BlockingIOError:
                continue

    try:
        await asyncio.to_thread(flood)
        me = sock.getsockname()
        [conn] = [c for c in server._http if c.remote_addr == me]  # noqa: SLF001
        t = conn._transport  # noqa: SLF001
        assert t is not None
        bound = t.get_write_buffer_limits()[1] + 16 * 1024
        deadline = time.monotonic() + WAIT
        while t.is_reading():
            assert t.get_write_buffer_size() <= bound
            assert time.monotonic() < deadline, "the relay never stopped reading"
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.3)
        assert not t.is_reading() and t.get_write_buffer_size() <= bound
    finally:
        sock.close()


async def test_pipelined_probes_are_all_answered_in_order(server: DerpServer) -> None:
    from derp.server.http import ANSWERS_PER_CALL

    n = 5 * ANSWERS_PER_CALL + 3
    reqs = b"".join(
        (b"GET /derp/probe" if i % 2 else b"GET /generate_204") + b" HTTP/1.1\r\nHost: x\r\n\r\n"
        for i in range(n)
    )
    head, body = await _request(server.port, reqs + _get("/robots.txt"))
    data = head + b"\r\n\r\n" + body
    statuses = [int(ln.split(b" ")[1]) for ln in data.split(b"\r\n") if ln.startswith(b"HTTP/1.1 ")]
    assert statuses == [200 if i % 2 else 204 for i in range(n)] + [200]
