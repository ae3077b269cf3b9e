"""The same behavioural cases (``cases.py``) against every coordinator implementation.

Backends: the in-memory :class:`tailnet.core.Coordinator`; the PostgreSQL
:class:`tailnet.pg.PgCoordinator` with two and with three replicas on one
database (peers spread across replicas, so most interactions cross replicas);
and the in-memory coordinator behind a running stack, reached through Coder's
transport (``drpc``: WebSocket → yamux → DRPC) and through gRPC (``grpc``), one
Coordinate stream per peer (``transports.py``).
The PostgreSQL backends need a real server (``pgserver.py``); they are skipped
with a message only if PostgreSQL is not installed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from tailnet.core import Coordinator, CoordinatorClosed
from tailnet.pg import PgCoordinator, PgCoordinatorConfig

from .cases import (
    CASE_LIMITS,
    CASES,
    SKIP_ON,
    TRANSPORT_BACKENDS,
    Backend,
    CoordLike,
    Net,
    RecSink,
    node,
)
from .pgserver import create_database, drop_database, shared_server
from .transports import TransportBackend, open_transport_backend

# No case depends on replica death, so the expiry is long (10 s): a replica stalled on a
# loaded machine must not flap its peers LOST/NODE (cases assert exact sequences).
FAST = PgCoordinatorConfig(heartbeat_interval=0.5, missed_heartbeats=20, retry_max=0.5,
                           listen_probe_interval=2.0)


class MemoryBackend:
    replicas = 1
    transport = False

    def __init__(self) -> None:
        self.c = Coordinator(limits=CASE_LIMITS)

    def coord(self, i: int) -> CoordLike:
        return self.c

    async def settle(self) -> None:
        return None


class PgBackend:
    transport = False

    def __init__(self, coords: list[PgCoordinator]) -> None:
        self.coords = coords
        self.replicas = len(coords)

    def coord(self, i: int) -> CoordLike:
        return self.coords[i]

    async def settle(self) -> None:
        for c in self.coords:
            await c.quiesce()


def _skip_reason(request: pytest.FixtureRequest, kind: str) -> str | None:
    case = request.node.callspec.params.get("case")
    return SKIP_ON.get(case, {}).get(kind) if case is not None else None


@pytest.fixture(params=["memory", "pg2", "pg3", *TRANSPORT_BACKENDS])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    kind = request.param
    reason = _skip_reason(request, kind)
    if reason is not None:
        pytest.skip(f"{kind}: {reason}")
    if kind == "memory":
        yield MemoryBackend()
        return
    if kind in TRANSPORT_BACKENDS:
        tb = await open_transport_backend(kind)
        try:
            yield tb
        finally:
            await tb.aclose()
        assert not tb.failures, tb.failures
        return
    server = shared_server()  # skips if PostgreSQL is not installed
    dsn = await create_database(server)
    n = int(kind[2:])
    coords: list[PgCoordinator] = []
    try:
        for _ in range(n):
            c = PgCoordinator(dsn, FAST, limits=CASE_LIMITS)
            await c.start()
            coords.append(c)
        yield PgBackend(coords)
    finally:
        for c in coords:
            await c.stop()
        await drop_database(server, dsn)


@pytest.mark.parametrize("case", CASES, ids=[c.__name__.removeprefix("case_") for c in CASES])
async def test_case(backend: Backend, case: Callable[[Net], Awaitable[None]]) -> None:
    await case(Net(backend))


@pytest.mark.parametrize("kind", TRANSPORT_BACKENDS)
async def test_transport_connect_after_close_is_refused_on_the_stream(kind: str) -> None:
    """The transport form of ``case_connect_after_close_raises``: the server refuses
    the stream at once (DRPC: HTTP 503 before the upgrade; gRPC: UNAVAILABLE before
    any metadata) with CoordinatorClosed's text."""
    tb: TransportBackend = await open_transport_backend(kind)
    try:
        net = Net(tb)
        agent = net.join("agent", node(1))
        await net.settle()
        agent.coord.close()
        await net.closed(agent.sink)
        late = RecSink()
        agent.coord.connect(agent.id, "late", late)
        await late.wait_closed()
        assert late.close_error == str(CoordinatorClosed())
        assert late.responses == []
    finally:
        await tb.aclose()
    assert not tb.failures, tb.failures
