"""Client-side peer table: what a tailnet peer knows about its tunnel peers.

This module is pure (no asyncio, no gRPC, no sockets). The transport
(:mod:`tailnet.client`) feeds every ``CoordinateResponse`` it reads into
:meth:`PeerTable.apply_response` and publishes the returned events.

Protocol flow (spec ``coordinator.md`` §2.4-2.6)::

    coordinator --CoordinateResponse{peer_updates=[...]}--> PeerTable.apply_response
                                                              |-> events (PeerUpdated, ...)
                                                              '-> NODE ids to acknowledge
    (agents only) <--CoordinateRequest{ready_for_handshake=[ids]}--

Rules applied per ``PeerUpdate`` (``kind``):

* ``NODE``: stores the node and clears the peer's *lost* flag. A NODE whose
  ``preferred_derp`` is 0 is ignored ("no home DERP yet", as Coder's clients do),
  except that it is still acknowledged by agents. A NODE equal to the stored one
  for a peer that is not lost produces no event (the coordinator dedups too, but
  after our own reconnect it re-sends everything).
* ``LOST``: the coordinator lost contact; the data path may still work. The peer
  is kept, flagged ``lost`` with a timestamp, until a later NODE clears it.
* ``DISCONNECTED``: the peer is gone for good; it is removed at once.
* ``READY_FOR_HANDSHAKE``: remembered for the peer, even when its NODE has not
  arrived yet (the flag is then carried into the entry created by that NODE).
* ``KIND_UNSPECIFIED`` or an ``id`` that is not 16 bytes: skipped (counted in
  :attr:`PeerTable.malformed`), never an exception: one bad entry must not take
  the connection down.

Invariants: every peer in the table has a node with ``preferred_derp != 0``;
``lost_at`` is set iff ``lost`` is true; ``mark_all_lost`` is idempotent.

Events are frozen, slotted dataclasses named in the past tense.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from tailnet.v2 import tailnet_pb2 as pb

__all__ = [
    "PeerState",
    "PeerTable",
    "PeerEvent",
    "PeerUpdated",
    "PeerLost",
    "PeerDisconnected",
    "ReadyForHandshake",
    "Kind",
]

Kind = pb.CoordinateResponse.PeerUpdate.Kind
"""Alias for the protobuf ``PeerUpdate.Kind`` enum (``NODE``, ``LOST``, ...)."""

_NODE = pb.CoordinateResponse.PeerUpdate.NODE
_LOST = pb.CoordinateResponse.PeerUpdate.LOST
_DISCONNECTED = pb.CoordinateResponse.PeerUpdate.DISCONNECTED
_RFH = pb.CoordinateResponse.PeerUpdate.READY_FOR_HANDSHAKE


@dataclass(frozen=True, slots=True)
class PeerUpdated:
    """A tunnel peer's node arrived or changed (also: a lost peer was found again)."""

    peer_id: uuid.UUID
    node: pb.Node
    reason: str = ""


@dataclass(frozen=True, slots=True)
class PeerLost:
    """The coordinator (or our connection to it) lost contact with the peer."""

    peer_id: uuid.UUID
    reason: str = ""


@dataclass(frozen=True, slots=True)
class PeerDisconnected:
    """The peer left for good (graceful disconnect, tunnel removed, or kicked)."""

    peer_id: uuid.UUID
    reason: str = ""


@dataclass(frozen=True, slots=True)
class ReadyForHandshake:
    """The peer (an agent) has programmed our node: start the WireGuard handshake."""

    peer_id: uuid.UUID


PeerEvent = PeerUpdated | PeerLost | PeerDisconnected | ReadyForHandshake
"""Every event :class:`PeerTable` can emit."""


@dataclass(slots=True)
class PeerState:
    """What we know about one tunnel peer. Owned and mutated by :class:`PeerTable`."""

    peer_id: uuid.UUID
    node: pb.Node
    updated_at: float
    """Clock time of the last NODE applied."""
    lost: bool = False
    lost_at: float | None = None
    """Clock time the peer was marked lost (``None`` while not lost)."""
    ready_for_handshake: bool = False


class PeerTable:
    """Applies coordinator peer updates; see the module docstring for the rules.

    ``clock`` is injected (default :func:`time.monotonic`) so tests control time.
    """

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._peers: dict[uuid.UUID, PeerState] = {}
        # READY_FOR_HANDSHAKE received before the peer's first (usable) NODE.
        self._pending_rfh: set[uuid.UUID] = set()
        self.malformed = 0
        """Number of peer updates skipped because they were malformed."""

    # Read-only access -------------------------------------------------------

    def __len__(self) -> int:
        return len(self._peers)

    def __contains__(self, peer_id: object) -> bool:
        return peer_id in self._peers

    def __iter__(self) -> Iterator[PeerState]:
        return iter(list(self._peers.values()))

    def get(self, peer_id: uuid.UUID) -> PeerState | None:
        """The peer's state, or ``None`` if unknown."""
        return self._peers.get(peer_id)

    def node_of(self, peer_id: uuid.UUID) -> pb.Node | None:
        """The peer's last node, or ``None`` if unknown."""
        state = self._peers.get(peer_id)
        return None if state is None else state.node

    def is_ready(self, peer_id: uuid.UUID) -> bool:
        """True once a READY_FOR_HANDSHAKE for the peer was received (even before its NODE)."""
        state = self._peers.get(peer_id)
        if state is not None:
            return state.ready_for_handshake
        return peer_id in self._pending_rfh

    # Mutations ----------------------------------------------------------------

    def apply_response(
        self, resp: pb.CoordinateResponse
    ) -> tuple[list[PeerEvent], list[uuid.UUID]]:
        """Apply every update of one response.

        Returns ``(events, node_ids)``: the events to publish and the ids of every
        well-formed NODE update in the response (what an agent acknowledges with
        ``ready_for_handshake``; in order, without duplicates).
        """
        events: list[PeerEvent] = []
        acks: list[uuid.UUID] = []
        for upd in resp.peer_updates:
            ev = self.apply(upd)
            if ev is not None:
                events.append(ev)
            if upd.kind == _NODE and len(upd.id) == 16:
                pid = uuid.UUID(bytes=upd.id)
                if pid not in acks:
                    acks.append(pid)
        return events, acks

    def apply(self, upd: pb.CoordinateResponse.PeerUpdate) -> PeerEvent | None:
        """Apply one update; returns the resulting event, if any."""
        if len(upd.id) != 16:
            self.malformed += 1
            return None
        pid = uuid.UUID(bytes=upd.id)
        kind = upd.kind
        if kind == _NODE:
            return self._node(pid, upd)
        if kind == _LOST:
            return self._lost(pid, upd.reason)
        if kind == _DISCONNECTED:
            self._pending_rfh.discard(pid)
            if self._peers.pop(pid, None) is None:
                return None
            return PeerDisconnected(pid, upd.reason)
        if kind == _RFH:
            state = self._peers.get(pid)
            if state is None:
                self._pending_rfh.add(pid)
            else:
                state.ready_for_handshake = True
            return ReadyForHandshake(pid)
        self.malformed += 1
        return None

    def _node(self, pid: uuid.UUID, upd: pb.CoordinateResponse.PeerUpdate) -> PeerEvent | None:
        if not upd.HasField("node") or upd.node.preferred_derp == 0:
            return None
        now = self._clock()
        state = self._peers.get(pid)
        if state is None:
            node = pb.Node()
            node.CopyFrom(upd.node)
            ready = pid in self._pending_rfh
            self._pending_rfh.discard(pid)
            self._peers[pid] = PeerState(pid, node, now, ready_for_handshake=ready)
            return PeerUpdated(pid, node, upd.reason)
        if not state.lost and state.node == upd.node:
            return None
        node = pb.Node()
        node.CopyFrom(upd.node)
        state.node = node
        state.updated_at = now
        state.lost = False
        state.lost_at = None
        return PeerUpdated(pid, node, upd.reason)

    def _lost(self, pid: uuid.UUID, reason: str) -> PeerLost | None:
        state = self._peers.get(pid)
        if state is None or state.lost:
            return None
        state.lost = True
        state.lost_at = self._clock()
        return PeerLost(pid, reason)

    def mark_all_lost(self, reason: str = "coordinator connection lost") -> list[PeerLost]:
        """Flag every known peer lost (our coordinator connection dropped).

        Returns one event per peer that was not lost already; idempotent.
        """
        out: list[PeerLost] = []
        for pid in list(self._peers):
            ev = self._lost(pid, reason)
            if ev is not None:
                out.append(ev)
        return out

    def remove(self, peer_id: uuid.UUID) -> bool:
        """Forget a peer locally (e.g. after we removed the tunnel). True if it was known."""
        self._pending_rfh.discard(peer_id)
        return self._peers.pop(peer_id, None) is not None

    def expire_lost(self, older_than: float) -> list[uuid.UUID]:
        """Drop peers lost for at least ``older_than`` seconds; returns their ids.

        Coder keeps lost peers up to 15 minutes after the last handshake; the data
        plane decides when to call this.
        """
        now = self._clock()
        gone = [
            s.peer_id
            for s in self._peers.values()
            if s.lost and s.lost_at is not None and now - s.lost_at >= older_than
        ]
        for pid in gone:
            del self._peers[pid]
        return gone
