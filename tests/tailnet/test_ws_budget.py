"""Byte budgets of the API WebSockets (tailnet.http.websocket.ServerWebSocket).

Real sockets on 127.0.0.1; the misbehaving clients are raw sockets
(:mod:`tests.rawws`) that send frames and never read.
"""

from __future__ import annotations

import asyncio
import socket

import h11
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tailnet.http import HttpApiServer
from tailnet.http.request import Request
from tailnet.http.server import Response, Upgrade
from tailnet.http.websocket import READ_SLICE, ServerWebSocket
from tailnet.stack import TailnetStack

from ..memtransport import MemoryTransport
from .test_server_websocket import _upgraded
from ..rawws import OP_BINARY, OP_PING, push_until_stalled, ws_connect, ws_frame

T = 10.0


def _live_websockets(stack: TailnetStack) -> list[ServerWebSocket]:
    assert stack.http is not None
    return [ws for ws, _ in stack.http._upgrades.values()]


async def _wait_for(cond: object, timeout: float = T) -> None:
    assert callable(cond)

    async def poll() -> None:
        while not cond():
            await asyncio.sleep(0.01)

    await asyncio.wait_for(poll(), timeout)


@pytest.mark.parametrize("path", ["/api/v2/debug/ws", "/api/v2/derp-map"])
async def test_ping_flood_from_a_non_reader_is_bounded(stack: TailnetStack, path: str) -> None:
    """Pings are answered with pongs; a client that never reads them stalls
    (the server stops reading) instead of growing the server's write buffer."""
    sock, _ = await asyncio.to_thread(
        ws_connect,
        stack.http_port,
        path,
        {"Coder-Session-Token": stack.admin_token},
        rcvbuf=4096,
    )
    try:
        await _wait_for(lambda: len(_live_websockets(stack)) == 1)
        ws = _live_websockets(stack)[0]
        ping = ws_frame(OP_PING, b"p" * 125)
        sent, outcome = await asyncio.to_thread(
            push_until_stalled, sock, ping, limit=256 << 20, stall=1.0
        )
        assert outcome == "stalled", f"server kept reading {sent} bytes of pings ({outcome})"
        transport = ws._transport
        buffered = transport.get_write_buffer_size()
        high = transport.get_write_buffer_limits()[1]
        # at most the high-water mark plus the pongs for one read's worth of pings
        assert buffered <= high + (1 << 20), (buffered, high, sent)
    finally:
        sock.close()


async def test_inbound_queue_is_bounded_in_bytes() -> None:
    """A handler that does not call recv(): reading pauses once ``max_queue_bytes``
    are queued (well before 64 messages), and resumes when the handler drains."""
    got: asyncio.Queue[ServerWebSocket] = asyncio.Queue()
    drain = asyncio.Event()
    received: list[bytes] = []

    async def handler(ws: ServerWebSocket) -> None:
        await got.put(ws)
        await drain.wait()
        while (msg := await ws.recv()) is not None:
            assert isinstance(msg, bytes)
            received.append(msg)

    class App:
        async def handle(self, req: Request) -> Response | Upgrade:
            return Upgrade(handler, ping_interval=None)

    server = HttpApiServer(App())
    await server.start("127.0.0.1", 0)
    sock, _ = await asyncio.to_thread(ws_connect, server.port, "/any", rcvbuf=65536)
    try:
        ws = await asyncio.wait_for(got.get(), T)
        msg = b"m" * (256 << 10)
        frames = [ws_frame(OP_BINARY, bytes([i]) + msg[1:]) for i in range(40)]  # 10 MiB
        blob = b"".join(frames)
        sender = asyncio.create_task(asyncio.to_thread(sock.sendall, blob))
        await _wait_for(lambda: ws.queued_bytes >= 1 << 20)
        await asyncio.sleep(0.2)  # give the server every chance to read more (it must not)
        assert ws.queued_bytes <= (1 << 20) + len(msg), ws.queued_bytes
        assert not sender.done()  # the socket is full: the client is held back
        drain.set()
        await asyncio.wait_for(sender, T)
        await _wait_for(lambda: len(received) == 40)
        assert [m[0] for m in received] == list(range(40))
    finally:
        sock.close()
        await server.stop(1.0)


async def test_debug_ws_echo_closes_idle_connections(stack: TailnetStack) -> None:
    assert stack.api is not None
    stack.api.options.echo_idle_timeout = 0.3
    async with connect(
        stack.ws_url + "/api/v2/debug/ws",
        additional_headers={"Coder-Session-Token": stack.admin_token},
    ) as ws:
        await ws.send(b"x")
        assert await asyncio.wait_for(ws.recv(), T) == b"x"
        with pytest.raises(ConnectionClosed) as info:
            await asyncio.wait_for(ws.recv(), T)
    assert info.value.rcvd is not None
    assert (info.value.rcvd.code, info.value.rcvd.reason) == (1001, "idle timeout")


async def test_debug_ws_echo_to_a_non_reader_is_closed_when_idle(stack: TailnetStack) -> None:
    """A client that sends but never reads blocks the echo; that counts as idle."""
    assert stack.api is not None
    stack.api.options.echo_idle_timeout = 0.5
    sock, _ = await asyncio.to_thread(
        ws_connect,
        stack.http_port,
        "/api/v2/debug/ws",
        {"Coder-Session-Token": stack.admin_token},
        rcvbuf=4096,
    )
    try:
        await _wait_for(lambda: len(_live_websockets(stack)) == 1)
        big = ws_frame(OP_BINARY, b"e" * (1 << 20))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        await asyncio.to_thread(push_until_stalled, sock, big, limit=64 << 20, stall=0.5)
        await _wait_for(lambda: not _live_websockets(stack))
    finally:
        sock.close()


async def test_a_read_of_tiny_messages_is_parsed_a_slice_per_loop_iteration() -> None:
    """bench/soak.py: a 256 KiB read of one-byte messages held the event loop for
    ~250 ms. The parser gets READ_SLICE bytes at a time for at most PARSE_BUDGET
    per callback; the rest waits with reading paused, and is parsed in order as
    the handler drains the queue."""
    t = MemoryTransport()
    ws = _upgraded(t, ping_interval=None)
    n = 40_000
    ws.data_received(b"".join(ws_frame(OP_BINARY, bytes([i % 251])) for i in range(n)))
    assert READ_SLICE // len(ws_frame(OP_BINARY, b"x")) <= len(ws._messages) < n // 4
    assert not t.reading
    got: list[bytes | str | None] = []

    async def consume() -> None:
        while len(got) < n:
            got.append(await ws.recv())

    await asyncio.wait_for(consume(), T)
    assert got == [bytes([i % 251]) for i in range(n)]
    await _wait_for(lambda: t.reading)


async def test_bytes_read_before_eof_are_all_delivered() -> None:
    t = MemoryTransport()
    ws = _upgraded(t, ping_interval=None)
    n = 20_000
    ws.data_received(b"".join(ws_frame(OP_BINARY, bytes([i % 251])) for i in range(n)))
    assert ws.eof_received() is True  # kept open until what came before is parsed
    got = []
    while (msg := await ws.recv()) is not None:
        got.append(msg)
    assert got == [bytes([i % 251]) for i in range(n)]
    assert t.closed


async def test_big_messages_arrive_whole() -> None:
    t = MemoryTransport()
    ws = _upgraded(t, ping_interval=None)
    big = bytes(range(256)) * 1024  # 256 KiB, fed in READ_SLICE pieces
    ws.data_received(ws_frame(OP_BINARY, big) + ws_frame(OP_BINARY, b"after"))
    assert await asyncio.wait_for(ws.recv(), T) == big
    assert await asyncio.wait_for(ws.recv(), T) == b"after"
    await _wait_for(lambda: t.reading)
