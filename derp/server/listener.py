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
3. TLS: the listener is a :class:`TlsListener` (own accept loop, see its
   docstring); admitted sockets run the TLS server handshake (bounded by the
   server's handshake timeout), then continue as in 2. A failed handshake
   closes only that socket (logged at DEBUG).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from typing import TYPE_CHECKING

from ..limits import AcceptLimiter
from .http import HttpConnection

if TYPE_CHECKING:
    from .app import DerpServer

__all__ = ["AcceptGate", "TlsListener"]

log = logging.getLogger("derp.server")


class _Reject(asyncio.Protocol):
    """Closes the socket as soon as it is set up."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


class TlsListener(asyncio.AbstractServer):
    """A TLS listening socket with its own accept loop (the parts of ``asyncio.Server``
    the DERP server uses: ``sockets``, ``close``, ``wait_closed``).

    Why not ``create_server(ssl=...)``: its protocol factory runs before the
    TLS handshake but cannot close the socket before doing it, and uvloop's
    ``start_tls`` does not complete on server-accepted transports. So we
    ``sock_accept`` ourselves, decide, and only then hand an admitted socket
    to ``loop.connect_accepted_socket(..., ssl=...)`` (both loops support it).
    """

    def __init__(self, gate: AcceptGate, sock: socket.socket) -> None:
        self._gate = gate
        self._sock = sock
        self._closed = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._task = self._loop.create_task(self._accept_loop(), name="derp-tls-accept")

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return () if self._closed.is_set() else (self._sock,)

    def close(self) -> None:
        if not self._closed.is_set():
            self._closed.set()
            self._task.cancel()
            self._sock.close()

    async def wait_closed(self) -> None:
        await self._closed.wait()
        await asyncio.wait([self._task])

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def is_serving(self) -> bool:
        return not self._closed.is_set()

    async def start_serving(self) -> None:
        return None

    async def serve_forever(self) -> None:
        await self.wait_closed()

    async def _accept_loop(self) -> None:
        loop = self._loop
        gate = self._gate
        while True:
            try:
                conn, _addr = await loop.sock_accept(self._sock)
            except OSError as exc:  # e.g. EMFILE: back off instead of spinning
                if self._closed.is_set():
                    return
                log.warning("derp tls: accept failed: %s", exc)
                await asyncio.sleep(0.1)
                continue
            if not gate.admit():
                conn.close()
                continue
            task = loop.create_task(self._handshake(conn))
            gate._pending.add(task)
            task.add_done_callback(gate._pending.discard)

    async def _handshake(self, conn: socket.socket) -> None:
        server = self._gate.server
        try:
            await self._loop.connect_accepted_socket(
                lambda: HttpConnection(server),
                conn,
                ssl=self._gate.ssl_context,
                ssl_handshake_timeout=server.handshake_timeout,
            )
        except (OSError, ssl.SSLError, asyncio.TimeoutError) as exc:
            log.debug("derp tls: handshake failed: %s", exc)
            conn.close()
        except BaseException:  # cancelled by server stop
            conn.close()
            raise


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
        #: TLS handshakes in progress
        self._pending: set[asyncio.Task[None]] = set()

    def admit(self) -> bool:
        """Decide one accepted socket (counts rejections)."""
        server = self.server
        if self.max_connections and server.open_connections >= self.max_connections:
            server.stats.accepts_rejected += 1
            return False
        if not self.limiter.allow(asyncio.get_running_loop().time()):
            server.stats.accepts_rejected += 1
            return False
        return True

    def factory(self) -> asyncio.Protocol:
        """Protocol factory for a plain-HTTP ``create_server`` listener."""
        if not self.admit():
            return _Reject()
        return HttpConnection(self.server)

    async def listen(self, host: str, port: int) -> asyncio.Server | TlsListener:
        """Open the listener: ``create_server`` for plain HTTP, :class:`TlsListener` for TLS."""
        loop = asyncio.get_running_loop()
        if self.ssl_context is None:
            return await loop.create_server(
                self.factory, host, port, backlog=1024, reuse_address=True
            )
        infos = await loop.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        family, stype, proto, _canon, addr = infos[0]
        sock = socket.socket(family, stype, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
            sock.listen(1024)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        return TlsListener(self, sock)

    def close(self) -> None:
        """Cancel TLS handshakes still in progress (server stop)."""
        for t in list(self._pending):
            t.cancel()
        self._pending.clear()
