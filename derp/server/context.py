"""State shared by every connection of one server: :class:`ConnContext`."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterable
from typing import Any, Generic, Protocol, TypeVar

from ..admission import AdmissionGate
from ..fairlane import lane_for
from ..frames import PeerGoneReason, encode_peer_gone, encode_server_key, looks_like_disco
from ..peers import ForwardHook, RouteTable
from ..relay import Relay
from ..stats import KIND_DISCO, KIND_OTHER, WRITE_ERROR, ServerStats
from .config import ServerConfig
from .handshake import SERVER_INFO_JSON
from .wheel import TimerWheel

__all__ = ["ConnContext", "ConnLike"]



class ConnLike(Protocol):
    """What the context needs of a connection (:class:`derp.server.conn.DerpConnection`)."""

    _ka_period: float

    def __hash__(self) -> int: ...

    @property
    def is_open(self) -> bool: ...

    def _send_ctrl(self, frame: bytes) -> None: ...


C = TypeVar("C", bound=ConnLike)


class ConnContext(Generic[C]):
    """State shared by all connections of one server (event loop thread only).

    ``C`` is the connection type (:class:`derp.server.conn.DerpConnection`); this
    module does not import it, so the connection module can import this one.
    ``routes`` is the server's one table of keys reachable through other relays
    (:mod:`derp.peers`: mesh peers and sibling workers share it); its
    ``forwarders`` dict is ``relay.forwarders``.
    """

    __slots__ = (
        "loop",
        "relay",
        "stats",
        "private_key",
        "mesh_key",
        "server_key_frame",
        "handshake_timeout",
        "keepalive_interval",
        "keepalive_jitter",
        "queue_depth",
        "write_buffer_high",
        "conns",
        "pending",
        "touched",
        "lane",
        "batch_diverted",
        "forward_hook",
        "routes",
        "sibling_presence",
        "close_elsewhere",
        "pause_hook",
        "admission",
        "rate_config",
        "write_timeout",
        "mesh_write_timeout",
        "server_info_json",
        "health_on_duplicate",
        "wheel",
        "_on_lost",
    )

    def __init__(
        self,
        config: ServerConfig,
        loop: asyncio.AbstractEventLoop,
        on_lost: Callable[[C], None],
        stats: ServerStats | None = None,
    ) -> None:
        self.loop = loop
        self.relay: Relay[C] = Relay()
        self.stats = stats if stats is not None else ServerStats()
        self.private_key = config.private_key
        self.mesh_key = config.mesh_key
        self.server_key_frame = encode_server_key(config.private_key.public.raw)
        self.handshake_timeout = config.handshake_timeout
        self.keepalive_interval = config.keepalive_interval
        self.keepalive_jitter = config.keepalive_jitter
        self.queue_depth = config.queue_depth
        self.write_buffer_high = config.write_buffer_high
        #: admitted connections
        self.conns: set[C] = set()
        #: connections still in the handshake
        self.pending: set[C] = set()
        #: destinations with a non-empty batch during one data_received
        self.touched: list[C] = []
        #: the loop's shared lane for connections over their per-callback budget
        self.lane = lane_for(loop)
        #: [packets, bytes] of the current batch that were queued or dropped
        self.batch_diverted = [0, 0]
        #: forwarding hook (dst not local, but in relay.forwarders); installed by
        #: a derp.peers.PeerRelays implementation (usually forward_via_routes)
        self.forward_hook: ForwardHook | None = None
        #: keys reachable through other relays (mesh peers, sibling workers)
        self.routes: RouteTable[Any] = RouteTable(self.relay.forwarders)
        #: PeerPresent frames for keys held by sibling workers (derp.workers),
        #: added to a WatchConns answer; None in a single process
        self.sibling_presence: Callable[[], Iterable[bytes]] | None = None
        #: a mesh peer's ClosePeer(key) for sibling workers' connections (derp.workers)
        self.close_elsewhere: Callable[[bytes], None] | None = None
        #: told when a connection stops / starts taking writes (``(conn, paused)``),
        #: so sibling workers hold packets for it instead (derp.workers); None here
        self.pause_hook: Callable[[C, bool], None] | None = None
        #: runs admission checks (None: admit everyone)
        self.admission: AdmissionGate | None = None
        if config.admission is not None:
            self.admission = AdmissionGate(config.admission)
        self.rate_config = config.rate_config
        self.write_timeout = config.write_timeout
        self.mesh_write_timeout = config.mesh_write_timeout
        self.health_on_duplicate = config.health_on_duplicate
        #: ServerInfo JSON (token bucket fields when a receive limit is set)
        self.server_info_json = SERVER_INFO_JSON
        rl = config.rate_config.server_info_fields()
        if rl:
            info = dict(json.loads(SERVER_INFO_JSON))
            info.update(rl)
            self.server_info_json = json.dumps(info, separators=(",", ":")).encode()
        resolution = min(1.0, config.keepalive_interval / 10)
        self.wheel: TimerWheel[C] = TimerWheel(resolution, loop.time())
        self._on_lost = on_lost

    def schedule_keepalive(self, conn: C) -> None:
        """Put ``conn``'s next KeepAlive into the shared wheel."""
        self.wheel.schedule(conn, self.loop.time() + conn._ka_period)

    def on_lost(self, conn: C) -> None:
        self._on_lost(conn)

    def forward_via_routes(self, src: bytes, dst: bytes, packet: memoryview) -> None:
        """The usual ``forward_hook``: hand the packet to the route in use for ``dst``;
        count a ``write_error`` drop if there is none or the link refused it."""
        link = self.routes.route(dst)
        if link is None or not link.forward(src, dst, packet):
            kind = KIND_DISCO if looks_like_disco(packet) else KIND_OTHER
            self.stats.drop((WRITE_ERROR, kind), len(packet))

    def unreachable(self, keys: Iterable[bytes]) -> None:
        """Keys that lost their last route: PeerGone(Disconnected) to the local
        receivers that heard from them, unless the key is connected here."""
        relay = self.relay
        for key in keys:
            if key in relay:
                continue
            subs = relay.take_subscribers(key)
            if subs:
                frame = encode_peer_gone(key, PeerGoneReason.DISCONNECTED)
                for c in subs:
                    if c.is_open:
                        c._send_ctrl(frame)
                        self.stats.peer_gone_disconnected_frames += 1
