"""Queries of the PostgreSQL coordinator (thin I/O layer over an asyncpg pool).

Writes arrive as a list of *ops* (one per coordinator request effect) and are
applied by :meth:`Store.write` in ONE transaction, in order, with runs of the same
op grouped into one set-based statement (``unnest`` arrays) — this is the
batching that keeps the write rate far below the request rate under load.
The notifications for the batch are sent in the same transaction (so they are
delivered on commit, never for a rolled-back write), packed many events per
payload (:mod:`tailnet.pg.payload`).

Every statement is idempotent (upserts / deletes), so a batch whose commit
outcome is unknown (connection lost) can simply be retried.

Ops → effect (``me`` = this replica's coordinator ID):

* :class:`NodeOp` — upsert ``(peer, me)`` with the node, status ``ok``.
* :class:`LostOp` — ``(peer, me)`` status ``lost`` (node and tunnels kept, so
  tunnel peers see LOST and a resumed peer keeps its tunnels).
* :class:`DisconnectOp` — delete ``(peer, me)`` and the peer's ``lost`` rows on
  other replicas, and its source tunnels except those recorded by replicas where
  the same ID is still connected.
* :class:`AddTunnelOp` / :class:`RemoveTunnelOp` — upsert ``(me, src, dst)`` /
  delete ``src → dst`` recorded by any replica.
* :class:`RfhOp` — no write: checks which targets share a tunnel with the sender
  and publishes ready-for-handshake for those; the others are returned as errors.
* :class:`CloseOp` — every ``ok`` row of ``me`` becomes ``lost`` (graceful shutdown).

Replica registry and mesh key (outside the op pipeline, issue 10):
:meth:`Store.register_replica` / :meth:`Store.stop_replica` (each notifies
``tailnet_replica_update``), :meth:`Store.live_replicas`,
:meth:`Store.set_mesh_status`, :meth:`Store.derp_mesh_key` (created once,
atomically) and :meth:`Store.live_node_keys` (the full load of the node-key
index).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tailnet.pg.mapper import BindingRow
from tailnet.pg.payload import (
    CHAN_HEARTBEAT,
    CHAN_PEER,
    CHAN_REPLICA,
    CHAN_RFH,
    CHAN_TUNNEL,
    PeerCode,
    PeerEvent,
    RfhEvent,
    TunnelEvent,
    encode_heartbeat,
    encode_peer_events,
    encode_rfh_events,
    encode_tunnel_events,
)
from tailnet.pg.replicas import Replica, ReplicaInfo

__all__ = [
    "NodeOp",
    "LostOp",
    "DisconnectOp",
    "AddTunnelOp",
    "RemoveTunnelOp",
    "RfhOp",
    "CloseOp",
    "Op",
    "WriteResult",
    "Store",
]


@dataclass(slots=True)
class NodeOp:
    peer: uuid.UUID
    node: bytes


@dataclass(frozen=True, slots=True)
class LostOp:
    peer: uuid.UUID


@dataclass(frozen=True, slots=True)
class DisconnectOp:
    peer: uuid.UUID


@dataclass(frozen=True, slots=True)
class AddTunnelOp:
    src: uuid.UUID
    dst: uuid.UUID


@dataclass(frozen=True, slots=True)
class RemoveTunnelOp:
    src: uuid.UUID
    dst: uuid.UUID


@dataclass(frozen=True, slots=True)
class RfhOp:
    frm: uuid.UUID
    targets: tuple[uuid.UUID, ...]


@dataclass(frozen=True, slots=True)
class CloseOp:
    pass


Op = NodeOp | LostOp | DisconnectOp | AddTunnelOp | RemoveTunnelOp | RfhOp | CloseOp


@dataclass(slots=True)
class WriteResult:
    """``rfh_errors``: (sender, target) pairs that share no tunnel."""

    rfh_errors: list[tuple[uuid.UUID, uuid.UUID]] = field(default_factory=list)
    notifications: int = 0


_UPSERT_PEERS = """
INSERT INTO tailnet_peers (id, coordinator_id, node, status, updated_at)
SELECT u.id, $1, u.node, 'ok', clock_timestamp()
FROM unnest($2::uuid[], $3::bytea[]) AS u(id, node)
ON CONFLICT (id, coordinator_id) DO UPDATE
SET node = EXCLUDED.node, status = 'ok', updated_at = EXCLUDED.updated_at
"""

_LOST_PEERS = """
UPDATE tailnet_peers SET status = 'lost', updated_at = clock_timestamp()
WHERE coordinator_id = $1 AND id = ANY($2::uuid[])
"""

_DELETE_PEERS = """
DELETE FROM tailnet_peers
WHERE id = ANY($2::uuid[]) AND (coordinator_id = $1 OR status = 'lost')
"""

_DELETE_SRC_TUNNELS = """
DELETE FROM tailnet_tunnels t
WHERE t.src_id = ANY($1::uuid[])
  AND NOT EXISTS (
    SELECT 1 FROM tailnet_peers p WHERE p.id = t.src_id AND p.coordinator_id = t.coordinator_id
  )
"""

_UPSERT_TUNNELS = """
INSERT INTO tailnet_tunnels (coordinator_id, src_id, dst_id, updated_at)
SELECT $1, u.s, u.d, clock_timestamp() FROM unnest($2::uuid[], $3::uuid[]) AS u(s, d)
ON CONFLICT (coordinator_id, src_id, dst_id) DO UPDATE SET updated_at = EXCLUDED.updated_at
"""

_DELETE_TUNNELS = """
DELETE FROM tailnet_tunnels t USING unnest($1::uuid[], $2::uuid[]) AS u(s, d)
WHERE t.src_id = u.s AND t.dst_id = u.d
"""

_SHARED = """
SELECT u.f, u.t, EXISTS (
    SELECT 1 FROM tailnet_tunnels x
    WHERE (x.src_id = u.f AND x.dst_id = u.t) OR (x.src_id = u.t AND x.dst_id = u.f)
) AS shared
FROM unnest($1::uuid[], $2::uuid[]) AS u(f, t)
"""

_CLOSE = """
UPDATE tailnet_peers SET status = 'lost', updated_at = clock_timestamp()
WHERE coordinator_id = $1 AND status = 'ok' RETURNING id
"""

_NOTIFY = "SELECT pg_notify(u.c, u.p) FROM unnest($1::text[], $2::text[]) AS u(c, p)"

_HEARTBEAT = """
WITH h AS (
    INSERT INTO tailnet_coordinators (id, heartbeat_at) VALUES ($1, now())
    ON CONFLICT (id) DO UPDATE SET heartbeat_at = now()
    RETURNING id
)
SELECT pg_notify($2, $3) FROM h
"""

_TUNNELS_TOUCHING = """
SELECT DISTINCT src_id, dst_id FROM tailnet_tunnels
WHERE src_id = ANY($1::uuid[]) OR dst_id = ANY($1::uuid[])
"""

_TUNNELS_FROM = "SELECT DISTINCT dst_id FROM tailnet_tunnels WHERE src_id = $1"

_BINDINGS = """
SELECT p.id, p.coordinator_id, p.node,
       (p.status = 'ok' AND c.heartbeat_at > now() - make_interval(secs => $2)) AS alive,
       extract(epoch FROM p.updated_at)::float8 AS updated_at
FROM tailnet_peers p JOIN tailnet_coordinators c ON c.id = p.coordinator_id
WHERE p.id = ANY($1::uuid[])
"""

_ALIVE = """
SELECT id FROM tailnet_coordinators WHERE heartbeat_at > now() - make_interval(secs => $1)
"""

_REGISTER_REPLICA = """
WITH r AS (
    INSERT INTO tailnet_replicas (id, relay_url, region_id, hostname, started_at)
    VALUES ($1, $2, $3, $4, now())
    ON CONFLICT (id) DO UPDATE
    SET relay_url = EXCLUDED.relay_url, region_id = EXCLUDED.region_id,
        hostname = EXCLUDED.hostname, stopped_at = NULL
    RETURNING id
)
SELECT pg_notify($5, $6) FROM r
"""

_STOP_REPLICA = """
WITH r AS (
    UPDATE tailnet_replicas SET stopped_at = now() WHERE id = $1 RETURNING id
)
SELECT pg_notify($2, $3) FROM r
"""

_LIVE_REPLICAS = """
SELECT r.id, r.relay_url, r.region_id, r.hostname,
       extract(epoch FROM r.started_at)::float8 AS started_at,
       extract(epoch FROM c.heartbeat_at)::float8 AS heartbeat_at,
       r.mesh_status,
       extract(epoch FROM r.status_at)::float8 AS status_at
FROM tailnet_replicas r JOIN tailnet_coordinators c ON c.id = r.id
WHERE r.stopped_at IS NULL AND c.heartbeat_at > now() - make_interval(secs => $1)
ORDER BY r.started_at, r.id
"""

_SET_MESH_STATUS = """
UPDATE tailnet_replicas SET mesh_status = $2, status_at = now() WHERE id = $1
"""

_INSERT_MESH_KEY = """
INSERT INTO tailnet_derp_mesh_key (singleton, mesh_key) VALUES (true, $1)
ON CONFLICT (singleton) DO NOTHING
"""

_LIVE_NODES = """
SELECT p.id, p.node
FROM tailnet_peers p JOIN tailnet_coordinators c ON c.id = p.coordinator_id
WHERE p.status = 'ok' AND c.heartbeat_at > now() - make_interval(secs => $1)
"""


class Store:
    """Queries for one replica (``coordinator_id``) on an asyncpg pool."""

    def __init__(self, pool: Any, coordinator_id: uuid.UUID, expiry: float) -> None:
        self.pool = pool
        self.coordinator_id = coordinator_id
        self.expiry = expiry

    async def heartbeat(self, timeout: float) -> None:
        """Upsert this replica's row (now()) and publish a heartbeat notification."""
        await self.pool.execute(
            _HEARTBEAT,
            self.coordinator_id,
            CHAN_HEARTBEAT,
            encode_heartbeat(self.coordinator_id),
            timeout=timeout,
        )

    async def write(self, ops: Sequence[Op], timeout: float | None = None) -> WriteResult:
        """Apply ``ops`` in order in one transaction (see module docstring)."""
        result = WriteResult()
        me = self.coordinator_id
        async with self.pool.acquire(timeout=timeout) as conn:
            async with conn.transaction():
                peer_events: list[PeerEvent] = []
                tunnel_events: list[TunnelEvent] = []
                rfh_events: list[RfhEvent] = []
                i = 0
                while i < len(ops):
                    kind = type(ops[i])
                    j = i
                    while j < len(ops) and type(ops[j]) is kind:
                        j += 1
                    run = ops[i:j]
                    i = j
                    await self._apply_run(conn, me, kind, run, result, peer_events,
                                          tunnel_events, rfh_events)
                chans: list[str] = []
                payloads: list[str] = []
                for chan, encoded in (
                    (CHAN_PEER, encode_peer_events(peer_events)),
                    (CHAN_TUNNEL, encode_tunnel_events(tunnel_events)),
                    (CHAN_RFH, encode_rfh_events(rfh_events)),
                ):
                    for p in encoded:
                        chans.append(chan)
                        payloads.append(p)
                if chans:
                    await conn.execute(_NOTIFY, chans, payloads)
                result.notifications = len(chans)
        return result

    @staticmethod
    async def _apply_run(
        conn: Any,
        me: uuid.UUID,
        kind: type,
        run: Sequence[Op],
        result: WriteResult,
        peer_events: list[PeerEvent],
        tunnel_events: list[TunnelEvent],
        rfh_events: list[RfhEvent],
    ) -> None:
        if kind is NodeOp:
            latest: dict[uuid.UUID, bytes] = {}
            for op in run:
                assert isinstance(op, NodeOp)
                latest.pop(op.peer, None)
                latest[op.peer] = op.node
            await conn.execute(_UPSERT_PEERS, me, list(latest), list(latest.values()))
            peer_events.extend(PeerEvent(p, PeerCode.NODE) for p in latest)
        elif kind is LostOp:
            ids = list(dict.fromkeys(op.peer for op in run if isinstance(op, LostOp)))
            await conn.execute(_LOST_PEERS, me, ids)
            peer_events.extend(PeerEvent(p, PeerCode.LOST) for p in ids)
        elif kind is DisconnectOp:
            ids = list(dict.fromkeys(op.peer for op in run if isinstance(op, DisconnectOp)))
            await conn.execute(_DELETE_PEERS, me, ids)
            await conn.execute(_DELETE_SRC_TUNNELS, ids)
            peer_events.extend(PeerEvent(p, PeerCode.DISCONNECT) for p in ids)
        elif kind is AddTunnelOp:
            pairs = list(dict.fromkeys((op.src, op.dst) for op in run
                                       if isinstance(op, AddTunnelOp)))
            await conn.execute(_UPSERT_TUNNELS, me, [s for s, _ in pairs], [d for _, d in pairs])
            tunnel_events.extend(TunnelEvent(s, d, True) for s, d in pairs)
        elif kind is RemoveTunnelOp:
            pairs = list(dict.fromkeys((op.src, op.dst) for op in run
                                       if isinstance(op, RemoveTunnelOp)))
            await conn.execute(_DELETE_TUNNELS, [s for s, _ in pairs], [d for _, d in pairs])
            tunnel_events.extend(TunnelEvent(s, d, False) for s, d in pairs)
        elif kind is RfhOp:
            froms: list[uuid.UUID] = []
            tos: list[uuid.UUID] = []
            for op in run:
                assert isinstance(op, RfhOp)
                for t in op.targets:
                    if t == op.frm:
                        result.rfh_errors.append((op.frm, t))
                    else:
                        froms.append(op.frm)
                        tos.append(t)
            if froms:
                for r in await conn.fetch(_SHARED, froms, tos):
                    if r["shared"]:
                        rfh_events.append(RfhEvent(r["t"], r["f"]))
                    else:
                        result.rfh_errors.append((r["f"], r["t"]))
        elif kind is CloseOp:
            rows = await conn.fetch(_CLOSE, me)
            peer_events.extend(PeerEvent(r["id"], PeerCode.CLOSE) for r in rows)
        else:  # pragma: no cover - exhaustive over Op
            raise TypeError(f"unknown op {kind!r}")

    async def tunnels_touching(self, ids: Sequence[uuid.UUID]) -> list[tuple[uuid.UUID, uuid.UUID]]:
        """Every recorded tunnel (any replica) with an endpoint in ``ids``."""
        if not ids:
            return []
        rows = await self.pool.fetch(_TUNNELS_TOUCHING, list(ids))
        return [(r[0], r[1]) for r in rows]

    async def tunnels_from(self, src: uuid.UUID, timeout: float | None = None) -> set[uuid.UUID]:
        """Destinations of every recorded tunnel (any replica) with source ``src``."""
        rows = await self.pool.fetch(_TUNNELS_FROM, src, timeout=timeout)
        return {r[0] for r in rows}

    async def bindings(self, ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, list[BindingRow]]:
        """Rows of ``ids`` with their replica's liveness (judged by the DB clock)."""
        out: dict[uuid.UUID, list[BindingRow]] = {}
        if not ids:
            return out
        rows = await self.pool.fetch(_BINDINGS, list(ids), self.expiry)
        for r in rows:
            out.setdefault(r[0], []).append(BindingRow(r[0], r[1], r[2], r[3], r[4]))
        return out

    async def alive_coordinators(self) -> set[uuid.UUID]:
        rows = await self.pool.fetch(_ALIVE, self.expiry)
        return {r[0] for r in rows}

    # ------------------------------------------------------------------ replicas

    async def register_replica(self, info: ReplicaInfo, timeout: float | None = None) -> None:
        """Upsert this replica's row (``stopped_at`` cleared) and notify the others."""
        me = self.coordinator_id
        await self.pool.execute(
            _REGISTER_REPLICA, me, info.relay_url, info.region_id, info.hostname,
            CHAN_REPLICA, encode_heartbeat(me), timeout=timeout,
        )

    async def stop_replica(self, timeout: float | None = None) -> None:
        """Mark this replica stopped (no longer meshed) and notify the others."""
        me = self.coordinator_id
        await self.pool.execute(_STOP_REPLICA, me, CHAN_REPLICA, encode_heartbeat(me),
                                timeout=timeout)

    async def live_replicas(self, timeout: float | None = None) -> list[Replica]:
        """Registered, not stopped replicas whose coordinator heartbeat is fresh."""
        rows = await self.pool.fetch(_LIVE_REPLICAS, self.expiry, timeout=timeout)
        return [
            Replica(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7]) for r in rows
        ]

    async def set_mesh_status(self, status: str, timeout: float | None = None) -> None:
        await self.pool.execute(_SET_MESH_STATUS, self.coordinator_id, status, timeout=timeout)

    async def derp_mesh_key(self, candidate: bytes, timeout: float | None = None) -> bytes:
        """The region's shared mesh key: ``candidate`` if this call created it, else the
        existing one. Two statements on purpose: the read runs with a new snapshot, so
        it sees a row a concurrent first replica committed while our insert waited."""
        async with self.pool.acquire(timeout=timeout) as conn:
            await conn.execute(_INSERT_MESH_KEY, candidate, timeout=timeout)
            key = await conn.fetchval(
                "SELECT mesh_key FROM tailnet_derp_mesh_key WHERE singleton", timeout=timeout
            )
        if key is None or len(key) != 32:  # pragma: no cover - the CHECK constraint forbids it
            raise RuntimeError("tailnet_derp_mesh_key holds no valid key")
        return bytes(key)

    async def live_node_keys(self, timeout: float | None = None) -> list[tuple[uuid.UUID, bytes]]:
        """``(peer, node)`` of every ``ok`` row whose replica is alive."""
        rows = await self.pool.fetch(_LIVE_NODES, self.expiry, timeout=timeout)
        return [(r[0], r[1]) for r in rows]

    async def cleanup(self, retention: float, timeout: float | None = None) -> tuple[int, int, int]:
        """Delete dead replicas, old lost peers and orphaned old tunnels (pgcoord §7.5).

        Returns the numbers of (coordinators, peers, tunnels) deleted; cascades
        from deleted coordinators are not counted separately. ``timeout`` bounds
        the pool acquire and each statement (a hung server must not hang the caller).
        """
        async with self.pool.acquire(timeout=timeout) as conn:
            c = await conn.execute(
                "DELETE FROM tailnet_coordinators "
                "WHERE heartbeat_at < now() - make_interval(secs => $1) AND id <> $2",
                retention,
                self.coordinator_id,
                timeout=timeout,
            )
            p = await conn.execute(
                "DELETE FROM tailnet_peers WHERE status = 'lost' "
                "AND updated_at < now() - make_interval(secs => $1)",
                retention,
                timeout=timeout,
            )
            t = await conn.execute(
                "DELETE FROM tailnet_tunnels t "
                "WHERE t.updated_at < now() - make_interval(secs => $1) AND NOT EXISTS ("
                "  SELECT 1 FROM tailnet_peers p "
                "  WHERE p.id = t.src_id AND p.coordinator_id = t.coordinator_id)",
                retention,
                timeout=timeout,
            )
        return _count(c), _count(p), _count(t)

    async def all_tunnels(self) -> list[tuple[uuid.UUID, uuid.UUID, uuid.UUID]]:
        """(coordinator, src, dst) of every recorded tunnel (debug)."""
        rows = await self.pool.fetch(
            "SELECT coordinator_id, src_id, dst_id FROM tailnet_tunnels ORDER BY 2, 3"
        )
        return [(r[0], r[1], r[2]) for r in rows]


def _count(status: str) -> int:
    try:
        return int(status.rsplit(" ", 1)[-1])
    except ValueError:
        return 0
