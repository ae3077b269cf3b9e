"""ServerWebSocket's lifecycle without tasks or Events: the server's ping
schedule (timers), waiters created on demand, and what the connection keeps
alive after the handshake. In-memory transport; frames written by hand
(RFC 6455: server frames unmasked, client frames masked)."""

from __future__ import annotations

import asyncio
import gc

import h11
import pytest
from websockets.http11 import Request as WsRequest

from tailnet.http.websocket import ServerWebSocket

from ..memtransport import MemoryTransport
from ..rawws import OP_BINARY, ws_frame

T = 10.0
OP_PONG = 0xA


def _upgraded(t: MemoryTransport, **kw: object) -> ServerWebSocket:
    req = h11.Request(method="GET", target="/ws", headers=[
        ("Host", "127.0.0.1"), ("Upgrade", "websocket"), ("Connection", "Upgrade"),
        ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="), ("Sec-WebSocket-Version", "13"),
    ])
    ws = ServerWebSocket.upgrade(t, req, **kw)  # type: ignore[arg-type]
    assert ws is not None
    head, _, rest = bytes(t.out).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101")
    # RFC 6455 §1.3's example key and its accept value
    assert b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in head
    t.out = bytearray(rest)
    return ws


async def _until(cond: object) -> None:
    assert callable(cond)

    async def poll() -> None:
        while not cond():
            await asyncio.sleep(0.005)

    await asyncio.wait_for(poll(), T)


def _server_pings(out: bytes) -> list[bytes]:
    """Payloads of the unmasked 4-byte pings (0x89 0x04 …) the server wrote."""
    pings, i = [], 0
    while i + 2 <= len(out):
        op, n = out[i], out[i + 1]
        if op == 0x89:
            pings.append(bytes(out[i + 2 : i + 2 + n]))
        i += 2 + n
    return pings


async def test_server_pings_on_a_timer_and_closes_1011_without_a_pong() -> None:
    t = MemoryTransport()
    # ping_timeout leaves the test's polling time to answer the first ping even
    # on a loaded machine (0.1 s failed about 1 run in 7 under load)
    ws = _upgraded(t, ping_interval=0.02, ping_timeout=0.5)
    await _until(lambda: len(_server_pings(bytes(t.out))) == 1)
    first = _server_pings(bytes(t.out))[0]
    assert len(first) == 4
    ws.data_received(ws_frame(OP_PONG, first))  # answered: the schedule goes on
    await _until(lambda: len(_server_pings(bytes(t.out))) == 2)
    assert ws.open
    # no answer to the second ping: close frame 1011 (0x03f3), reason given
    await _until(lambda: b"\x88" in bytes(t.out)[t.out.rindex(b"\x89") :])
    tail = bytes(t.out)[t.out.rindex(b"\x88") :]
    assert tail[2:4] == b"\x03\xf3" and b"keepalive ping timeout" in tail
    assert not ws.open
    assert await asyncio.wait_for(ws.recv(), T) is None
    ws.connection_lost(None)
    await asyncio.wait_for(ws.wait_closed(), T)


async def test_a_wrong_pong_does_not_count() -> None:
    t = MemoryTransport()
    ws = _upgraded(t, ping_interval=0.02, ping_timeout=0.1)
    await _until(lambda: len(_server_pings(bytes(t.out))) == 1)
    ws.data_received(ws_frame(OP_PONG, b"nope"))
    await _until(lambda: not ws.open)
    assert len(_server_pings(bytes(t.out))) == 1
    ws.connection_lost(None)


async def test_recv_after_a_cancelled_recv_still_gets_messages() -> None:
    t = MemoryTransport()
    ws = _upgraded(t, ping_interval=None)
    waiting = asyncio.create_task(ws.recv())
    await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    nxt = asyncio.create_task(ws.recv())
    await asyncio.sleep(0)
    ws.data_received(ws_frame(OP_BINARY, b"hello"))
    assert await asyncio.wait_for(nxt, T) == b"hello"
    ws.connection_lost(None)
    assert await asyncio.wait_for(ws.recv(), T) is None


async def test_drain_waiters_survive_one_of_them_being_cancelled() -> None:
    t = MemoryTransport()
    ws = _upgraded(t, ping_interval=None)
    ws.pause_writing()
    assert not ws.writable
    a = asyncio.create_task(ws.drain())
    b = asyncio.create_task(ws.drain())
    await asyncio.sleep(0)
    a.cancel()
    await asyncio.sleep(0)
    assert not b.done()
    ws.resume_writing()
    await asyncio.wait_for(b, T)
    assert ws.writable
    ws.pause_writing()
    c = asyncio.create_task(ws.drain())
    await asyncio.sleep(0)
    ws.connection_lost(None)  # a lost connection releases writers too
    await asyncio.wait_for(c, T)


async def test_the_handshake_request_is_not_kept_alive() -> None:
    """The handshake's parsed request (all its headers) is garbage once upgrade()
    returns: the connection is served by a protocol that never saw it."""

    def live_requests() -> int:
        gc.collect()
        return sum(1 for o in gc.get_objects() if isinstance(o, WsRequest))

    before = live_requests()
    t = MemoryTransport()
    ws = _upgraded(t, ping_interval=None)
    assert live_requests() == before
    ws.data_received(ws_frame(OP_BINARY, b"still works"))
    assert await asyncio.wait_for(ws.recv(), T) == b"still works"
    ws.connection_lost(None)


async def test_an_upgraded_connection_keeps_no_http_state() -> None:
    """Once the handshake is done the request task ends: the HTTP connection
    object (h11 state, request) and the task are garbage while the WebSocket lives on,
    and stop() still closes the live WebSocket with 1001."""
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    from tailnet.http import HttpApiServer
    from tailnet.http.request import Request
    from tailnet.http.server import Response, Upgrade, _ApiConnection

    running = asyncio.Event()
    got: list[bytes | str | None] = []

    async def handler(ws: ServerWebSocket) -> None:
        running.set()
        while (msg := await ws.recv()) is not None:
            got.append(msg)
            await ws.send(b"echo")

    class App:
        async def handle(self, req: Request) -> Response | Upgrade:
            return Upgrade(handler, ping_interval=None)

    def live_http_conns() -> int:  # this server's (other tests may have their own)
        gc.collect()
        return sum(
            1 for o in gc.get_objects() if type(o) is _ApiConnection and o._server is server
        )

    server = HttpApiServer(App())
    await server.start("127.0.0.1", 0)
    try:
        async with connect(f"ws://127.0.0.1:{server.port}/x") as client:
            await asyncio.wait_for(running.wait(), T)
            await asyncio.sleep(0)  # let the request task finish
            assert live_http_conns() == 0  # with it its h11 state and the request
            await client.send(b"hi")
            assert await asyncio.wait_for(client.recv(), T) == b"echo"
            assert len(server._upgrades) == 1
            await server.stop(1.0)
            with pytest.raises(ConnectionClosed) as info:
                await asyncio.wait_for(client.recv(), T)
            assert info.value.rcvd is not None and info.value.rcvd.code == 1001
        assert not server._upgrades
    finally:
        await server.stop(1.0)
