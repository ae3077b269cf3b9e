"""derp.fairlane: one lane per loop for the leftover work of flooding connections."""

from __future__ import annotations

import asyncio
import logging

import pytest

from derp.fairlane import FairLane, lane_for
from derp.frames import FrameType, encode_ping
from derp.keys import PrivateKey
from derp.server import DerpServer
from derp.server.conn import CONTROL_FRAME_BUDGET, DerpConnection

from .conftest import make_config
from .test_server_conn import SERVER_KEY, ReadingTransport, client_info


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def _one_iteration() -> None:
    await asyncio.sleep(0)


async def test_deferred_callbacks_run_later_in_order() -> None:
    lane = FairLane(asyncio.get_running_loop())
    ran: list[int] = []
    for i in range(3):
        lane.defer(lambda i=i: ran.append(i))
    assert ran == [] and len(lane) == 3  # never in the deferring callback
    await _one_iteration()
    assert ran == [0, 1, 2] and len(lane) == 0


async def test_at_most_a_budget_of_work_per_iteration_but_always_progress() -> None:
    clock = FakeClock()
    lane = FairLane(asyncio.get_running_loop(), budget=0.002, clock=clock)
    ran: list[int] = []

    def work(i: int, cost: float) -> None:
        ran.append(i)
        clock.now += cost

    for i in range(6):
        lane.defer(lambda i=i: work(i, 0.0015))
    per_iteration = []
    while len(lane):
        before = len(ran)
        await _one_iteration()
        per_iteration.append(len(ran) - before)
    assert ran == list(range(6))
    assert per_iteration == [2, 2, 2]  # the second crosses the 2 ms line, the third waits
    # One callback far over the budget still runs alone, then the next iteration goes on.
    lane.defer(lambda: work(10, 0.050))
    lane.defer(lambda: work(11, 0.0))
    await _one_iteration()
    assert ran[-1] == 10
    await _one_iteration()
    assert ran[-1] == 11


async def test_a_connection_deferring_again_goes_to_the_back() -> None:
    lane = FairLane(asyncio.get_running_loop(), budget=0.0)  # one callback per iteration
    ran: list[str] = []
    left = {"a": 3, "b": 1, "c": 1}

    def step(name: str) -> None:
        ran.append(name)
        left[name] -= 1
        if left[name]:
            lane.defer(lambda: step(name))

    for name in "abc":
        lane.defer(lambda name=name: step(name))
    for _ in range(10):
        await _one_iteration()
    assert ran == ["a", "b", "c", "a", "a"]
    assert len(lane) == 0


async def test_a_failing_callback_is_logged_and_the_rest_run(caplog: pytest.LogCaptureFixture) -> None:
    lane = FairLane(asyncio.get_running_loop())
    ran: list[int] = []

    def boom() -> None:
        raise RuntimeError("bug")

    lane.defer(boom)
    lane.defer(lambda: ran.append(1))
    with caplog.at_level(logging.ERROR, logger="derp.fairlane"):
        await _one_iteration()
    assert ran == [1]
    assert "deferred callback" in caplog.text


async def test_one_lane_per_loop() -> None:
    loop = asyncio.get_running_loop()
    assert lane_for(loop) is lane_for(loop)


def _pongs(t: ReadingTransport) -> list[int]:
    return [int.from_bytes(p, "big") for typ, p in t.frames() if typ == FrameType.PONG]


def _answered(t: ReadingTransport, c: DerpConnection) -> int:
    """Pongs written, plus those in the connection's batch (written at the end
    of the loop iteration: derp.server.conn coalesces a connection's output)."""
    pending = b"".join(bytes(seg) for seg in c._out)
    n, pos = 0, 0
    while pos < len(pending):
        typ, length = pending[pos], int.from_bytes(pending[pos + 1 : pos + 5], "big")
        n += typ == FrameType.PONG
        pos += 5 + length
    return len(_pongs(t)) + n


async def test_flooding_derp_connections_share_one_budget_per_iteration() -> None:
    """bench/soak.py: with each flooding connection scheduling its own
    continuation, every iteration ran one budget per flood. Through the shared
    lane, two floods take turns (budget 0: one continuation per iteration),
    and both finish, in order."""
    srv = DerpServer(make_config(private_key=SERVER_KEY))
    lane = lane_for(asyncio.get_running_loop())
    old_budget = lane.budget
    lane.budget = 0.0
    try:
        conns = []
        for _ in range(2):
            t = ReadingTransport()
            c = srv.accept(t, fast_start=True, initial_data=client_info(PrivateKey.generate()))
            conns.append((t, c))
        n = 3 * CONTROL_FRAME_BUDGET
        flood = b"".join(encode_ping(i.to_bytes(8, "big")) for i in range(n))
        for t, c in conns:
            c.data_received(flood)
            assert _answered(t, c) == CONTROL_FRAME_BUDGET and not t.reading
        assert len(lane) == 2
        await _one_iteration()
        # one continuation ran (the first flood's), the other waited for its turn
        assert sorted(_answered(t, c) for t, c in conns) == [CONTROL_FRAME_BUDGET,
                                                             2 * CONTROL_FRAME_BUDGET]
        for _ in range(20):
            await _one_iteration()
        for t, c in conns:
            assert _pongs(t) == list(range(n))
            assert t.reading and c.is_open
    finally:
        lane.budget = old_budget
        await srv.stop()
