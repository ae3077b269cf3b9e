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
import logging
import socket
from collections.abc import Callable, Sequence
from typing import Any

from ..dashboard import RelayDashboard, SseStart
from ..frames import encode_restarting
from ..keys import PublicKey
from ..limits import AcceptLimiter
from ..metrics import DebugAccess, DerpMetrics
from ..peers import mesh_factory
from ..relay import Relay
from ..stats import ServerStats
from .config import ServerConfig
from .conn import DerpConnection
from .context import ConnContext
from .http import HttpConnection, derp_upgrade_response
from .listener import AcceptGate

__all__ = ["ServerConfig", "DerpServer", "ConnContext"]

log = logging.getLogger("derp.server")

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
        self._ctx: ConnContext[DerpConnection] | None = None
        self._stats = ServerStats()
        self._listeners: list[asyncio.Server] = []
        self._sweep: asyncio.TimerHandle | None = None
        self._http: set[HttpConnection] = set()
        self._derp_live: set[DerpConnection] = set()
        self._idle: asyncio.Event | None = None
        self._upgrade_response = derp_upgrade_response(config.private_key.public)
        self._mesh: Any = None
        self._metrics: DerpMetrics | None = None
        self._dashboard: RelayDashboard | None = None
        self._debug_access = DebugAccess(config.debug_allow)
        #: what /metrics and /debug/ show instead of this server's own counters
        #: (derp.workers: totals over every worker process); None: own counters
        self.metrics_view: Callable[[], DerpMetrics] | None = None
        #: every worker's latest counters for /dashboard, this one's first
        #: (derp.workers.stats.encode_stats documents); None: one process
        self.workers_view: Callable[[], list[dict[str, Any]]] | None = None
        self._gate = AcceptGate(
            self,
            AcceptLimiter(config.accept_limit, config.accept_burst),
            max_connections=config.max_connections,
            ssl_context=config.ssl_context,
            reuse_port=config.reuse_port,
            host_limits=config.host_limits,
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
    def context(self) -> ConnContext[DerpConnection]:
        """State shared by this server's connections (for in-process extensions: derp.mesh)."""
        return self._context()

    @property
    def mesh(self) -> Any:
        """The :class:`derp.mesh.Mesh` started from ``config.mesh_with`` (None without one)."""
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
        """Open sockets: HTTP, in the TLS handshake, and DERP (admitted or not),
        counting a socket from its acceptance (before its ``connection_made``)."""
        return len(self._http) + len(self._derp_live) + self._gate.in_setup

    @property
    def metrics(self) -> DerpMetrics:
        """Prometheus registry over :attr:`stats` (``metrics.stun``, ``metrics.gauges``)."""
        if self._metrics is None:
            self._metrics = DerpMetrics(self._stats)
        return self._metrics

    def debug_response(self, path: str, remote_addr: object) -> tuple[int, bytes, str]:
        """HTTP front-door hook for ``/debug/*`` and ``/metrics`` (derp.metrics)."""
        view = self.metrics_view
        return self._debug_access.respond(
            self.metrics if view is None else view(), path, remote_addr
        )

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

    def _context(self) -> ConnContext[DerpConnection]:
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
            self._mesh = mesh_factory()(
                self, self.config.mesh_with, retry_interval=self.config.mesh_retry_interval
            )
            self._mesh.start()

    async def listen_extra(self, host: str, port: int = 0) -> int:
        """Listen on one more port (no ``SO_REUSEPORT``; same limits and counts
        as the main one); returns it. ``derper --workers N`` tests use it to
        reach one particular worker."""
        servers = await self._gate.listen(host, port, reuse_port=False)
        self._listeners += servers
        return int(servers[0].sockets[0].getsockname()[1])

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
        self._gate.opened(conn)

    def _http_closed(self, conn: HttpConnection, upgraded: bool) -> None:
        self._http.discard(conn)
        self._gate.changed()
        self._check_idle()

    def _derp_lost(self, conn: DerpConnection) -> None:
        self._derp_live.discard(conn)
        self._gate.changed()
        self._check_idle()

    def _check_idle(self) -> None:
        if self._idle is not None and not self._http and not self._derp_live:
            self._idle.set()
