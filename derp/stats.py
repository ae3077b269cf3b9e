"""Plain-Python counters for the DERP server (exported to Prometheus elsewhere).

The server increments attributes directly (``stats.packets_received += n``);
that is an attribute store, no locks, no label lookups, so it is cheap enough
for per-batch updates on the hot path. Drops are kept per ``(reason, kind)``
pair in two pre-initialised dicts (every combination exists from the start,
like derper's pre-initialised ``derp_packets_dropped``), indexed with the
module-level tuple constants so no tuple is built per drop.

:meth:`ServerStats.snapshot` returns a JSON-friendly dict whose names follow
derper's expvar keys (spec §3.12), which is what an exporter iterates.
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "DROP_REASONS",
    "DROP_KINDS",
    "DropKey",
    "ServerStats",
    "UNKNOWN_DEST",
    "UNKNOWN_DEST_ON_FWD",
    "GONE_DISCONNECTED",
    "QUEUE_HEAD",
    "QUEUE_TAIL",
    "WRITE_ERROR",
    "DUP_CLIENT",
    "KIND_DISCO",
    "KIND_OTHER",
]

UNKNOWN_DEST: Final = "unknown_dest"
UNKNOWN_DEST_ON_FWD: Final = "unknown_dest_on_fwd"
GONE_DISCONNECTED: Final = "gone_disconnected"
QUEUE_HEAD: Final = "queue_head"
QUEUE_TAIL: Final = "queue_tail"
WRITE_ERROR: Final = "write_error"
DUP_CLIENT: Final = "dup_client"

KIND_DISCO: Final = "disco"
KIND_OTHER: Final = "other"

DROP_REASONS: Final[tuple[str, ...]] = (
    UNKNOWN_DEST,
    UNKNOWN_DEST_ON_FWD,
    GONE_DISCONNECTED,
    QUEUE_HEAD,
    QUEUE_TAIL,
    WRITE_ERROR,
    DUP_CLIENT,
)
DROP_KINDS: Final[tuple[str, ...]] = (KIND_DISCO, KIND_OTHER)

DropKey = tuple[str, str]


class ServerStats:
    """Counters and gauges of one :class:`derp.server.DerpServer`.

    Counters only ever grow; ``current_*`` fields are gauges. Owned by the
    event loop thread; read them from that thread (or accept torn reads).
    """

    __slots__ = (
        "accepts",
        "current_connections",
        "current_home_connections",
        "http_requests",
        "handshake_failures",
        "packets_received",
        "bytes_received",
        "packets_received_disco",
        "packets_sent",
        "bytes_sent",
        "packets_dropped",
        "bytes_dropped",
        "packets_forwarded_in",
        "got_ping",
        "sent_pong",
        "peer_gone_disconnected_frames",
        "peer_gone_not_here_frames",
        "unknown_frames",
        "keepalives_sent",
        "protocol_errors",
        "home_moves_in",
        "home_moves_out",
        "total_dup_client_conns",
        "admission_rejected",
        "packets_forwarded_out",
        "websocket_accepts",
        "write_timeouts",
        "rate_limit_waits",
        "accepts_rejected",
        "health_frames_sent",
        "restarting_frames_sent",
        "average_queue_duration_ms",
    )

    def __init__(self) -> None:
        self.accepts = 0
        self.current_connections = 0
        self.current_home_connections = 0
        self.http_requests = 0
        self.handshake_failures = 0
        self.packets_received = 0
        self.bytes_received = 0
        self.packets_received_disco = 0
        self.packets_sent = 0
        self.bytes_sent = 0
        self.packets_dropped: dict[DropKey, int] = {
            (r, k): 0 for r in DROP_REASONS for k in DROP_KINDS
        }
        self.bytes_dropped: dict[DropKey, int] = {
            (r, k): 0 for r in DROP_REASONS for k in DROP_KINDS
        }
        self.packets_forwarded_in = 0
        self.got_ping = 0
        self.sent_pong = 0
        self.peer_gone_disconnected_frames = 0
        self.peer_gone_not_here_frames = 0
        self.unknown_frames = 0
        self.keepalives_sent = 0
        self.protocol_errors = 0
        self.home_moves_in = 0
        self.home_moves_out = 0
        self.total_dup_client_conns = 0
        #: clients closed because admission control said no (derp.admission)
        self.admission_rejected = 0
        #: packets sent to a mesh peer as ForwardPacket (derp.mesh)
        self.packets_forwarded_out = 0
        #: DERP-over-WebSocket upgrades accepted (derp.websocket)
        self.websocket_accepts = 0
        #: clients dropped because their socket stayed blocked for the write timeout
        self.write_timeouts = 0
        #: times a client's reading was paused by the per-client rate limit
        self.rate_limit_waits = 0
        #: connections closed at accept (accept-rate limit or max connections)
        self.accepts_rejected = 0
        #: Health frames sent (problem announcements and clears)
        self.health_frames_sent = 0
        #: Restarting frames sent on graceful shutdown
        self.restarting_frames_sent = 0
        #: moving average (alpha 0.1) of how long queued packets waited, in ms
        self.average_queue_duration_ms = 0.0

    def drop(self, key: DropKey, nbytes: int, count: int = 1) -> None:
        """Count ``count`` dropped packets totalling ``nbytes`` under ``key``."""
        self.packets_dropped[key] += count
        self.bytes_dropped[key] += nbytes

    def drops_by_reason(self, reason: str) -> int:
        """Packets dropped for ``reason``, all kinds."""
        return sum(v for (r, _), v in self.packets_dropped.items() if r == reason)

    @property
    def total_drops(self) -> int:
        """Packets dropped for any reason."""
        return sum(self.packets_dropped.values())

    def snapshot(self) -> dict[str, object]:
        """All counters as a plain dict (drops as ``{"reason/kind": n}``)."""
        out: dict[str, object] = {}
        for name in self.__slots__:
            value = getattr(self, name)
            if isinstance(value, dict):
                out[name] = {f"{r}/{k}": v for (r, k), v in value.items()}
            else:
                out[name] = value
        return out
