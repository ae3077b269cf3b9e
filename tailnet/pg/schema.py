"""Schema of the PostgreSQL-backed coordinator, as versioned migrations.

Tables (spec coordinator.md §7.1):

* ``tailnet_coordinators(id uuid PK, heartbeat_at timestamptz)`` — one row per
  replica, upserted every heartbeat; a row older than the expiry is a dead replica.
* ``tailnet_peers(id, coordinator_id → coordinators ON DELETE CASCADE, node bytea,
  status 'ok'|'lost', updated_at, PK(id, coordinator_id))`` — the same peer ID may
  have rows from several replicas (it reconnected elsewhere; newest live NODE wins).
* ``tailnet_tunnels(coordinator_id → coordinators ON DELETE CASCADE, src_id, dst_id,
  updated_at, PK(coordinator_id, src_id, dst_id))`` — no FK to peers (a tunnel may
  name a peer that is not connected yet).

Migration 2 (the embedded DERP relays of the replicas mesh, issue 10):

* ``tailnet_replicas(id uuid PK → coordinators ON DELETE CASCADE, relay_url,
  region_id, hostname, started_at, stopped_at, mesh_status, status_at)`` — one
  row per replica that runs a relay; liveness is its coordinator row's
  heartbeat; ``stopped_at`` is set on graceful stop; ``mesh_status`` is the
  replica's own JSON view of its mesh links (for the health report).
* ``tailnet_derp_mesh_key(singleton true PK, mesh_key bytea(32), created_at)``
  — the region's shared DERP mesh key, inserted once by the first replica
  (``INSERT … ON CONFLICT DO NOTHING``, then read back).

Indexes match the queries in :mod:`tailnet.pg.store`: peers by ``id`` (PK prefix)
and by ``coordinator_id``; lost peers by ``updated_at`` (cleanup); tunnels by
``src_id`` and ``dst_id`` (hash, as pgcoord after coder#12780); coordinators by
``heartbeat_at`` (liveness, cleanup).

:func:`migrate` applies the missing migrations in order, each in its own
transaction, under a transaction-scoped advisory lock so replicas starting at the
same time do not race; applied versions are recorded in
``tailnet_schema_migrations``. Running it again is a no-op (idempotent).
"""

from __future__ import annotations

from typing import Any, Final

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "ADVISORY_LOCK_ID", "migrate", "applied_versions"]

#: Arbitrary constant identifying the migration advisory lock.
ADVISORY_LOCK_ID: Final = 0x7A11E7_0001

MIGRATIONS: Final[tuple[tuple[int, str], ...]] = (
    (
        1,
        """
        CREATE TABLE tailnet_coordinators (
            id uuid PRIMARY KEY,
            heartbeat_at timestamptz NOT NULL
        );
        CREATE INDEX tailnet_coordinators_heartbeat_at_idx
            ON tailnet_coordinators (heartbeat_at);

        CREATE TABLE tailnet_peers (
            id uuid NOT NULL,
            coordinator_id uuid NOT NULL
                REFERENCES tailnet_coordinators (id) ON DELETE CASCADE,
            node bytea NOT NULL,
            status text NOT NULL DEFAULT 'ok' CHECK (status IN ('ok', 'lost')),
            updated_at timestamptz NOT NULL,
            PRIMARY KEY (id, coordinator_id)
        );
        CREATE INDEX tailnet_peers_coordinator_id_idx ON tailnet_peers (coordinator_id);
        CREATE INDEX tailnet_peers_lost_updated_at_idx
            ON tailnet_peers (updated_at) WHERE status = 'lost';

        CREATE TABLE tailnet_tunnels (
            coordinator_id uuid NOT NULL
                REFERENCES tailnet_coordinators (id) ON DELETE CASCADE,
            src_id uuid NOT NULL,
            dst_id uuid NOT NULL,
            updated_at timestamptz NOT NULL,
            PRIMARY KEY (coordinator_id, src_id, dst_id)
        );
        CREATE INDEX tailnet_tunnels_src_id_idx ON tailnet_tunnels USING hash (src_id);
        CREATE INDEX tailnet_tunnels_dst_id_idx ON tailnet_tunnels USING hash (dst_id);
        """,
    ),
    (
        2,
        """
        CREATE TABLE tailnet_replicas (
            id uuid PRIMARY KEY
                REFERENCES tailnet_coordinators (id) ON DELETE CASCADE,
            relay_url text NOT NULL,
            region_id integer NOT NULL,
            hostname text NOT NULL,
            started_at timestamptz NOT NULL,
            stopped_at timestamptz,
            mesh_status text NOT NULL DEFAULT '',
            status_at timestamptz
        );

        CREATE TABLE tailnet_derp_mesh_key (
            singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
            mesh_key bytea NOT NULL CHECK (length(mesh_key) = 32),
            created_at timestamptz NOT NULL DEFAULT now()
        );
        """,
    ),
)

SCHEMA_VERSION: Final = MIGRATIONS[-1][0]

_CREATE_VERSIONS = """
CREATE TABLE IF NOT EXISTS tailnet_schema_migrations (
    version integer PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""


async def applied_versions(conn: Any) -> list[int]:
    """Versions recorded in ``tailnet_schema_migrations`` (ascending)."""
    rows = await conn.fetch("SELECT version FROM tailnet_schema_migrations ORDER BY version")
    return [int(r["version"]) for r in rows]


async def migrate(conn: Any) -> list[int]:
    """Apply missing migrations on the asyncpg connection ``conn``; return those applied."""
    done: list[int] = []
    for version, sql in MIGRATIONS:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", ADVISORY_LOCK_ID)
            await conn.execute(_CREATE_VERSIONS)
            exists = await conn.fetchval(
                "SELECT 1 FROM tailnet_schema_migrations WHERE version = $1", version
            )
            if exists:
                continue
            await conn.execute(sql)
            await conn.execute(
                "INSERT INTO tailnet_schema_migrations (version) VALUES ($1)", version
            )
            done.append(version)
    return done
