"""The server's write path: in-place RecvPacket rewriting, and coalescing per destination.

On in-memory transports (no sockets): a SendPacket run is delivered as the same
bytes with the RecvPacket type and the source key; a destination that gets
packets from several senders in one loop iteration gets one write at the end of
the iteration (order per sender kept, bounded by ``COALESCE_LIMIT``); a paused
receiver never holds up the others; a small packet never pins a big read in a
receiver's buffer.
"""

from __future__ import annotations

import asyncio
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from derp.frames import FrameType, encode_ping, encode_send_packet
from derp.keys import PrivateKey
from derp.server import DerpServer
from derp.server.conn import COALESCE_LIMIT

from .conftest import HostFactory, make_config, start_host, wait_until
from .test_server_conn import SERVER_KEY, MemoryTransport, client_info, split

KEYS = [PrivateKey.generate() for _ in range(6)]


class RecordingTransport(MemoryTransport):
    """A MemoryTransport that records every write (its type and length)."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[tuple[type, int]] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append((type(data), len(data)))
        super().write(data)


def _recv(t: MemoryTransport) -> list[bytes]:
    """Payloads (source key ‖ packet) of the RecvPacket frames written to ``t``."""
    return [p for ty, p in t.frames() if ty == FrameType.RECV_PACKET]


def _open(srv: DerpServer, key: PrivateKey) -> tuple[Any, RecordingTransport]:
    t = RecordingTransport()
    conn = srv.accept(t, fast_start=True, initial_data=client_info(key))
    t.writes.clear()
    return conn, t


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    items=st.lists(
        st.one_of(st.tuples(st.integers(1, 3), st.binary(max_size=200)), st.just((0, b""))),
        min_size=1,
        max_size=16,
    ),
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=12),
)
def test_mixed_destinations_and_control_frames_in_any_chunking(
    items: list[tuple[int, bytes]], cuts: list[int]
) -> None:
    """Packets to three destinations interleaved with Pings, split anywhere:
    every destination gets exactly its packets, in order, from the right source;
    the sender gets its Pongs."""

    async def run() -> None:
        srv = DerpServer(make_config(private_key=SERVER_KEY))
        dests = {i: _open(srv, KEYS[i]) for i in (1, 2, 3)}
        a, ta = _open(srv, KEYS[0])
        stream = b"".join(
            encode_ping(b"pingpong") if i == 0 else encode_send_packet(KEYS[i].public.raw, p)
            for i, p in items
        )
        for ch in split(stream, cuts):
            a.data_received(ch)
        await asyncio.sleep(0)
        for i, (_, t) in dests.items():
            want = [KEYS[0].public.raw + p for j, p in items if j == i]
            assert _recv(t) == want
        pongs = sum(1 for i, _ in items if i == 0)
        assert [ty for ty, _ in ta.frames()[2:]] == [FrameType.PONG] * pongs  # after ServerKey, Info
        await srv.stop()

    asyncio.run(run())


async def test_one_sender_one_receiver_is_written_at_the_end_of_each_read() -> None:
    srv = DerpServer(make_config(private_key=SERVER_KEY))
    b, tb = _open(srv, KEYS[1])
    a, _ = _open(srv, KEYS[0])
    a.data_received(encode_send_packet(KEYS[1].public.raw, b"first"))  # learns its sender
    await asyncio.sleep(0)
    tb.writes.clear()
    a.data_received(b"".join(encode_send_packet(KEYS[1].public.raw, bytes([i])) for i in range(5)))
    assert len(tb.writes) == 1  # at once, one write for the whole run
    assert _recv(tb)[1:] == [KEYS[0].public.raw + bytes([i]) for i in range(5)]
    await srv.stop()


async def test_fan_in_is_coalesced_per_loop_iteration_in_order(make_host: HostFactory) -> None:
    """Four senders to one destination in one iteration: one write, each sender's
    packets in their order; the next iteration starts a new write. Two workers:
    senders 0 and 2 on the other worker than the destination (order only)."""
    h = await make_host(private_key=SERVER_KEY)
    d, td = _open(h.servers[-1], KEYS[5])
    senders = [_open(h.servers[i % h.workers], KEYS[i])[0] for i in range(4)]
    dst = KEYS[5].public.raw
    await h.known(dst, h.workers - 1)
    for rnd in range(2):
        for k in range(3):  # three reads per sender, interleaved between senders
            for i, s in enumerate(senders):
                s.data_received(
                    b"".join(encode_send_packet(dst, bytes([rnd, i, k, j])) for j in range(2))
                )
        await asyncio.sleep(0)
    await wait_until(lambda: len(_recv(td)) >= 2 * 4 * 3 * 2)
    got = _recv(td)
    assert len(got) == 2 * 4 * 3 * 2
    for i in range(4):
        src = KEYS[i].public.raw
        mine = [p[32:] for p in got if p[:32] == src]
        assert mine == [bytes([r, i, k, j]) for r in range(2) for k in range(3) for j in range(2)]
    if h.workers == 1:  # (per process: link reads are batched as the kernel splits them)
        # The first read of the iteration may be written at once (its sender was the
        # last one); everything after it is collected into one write per iteration.
        assert len(td.writes) <= 2 * 2


async def test_a_paused_receiver_does_not_hold_up_the_others(make_host: HostFactory) -> None:
    h = await make_host(private_key=SERVER_KEY, queue_depth=4)
    # Two workers: both receivers on worker 1, both senders on worker 0.
    slow, tslow = _open(h.servers[-1], KEYS[1])
    fast, tfast = _open(h.servers[-1], KEYS[2])
    senders = [_open(h.servers[0], KEYS[i])[0] for i in (3, 4)]
    for k in (KEYS[1], KEYS[2]):
        await h.known(k.public.raw, h.workers - 1)
    slow.pause_writing()  # its socket is full
    for s in senders:
        s.data_received(
            b"".join(
                encode_send_packet(k.public.raw, bytes([i]))
                for i in range(10)
                for k in (KEYS[1], KEYS[2])
            )
        )
    await asyncio.sleep(0)
    if h.workers == 1:
        assert len(_recv(tfast)) == 20  # everything, at the end of the iteration
    else:
        await wait_until(lambda: len(_recv(tfast)) == 20)
        await wait_until(lambda: h.stats.drops_by_reason("queue_head") == 20 - 4)
    assert tslow.writes == []  # nothing written to the paused one ...
    assert h.stats.drops_by_reason("queue_head") == 20 - 4  # ... its queue is bounded
    slow.resume_writing()
    # the newest four (the second sender's last), in order
    assert _recv(tslow) == [KEYS[4].public.raw + bytes([i]) for i in (6, 7, 8, 9)]


async def test_coalescing_is_bounded_per_destination() -> None:
    """Many senders' reads to one destination in one iteration: it is written as
    soon as it has collected more than COALESCE_LIMIT bytes, not at the end."""
    srv = DerpServer(make_config(private_key=SERVER_KEY))
    d, td = _open(srv, KEYS[5])
    senders = [_open(srv, KEYS[i])[0] for i in range(5)]
    dst = KEYS[5].public.raw
    read = b"".join(encode_send_packet(dst, bytes(1000)) for _ in range(8))  # ~8 KB
    n_reads = 0
    for _ in range(4):
        for s in senders:
            s.data_received(read)
            n_reads += 1
            # never more than the limit plus one read waits for the iteration's end
            assert d._outn <= COALESCE_LIMIT
    assert n_reads * len(read) > 2 * COALESCE_LIMIT
    assert td.writes and max(n for _, n in td.writes) <= COALESCE_LIMIT + len(read)
    await asyncio.sleep(0)
    assert len(_recv(td)) == 8 * n_reads
    await srv.stop()


async def test_a_small_packet_does_not_pin_a_big_read() -> None:
    """A receiver's write is a slice of the read only if it is most of the read."""
    srv = DerpServer(make_config(private_key=SERVER_KEY))
    small, tsmall = _open(srv, KEYS[1])
    big, tbig = _open(srv, KEYS[2])
    a, _ = _open(srv, KEYS[0])
    for c, k in ((small, KEYS[1]), (big, KEYS[2])):  # let them learn their sender
        a.data_received(encode_send_packet(k.public.raw, b"hi"))
    await asyncio.sleep(0)
    tsmall.writes.clear()
    tbig.writes.clear()
    a.data_received(
        encode_send_packet(KEYS[1].public.raw, b"x" * 10)
        + encode_send_packet(KEYS[2].public.raw, b"y" * 10_000)
    )
    await asyncio.sleep(0)
    assert tsmall.writes == [(bytes, 5 + 32 + 10)]  # copied out
    assert tbig.writes == [(memoryview, 5 + 32 + 10_000)]  # handed over as is
    assert _recv(tbig) == [KEYS[0].public.raw + b"hi", KEYS[0].public.raw + b"y" * 10_000]
    await srv.stop()


async def test_single_packet_reads_are_written_at_once_only_when_nothing_is_pending() -> None:
    """A read of exactly one SendPacket to a destination that last heard from the
    same sender is written at once (the fast path); once another sender's packet
    is pending there, it queues behind it: arrival order is kept."""
    srv = DerpServer(make_config(private_key=SERVER_KEY))
    d, td = _open(srv, KEYS[5])
    a, _ = _open(srv, KEYS[0])
    b, _ = _open(srv, KEYS[1])
    dst = KEYS[5].public.raw
    a.data_received(encode_send_packet(dst, b"p0"))  # d learns its sender
    await asyncio.sleep(0)
    td.writes.clear()
    sent0 = srv.stats.packets_sent
    a.data_received(encode_send_packet(dst, b"p1"))
    assert td.writes == [(bytearray, 5 + 32 + 2)]  # at once
    b.data_received(encode_send_packet(dst, b"q1"))  # another sender: collected
    a.data_received(encode_send_packet(dst, b"p2"))  # behind q1, not at once
    assert len(td.writes) == 1
    await asyncio.sleep(0)
    assert _recv(td) == [
        KEYS[0].public.raw + b"p0",
        KEYS[0].public.raw + b"p1",
        KEYS[1].public.raw + b"q1",
        KEYS[0].public.raw + b"p2",
    ]
    assert srv.stats.packets_sent - sent0 == 3
    assert srv.stats.packets_received == 4
    await srv.stop()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    items=st.lists(
        st.tuples(st.integers(0, 1), st.integers(1, 3), st.binary(max_size=120)),
        min_size=1,
        max_size=24,
    ),
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=10),
    pause=st.booleans(),
)
# three runs to one destination in one read: the third must queue behind the second
@example(items=[(0, 1, b""), (0, 2, b""), (0, 1, b""), (0, 2, b""), (0, 1, b"")], cuts=[], pause=False)
def test_two_workers_keep_each_senders_order_in_any_chunking(
    items: list[tuple[int, int, bytes]], cuts: list[int], pause: bool
) -> None:
    """Two senders on worker 0, three receivers on worker 1 (every packet crosses
    the link, staged and held as the link decides), reads split anywhere and
    interleaved between the senders: every receiver gets exactly its packets,
    each sender's in order; with a receiver paused (queue_depth 64: no drops)
    its packets queue on worker 1, then (PAUSE) on worker 0, and arrive in
    order when it resumes."""

    async def run() -> None:
        h = await start_host(make_config(private_key=SERVER_KEY, queue_depth=64), 2)
        try:
            dests = {i: _open(h.servers[1], KEYS[i]) for i in (1, 2, 3)}
            senders = [_open(h.servers[0], KEYS[i])[0] for i in (4, 5)]
            for i in (1, 2, 3):
                await h.known(KEYS[i].public.raw, 1)
            if pause:
                dests[1][0].pause_writing()
            streams = [
                split(
                    b"".join(
                        encode_send_packet(KEYS[d].public.raw, bytes([n]) + p)
                        for n, (s, d, p) in enumerate(items)
                        if s == who
                    ),
                    cuts,
                )
                for who in (0, 1)
            ]
            for k in range(max(len(x) for x in streams)):  # interleave the senders' reads
                for who in (0, 1):
                    if k < len(streams[who]):
                        senders[who].data_received(streams[who][k])
                if k % 3 == 2:
                    await asyncio.sleep(0)  # some reads in later loop iterations
            if pause:
                # queued on worker 1, or (once PAUSE crossed the link) on worker 0's stand-in
                si = h.nodes[0].stand_ins[KEYS[1].public.raw]
                await wait_until(
                    lambda: len(dests[1][0]._q or ()) + len(si._q or ())
                    == sum(1 for _, d, _ in items if d == 1)
                )
                dests[1][0].resume_writing()
            for d, (_, t) in dests.items():
                want = sum(1 for _, dd, _ in items if dd == d)
                await wait_until(lambda t=t, want=want: len(_recv(t)) == want)
                got = _recv(t)
                for who in (0, 1):
                    src = KEYS[4 + who].public.raw
                    mine = [p[32:] for p in got if p[:32] == src]
                    assert mine == [
                        bytes([n]) + p for n, (s, dd, p) in enumerate(items) if s == who and dd == d
                    ]
        finally:
            await h.stop()

    asyncio.run(run())
