"""DERP over WebSocket (spec §2.3) against the real server on 127.0.0.1.

Two kinds of client: our :class:`DerpClient` (``ws://`` URLs or
``websocket=True``) and an independent one, the ``websockets`` asyncio client,
driven with raw DERP frames, so message boundaries and bad inputs (text
messages, oversize messages) are under the test's control.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame, Opcode
from websockets.protocol import CLIENT, OPEN, SERVER, Protocol as WsProtocol, Side
from websockets.typing import Subprotocol

from derp.client import DerpClient
from derp.events import PacketReceived
from derp.frames import (
    HEADER_LEN,
    MAGIC,
    FrameType,
    encode_client_info,
    encode_ping,
    encode_send_packet,
)
from derp.keys import PrivateKey, open_sealed, seal
from derp.server import DerpServer
from derp.websocket import MAX_MESSAGE_SIZE, MAX_SEND_MESSAGE, WsPipe

from ..memtransport import MemoryTransport
from .conftest import WAIT, make_config, wait_until


class WsRaw:
    """DERP frames over a ``websockets`` client connection (byte-stream reassembly)."""

    def __init__(self, ws: ClientConnection, key: PrivateKey) -> None:
        self.ws = ws
        self.key = key
        self.buf = bytearray()
        self.server_key = b""

    @classmethod
    async def open(
        cls, port: int, key: PrivateKey | None = None, max_size: int | None = None, **kw: Any
    ) -> WsRaw:
        ws = await asyncio.wait_for(
            connect(
                f"ws://127.0.0.1:{port}/derp",
                subprotocols=[Subprotocol("derp")],
                max_size=max_size,
                **kw,
            ),
            WAIT,
        )
        return cls(ws, key or PrivateKey.generate())

    async def recv_frame(self) -> tuple[int, bytes]:
        while True:
            if len(self.buf) >= HEADER_LEN:
                n = int.from_bytes(self.buf[1:5], "big")
                if len(self.buf) >= HEADER_LEN + n:
                    t = self.buf[0]
                    payload = bytes(self.buf[HEADER_LEN : HEADER_LEN + n])
                    del self.buf[: HEADER_LEN + n]
                    return t, payload
            msg = await asyncio.wait_for(self.ws.recv(), WAIT)
            assert isinstance(msg, bytes), "server sent a text message"
            self.buf += msg

    async def recv_type(self, ftype: int) -> bytes:
        while True:
            t, p = await self.recv_frame()
            if t == ftype:
                return p

    def client_info(self) -> bytes:
        body = json.dumps({"version": 2, "CanAckPings": True}).encode()
        return encode_client_info(self.key.public.raw, seal(self.key, self.server_key, body))

    async def login(self) -> dict[str, Any]:
        t, p = await self.recv_frame()
        assert t == FrameType.SERVER_KEY and p[:8] == MAGIC
        self.server_key = p[8:40]
        await self.ws.send(self.client_info())
        p = await self.recv_type(FrameType.SERVER_INFO)
        info = json.loads(open_sealed(self.key, self.server_key, p))
        assert isinstance(info, dict)
        return info

    async def close_code(self) -> int | None:
        """Read until the server closes; return the close code it sent."""
        try:
            while True:
                await asyncio.wait_for(self.ws.recv(), WAIT)
        except ConnectionClosed as exc:
            return exc.rcvd.code if exc.rcvd is not None else None


@pytest.fixture
async def wss() -> AsyncIterator[list[WsRaw]]:
    made: list[WsRaw] = []
    yield made
    for w in made:
        await w.ws.close()


async def test_ws_handshake_no_compression_no_101_derp_headers(
    server: DerpServer, wss: list[WsRaw]
) -> None:
    w = await WsRaw.open(server.port)  # the websockets client offers permessage-deflate
    wss.append(w)
    assert w.ws.subprotocol == "derp"
    assert w.ws.response is not None
    assert "Sec-WebSocket-Extensions" not in w.ws.response.headers
    assert "Derp-Public-Key" not in w.ws.response.headers
    assert await w.login() == {"version": 2}
    assert server.stats.websocket_accepts == 1
    await wait_until(lambda: server.client_count == 1)


async def test_ws_frames_split_and_packed_across_messages(
    server: DerpServer, wss: list[WsRaw]
) -> None:
    a = await WsRaw.open(server.next_port())
    b = await WsRaw.open(server.next_port())  # two workers: on the other one
    wss += [a, b]
    await a.login()
    await b.login()
    await server.synced()
    # Three SendPackets in one message, then one frame split over three messages.
    pkts = [os.urandom(n) for n in (1, 100, 1400)]
    await a.ws.send(b"".join(encode_send_packet(b.key.public.raw, p) for p in pkts))
    big = os.urandom(5000)
    frame = encode_send_packet(b.key.public.raw, big)
    for part in (frame[:3], frame[3:2000], frame[2000:]):
        await a.ws.send(part)
    for want in pkts + [big]:
        p = await b.recv_type(FrameType.RECV_PACKET)
        assert p[:32] == a.key.public.raw and p[32:] == want


async def test_ws_and_tcp_clients_talk_64k_both_ways(server: DerpServer) -> None:
    ws_client = DerpClient(f"ws://127.0.0.1:{server.next_port()}", PrivateKey.generate())
    tcp_client = DerpClient(f"http://127.0.0.1:{server.next_port()}", PrivateKey.generate())
    big = os.urandom(64 * 1024)
    async with ws_client, tcp_client:
        await server.synced()
        for src, dst in ((ws_client, tcp_client), (tcp_client, ws_client)):
            for pkt in (b"hello", big):
                await src.send(dst.public_key, pkt)
                ev = await asyncio.wait_for(dst.recv(), WAIT)
                assert isinstance(ev, PacketReceived)
                assert ev.src == src.public_key and ev.data == pkt
    assert server.stats.websocket_accepts == 1


GO_READ_LIMIT = 32768  # nhooyr.io/websocket's default per-message read limit


async def test_go_read_limit_client_survives_64k_packets_and_bursts(
    server: DerpServer, wss: list[WsRaw]
) -> None:
    """A receiver that, like Go's WebSocket library, refuses messages over 32 KiB.

    The relay coalesces everything for one destination that one read produced;
    with 100 packets per sender message that is ~140 KiB, which must reach the
    receiver as several messages, never one it would close with 1009.
    """
    rx = await WsRaw.open(server.next_port(), max_size=GO_READ_LIMIT)
    tx = await WsRaw.open(server.next_port())
    wss += [rx, tx]
    await rx.login()
    await tx.login()
    await wait_until(lambda: server.client_count == 2)
    await server.synced()
    sent: list[bytes] = []
    big = [os.urandom(64 * 1024) for _ in range(3)]
    for p in big:
        await tx.ws.send(encode_send_packet(rx.key.public.raw, p))
    sent += big
    for burst in range(4):
        pkts = [bytes([burst, i % 256]) + os.urandom(1398) for i in range(100)]
        await tx.ws.send(b"".join(encode_send_packet(rx.key.public.raw, p) for p in pkts))
        sent += pkts
    for want in sent:
        p = await rx.recv_type(FrameType.RECV_PACKET)
        assert p[:32] == tx.key.public.raw and p[32:] == want
    assert rx.ws.state is OPEN and server.client_count == 2


async def test_websocket_option_with_http_url(server: DerpServer) -> None:
    c = DerpClient(f"http://127.0.0.1:{server.port}", PrivateKey.generate(), websocket=True)
    async with c:
        assert c.server_key == server.public_key
        assert await c.ping() >= 0
    assert server.stats.websocket_accepts == 1


async def test_text_message_closes_with_1003(server: DerpServer, wss: list[WsRaw]) -> None:
    w = await WsRaw.open(server.port)
    wss.append(w)
    await w.login()
    await wait_until(lambda: server.client_count == 1)
    await w.ws.send("not binary")
    assert await w.close_code() == 1003
    await wait_until(lambda: server.client_count == 0)


async def test_oversize_message_closes_with_1009_others_unaffected(
    server: DerpServer, wss: list[WsRaw]
) -> None:
    bad = await WsRaw.open(server.next_port())
    a = await WsRaw.open(server.next_port())
    b = await WsRaw.open(server.next_port())
    wss += [bad, a, b]
    for w in (bad, a, b):
        await w.login()
    await server.synced()
    await bad.ws.send(b"\x00" * (MAX_MESSAGE_SIZE + 1))
    assert await bad.close_code() == 1009
    await a.ws.send(encode_send_packet(b.key.public.raw, b"still fine"))
    p = await b.recv_type(FrameType.RECV_PACKET)
    assert p[32:] == b"still fine"
    await wait_until(lambda: server.client_count == 2)


async def test_close_1000_is_eof(server: DerpServer, wss: list[WsRaw]) -> None:
    w = await WsRaw.open(server.port)
    await w.login()
    await wait_until(lambda: server.client_count == 1)
    await asyncio.wait_for(w.ws.close(1000), WAIT)
    await wait_until(lambda: server.client_count == 0)


async def test_peer_close_code_and_reason_are_logged(
    server: DerpServer, caplog: pytest.LogCaptureFixture
) -> None:
    w = await WsRaw.open(server.port)
    await w.login()
    await wait_until(lambda: server.client_count == 1)
    with caplog.at_level("INFO", logger="derp.websocket"):
        await asyncio.wait_for(w.ws.close(1009, "read limited at 32769 bytes"), WAIT)
        await wait_until(lambda: server.client_count == 0)
    assert "closed by peer (code 1009 'read limited at 32769 bytes')" in caplog.text


async def test_ping_pong_and_malformed_derp_frame_over_ws(
    server: DerpServer, wss: list[WsRaw]
) -> None:
    w = await WsRaw.open(server.port)
    wss.append(w)
    await w.login()
    await w.ws.send(encode_ping(b"12345678"))
    assert await w.recv_type(FrameType.PONG) == b"12345678"
    # A SendPacket too short for its key is a DERP protocol error: connection closed.
    await w.ws.send(b"\x04\x00\x00\x00\x05hello")
    await w.close_code()
    await wait_until(lambda: server.client_count == 0)
    assert server.stats.protocol_errors == 1


async def test_ws_backpressure_small_write_buffer() -> None:
    """Write backpressure passes through the WebSocket adapter (small buffer limit)."""
    srv = DerpServer(make_config(write_buffer_high=1024))
    await srv.start("127.0.0.1", 0)
    try:
        c = DerpClient(f"ws://127.0.0.1:{srv.port}", PrivateKey.generate())
        async with c:
            for _ in range(20):
                await c.send(c.public_key, os.urandom(1400))  # to ourselves
            got = 0
            while got < 20:
                ev = await asyncio.wait_for(c.recv(), WAIT)
                if isinstance(ev, PacketReceived):
                    got += 1
    finally:
        await srv.stop()


class _EchoInner(asyncio.Protocol):
    """Inner DERP protocol that answers every chunk at once (like a Pong to a Ping)."""

    def __init__(self) -> None:
        self.got: list[bytes] = []
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.got.append(data)
        assert self.transport is not None
        self.transport.write(b"reply")


@pytest.mark.parametrize("side", [CLIENT, SERVER])
@pytest.mark.parametrize("ending", ["close", "text"])
def test_inner_write_after_peer_close_in_same_read_is_dropped(side: Side, ending: str) -> None:
    """Data followed by a close (or a text message) in one read: the inner protocol's
    reply to that data must be dropped quietly, not raise out of ``data_received``."""
    peer = WsProtocol(SERVER if side is CLIENT else CLIENT, state=OPEN)
    peer.send_binary(b"data")
    if ending == "close":
        peer.send_close(1000)
    else:
        peer.send_text(b"oops")
    wire = b"".join(peer.data_to_send())
    tcp = MemoryTransport()
    pipe = WsPipe(tcp, WsProtocol(side, state=OPEN, max_size=MAX_MESSAGE_SIZE))
    inner = _EchoInner()
    pipe.inner = inner
    inner.connection_made(pipe.wst)
    pipe.data_received(wire)
    assert inner.got == [b"data"]
    assert tcp.closed and pipe.close_reason
    pipe.wst.write(b"late write")  # after the close: also dropped


def test_write_after_peer_eof_is_dropped() -> None:
    """A write from elsewhere between the peer's EOF and ``connection_lost`` is a no-op."""
    tcp = MemoryTransport()
    pipe = WsPipe(tcp, WsProtocol(CLIENT, state=OPEN, max_size=MAX_MESSAGE_SIZE))
    pipe.eof_received()
    pipe.wst.write(b"late write")
    assert tcp.out == b""


def test_write_after_abort_is_dropped() -> None:
    tcp = MemoryTransport()
    pipe = WsPipe(tcp, WsProtocol(SERVER, state=OPEN, max_size=MAX_MESSAGE_SIZE))
    pipe.wst.write(b"before")
    sent = len(tcp.out)
    assert sent > 0
    pipe.wst.abort()
    assert pipe.wst.is_closing()
    pipe.wst.write(b"after")
    assert len(tcp.out) == sent


@pytest.mark.parametrize("side", [CLIENT, SERVER])
def test_pong_goes_out_before_the_reply_to_data_of_the_same_read(side: Side) -> None:
    """Frames the protocol produces itself (a pong) and DERP writes (serialized
    directly) keep their order on the wire; each side masks as RFC 6455 says."""
    peer_side = SERVER if side is CLIENT else CLIENT
    peer = WsProtocol(peer_side, state=OPEN)
    peer.send_ping(b"p1")
    peer.send_binary(b"data")
    tcp = MemoryTransport()
    pipe = WsPipe(tcp, WsProtocol(side, state=OPEN, max_size=MAX_MESSAGE_SIZE))
    inner = _EchoInner()
    pipe.inner = inner
    inner.connection_made(pipe.wst)
    pipe.data_received(b"".join(peer.data_to_send()))
    pipe.wst.write(os.urandom(MAX_SEND_MESSAGE + 10))  # two messages
    peer.receive_data(bytes(tcp.out))  # the peer's parser rejects wrong masking
    frames = [e for e in peer.events_received() if isinstance(e, Frame)]
    assert [f.opcode for f in frames] == [Opcode.PONG, Opcode.BINARY, Opcode.BINARY, Opcode.BINARY]
    assert frames[0].data == b"p1" and frames[1].data == b"reply"
    assert [len(f.data) for f in frames[2:]] == [MAX_SEND_MESSAGE, 10]
    assert peer.parser_exc is None
