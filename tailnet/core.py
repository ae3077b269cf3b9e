"""Pure, single-process tailnet coordinator (Coder's in-memory ``core``).

No sockets, no asyncio, no gRPC: transports call the four verbs below from ONE
thread (in practice one event loop); the coordinator holds no locks.

Data model (a documented decision): the generated protobuf classes of
``tailnet.v2.tailnet_pb2`` are used directly (``Node``, ``CoordinateRequest``,
``CoordinateResponse``), so a transport forwards messages without conversion.
Peer IDs are :class:`uuid.UUID`, assigned by the transport, never read from a
message.

Flow
----
::

    transport                         Coordinator                    PeerSink(s)
    ---------                         -----------                    -----------
    connect(id, name, sink)  ───────► register, replace dup id ────► old.close(overwritten)
                                      "init" batch               ────► sink.send(resp)
    validate_request(req, limits)     (module function, raises RequestError; ONCE)
    await policy.authorize(id, req)   (tailnet.auth, raises AuthorizationError)
    handle(id, sink, req,    ───────► UpdateSelf → AddTunnel → RemoveTunnel
           validated=True)
                                      → Disconnect → ReadyForHandshake
                                                                 ────► tunnel peers' sinks
    lost(id, sink, error)    ───────► LOST "lost" to tunnel peers, sink.close(error)
    close()                  ───────► LOST "coordinator close" everywhere, sinks closed

What is sent to whom (spec coordinator.md §2.4)
-----------------------------------------------
* connect X: X gets ONE response (chunked at :data:`MAX_UPDATES_PER_RESPONSE` updates
  and about :data:`MAX_RESPONSE_BYTES` bytes) of NODE "init" for every connected
  tunnel peer that has a node; nothing if empty.
* X UpdateSelf: every connected tunnel peer gets NODE "node update", one update per
  response (the same response object is shared by all recipients).
* X AddTunnel(D): tunnel X→D recorded even if D is offline. If D is connected:
  X gets D's node and D gets X's node (each if present), reason "add tunnel".
* X RemoveTunnel(D): tunnel X→D deleted; if X and D no longer share a tunnel in
  either direction, both get DISCONNECTED "remove tunnel" about the other.
* X Disconnect: DISCONNECTED "graceful disconnect" to tunnel peers, X removed,
  X's src-tunnels deleted, X's sink closed without error.
* lost(X): same with LOST "lost"; the error (if any) is passed to ``sink.close``.
* close(): first every connected peer hears LOST "coordinator close" about each
  announced tunnel peer (both ends of every tunnel), then every peer is removed;
  sinks closed with "coordinator closed"; later :meth:`Coordinator.connect` raises
  CoordinatorClosed.
* ReadyForHandshake(S) from X: if X and S share no tunnel → non-fatal
  ``error='ready for handshake error: you do not share a tunnel with "<S>"'`` to X;
  else if S is connected → S gets PeerUpdate{id=X, kind=READY_FOR_HANDSHAKE}
  (never de-duplicated).

Rules / invariants
------------------
1. Tunnels are directional and keyed by peer ID (not connection). The *tunnel
   peers* of X are the union of ``by_src[X]`` and ``by_dst[X]``. Removing X deletes
   only tunnels where X is the source, so a reconnecting agent keeps its clients.
2. De-duplication per recipient: each connection remembers the deterministic
   serialization of the last node it was told about every other peer. An identical
   NODE is suppressed; LOST/DISCONNECTED about a peer never announced to it is
   suppressed; LOST/DISCONNECTED forgets the entry. A new connection starts empty.
3. Duplicate IDs: connect() with an ID already present replaces the old
   connection: its sink is closed with "peer ID overwritten by new connection",
   nobody is told LOST/DISCONNECTED, tunnels are inherited, the new one gets "init".
4. Back-pressure: ``sink.send`` never blocks. ``False`` (buffer full) evicts that
   *recipient*: it is removed with DISCONNECTED "failed update" to its tunnel
   peers and its sink closed with "failed to update tunnel peer mapping". Nobody
   else waits. Evictions are queued and run after the current fan-out loop, so
   no tunnel/peer set is mutated while being iterated. A ``send``/``close`` that
   raises is logged and treated like a full buffer / ignored respectively.
   Exception: if forwarding READY_FOR_HANDSHAKE fails because the *target* is full,
   the *sender* is torn down as LOST "lost" (Coder's request-error path, spec §2.5).
5. Self-tunnels: AddTunnel/RemoveTunnel naming the sender itself are ignored
   (recorded nowhere, nothing sent). Coder records them, which makes a peer receive
   its own node; that is never useful, so we drop it. RFH naming oneself gets the
   "do not share a tunnel" error.
6. Reversed tunnels: if both X→D and D→X exist and X removes X→D, the two still
   share a tunnel, so no DISCONNECTED is sent (Coder sends it anyway, leaving both
   sides with a stale view; we deliberately keep views consistent).
7. Re-entrancy: sinks must not call back into the coordinator from ``send``
   (a :class:`RuntimeError` is raised). ``sink.close`` is only called once the
   coordinator is consistent and idle, so it may call back (e.g. ``lost``).
8. Sinks receive shared, immutable responses; they must not mutate them.
9. Limits (:class:`tailnet.limits.Limits`): requests are checked by
   :func:`validate_request` (node and request shape caps) exactly once — by the
   service before authorization, which then calls ``handle(..., validated=True)``;
   a direct caller's ``handle`` validates itself. An AddTunnel that would give
   its source more than ``max_tunnels_per_peer`` tunnels raises
   :class:`LimitExceeded` before anything is applied.
10. Re-authorization: :meth:`Coordinator.tunnels_from` and
   :meth:`Coordinator.revoke_tunnels` let the service check the tunnels a
   replacing connection would inherit against its own policy (and drop the
   refused ones, as RemoveTunnel does) before it calls :meth:`Coordinator.connect`.

Cost: O(tunnel peers) per request; a node is serialized once per UpdateSelf.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Final, Protocol

from tailnet.errors import CoordinatorClosed, LimitExceeded, RequestError
from tailnet.limits import DEFAULT_LIMITS, Limits
from tailnet.v2 import tailnet_pb2 as pb

__all__ = [
    "CLOSE_ERR_COORDINATOR_CLOSE",
    "CLOSE_ERR_FAILED_UPDATE",
    "CLOSE_ERR_OVERWRITTEN",
    "DISCO_KEY_LEN",
    "MAX_RESPONSE_BYTES",
    "MAX_UPDATES_PER_RESPONSE",
    "NODE_KEY_LEN",
    "READY_FOR_HANDSHAKE_ERROR",
    "REASON_ADD_TUNNEL",
    "REASON_COORDINATOR_CLOSE",
    "REASON_FAILED_UPDATE",
    "REASON_GRACEFUL_DISCONNECT",
    "REASON_INIT",
    "REASON_LOST",
    "REASON_NODE_UPDATE",
    "REASON_REMOVE_TUNNEL",
    "REQUEST_BUFFER_SIZE",
    "RESPONSE_BUFFER_SIZE",
    "Coordinator",
    "CoordinatorAPI",
    "CoordinatorClosed",
    "CoordinatorStats",
    "LimitExceeded",
    "PeerInfo",
    "PeerSink",
    "RequestError",
    "validate_node",
    "validate_request",
]

_log = logging.getLogger(__name__)

#: Responses a transport should buffer per connection (Coder's ResponseBufferSize).
RESPONSE_BUFFER_SIZE: Final = 512
#: Requests a transport should buffer per connection (Coder's RequestBufferSize).
REQUEST_BUFFER_SIZE: Final = 32
#: Largest number of PeerUpdates in one response (keeps "init" below 4 MiB frames).
MAX_UPDATES_PER_RESPONSE: Final = 1024
#: Batched responses ("init", resyncs) are cut at about this size (frames are limited
#: to 4 MiB; with nodes of up to 64 KiB, 1024 updates alone could exceed that).
MAX_RESPONSE_BYTES: Final = 3 * 1024 * 1024
#: ``Node.key``: ``b"np"`` + a 32-byte WireGuard public key (tailscale's binary form).
NODE_KEY_LEN: Final = 34
#: ``Node.disco``: ``"discokey:"`` + 64 hex digits (tailscale's text form).
DISCO_KEY_LEN: Final = 73
_DISCO_RE: Final = re.compile(r"discokey:[0-9a-fA-F]{64}")
#: Bytes a PeerUpdate adds around its node (id, kind, reason, tags), for chunking.
_UPDATE_OVERHEAD: Final = 64

CLOSE_ERR_OVERWRITTEN: Final = "peer ID overwritten by new connection"
CLOSE_ERR_COORDINATOR_CLOSE: Final = "coordinator closed"
CLOSE_ERR_FAILED_UPDATE: Final = "failed to update tunnel peer mapping"
READY_FOR_HANDSHAKE_ERROR: Final = "ready for handshake error"

REASON_INIT: Final = "init"
REASON_NODE_UPDATE: Final = "node update"
REASON_ADD_TUNNEL: Final = "add tunnel"
REASON_REMOVE_TUNNEL: Final = "remove tunnel"
REASON_GRACEFUL_DISCONNECT: Final = "graceful disconnect"
REASON_LOST: Final = "lost"
REASON_COORDINATOR_CLOSE: Final = "coordinator close"
REASON_FAILED_UPDATE: Final = "failed update"

_Kind = pb.CoordinateResponse.PeerUpdate.Kind
_NODE: Final = pb.CoordinateResponse.PeerUpdate.NODE
_DISCONNECTED: Final = pb.CoordinateResponse.PeerUpdate.DISCONNECTED
_LOST: Final = pb.CoordinateResponse.PeerUpdate.LOST
_RFH: Final = pb.CoordinateResponse.PeerUpdate.READY_FOR_HANDSHAKE


class PeerSink(Protocol):
    """Where the coordinator delivers a peer's responses.

    Implemented by :class:`tailnet.service.QueueSink` (bounded, by default
    :data:`RESPONSE_BUFFER_SIZE` responses; shared by every transport) and by test fakes.
    """

    def send(self, resp: pb.CoordinateResponse) -> bool:
        """Enqueue without blocking; ``False`` = buffer full (the peer is evicted).

        ``resp`` may be shared with other recipients: do not mutate it.
        """
        ...

    def close(self, error: str | None = None) -> None:
        """End this peer's stream after what was already enqueued.

        ``error`` (if any) is delivered as a final ``CoordinateResponse(error=...)``
        before the stream ends. Called at most once per sink by the coordinator.
        """
        ...


class CoordinatorAPI(Protocol):
    """What transports need from a coordinator: the in-memory :class:`Coordinator`
    and the PostgreSQL-backed ``tailnet.pg.PgCoordinator`` both provide it.

    The four verbs return at once (an asynchronous implementation schedules its
    work on the running loop); deliveries arrive through each peer's sink.
    ``tunnels_from``/``revoke_tunnels`` are coroutines (the PostgreSQL one reads
    and writes the database; the in-memory one never suspends).
    """

    @property
    def closed(self) -> bool: ...

    def connect(self, peer_id: uuid.UUID, name: str, sink: PeerSink) -> None: ...

    def handle(
        self,
        peer_id: uuid.UUID,
        sink: PeerSink,
        req: pb.CoordinateRequest,
        *,
        validated: bool = False,
    ) -> None: ...

    def lost(self, peer_id: uuid.UUID, sink: PeerSink, error: str | None = None) -> None: ...

    def close(self) -> None: ...

    def is_connected(self, peer_id: uuid.UUID) -> bool: ...

    async def tunnels_from(self, peer_id: uuid.UUID) -> set[uuid.UUID]:
        """Destinations of the tunnels recorded with ``peer_id`` as source."""
        ...

    async def revoke_tunnels(self, peer_id: uuid.UUID, dsts: Iterable[uuid.UUID]) -> None:
        """Delete tunnels ``peer_id → dst`` as RemoveTunnel would (both ends told)."""
        ...

    def peers(self) -> list[PeerInfo]: ...

    def tunnels(self) -> list[tuple[uuid.UUID, uuid.UUID]]: ...


@dataclass(frozen=True, slots=True)
class PeerInfo:
    """Debug snapshot of one connected peer (see :meth:`Coordinator.peers`)."""

    id: uuid.UUID
    name: str
    node: pb.Node | None
    created: float
    last_write: float
    overwrites: int


@dataclass(frozen=True, slots=True)
class CoordinatorStats:
    """Counters since construction (for metrics exporters)."""

    peers: int
    tunnels: int
    updates_sent: int
    updates_suppressed: int
    evictions: int
    overwrites: int


def _uuid_field(raw: bytes, field: str) -> None:
    if len(raw) != 16:
        raise RequestError(f"{field} must be a 16-byte UUID, got {len(raw)} bytes")


def _too_many(owner: str, n: int, field: str, cap: int) -> RequestError:
    return RequestError(
        f"{owner} has {n} {field} entries; at most {cap} are allowed (max_{field})"
    )


def validate_node(node: pb.Node, limits: Limits = DEFAULT_LIMITS) -> None:
    """Check one node's shape against ``limits``; raises :class:`RequestError`.

    * ``key``: empty, or exactly :data:`NODE_KEY_LEN` bytes starting with ``b"np"``;
    * ``disco``: empty, or ``"discokey:"`` + 64 hex digits;
    * counts of ``addresses``, ``allowed_ips``, ``endpoints``, ``derp_latency``
      and ``derp_forced_websocket`` entries;
    * the serialized size (unknown fields included): ``max_node_bytes``.

    Cheap: a few ``len()`` calls and one size computation (no per-entry loops;
    the size cap bounds the entries' lengths). Addresses are parsed later, by
    the policies that need them (:mod:`tailnet.auth`).
    """
    key = node.key
    if key and (len(key) != NODE_KEY_LEN or not key.startswith(b"np")):
        raise RequestError(
            f'update_self node key must be {NODE_KEY_LEN} bytes ("np" + 32-byte public key), '
            f"got {len(key)} bytes"
        )
    disco = node.disco
    if disco and (len(disco) != DISCO_KEY_LEN or _DISCO_RE.fullmatch(disco) is None):
        raise RequestError(
            f'update_self node disco must be "discokey:" + 64 hex digits ({DISCO_KEY_LEN} '
            f"characters), got {min(len(disco), 1000)} characters"
        )
    for field, n, cap in (
        ("addresses", len(node.addresses), limits.max_addresses),
        ("allowed_ips", len(node.allowed_ips), limits.max_allowed_ips),
        ("endpoints", len(node.endpoints), limits.max_endpoints),
        ("derp_latency", len(node.derp_latency), limits.max_derp_latency),
        ("derp_forced_websocket", len(node.derp_forced_websocket),
         limits.max_derp_forced_websocket),
    ):
        if n > cap:
            raise _too_many("update_self node", n, field, cap)
    size = node.ByteSize()
    if size > limits.max_node_bytes:
        raise RequestError(
            f"update_self node is {size} bytes; at most {limits.max_node_bytes} are allowed "
            "(max_node_bytes)"
        )


def validate_request(req: pb.CoordinateRequest, limits: Limits = DEFAULT_LIMITS) -> None:
    """Check a request's shape before authorization (spec §2.2 step 2), ONCE per request.

    Raises :class:`RequestError` with the text to send to the peer:

    * not a ``CoordinateRequest`` → ``"coordinate request is required"``;
    * ``update_self`` without ``node`` → ``"update_self node is required"``
      (an empty Node is still a Node); a node beyond ``limits`` → see
      :func:`validate_node`;
    * more than ``limits.max_ready_for_handshake`` ``ready_for_handshake`` entries;
    * ``add_tunnel.id`` / ``remove_tunnel.id`` / ``ready_for_handshake[i].id`` not
      16 bytes → a message naming the field.

    An empty request is a valid no-op. (Protobuf repeated fields cannot hold nil
    entries, so Coder's "ready_for_handshake entries must not be nil" cannot occur.)
    Cost is bounded by the caps: counts are checked before any per-entry work.
    """
    if not isinstance(req, pb.CoordinateRequest):
        raise RequestError("coordinate request is required")
    if req.HasField("update_self"):
        if not req.update_self.HasField("node"):
            raise RequestError("update_self node is required")
        validate_node(req.update_self.node, limits)
    if req.HasField("add_tunnel"):
        _uuid_field(req.add_tunnel.id, "add_tunnel.id")
    if req.HasField("remove_tunnel"):
        _uuid_field(req.remove_tunnel.id, "remove_tunnel.id")
    rfh = req.ready_for_handshake
    n = len(rfh)
    if n:
        if n > limits.max_ready_for_handshake:
            raise _too_many("request", n, "ready_for_handshake", limits.max_ready_for_handshake)
        for entry in rfh:
            if len(entry.id) != 16:
                bad = next(i for i, e in enumerate(rfh) if len(e.id) != 16)
                _uuid_field(rfh[bad].id, f"ready_for_handshake[{bad}].id")


class _Peer:
    """One live connection. ``sent`` maps other peer id → node bytes last told."""

    __slots__ = (
        "created",
        "doomed",
        "id",
        "id_bytes",
        "last_write",
        "name",
        "node",
        "node_bytes",
        "overwrites",
        "sent",
        "sink",
    )

    def __init__(self, peer_id: uuid.UUID, name: str, sink: PeerSink, now: float) -> None:
        self.id = peer_id
        self.id_bytes = peer_id.bytes
        self.name = name
        self.sink = sink
        self.node: pb.Node | None = None
        self.node_bytes: bytes | None = None
        self.sent: dict[uuid.UUID, bytes] = {}
        self.created = now
        self.last_write = now
        self.overwrites = 0
        # True once queued for removal: no more sends to it, no more requests from it.
        self.doomed = False


class Coordinator:
    """The coordinator state machine. Owned by one thread/event loop; no locks."""

    __slots__ = (
        "_busy",
        "_by_dst",
        "_by_src",
        "_clock",
        "_closed",
        "_evicted",
        "_evictions",
        "_limits",
        "_overwrites",
        "_peers",
        "_node_keys",
        "_pending_closes",
        "_teardowns",
        "_updates_sent",
        "_updates_suppressed",
    )

    def __init__(
        self, *, clock: Callable[[], float] = time.time, limits: Limits = DEFAULT_LIMITS
    ) -> None:
        self._clock = clock
        self._limits = limits
        self._peers: dict[uuid.UUID, _Peer] = {}
        #: ``Node.key`` → number of connected peers whose latest node carries it
        self._node_keys: dict[bytes, int] = {}
        self._by_src: dict[uuid.UUID, set[uuid.UUID]] = {}
        self._by_dst: dict[uuid.UUID, set[uuid.UUID]] = {}
        self._closed = False
        self._busy = False
        # Peers whose sink refused a send: removed DISCONNECTED "failed update".
        self._evictions: list[_Peer] = []
        # RFH senders to tear down as LOST: (peer, error text).
        self._teardowns: list[tuple[_Peer, str]] = []
        # Sinks to close once the current operation is finished.
        self._pending_closes: list[tuple[PeerSink, str | None]] = []
        self._updates_sent = 0
        self._updates_suppressed = 0
        self._evicted = 0
        self._overwrites = 0

    # ------------------------------------------------------------------ public verbs

    def connect(self, peer_id: uuid.UUID, name: str, sink: PeerSink) -> None:
        """Register a new connection for ``peer_id`` and send it the "init" batch.

        An existing connection with the same ID is replaced (rule 3). Raises
        :class:`CoordinatorClosed` after :meth:`close`.
        """
        self._enter()
        try:
            if self._closed:
                raise CoordinatorClosed()
            p = _Peer(peer_id, name, sink, self._clock())
            old = self._peers.get(peer_id)
            if old is not None:
                old.doomed = True
                p.overwrites = old.overwrites + 1
                self._overwrites += 1
                self._pending_closes.append((old.sink, CLOSE_ERR_OVERWRITTEN))
                self._index_node_key(old.node, None)
                _log.info("peer %s (%s): ID overwritten by new connection", peer_id, name)
            self._peers[peer_id] = p
            self._send_init(p)
            self._drain()
        finally:
            self._exit()
        self._run_closes()

    @property
    def limits(self) -> Limits:
        """The limits this coordinator enforces (``max_tunnels_per_peer``, and
        :func:`validate_request`'s caps for unvalidated requests)."""
        return self._limits

    def handle(
        self,
        peer_id: uuid.UUID,
        sink: PeerSink,
        req: pb.CoordinateRequest,
        *,
        validated: bool = False,
    ) -> None:
        """Apply one authorized request from ``peer_id``'s connection ``sink``.

        Ignored if ``sink`` is not the current connection of ``peer_id`` (replaced,
        removed, or coordinator closed). Order: UpdateSelf → AddTunnel →
        RemoveTunnel → Disconnect → ReadyForHandshake; processing stops early if
        the peer is removed meanwhile. Unless ``validated`` (the caller already ran
        :func:`validate_request` with this coordinator's limits), the request is
        validated first. Raises :class:`RequestError` (state untouched) for a
        malformed request and :class:`LimitExceeded` for an AddTunnel beyond
        ``max_tunnels_per_peer``.
        """
        if not validated:
            validate_request(req, self._limits)
        self._enter()
        try:
            p = self._current(peer_id, sink)
            if p is None:
                return
            if req.HasField("add_tunnel"):
                self._check_tunnel_cap(p.id, uuid.UUID(bytes=req.add_tunnel.id))
            if req.HasField("update_self"):
                self._update_self(p, req.update_self.node)
                self._drain()
            if not p.doomed and req.HasField("add_tunnel"):
                self._add_tunnel(p, uuid.UUID(bytes=req.add_tunnel.id))
                self._drain()
            if not p.doomed and req.HasField("remove_tunnel"):
                self._remove_tunnel(p, uuid.UUID(bytes=req.remove_tunnel.id))
                self._drain()
            if not p.doomed and req.HasField("disconnect"):
                self._remove(p, _DISCONNECTED, REASON_GRACEFUL_DISCONNECT, None)
                self._drain()
            if not p.doomed and len(req.ready_for_handshake):
                self._ready_for_handshake(p, req.ready_for_handshake)
                self._drain()
        finally:
            self._exit()
        self._run_closes()

    def lost(self, peer_id: uuid.UUID, sink: PeerSink, error: str | None = None) -> None:
        """The stream of ``sink`` ended without Disconnect: LOST "lost" to tunnel peers.

        ``sink.close(error)`` is called. No-op if ``sink`` is not current.
        """
        self._enter()
        try:
            p = self._current(peer_id, sink)
            if p is not None:
                self._remove(p, _LOST, REASON_LOST, error)
                self._drain()
        finally:
            self._exit()
        self._run_closes()

    def close(self) -> None:
        """Remove every peer as LOST "coordinator close"; close sinks with "coordinator closed".

        Idempotent. Afterwards :meth:`connect` raises :class:`CoordinatorClosed` and
        :meth:`handle`/:meth:`lost` are no-ops.
        """
        self._enter()
        try:
            if not self._closed:
                self._closed = True
                peers = list(self._peers.values())
                # Both ends of every tunnel hear LOST about the other before anyone is
                # removed (removing one by one would only tell the peers removed later).
                for p in peers:
                    resp: pb.CoordinateResponse | None = None
                    for other in self._connected_tunnel_peers(p.id):
                        if p.id not in other.sent:
                            continue
                        if resp is None:
                            resp = self._gone_resp(p.id_bytes, _LOST, REASON_COORDINATOR_CLOSE)
                        self._send_gone(other, p.id, resp)
                for p in peers:
                    if self._peers.get(p.id) is p:
                        self._remove(
                            p, _LOST, REASON_COORDINATOR_CLOSE, CLOSE_ERR_COORDINATOR_CLOSE
                        )
                # Everyone is gone already; a full buffer during close changes nothing.
                self._evictions.clear()
                self._teardowns.clear()
                self._by_src.clear()
                self._by_dst.clear()
        finally:
            self._exit()
        self._run_closes()

    # ------------------------------------------------------------------ queries

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._closed

    def is_connected(self, peer_id: uuid.UUID) -> bool:
        """True if ``peer_id`` has a live connection."""
        return peer_id in self._peers

    def knows_node_key(self, key: bytes) -> bool:
        """True if a connected peer's latest node has ``Node.key == key``
        (``b"np"`` + 32 bytes); O(1), used for DERP admission."""
        return key in self._node_keys

    def node_of(self, peer_id: uuid.UUID) -> pb.Node | None:
        """The latest node of a connected peer (do not mutate), else ``None``."""
        p = self._peers.get(peer_id)
        return None if p is None else p.node

    def has_tunnel(self, src: uuid.UUID, dst: uuid.UUID) -> bool:
        """True if the directional tunnel ``src → dst`` is recorded."""
        dsts = self._by_src.get(src)
        return dsts is not None and dst in dsts

    def shares_tunnel(self, a: uuid.UUID, b: uuid.UUID) -> bool:
        """True if a tunnel exists between ``a`` and ``b`` in either direction."""
        return self.has_tunnel(a, b) or self.has_tunnel(b, a)

    def tunnel_peers(self, peer_id: uuid.UUID) -> set[uuid.UUID]:
        """IDs (connected or not) sharing a tunnel with ``peer_id``."""
        return set(self._iter_tunnel_peers(peer_id))

    async def tunnels_from(self, peer_id: uuid.UUID) -> set[uuid.UUID]:
        """Destinations of the tunnels ``peer_id → dst`` (what a replacing connection
        inherits). A coroutine for :class:`CoordinatorAPI`; never suspends."""
        return set(self._by_src.get(peer_id, ()))

    async def revoke_tunnels(self, peer_id: uuid.UUID, dsts: Iterable[uuid.UUID]) -> None:
        """Delete tunnels ``peer_id → dst`` exactly as RemoveTunnel from ``peer_id``
        would (DISCONNECTED "remove tunnel" to both ends if they were told about
        each other), whether or not ``peer_id`` is connected. Never suspends."""
        self._enter()
        try:
            p = self._peers.get(peer_id)
            for dst in list(dsts):
                if p is not None and not p.doomed:
                    self._remove_tunnel(p, dst)
                    self._drain()
                else:
                    self._unlink_tunnel(peer_id, dst)
        finally:
            self._exit()
        self._run_closes()

    def peers(self) -> list[PeerInfo]:
        """Snapshot of connected peers (for debug pages)."""
        return [
            PeerInfo(p.id, p.name, p.node, p.created, p.last_write, p.overwrites)
            for p in self._peers.values()
        ]

    def tunnels(self) -> list[tuple[uuid.UUID, uuid.UUID]]:
        """Snapshot of recorded tunnels as ``(src, dst)`` pairs."""
        return [(src, dst) for src, dsts in self._by_src.items() for dst in dsts]

    def stats(self) -> CoordinatorStats:
        """Cheap counters for metrics."""
        return CoordinatorStats(
            peers=len(self._peers),
            tunnels=sum(len(d) for d in self._by_src.values()),
            updates_sent=self._updates_sent,
            updates_suppressed=self._updates_suppressed,
            evictions=self._evicted,
            overwrites=self._overwrites,
        )

    # ------------------------------------------------------------------ op framing

    def _enter(self) -> None:
        if self._busy:
            raise RuntimeError("Coordinator is not re-entrant (called from PeerSink.send?)")
        self._busy = True

    def _exit(self) -> None:
        self._busy = False

    def _run_closes(self) -> None:
        """Close sinks queued by the finished operation; closes may re-enter."""
        while self._pending_closes:
            sink, error = self._pending_closes.pop(0)
            try:
                sink.close(error)
            except Exception:  # noqa: BLE001 - a buggy sink must not break the coordinator
                _log.exception("PeerSink.close raised; ignored")

    def _current(self, peer_id: uuid.UUID, sink: PeerSink) -> _Peer | None:
        p = self._peers.get(peer_id)
        if p is None or p.sink is not sink or p.doomed:
            return None
        return p

    def _drain(self) -> None:
        """Run queued evictions/teardowns until none are left (they may cascade)."""
        while self._evictions or self._teardowns:
            if self._teardowns:
                p, error = self._teardowns.pop(0)
                if self._peers.get(p.id) is p:
                    _log.warning("peer %s (%s) torn down: %s", p.id, p.name, error)
                    self._remove(p, _LOST, REASON_LOST, error)
                continue
            p = self._evictions.pop(0)
            if self._peers.get(p.id) is p:
                self._evicted += 1
                _log.warning("peer %s (%s) evicted: response buffer full", p.id, p.name)
                self._remove(p, _DISCONNECTED, REASON_FAILED_UPDATE, CLOSE_ERR_FAILED_UPDATE)

    # ------------------------------------------------------------------ sending

    def _send(self, p: _Peer, resp: pb.CoordinateResponse) -> bool:
        """Non-blocking send; on failure queue ``p`` for eviction."""
        if p.doomed:
            return False
        try:
            ok = p.sink.send(resp)
        except Exception:  # noqa: BLE001 - contain a buggy sink to its own peer
            _log.exception("PeerSink.send raised for peer %s; evicting", p.id)
            ok = False
        if ok:
            p.last_write = self._clock()
            self._updates_sent += len(resp.peer_updates)
            return True
        p.doomed = True
        self._evictions.append(p)
        return False

    def _send_node(
        self, to: _Peer, about: _Peer, resp: pb.CoordinateResponse, node_bytes: bytes
    ) -> None:
        """Send a prebuilt single-NODE response unless ``to`` already has ``node_bytes``."""
        if to.doomed:
            return
        if to.sent.get(about.id) == node_bytes:
            self._updates_suppressed += 1
            return
        to.sent[about.id] = node_bytes
        self._send(to, resp)

    def _send_gone(self, to: _Peer, about_id: uuid.UUID, resp: pb.CoordinateResponse) -> None:
        """Send a prebuilt LOST/DISCONNECTED response if ``about_id`` was announced to ``to``."""
        if to.doomed:
            return
        if to.sent.pop(about_id, None) is None:
            self._updates_suppressed += 1
            return
        self._send(to, resp)

    @staticmethod
    def _node_resp(about: _Peer, reason: str) -> pb.CoordinateResponse:
        resp = pb.CoordinateResponse()
        u = resp.peer_updates.add()
        u.id = about.id_bytes
        u.kind = _NODE
        u.reason = reason
        assert about.node is not None
        u.node.CopyFrom(about.node)
        return resp

    @staticmethod
    def _gone_resp(about_id_bytes: bytes, kind: _Kind, reason: str) -> pb.CoordinateResponse:
        resp = pb.CoordinateResponse()
        u = resp.peer_updates.add()
        u.id = about_id_bytes
        u.kind = kind
        u.reason = reason
        return resp

    # ------------------------------------------------------------------ tunnels

    def _iter_tunnel_peers(self, peer_id: uuid.UUID) -> Iterator[uuid.UUID]:
        """Union of by_src[peer_id] and by_dst[peer_id], each ID once, no copies."""
        srcs = self._by_src.get(peer_id)
        dsts = self._by_dst.get(peer_id)
        if srcs:
            yield from srcs
        if dsts:
            for other in dsts:
                if srcs is None or other not in srcs:
                    yield other

    def _connected_tunnel_peers(self, peer_id: uuid.UUID) -> Iterator[_Peer]:
        peers = self._peers
        for other_id in self._iter_tunnel_peers(peer_id):
            other = peers.get(other_id)
            if other is not None and not other.doomed:
                yield other

    # ------------------------------------------------------------------ handlers

    def _send_init(self, p: _Peer) -> None:
        """The "init" batch, in responses of at most MAX_UPDATES_PER_RESPONSE updates
        and (unless one node alone is larger) about MAX_RESPONSE_BYTES bytes."""
        chunk: list[pb.CoordinateResponse.PeerUpdate] = []
        size = 0
        for other in self._connected_tunnel_peers(p.id):
            if other.node is None or other.node_bytes is None:
                continue
            usize = len(other.node_bytes) + _UPDATE_OVERHEAD
            if chunk and (
                len(chunk) >= MAX_UPDATES_PER_RESPONSE or size + usize > MAX_RESPONSE_BYTES
            ):
                if not self._send(p, pb.CoordinateResponse(peer_updates=chunk)):
                    return
                chunk, size = [], 0
            p.sent[other.id] = other.node_bytes
            chunk.append(
                pb.CoordinateResponse.PeerUpdate(
                    id=other.id_bytes, kind=_NODE, reason=REASON_INIT, node=other.node
                )
            )
            size += usize
        if chunk:
            self._send(p, pb.CoordinateResponse(peer_updates=chunk))

    def _index_node_key(self, old: pb.Node | None, new: pb.Node | None) -> None:
        """Keep :attr:`_node_keys` in step when a peer's node is replaced or dropped."""
        old_key = old.key if old is not None else None
        new_key = new.key if new is not None else None
        if old_key == new_key:
            return
        keys = self._node_keys
        if old_key:
            n = keys.get(old_key, 0) - 1
            if n > 0:
                keys[old_key] = n
            else:
                keys.pop(old_key, None)
        if new_key:
            keys[new_key] = keys.get(new_key, 0) + 1

    def _update_self(self, p: _Peer, node: pb.Node) -> None:
        own = pb.Node()
        own.CopyFrom(node)
        self._index_node_key(p.node, own)
        p.node = own
        node_bytes = own.SerializeToString(deterministic=True)
        p.node_bytes = node_bytes
        resp: pb.CoordinateResponse | None = None
        for other in self._connected_tunnel_peers(p.id):
            if other.sent.get(p.id) == node_bytes:
                self._updates_suppressed += 1
                continue
            if resp is None:
                resp = self._node_resp(p, REASON_NODE_UPDATE)
            self._send_node(other, p, resp, node_bytes)

    def _add_tunnel(self, p: _Peer, dst_id: uuid.UUID) -> None:
        if dst_id == p.id:
            return  # rule 5: self-tunnels are ignored
        self._by_src.setdefault(p.id, set()).add(dst_id)
        self._by_dst.setdefault(dst_id, set()).add(p.id)
        dst = self._peers.get(dst_id)
        if dst is None or dst.doomed:
            return
        if dst.node is not None and dst.node_bytes is not None:
            self._send_node(p, dst, self._node_resp(dst, REASON_ADD_TUNNEL), dst.node_bytes)
        if p.node is not None and p.node_bytes is not None:
            self._send_node(dst, p, self._node_resp(p, REASON_ADD_TUNNEL), p.node_bytes)

    def _check_tunnel_cap(self, src: uuid.UUID, dst: uuid.UUID) -> None:
        """Raise :class:`LimitExceeded` if AddTunnel(dst) would exceed the cap."""
        dsts = self._by_src.get(src)
        cap = self._limits.max_tunnels_per_peer
        if dsts is not None and len(dsts) >= cap and dst not in dsts and dst != src:
            raise LimitExceeded(
                f"add_tunnel refused: this peer already has {len(dsts)} tunnels; at most "
                f"{cap} are allowed (max_tunnels_per_peer)"
            )

    def _unlink_tunnel(self, src: uuid.UUID, dst: uuid.UUID) -> None:
        """Delete ``src → dst`` from both indexes (no messages)."""
        dsts = self._by_src.get(src)
        if dsts is not None:
            dsts.discard(dst)
            if not dsts:
                del self._by_src[src]
        srcs = self._by_dst.get(dst)
        if srcs is not None:
            srcs.discard(src)
            if not srcs:
                del self._by_dst[dst]

    def _remove_tunnel(self, p: _Peer, dst_id: uuid.UUID) -> None:
        if dst_id == p.id:
            return
        self._unlink_tunnel(p.id, dst_id)
        if self.has_tunnel(dst_id, p.id):
            return  # rule 6: still share the reverse tunnel
        self._send_gone(
            p, dst_id, self._gone_resp(dst_id.bytes, _DISCONNECTED, REASON_REMOVE_TUNNEL)
        )
        dst = self._peers.get(dst_id)
        if dst is not None:
            self._send_gone(
                dst, p.id, self._gone_resp(p.id_bytes, _DISCONNECTED, REASON_REMOVE_TUNNEL)
            )

    def _remove(self, p: _Peer, kind: _Kind, reason: str, error: str | None) -> None:
        """Remove connection ``p``: tell tunnel peers, drop src-tunnels, queue sink close."""
        del self._peers[p.id]
        p.doomed = True
        self._index_node_key(p.node, None)
        resp: pb.CoordinateResponse | None = None
        for other in self._connected_tunnel_peers(p.id):
            if p.id not in other.sent:
                self._updates_suppressed += 1
                continue
            if resp is None:
                resp = self._gone_resp(p.id_bytes, kind, reason)
            self._send_gone(other, p.id, resp)
        dsts = self._by_src.pop(p.id, None)
        if dsts:
            for dst_id in dsts:
                srcs = self._by_dst.get(dst_id)
                if srcs is not None:
                    srcs.discard(p.id)
                    if not srcs:
                        del self._by_dst[dst_id]
        self._pending_closes.append((p.sink, error))

    def _ready_for_handshake(
        self, p: _Peer, entries: Iterable[pb.CoordinateRequest.ReadyForHandshake]
    ) -> None:
        for entry in entries:
            target_id = uuid.UUID(bytes=entry.id)
            if target_id == p.id or not self.shares_tunnel(p.id, target_id):
                err = pb.CoordinateResponse(
                    error=f"{READY_FOR_HANDSHAKE_ERROR}: "
                    f'you do not share a tunnel with "{target_id}"'
                )
                if not self._send(p, err):
                    return
                continue
            target = self._peers.get(target_id)
            if target is None or target.doomed:
                continue
            resp = pb.CoordinateResponse()
            u = resp.peer_updates.add()
            u.id = p.id_bytes
            u.kind = _RFH
            if not self._send_rfh(target, resp):
                p.doomed = True
                self._teardowns.append(
                    (p, f"{READY_FOR_HANDSHAKE_ERROR}: failed to notify {target_id}: would block")
                )
                return

    def _send_rfh(self, target: _Peer, resp: pb.CoordinateResponse) -> bool:
        """Send RFH to ``target``; a full target is NOT evicted (the sender is, spec §2.5)."""
        try:
            ok = target.sink.send(resp)
        except Exception:  # noqa: BLE001 - contain a buggy sink to its own peer
            _log.exception("PeerSink.send raised for peer %s; evicting", target.id)
            target.doomed = True
            self._evictions.append(target)
            return False
        if ok:
            target.last_write = self._clock()
            self._updates_sent += 1
        return ok
