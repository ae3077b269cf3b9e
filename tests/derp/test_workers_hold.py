"""derp.workers.node: when a sibling link writes (the hold policy), with a fake
transport and the real event loop.

An idle link writes at the end of the loop iteration; a link that wrote less
than ``hold`` ago holds relayed packets until ``hold`` has passed (one write for
all), unless a control frame or LINK_HOLD_BYTES of packets is waiting. Every
wait is bounded; the hold is long (0.3 s) so "not yet written" cannot be a
race with the timer.
"""

from __future__ import annotations

import asyncio
import struct
from collections import deque
from types import SimpleNamespace
from typing import Any

import pytest

from derp.stats import ServerStats
from derp.workers.link import Frames, Gone, LinkDecoder
from derp.workers.node import LINK_HOLD_BYTES, LINK_SHARE, WorkerSpec, _Link, _StandIn

HOLD = 0.3
K1, K2, SRC = b"\x01" * 32, b"\x02" * 32, b"\x03" * 32


class FakeTransport:
    """Records writes; ``wrote`` is set on each one."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.wrote = asyncio.Event()

    def writelines(self, parts: list[Any]) -> None:
        self.chunks.append(b"".join(bytes(p) for p in parts))
        self.wrote.set()

    def get_write_buffer_size(self) -> int:
        return 0

    def is_closing(self) -> bool:
        return False

    def events(self) -> list[object]:
        dec = LinkDecoder(expect_hello=False)
        for c in self.chunks:
            dec.receive_data(c)
        return [
            Frames(e.dst, bytes(e.data), e.src) if isinstance(e, Frames) else e
            for e in dec.events_received()
        ]


def recv(pkt: bytes) -> bytes:
    return struct.pack(">BI", 0x05, 32 + len(pkt)) + SRC + pkt


def make(hold: float) -> tuple[_Link, FakeTransport, ServerStats]:
    stats = ServerStats()
    node: Any = SimpleNamespace(
        loop=asyncio.get_running_loop(),
        spec=WorkerSpec(0, 2, "", hold=hold),
        ctx=SimpleNamespace(stats=stats),
    )
    link = _Link(node, 1)
    t = FakeTransport()
    link.transport = t  # type: ignore[assignment]
    link.up = True
    return link, t, stats


async def next_iteration() -> None:
    await asyncio.sleep(0)
    await asyncio.sleep(0)


async def test_idle_link_writes_at_once_then_holds_while_busy() -> None:
    link, t, _ = make(HOLD)
    a, b = _StandIn(link.node, K1, link), _StandIn(link.node, K2, link)
    a.write(recv(b"p1"))
    await next_iteration()
    assert len(t.chunks) == 1  # idle: no added latency
    t.wrote.clear()
    a.write(recv(b"p2"))
    b.write(recv(b"q1"))
    a.write(recv(b"p3"))
    await next_iteration()
    assert len(t.chunks) == 1  # busy: held
    await asyncio.wait_for(t.wrote.wait(), 5 * HOLD)
    assert len(t.chunks) == 2
    # one write, one FRAMES per destination, frames in order
    assert t.events() == [
        Frames(K1, recv(b"p1"), b""),
        Frames(K1, recv(b"p2") + recv(b"p3"), b""),
        Frames(K2, recv(b"q1"), b""),
    ]


async def test_control_frame_flushes_held_packets_first() -> None:
    link, t, _ = make(HOLD)
    a = _StandIn(link.node, K1, link)
    a.write(recv(b"p1"))
    await next_iteration()
    a.write(recv(b"p2"))
    await next_iteration()
    assert len(t.chunks) == 1
    link.control().gone(K2)
    await next_iteration()
    assert len(t.chunks) == 2
    assert t.events()[1:] == [Frames(K1, recv(b"p2"), b""), Gone(K2)]


async def test_hold_bytes_write_at_once() -> None:
    link, t, _ = make(HOLD)
    a = _StandIn(link.node, K1, link)
    a.write(recv(b"p1"))
    await next_iteration()
    big = recv(bytes(1000))
    for _ in range(LINK_HOLD_BYTES // len(big) + 1):
        a.write(big)
    await next_iteration()
    assert len(t.chunks) == 2


@pytest.mark.parametrize("hold", [0.0])
async def test_no_hold_writes_every_iteration(hold: float) -> None:
    link, t, _ = make(hold)
    a = _StandIn(link.node, K1, link)
    for i in range(3):
        a.write(recv(bytes([i])))
        await next_iteration()
        assert len(t.chunks) == i + 1


async def test_lost_link_drops_held_packets_counted() -> None:
    link, t, stats = make(HOLD)
    a = _StandIn(link.node, K1, link)
    a.write(recv(b"p1"))
    await next_iteration()
    a.write(recv(b"p2") + recv(b"p3"))
    link.node._link_lost = lambda _link: None
    link.connection_lost(None)
    assert stats.total_drops == 2
    a.write(recv(b"p4"))  # link down: dropped at once
    assert stats.total_drops == 3
    assert link._hold_timer is None and not link.staged and len(t.chunks) == 1


async def test_a_congested_link_queues_only_its_heavy_senders() -> None:
    """Over LINK_HIGH unsent (pause_writing), a stand-in that staged more than
    LINK_SHARE since the link was last empty queues like a paused client; the
    others go on; when the buffer drains (resume_writing) the queue follows."""
    link, t, _ = make(0.0)
    heavy, light = _StandIn(link.node, K1, link), _StandIn(link.node, K2, link)
    link.node.stand_ins = {K1: heavy, K2: light}
    big = recv(bytes(1000))
    for _ in range(LINK_SHARE // len(big) + 2):
        heavy.write(big)
    light.write(recv(b"x"))
    link.pause_writing()
    assert heavy._paused and not light._paused
    heavy._q = deque([recv(b"queued")])  # what the packet path queued meanwhile
    await next_iteration()
    link.resume_writing()
    assert not heavy._paused and not heavy._q
    await next_iteration()
    assert t.events()[-1] == Frames(K1, recv(b"queued"), b"")


async def test_resume_writes_what_queued_without_waiting_for_the_hold() -> None:
    """RESUME from the sibling: the packets queued while its client was paused
    have waited already; they go out at the end of this iteration even though
    the link is busy (holding)."""
    link, t, _ = make(HOLD)
    a, b = _StandIn(link.node, K1, link), _StandIn(link.node, K2, link)
    b.write(recv(b"q1"))
    await next_iteration()
    assert len(t.chunks) == 1  # the link is busy from here on
    a.pause()
    a._q = deque([recv(b"p1"), recv(b"p2")])  # what the packet path queued meanwhile
    b.write(recv(b"q2"))  # staged, held
    await next_iteration()
    assert len(t.chunks) == 1 and link._hold_timer is not None
    a.resume()
    await next_iteration()
    assert len(t.chunks) == 2  # not after HOLD
    assert t.events()[1:] == [Frames(K2, recv(b"q2"), b""), Frames(K1, recv(b"p1") + recv(b"p2"), b"")]
