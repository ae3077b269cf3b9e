"""DERP over WebSocket: a client that sends WebSocket pings and never reads
cannot grow the server (the pipe stops reading while its writes back up).

The client is a raw socket (:mod:`tests.rawws`) that logs in properly and then
floods pings, never reading the pongs.
"""

from __future__ import annotations

import asyncio
import json

from derp.frames import HEADER_LEN, MAGIC, FrameType, encode_client_info
from derp.keys import PrivateKey, seal
from derp.server import DerpServer
from derp.websocket import WsPipe, WsTransport

from ..rawws import OP_BINARY, OP_PING, push_until_stalled, ws_connect, ws_frame
from .conftest import make_config, wait_until


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
