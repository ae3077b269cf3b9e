"""Accept policy of the DERP port: accept-rate limit, connection cap, optional TLS.

The listener is ``loop.create_server`` on every address the host resolves to
(``""``/None: all interfaces, IPv4 and IPv6; ``localhost``: 127.0.0.1 and ::1).
Every TCP connection it accepts goes through :meth:`AcceptGate.factory` (the
``asyncio`` protocol factory, called once per accepted socket):

1. over ``max_connections`` open sockets, or over the accept-rate limit
   (:class:`derp.limits.AcceptLimiter`, derper's ``-accept-connection-limit``/
   ``-burst``): the socket is accepted and closed at once, counted in
   ``stats.accepts_rejected``. This happens *before* any TLS work, which is
   the point: a connection storm must not cost a TLS handshake each (derper
   PR #3908). An admitted socket counts as open from that moment (also before
   the event loop calls its protocol's ``connection_made``), so a burst of
   accepts in one loop iteration cannot overshoot the cap.
   With ``host_limits`` (``derper --workers N``, :mod:`derp.workers.shared`)
   the cap and the accept bucket are host totals: :meth:`HostLimits.admit
   <derp.limits.HostLimits.admit>` decides instead, and the gate publishes its
   open-socket count once per event-loop iteration after it went down
   (:meth:`AcceptGate.changed`). One worker, no ``host_limits``: no shared
   state, no lock.
2. plain HTTP: the connection goes straight to
   :class:`~derp.server.http.HttpConnection`.
3. TLS: the socket's protocol is a :class:`derp.tlsio.TlsProtocol` (TLS on
   memory BIOs, owned by this process rather than the event loop); it runs
   the server handshake, bounded by the server's handshake timeout, then puts
   an :class:`~derp.server.http.HttpConnection` on top, which continues as in
   2. A failed or stalled handshake closes only that socket (logged at DEBUG).
   Sockets still in the handshake count as open connections and are aborted
   by :meth:`AcceptGate.close`.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import ssl
import weakref
from collections.abc import Sequence
from typing import Any, Protocol

from ..limits import AcceptLimiter, HostLimits
from ..tlsio import TlsProtocol
from ..stats import ServerStats
from .http import DerpAcceptor, HttpConnection



class _Server(DerpAcceptor, Protocol):
    """What the gate needs of its server (:class:`derp.server.DerpServer`)."""

    @property
    def open_connections(self) -> int: ...

    @property
    def stats(self) -> ServerStats: ...

__all__ = ["AcceptGate", "bind_all"]

log = logging.getLogger("derp.server")


class _Reject(asyncio.Protocol):
    """Closes the socket as soon as it is set up."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


_BindInfo = tuple[int, int, int, str, tuple[Any, ...]]


def bind_all(
    infos: Sequence[_BindInfo], port: int, backlog: int = 1024, *, reuse_port: bool = False
) -> list[socket.socket]:
    """Bound, listening, non-blocking sockets for the distinct addresses of ``infos``.

    IPv6 sockets are IPv6-only, so an IPv4 socket can share the port. With
    ``port`` 0 the first socket picks the port and the others use it (a port
    taken on another address family retries with a new one). An address that
    cannot be bound because the host lacks it (``EADDRNOTAVAIL``, e.g. ::1 on
    a host without IPv6) is skipped with a warning if another one bound.
    With ``reuse_port`` every socket gets ``SO_REUSEPORT`` (several worker
    processes listen on one port; the kernel spreads new connections).
    """
    addrs: list[tuple[int, int, int, tuple[Any, ...]]] = []
    seen: set[tuple[int, str]] = set()
    for family, stype, proto, _canon, sa in infos:
        if (family, sa[0]) not in seen:
            seen.add((family, sa[0]))
            addrs.append((family, stype, proto, sa))
    if not addrs:
        raise OSError(errno.EADDRNOTAVAIL, "no address to listen on")
    for attempt in range(32):
        socks: list[socket.socket] = []
        chosen = port
        skipped: list[str] = []
        try:
            for family, stype, proto, sa in addrs:
                try:
                    sock = socket.socket(family, stype, proto)
                except OSError as exc:
                    skipped.append(f"{sa[0]}: {exc}")
                    continue
                socks.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if reuse_port:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                try:
                    sock.bind((sa[0], chosen, *sa[2:]))
                except OSError as exc:
                    if exc.errno not in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
                        raise
                    skipped.append(f"{sa[0]}: {exc.strerror or exc}")
                    socks.pop().close()
                    continue
                if chosen == 0:
                    chosen = int(sock.getsockname()[1])
                sock.listen(backlog)
                sock.setblocking(False)
            if not socks:
                raise OSError(errno.EADDRNOTAVAIL, "cannot listen on any address: " + "; ".join(skipped))
        except OSError as exc:
            for sock in socks:
                sock.close()
            if port == 0 and exc.errno == errno.EADDRINUSE and attempt < 31:
                continue
            raise
        for why in skipped:
            log.warning("derp: not listening on %s", why)
        return socks
    raise AssertionError("unreachable")  # pragma: no cover


class AcceptGate:
    """Protocol factory for the listener; see the module docstring.

    The server tells the gate when its count of open sockets may have gone
    down (:meth:`changed`) and when an HTTP connection the gate made is set up
    (:meth:`opened`).
    """

    def __init__(
        self,
        server: _Server,
        limiter: AcceptLimiter,
        *,
        max_connections: int = 0,
        ssl_context: ssl.SSLContext | None = None,
        reuse_port: bool = False,
        host_limits: HostLimits | None = None,
    ) -> None:
        self.server = server
        self.reuse_port = reuse_port
        self.limiter = limiter
        self.max_connections = max_connections
        self.ssl_context = ssl_context
        self.host_limits = host_limits
        #: sockets in the TLS handshake
        self.handshaking: set[TlsProtocol] = set()
        #: HTTP connections made here whose ``connection_made`` has not run yet
        #: (weak: one the event loop dropped without setting it up goes away)
        self.pending: weakref.WeakSet[HttpConnection] = weakref.WeakSet()
        self._publish_due = False

    @property
    def in_setup(self) -> int:
        """Sockets admitted here not yet counted by the server: TLS handshakes and
        HTTP connections not yet set up."""
        return len(self.handshaking) + len(self.pending)

    def admit(self) -> bool:
        """Decide one accepted socket (counts rejections)."""
        server = self.server
        shared = self.host_limits
        if shared is not None:
            if shared.admit(server.open_connections):
                return True
            server.stats.accepts_rejected += 1
            return False
        if self.max_connections and server.open_connections >= self.max_connections:
            server.stats.accepts_rejected += 1
            return False
        if not self.limiter.allow(asyncio.get_running_loop().time()):
            server.stats.accepts_rejected += 1
            return False
        return True

    def factory(self) -> asyncio.BaseProtocol:
        """Protocol factory of the listener (one call per accepted socket)."""
        if not self.admit():
            return _Reject()
        ctx = self.ssl_context
        if ctx is None:
            return self._http()
        tls = TlsProtocol(
            ctx,
            self._http,
            handshake_timeout=self.server.handshake_timeout,
            on_handshake=self._handshake_done,
        )
        self.handshaking.add(tls)
        return tls

    def opened(self, conn: HttpConnection) -> None:
        """``conn`` is set up (the server counts it from now on)."""
        self.pending.discard(conn)

    def changed(self) -> None:
        """The open-socket count may have gone down: publish it to ``host_limits``
        at the end of this event-loop iteration (once however many sockets
        closed; a socket moving from HTTP to DERP in between changes nothing)."""
        if self.host_limits is None or self._publish_due:
            return
        self._publish_due = True
        asyncio.get_running_loop().call_soon(self._publish)

    def _publish(self) -> None:
        self._publish_due = False
        if self.host_limits is not None:
            self.host_limits.publish(self.server.open_connections)

    def _http(self) -> HttpConnection:
        conn = HttpConnection(self.server)
        self.pending.add(conn)
        return conn

    def _handshake_done(self, tls: TlsProtocol, exc: BaseException | None) -> None:
        self.handshaking.discard(tls)
        self.changed()

    async def listen(
        self, host: str | Sequence[str] | None, port: int, *, reuse_port: bool | None = None
    ) -> list[asyncio.Server]:
        """Listen on every address ``host`` resolves to (all interfaces for ``""``/None).

        ``host`` may also be a sequence of names/addresses (e.g. ``["127.0.0.1",
        "::1"]``). All sockets share one port, also when ``port`` is 0 (the
        first bind picks it). Returns one ``asyncio.Server`` per socket.
        ``reuse_port`` overrides the gate's own setting for these sockets.
        """
        loop = asyncio.get_running_loop()
        hosts: list[str | None] = (
            [host or None] if host is None or isinstance(host, str) else [h or None for h in host]
        )
        infos: list[_BindInfo] = []
        for h in hosts:
            infos += await loop.getaddrinfo(
                h, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )
        reuse = self.reuse_port if reuse_port is None else reuse_port
        socks = bind_all(infos, port, reuse_port=reuse)
        servers: list[asyncio.Server] = []
        try:
            for sock in socks:
                servers.append(await loop.create_server(self.factory, sock=sock, backlog=1024))
        except BaseException:
            for srv in servers:
                srv.close()
            for sock in socks:
                sock.close()
            raise
        return servers

    def close(self) -> None:
        """Abort the sockets still in the TLS handshake (server stop)."""
        for tls in list(self.handshaking):
            tls.abort()
        self.handshaking.clear()
        self.changed()
