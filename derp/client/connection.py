"""asyncio adapter of the DERP client: :class:`DerpClient` over :class:`ClientConnection`.

:class:`DerpClient` works on any event loop (it uses only
``loop.create_connection`` and an :class:`asyncio.Protocol`), answers server
Pings, matches Pongs for :meth:`DerpClient.ping`, enforces the 120 s read timeout
and, with ``reconnect=True``, reconnects with jittered exponential backoff. One
:class:`_Link` protocol drives one :class:`~derp.client.core.ClientConnection`
per TCP/TLS/WebSocket connection; the sans-I/O core is in :mod:`derp.client.core`.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import random
import ssl
from collections.abc import Callable
from typing import Any, Self, cast

from ..errors import ConnectionClosed, DerpError
from ..events import (
    Connected,
    Disconnected,
    Event,
    PongReceived,
    ServerRestarting,
)
from ..keys import PrivateKey, PublicKey
from ..tls import ClientTLS, client_tls, peer_meta_key
from ..tlsio import open_tls_connection
from ..websocket import websocket_client
from .core import CLIENT_READ_TIMEOUT, ClientConnection, parse_derp_url

__all__ = ["DerpClient"]

log = logging.getLogger("derp.client")


def _retrieve(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()


class _Link(asyncio.Protocol):
    """One TCP/TLS connection driving a :class:`ClientConnection`.

    Owned by the event loop thread. Reports events and loss to its
    :class:`DerpClient` through the two callbacks; ``handshake`` resolves with
    the server key once ServerInfo arrived, or fails with the login error.
    """

    def __init__(
        self,
        core: ClientConnection,
        on_events: Callable[[_Link, list[Event]], None],
        on_lost: Callable[[_Link, str], None],
        read_timeout: float,
    ) -> None:
        self.core = core
        self._on_events = on_events
        self._on_lost = on_lost
        self._read_timeout = read_timeout
        self._loop = asyncio.get_running_loop()
        self.handshake: asyncio.Future[PublicKey] = self._loop.create_future()
        # The dialer may have given up (timeout, cancel) before login fails: mark
        # the failure as retrieved so asyncio does not log it as lost.
        self.handshake.add_done_callback(_retrieve)
        self.lost: asyncio.Future[None] = self._loop.create_future()
        self.transport: asyncio.Transport | None = None
        self.reason = ""
        self.reading_paused = False
        self._write_paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._last_rx = 0.0
        self._timer: asyncio.TimerHandle | None = None

    # asyncio.Protocol methods

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the Transport API without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self._last_rx = self._loop.time()
        self._timer = self._loop.call_later(self._read_timeout, self._check_idle)
        self.flush()

    def data_received(self, data: bytes) -> None:
        self._last_rx = self._loop.time()
        core = self.core
        try:
            core.receive_data(data)
        except DerpError as exc:
            self.abort(f"protocol error from server: {exc}")
            if not self.handshake.done():
                self.handshake.set_exception(exc)
            return
        out = core.data_to_send()
        if out and self.transport is not None:
            self.transport.writelines(out)
        events = core.events_received()
        if events:
            if not self.handshake.done() and type(events[0]) is Connected:
                self.handshake.set_result(events[0].server_key)
            self._on_events(self, events)

    def eof_received(self) -> bool | None:
        self.core.receive_eof()
        self.reason = self.reason or "server closed the connection"
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self.reason:
            self.reason = f"connection lost: {exc}" if exc else "connection closed"
        self.core.receive_eof()
        self.transport = None
        if not self.handshake.done():
            self.handshake.set_exception(ConnectionClosed(self.reason))
        self._wake_drainers(ConnectionClosed(self.reason))
        if not self.lost.done():
            self.lost.set_result(None)
        self._on_lost(self, self.reason)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake_drainers(None)

    # helpers for DerpClient

    def flush(self) -> None:
        """Write whatever the core has queued."""
        out = self.core.data_to_send()
        if out and self.transport is not None:
            self.transport.writelines(out)

    async def drain(self) -> None:
        """Wait until the transport's write buffer is below its high-water mark."""
        if not self._write_paused:
            return
        if self.transport is None:
            raise ConnectionClosed(self.reason or "connection closed")
        fut: asyncio.Future[None] = self._loop.create_future()
        self._drain_waiters.append(fut)
        await fut

    def abort(self, reason: str) -> None:
        """Drop the connection now (the reason is logged and reported)."""
        if not self.reason:
            self.reason = reason
        log.debug("closing DERP connection: %s", reason)
        self.core.receive_eof()
        if self.transport is not None:
            self.transport.abort()

    def close(self, reason: str) -> None:
        """Close after flushing buffered writes."""
        if not self.reason:
            self.reason = reason
        if self.transport is not None:
            self.transport.close()

    def pause_reading(self) -> None:
        if not self.reading_paused and self.transport is not None:
            self.reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.reading_paused and self.transport is not None:
            self.reading_paused = False
            self._last_rx = self._loop.time()
            self.transport.resume_reading()

    def _wake_drainers(self, exc: Exception | None) -> None:
        waiters, self._drain_waiters = self._drain_waiters, []
        for fut in waiters:
            if not fut.done():
                if exc is None:
                    fut.set_result(None)
                else:
                    fut.set_exception(exc)

    def _check_idle(self) -> None:
        # One timer per connection, re-armed lazily: the hot path only stores a timestamp.
        now = self._loop.time()
        idle = now - self._last_rx
        if self.reading_paused or idle < self._read_timeout:
            wait = self._read_timeout if self.reading_paused else self._read_timeout - idle
            self._timer = self._loop.call_later(wait, self._check_idle)
            return
        self._timer = None
        self.abort(f"no data from server for {self._read_timeout:g} s")


_QUEUE_HIGH = 4096  # pause reading the socket when this many events are unconsumed
_QUEUE_LOW = 1024  # ...and resume below this


class DerpClient:
    """An asyncio DERP client for one server (any event loop).

    Flow: ``await connect()`` dials ``url``, performs the login and returns once
    ServerInfo arrived. Then ``send``/``ping``/``note_preferred`` and receive
    events with ``async for ev in client`` or ``await client.recv()``. Finish
    with ``await close()`` (idempotent; the iterator then ends), or use
    ``async with DerpClient(...) as c:``, which connects and closes.

    Without ``reconnect`` a lost connection is final: ``recv()`` returns the
    events already received, then raises :class:`ConnectionClosed` (the iterator
    too). With ``reconnect=True`` a loss yields :class:`Disconnected`, the client
    redials with jittered exponential backoff (``backoff_min`` doubling up to
    ``backoff_max``), re-sends NotePreferred and WatchConns if they were used,
    and yields :class:`Connected`. After a :class:`ServerRestarting` event the
    first redial waits until ``reconnect_in`` after the notice, then retries
    every ``backoff_min`` for ``try_for`` before falling back to the normal
    backoff. Sends while
    disconnected raise :class:`ConnectionClosed` (packets are never queued
    across connections: DERP is lossy like the network under it).

    Backpressure: ``send`` waits while the socket's write buffer is above its
    high-water mark (``send_nowait`` does not). If the application stops
    consuming events, reading from the socket pauses after 4096 unconsumed events.
    """

    def __init__(
        self,
        url: str,
        private_key: PrivateKey,
        *,
        mesh_key: bytes | None = None,
        is_prober: bool = False,
        can_ack_pings: bool = True,
        reconnect: bool = False,
        backoff_min: float = 0.05,
        backoff_max: float = 10.0,
        connect_timeout: float = 10.0,
        read_timeout: float = CLIENT_READ_TIMEOUT,
        ssl_context: ssl.SSLContext | None = None,
        websocket: bool = False,
        cert_name: str | None = None,
        fast_start: bool = True,
    ) -> None:
        self.url = url
        self._scheme, self._host, self._port, self._host_header = parse_derp_url(url)
        if mesh_key is not None and len(mesh_key) != 32:
            raise ValueError(f"mesh key must be 32 bytes, got {len(mesh_key)}")
        self.private_key = private_key
        self._mesh_key = mesh_key
        self._is_prober = is_prober
        self._can_ack_pings = can_ack_pings
        self._reconnect = reconnect
        self._backoff_min = backoff_min
        self._backoff_max = backoff_max
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._ssl_context = ssl_context
        # Transport options (derp.websocket, derp.tls): DERP over WebSocket for
        # ws(s):// URLs or websocket=True (a DERP map's derp_force_websockets);
        # TLS verification against cert_name (a name or a sha256-raw: pin);
        # fast start when the server's TLS chain carries the meta-certificate.
        self._websocket = websocket or self._scheme in ("ws", "wss")
        self._tls: ClientTLS | None = None
        if self._scheme in ("https", "wss"):
            self._tls = client_tls(self._host, cert_name, context=ssl_context)
        self._fast_start = fast_start
        self._link: _Link | None = None
        self._events: collections.deque[Event] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._pings: dict[bytes, asyncio.Future[None]] = {}
        self._preferred: bool | None = None
        self._watching = False
        self._restart: tuple[ServerRestarting, float] | None = None  # (event, loop time)
        self._reconnect_task: asyncio.Task[None] | None = None
        self._closed = False
        self._lost_reason: str | None = None
        self._started = False
        #: Key of the server of the current (or last) connection.
        self.server_key: PublicKey | None = None
        #: ServerInfo JSON of the current (or last) connection.
        self.server_info: dict[str, Any] = {}
        #: ``(bytes_per_second, burst)`` from ServerInfo, if the server set one.
        self.token_bucket: tuple[int, int] | None = None

    # ------------------------------------------------------------------ lifecycle

    @property
    def public_key(self) -> PublicKey:
        """This client's node key (its DERP address)."""
        return self.private_key.public

    @property
    def connected(self) -> bool:
        """True while a logged-in connection is up."""
        return self._link is not None

    async def connect(self) -> None:
        """Dial and log in once; raises ``OSError``, ``TimeoutError`` or a
        :class:`~derp.errors.DerpError` on failure (no retry, even with ``reconnect``;
        the caller may call ``connect()`` again after a failure)."""
        if self._closed:
            raise ConnectionClosed("client is closed")
        if self._started:
            raise DerpError("connect() may only be called once per client")
        self._started = True
        try:
            await self._dial()
        except BaseException:
            self._started = False  # a failed first connect may be retried
            raise

    async def close(self) -> None:
        """Close the connection and stop reconnecting. Idempotent."""
        if self._closed:
            return
        self._closed = True
        task, self._reconnect_task = self._reconnect_task, None
        if task is not None:
            task.cancel()
            await asyncio.wait([task])  # the task's CancelledError is not re-raised here
        link, self._link = self._link, None
        self._fail_pings(ConnectionClosed("client closed"))
        self._wake()
        if link is not None:
            link.close("client closed")
            try:
                await asyncio.wait_for(asyncio.shield(link.lost), 5.0)
            except TimeoutError:
                link.abort("close timed out")

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # ------------------------------------------------------------------ sending

    def _require(self) -> _Link:
        link = self._link
        if link is None:
            if self._closed:
                raise ConnectionClosed("client is closed")
            raise ConnectionClosed(self._lost_reason or "not connected")
        return link

    async def send(self, dst: PublicKey | bytes, packet: bytes) -> None:
        """Send ``packet`` (at most 64 KiB) to the node ``dst`` via the server.

        Waits while the socket write buffer is full. Delivery is not
        confirmed: the server drops packets for absent peers.
        """
        link = self._require()
        link.core.send_packet(dst, packet)
        link.flush()
        await link.drain()

    def send_nowait(self, dst: PublicKey | bytes, packet: bytes) -> None:
        """Like :meth:`send` without waiting for buffer space (for hot loops;
        call :meth:`drain` now and then)."""
        link = self._require()
        link.core.send_packet(dst, packet)
        link.flush()

    async def drain(self) -> None:
        """Wait until the socket write buffer is below its high-water mark."""
        await self._require().drain()

    async def note_preferred(self, preferred: bool) -> None:
        """Tell the server whether it is our home region (re-sent after reconnects)."""
        self._preferred = preferred
        link = self._require()
        link.core.send_note_preferred(preferred)
        link.flush()
        await link.drain()

    async def ping(self, timeout: float = 5.0) -> float:
        """Ping the server and return the round-trip time in seconds.

        Raises ``TimeoutError`` if no matching Pong arrives within ``timeout``
        and :class:`ConnectionClosed` if the connection goes away first.
        """
        link = self._require()
        loop = asyncio.get_running_loop()
        data = os.urandom(8)
        fut: asyncio.Future[None] = loop.create_future()
        self._pings[data] = fut
        start = loop.time()
        try:
            link.core.send_ping(data)
            link.flush()
            await asyncio.wait_for(fut, timeout)
        finally:
            self._pings.pop(data, None)
        return loop.time() - start

    async def watch_conns(self) -> None:
        """Subscribe to PeerPresent/PeerGone for every client (mesh key required)."""
        self._watching = True
        link = self._require()
        link.core.send_watch_conns()
        link.flush()
        await link.drain()

    async def close_peer(self, peer: PublicKey | bytes) -> None:
        """Ask the server to close ``peer``'s connection (mesh key required)."""
        link = self._require()
        link.core.send_close_peer(peer)
        link.flush()
        await link.drain()

    async def forward_packet(
        self, src: PublicKey | bytes, dst: PublicKey | bytes, packet: bytes
    ) -> None:
        """Forward a packet from ``src`` to ``dst`` (mesh key required)."""
        link = self._require()
        link.core.send_forward_packet(src, dst, packet)
        link.flush()
        await link.drain()

    # ------------------------------------------------------------------ receiving

    async def recv(self) -> Event:
        """Return the next event; raises :class:`ConnectionClosed` once the client
        is closed, or (without ``reconnect``) the connection is lost and every
        event received before has been returned.

        One consumer at a time: a second concurrent ``recv`` raises
        :class:`RuntimeError` (events are not broadcast).
        """
        if self._waiter is not None and not self._waiter.done():
            raise RuntimeError("DerpClient.recv() is already being awaited by another task")
        while True:
            if self._events:
                ev = self._events.popleft()
                link = self._link
                if link is not None and link.reading_paused and len(self._events) < _QUEUE_LOW:
                    link.resume_reading()
                return ev
            if self._closed:
                raise ConnectionClosed("client closed")
            if self._lost_reason is not None and not self._reconnect:
                raise ConnectionClosed(self._lost_reason)
            if not self._started:
                raise ConnectionClosed("not connected")
            waiter = asyncio.get_running_loop().create_future()
            self._waiter = waiter
            try:
                await waiter
            finally:
                self._waiter = None

    def __aiter__(self) -> DerpClient:
        return self

    async def __anext__(self) -> Event:
        try:
            return await self.recv()
        except ConnectionClosed:
            if self._closed:
                raise StopAsyncIteration from None
            raise

    # ------------------------------------------------------------------ internals

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail_pings(self, exc: Exception) -> None:
        pings, self._pings = self._pings, {}
        for fut in pings.values():
            if not fut.done():
                fut.set_exception(exc)

    def _on_events(self, link: _Link, events: list[Event]) -> None:
        if self._closed:
            return
        queue = self._events
        pings = self._pings
        for ev in events:
            kind = type(ev)
            if kind is PongReceived and pings:
                assert isinstance(ev, PongReceived)
                fut = pings.pop(ev.data, None)
                if fut is not None:
                    if not fut.done():
                        fut.set_result(None)
                    continue
            elif kind is Connected:
                if not self._reconnect:
                    continue
            elif kind is ServerRestarting:
                assert isinstance(ev, ServerRestarting)
                self._restart = (ev, asyncio.get_running_loop().time())
            queue.append(ev)
        if len(queue) >= _QUEUE_HIGH:
            link.pause_reading()
        self._wake()

    def _on_lost(self, link: _Link, reason: str) -> None:
        if link is not self._link:
            return  # a connection that never finished logging in, or a replaced one
        self._link = None
        self._lost_reason = reason
        self._fail_pings(ConnectionClosed(reason))
        if self._closed:
            return
        log.info("DERP connection to %s lost: %s", self.url, reason)
        if self._reconnect:
            self._events.append(Disconnected(reason))
            self._reconnect_task = asyncio.get_running_loop().create_task(
                self._reconnect_loop(), name=f"derp-reconnect {self.url}"
            )
        self._wake()

    async def _open(self, link_factory: Callable[[], _Link]) -> _Link:
        """Dial TCP (+TLS for https/wss) and return the link.

        TLS: the certificate is verified (or pinned, :func:`derp.tls.client_tls`)
        before any DERP byte is written; with fast start and a meta-certificate
        in the server's chain the login skips the 101 round trip. WebSocket:
        the RFC 6455 upgrade runs first (:func:`derp.websocket.websocket_client`).
        """
        loop = asyncio.get_running_loop()
        tls = self._tls
        if tls is None and not self._websocket:
            _transport, link = await loop.create_connection(link_factory, self._host, self._port)
            return link
        transport: asyncio.Transport
        if tls is not None:
            transport = await open_tls_connection(
                self._host, self._port, tls.context, tls.server_hostname
            )
        else:
            transport, _pending = await loop.create_connection(
                asyncio.Protocol, self._host, self._port
            )
        try:
            if tls is not None:
                tls.check(transport.get_extra_info("ssl_object"))
            if self._websocket:

                def upgraded() -> _Link:
                    link = link_factory()
                    link.core.start_upgraded()
                    return link

                return await websocket_client(
                    transport, upgraded, host_header=self._host_header, secure=tls is not None
                )
            link = link_factory()
            if self._fast_start:
                key = peer_meta_key(transport.get_extra_info("ssl_object"))
                if key is not None:
                    link.core.start_fast(key)
            transport.set_protocol(link)
            link.connection_made(transport)
            return link
        except BaseException:
            transport.abort()
            raise

    async def _dial(self) -> None:
        core = ClientConnection(
            self.private_key,
            host=self._host_header,
            mesh_key=self._mesh_key,
            is_prober=self._is_prober,
            can_ack_pings=self._can_ack_pings,
        )
        holder: list[_Link] = []

        def factory() -> _Link:
            link = _Link(core, self._on_events, self._on_lost, self._read_timeout)
            holder.append(link)
            return link

        try:
            async with asyncio.timeout(self._connect_timeout):
                link = await self._open(factory)
                server_key = await link.handshake
        except BaseException:
            for link in holder:
                link.abort("login failed")
            raise
        if link.transport is None:  # lost right after the handshake completed
            raise ConnectionClosed(link.reason or "connection closed")
        if self._closed:
            link.abort("client closed")
            raise ConnectionClosed("client closed")
        self._link = link
        self._lost_reason = None
        self._restart = None
        self.server_key = server_key
        self.server_info = core.server_info
        self.token_bucket = core.token_bucket
        if self._preferred is not None:
            core.send_note_preferred(self._preferred)
        if self._watching:
            core.send_watch_conns()
        link.flush()
        log.debug("DERP connection to %s up, server key %s", self.url, server_key.short())

    def _backoff(self, attempt: int) -> float:
        base = min(self._backoff_max, self._backoff_min * (2.0 ** min(attempt, 30)))
        return float(min(self._backoff_max, base * random.uniform(0.5, 1.5)))

    async def _reconnect_loop(self) -> None:
        loop = asyncio.get_running_loop()
        attempt = 0
        restart, self._restart = self._restart, None
        fast_until: float | None = None
        if restart is not None:
            # Honour the notice only if this loss falls inside the window it announced.
            ev, when = restart
            start = when + ev.reconnect_in
            if loop.time() <= start + ev.try_for:
                await asyncio.sleep(max(0.0, start - loop.time()))
                fast_until = start + ev.try_for
            else:
                restart = None
        if restart is None:
            await asyncio.sleep(self._backoff(0))
        while not self._closed:
            try:
                await self._dial()
            except Exception as exc:  # keep retrying whatever went wrong with this dial
                if isinstance(exc, (OSError, TimeoutError, DerpError)):
                    log.debug("reconnect to %s failed: %s", self.url, exc)
                else:
                    log.warning("reconnect to %s failed unexpectedly", self.url, exc_info=True)
                if fast_until is not None and loop.time() < fast_until:
                    delay = self._backoff_min
                else:
                    fast_until = None
                    delay = self._backoff(attempt)
                    attempt += 1
                await asyncio.sleep(delay)
                continue
            self._reconnect_task = None
            return
