"""High-availability coordinator: replicas sharing state through PostgreSQL.

Embedding::

    from tailnet.pg import create_pg_coordinator

    coord = await create_pg_coordinator("postgresql://user@db/tailnet", heartbeat_interval=2.0)
    service = TailnetService(coordinator=coord, ...)   # same verbs as tailnet.core.Coordinator
    ...
    service.close()
    await coord.stop()

Modules: :mod:`~tailnet.pg.coordinator` (:class:`PgCoordinator`, the pipeline),
:mod:`~tailnet.pg.mapper` (pure per-replica state and diffs),
:mod:`~tailnet.pg.store` (queries), :mod:`~tailnet.pg.schema` (migrations),
:mod:`~tailnet.pg.pubsub` (LISTEN with reconnect), :mod:`~tailnet.pg.payload`
(NOTIFY payload codec), :mod:`~tailnet.pg.replicas` (replica discovery for the
relay mesh, node keys of every replica).
"""

from tailnet.pg.coordinator import (
    CLOSE_ERR_UNHEALTHY,
    PgCoordinator,
    PgCoordinatorConfig,
    create_pg_coordinator,
)
from tailnet.pg.replicas import Replica, ReplicaInfo
from tailnet.pg.schema import SCHEMA_VERSION, migrate

__all__ = [
    "CLOSE_ERR_UNHEALTHY",
    "PgCoordinator",
    "PgCoordinatorConfig",
    "create_pg_coordinator",
    "Replica",
    "ReplicaInfo",
    "SCHEMA_VERSION",
    "migrate",
]
