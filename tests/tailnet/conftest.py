"""Fixtures shared by the tailnet tests.

``stack``: a real in-memory :class:`TailnetStack` on 127.0.0.1 ephemeral ports (HTTP
API + embedded relay; no gRPC, no STUN). The pure coordinator core tests
(``test_core*.py``, ``test_auth.py``) use the ``core_``-prefixed fixtures.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable

import pytest

from tailnet.config import StackConfig
from tailnet.core import Coordinator
from tailnet.stack import TailnetStack
from tailnet.v2 import tailnet_pb2 as pb

Kind = pb.CoordinateResponse.PeerUpdate


class CoreFakeSink:
    """A PeerSink recording everything; ``capacity`` simulates a bounded buffer."""

    def __init__(self, capacity: int | None = None) -> None:
        self.responses: list[pb.CoordinateResponse] = []
        self.capacity = capacity
        self.closed = False
        self.close_error: str | None = None
        self.close_calls = 0
        self.sent_after_close = False

    def send(self, resp: pb.CoordinateResponse) -> bool:
        if self.closed:
            self.sent_after_close = True
            return False
        if self.capacity is not None and len(self.responses) >= self.capacity:
            return False
        self.responses.append(resp)
        return True

    def close(self, error: str | None = None) -> None:
        self.close_calls += 1
        self.closed = True
        self.close_error = error

    # helpers -------------------------------------------------------------
    def updates(self) -> list[pb.CoordinateResponse.PeerUpdate]:
        return [u for r in self.responses for u in r.peer_updates]

    def errors(self) -> list[str]:
        return [r.error for r in self.responses if r.error]

    def summary(self) -> list[tuple[uuid.UUID, str, str]]:
        """(about, kind name, reason) for every update received, in order."""
        return [(uuid.UUID(bytes=u.id), Kind.Kind.Name(u.kind), u.reason) for u in self.updates()]

    def clear(self) -> None:
        self.responses.clear()


class CoreClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def core_clock() -> CoreClock:
    return CoreClock()


@pytest.fixture
def core_coord(core_clock: CoreClock) -> Coordinator:
    return Coordinator(clock=core_clock)


@pytest.fixture
def core_sink() -> Callable[..., CoreFakeSink]:
    """Factory: ``core_sink(capacity=None)`` → a fresh CoreFakeSink."""
    return CoreFakeSink


@pytest.fixture
async def stack() -> AsyncIterator[TailnetStack]:
    s = TailnetStack(
        StackConfig(http_addr="127.0.0.1:0", grpc_addr=None, stun_addr=None, data_dir=None)
    )
    await s.start()
    try:
        yield s
    finally:
        await s.stop()
