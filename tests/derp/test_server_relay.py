"""DERP server relaying over real sockets: packets, PeerGone, ping, duplicates, isolation."""

from __future__ import annotations

import asyncio
import os

import pytest
import uvloop

from derp.frames import (
    DISCO_MAGIC,
    MAX_PACKET_SIZE,
    FrameType,
    PeerGoneReason,
    encode_close_peer,
    encode_forward_packet,
    encode_frame,
    encode_note_preferred,
    encode_ping,
    encode_send_packet,
    encode_watch_conns,
)
from derp.keys import PrivateKey
from derp.server import DerpServer
from derp.stats import KIND_DISCO, KIND_OTHER, QUEUE_HEAD, QUEUE_TAIL, UNKNOWN_DEST, WRITE_ERROR

from .conftest import (
    WAIT,
    ClientFactory,
    Host,
    HostFactory,
    RawClient,
    make_config,
    start_host,
    wait_until,
)

DISCO = DISCO_MAGIC + bytes(56)  # 62 bytes: looks like disco


async def test_relay_between_two_clients(server: DerpServer, connect: ClientFactory) -> None:
    a = await connect()
    b = await connect()
    a.send_packet(b.pub, b"hello from a")
    assert await b.recv_packet() == (a.pub, b"hello from a")
    b.send_packet(a.pub, b"hi back")
    assert await a.recv_packet() == (b.pub, b"hi back")
    assert server.stats.packets_received == 2
    assert server.stats.packets_sent == 2
    assert server.stats.bytes_received == len(b"hello from a") + len(b"hi back")


async def test_relay_many_clients_all_pairs(server: DerpServer, connect: ClientFactory) -> None:
    cs = [await connect() for _ in range(10)]
    for i, src in enumerate(cs):
        for j, dst in enumerate(cs):
            if i != j:
                src.send_packet(dst.pub, f"{i}->{j}".encode() * (1 + j))

    async def collect(j: int, c: RawClient) -> None:
        got = {await c.recv_packet() for _ in range(len(cs) - 1)}
        want = {(cs[i].pub, f"{i}->{j}".encode() * (1 + j)) for i in range(len(cs)) if i != j}
        assert got == want

    await asyncio.gather(*(collect(j, c) for j, c in enumerate(cs)))


async def test_many_packets_in_one_write_keep_order(
    server: DerpServer, connect: ClientFactory
) -> None:
    a = await connect()
    b = await connect()
    a.send(b"".join(encode_send_packet(b.pub, i.to_bytes(4, "big") * 50) for i in range(500)))
    for i in range(500):
        assert await b.recv_packet() == (a.pub, i.to_bytes(4, "big") * 50)


async def test_frames_split_byte_by_byte(server: DerpServer, connect: ClientFactory) -> None:
    a = await connect()
    b = await connect()
    data = encode_send_packet(b.pub, b"split") + encode_ping(b"pingping")
    for i in range(len(data)):
        a.send(data[i : i + 1])
        await a.writer.drain()
    assert await b.recv_packet() == (a.pub, b"split")
    assert (await a.recv_type(FrameType.PONG)).payload == b"pingping"


async def test_zero_length_packet_and_send_to_self(
    server: DerpServer, connect: ClientFactory
) -> None:
    a = await connect()
    b = await connect()
    a.send_packet(b.pub, b"")
    assert await b.recv_packet() == (a.pub, b"")
    a.send_packet(a.pub, b"me")
    assert await a.recv_packet() == (a.pub, b"me")


async def test_64k_packet_ok_and_64k_plus_one_closes_sender_only(
    server: DerpServer, connect: ClientFactory
) -> None:
    a = await connect()
    b = await connect()
    big = os.urandom(MAX_PACKET_SIZE)
    a.send_packet(b.pub, big)
    assert await b.recv_packet() == (a.pub, big)
    bad = await connect()
    too_big = bytes([FrameType.SEND_PACKET]) + (32 + MAX_PACKET_SIZE + 1).to_bytes(4, "big")
    bad.send(too_big + b.pub + bytes(MAX_PACKET_SIZE + 1))
    await bad.expect_closed()
    a.send_packet(b.pub, b"after")
    assert await b.recv_packet() == (a.pub, b"after")
    assert server.stats.protocol_errors == 1


@pytest.mark.parametrize(
    "frame",
    [
        encode_frame(FrameType.SEND_PACKET, bytes(31)),  # no room for the key
        bytes([0x30]) + (1 << 31).to_bytes(4, "big"),  # absurd length, unknown type
        encode_frame(FrameType.NOTE_PREFERRED, b"\x01\x01"),
        encode_frame(FrameType.NOTE_PREFERRED, b""),
        encode_frame(FrameType.PING, b"1234567"),
        encode_frame(FrameType.PING, bytes(1001)),
        encode_watch_conns(),  # mesh-only frames from a non-mesh client
        encode_close_peer(bytes(range(32))),
        encode_forward_packet(bytes(range(32)), bytes(range(1, 33)), b"x"),
    ],
    ids=[
        "send31", "oversize-header", "prefer2", "prefer0", "ping7", "ping1001",
        "watchconns", "closepeer", "forwardpacket",
    ],
)
async def test_malformed_frame_closes_only_offender(
    server: DerpServer, connect: ClientFactory, frame: bytes
) -> None:
    a = await connect()
    b = await connect()
    bad = await connect()
    bad.send_packet(b.pub, b"before")  # frames before the bad one are still relayed
    bad.send(frame)
    assert await b.recv_packet() == (bad.pub, b"before")
    await bad.expect_closed()
    await wait_until(lambda: server.client_count == 2)
    a.send_packet(b.pub, b"others fine")
    assert await b.recv_packet() == (a.pub, b"others fine")


async def test_unknown_frame_types_skipped(server: DerpServer, connect: ClientFactory) -> None:
    a = await connect()
    b = await connect()
    a.send(
        encode_frame(0x30, b"future frame")
        + encode_frame(FrameType.KEEP_ALIVE)
        + encode_frame(FrameType.PONG, b"12345678")
        + encode_frame(0xFF, bytes(1000))
        + encode_send_packet(b.pub, b"after unknown")
    )
    assert await b.recv_packet() == (a.pub, b"after unknown")
    assert server.stats.unknown_frames == 4
    assert server.client_count == 2


async def test_ping_pong(server: DerpServer, connect: ClientFactory) -> None:
    a = await connect()
    a.send(encode_ping(b"\x01\x02\x03\x04\x05\x06\x07\x08"))
    f = await a.recv_type(FrameType.PONG)
    assert f.payload == b"\x01\x02\x03\x04\x05\x06\x07\x08"
    a.send(encode_frame(FrameType.PING, b"ABCDEFGH" + bytes(992)))  # 1000: extra discarded
    assert (await a.recv_type(FrameType.PONG)).payload == b"ABCDEFGH"
    assert server.stats.got_ping == 2 and server.stats.sent_pong == 2


async def test_note_preferred_counts_home(server: DerpServer, connect: ClientFactory) -> None:
    a = await connect()
    a.send(encode_note_preferred(True) + encode_ping(b"pppppppp"))
    await a.recv_type(FrameType.PONG)
    assert server.stats.current_home_connections == 1
    a.send(encode_note_preferred(False) + encode_ping(b"pppppppp"))
    await a.recv_type(FrameType.PONG)
    assert server.stats.current_home_connections == 0


async def test_peer_gone_disconnected_after_last_connection(
    server: DerpServer, connect: ClientFactory
) -> None:
    key = PrivateKey.generate()
    a1 = await connect(key)
    a2 = await connect(key)
    b = await connect()
    c = await connect()
    a2.send_packet(b.pub, b"from a")  # b now has a return route to a
    assert await b.recv_packet() == (a2.pub, b"from a")
    await a2.close()
    await wait_until(lambda: server.client_count == 3)
    # a1 remains: no PeerGone. The next frame b sees must be c's packet.
    c.send_packet(b.pub, b"from c")
    f = await b.recv_frame()
    assert f.type == FrameType.RECV_PACKET and f.payload[:32] == c.pub
    await a1.close()
    f = await b.recv_type(FrameType.PEER_GONE)
    assert f.payload == key.public.raw + bytes([PeerGoneReason.DISCONNECTED])
    # c never received from a: it gets nothing. Its next frame is its own pong.
    c.send(encode_ping(b"cccccccc"))
    f = await c.recv_frame()
    assert f.type == FrameType.PONG
    assert server.stats.peer_gone_disconnected_frames == 1


async def test_peer_gone_not_here_for_disco_only_rate_limited(
    server: DerpServer, connect: ClientFactory
) -> None:
    a = await connect()
    unknown = PrivateKey.generate().public.raw
    a.send(encode_send_packet(unknown, b"not disco" * 10) + encode_ping(b"11111111"))
    f = await a.recv_frame()
    assert f.type == FrameType.PONG  # no PeerGone for non-disco packets
    a.send(b"".join(encode_send_packet(unknown, DISCO) for _ in range(6)) + encode_ping(b"2" * 8))
    gone = 0
    while (f := await a.recv_frame()).type != FrameType.PONG:
        assert f.type == FrameType.PEER_GONE
        assert f.payload == unknown + bytes([PeerGoneReason.NOT_HERE])
        gone += 1
    assert 3 <= gone < 6  # burst of 3, refilled at 1/s
    drops = server.stats.packets_dropped
    assert drops[UNKNOWN_DEST, KIND_OTHER] == 1 and drops[UNKNOWN_DEST, KIND_DISCO] == 6


async def test_duplicates_most_recently_active_receives(
    server: DerpServer, connect: ClientFactory
) -> None:
    key = PrivateKey.generate()
    a1 = await connect(key)
    a2 = await connect(key)  # newest: active
    b = await connect()
    b.send_packet(key.public.raw, b"one")
    assert await a2.recv_packet() == (b.pub, b"one")
    a1.send(encode_ping(b"a1a1a1a1"))  # a1 speaks: becomes active
    await a1.recv_type(FrameType.PONG)
    b.send_packet(key.public.raw, b"two")
    assert await a1.recv_packet() == (b.pub, b"two")
    await a1.close()  # active leaves: a2 (the remaining sender) takes over
    await wait_until(lambda: server.client_count == 2)
    b.send_packet(key.public.raw, b"three")
    assert await a2.recv_packet() == (b.pub, b"three")
    assert server.stats.total_dup_client_conns == 1


async def test_stalled_receiver_does_not_slow_others(
    server: DerpServer, connect: ClientFactory
) -> None:
    s = await connect(worker=0)
    live = await connect(worker=1)  # two workers: live across the link, stalled not
    stalled = await connect(rcvbuf=4096, worker=0)
    stalled.writer.transport.pause_reading()
    big = bytes(60_000)
    n = 200  # 12 MB to the stalled receiver: far beyond socket buffers + queue
    for i in range(n):
        s.send(encode_send_packet(stalled.pub, big) + encode_send_packet(live.pub, i.to_bytes(4, "big")))
        if i % 16 == 0:
            await s.writer.drain()
    for i in range(n):
        assert await live.recv_packet() == (s.pub, i.to_bytes(4, "big"))
    st = server.stats
    head = st.packets_dropped[QUEUE_HEAD, KIND_OTHER] + st.packets_dropped[QUEUE_TAIL, KIND_OTHER]
    assert head > 0
    assert server.client_count == 3  # the stalled one is slow, not closed


async def test_stalled_receiver_on_another_worker_costs_others_nothing(
    server: Host, connect: ClientFactory
) -> None:
    """Two workers: the stalled receiver and live sit behind the link from the
    sender's worker (every read of s alternates runs for both, past COALESCE_LIMIT)."""
    s = await connect(worker=0)
    live = await connect(worker=1)
    stalled = await connect(rcvbuf=4096, worker=1)
    stalled.writer.transport.pause_reading()
    big = bytes(60_000)
    n = 200
    for i in range(n):
        s.send(encode_send_packet(stalled.pub, big) + encode_send_packet(live.pub, i.to_bytes(4, "big")))
        if i % 16 == 0:
            await s.writer.drain()
    await s.writer.drain()
    # Everything sent has left the links (two workers), then a last packet for live.
    await wait_until(
        lambda: all(
            link.transport is None or link.transport.get_write_buffer_size() == 0
            for node in server.nodes
            for link in node.links.values()
        )
    )
    s.send_packet(live.pub, b"end")
    got = []
    while (p := await live.recv_packet()) != (s.pub, b"end"):
        got.append(p)
    assert got == sorted(got) and server.client_count == 3
    assert len(got) == n  # nothing of live's lost: the stalled one's packets queue apart
    assert server.stats.packets_dropped[WRITE_ERROR, KIND_OTHER] == 0


async def test_keepalive_sent_periodically(make_host: HostFactory, connect: ClientFactory) -> None:
    h = await make_host(keepalive_interval=0.2, keepalive_jitter=0.0)
    for c in [await connect(host=h) for _ in range(h.workers)]:  # one on each worker
        for _ in range(2):
            f = await c.recv_frame(WAIT)
            assert f.type == FrameType.KEEP_ALIVE and f.payload == b""
    assert h.stats.keepalives_sent >= 2 * h.workers


async def test_mesh_client_forward_and_close_peer(
    make_host: HostFactory, connect: ClientFactory
) -> None:
    mesh = bytes(range(32))
    h = await make_host(mesh_key=mesh)
    m = await connect(info={"meshKey": mesh.hex(), "version": 2}, host=h)
    b = await connect(host=h)  # two workers: on the other worker than the mesh client
    remote = PrivateKey.generate().public.raw
    m.send(encode_forward_packet(remote, b.pub, b"via mesh"))
    assert await b.recv_packet() == (remote, b"via mesh")
    m.send(encode_watch_conns())
    present = {(await m.recv_type(FrameType.PEER_PRESENT)).payload[:32] for _ in range(2)}
    assert present == {m.pub, b.pub}
    m.send(encode_close_peer(b.pub))
    await b.expect_closed()
    f = await m.recv_type(FrameType.PEER_GONE)
    assert f.payload[:32] == b.pub


def test_relay_under_uvloop(derp_workers: int) -> None:
    async def main() -> None:
        h = await start_host(make_config(), derp_workers)
        a = await RawClient.open(h.next_port())
        w = h.next_worker()
        b = await RawClient.open(h.servers[w].port)
        try:
            await a.handshake()
            await b.handshake()
            await h.known(b.pub, w)
            payload = os.urandom(1400)
            for _ in range(100):
                a.send_packet(b.pub, payload)
            for _ in range(100):
                assert await b.recv_packet() == (a.pub, payload)
        finally:
            await a.close()
            await b.close()
            await h.stop()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(asyncio.wait_for(main(), WAIT))


async def test_opt_in_uvloop_mode_applies() -> None:
    """``DERP_TEST_UVLOOP=1`` runs this directory's async tests on uvloop."""
    on_uvloop = isinstance(asyncio.get_running_loop(), uvloop.Loop)
    assert on_uvloop == (os.environ.get("DERP_TEST_UVLOOP") == "1")
