"""YamuxConnection (the asyncio adapter): CPU budget per received message,
backpressure between slices, arbitrary message splits, keepalive timeout.

Frames are written by hand from the yamux spec (12-byte header: version,
type, flags u16, stream id u32, length u32; big-endian)."""

from __future__ import annotations

import asyncio
import logging

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tailnet.rpc import session as session_mod
from tailnet.rpc.session import YamuxConnection, YamuxStream


def h(text: str) -> bytes:
    return bytes.fromhex(text.replace(" ", ""))


def ping_syn(opaque: int) -> bytes:
    # version 0, type 2 (Ping), flags 0x0001 (SYN), stream 0, length = opaque
    return h("00 02 0001 00000000") + opaque.to_bytes(4, "big")


def ping_ack(opaque: int) -> bytes:
    return h("00 02 0002 00000000") + opaque.to_bytes(4, "big")


class FakePipe:
    """A Pipe fed by the test; optional write high-water mark with a manual drain."""

    def __init__(self, hwm: int | None = None) -> None:
        self.inbox: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.out = bytearray()
        self.buffered = 0
        self.hwm = hwm
        self.drained = asyncio.Event()
        self.draining = asyncio.Event()
        self.closed = False
        self.aborted = False
        self.on_write: list[object] = []

    async def recv(self) -> bytes | str | None:
        return await self.inbox.get()

    def write(self, data: bytes) -> None:
        self.out += data
        self.buffered += len(data)
        for cb in self.on_write:
            assert callable(cb)
            cb(data)

    @property
    def writable(self) -> bool:
        return self.hwm is None or self.buffered <= self.hwm or self.closed

    async def drain(self) -> None:
        while not self.writable:
            self.drained.clear()
            self.draining.set()
            await self.drained.wait()

    def flush_all(self) -> None:
        """The peer read everything we wrote."""
        self.buffered = 0
        self.draining.clear()
        self.drained.set()

    async def close(self, code: int = 1000, reason: str = "") -> None:
        self.closed = True
        self.drained.set()

    def abort(self) -> None:
        self.aborted = True
        self.closed = True
        self.drained.set()


def acks_in(out: bytes) -> list[int]:
    assert len(out) % 12 == 0
    got = []
    for i in range(0, len(out), 12):
        frame = out[i : i + 12]
        assert frame[:8] == h("00 02 0002 00000000"), frame.hex()
        got.append(int.from_bytes(frame[8:], "big"))
    return got


async def test_ping_flood_message_yields_to_the_loop_between_slices(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Budget 0: the reader yields after every slice, so this is deterministic.
    monkeypatch.setattr(session_mod, "FEED_BUDGET", 0.0)
    n = 5461  # 65,532 bytes: 16 slices, pings cut across slice boundaries
    flood = b"".join(ping_syn(i) for i in range(n))
    pipe = FakePipe()
    conn = YamuxConnection(pipe, client=False, keepalive_interval=None)
    ticks = 0
    ticks_at_write: list[int] = []
    pipe.on_write.append(lambda _d: ticks_at_write.append(ticks))
    stop = asyncio.Event()

    async def ticker() -> None:
        nonlocal ticks
        while not stop.is_set():
            ticks += 1
            await asyncio.sleep(0)

    t = asyncio.create_task(ticker())
    runner = asyncio.create_task(conn.run())
    await pipe.inbox.put(flood)
    await pipe.inbox.put(None)
    await asyncio.wait_for(runner, 10)
    stop.set()
    await t
    assert acks_in(bytes(pipe.out)) == list(range(n))
    # one flush per slice, and the other task ran between them
    assert len(ticks_at_write) >= 16
    assert ticks_at_write[-1] - ticks_at_write[0] >= 15


async def test_ping_flood_replies_are_bounded_while_the_peer_does_not_read() -> None:
    n = 20_000  # 240,000 bytes of pings in one message
    hwm = 1024
    pipe = FakePipe(hwm=hwm)
    conn = YamuxConnection(pipe, client=False, keepalive_interval=None)
    runner = asyncio.create_task(conn.run())
    await pipe.inbox.put(b"".join(ping_syn(i) for i in range(n)))
    rounds = 0
    while len(pipe.out) < 12 * n:
        await asyncio.wait_for(pipe.draining.wait(), 10)
        # the reader stopped: at most one slice's replies past the high-water mark
        per_slice = (session_mod.FEED_SLICE // 12 + 1) * 12
        assert pipe.buffered <= hwm + per_slice
        await asyncio.sleep(0)
        assert pipe.draining.is_set() and pipe.buffered > hwm  # still waiting
        rounds += 1
        pipe.flush_all()
        await asyncio.sleep(0)
    assert rounds >= 40
    assert acks_in(bytes(pipe.out)) == list(range(n))
    pipe.flush_all()
    await pipe.inbox.put(None)
    await asyncio.wait_for(runner, 10)


# A peer (client) opens stream 1, sends data in two frames, pings in between.
_SYN_1 = h("00 01 0001 00000001 00000000")  # WindowUpdate|SYN, stream 1, delta 0
_DATA_1 = h("00 00 0000 00000001 0000000b") + b"hello world"
_DATA_2 = h("00 00 0002 00000001 00000003") + b"!!!"  # Data|ACK flag is harmless
_FIN_1 = h("00 01 0004 00000001 00000000")  # WindowUpdate|FIN
_STREAM_BYTES = (
    _SYN_1 + ping_syn(1) + _DATA_1 + ping_syn(2) + _DATA_2 + _FIN_1 + ping_syn(3)
)


async def _run_split(parts: list[bytes]) -> tuple[bytes, bool, bytes]:
    pipe = FakePipe()
    got = bytearray()
    ended = False

    def on_stream(s: YamuxStream) -> None:
        def on_data(b: bytes) -> None:
            got.extend(b)
            s.consumed(len(b))

        def on_end() -> None:
            nonlocal ended
            ended = s.remote_closed

        s.on_data = on_data
        s.on_end = on_end

    conn = YamuxConnection(pipe, client=False, on_stream=on_stream, keepalive_interval=None)
    runner = asyncio.create_task(conn.run())
    for p in parts:
        await pipe.inbox.put(p)
    await pipe.inbox.put(None)
    await asyncio.wait_for(runner, 10)
    return bytes(got), ended, bytes(pipe.out)


@settings(max_examples=60, deadline=None)
@given(
    cuts=st.lists(st.integers(0, len(_STREAM_BYTES)), max_size=12),
    slice_size=st.integers(1, 40),
    budget=st.sampled_from([0.0, 0.002]),
)
def test_arbitrary_message_splits_and_slices_give_the_same_result(
    cuts: list[int], slice_size: int, budget: float
) -> None:
    mp = pytest.MonkeyPatch()
    mp.setattr(session_mod, "FEED_SLICE", slice_size)
    mp.setattr(session_mod, "FEED_BUDGET", budget)
    try:
        bounds = [0, *sorted(cuts), len(_STREAM_BYTES)]
        parts = [_STREAM_BYTES[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
        got, ended, out = asyncio.run(_run_split(parts))
    finally:
        mp.undo()
    assert got == b"hello world!!!"
    assert ended
    # the server ACKs stream 1 (WindowUpdate|ACK) and answers the three pings in order
    frames = [out[i : i + 12] for i in range(0, len(out), 12)]
    assert len(out) == 48
    assert frames.count(h("00 01 0002 00000001 00000000")) == 1
    assert [f for f in frames if f[1] == 2] == [ping_ack(1), ping_ack(2), ping_ack(3)]


async def test_keepalive_timeout_cancels_the_ping_in_the_core(
    caplog: pytest.LogCaptureFixture,
) -> None:
    pipe = FakePipe()
    conn = YamuxConnection(
        pipe, client=True, keepalive_interval=0.01, keepalive_timeout=0.01
    )
    runner = asyncio.create_task(conn.run())
    with caplog.at_level(logging.INFO, logger="tailnet.rpc.session"):
        await asyncio.wait_for(conn.wait_closed(), 10)
    assert conn.close_reason == "keepalive timeout"
    assert pipe.aborted
    # the core no longer waits for the reply: a late ACK produces no PingAcked
    conn.session.receive_data(ping_ack(0))
    assert conn.session.events_received() == []
    await pipe.inbox.put(None)
    await asyncio.wait_for(runner, 10)


async def test_ping_timeout_cancels_the_ping_in_the_core() -> None:
    pipe = FakePipe()
    conn = YamuxConnection(pipe, client=True, keepalive_interval=None)
    runner = asyncio.create_task(conn.run())
    with pytest.raises(TimeoutError):
        await conn.ping(timeout=0.01)
    # a late reply is ignored by the core: no PingAcked
    conn.session.receive_data(ping_ack(0))
    assert conn.session.events_received() == []
    assert not conn.closed
    await pipe.inbox.put(None)
    await asyncio.wait_for(runner, 10)
