"""The same behavioural cases (``cases.py``) against every coordinator implementation.

Backends: the in-memory :class:`tailnet.core.Coordinator`, and the PostgreSQL
:class:`tailnet.pg.PgCoordinator` with two and with three replicas on one
database (peers spread across replicas, so most interactions cross replicas).
The PostgreSQL backends need a real server (``pgserver.py``); they are skipped
with a message only if PostgreSQL is not installed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from tailnet.core import Coordinator
from tailnet.pg import PgCoordinator, PgCoordinatorConfig

from .cases import CASE_LIMITS, CASES, Backend, CoordLike, Net
from .pgserver import create_database, drop_database, shared_server

# No case depends on replica death, so the expiry is long (10 s): a replica stalled on a
# loaded machine must not flap its peers LOST/NODE (cases assert exact sequences).
FAST = PgCoordinatorConfig(heartbeat_interval=0.5, missed_heartbeats=20, retry_max=0.5,
                           listen_probe_interval=2.0)


class MemoryBackend:
    replicas = 1

    def __init__(self) -> None:
        self.c = Coordinator(limits=CASE_LIMITS)

    def coord(self, i: int) -> CoordLike:
        return self.c

    async def settle(self) -> None:
        return None


class PgBackend:
    def __init__(self, coords: list[PgCoordinator]) -> None:
        self.coords = coords
        self.replicas = len(coords)

    def coord(self, i: int) -> CoordLike:
        return self.coords[i]

    async def settle(self) -> None:
        for c in self.coords:
            await c.flush()


@pytest.fixture(params=["memory", "pg2", "pg3"])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    if request.param == "memory":
        yield MemoryBackend()
        return
    server = shared_server()  # skips if PostgreSQL is not installed
    dsn = await create_database(server)
    n = int(request.param[2:])
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
