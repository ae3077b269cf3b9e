"""Accept policy of the DERP port: accept-rate limit, connection cap, optional TLS.

Every TCP connection the listener accepts goes through :meth:`AcceptGate.factory`
(the ``asyncio`` protocol factory, called once per accepted socket):

1. over ``max_connections`` open sockets, or over the accept-rate limit
   (:class:`derp.limits.AcceptLimiter`, derper's ``-accept-connection-limit``/
   ``-burst``): the socket is accepted and closed at once, counted in
   ``stats.accepts_rejected``. This happens *before* any TLS work, which is
   the point: a connection storm must not cost a TLS handshake each (derper
   PR #3908).
2. plain HTTP: the connection goes straight to
   :class:`~derp.server.http.HttpConnection`.
3. TLS: reading is paused, ``loop.start_tls`` runs the server handshake
   (bounded by the server's handshake timeout); bytes decrypted before the
   HTTP protocol is attached are buffered and replayed, then the connection
   continues as in 2. A failed handshake closes only that socket (logged at
   DEBUG).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import TYPE_CHECKING, cast

from ..limits import AcceptLimiter
from .http import HttpConnection

if TYPE_CHECKING:
    from .app import DerpServer

__all__ = ["AcceptGate"]

log = logging.getLogger("derp.server")


class _Reject(asyncio.Protocol):
    """Closes the socket as soon as it is set up."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


class _Buffer(asyncio.Protocol):
    """Holds decrypted bytes until the HTTP protocol takes the TLS transport."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.eof = False

    def data_received(self, data: bytes) -> None:
        self.data += data

    def eof_received(self) -> bool | None:
        self.eof = True
        return True


class _TlsStart(asyncio.Protocol):
    """Runs the TLS server handshake on an accepted socket, then hands it to HTTP."""

    def __init__(self, gate: AcceptGate) -> None:
        self._gate = gate
        self._task: asyncio.Task[None] | None = None
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        t = cast(asyncio.Transport, transport)
        self._transport = t
        t.pause_reading()  # the ClientHello must reach the TLS layer, not us
        self._gate._pending.add(self)
        self._task = asyncio.get_running_loop().create_task(self._handshake(t))

    def connection_lost(self, exc: Exception | None) -> None:
        self._gate._pending.discard(self)

    def abort(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self._transport is not None:
            self._transport.abort()

    async def _handshake(self, transport: asyncio.Transport) -> None:
        gate = self._gate
        server = gate.server
        loop = asyncio.get_running_loop()
        buf = _Buffer()
        try:
            ctx = gate.ssl_context
            assert ctx is not None
            tls = await loop.start_tls(
                transport,
                buf,
                ctx,
                server_side=True,
                ssl_handshake_timeout=server.handshake_timeout,
            )
        except (OSError, ssl.SSLError, asyncio.TimeoutError, ConnectionError) as exc:
            log.debug("derp tls: handshake with %s failed: %s", self._peer(transport), exc)
            transport.abort()
            return
        finally:
            gate._pending.discard(self)
        if tls is None:  # pragma: no cover - transport closed during the handshake
            transport.abort()
            return
        tls_t = tls
        http = HttpConnection(server)
        tls_t.set_protocol(http)
        http.connection_made(tls_t)
        if buf.data:
            http.data_received(bytes(buf.data))
        if buf.eof:
            http.eof_received()

    @staticmethod
    def _peer(transport: asyncio.BaseTransport) -> object:
        return transport.get_extra_info("peername")


class AcceptGate:
    """Protocol factory for the listener; see the module docstring."""

    def __init__(
        self,
        server: DerpServer,
        limiter: AcceptLimiter,
        *,
        max_connections: int = 0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.server = server
        self.limiter = limiter
        self.max_connections = max_connections
        self.ssl_context = ssl_context
        self._pending: set[_TlsStart] = set()

    def factory(self) -> asyncio.Protocol:
        server = self.server
        if self.max_connections and server.open_connections >= self.max_connections:
            server.stats.accepts_rejected += 1
            return _Reject()
        if not self.limiter.allow(asyncio.get_running_loop().time()):
            server.stats.accepts_rejected += 1
            return _Reject()
        if self.ssl_context is None:
            return HttpConnection(server)
        return _TlsStart(self)

    def close(self) -> None:
        """Abort connections still in the TLS handshake (server stop)."""
        for p in list(self._pending):
            p.abort()
        self._pending.clear()
