"""DERP over WebSocket budgets: a client that sends WebSocket pings and never
reads cannot grow the server (the pipe stops reading while its writes back up),
and a read full of tiny messages is parsed a slice per loop iteration, in
order, without holding the event loop (CPU budget).

The client is a raw socket (:mod:`tests.rawws`) that logs in properly and then
floods pings, never reading the pongs.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable
from typing import Any

import pytest
from websockets.frames import Frame, Opcode
from websockets.protocol import CLIENT, OPEN, SERVER, Protocol as WsProtocol

import derp.websocket as derp_ws
from derp.frames import (
    HEADER_LEN,
    MAGIC,
    FrameType,
    encode_client_info,
    encode_recv_packet,
    encode_send_packet,
)
from derp.keys import PrivateKey, seal
from derp.server import DerpServer
from derp.websocket import MAX_MESSAGE_SIZE, READ_SLICE, WsPipe, WsTransport

from ..memtransport import MemoryTransport
from ..rawws import OP_BINARY, OP_PING, push_until_stalled, ws_connect, ws_frame
from .conftest import WAIT, make_config, wait_until


def _server_key_from(first: bytes) -> bytes:
    # first server message: WebSocket binary frame (unmasked) carrying ServerKey
    assert first[0] == 0x82, first[:2]
    n = first[1]
    payload = first[2 : 2 + n]
    assert payload[0] == FrameType.SERVER_KEY and payload[HEADER_LEN : HEADER_LEN + 8] == MAGIC
    return payload[HEADER_LEN + 8 : HEADER_LEN + 40]


async def test_ping_flood_from_a_non_reading_ws_client_is_bounded() -> None:
    server = DerpServer(make_config(write_timeout=30.0))  # the pipe alone must hold the line
    await server.start("127.0.0.1", 0)
    sock = None
    try:
        sock, early = await asyncio.to_thread(
            ws_connect, server.port, "/derp", subprotocol="derp", rcvbuf=4096
        )
        while len(early) < 2 + HEADER_LEN + 40:
            early += await asyncio.to_thread(sock.recv, 4096)
        server_key = _server_key_from(early)
        key = PrivateKey.generate()
        info = json.dumps({"version": 2}).encode()
        ci = encode_client_info(key.public.raw, seal(key, server_key, info))
        await asyncio.to_thread(sock.sendall, ws_frame(OP_BINARY, ci))
        await wait_until(lambda: server.client_count == 1)
        (conn,) = server.connections
        wst = conn._transport
        assert isinstance(wst, WsTransport)
        pipe = wst._pipe
        assert isinstance(pipe, WsPipe)

        ping = ws_frame(OP_PING, b"p" * 125)
        sent, outcome = await asyncio.to_thread(
            push_until_stalled, sock, ping, limit=256 << 20, stall=1.0
        )
        assert outcome == "stalled", f"server kept reading {sent} bytes of pings ({outcome})"
        buffered = pipe.transport.get_write_buffer_size()
        high = pipe.transport.get_write_buffer_limits()[1]
        assert buffered <= high + (1 << 20), (buffered, high, sent)
        assert server.client_count == 1  # nothing else happened to it yet
    finally:
        if sock is not None:
            sock.close()
        await server.stop()


# ------------------------------------------------------------------ CPU budget


class _Sink(asyncio.Protocol):
    def __init__(self) -> None:
        self.data = bytearray()
        self.calls = 0

    def data_received(self, data: bytes) -> None:
        self.data += data
        self.calls += 1


def _one_byte_messages(payload: bytes) -> bytes:
    """``payload`` as one client WebSocket message per byte (masked)."""
    peer = WsProtocol(CLIENT, state=OPEN)
    for b in payload:
        peer.send_binary(bytes([b]))
    return b"".join(peer.data_to_send())


def _pipe() -> tuple[WsPipe, MemoryTransport, _Sink]:
    tcp = MemoryTransport()
    pipe = WsPipe(tcp, WsProtocol(SERVER, state=OPEN, max_size=MAX_MESSAGE_SIZE))
    sink = _Sink()
    pipe.inner = sink
    sink.connection_made(pipe.wst)
    return pipe, tcp, sink


async def _until(cond: Callable[[], bool]) -> None:
    """Yield to the loop (other callbacks run) until ``cond()``; bounded by WAIT."""

    async def spin() -> None:
        while not cond():
            await asyncio.sleep(0)

    await asyncio.wait_for(spin(), WAIT)


@pytest.fixture
def one_slice_per_callback(monkeypatch: pytest.MonkeyPatch) -> None:
    """Spend no parse budget: every callback parses exactly one READ_SLICE,
    whatever the machine's speed (the tests then need no timing)."""
    monkeypatch.setattr(derp_ws, "PARSE_BUDGET", 0.0)


async def test_flood_of_one_byte_messages_yields_the_loop_and_keeps_order(
    one_slice_per_callback: None,
) -> None:
    payload = os.urandom(20_000)
    wire = _one_byte_messages(payload)  # 140,000 bytes: many slices
    assert len(wire) > 10 * READ_SLICE
    pipe, tcp, sink = _pipe()
    half = len(wire) // 2 + 3  # mid-frame: the parser must carry it over
    pipe.data_received(wire[:half])
    assert 0 < len(sink.data) < len(payload)  # only the first slice was parsed
    assert not tcp.reading  # the rest waits: no more socket reads meanwhile
    pipe.data_received(wire[half:])  # bytes the transport still delivered: appended

    seen: list[int] = []

    async def other_task() -> None:  # runs between slices
        while len(sink.data) < len(payload):
            seen.append(len(sink.data))
            await asyncio.sleep(0)

    await asyncio.wait_for(other_task(), WAIT)
    assert bytes(sink.data) == payload  # everything, in order
    assert len(set(seen)) > 10  # the other task ran while the flood was parsed
    assert sink.calls > 10  # delivered slice by slice
    assert tcp.reading  # reading resumed once the backlog was parsed
    assert not tcp.closed and not pipe.close_reason


async def test_pending_slices_wait_while_derp_or_the_write_buffer_holds_reading(
    one_slice_per_callback: None,
) -> None:
    payload = os.urandom(5_000)
    pipe, tcp, sink = _pipe()
    pipe.read_follows_write = True
    pipe.data_received(_one_byte_messages(payload))
    got = len(sink.data)
    assert 0 < got < len(payload)
    pipe.wst.pause_reading()  # e.g. the DERP receive limit
    pipe.pause_writing()  # the socket's write buffer is full
    for _ in range(5):
        await asyncio.sleep(0)
    assert len(sink.data) == got  # nothing parsed while held
    pipe.wst.resume_reading()
    for _ in range(5):
        await asyncio.sleep(0)
    assert len(sink.data) == got  # the write buffer still holds it
    assert not tcp.reading
    pipe.resume_writing()
    await _until(lambda: len(sink.data) >= len(payload))
    assert bytes(sink.data) == payload
    assert tcp.reading


async def test_eof_after_a_flood_comes_after_its_data(one_slice_per_callback: None) -> None:
    payload = os.urandom(3_000)
    pipe, tcp, sink = _pipe()
    pipe.data_received(_one_byte_messages(payload))
    assert pipe.eof_received() is True  # keep the socket until the backlog is parsed
    assert not tcp.closed
    await _until(lambda: tcp.closed)
    assert bytes(sink.data) == payload


async def test_text_message_inside_a_flood_drops_the_rest(one_slice_per_callback: None) -> None:
    peer = WsProtocol(CLIENT, state=OPEN)
    for _ in range(1000):
        peer.send_binary(b"a")
    peer.send_text(b"oops")
    for _ in range(3000):
        peer.send_binary(b"b")
    pipe, tcp, sink = _pipe()
    pipe.data_received(b"".join(peer.data_to_send()))
    await _until(lambda: tcp.closed)
    for _ in range(5):
        await asyncio.sleep(0)
    assert bytes(sink.data) == b"a" * 1000
    assert "text message" in pipe.close_reason


async def test_derp_packets_sent_as_one_byte_messages_arrive_whole() -> None:
    """End to end: a flood of one-byte messages carrying real DERP frames is parsed
    (in slices) and relayed intact."""
    server = DerpServer(make_config())
    await server.start("127.0.0.1", 0)
    sock = None
    try:
        sock, early = await asyncio.to_thread(ws_connect, server.port, "/derp", subprotocol="derp")
        while len(early) < 2 + HEADER_LEN + 40:
            early += await asyncio.to_thread(sock.recv, 4096)
        server_key = _server_key_from(early)
        key = PrivateKey.generate()
        info = json.dumps({"version": 2}).encode()
        ci = encode_client_info(key.public.raw, seal(key, server_key, info))
        await asyncio.to_thread(sock.sendall, ws_frame(OP_BINARY, ci))
        await wait_until(lambda: server.client_count == 1)
        packets = [os.urandom(1000) for _ in range(30)]
        stream = b"".join(encode_send_packet(key.public.raw, p) for p in packets)
        flood = b"".join(ws_frame(OP_BINARY, bytes([b])) for b in stream)
        await asyncio.to_thread(sock.sendall, flood)
        expected = b"".join(encode_recv_packet(key.public.raw, p) for p in packets)
        got = bytearray()
        sock.settimeout(WAIT)
        parser = WsProtocol(CLIENT, state=OPEN, max_size=None)
        while expected not in got:
            chunk = await asyncio.to_thread(sock.recv, 65536)
            assert chunk, "server closed"
            parser.receive_data(chunk)
            for ev in parser.events_received():
                if isinstance(ev, Frame) and ev.opcode in (Opcode.BINARY, Opcode.CONT):
                    got += ev.data
        assert server.client_count == 1
    finally:
        if sock is not None:
            sock.close()
        await server.stop()
