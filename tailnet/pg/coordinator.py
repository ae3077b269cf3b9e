"""High-availability coordinator: replicas sharing state through PostgreSQL (pgcoord).

Several processes each run one :class:`PgCoordinator` on the same database and
act as one coordinator: a client on replica A tunnelled to an agent on replica B
gets the agent's node and updates and vice versa, with the semantics of the
in-memory :class:`tailnet.core.Coordinator` (the same behavioural suite runs
against both, ``tests/tailnet/cases.py``).

It exposes the in-memory coordinator's synchronous verbs (``connect``,
``handle``, ``lost``, ``close``) and debug accessors, so
:class:`tailnet.service.TailnetService` drives it unchanged. The verbs return
at once; database work runs on the event loop they are called from (the one
:meth:`PgCoordinator.start` ran on). Use :func:`create_pg_coordinator` to get a
started one and ``await coord.stop()`` on shutdown.

Pipeline (spec coordinator.md §7.3)::

    verbs ──► ops queue (coalesced: latest node per peer) ──► writer task
                 one transaction per batch: upserts/deletes + pg_notify(ids only)
                                            │
    LISTEN connection (pubsub.Listener) ◄───┘  (every replica, including this one)
        │ peer / tunnel events → work set (merged per peer / per tunnel)
        │ ready-for-handshake  → delivered at once to a local target
        ▼
    querier task: tunnels touching the affected peers + their rows (2 queries per batch)
        → mapper.LocalPeers.deliver: diff against what each local connection was told

Nothing is pushed between replicas directly: the tables are the truth and a
notification only says "re-read these peers". Merging or replaying work is
therefore harmless, and whenever notifications may have been missed (LISTEN
reconnect, PostgreSQL restart, undecodable payload, failed query) every local
connection is resynchronised from the tables, so no update is lost for good.
Updates are latest-state, not a log: two quick node updates may arrive as one.

Heartbeats and health (§7.4): the replica upserts ``tailnet_coordinators.heartbeat_at``
every ``heartbeat_interval`` (2 s) before doing anything else; liveness of rows is
judged in SQL with the database clock (``heartbeat_at > now() - expiry``, expiry =
``missed_heartbeats`` × interval = 6 s), so peers of a silent replica read as LOST.
A liveness check each interval resynchronises all local connections when the
set of live replicas changes (a replica died → its peers become LOST to their
tunnel peers here; it came back or a peer moved → NODE). After
``unhealthy_after`` (3) consecutive failed heartbeat writes the replica is
*unhealthy*: every local connection is closed with ``"coordinator unhealthy"``
and ``connect`` raises :class:`~tailnet.errors.CoordinatorClosed` with that text
until one heartbeat succeeds again.

Differences from the in-memory coordinator (deliberate, as pgcoord):

* Lost peers keep their tunnels (rows marked ``lost``, node kept), so their tunnel
  peers see them LOST rather than gone, and a client resuming its peer ID on any
  replica keeps its tunnels: its tunnel peers see LOST then NODE, never
  DISCONNECTED. Cleanup removes them after ``retention`` (24 h).
* Slow consumers are not kicked: a refused send is retried by a resync of that
  connection every heartbeat interval (see :mod:`tailnet.pg.mapper`); a refused
  ready-for-handshake is only logged.
* Delivery is asynchronous and coalescing (see above).
* ``max_tunnels_per_peer`` is checked against the tunnels added through (or
  inherited on) this replica, the connection's local view; a peer that resumed
  on another replica may thus hold up to twice the cap in the database.
* Graceful :meth:`close` marks this replica's peers ``lost`` (reason
  "coordinator close" for remote tunnel peers); it does not delete rows. A
  remote replica that resynchronises between that commit and the close
  notification reads a plain ``lost`` row and says LOST "lost" instead (rows
  do not record why they were lost; the kind is the same).

Replicas and their relays (issue 10, :mod:`tailnet.pg.replicas`): a replica
that runs an embedded DERP relay calls :meth:`PgCoordinator.register_replica`
with the URL other replicas dial; every replica reads the live replicas each
heartbeat interval (and at once on a ``tailnet_replica_update`` notification:
one registered or stopped) and calls its replica listeners when the set
changes. :meth:`PgCoordinator.derp_mesh_key` returns the region's shared mesh
key, created once by the first replica. With :meth:`track_node_keys` the
replica also keeps the node keys of every live peer on every replica
(:meth:`knows_node_key`, for ``derp_admission = "known"``), loaded once and
kept current from the peer notifications.

Writes are retried with backoff until they succeed (the ops queue holds the
pending requests, coalesced), so a PostgreSQL restart delays but does not drop
them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
import uuid
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass, fields
from typing import Any

import asyncpg  # type: ignore[import-untyped]

from tailnet.core import (
    CLOSE_ERR_COORDINATOR_CLOSE,
    READY_FOR_HANDSHAKE_ERROR,
    REASON_COORDINATOR_CLOSE,
    CoordinatorStats,
    PeerInfo,
    PeerSink,
    validate_request,
)
from tailnet.errors import CoordinatorClosed, LimitExceeded
from tailnet.limits import DEFAULT_LIMITS, Limits
from tailnet.metrics import Histogram
from tailnet.pg.mapper import (
    UNTUNNELED,
    Binding,
    LocalConn,
    LocalPeers,
    Trigger,
    best_binding,
    close_sink,
)
from tailnet.pg.payload import (
    CHAN_HEARTBEAT,
    CHAN_PEER,
    CHAN_REPLICA,
    CHAN_RFH,
    CHAN_TUNNEL,
    CHANNELS,
    PayloadError,
    PeerCode,
    decode_heartbeat,
    decode_peer_events,
    decode_rfh_events,
    decode_tunnel_events,
)
from tailnet.pg.pubsub import Listener
from tailnet.pg.replicas import NodeKeyIndex, Replica, ReplicaInfo, replicas_changed
from tailnet.pg.schema import migrate
from tailnet.pg.store import (
    AddTunnelOp,
    CloseOp,
    DisconnectOp,
    LostOp,
    NodeOp,
    Op,
    RemoveTunnelOp,
    RfhOp,
    Store,
)
from tailnet.v2 import tailnet_pb2 as pb

__all__ = [
    "CLOSE_ERR_UNHEALTHY",
    "PgCoordinatorConfig",
    "PgCoordinator",
    "create_pg_coordinator",
]

_log = logging.getLogger(__name__)

#: Error sent to every connection when this replica cannot write its heartbeat.
CLOSE_ERR_UNHEALTHY = "coordinator unhealthy"

_PU = pb.CoordinateResponse.PeerUpdate

_TRIGGER_OF_CODE = {
    PeerCode.NODE: Trigger.NODE,
    PeerCode.LOST: Trigger.LOST,
    PeerCode.DISCONNECT: Trigger.DISCONNECT,
    PeerCode.CLOSE: Trigger.CLOSE,
}


@dataclass(frozen=True, slots=True)
class PgCoordinatorConfig:
    """Timing and sizing knobs; defaults are pgcoord's. Tests shrink the intervals."""

    heartbeat_interval: float = 2.0
    #: a replica silent for missed_heartbeats × heartbeat_interval is dead (6 s)
    missed_heartbeats: int = 3
    #: consecutive failed heartbeat writes before this replica is unhealthy
    unhealthy_after: int = 3
    #: full resync of every local connection (pgcoord's mapperRefreshInterval)
    refresh_interval: float = 30.0
    cleanup_interval: float = 3600.0
    #: dead replicas, lost peers and orphaned tunnels older than this are deleted
    retention: float = 24 * 3600.0
    retry_max: float = 2.0
    pool_size: int = 4
    query_timeout: float = 10.0
    close_timeout: float = 15.0
    listen_probe_interval: float = 5.0

    @property
    def expiry(self) -> float:
        return self.heartbeat_interval * self.missed_heartbeats


class PgCoordinator:
    """One replica of the PostgreSQL-backed coordinator (see module docstring)."""

    def __init__(
        self,
        dsn: str,
        config: PgCoordinatorConfig | None = None,
        *,
        coordinator_id: uuid.UUID | None = None,
        clock: Callable[[], float] = time.time,
        limits: Limits = DEFAULT_LIMITS,
    ) -> None:
        self.dsn = dsn
        self.config = config or PgCoordinatorConfig()
        self.limits = limits
        self.id = coordinator_id or uuid.uuid4()
        self._local = LocalPeers(clock)
        self._pool: Any = None
        self._store: Store | None = None
        self._listener: Listener | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._started = False
        self._closed = False
        self._stopped = False
        self._unhealthy = False
        self._heartbeat_failures = 0
        # writer state
        self._ops: list[Op] = []
        self._pending_node: dict[uuid.UUID, NodeOp] = {}
        self._ops_ready = asyncio.Event()
        self._enqueued = 0
        self._written = 0
        self._progress = asyncio.Event()
        # querier state
        self._peer_work: dict[uuid.UUID, Trigger] = {}
        self._tunnel_work: dict[tuple[uuid.UUID, uuid.UUID], Trigger] = {}
        self._resync: dict[uuid.UUID, Trigger] = {}
        self._resync_all = False
        self._work_ready = asyncio.Event()
        self._work_seq = 0  # mapping work queued so far (see quiesce)
        self._work_done = 0
        self._work_progress = asyncio.Event()
        # liveness
        self._alive: set[uuid.UUID] | None = None
        self._liveness_kick = asyncio.Event()
        # replicas and their relays (issue 10)
        self._replica: ReplicaInfo | None = None
        self._replicas: tuple[Replica, ...] = ()
        self._replica_listeners: list[Callable[[tuple[Replica, ...]], None]] = []
        self._mesh_status: Callable[[], str] | None = None
        self._mesh_status_written: str | None = None
        self._status_task: asyncio.Task[None] | None = None
        # node keys of live peers on every replica (derp_admission = "known")
        self._node_keys: NodeKeyIndex | None = None
        self._keys_reload = False
        self.node_key_loads = 0
        # counters
        self.resyncs = 0
        self.write_batches = 0
        self.write_failures = 0
        self.query_batches = 0
        #: heartbeat writes [succeeded, failed] (tailnet.metrics)
        self.heartbeats = [0, 0]
        #: own heartbeat statement → its NOTIFY arriving here (tailnet.metrics)
        self.notification_lag = Histogram()
        self._hb_started: float | None = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Connect, migrate, write the first heartbeat, LISTEN, start the workers.

        Raises whatever asyncpg raises if the database is unreachable.
        """
        if self._started:
            return
        cfg = self.config
        # command_timeout bounds every statement (writer, querier, liveness): a
        # half-open connection raises after query_timeout instead of hanging a task.
        self._pool = await asyncpg.create_pool(
            self.dsn, min_size=1, max_size=cfg.pool_size, timeout=cfg.query_timeout,
            command_timeout=cfg.query_timeout,
        )
        try:
            async with self._pool.acquire() as conn:
                await migrate(conn)
            self._store = Store(self._pool, self.id, cfg.expiry)
            await self._store.heartbeat(cfg.query_timeout)
            self._alive = await self._store.alive_coordinators()
            self._listener = Listener(
                self.dsn,
                CHANNELS,
                self._on_notify,
                self._on_listen_reconnect,
                backoff_max=cfg.retry_max,
                probe_interval=cfg.listen_probe_interval,
            )
            await self._listener.start()
        except BaseException:
            await self._pool.close()
            raise
        self._started = True
        for name, coro in (
            ("writer", self._writer()),
            ("querier", self._querier()),
            ("heartbeat", self._heartbeat_loop()),
            ("liveness", self._liveness_loop()),
            ("cleanup", self._cleanup_loop()),
        ):
            self._tasks.append(self._spawn(coro, f"pgcoord-{name}"))
        _log.info("pg coordinator %s started", self.id)

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        return asyncio.get_running_loop().create_task(coro, name=name)

    async def stop(self, timeout: float | None = None) -> int:
        """:meth:`close`, flush pending writes, release connections; return writes dropped.

        Everything is bounded by ``timeout`` (default ``close_timeout``): during a
        database outage the pending writes (peers marked lost, tunnel changes) are
        dropped with a warning naming how many, and the connections are
        terminated instead of closed politely.
        """
        if self._stopped:
            return 0
        self._stopped = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.config.close_timeout if timeout is None else timeout)
        if self._replica is not None and self._store is not None and not self._unhealthy:
            try:  # the other replicas drop their links to us at once, not after the expiry
                # (bounded: during an outage it must not eat the flush's time budget)
                await asyncio.wait_for(
                    self._store.stop_replica(), max(0.1, min(2.0, deadline - loop.time()))
                )
            except Exception as exc:
                _log.warning("pg coordinator %s: could not mark the replica stopped: %r",
                             self.id, exc)
        self.close()
        dropped = 0
        if self._started:
            try:
                await asyncio.wait_for(self.flush(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                dropped = max(0, self._enqueued - self._written)
                _log.warning(
                    "pg coordinator %s: database unreachable at stop; dropped %d pending "
                    "write(s) (peer/tunnel updates not recorded; other replicas see "
                    "this replica's peers as lost once its heartbeat expires)",
                    self.id, dropped,
                )
        if self._status_task is not None:
            self._tasks.append(self._status_task)
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks.clear()
        if self._listener is not None:
            try:
                await asyncio.wait_for(self._listener.stop(), max(0.1, deadline - loop.time()))
            except TimeoutError:
                _log.warning("pg coordinator %s: LISTEN connection did not close in time", self.id)
        if self._pool is not None:
            try:
                await asyncio.wait_for(self._pool.close(), max(0.1, min(5.0, deadline - loop.time())))
            except Exception:
                self._pool.terminate()
        return dropped

    async def flush(self) -> None:
        """Wait until every op queued so far is committed."""
        target = self._enqueued
        while self._written < target:
            ev = self._progress
            await ev.wait()

    async def quiesce(self) -> None:
        """Wait until every op queued so far is committed and every mapping query
        queued so far (init batches, notifications already received) has run.

        For tests and benchmarks that order actions across replicas: after it, a
        connection's "init" batch can no longer include what is written next.
        """
        await self.flush()
        target = self._work_seq
        while self._work_done < target:
            ev = self._work_progress
            await ev.wait()

    # ------------------------------------------------------------------ verbs

    def connect(self, peer_id: uuid.UUID, name: str, sink: PeerSink) -> None:
        """Register a connection; it receives the "init" batch asynchronously.

        A connection with the same ID on this replica is replaced (closed with
        "peer ID overwritten by new connection", nobody told). Raises
        :class:`CoordinatorClosed` after :meth:`close` or while unhealthy.
        """
        if self._closed:
            raise CoordinatorClosed()
        if self._unhealthy:
            raise CoordinatorClosed(CLOSE_ERR_UNHEALTHY)
        if not self._started:
            raise RuntimeError("PgCoordinator.start() was not awaited")
        conn = self._local.add(peer_id, name, sink)
        self._resync[conn.id] = Trigger.INIT
        self._more_work()

    def handle(
        self,
        peer_id: uuid.UUID,
        sink: PeerSink,
        req: pb.CoordinateRequest,
        *,
        validated: bool = False,
    ) -> None:
        """Apply one authorized request (order as :meth:`Coordinator.handle`).

        Ignored if ``sink`` is not the current connection of ``peer_id``. Unless
        ``validated``, the request is validated first; raises
        :class:`~tailnet.errors.RequestError` for a malformed request and
        :class:`~tailnet.errors.LimitExceeded` for an AddTunnel beyond
        ``max_tunnels_per_peer`` (nothing applied in both cases).
        """
        if not validated:
            validate_request(req, self.limits)
        conn = self._local.current(peer_id, sink)
        if conn is None or self._closed:
            return
        if req.HasField("add_tunnel"):
            dst = uuid.UUID(bytes=req.add_tunnel.id)
            cap = self.limits.max_tunnels_per_peer
            if len(conn.tunnels) >= cap and dst not in conn.tunnels and dst != peer_id:
                raise LimitExceeded(
                    f"add_tunnel refused: this peer already has {len(conn.tunnels)} tunnels; "
                    f"at most {cap} are allowed (max_tunnels_per_peer)"
                )
        if req.HasField("update_self"):
            node = pb.Node()
            node.CopyFrom(req.update_self.node)
            conn.node = node
            self._enqueue(NodeOp(peer_id, node.SerializeToString(deterministic=True)))
        if req.HasField("add_tunnel"):
            dst = uuid.UUID(bytes=req.add_tunnel.id)
            if dst != peer_id:
                conn.tunnels.add(dst)
                self._enqueue(AddTunnelOp(peer_id, dst))
        if req.HasField("remove_tunnel"):
            dst = uuid.UUID(bytes=req.remove_tunnel.id)
            if dst != peer_id:
                conn.tunnels.discard(dst)
                self._enqueue(RemoveTunnelOp(peer_id, dst))
        if req.HasField("disconnect"):
            self._local.remove(conn)
            self._enqueue(DisconnectOp(peer_id))
            close_sink(sink, None)
            return
        if len(req.ready_for_handshake):
            targets = tuple(uuid.UUID(bytes=e.id) for e in req.ready_for_handshake)
            self._enqueue(RfhOp(peer_id, targets))

    def lost(self, peer_id: uuid.UUID, sink: PeerSink, error: str | None = None) -> None:
        """The stream ended without Disconnect: the peer becomes LOST; ``sink.close(error)``."""
        conn = self._local.current(peer_id, sink)
        if conn is None:
            return
        self._local.remove(conn)
        if not self._closed:
            self._enqueue(LostOp(peer_id))
        close_sink(sink, error)

    async def tunnels_from(self, peer_id: uuid.UUID) -> set[uuid.UUID]:
        """Destinations of every tunnel ``peer_id → dst`` in the database (any
        replica), after the writes queued so far are committed. Raises
        ``TimeoutError`` (or the driver's error) if that takes longer than
        ``query_timeout`` (the database is unreachable)."""
        if not self._started or self._closed:
            return set()
        await asyncio.wait_for(self.flush(), self.config.query_timeout)
        assert self._store is not None
        return await self._store.tunnels_from(peer_id, self.config.query_timeout)

    async def revoke_tunnels(self, peer_id: uuid.UUID, dsts: Iterable[uuid.UUID]) -> None:
        """Delete tunnels ``peer_id → dst`` (recorded by any replica) as RemoveTunnel
        does, and wait (at most ``query_timeout``, else ``TimeoutError``; the
        deletes stay queued) until that is committed (tunnel peers then see
        DISCONNECTED "remove tunnel" through the usual notifications)."""
        conn = self._local.conns.get(peer_id)
        any_op = False
        for dst in dsts:
            if dst == peer_id:
                continue
            if conn is not None:
                conn.tunnels.discard(dst)
            if not self._closed:
                self._enqueue(RemoveTunnelOp(peer_id, dst))
                any_op = True
        if any_op and self._started:
            await asyncio.wait_for(self.flush(), self.config.query_timeout)

    def close(self) -> None:
        """Close every local connection ("coordinator closed"; local tunnel peers see LOST
        "coordinator close") and mark this replica's peers lost in the database
        (remote tunnel peers see LOST "coordinator close"). Idempotent; await
        :meth:`stop` to flush and release the database connections."""
        if self._closed:
            return
        self._closed = True
        self._local.close_all(CLOSE_ERR_COORDINATOR_CLOSE, REASON_COORDINATOR_CLOSE)
        if self._started:
            self._enqueue(CloseOp())

    # ------------------------------------------------------------------ replicas

    async def register_replica(
        self, info: ReplicaInfo, *, mesh_status: Callable[[], str] | None = None
    ) -> None:
        """Publish this replica's embedded relay (see the module docstring).

        ``mesh_status`` returns this replica's JSON view of its mesh links; it is
        written to the replica's row after a heartbeat whenever it changed (the
        health report of any replica reads every replica's view).
        """
        if not self._started or self._store is None:
            raise RuntimeError("PgCoordinator.start() was not awaited")
        self._replica = info
        self._mesh_status = mesh_status
        await self._store.register_replica(info, self.config.query_timeout)
        await self._write_mesh_status()
        await self.refresh_replicas()

    def mesh_status_changed(self) -> None:
        """The ``mesh_status`` of :meth:`register_replica` changed: write it soon
        (coalesced) rather than after the next heartbeat."""
        if self._stopped or self._mesh_status is None:
            return
        if self._status_task is None or self._status_task.done():
            self._status_task = self._spawn(self._write_mesh_status(), "pgcoord-mesh-status")

    @property
    def replica_info(self) -> ReplicaInfo | None:
        return self._replica

    @property
    def replicas(self) -> tuple[Replica, ...]:
        """Live registered replicas (this one included) as last read."""
        return self._replicas

    def add_replica_listener(self, callback: Callable[[tuple[Replica, ...]], None]) -> None:
        """Call ``callback(replicas)`` on the event loop whenever the live replicas change
        (relay URL, region or host name of one, or one appearing/dying/stopping)."""
        self._replica_listeners.append(callback)

    async def fetch_replicas(self) -> list[Replica]:
        """A fresh read of the live replicas, with each one's mesh status (health report)."""
        assert self._store is not None
        return await self._store.live_replicas(self.config.query_timeout)

    async def refresh_replicas(self) -> None:
        """Re-read the live replicas now; listeners run if the set changed."""
        new = tuple(await self.fetch_replicas())
        changed = replicas_changed(self._replicas, new)
        self._replicas = new
        if changed:
            _log.info("pg coordinator %s: %d live replica(s) with a relay", self.id, len(new))
            for cb in list(self._replica_listeners):
                try:
                    cb(new)
                except Exception:
                    _log.exception("replica listener failed")

    async def derp_mesh_key(self) -> bytes:
        """The DERP mesh key shared by every replica (created once, atomically, by the
        first replica that asks). Never log it."""
        if self._store is None:
            raise RuntimeError("PgCoordinator.start() was not awaited")
        return await self._store.derp_mesh_key(secrets.token_bytes(32), self.config.query_timeout)

    def track_node_keys(self) -> None:
        """Start keeping the node keys of every live peer of every replica
        (:meth:`knows_node_key`). Idempotent; the first load runs on the querier."""
        if self._node_keys is None:
            self._node_keys = NodeKeyIndex()
            self._keys_reload = True
            self._work_ready.set()

    def knows_node_key(self, key: bytes) -> bool:
        """True if a live peer on any replica has ``Node.key == key`` (``b"np"`` + 32
        bytes). Needs :meth:`track_node_keys`; false until the first load (fail closed)."""
        idx = self._node_keys
        return idx is not None and key in idx

    # ------------------------------------------------------------------ queries

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def healthy(self) -> bool:
        """False while heartbeat writes keep failing (connections are refused)."""
        return not self._unhealthy

    @property
    def heartbeat_failures(self) -> int:
        """Consecutive failed heartbeat writes (0 after a success)."""
        return self._heartbeat_failures

    async def ping(self, timeout: float) -> float:
        """One ``SELECT 1`` round trip in seconds (the health report's database check)."""
        start = time.monotonic()
        async with self._pool.acquire(timeout=timeout) as conn:
            await conn.fetchval("SELECT 1", timeout=timeout)
        return time.monotonic() - start

    def live_replicas(self) -> int:
        """Replicas alive at the last liveness check (this one included)."""
        return len(self._alive) if self._alive is not None else 0

    def is_connected(self, peer_id: uuid.UUID) -> bool:
        """True if ``peer_id`` has a live connection on THIS replica."""
        return peer_id in self._local.conns

    def node_of(self, peer_id: uuid.UUID) -> pb.Node | None:
        """Latest node of a peer connected to this replica."""
        c = self._local.conns.get(peer_id)
        return None if c is None else c.node

    def has_tunnel(self, src: uuid.UUID, dst: uuid.UUID) -> bool:
        """``src → dst`` added by a connection of this replica (see :meth:`fetch_tunnels`)."""
        c = self._local.conns.get(src)
        return c is not None and dst in c.tunnels

    def shares_tunnel(self, a: uuid.UUID, b: uuid.UUID) -> bool:
        return self.has_tunnel(a, b) or self.has_tunnel(b, a)

    def tunnel_peers(self, peer_id: uuid.UUID) -> set[uuid.UUID]:
        """Local view: destinations added here plus peers this connection was told about."""
        c = self._local.conns.get(peer_id)
        if c is None:
            return set()
        return set(c.tunnels) | set(c.sent)

    def peers(self) -> list[PeerInfo]:
        """Snapshot of this replica's connections."""
        return [
            PeerInfo(c.id, c.name, c.node, c.created, c.last_write, c.overwrites)
            for c in self._local.conns.values()
        ]

    def tunnels(self) -> list[tuple[uuid.UUID, uuid.UUID]]:
        """Tunnels added by this replica's live connections."""
        return [(c.id, d) for c in self._local.conns.values() for d in c.tunnels]

    async def fetch_tunnels(self) -> list[tuple[uuid.UUID, uuid.UUID, uuid.UUID]]:
        """Every tunnel in the database as (coordinator, src, dst)."""
        assert self._store is not None
        return await self._store.all_tunnels()

    def stats(self) -> CoordinatorStats:
        lp = self._local
        return CoordinatorStats(
            peers=len(lp.conns),
            tunnels=sum(len(c.tunnels) for c in lp.conns.values()),
            updates_sent=lp.updates_sent,
            updates_suppressed=lp.updates_suppressed,
            evictions=0,
            overwrites=lp.overwrites,
        )

    async def cleanup_now(self) -> tuple[int, int, int]:
        """Run the retention cleanup once; returns (coordinators, peers, tunnels) deleted."""
        assert self._store is not None
        return await self._store.cleanup(self.config.retention, self.config.query_timeout)

    # ------------------------------------------------------------------ writer

    def _enqueue(self, op: Op) -> None:
        self._enqueued += 1
        if isinstance(op, NodeOp):
            pending = self._pending_node.get(op.peer)
            if pending is not None:
                pending.node = op.node  # coalesce: the latest node is all that matters
                return
            self._pending_node[op.peer] = op
        elif isinstance(op, (LostOp, DisconnectOp)):
            self._pending_node.pop(op.peer, None)
        elif isinstance(op, (AddTunnelOp, RemoveTunnelOp)):
            self._pending_node.pop(op.src, None)
        elif isinstance(op, RfhOp):
            self._pending_node.pop(op.frm, None)
        else:
            self._pending_node.clear()
        self._ops.append(op)
        self._ops_ready.set()

    def _take_ops(self) -> tuple[list[Op], int]:
        ops, self._ops = self._ops, []
        self._pending_node.clear()
        self._ops_ready.clear()
        return ops, self._enqueued

    def _mark_progress(self, upto: int) -> None:
        self._written = max(self._written, upto)
        ev, self._progress = self._progress, asyncio.Event()
        ev.set()

    async def _writer(self) -> None:
        assert self._store is not None
        while True:
            await self._ops_ready.wait()
            ops, upto = self._take_ops()
            delay = 0.05
            while True:
                try:
                    result = await self._store.write(ops, timeout=self.config.query_timeout)
                    break
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    self.write_failures += 1
                    _log.warning("pg coordinator %s: write of %d ops failed (%r); retrying",
                                 self.id, len(ops), exc)
                    await asyncio.sleep(delay)  # backoff before retrying the batch
                    delay = min(delay * 2, self.config.retry_max)
                    more, upto = self._take_ops()
                    ops = ops + more
            self.write_batches += 1
            self._mark_progress(upto)
            for frm, target in result.rfh_errors:
                conn = self._local.conns.get(frm)
                if conn is not None:
                    self._local.send(
                        conn,
                        pb.CoordinateResponse(
                            error=f'{READY_FOR_HANDSHAKE_ERROR}: you do not share a tunnel '
                            f'with "{target}"'
                        ),
                    )

    # ------------------------------------------------------------------ notifications

    def _on_notify(self, channel: str, payload: str) -> None:
        try:
            if channel == CHAN_PEER:
                for pe in decode_peer_events(payload):
                    self._peer_work[pe.peer] = _TRIGGER_OF_CODE[pe.code]
            elif channel == CHAN_TUNNEL:
                for te in decode_tunnel_events(payload):
                    trig = Trigger.ADD_TUNNEL if te.added else Trigger.REMOVE_TUNNEL
                    self._tunnel_work[(te.src, te.dst)] = trig
            elif channel == CHAN_RFH:
                for re in decode_rfh_events(payload):
                    self._deliver_rfh(re.to, re.frm)
                return
            elif channel == CHAN_HEARTBEAT:
                coord = decode_heartbeat(payload)
                if coord == self.id and self._hb_started is not None:
                    self.notification_lag.observe(time.monotonic() - self._hb_started)
                    self._hb_started = None
                if self._alive is not None and coord not in self._alive:
                    self._liveness_kick.set()
                return
            elif channel == CHAN_REPLICA:
                decode_heartbeat(payload)
                self._liveness_kick.set()  # one registered or stopped: re-read at once
                return
            else:
                return
        except PayloadError as exc:
            _log.warning("undecodable notification on %s (%s); resynchronising", channel, exc)
            self._resync_all = True
        self._more_work()

    def _deliver_rfh(self, to: uuid.UUID, frm: uuid.UUID) -> None:
        conn = self._local.conns.get(to)
        if conn is None:
            return
        resp = pb.CoordinateResponse(peer_updates=[_PU(id=frm.bytes, kind=_PU.READY_FOR_HANDSHAKE)])
        if not self._local.send(conn, resp):
            conn.dirty = False  # nothing to resync for an RFH; clients fall back to a timer
            _log.warning("ready for handshake from %s to %s dropped: buffer full", frm, to)

    def _on_listen_reconnect(self) -> None:
        self._request_resync_all()

    def _request_resync_all(self) -> None:
        self._resync_all = True
        self._more_work()

    def _more_work(self) -> None:
        self._work_seq += 1
        self._work_ready.set()

    # ------------------------------------------------------------------ querier

    async def _querier(self) -> None:
        delay = 0.05
        while True:
            await self._work_ready.wait()
            self._work_ready.clear()
            target = self._work_seq
            peer_work, self._peer_work = self._peer_work, {}
            tunnel_work, self._tunnel_work = self._tunnel_work, {}
            resync, self._resync = self._resync, {}
            resync_all, self._resync_all = self._resync_all, False
            try:
                await self._process(peer_work, tunnel_work, resync, resync_all)
                delay = 0.05
                self._work_done = target
                ev, self._work_progress = self._work_progress, asyncio.Event()
                ev.set()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                _log.warning("pg coordinator %s: mapping query failed (%r); will resync",
                             self.id, exc)
                for x, trig in resync.items():
                    if trig is Trigger.INIT or x not in self._resync:
                        self._resync[x] = trig
                self._request_resync_all()
                await asyncio.sleep(delay)  # backoff while the database is unavailable
                delay = min(delay * 2, self.config.retry_max)

    async def _process(
        self,
        peer_work: dict[uuid.UUID, Trigger],
        tunnel_work: dict[tuple[uuid.UUID, uuid.UUID], Trigger],
        resync: dict[uuid.UUID, Trigger],
        resync_all: bool,
    ) -> None:
        assert self._store is not None
        local = self._local
        # Only connections present now take part: one connecting while we query
        # gets its own "init" batch next (else it would see "add tunnel" first).
        snapshot = dict(local.conns)
        keys = self._node_keys
        if keys is not None:
            if self._keys_reload or resync_all:
                self._keys_reload = False
                keys.replace_all(await self._store.live_node_keys(self.config.query_timeout))
                self.node_key_loads += 1
            elif peer_work:
                ids = list(peer_work)
                keys.update(ids, await self._store.bindings(ids))
        if resync_all:
            self.resyncs += 1
            for x in local.conns:
                resync.setdefault(x, Trigger.RESYNC)
        if not (peer_work or tunnel_work or resync):
            return
        self.query_batches += 1
        affected: set[uuid.UUID] = set(peer_work) | set(resync)
        for s, d in tunnel_work:
            affected.add(s)
            affected.add(d)
        adj: dict[uuid.UUID, set[uuid.UUID]] = {}
        for s, d in await self._store.tunnels_touching(list(affected)):
            adj.setdefault(s, set()).add(d)
            adj.setdefault(d, set()).add(s)

        pairs: dict[uuid.UUID, tuple[LocalConn, dict[uuid.UUID, Trigger]]] = {}

        def put(x: uuid.UUID, p: uuid.UUID, trig: Trigger) -> None:
            if x == p:
                return
            conn = snapshot.get(x)
            if conn is None or local.conns.get(x) is not conn:
                return
            entry = pairs.get(x)
            if entry is None:
                entry = pairs[x] = (conn, {})
            m = entry[1]
            cur = m.get(p)
            if cur is Trigger.INIT or (cur is Trigger.RESYNC and not trig.batched):
                return
            m[p] = trig

        for p, trig in peer_work.items():
            for x in adj.get(p, ()):
                put(x, p, trig)
            for x in local.told_about(p):
                put(x, p, trig)
        for (s, d), trig in tunnel_work.items():
            put(s, d, trig)
            put(d, s, trig)
        for x, trig in resync.items():
            conn = snapshot.get(x)
            if conn is None or local.conns.get(x) is not conn:
                continue
            conn.dirty = False
            for p in adj.get(x, ()):
                put(x, p, trig)
            for p in list(conn.sent):
                put(x, p, trig)
            if x not in pairs:
                pairs[x] = (conn, {})
        if not pairs:
            return
        abouts = {p for _, m in pairs.values() for p in m}
        rows = await self._store.bindings(list(abouts))
        bindings: dict[uuid.UUID, Binding] = {p: best_binding(rows.get(p, ())) for p in abouts}
        cache: dict[Any, pb.CoordinateResponse] = {}
        for x, (conn, m) in pairs.items():
            if local.conns.get(x) is not conn:
                continue  # replaced or removed while we were querying
            near = adj.get(x, set())
            items = [(p, bindings[p] if p in near else UNTUNNELED, trig) for p, trig in m.items()]
            local.deliver(conn, items, cache)

    # ------------------------------------------------------------------ timers

    async def _heartbeat_loop(self) -> None:
        assert self._store is not None
        cfg = self.config
        last_refresh = time.monotonic()
        while True:
            await asyncio.sleep(cfg.heartbeat_interval)  # periodic timer
            self._hb_started = time.monotonic()
            try:
                await self._store.heartbeat(cfg.expiry)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._hb_started = None
                self.heartbeats[1] += 1
                self._heartbeat_failures += 1
                _log.warning("pg coordinator %s: heartbeat failed (%d in a row): %r",
                             self.id, self._heartbeat_failures, exc)
                if self._heartbeat_failures >= cfg.unhealthy_after and not self._unhealthy:
                    self._become_unhealthy()
            else:
                self.heartbeats[0] += 1
                self._heartbeat_failures = 0
                if self._unhealthy:
                    self._unhealthy = False
                    _log.warning("pg coordinator %s: healthy again", self.id)
                await self._write_mesh_status()
            now = time.monotonic()
            if now - last_refresh >= cfg.refresh_interval:
                last_refresh = now
                self._request_resync_all()
            else:
                dirty = [c.id for c in self._local.conns.values() if c.dirty]
                for x in dirty:
                    self._resync.setdefault(x, Trigger.RESYNC)
                if dirty:
                    self._more_work()

    async def _write_mesh_status(self) -> None:
        """Write the mesh status until the stored value is the current one (a change
        that arrives while a write is in flight is written right after it)."""
        provider = self._mesh_status
        if provider is None or self._store is None:
            return
        try:
            for _ in range(8):  # bounded: a status that changes on every read gives up
                status = provider()
                if status == self._mesh_status_written:
                    return
                await self._store.set_mesh_status(status, self.config.query_timeout)
                self._mesh_status_written = status
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            _log.warning("pg coordinator %s: mesh status not written: %r", self.id, exc)

    def _become_unhealthy(self) -> None:
        self._unhealthy = True
        _log.error("pg coordinator %s: unhealthy (%d failed heartbeats); closing connections",
                   self.id, self._heartbeat_failures)
        for conn in self._local.close_all(CLOSE_ERR_UNHEALTHY, None):
            self._enqueue(LostOp(conn.id))

    async def _liveness_loop(self) -> None:
        assert self._store is not None
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._liveness_kick.wait(), self.config.heartbeat_interval)
            self._liveness_kick.clear()
            try:
                alive = await self._store.alive_coordinators()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                _log.debug("liveness check failed: %r", exc)
                continue
            if alive != self._alive:
                _log.info("pg coordinator %s: live replicas changed (%d → %d); resynchronising",
                          self.id, len(self._alive or ()), len(alive))
                self._alive = alive
                self._request_resync_all()
            if self._replica is not None or self._replica_listeners:
                try:
                    await self.refresh_replicas()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    _log.debug("replica refresh failed: %r", exc)

    async def _cleanup_loop(self) -> None:
        assert self._store is not None
        while True:
            await asyncio.sleep(self.config.cleanup_interval)  # periodic timer
            try:
                counts = await self._store.cleanup(self.config.retention,
                                                   self.config.query_timeout)
                if any(counts):
                    _log.info("cleanup deleted %d coordinators, %d peers, %d tunnels", *counts)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                _log.warning("cleanup failed: %r", exc)


_CONFIG_FIELDS = frozenset(f.name for f in fields(PgCoordinatorConfig))


async def create_pg_coordinator(dsn: str, **opts: Any) -> PgCoordinator:
    """A started :class:`PgCoordinator` for ``dsn`` (what ``--postgres-url`` uses).

    ``opts``: any :class:`PgCoordinatorConfig` field (e.g. ``heartbeat_interval=2.0``),
    or ``config=PgCoordinatorConfig(...)``, plus ``coordinator_id=uuid`` and
    ``limits=tailnet.limits.Limits(...)``. Call
    ``await coord.stop()`` on shutdown.
    """
    config = opts.pop("config", None)
    coordinator_id = opts.pop("coordinator_id", None)
    limits = opts.pop("limits", DEFAULT_LIMITS)
    unknown = set(opts) - _CONFIG_FIELDS
    if unknown:
        raise TypeError(f"unknown PgCoordinator options: {sorted(unknown)}")
    if config is None:
        config = PgCoordinatorConfig(**opts)
    elif opts:
        raise TypeError("pass either config= or individual options, not both")
    coord = PgCoordinator(dsn, config, coordinator_id=coordinator_id, limits=limits)
    await coord.start()
    return coord
