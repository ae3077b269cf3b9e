"""Resource limits of the coordinator: one table of caps, each with a sane default.

Every limit bounds what one peer, one principal or one connection can make the
process hold or compute, whatever it sends or refuses to read. The defaults
are far above what real clients send (Coder's Go agents and clients, read from
``tailnet/node.go`` and ``tailnet/controllers.go``), so they never refuse them:

* a Coder node carries ``addresses`` = ``allowed_ips`` = the peer's one or two
  ``/128`` prefixes (no subnet routes), ``endpoints`` = one ``ip:port`` per
  local interface address plus STUN results (a handful; dozens on hosts with
  many bridges), ``derp_latency`` = two entries (``-v4``/``-v6``) per DERP
  region, ``derp_forced_websocket`` = at most one per region; the whole node is
  a few hundred bytes to a few KiB;
* an agent acknowledges each response with ONE request holding one
  ``ready_for_handshake`` entry per NODE update of that response, and our
  responses never carry more than
  :data:`tailnet.core.MAX_UPDATES_PER_RESPONSE` (1024) updates;
* Coder Connect adds a tunnel to every agent its user can reach; a control
  plane (coderd-like) one per agent it proxies to.

Where each limit is enforced (all transport-independent, so every transport
gets them):

==============================  =================================  ==================
limit                           enforced by                        when exceeded
==============================  =================================  ==================
node / request shape caps       :func:`tailnet.core.validate_request`  ``error`` text, stream
                                (once per request, before auth)     ends INVALID_ARGUMENT
``max_tunnels_per_peer``        the coordinator's ``handle``        ``error`` text, stream
                                                                    ends RESOURCE_EXHAUSTED
``peer_buffer_responses`` /     :class:`tailnet.service.QueueSink`  the peer is evicted
``peer_buffer_bytes``                                               (slow consumer)
``max_peers_per_principal``     :class:`tailnet.service.TailnetService`  RESOURCE_EXHAUSTED,
                                                                    stream refused
``max_streams_per_grpc_         ``grpc.max_concurrent_streams``     HTTP/2: further calls
connection``                    (:mod:`tailnet.server.grpc`)        wait for a free slot
``max_streams_per_session``     the WebSocket RPC transport         yamux RST for the extra
                                (:mod:`tailnet.rpc.server`)         stream (as Go's backlog)
==============================  =================================  ==================

Every exceeded limit produces a message naming it, e.g. ``"update_self node has
300 endpoints; at most 256 are allowed (max_endpoints)"``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Final

__all__ = ["Limits", "DEFAULT_LIMITS"]


@dataclass(frozen=True, slots=True)
class Limits:
    """Caps on what one peer, principal or connection may cost (see module docstring).

    All values are positive integers. Construct with keyword arguments to
    override a few: ``Limits(max_peers_per_principal=256)``.
    """

    # --- one Node (UpdateSelf) -------------------------------------------------
    #: serialized size of one node, unknown fields included
    max_node_bytes: int = 64 * 1024
    #: ``Node.addresses`` entries (Coder: 1-2)
    max_addresses: int = 64
    #: ``Node.allowed_ips`` entries (Coder: = addresses; room for subnet routes)
    max_allowed_ips: int = 1024
    #: ``Node.endpoints`` entries (one per local interface address + STUN)
    max_endpoints: int = 256
    #: ``Node.derp_latency`` entries (two per DERP region)
    max_derp_latency: int = 1024
    #: ``Node.derp_forced_websocket`` entries (at most one per DERP region)
    max_derp_forced_websocket: int = 512
    # --- one CoordinateRequest ---------------------------------------------------
    #: ``ready_for_handshake`` entries in one request (agents ack one response each)
    max_ready_for_handshake: int = 1024
    # --- one peer ---------------------------------------------------------------
    #: tunnels a peer may have as their source (AddTunnel beyond it is refused)
    max_tunnels_per_peer: int = 4096
    #: responses waiting in a peer's outbound buffer before it is evicted (Coder: 512)
    peer_buffer_responses: int = 512
    #: bytes (serialized) waiting in a peer's outbound buffer before it is evicted
    peer_buffer_bytes: int = 8 * 1024 * 1024
    # --- one principal / one connection ------------------------------------------
    #: concurrent Coordinate streams of one principal (kind + id) in this process
    max_peers_per_principal: int = 64
    #: concurrent RPC streams on one gRPC (HTTP/2) connection
    max_streams_per_grpc_connection: int = 100
    #: concurrent RPC streams on one WebSocket session (the RPC transport enforces it)
    max_streams_per_session: int = 64

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"limit {f.name} must be a positive integer, got {value!r}")


#: The defaults (what :class:`Limits` () gives).
DEFAULT_LIMITS: Final = Limits()
