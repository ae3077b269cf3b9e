"""DERP server relaying over real sockets: packets, PeerGone, ping, duplicates."""

from __future__ import annotations

import asyncio

from derp.frames import DISCO_MAGIC, FrameType, PeerGoneReason
from derp.keys import PrivateKey
from derp.server import DerpServer

from .conftest import ClientFactory, wait_until


async def test_relay_between_two_clients(server: DerpServer, connect: ClientFactory) -> None:
    a = await connect()
    b = await connect()
    a.send_packet(b.pub, b"hello from a")
    assert await b.recv_packet() == (a.pub, b"hello from a")
    b.send_packet(a.pub, b"hi back")
    assert await a.recv_packet() == (b.pub, b"hi back")
    assert server.stats.packets_received == 2
    assert server.stats.packets_sent == 2
