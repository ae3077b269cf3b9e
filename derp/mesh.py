"""Regional mesh (spec §4): route table (pure) and the outbound watch links.

Model: every relay of a region dials every other one (``--mesh-with``), so a
region of n relays has n·(n−1) mesh connections, one per ordered pair::

    relay A ── link A→B (A's own server key as client key, meshKey, WatchConns) ──► relay B
      ▲                                                                             │
      └──── PeerPresent(K) / PeerGone(K) for every client K of B ───────────────────┘

    X on A sends to Y (local on B):  A: Y not local → routes[Y] = link A→B
        → ForwardPacket(src=X, dst=Y, pkt) on A→B → B delivers RecvPacket(X, pkt) to Y
    Y replies on B: X not local on B → routes[X] = link B→A → ForwardPacket → A → X

Rules (each mirrors derper; see :class:`RouteTable` and :class:`Mesh`):

* A link logs in with the **server's own private key** and the mesh key; the
  peer's ServerKey equal to our own key means we dialled ourselves (the node's
  own name may be in ``--mesh-with``): that link stops for good.
* After login the link sends WatchConns; the peer floods PeerPresent for every
  local client, then streams PeerPresent/PeerGone as they come and go.
* Routes: PeerPresent(K) on link L adds L for K; PeerGone(K) (any reason,
  including NotHere after a failed forward) removes it. PeerPresent is sent
  per *connection* but PeerGone only when a key's *last* connection leaves
  (#13566), so routes are a **set** of links per key (re-adding is a no-op) —
  counting PeerPresents would leak routes for keys that had duplicates.
  With several links for a key the oldest one is used.
* A dropped link forgets every route it announced (derper synthesises
  PeerGone(MeshConnBroke) for each key), waits ``retry_interval`` (5 s like
  derper) and reconnects; the peer's flood re-announces everything.
* Forwarding is one hop: the server calls the ``forward_hook`` only for
  packets from its own clients to keys with no local connection (local always
  wins; ForwardPackets received from a peer are never re-forwarded).
* When a key loses its last route and has no local connection, local clients
  that received packets from it get PeerGone(K, Disconnected) (spec §3.4).
* Peers may be added and removed while the mesh runs (:meth:`Mesh.add_peer`,
  :meth:`Mesh.remove_link`; the HA stack follows the live replicas this way).
  Removing a link drops its routes as a broken link does. Every link records
  when it last went up or down (:attr:`MeshLink.since`) and why it went down
  (:attr:`MeshLink.last_error`); ``Mesh.on_link_change`` callbacks run on
  each transition.

The route table (:class:`derp.peers.RouteTable`, shared with sibling worker
links as ``ConnContext.routes``) is pure (no sockets) and tested on its own;
:class:`Mesh` and :class:`MeshLink` are the asyncio adapter, one
:class:`derp.peers.PeerRelays` implementation. ``MeshPeer`` and the parsers
live in :mod:`derp.meshconfig` and are re-exported here. ClosePeer and the mesh-key check
(constant time) live in the server (``derp.server``).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import struct
import time
from collections.abc import Callable, Sequence
from typing import Any, cast

from .client import CLIENT_READ_TIMEOUT, ClientConnection
from .errors import DerpError
from .events import Connected, PeerGoneReceived, PeerPresentReceived
from .frames import FrameType
from .meshconfig import MeshPeer, parse_mesh_peer, parse_mesh_with
from .peers import RouteTable, register_mesh_factory
from .server.app import DerpServer
from .server.context import ConnContext

__all__ = [
    "DEFAULT_RETRY_INTERVAL",
    "Mesh",
    "MeshLink",
    "MeshPeer",
    "RouteTable",
    "parse_mesh_peer",
    "parse_mesh_with",
]

log = logging.getLogger("derp.mesh")

#: derper's ``retryInterval`` between mesh reconnects.
DEFAULT_RETRY_INTERVAL = 5.0

_FWD_HDR = struct.Struct(">BI")
_FWD = FrameType.FORWARD_PACKET.value
#: A link whose socket buffer holds this much stops accepting forwards (drops).
_MAX_LINK_BUFFER = 4 << 20


# --------------------------------------------------------------------------- asyncio adapter


class _SelfConnection(Exception):
    pass


class _LinkProtocol(asyncio.Protocol):
    """One TCP/TLS connection of a :class:`MeshLink` (drives a ClientConnection)."""

    def __init__(self, link: MeshLink, core: ClientConnection, read_timeout: float) -> None:
        self.link = link
        self.core = core
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.logged_in: asyncio.Future[bytes] = self.loop.create_future()
        self.lost: asyncio.Future[str] = self.loop.create_future()
        self.paused = False
        self._out: list[bytes | memoryview] = []
        self._read_timeout = read_timeout
        self._last_rx = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self.logged_in.add_done_callback(_retrieve)

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self._last_rx = self.loop.time()
        self._timer = self.loop.call_later(self._read_timeout, self._check_idle)
        self._write_core()

    def data_received(self, data: bytes) -> None:
        self._last_rx = self.loop.time()
        try:
            self.core.receive_data(data)
        except DerpError as exc:
            self.abort(f"protocol error from mesh peer: {exc}")
            return
        self._write_core()
        for ev in self.core.events_received():
            kind = type(ev)
            if kind is PeerPresentReceived:
                assert isinstance(ev, PeerPresentReceived)
                self.link._present(ev.peer.raw)
            elif kind is PeerGoneReceived:
                assert isinstance(ev, PeerGoneReceived)
                self.link._gone(ev.peer.raw)
            elif kind is Connected:
                assert isinstance(ev, Connected)
                if not self.logged_in.done():
                    self.logged_in.set_result(ev.server_key.raw)

    def eof_received(self) -> bool | None:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.transport = None
        reason = f"connection lost: {exc}" if exc else "connection closed by peer"
        if not self.logged_in.done():
            self.logged_in.set_exception(ConnectionError(reason))
        if not self.lost.done():
            self.lost.set_result(reason)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False

    # helpers

    def _check_idle(self) -> None:
        idle = self.loop.time() - self._last_rx
        if idle >= self._read_timeout:
            self.abort(f"no frame from mesh peer for {idle:.0f} s")
        else:
            self._timer = self.loop.call_later(self._read_timeout - idle, self._check_idle)

    def _write_core(self) -> None:
        out = self.core.data_to_send()
        if out and self.transport is not None:
            self.transport.writelines(out)

    def watch(self) -> None:
        self.core.send_watch_conns()
        self._write_core()

    def forward(self, src: bytes, dst: bytes, packet: memoryview) -> bool:
        """Queue a ForwardPacket; written once per loop iteration. False = dropped."""
        t = self.transport
        if t is None or (self.paused and t.get_write_buffer_size() > _MAX_LINK_BUFFER):
            return False
        out = self._out
        if not out:
            self.loop.call_soon(self._flush)
        out.append(_FWD_HDR.pack(_FWD, 64 + len(packet)) + src + dst)
        out.append(packet)
        return True

    def _flush(self) -> None:
        out = self._out
        t = self.transport
        if out and t is not None:
            t.write(b"".join(out))
        out.clear()

    def abort(self, reason: str) -> None:
        if not self.lost.done():
            self.lost.set_result(reason)
        if self.transport is not None:
            self.transport.abort()


def _retrieve(fut: asyncio.Future[bytes]) -> None:
    if not fut.cancelled():
        fut.exception()


class MeshLink:
    """The outbound watch connection to one mesh peer (reconnects until stopped)."""

    def __init__(self, mesh: Mesh, peer: MeshPeer) -> None:
        self.mesh = mesh
        self.peer = peer
        #: True once the peer turned out to be this very server (link stopped).
        self.is_self = False
        #: Number of successful logins so far.
        self.generation = 0
        #: Wall-clock time (``time.time()``) of the last up/down transition (or creation).
        self.since = time.time()
        #: Why the link last went down or failed to come up (``None`` while up / never tried).
        self.last_error: str | None = None
        self._proto: _LinkProtocol | None = None
        self._task: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"MeshLink({self.peer.url})"

    @property
    def connected(self) -> bool:
        return self._proto is not None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"derp-mesh {self.peer.url}"
        )

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait([task])

    def forward(self, src: bytes, dst: bytes, packet: memoryview) -> bool:
        """:class:`derp.peers.Forwarder`: send a ForwardPacket (counted) or refuse."""
        p = self._proto
        if p is not None and p.forward(src, dst, packet):
            ctx = self.mesh._ctx
            if ctx is not None:
                ctx.stats.packets_forwarded_out += 1
            return True
        return False

    # route events from the protocol

    def _present(self, key: bytes) -> None:
        if self._proto is not None:
            self.mesh._route_added(key, self)

    def _gone(self, key: bytes) -> None:
        self.mesh._route_removed(key, self)

    # connection loop

    async def _run(self) -> None:
        mesh = self.mesh
        peer = self.peer
        while True:
            try:
                reason = await self._connect_once()
                log.info("mesh: link to %s down: %s", peer.url, reason)
            except _SelfConnection:
                self.is_self = True
                log.info("mesh: %s is this server (self-connection); not meshing with it", peer.url)
                self._drop("self-connection")
                return
            except asyncio.CancelledError:
                self._drop("mesh stopping")
                raise
            except (OSError, TimeoutError, DerpError) as exc:
                reason = f"cannot reach: {exc or type(exc).__name__}"
                log.info("mesh: cannot reach %s: %s", peer.url, exc or type(exc).__name__)
            except Exception as exc:  # keep the mesh alive whatever went wrong with one dial
                reason = f"failed: {type(exc).__name__}"
                log.warning("mesh: link to %s failed unexpectedly", peer.url, exc_info=True)
            self._drop(reason)
            await asyncio.sleep(mesh.retry_interval)

    async def _connect_once(self) -> str:
        mesh = self.mesh
        peer = self.peer
        loop = asyncio.get_running_loop()
        core = ClientConnection(
            mesh.private_key, host=peer.host_header, mesh_key=mesh.mesh_key, can_ack_pings=False
        )
        ssl_ctx: ssl.SSLContext | None = None
        if peer.scheme == "https":
            ssl_ctx = mesh._client_ssl()
        proto = _LinkProtocol(self, core, mesh.read_timeout)
        try:
            async with asyncio.timeout(mesh.connect_timeout):
                await loop.create_connection(
                    lambda: proto,
                    peer.dial_host,
                    peer.port,
                    ssl=ssl_ctx,
                    server_hostname=peer.host if ssl_ctx is not None else None,
                )
                server_key = await proto.logged_in
        except BaseException:
            proto.abort("login failed")
            raise
        if server_key == mesh.private_key.public.raw:
            proto.abort("self-connection")
            raise _SelfConnection()
        self._proto = proto
        self.generation += 1
        self.since = time.time()
        self.last_error = None
        proto.watch()
        mesh._link_changed(self)
        log.info("mesh: watching %s (server key %s)", peer.url, server_key.hex()[:8])
        try:
            return await asyncio.shield(proto.lost)
        except asyncio.CancelledError:
            proto.abort("mesh stopping")
            raise

    def _drop(self, reason: str) -> None:
        proto, self._proto = self._proto, None
        changed = proto is not None or self.last_error != reason
        if proto is not None:
            proto.abort(reason)
            self.since = time.time()
        self.last_error = reason
        self.mesh._link_dropped(self)
        if changed:
            self.mesh._link_changed(self)


class Mesh:
    """Mesh links of one server plus its route table (see the module docstring).

    ``DerpServer`` starts one from ``ServerConfig.mesh_with``; tests and embedders
    can also attach one to a running server::

        mesh = Mesh(server, parse_mesh_with("http://127.0.0.1:1234,http://..."))
        mesh.start()
        ...
        await mesh.stop()
    """

    def __init__(
        self,
        server: DerpServer,
        peers: Sequence[MeshPeer],
        *,
        retry_interval: float = DEFAULT_RETRY_INTERVAL,
        connect_timeout: float = 10.0,
        read_timeout: float = CLIENT_READ_TIMEOUT,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        if server.config.mesh_key is None:
            raise ValueError("meshing needs a mesh key (--mesh-psk-file)")
        self.server = server
        self.private_key = server.config.private_key
        self.mesh_key: bytes = server.config.mesh_key
        self.retry_interval = retry_interval
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.ssl_context = ssl_context
        self._ctx: ConnContext[Any] | None = None
        self.routes: RouteTable[Any] = RouteTable()
        self.links = [MeshLink(self, p) for p in peers]
        #: called with a link each time it comes up or goes down (event loop thread)
        self.on_link_change: list[Callable[[MeshLink], None]] = []
        self._started = False

    def start(self) -> None:
        """Install the forward hook and start every link (needs a running loop)."""
        ctx = self.server.context
        self._ctx = ctx
        self.routes = ctx.routes
        ctx.forward_hook = ctx.forward_via_routes
        self.server.metrics.gauges["current_mesh_peers"] = self.connected_links
        self._started = True
        for link in self.links:
            link.start()

    def add_peer(self, peer: MeshPeer) -> MeshLink:
        """Add a link to ``peer`` (started at once if the mesh runs) and return it."""
        link = MeshLink(self, peer)
        self.links.append(link)
        if self._started:
            link.start()
        return link

    async def remove_link(self, link: MeshLink) -> None:
        """Stop ``link`` and forget its routes (local receivers of keys that only it
        reached get PeerGone, as when a link breaks). No-op for an unknown link."""
        if link not in self.links:
            return
        self.links.remove(link)
        await link.stop()
        self._link_dropped(link)

    def _client_ssl(self) -> ssl.SSLContext:
        """The TLS context for ``https`` links: the configured one, else the system
        default, built once (loading the CA store blocks the loop for milliseconds,
        too long to repeat on every reconnect of every link)."""
        if self.ssl_context is None:
            self.ssl_context = ssl.create_default_context()
        return self.ssl_context

    def connected_links(self) -> int:
        """Mesh links currently logged in to their peer (gauge ``derp_current_mesh_peers``)."""
        return sum(1 for link in self.links if link.connected)

    async def stop(self) -> None:
        """Stop every link and forget all routes."""
        self._started = False
        self.on_link_change.clear()
        for link in self.links:
            await link.stop()

    # hooks used by the links

    def _route_added(self, key: bytes, link: MeshLink) -> None:
        self.routes.add(key, link)

    def _route_removed(self, key: bytes, link: MeshLink) -> None:
        if self.routes.remove(key, link):
            self._unreachable([key])

    def _link_dropped(self, link: MeshLink) -> None:
        gone = self.routes.drop_link(link)
        if gone:
            self._unreachable(gone)

    def _link_changed(self, link: MeshLink) -> None:
        for cb in list(self.on_link_change):
            try:
                cb(link)
            except Exception:  # a broken observer must not break the mesh
                log.exception("mesh: link-change callback failed")

    def _unreachable(self, keys: list[bytes]) -> None:
        """Keys that lost their last route (see :meth:`ConnContext.unreachable`)."""
        if self._ctx is not None:
            self._ctx.unreachable(keys)


register_mesh_factory(Mesh)
