"""Per-replica connection state and mapping diffs (pure: no asyncio, no database).

The PostgreSQL coordinator never pushes a peer's node directly to another
connection. Instead, every change notification makes the replica re-read the
rows of the peers involved and compute, for each local connection X and each
peer P of interest, P's *binding* as seen by X:

* ``NODE`` — P has a row with status ``ok`` whose replica is alive; among several
  such rows (P reconnected to another replica) the newest ``updated_at`` wins;
* ``LOST`` — P only has rows that are ``lost`` or belong to a dead replica;
* ``GONE`` — P has no rows at all (it disconnected gracefully);
* ``UNTUNNELED`` — X and P share no tunnel (any more).

:meth:`LocalPeers.deliver` diffs those bindings against what X was last told
(``sent``, the in-memory coordinator's per-recipient dedup, rule 2 of
:mod:`tailnet.core`) and sends only changes: a NODE whose bytes differ, and
LOST/DISCONNECTED only about peers X was told about. Because the diff is
against the *current* rows, replaying or merging notifications is harmless and a
full resync after a missed notification converges to the truth.

Reasons (the text in ``PeerUpdate.reason``) follow the in-memory coordinator:
NODE "init" / "add tunnel" / "node update"; LOST "lost" (or "coordinator close"
when the peer's replica shut down); DISCONNECTED "graceful disconnect" (GONE) or
"remove tunnel" (UNTUNNELED).

Slow consumers (a documented difference from the in-memory coordinator, as in
pgcoord): a refused ``sink.send`` does not evict the recipient. ``sent`` is only
committed after a successful send, the connection is marked ``dirty`` and the
owner resynchronises dirty connections periodically, so the update is retried,
not lost. Memory stays bounded: the sink's own buffer is bounded and nothing is
queued here.

Responses: "init" and resync diffs are batched into few responses, each with at
most :data:`tailnet.core.MAX_UPDATES_PER_RESPONSE` updates and at most
:data:`MAX_RESPONSE_BYTES` bytes (below the 4 MiB frame limit); other changes
travel one update per response, shared between recipients.
"""

from __future__ import annotations

import enum
import logging
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from tailnet.core import (
    CLOSE_ERR_OVERWRITTEN,
    MAX_RESPONSE_BYTES,
    MAX_UPDATES_PER_RESPONSE,
    REASON_ADD_TUNNEL,
    REASON_COORDINATOR_CLOSE,
    REASON_GRACEFUL_DISCONNECT,
    REASON_INIT,
    REASON_LOST,
    REASON_NODE_UPDATE,
    REASON_REMOVE_TUNNEL,
    PeerSink,
)
from tailnet.v2 import tailnet_pb2 as pb

__all__ = [
    "MAX_RESPONSE_BYTES",
    "BindingKind",
    "Binding",
    "BindingRow",
    "Trigger",
    "best_binding",
    "UNTUNNELED",
    "GONE",
    "LocalConn",
    "LocalPeers",
    "close_sink",
]

_log = logging.getLogger(__name__)


_PU = pb.CoordinateResponse.PeerUpdate


class BindingKind(enum.Enum):
    NODE = "node"
    LOST = "lost"
    GONE = "gone"
    UNTUNNELED = "untunneled"


class Trigger(enum.Enum):
    """What caused a diff; selects the reason texts and whether responses are batched."""

    INIT = "init"
    NODE = "node"
    LOST = "lost"
    DISCONNECT = "disconnect"
    CLOSE = "close"
    ADD_TUNNEL = "add tunnel"
    REMOVE_TUNNEL = "remove tunnel"
    RESYNC = "resync"

    @property
    def batched(self) -> bool:
        return self in (Trigger.INIT, Trigger.RESYNC)

    def reason(self, kind: BindingKind) -> str:
        if kind is BindingKind.NODE:
            if self is Trigger.INIT:
                return REASON_INIT
            if self is Trigger.ADD_TUNNEL:
                return REASON_ADD_TUNNEL
            return REASON_NODE_UPDATE
        if kind is BindingKind.LOST:
            return REASON_COORDINATOR_CLOSE if self is Trigger.CLOSE else REASON_LOST
        if kind is BindingKind.GONE or self is Trigger.DISCONNECT:
            return REASON_GRACEFUL_DISCONNECT  # a Disconnect also deletes its tunnels
        return REASON_REMOVE_TUNNEL


@dataclass(frozen=True, slots=True)
class BindingRow:
    """One ``tailnet_peers`` row, with its replica's liveness evaluated by the database."""

    peer: uuid.UUID
    coordinator: uuid.UUID
    node: bytes
    alive: bool  # status = 'ok' and the replica's heartbeat is fresh
    updated_at: float


@dataclass(frozen=True, slots=True)
class Binding:
    kind: BindingKind
    node_bytes: bytes | None = None
    node: pb.Node | None = field(default=None, compare=False)


UNTUNNELED = Binding(BindingKind.UNTUNNELED)
GONE = Binding(BindingKind.GONE)
_LOST = Binding(BindingKind.LOST)


def best_binding(rows: Iterable[BindingRow]) -> Binding:
    """Newest live row → NODE; only lost/dead rows → LOST; no rows → GONE."""
    best: BindingRow | None = None
    any_row = False
    for r in rows:
        any_row = True
        if r.alive and (best is None or (r.updated_at, r.coordinator.int) > (
            best.updated_at,
            best.coordinator.int,
        )):
            best = r
    if best is not None:
        return Binding(BindingKind.NODE, best.node, pb.Node.FromString(best.node))
    return _LOST if any_row else GONE


class LocalConn:
    """One live Coordinate stream on this replica."""

    __slots__ = (
        "id",
        "id_bytes",
        "name",
        "sink",
        "node",
        "created",
        "last_write",
        "overwrites",
        "sent",
        "dirty",
        "tunnels",
    )

    def __init__(self, peer_id: uuid.UUID, name: str, sink: PeerSink, now: float) -> None:
        self.id = peer_id
        self.id_bytes = peer_id.bytes
        self.name = name
        self.sink = sink
        self.node: pb.Node | None = None
        self.created = now
        self.last_write = now
        self.overwrites = 0
        #: other peer → node bytes this connection was last told (rule 2 of tailnet.core)
        self.sent: dict[uuid.UUID, bytes] = {}
        #: a send was refused; resync later
        self.dirty = False
        #: destinations this connection added (debug view only; the DB is authoritative)
        self.tunnels: set[uuid.UUID] = set()


_RespCache = dict[tuple[uuid.UUID, BindingKind, str], pb.CoordinateResponse]


class LocalPeers:
    """The local connections of one replica, their ``sent`` maps and a reverse index.

    ``told[P]`` = IDs of local connections whose ``sent`` holds P, so a peer that
    vanished from the tables (graceful disconnect deletes its rows and tunnels)
    can still be reported to everyone who knew it.
    """

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self.conns: dict[uuid.UUID, LocalConn] = {}
        self.told: dict[uuid.UUID, set[uuid.UUID]] = {}
        self.updates_sent = 0
        self.updates_suppressed = 0
        self.overwrites = 0
        self.refused_sends = 0

    # ---------------------------------------------------------------- membership
    def add(self, peer_id: uuid.UUID, name: str, sink: PeerSink) -> LocalConn:
        """Register a connection; a previous one with the same ID is replaced and closed."""
        conn = LocalConn(peer_id, name, sink, self._clock())
        old = self.conns.get(peer_id)
        if old is not None:
            conn.overwrites = old.overwrites + 1
            conn.tunnels = set(old.tunnels)
            self.overwrites += 1
            self._forget(old)
        self.conns[peer_id] = conn
        if old is not None:
            _log.info("peer %s (%s): ID overwritten by new connection", peer_id, name)
            close_sink(old.sink, CLOSE_ERR_OVERWRITTEN)
        return conn

    def current(self, peer_id: uuid.UUID, sink: PeerSink) -> LocalConn | None:
        conn = self.conns.get(peer_id)
        return conn if conn is not None and conn.sink is sink else None

    def remove(self, conn: LocalConn) -> bool:
        """Drop ``conn`` if it is current (does not close its sink)."""
        if self.conns.get(conn.id) is not conn:
            return False
        del self.conns[conn.id]
        self._forget(conn)
        return True

    def _forget(self, conn: LocalConn) -> None:
        for about in conn.sent:
            s = self.told.get(about)
            if s is not None:
                s.discard(conn.id)
                if not s:
                    del self.told[about]
        conn.sent.clear()

    def told_about(self, about: uuid.UUID) -> set[uuid.UUID]:
        return set(self.told.get(about, ()))

    # ---------------------------------------------------------------- sending
    def send(self, conn: LocalConn, resp: pb.CoordinateResponse) -> bool:
        """Non-blocking send; a refusal (or a raising sink) marks ``conn`` dirty."""
        try:
            ok = conn.sink.send(resp)
        except Exception:
            _log.exception("PeerSink.send raised for peer %s", conn.id)
            ok = False
        if ok:
            conn.last_write = self._clock()
            self.updates_sent += len(resp.peer_updates)
        else:
            conn.dirty = True
            self.refused_sends += 1
        return ok

    def _commit(self, conn: LocalConn, about: uuid.UUID, node_bytes: bytes | None) -> None:
        if node_bytes is None:
            conn.sent.pop(about, None)
            s = self.told.get(about)
            if s is not None:
                s.discard(conn.id)
                if not s:
                    del self.told[about]
        else:
            conn.sent[about] = node_bytes
            self.told.setdefault(about, set()).add(conn.id)

    def deliver(
        self,
        conn: LocalConn,
        items: Sequence[tuple[uuid.UUID, Binding, Trigger]],
        cache: _RespCache | None = None,
    ) -> None:
        """Send ``conn`` the changes among ``items`` (see module docstring).

        Items whose trigger is batched (init/resync) are packed into chunked
        responses; the others go one update per response, built once per
        ``cache`` and shared between recipients.
        """
        batch: list[tuple[uuid.UUID, pb.CoordinateResponse.PeerUpdate, bytes | None]] = []
        for about, b, trig in items:
            if about == conn.id:
                continue
            prev = conn.sent.get(about)
            if b.kind is BindingKind.NODE:
                if prev == b.node_bytes:
                    self.updates_suppressed += 1
                    continue
                kind = _PU.NODE
            elif prev is None:
                self.updates_suppressed += 1
                continue
            else:
                kind = _PU.LOST if b.kind is BindingKind.LOST else _PU.DISCONNECTED
            reason = trig.reason(b.kind)
            commit = b.node_bytes if b.kind is BindingKind.NODE else None
            if trig.batched:
                u = _PU(id=about.bytes, kind=kind, reason=reason)
                if b.node is not None:
                    u.node.CopyFrom(b.node)
                batch.append((about, u, commit))
                continue
            key = (about, b.kind, reason)
            resp = cache.get(key) if cache is not None else None
            if resp is None:
                resp = pb.CoordinateResponse()
                u = resp.peer_updates.add()
                u.id = about.bytes
                u.kind = kind
                u.reason = reason
                if b.node is not None:
                    u.node.CopyFrom(b.node)
                if cache is not None:
                    cache[key] = resp
            if not self.send(conn, resp):
                return
            self._commit(conn, about, commit)
        if batch:
            self._send_batch(conn, batch)

    def _send_batch(
        self,
        conn: LocalConn,
        batch: list[tuple[uuid.UUID, pb.CoordinateResponse.PeerUpdate, bytes | None]],
    ) -> None:
        i = 0
        while i < len(batch):
            resp = pb.CoordinateResponse()
            size = 0
            j = i
            while j < len(batch) and j - i < MAX_UPDATES_PER_RESPONSE:
                usize = batch[j][1].ByteSize() + 8
                if j > i and size + usize > MAX_RESPONSE_BYTES:
                    break
                size += usize
                j += 1
            resp.peer_updates.extend(u for _, u, _ in batch[i:j])
            if not self.send(conn, resp):
                return
            for about, _, commit in batch[i:j]:
                self._commit(conn, about, commit)
            i = j

    def close_all(self, error: str | None, gone_reason: str | None) -> list[LocalConn]:
        """Remove every connection; if ``gone_reason`` is set, first tell local peers
        LOST with that reason (as the in-memory ``close()`` does); close the sinks."""
        conns = list(self.conns.values())
        if gone_reason is not None:
            for c in conns:
                resp = pb.CoordinateResponse(
                    peer_updates=[_PU(id=c.id_bytes, kind=_PU.LOST, reason=gone_reason)]
                )
                for other_id in list(self.told.get(c.id, ())):
                    other = self.conns.get(other_id)
                    if other is not None and other is not c and self.send(other, resp):
                        self._commit(other, c.id, None)
        for c in conns:
            self.remove(c)
        for c in conns:
            close_sink(c.sink, error)
        return conns


def close_sink(sink: PeerSink, error: str | None) -> None:
    """``sink.close(error)``; an exception from the sink is logged, never propagated."""
    try:
        sink.close(error)
    except Exception:
        _log.exception("PeerSink.close raised; ignored")
