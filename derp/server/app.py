"""The DERP server: one TCP port, HTTP front door, DERP connections, shared timers.

Composition::

    DerpServer ─ listener ─► HttpConnection (h11)  ── upgrade ──► DerpServer.accept()
        │                                                         │
        └─ ConnContext (shared by every DerpConnection) ◄─────────┘
             relay: derp.relay.Relay     stats: derp.stats.ServerStats
             keepalive TimerWheel, driven by ONE loop timer (no task per connection)

:meth:`DerpServer.accept` is the single entry point for DERP connections: any
transport adapter (the built-in HTTP front door, a bigger HTTP application that
mounts ``/derp``, a WebSocket adapter) calls it with an accepted
``asyncio.Transport`` and the bytes it already read after the upgrade request.
The server works on whatever event loop is running; the CLI uses uvloop.

Production features are configured through :class:`ServerConfig` fields:
TLS and accept limits in :mod:`derp.server.listener` (``ssl_context``,
``accept_limit``/``accept_burst``, ``max_connections``), the per-client
receive limit and write timeout in :mod:`derp.server.conn` (``rate_config``,
``write_timeout``), Prometheus/``/debug`` via :attr:`DerpServer.metrics` and
``debug_allow`` (:mod:`derp.metrics`), DERP over WebSocket in
:mod:`derp.websocket`, and graceful restart with :meth:`DerpServer.stop`
(``restarting=True``) / :meth:`DerpServer.announce_restart`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Callable

from ..admission import Admission, AdmissionGate
from ..dashboard import RelayDashboard, SseStart
from ..fairlane import lane_for
from ..frames import encode_restarting, encode_server_key
from ..keys import PrivateKey, PublicKey
from ..mesh import Mesh, MeshPeer
from ..limits import AcceptLimiter, RateConfig
from ..metrics import DebugAccess, DerpMetrics
from ..relay import Relay
from ..stats import ServerStats
from .conn import DerpConnection
from .handshake import SERVER_INFO_JSON
from .http import HttpConnection, derp_upgrade_response
from .listener import AcceptGate
from .wheel import TimerWheel

__all__ = ["ServerConfig", "DerpServer", "ConnContext"]

log = logging.getLogger("derp.server")

ForwardHook = Callable[[bytes, bytes, memoryview], None]


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """DERP server settings.

    ``mesh_key`` is the raw 32-byte mesh pre-shared key (``None``: no mesh).
    ``keepalive_jitter`` is the upper bound of the per-connection random
    KeepAlive jitter (derper: 5 s). ``queue_depth`` bounds each of a client's
    two send queues (data and disco). ``write_buffer_high`` is the transport
    high-water mark above which a client counts as not writable.
    """

    private_key: PrivateKey
    mesh_key: bytes | None = None
    hostname: str = "127.0.0.1"
    keepalive_interval: float = 60.0
    handshake_timeout: float = 10.0
    queue_depth: int = 32
    keepalive_jitter: float = 5.0
    write_buffer_high: int = 64 * 1024
    # --- production limits, TLS, metrics, restart (derp.limits/tls/metrics) ---
    #: TLS for the listener (derp.tls.server_ssl_context); None = plain HTTP
    ssl_context: ssl.SSLContext | None = None
    #: accepted connections per second (inf = unlimited) and burst
    accept_limit: float = math.inf
    accept_burst: int = 2**31 - 1
    #: open sockets above which new ones are closed at accept (0 = unlimited)
    max_connections: int = 0
    #: per-client receive rate limit (advertised in ServerInfo; mesh peers exempt)
    rate_config: RateConfig = field(default_factory=RateConfig)
    #: drop a client whose socket stays blocked this long (0 disables); mesh peers get 30 s
    write_timeout: float = 2.0
    mesh_write_timeout: float = 30.0
    #: networks allowed to read /debug/* and /metrics (None: loopback only)
    debug_allow: tuple[str, ...] | None = None
    #: Restarting frame sent to every client on stop(restarting=True)
    restart_reconnect_in: float = 1.0
    restart_try_for: float = 30.0
    #: tell duplicate connections of a key about each other with Health frames
    health_on_duplicate: bool = True
    #: admission hook for non-mesh clients (derp.admission); None admits everyone
    admission: Admission | None = None
    #: mesh peers to dial (derp.mesh.parse_mesh_with); needs mesh_key
    mesh_with: tuple[MeshPeer, ...] = ()
    #: seconds between mesh reconnect attempts (derper: 5)
    mesh_retry_interval: float = 5.0

    def __post_init__(self) -> None:
        if self.mesh_key is not None and len(self.mesh_key) != 32:
            raise ValueError("mesh_key must be 32 raw bytes")
        if self.keepalive_interval <= 0 or self.handshake_timeout <= 0:
            raise ValueError("keepalive_interval and handshake_timeout must be positive")
        if self.queue_depth < 0:
            raise ValueError("queue_depth must be >= 0")
        if self.mesh_with and self.mesh_key is None:
            raise ValueError("mesh_with needs a mesh_key")
        if self.write_timeout < 0 or self.mesh_write_timeout < 0 or self.max_connections < 0:
            raise ValueError("write timeouts and max_connections must be >= 0")
        if self.restart_reconnect_in < 0 or self.restart_try_for < 0:
            raise ValueError("restart times must be >= 0")


class ConnContext:
    """State shared by all connections of one server (event loop thread only)."""

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
        "batch_diverted",
        "forward_hook",
        "admission",
        "rate_config",
        "write_timeout",
        "mesh_write_timeout",
        "server_info_json",
        "health_on_duplicate",
        "wheel",
        "lane",
        "_on_lost",
    )

    def __init__(
        self,
        config: ServerConfig,
        loop: asyncio.AbstractEventLoop,
        on_lost: Callable[[DerpConnection], None],
        stats: ServerStats | None = None,
    ) -> None:
        self.loop = loop
        #: the loop's shared lane for connections over their per-callback budget
        self.lane = lane_for(loop)
        self.relay: Relay[DerpConnection] = Relay()
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
        self.conns: set[DerpConnection] = set()
        #: connections still in the handshake
        self.pending: set[DerpConnection] = set()
        #: destinations with a non-empty batch during one data_received
        self.touched: list[DerpConnection] = []
        #: [packets, bytes] of the current batch that were queued or dropped
        self.batch_diverted = [0, 0]
        #: mesh forwarding hook (dst not local, but in relay.forwarders)
        self.forward_hook: ForwardHook | None = None
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
        self.wheel: TimerWheel[DerpConnection] = TimerWheel(resolution, loop.time())
        self._on_lost = on_lost

    def schedule_keepalive(self, conn: DerpConnection) -> None:
        """Put ``conn``'s next KeepAlive into the shared wheel."""
        self.wheel.schedule(conn, self.loop.time() + conn._ka_period)

    def on_lost(self, conn: DerpConnection) -> None:
        self._on_lost(conn)


class DerpServer:
    """A DERP relay server on one TCP port (HTTP + DERP upgrade).

    Usage::

        srv = DerpServer(ServerConfig(private_key=PrivateKey.generate()))
        await srv.start("127.0.0.1", 0)
        ... srv.port, srv.public_key, srv.stats, srv.client_count ...
        await srv.stop()
    """

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self._ctx: ConnContext | None = None
        self._stats = ServerStats()
        self._listeners: list[asyncio.Server] = []
        self._sweep: asyncio.TimerHandle | None = None
        self._http: set[HttpConnection] = set()
        self._derp_live: set[DerpConnection] = set()
        self._idle: asyncio.Event | None = None
        self._upgrade_response = derp_upgrade_response(config.private_key.public)
        self._mesh: Mesh | None = None
        self._metrics: DerpMetrics | None = None
        self._dashboard: RelayDashboard | None = None
        self._debug_access = DebugAccess(config.debug_allow)
        self._gate = AcceptGate(
            self,
            AcceptLimiter(config.accept_limit, config.accept_burst),
            max_connections=config.max_connections,
            ssl_context=config.ssl_context,
        )

    # ------------------------------------------------------------------ properties

    @property
    def public_key(self) -> PublicKey:
        return self.config.private_key.public

    @property
    def handshake_timeout(self) -> float:
        return self.config.handshake_timeout

    @property
    def stats(self) -> ServerStats:
        """Counters (connections, packets/bytes received & sent, drops by reason/kind)."""
        return self._stats

    @property
    def relay(self) -> Relay[DerpConnection]:
        """The routing registry (read-only use outside the server)."""
        return self._context().relay

    @property
    def context(self) -> ConnContext:
        """State shared by this server's connections (for in-process extensions: derp.mesh)."""
        return self._context()

    @property
    def mesh(self) -> Mesh | None:
        """The mesh started from ``config.mesh_with`` (None without one)."""
        return self._mesh

    @property
    def client_count(self) -> int:
        """Admitted DERP connections (duplicates for one key counted separately)."""
        return len(self._ctx.conns) if self._ctx is not None else 0

    @property
    def port(self) -> int:
        """The TCP port the server listens on (after :meth:`start`)."""
        socks = self.sockets
        if not socks:
            raise RuntimeError("server not started")
        return int(socks[0].getsockname()[1])

    @property
    def sockets(self) -> list[socket.socket]:
        """The listening sockets, one per address the host resolved to (same port)."""
        return [s for srv in self._listeners for s in srv.sockets]

    @property
    def connections(self) -> frozenset[DerpConnection]:
        """Snapshot of admitted connections."""
        return frozenset(self._ctx.conns) if self._ctx is not None else frozenset()

    @property
    def open_connections(self) -> int:
        """Open sockets: HTTP, in the TLS handshake, and DERP (admitted or not)."""
        return len(self._http) + len(self._derp_live) + len(self._gate.handshaking)

    @property
    def metrics(self) -> DerpMetrics:
        """Prometheus registry over :attr:`stats` (``metrics.stun``, ``metrics.gauges``)."""
        if self._metrics is None:
            self._metrics = DerpMetrics(self._stats)
        return self._metrics

    def debug_response(self, path: str, remote_addr: object) -> tuple[int, bytes, str]:
        """HTTP front-door hook for ``/debug/*`` and ``/metrics`` (derp.metrics)."""
        return self._debug_access.respond(self.metrics, path, remote_addr)

    @property
    def dashboard(self) -> RelayDashboard:
        """The relay-only live dashboard (:mod:`derp.dashboard`), created on first use."""
        if self._dashboard is None:
            self._dashboard = RelayDashboard(self, self._debug_access)
        return self._dashboard

    def dashboard_response(
        self, path: str, remote_addr: object
    ) -> tuple[int, bytes, str, list[tuple[str, str]]] | SseStart:
        """HTTP front-door hook for ``/dashboard…`` (same access rule as ``/debug/``)."""
        return self.dashboard.respond(path, remote_addr)

    def _context(self) -> ConnContext:
        if self._ctx is None:
            self._ctx = ConnContext(
                self.config, asyncio.get_running_loop(), self._derp_lost, self._stats
            )
        return self._ctx

    # ------------------------------------------------------------------ lifecycle

    async def start(
        self, host: str | Sequence[str] = "127.0.0.1", port: int = 0, *, listen: bool = True
    ) -> None:
        """Start the timers and (unless ``listen=False``) bind and listen.

        The server listens on every address ``host`` resolves to (``""``: all
        interfaces, IPv4 and IPv6), or on each of a sequence of hosts, with one
        port for all (:attr:`sockets`). Returns once the sockets accept
        connections. An embedding HTTP server
        that hands upgraded connections to :meth:`accept` on its own port passes
        ``listen=False``: no socket is opened and :attr:`port` is unavailable.
        """
        if self._sweep is not None:
            raise RuntimeError("server already started")
        ctx = self._context()
        loop = ctx.loop
        if listen:
            self._listeners = await self._gate.listen(host, port)
        self._sweep = loop.call_later(ctx.wheel.resolution, self._keepalive_sweep)
        if listen:
            shown = ", ".join(
                f"[{a[0]}]:{a[1]}" if ":" in a[0] else f"{a[0]}:{a[1]}"
                for a in (s.getsockname() for s in self.sockets)
            )
            log.info("derp: listening on %s key %s", shown, self.public_key.short())
        else:
            log.info("derp: serving embedded (no listener) key %s", self.public_key.short())
        if self.config.mesh_with:
            self._mesh = Mesh(
                self, self.config.mesh_with, retry_interval=self.config.mesh_retry_interval
            )
            self._mesh.start()

    def accept(
        self,
        transport: asyncio.Transport,
        *,
        fast_start: bool = False,
        initial_data: bytes = b"",
        remote_addr: object = None,
    ) -> DerpConnection:
        """Take over an accepted transport after a DERP upgrade request.

        Unless ``fast_start``, the exact 101 response is written first; then
        the ServerKey frame (same write). ``initial_data`` are the bytes
        already read after the request head (fast-start clients send
        ClientInfo in the same segment); they are processed as DERP frames.
        Adapters that already answered the upgrade themselves (WebSocket)
        pass ``fast_start=True``.
        """
        ctx = self._context()
        conn = DerpConnection(ctx, remote_addr)
        self._derp_live.add(conn)
        transport.set_protocol(conn)
        preamble = b"" if fast_start else self._upgrade_response
        conn.start(transport, initial_data, preamble)
        return conn

    def announce_restart(
        self, reconnect_in: float | None = None, try_for: float | None = None
    ) -> int:
        """Send Restarting(reconnect_in, try_for) to every admitted client; return the count.

        Defaults come from the config (``restart_reconnect_in``/``restart_try_for``).
        Clients of this library wait ``reconnect_in``, then retry quickly for
        ``try_for`` (Go clients ignore the frame and just reconnect with backoff).
        """
        cfg = self.config
        rin = cfg.restart_reconnect_in if reconnect_in is None else reconnect_in
        tfor = cfg.restart_try_for if try_for is None else try_for
        cap = 2**32 - 1  # uint32 milliseconds on the wire
        frame = encode_restarting(min(int(rin * 1000), cap), min(int(tfor * 1000), cap))
        n = 0
        for c in list(self._ctx.conns if self._ctx is not None else ()):
            if c.is_open:
                c.send_control(frame)
                n += 1
        self._stats.restarting_frames_sent += n
        return n

    async def stop(self, grace: float = 5.0, *, restarting: bool = False) -> None:
        """Close the listener and every connection; wait (≤ ``grace`` s) until they are gone.

        With ``restarting`` every client first gets a Restarting frame
        (:meth:`announce_restart`), written before its connection is closed.
        """
        self._gate.close()
        if self._dashboard is not None:
            self._dashboard.feed.close()
        if restarting:
            self.announce_restart()
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        for lsn in self._listeners:
            lsn.close()
        if self._mesh is not None:
            await self._mesh.stop()
            self._mesh = None
        self._idle = asyncio.Event()
        if self._ctx is not None and self._ctx.admission is not None:
            await self._ctx.admission.close()
        for h in list(self._http):
            h.close()
        for c in list(self._derp_live):
            c.close("server stopping")
        self._check_idle()
        try:
            await asyncio.wait_for(self._idle.wait(), grace)
        except asyncio.TimeoutError:
            for c in list(self._derp_live):
                c.abort()
            for h in list(self._http):
                h.close()
        for lsn in self._listeners:
            try:
                await asyncio.wait_for(lsn.wait_closed(), grace)
            except asyncio.TimeoutError:  # pragma: no cover
                pass
        self._listeners = []

    # ------------------------------------------------------------------ internals

    def _keepalive_sweep(self) -> None:
        ctx = self._ctx
        if ctx is None:
            return
        now = ctx.loop.time()
        for conn in ctx.wheel.pop_due(now):
            if conn.is_open:
                conn.send_keepalive()
                ctx.wheel.schedule(conn, now + conn._ka_period)
        self._sweep = ctx.loop.call_later(ctx.wheel.resolution, self._keepalive_sweep)

    def _http_opened(self, conn: HttpConnection) -> None:
        self._http.add(conn)

    def _http_closed(self, conn: HttpConnection, upgraded: bool) -> None:
        self._http.discard(conn)
        self._check_idle()

    def _derp_lost(self, conn: DerpConnection) -> None:
        self._derp_live.discard(conn)
        self._check_idle()

    def _check_idle(self) -> None:
        if self._idle is not None and not self._http and not self._derp_live:
            self._idle.set()
