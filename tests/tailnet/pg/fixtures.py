"""Shared fixtures of the PostgreSQL coordinator tests: replicas started on one
throw-away cluster (``pg_dsn``) with fast heartbeats, all stopped at teardown."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from tailnet.pg import PgCoordinator, PgCoordinatorConfig

__all__ = ["FAST", "Replicas", "replicas"]

#: Heartbeats fast enough that a dead replica is noticed within ~2 s.
FAST = PgCoordinatorConfig(heartbeat_interval=0.3, missed_heartbeats=6, retry_max=0.3,
                           listen_probe_interval=1.0)

#: ``await replicas(config=FAST)`` starts one more replica.
Replicas = Callable[..., Awaitable[PgCoordinator]]


@pytest.fixture
async def replicas(pg_dsn: str) -> AsyncIterator[Replicas]:
    started: list[PgCoordinator] = []

    async def make(config: PgCoordinatorConfig = FAST) -> PgCoordinator:
        c = PgCoordinator(pg_dsn, config)
        await c.start()
        started.append(c)
        return c

    yield make
    for c in started:
        await asyncio.wait_for(c.stop(), 60)
