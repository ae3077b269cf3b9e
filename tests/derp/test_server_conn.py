"""DERP connection logic without sockets: ``DerpServer.accept`` on in-memory transports.

Hypothesis checks that relaying is independent of how the client's byte
stream is split into reads (the hot path parses whole chunks and keeps a
partial frame between reads).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from derp.frames import (
    FrameDecoder,
    FrameType,
    encode_client_info,
    encode_ping,
    encode_send_packet,
)
from derp.keys import PrivateKey, seal
from derp.server import DerpServer

from .conftest import HostFactory, make_config, start_host, wait_until

SERVER_KEY = PrivateKey.generate()
A = PrivateKey.generate()
B = PrivateKey.generate()


class MemoryTransport(asyncio.Transport):
    """Collects written bytes; supports the calls the DERP server makes."""

    def __init__(self) -> None:
        super().__init__()
        self.out = bytearray()
        self.closed = False
        self.protocol: Any = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.out += data

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self.protocol  # type: ignore[no-any-return]

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            asyncio.get_running_loop().call_soon(self.protocol.connection_lost, None)

    def abort(self) -> None:
        self.close()

    def frames(self) -> list[tuple[int, bytes]]:
        d = FrameDecoder()
        d.feed(bytes(self.out))
        return [(f.type, f.payload) for f in d]


def client_info(key: PrivateKey) -> bytes:
    body = json.dumps({"version": 2}).encode()
    return encode_client_info(key.public.raw, seal(key, SERVER_KEY.public, body))


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:]) if b > a]


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    packets=st.lists(st.binary(max_size=300), min_size=1, max_size=12),
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=20),
)
def test_relay_independent_of_read_chunking(packets: list[bytes], cuts: list[int]) -> None:
    async def run() -> None:
        srv = DerpServer(make_config(private_key=SERVER_KEY))
        tb = MemoryTransport()
        cb = srv.accept(tb, fast_start=True, initial_data=client_info(B))
        ta = MemoryTransport()
        stream = client_info(A) + b"".join(
            encode_send_packet(B.public.raw, p) for p in packets
        ) + encode_ping(b"pingpong")
        chunks = split(stream, cuts)
        ca = srv.accept(ta, fast_start=True, initial_data=chunks[0])
        for ch in chunks[1:]:
            ca.data_received(ch)
        await asyncio.sleep(0)  # batches are written at the end of the loop iteration
        got = [(t, p) for t, p in tb.frames() if t == FrameType.RECV_PACKET]
        assert got == [(FrameType.RECV_PACKET, A.public.raw + p) for p in packets]
        fa = ta.frames()
        assert [t for t, _ in fa] == [FrameType.SERVER_KEY, FrameType.SERVER_INFO, FrameType.PONG]
        assert srv.stats.packets_received == len(packets) == srv.stats.packets_sent
        assert cb.is_open and ca.is_open
        await srv.stop()

    asyncio.run(run())


async def test_paused_receiver_queue_drop_policy(make_host: HostFactory) -> None:
    h = await make_host(private_key=SERVER_KEY, queue_depth=4)
    tb = MemoryTransport()
    cb = h.servers[-1].accept(tb, fast_start=True, initial_data=client_info(B))
    ta = MemoryTransport()  # two workers: A on worker 0, B on worker 1
    ca = h.servers[0].accept(ta, fast_start=True, initial_data=client_info(A))
    await h.known(B.public.raw, h.workers - 1)
    before = len(tb.out)
    cb.pause_writing()
    ca.data_received(b"".join(encode_send_packet(B.public.raw, bytes([i])) for i in range(10)))
    await wait_until(lambda: h.stats.packets_dropped["queue_head", "other"] == 6)
    assert len(tb.out) == before  # nothing written while paused
    cb.resume_writing()  # queue drained in order: the 4 newest packets
    got = [p for t, p in tb.frames() if t == FrameType.RECV_PACKET]
    assert got == [A.public.raw + bytes([i]) for i in range(6, 10)]
    assert h.servers[-1].stats.packets_sent == 4  # by B's worker
    assert h.stats.packets_sent == 4  # host total: each packet counted once


async def test_paused_duplicate_leaving_hands_its_held_packets_to_the_other() -> None:
    """Two workers: B has two connections on worker 1, the newer one paused, so
    worker 0 holds A's packets for B (PAUSE). When the paused one leaves, the
    other receives for B, worker 0 is told (RESUME) and sends what it held."""
    h = await start_host(make_config(private_key=SERVER_KEY, queue_depth=8), 2)
    try:
        t1, t2, ta = MemoryTransport(), MemoryTransport(), MemoryTransport()
        h.servers[1].accept(t1, fast_start=True, initial_data=client_info(B))
        c2 = h.servers[1].accept(t2, fast_start=True, initial_data=client_info(B))
        ca = h.servers[0].accept(ta, fast_start=True, initial_data=client_info(A))
        await h.known(B.public.raw, 1)
        c2.pause_writing()
        si = h.nodes[0].stand_ins[B.public.raw]
        await wait_until(lambda: si._paused)
        ca.data_received(b"".join(encode_send_packet(B.public.raw, bytes([i])) for i in range(3)))
        assert len(si._q or ()) == 3  # held on worker 0
        c2.close("test: the paused duplicate leaves")
        await wait_until(lambda: len([f for f in t1.frames() if f[0] == FrameType.RECV_PACKET]) == 3)
        got = [p for t, p in t1.frames() if t == FrameType.RECV_PACKET]
        assert got == [A.public.raw + bytes([i]) for i in range(3)]
        assert not si._paused
    finally:
        await h.stop()


async def test_duplicates_registered_at_once_agree_on_one_receiver(
    make_host: HostFactory,
) -> None:
    """Two connections of one key register in one callback, on different workers
    (two): neither worker has heard of the other's, and no ACTIVE follows either
    PRESENT. Every sender still reaches the same one of them, and once the other
    speaks, that one, wherever the sender is."""
    h = await make_host(private_key=SERVER_KEY)
    last = h.workers - 1
    key = PrivateKey.generate()
    dup = [MemoryTransport(), MemoryTransport()]
    conns = [
        h.servers[0].accept(dup[0], fast_start=True, initial_data=client_info(key)),
        h.servers[last].accept(dup[1], fast_start=True, initial_data=client_info(key)),
    ]
    senders = [
        h.servers[w].accept(MemoryTransport(), fast_start=True, initial_data=client_info(k))
        for w, k in ((0, A), (last, B))
    ]
    await h.synced()

    def got(t: MemoryTransport) -> list[bytes]:
        return [p[32:] for ty, p in t.frames() if ty == FrameType.RECV_PACKET]

    async def send_round(tag: bytes) -> int:
        """Each sender sends one packet to key; the index of the one receiver."""
        for i, s in enumerate(senders):
            s.data_received(encode_send_packet(key.public.raw, tag + bytes([i])))
        want = {tag + b"\x00", tag + b"\x01"}
        await wait_until(lambda: sum(len(want & set(got(t))) for t in dup) == 2)
        [winner] = [j for j, t in enumerate(dup) if want & set(got(t))]
        assert want <= set(got(dup[winner]))
        return winner

    first = await send_round(b"one")
    other = 1 - first
    conns[other].data_received(encode_ping(b"iamhere!"))  # the other one speaks
    await h.known(key.public.raw, 0 if other == 0 else last)
    assert await send_round(b"two") == other


class ReadingTransport(MemoryTransport):
    """A MemoryTransport that records pause_reading/resume_reading."""

    def __init__(self) -> None:
        super().__init__()
        self.reading = True
        self.pauses = 0

    def pause_reading(self) -> None:
        self.reading = False
        self.pauses += 1

    def resume_reading(self) -> None:
        self.reading = True

    def is_reading(self) -> bool:
        return self.reading


def _pongs(t: MemoryTransport) -> list[int]:
    return [int.from_bytes(p, "big") for ty, p in t.frames() if ty == FrameType.PONG]


async def _iterations_until(cond: Any, limit: int = 100) -> int:
    n = 0
    while not cond():
        assert n < limit, "never happened"
        await asyncio.sleep(0)
        n += 1
    return n


async def test_a_read_full_of_control_frames_is_handled_over_several_loop_iterations() -> None:
    """bench/soak.py: one client sending tiny frames held the event loop for
    seconds. Now one data_received handles at most CONTROL_FRAME_BUDGET control
    frames; the rest waits (reading paused) and is handled in order, a budget
    per loop iteration, before reading resumes."""
    from derp.server.conn import CONTROL_FRAME_BUDGET

    srv = DerpServer(make_config(private_key=SERVER_KEY))
    ta = ReadingTransport()
    ca = srv.accept(ta, fast_start=True, initial_data=client_info(A))
    n = 3 * CONTROL_FRAME_BUDGET + 7
    ca.data_received(b"".join(encode_ping(i.to_bytes(8, "big")) for i in range(n)))
    assert not ta.reading
    # Bytes that still arrive (e.g. read before the pause took effect) queue behind;
    # the pending frames are enough for another budget at once.
    ca.data_received(encode_ping(n.to_bytes(8, "big")))
    await asyncio.sleep(0)  # pongs are written at the end of the loop iteration
    assert _pongs(ta) == list(range(2 * CONTROL_FRAME_BUDGET))
    assert not ta.reading
    iterations = await _iterations_until(lambda: ta.reading)
    assert iterations >= 1  # not all in one go (plus the iteration above)
    await asyncio.sleep(0)
    assert _pongs(ta) == list(range(n + 1))
    assert ca.is_open
    await srv.stop()


async def test_a_read_of_many_small_packets_yields_before_the_next_read() -> None:
    from derp.server.conn import YIELD_AFTER_FRAMES

    srv = DerpServer(make_config(private_key=SERVER_KEY))
    tb = ReadingTransport()
    srv.accept(tb, fast_start=True, initial_data=client_info(B))
    ta = ReadingTransport()
    ca = srv.accept(ta, fast_start=True, initial_data=client_info(A))
    few = b"".join(encode_send_packet(B.public.raw, b"x" * 1400) for _ in range(50))
    ca.data_received(few)
    assert ta.reading and ta.pauses == 0  # ordinary reads never pause
    many = b"".join(encode_send_packet(B.public.raw, i.to_bytes(4, "big"))
                    for i in range(YIELD_AFTER_FRAMES))
    ca.data_received(many)
    got = [p for t, p in tb.frames() if t == FrameType.RECV_PACKET]
    assert len(got) == 50 + YIELD_AFTER_FRAMES  # all relayed at once ...
    assert got[-1] == A.public.raw + (YIELD_AFTER_FRAMES - 1).to_bytes(4, "big")
    assert not ta.reading  # ... but nothing more is read in this loop iteration
    await _iterations_until(lambda: ta.reading)
    assert ta.pauses == 1
    await srv.stop()
