"""Async tailnet client libraries: :class:`AgentConnection` and :class:`ClientConnection`.

Both speak the ``coder.tailnet.v2.Tailnet`` service over either transport and
keep a :class:`~tailnet.peers.PeerTable` up to date; they run on any asyncio
event loop, uvloop included:

* **gRPC** (``grpc.aio``) when ``target`` is ``host:port``;
* **Coder's transport** (WebSocket → yamux → DRPC, :mod:`tailnet.rpc`) when
  ``target`` is an access URL (``http(s)://…``): agents dial
  ``/api/v2/workspaceagents/me/rpc`` with their token as the
  ``coder_session_token`` cookie; clients bound to an agent first
  ``GET /api/v2/workspaceagents/{id}/connection`` and dial
  ``…/{id}/coordinate``; user-scoped clients dial ``/api/v2/tailnet``. Each
  session opens Coordinate, StreamDERPMaps and (clients) RefreshResumeToken on
  their own yamux streams, exactly as Coder's Go dialer does, so the same
  library coordinates with tailnet-core and with a real Coder deployment.
  Against a Coder server the client's own peer ID is not announced, so
  :attr:`TailnetConnection.peer_id` stays the nil UUID there.
 The pure rules live in :mod:`tailnet.peers`; this module is the I/O
adapter around them.

Connection flow (one *session*; spec ``coordinator.md`` §2.10, §3, §6.3)::

    open channel → Coordinate(metadata: authorization, tailnet-version,
                              [tailnet-agent-id], [tailnet-resume-token])
      ← initial metadata  tailnet-peer-id: <our peer id>
      → AddTunnel(dst) for every tunnel we want       (clients)
      → UpdateSelf(node)  if a node was published
      ← CoordinateResponse{peer_updates}  → PeerTable → events
      → ReadyForHandshake(ids of every NODE received)  (agents, automatically)
      background: StreamDERPMaps (follows map changes)
                  RefreshResumeToken after ``refresh_in`` (clients)
    stream ends / fails → ConnectionLost, every peer PeerLost,
                          jittered exponential backoff (50 ms → 10 s), next session
    close()  → Disconnect, half-close, wait (bounded) for the server to hang up

Invariants:

* All writes to the Coordinate stream go through one writer task, one message
  at a time: order matters, and Coder's concurrent ``Send()`` calls on one stream
  were a real bug (spec §2.10). Control messages (tunnels, acks,
  Disconnect) are sent in FIFO order; the node is a *latest-value slot*:
  :meth:`TailnetConnection.update_node` replaces a pending node, so rapid
  changes coalesce and at most one UpdateSelf is in flight.
* The node and every tunnel are re-sent on every new session.
* Peer IDs come from the server (initial metadata), never from us.
* A resume token is only presented while not expired; an ``UNAUTHENTICATED``
  rejection mentioning ``resume_token`` drops it and retries at once.
* Errors in one session never escape the background task: they become events
  and a reconnect. Only the *first* connection can fail permanently
  (authentication/authorization/version errors raise :class:`ConnectError`
  from :meth:`TailnetConnection.start`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
import time
import uuid
from collections import deque
from urllib.parse import urlencode
from collections.abc import AsyncGenerator, Awaitable, Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass
from typing import Final, Protocol

import grpc
import grpc.aio

from tailnet.peers import (
    PeerDisconnected,
    PeerEvent,
    PeerLost,
    PeerState,
    PeerTable,
    PeerUpdated,
    ReadyForHandshake,
)
from tailnet.rpc.client import ClientStream
from tailnet.rpc.mux import UNIMPLEMENTED, RpcError
from tailnet.rpc.tailnet_client import TailnetClient
from tailnet.rpc.websocket import DialError, get_json
from tailnet.v2 import tailnet_pb2 as pb

__all__ = [
    "AgentConnection",
    "ClientConnection",
    "TailnetConnection",
    "Backoff",
    "ConnectionOptions",
    "ConnectError",
    "Event",
    "Connected",
    "Reconnected",
    "ConnectionLost",
    "CoordinatorError",
    "DERPMapUpdated",
    "ResumeTokenUpdated",
    "PeerUpdated",
    "PeerLost",
    "PeerDisconnected",
    "ReadyForHandshake",
    "PeerState",
    "PeerTable",
]

log = logging.getLogger(__name__)

# gRPC method paths and metadata keys (the server documents the same contract in
# tailnet/identity.py; duplicated here so clients don't import server modules).
_SERVICE: Final = "/coder.tailnet.v2.Tailnet/"
MD_AUTHORIZATION: Final = "authorization"
MD_VERSION: Final = "tailnet-version"
MD_AGENT_ID: Final = "tailnet-agent-id"
MD_RESUME_TOKEN: Final = "tailnet-resume-token"
MD_PEER_ID: Final = "tailnet-peer-id"

_RFH_ERROR_PREFIX: Final = "ready for handshake error"
_DEFAULT_REFRESH: Final = 30 * 60.0  # Coder: refresh after 30 min if refresh_in <= 0
# Status codes that make the *first* connection attempt fail for good.
_PERMANENT: Final = frozenset(
    {
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.UNIMPLEMENTED,
    }
)

Metadata = list[tuple[str, str]]
_CoordCall = grpc.aio.StreamStreamCall[pb.CoordinateRequest, pb.CoordinateResponse]
_DerpMulti = grpc.aio.UnaryStreamMultiCallable[pb.StreamDERPMapsRequest, pb.DERPMap]
_DerpCall = grpc.aio.UnaryStreamCall[pb.StreamDERPMapsRequest, pb.DERPMap]
_CoordMulti = grpc.aio.StreamStreamMultiCallable[pb.CoordinateRequest, pb.CoordinateResponse]
_EOF: Final[object] = grpc.aio.EOF  # type: ignore[attr-defined]  # missing from grpc-stubs


class _CallLike(Protocol):
    """What the writer/reader loops need of a Coordinate call (gRPC or DRPC)."""

    async def write(self, req: pb.CoordinateRequest) -> None: ...

    async def read(self) -> object: ...

    async def done_writing(self) -> None: ...

    def cancel(self) -> bool: ...


class _DrpcCoordinate:
    """A DRPC Coordinate stream shaped like a gRPC call for the session loops.

    Coder's client never half-closes Coordinate: after Disconnect it waits for
    the server's Close (``done_writing`` does nothing).
    """

    def __init__(self, stream: ClientStream[pb.CoordinateResponse]) -> None:
        self._stream = stream

    async def write(self, req: pb.CoordinateRequest) -> None:
        await self._stream.send(req)

    async def read(self) -> object:
        resp = await self._stream.recv()
        return _EOF if resp is None else resp

    async def done_writing(self) -> None:
        return None

    def cancel(self) -> bool:
        asyncio.ensure_future(self._stream.close())
        return True


# Events ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Connected:
    """The first session is up; ``peer_id`` is the ID the server assigned us."""

    peer_id: uuid.UUID


@dataclass(frozen=True, slots=True)
class Reconnected:
    """A later session is up. ``resumed`` is true when we kept the same peer ID."""

    peer_id: uuid.UUID
    resumed: bool


@dataclass(frozen=True, slots=True)
class ConnectionLost:
    """The Coordinate stream ended or failed; a reconnect follows (unless closing)."""

    reason: str


@dataclass(frozen=True, slots=True)
class CoordinatorError:
    """The coordinator sent ``CoordinateResponse.error``.

    ``fatal`` is false for "ready for handshake error" texts, which Coder's
    clients log as warnings; fatal errors normally precede the server hanging up.
    """

    text: str
    fatal: bool


@dataclass(frozen=True, slots=True)
class DERPMapUpdated:
    """A new (different) DERP map arrived on StreamDERPMaps."""

    derp_map: pb.DERPMap


@dataclass(frozen=True, slots=True)
class ResumeTokenUpdated:
    """A fresh resume token was obtained; it is valid until ``expires_at`` (Unix time)."""

    expires_at: float


Event = (
    PeerEvent
    | Connected
    | Reconnected
    | ConnectionLost
    | CoordinatorError
    | DERPMapUpdated
    | ResumeTokenUpdated
)
"""Everything :meth:`TailnetConnection.events` yields."""


class ConnectError(Exception):
    """The first connection attempt was refused for good (``code`` is the gRPC status)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self.code = code
        self.details = details
        super().__init__(f"{code.name}: {details}")


# Backoff -----------------------------------------------------------------------


class Backoff:
    """Jittered exponential backoff: the n-th delay is uniform in ``[d/2, d]``,
    ``d = min(maximum, initial * factor**n)``; :meth:`reset` after a success.
    """

    def __init__(
        self,
        initial: float = 0.05,
        maximum: float = 10.0,
        factor: float = 2.0,
        *,
        rng: random.Random | None = None,
    ) -> None:
        if not 0 < initial <= maximum or factor < 1:
            raise ValueError("need 0 < initial <= maximum and factor >= 1")
        self.initial = initial
        self.maximum = maximum
        self.factor = factor
        self._rng = rng or random.Random()
        self._attempt = 0

    def next(self) -> float:
        """The next delay in seconds (and advance)."""
        d = min(self.maximum, self.initial * self.factor ** min(self._attempt, 64))
        self._attempt += 1
        return self._rng.uniform(d / 2, d)

    def reset(self) -> None:
        """Start again from ``initial``."""
        self._attempt = 0


# Internal helpers --------------------------------------------------------------


class _EventBuffer:
    """Bounded single-consumer event queue; drops the oldest event when full."""

    def __init__(self, maxlen: int) -> None:
        self._q: deque[Event] = deque()
        self._maxlen = maxlen
        self._ready = asyncio.Event()
        self.closed = False
        self.dropped = 0

    def put(self, ev: Event) -> None:
        if self.closed:
            return
        if len(self._q) >= self._maxlen:
            self._q.popleft()
            self.dropped += 1
        self._q.append(ev)
        self._ready.set()

    def close(self) -> None:
        self.closed = True
        self._ready.set()

    async def get(self) -> Event | None:
        """Next event, or ``None`` once closed and drained."""
        while not self._q:
            if self.closed:
                return None
            self._ready.clear()
            await self._ready.wait()
        return self._q.popleft()


class _Outbox:
    """What one session's writer sends: FIFO control requests + a latest-node slot."""

    def __init__(self) -> None:
        self.control: deque[pb.CoordinateRequest] = deque()
        self.node: pb.Node | None = None
        self.disconnect = False
        self.ended = False
        self.wake = asyncio.Event()
        self.idle = asyncio.Event()

    def put(self, req: pb.CoordinateRequest) -> None:
        self.control.append(req)
        self.idle.clear()
        self.wake.set()

    def set_node(self, node: pb.Node) -> None:
        self.node = node
        self.idle.clear()
        self.wake.set()

    def finish(self) -> None:
        """Send Disconnect after whatever is queued, then half-close."""
        self.disconnect = True
        self.idle.clear()
        self.wake.set()

    def end(self) -> None:
        """The session is over: nothing more will be written; wake flush() waiters."""
        self.ended = True
        self.idle.set()

    @property
    def unsent(self) -> bool:
        """True if requests are still queued (never to be written once ``ended``)."""
        return bool(self.control) or self.node is not None


@dataclass(slots=True)
class _ResumeToken:
    token: str
    expires_at: float  # wall-clock seconds


def _tunnel_req(peer: uuid.UUID, *, add: bool) -> pb.CoordinateRequest:
    t = pb.CoordinateRequest.Tunnel(id=peer.bytes)
    return pb.CoordinateRequest(add_tunnel=t) if add else pb.CoordinateRequest(remove_tunnel=t)


_HTTP_STATUS: Final = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    409: grpc.StatusCode.FAILED_PRECONDITION,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
}


def _rpc_error(exc: BaseException) -> tuple[grpc.StatusCode, str] | None:
    """A transport failure as (status, details); ``None`` for anything else (a bug)."""
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc.code(), exc.details() or ""
    if isinstance(exc, DialError):
        code = _HTTP_STATUS.get(exc.status, grpc.StatusCode.UNAVAILABLE)
        details = str(exc)
        if exc.field("resume_token"):
            details += " [resume_token]"
        return code, details
    if isinstance(exc, RpcError):
        code = grpc.StatusCode.UNIMPLEMENTED if exc.code == UNIMPLEMENTED else grpc.StatusCode.UNKNOWN
        return code, exc.message
    if isinstance(exc, (ConnectionError, OSError, TimeoutError)):
        return grpc.StatusCode.UNAVAILABLE, f"{type(exc).__name__}: {exc}"
    return None


class _SessionEnded(Exception):
    """Internal: a session attempt failed with a gRPC status (before or after setup)."""

    def __init__(self, code: grpc.StatusCode, details: str, *, established: bool) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        self.established = established


@dataclass(slots=True)
class ConnectionOptions:
    """Tuning knobs shared by both connection kinds (all have sensible defaults)."""

    version: str = "2.0"
    """Sent as ``tailnet-version``."""
    backoff: Backoff | None = None
    """Reconnect backoff (default: jittered 50 ms → 10 s)."""
    close_timeout: float = 5.0
    """How long :meth:`TailnetConnection.close` waits for the server to hang up."""
    on_event: Callable[[Event], None] | None = None
    """Called synchronously with every event (in addition to :meth:`events`)."""
    event_buffer: int = 16384
    """Events kept for :meth:`TailnetConnection.events`; the oldest are dropped beyond."""
    channel_options: Sequence[tuple[str, int | str]] = ()
    """Extra ``grpc.aio`` channel options."""
    clock: Callable[[], float] = time.monotonic
    """Monotonic clock for the peer table (lost timestamps)."""
    wall_clock: Callable[[], float] = time.time
    """Wall clock for resume-token expiry."""
    ssl_context: ssl.SSLContext | None = None
    """TLS settings for ``https://`` access URLs (Coder's transport; default: system CAs)."""
    reconnect_gate: Callable[[], Awaitable[None]] | None = None
    """Awaited before every reconnect attempt, after the backoff delay (e.g. "wait
    until the network is up"); tests use it to order events deterministically."""


# The connection ----------------------------------------------------------------


class TailnetConnection:
    """Common machinery of :class:`AgentConnection` and :class:`ClientConnection`.

    Lifecycle: construct, ``await start()`` (waits for the first session), use,
    ``await close()``; or ``async with``. Not thread-safe: use it from the loop
    that started it. ``events()`` is meant for a single consumer; an optional
    ``on_event`` callback sees every event synchronously as well.
    """

    _is_agent = False

    def __init__(
        self,
        target: str,
        token: str,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        node: pb.Node | None = None,
        send_acks: bool,
        resume_tokens: bool,
        resume_token: str | None = None,
        agent_id: uuid.UUID | None = None,
        tunnels: Iterable[uuid.UUID] = (),
        options: ConnectionOptions | None = None,
    ) -> None:
        opts = options or ConnectionOptions()
        self.options = opts
        version = opts.version
        backoff = opts.backoff
        close_timeout = opts.close_timeout
        on_event = opts.on_event
        event_buffer = opts.event_buffer
        channel_options = opts.channel_options
        clock = opts.clock
        wall_clock = opts.wall_clock
        self._target = target
        self._coder_url: str | None = (
            target.rstrip("/")
            if target.startswith(("http://", "https://", "ws://", "wss://"))
            else None
        )
        self._connection_checked = False
        self._token = token
        self._credentials = credentials
        self._version = version
        self._send_acks = send_acks
        self._use_resume = resume_tokens
        self._agent_id = agent_id
        self._backoff = backoff or Backoff()
        self._close_timeout = close_timeout
        self._on_event = on_event
        self._channel_options = list(channel_options)
        self._wall = wall_clock

        self._node: pb.Node | None = None if node is None else _copy_node(node)
        self._tunnels: dict[uuid.UUID, None] = dict.fromkeys(tunnels)
        self._resume: _ResumeToken | None = (
            None if resume_token is None else _ResumeToken(resume_token, float("inf"))
        )
        self.peers = PeerTable(clock=clock)
        """The peer table (read it; the connection mutates it)."""

        self._events = _EventBuffer(event_buffer)
        self._derp_map: pb.DERPMap | None = None
        self._derp_version = 0
        self._derp_changed = asyncio.Event()

        self._peer_id: uuid.UUID | None = None
        self._outbox: _Outbox | None = None
        self._call: _CallLike | None = None
        self._drop_reason: str | None = None
        self._connected = False
        #: ``"CODE: details"`` of the last refused session attempt (None once connected)
        self.last_refusal: str | None = None
        self._closing = False
        self._closed = asyncio.Event()
        self._run_task: asyncio.Task[None] | None = None
        self._first: asyncio.Future[uuid.UUID] | None = None
        self._close_task: asyncio.Task[None] | None = None
        self.sessions = 0
        """Number of sessions established so far."""
        self.node_updates_sent = 0
        """Number of UpdateSelf requests written (coalescing makes this small)."""

    # Properties ----------------------------------------------------------------

    @property
    def peer_id(self) -> uuid.UUID | None:
        """Our peer ID as assigned by the server (``None`` before the first session)."""
        return self._peer_id

    @property
    def connected(self) -> bool:
        """True while a Coordinate session is established."""
        return self._connected

    @property
    def derp_map(self) -> pb.DERPMap | None:
        """The latest DERP map received (``None`` until the first one)."""
        return self._derp_map

    @property
    def resume_token(self) -> str | None:
        """The current resume token, if any and not expired."""
        tok = self._resume
        if tok is None or tok.expires_at <= self._wall():
            return None
        return tok.token

    @property
    def node(self) -> pb.Node | None:
        """The last node passed to :meth:`update_node`."""
        return self._node

    @property
    def dropped_events(self) -> int:
        """Events dropped because the event buffer was full (nobody consuming)."""
        return self._events.dropped

    # Public API ------------------------------------------------------------------

    async def start(self, timeout: float | None = None) -> uuid.UUID:
        """Start the background task and wait for the first session; returns our peer ID.

        Transient failures (server unreachable) are retried with backoff until
        ``timeout`` (``TimeoutError``; the connection keeps trying in the
        background, call :meth:`close` to stop it). Permanent refusals raise
        :class:`ConnectError` and stop the connection.
        """
        if self._closing:
            raise ConnectionError("connection is closed")
        if self._run_task is None:
            loop = asyncio.get_running_loop()
            self._first = loop.create_future()
            self._run_task = loop.create_task(self._run(), name=f"tailnet-client {self._target}")
        assert self._first is not None
        try:
            return await asyncio.wait_for(asyncio.shield(self._first), timeout)
        except TimeoutError:
            refused = self.last_refusal
            if refused is None:
                raise
            raise TimeoutError(
                f"not connected after {timeout:g}s: the coordinator refused the stream "
                f"({refused})"
            ) from None

    async def __aenter__(self) -> TailnetConnection:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def update_node(self, node: pb.Node) -> None:
        """Publish our node. Rapid calls coalesce: only the latest node is sent,
        with at most one UpdateSelf in flight. The node is re-sent after reconnects."""
        self._node = _copy_node(node)
        if self._outbox is not None:
            self._outbox.set_node(self._node)

    async def flush(self, timeout: float | None = None) -> None:
        """Wait until everything queued for the current session has been written.

        Raises ``ConnectionError`` if that session ends with requests still
        unwritten (the node and tunnels are re-sent by the next session).
        """
        outbox = self._outbox
        if outbox is None:
            return
        await asyncio.wait_for(outbox.idle.wait(), timeout)
        if outbox.ended and outbox.unsent:
            raise ConnectionError("coordinator session ended before the queue was written")

    def reconnect(self, reason: str = "reconnect requested") -> None:
        """Drop the current session *without* Disconnect (as if the network broke);
        the usual reconnect logic follows (backoff, gate, resume token)."""
        call = self._call
        if call is not None and not self._closing:
            self._drop_reason = reason
            call.cancel()

    async def events(self) -> AsyncGenerator[Event, None]:
        """Peer and connection events, in order; ends after :meth:`close`."""
        while True:
            ev = await self._events.get()
            if ev is None:
                return
            yield ev

    async def derp_maps(self) -> AsyncGenerator[pb.DERPMap, None]:
        """The current DERP map (if any), then each change; ends after :meth:`close`.
        Any number of iterators may run; a slow one only sees the latest map."""
        seen = 0
        while True:
            if self._derp_version > seen and self._derp_map is not None:
                seen = self._derp_version
                yield self._derp_map
                continue
            if self._closing:
                return
            await self._derp_changed.wait()

    async def close(self) -> None:
        """Send Disconnect, wait (bounded by ``close_timeout``) for the server to
        end the stream, and stop. Idempotent; concurrent callers all wait."""
        if self._close_task is None:
            self._close_task = asyncio.get_running_loop().create_task(self._do_close())
        await asyncio.shield(self._close_task)

    # Background machinery ----------------------------------------------------------

    def _emit(self, ev: Event) -> None:
        self._events.put(ev)
        if self._on_event is not None:
            try:
                self._on_event(ev)
            except Exception:
                log.exception("tailnet client: on_event callback failed")

    def _metadata(self, *, resume: bool) -> Metadata:
        md: Metadata = [
            (MD_AUTHORIZATION, f"Bearer {self._token}"),
            (MD_VERSION, self._version),
        ]
        if self._agent_id is not None:
            md.append((MD_AGENT_ID, str(self._agent_id)))
        if resume:
            tok = self.resume_token
            if tok is not None:
                md.append((MD_RESUME_TOKEN, tok))
        return md

    def _new_channel(self) -> grpc.aio.Channel:
        opts = self._channel_options
        if self._credentials is None:
            return grpc.aio.insecure_channel(self._target, options=opts)
        return grpc.aio.secure_channel(self._target, self._credentials, options=opts)

    async def _do_close(self) -> None:
        self._closing = True
        self._closed.set()
        outbox = self._outbox
        task = self._run_task
        if task is not None and not task.done():
            if outbox is not None and self._connected:
                outbox.finish()
                # The session waits up to close_timeout for the server to hang up.
                done, _ = await asyncio.wait({task}, timeout=self._close_timeout + 1.0)
                if not done:
                    task.cancel()
            else:
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._first is not None and not self._first.done():
            self._first.set_exception(
                ConnectionError("connection closed before it was established")
            )
            self._first.exception()  # mark retrieved
        self._connected = False
        self._events.close()
        self._notify_derp()

    def _notify_derp(self) -> None:
        ev = self._derp_changed
        self._derp_changed = asyncio.Event()
        ev.set()

    async def _run(self) -> None:
        while not self._closing:
            retry_now = False
            try:
                await self._session()
                reason = self._drop_reason or "stream ended by server"
            except _SessionEnded as exc:
                reason = str(exc)
                if not exc.established:
                    self.last_refusal = reason
                    reason = f"refused: {reason}"
                if (
                    exc.code == grpc.StatusCode.UNAUTHENTICATED
                    and "resume_token" in exc.details
                    and self._resume is not None
                ):
                    log.info("tailnet client: resume token rejected, retrying without it")
                    self._resume = None
                    retry_now = True
                elif (
                    not exc.established
                    and self.sessions == 0
                    and exc.code in _PERMANENT
                    and self._first is not None
                    and not self._first.done()
                ):
                    self._first.set_exception(ConnectError(exc.code, exc.details))
                    return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bug or an unexpected transport error
                log.exception("tailnet client: session failed")
                reason = f"{type(exc).__name__}: {exc}"
            if self._closing:
                return
            if self._connected:
                self._connected = False
                self._emit(ConnectionLost(reason))
                for ev in self.peers.mark_all_lost():
                    self._emit(ev)
            log.info("tailnet client %s: disconnected (%s)", self._target, reason)
            self._drop_reason = None
            if not retry_now:
                delay = self._backoff.next()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._closed.wait(), delay)
            gate = self.options.reconnect_gate
            if gate is not None and not self._closing:
                await gate()

    async def _session(self) -> None:
        if self._coder_url is not None:
            await self._coder_session(self._coder_url)
            return
        channel = self._new_channel()
        try:
            await self._session_on(channel)
        finally:
            self._session_over()
            with contextlib.suppress(Exception):
                await channel.close(None)

    def _session_over(self) -> None:
        if self._outbox is not None:
            self._outbox.end()
        self._outbox = None
        self._call = None

    async def _session_on(self, channel: grpc.aio.Channel) -> None:
        coordinate: _CoordMulti = channel.stream_stream(
            _SERVICE + "Coordinate",
            request_serializer=pb.CoordinateRequest.SerializeToString,
            response_deserializer=pb.CoordinateResponse.FromString,
        )
        presented = self.resume_token
        call: _CoordCall = coordinate(None, metadata=self._metadata(resume=True))
        prev = self._peer_id
        try:
            md = await call.initial_metadata()
            raw = md.get(MD_PEER_ID) if md is not None else None
            if raw is None:
                # tailnet-core sends the peer ID only once it accepted the stream:
                # without it the call is (about to be) ended with the refusal status.
                with contextlib.suppress(TimeoutError):
                    code = await asyncio.wait_for(asyncio.shield(call.code()), 1.0)
                    if code != grpc.StatusCode.OK or call.done():
                        raise _SessionEnded(code, await call.details(), established=False)
            if isinstance(raw, str):
                self._set_peer_id(raw)
        except grpc.aio.AioRpcError as exc:
            call.cancel()
            raise _SessionEnded(exc.code(), exc.details() or "", established=False) from None
        pid = self._established(call, presented, prev)
        aux = [self._derp_loop(channel)]
        if self._use_resume:
            aux.append(self._refresh_loop(channel, pid))
        await self._run_streams(call, aux)

    def _set_peer_id(self, raw: str) -> None:
        try:
            self._peer_id = uuid.UUID(raw)
        except ValueError:
            log.warning("tailnet client: server sent a bad peer id %r", raw)

    def _established(
        self, call: _CallLike, presented: str | None, prev: uuid.UUID | None
    ) -> uuid.UUID:
        """A session is up: queue tunnels and node, emit Connected/Reconnected."""
        outbox = _Outbox()
        for dst in self._tunnels:
            outbox.put(_tunnel_req(dst, add=True))
        if self._node is not None:
            outbox.set_node(self._node)
        if not outbox.control and outbox.node is None:
            outbox.idle.set()
        self._outbox = outbox
        self._call = call
        self._connected = True
        self.last_refusal = None
        self._backoff.reset()
        self.sessions += 1
        pid = self._peer_id or uuid.UUID(int=0)
        if self.sessions == 1:
            if self._first is not None and not self._first.done():
                self._first.set_result(pid)
            self._emit(Connected(pid))
        else:
            self._emit(Reconnected(pid, resumed=presented is not None and prev == pid))
        log.info("tailnet client %s: connected as %s", self._target, pid)
        return pid

    async def _run_streams(
        self,
        call: _CallLike,
        aux_coros: list[Coroutine[object, object, None]],
        *,
        aux_ends_session: bool = False,
    ) -> None:
        """Run the writer, the reader and ``aux_coros`` until the Coordinate stream ends.

        With ``aux_ends_session`` an auxiliary loop returning or failing (Coder's
        transport: StreamDERPMaps ended) ends the session too, as Coder's client
        tears the whole connection down then.
        """
        outbox = self._outbox
        assert outbox is not None
        writer = asyncio.ensure_future(self._write_loop(call, outbox))
        reader = asyncio.ensure_future(self._read_loop(call, outbox))
        aux = [asyncio.ensure_future(c) for c in aux_coros]
        try:
            watched = {reader, writer, *aux} if aux_ends_session else {reader, writer}
            done, _ = await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
            if reader not in done:
                # The writer finished: after Disconnect + half-close (clean close),
                # or because a write failed. Either way the reader learns how the
                # stream ended; give the server a bounded time to end it.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(reader), self._close_timeout)
            failure = reader.exception() if reader.done() and not reader.cancelled() else None
            if failure is None and writer.done() and not writer.cancelled():
                failure = writer.exception()
            for t in aux if aux_ends_session else ():
                if failure is None and t.done() and not t.cancelled():
                    failure = t.exception()
                    if failure is None:
                        raise _SessionEnded(
                            grpc.StatusCode.UNAVAILABLE, "StreamDERPMaps ended", established=True
                        )
            if failure is not None:
                err = _rpc_error(failure)
                if err is None:
                    raise failure
                if err[0] != grpc.StatusCode.CANCELLED:
                    raise _SessionEnded(err[0], err[1], established=True)
        finally:
            for t in (reader, writer, *aux):
                t.cancel()
            call.cancel()
            await asyncio.gather(reader, writer, *aux, return_exceptions=True)

    # Coder's transport (WebSocket → yamux → DRPC) ------------------------------------

    def _coder_dial_url(self) -> str:
        base = self._coder_url
        assert base is not None
        q = [("version", self._version)]
        if self._use_resume:
            tok = self.resume_token
            if tok is not None:
                q.append(("resume_token", tok))
        if self._is_agent:
            path = "/api/v2/workspaceagents/me/rpc"
        elif self._agent_id is not None:
            path = f"/api/v2/workspaceagents/{self._agent_id}/coordinate"
        else:
            path = "/api/v2/tailnet"
        return f"{base}{path}?{urlencode(sorted(q))}"

    async def _coder_session(self, base: str) -> None:
        """One session the way Coder's Go dialer runs it (coder-transport.md §4.4).

        First session of a client bound to an agent: ``GET …/connection`` (the
        DERP map and options, as ``DialAgent`` does). Then dial, Coordinate,
        StreamDERPMaps and (clients) RefreshResumeToken on their own yamux
        streams; StreamDERPMaps ending ends the session, as in Coder.
        """
        ssl_ctx = self.options.ssl_context
        presented = self.resume_token
        prev = self._peer_id
        initial_map: pb.DERPMap | None = None
        try:
            if self._agent_id is not None and not self._connection_checked:
                info = await get_json(
                    f"{base}/api/v2/workspaceagents/{self._agent_id}/connection",
                    self._token,
                    ssl=ssl_ctx,
                )
                self._connection_checked = True
                derp = info.get("derp_map") if isinstance(info, dict) else None
                if isinstance(derp, dict):
                    from tailnet.derpmap import derp_map_from_json  # pure, no server code

                    try:
                        initial_map = derp_map_from_json(derp)
                    except Exception as exc:  # the stream will bring the map anyway
                        log.info("tailnet client: unusable derp_map in /connection: %s", exc)
            client = await TailnetClient.connect(
                self._coder_dial_url(), self._token, cookie=self._is_agent, ssl=ssl_ctx
            )
        except (DialError, OSError, TimeoutError) as exc:
            err = _rpc_error(exc)
            assert err is not None
            raise _SessionEnded(err[0], err[1], established=False) from None
        try:
            if client.peer_id is not None:  # tailnet-core says; a Coder server doesn't
                self._set_peer_id(client.peer_id)
            coord = _DrpcCoordinate(client.coordinate())
            self._established(coord, presented, prev)
            if initial_map is not None:
                self._set_derp_map(initial_map)
            aux = [self._coder_derp_loop(client)]
            if self._use_resume:
                aux.append(self._coder_refresh_loop(client))
            await self._run_streams(coord, aux, aux_ends_session=True)
        finally:
            self._session_over()
            await client.close()

    async def _coder_derp_loop(self, client: TailnetClient) -> None:
        maps = await client.stream_derp_maps()
        try:
            async for m in maps:
                self._set_derp_map(m)
        finally:
            await maps.close()

    async def _coder_refresh_loop(self, client: TailnetClient) -> None:
        """Refresh at once, then after ``refresh_in``; stops on code 12 or an error
        (the connection stays up), as Coder's resume-token controller does."""
        while True:
            try:
                resp = await client.refresh_resume_token()
            except RpcError as exc:
                if exc.code == UNIMPLEMENTED:
                    log.info("tailnet client: resume tokens not supported by this server")
                else:
                    log.warning("tailnet client: RefreshResumeToken failed: %s", exc.message)
                # the connection stays up; the next session tries again
                await self._closed.wait()
                return
            refresh_in = self._take_resume_token(resp)
            await asyncio.sleep(refresh_in)

    def _take_resume_token(self, resp: pb.RefreshResumeTokenResponse) -> float:
        """Store a refreshed token; returns the delay before the next refresh."""
        expires = (
            resp.expires_at.ToNanoseconds() / 1e9 if resp.HasField("expires_at") else float("inf")
        )
        self._resume = _ResumeToken(resp.token, expires)
        self._emit(ResumeTokenUpdated(expires))
        refresh_in = resp.refresh_in.ToNanoseconds() / 1e9 if resp.HasField("refresh_in") else 0.0
        return refresh_in if refresh_in > 0 else _DEFAULT_REFRESH

    async def _write_loop(self, call: _CallLike, outbox: _Outbox) -> None:
        while True:
            if outbox.control:
                await call.write(outbox.control.popleft())
                continue
            node = outbox.node
            if node is not None:
                outbox.node = None
                self.node_updates_sent += 1
                await call.write(
                    pb.CoordinateRequest(update_self=pb.CoordinateRequest.UpdateSelf(node=node))
                )
                continue
            if outbox.disconnect:
                bye = pb.CoordinateRequest(disconnect=pb.CoordinateRequest.Disconnect())
                await call.write(bye)
                await call.done_writing()
                outbox.idle.set()
                return
            outbox.idle.set()
            outbox.wake.clear()
            await outbox.wake.wait()

    async def _read_loop(self, call: _CallLike, outbox: _Outbox) -> None:
        while True:
            resp = await call.read()
            if resp is _EOF:
                return
            assert isinstance(resp, pb.CoordinateResponse)
            self._handle_response(resp, outbox)

    def _handle_response(self, resp: pb.CoordinateResponse, outbox: _Outbox) -> None:
        events, acks = self.peers.apply_response(resp)
        for ev in events:
            self._emit(ev)
        if acks and self._send_acks and not outbox.disconnect:
            outbox.put(
                pb.CoordinateRequest(
                    ready_for_handshake=[
                        pb.CoordinateRequest.ReadyForHandshake(id=p.bytes) for p in acks
                    ]
                )
            )
        if resp.error:
            fatal = not resp.error.startswith(_RFH_ERROR_PREFIX)
            (log.warning if fatal else log.info)("tailnet coordinator error: %s", resp.error)
            self._emit(CoordinatorError(resp.error, fatal))

    async def _derp_loop(self, channel: grpc.aio.Channel) -> None:
        stream: _DerpMulti = channel.unary_stream(
            _SERVICE + "StreamDERPMaps",
            request_serializer=pb.StreamDERPMapsRequest.SerializeToString,
            response_deserializer=pb.DERPMap.FromString,
        )
        backoff = Backoff(0.1, 5.0)
        while True:
            call: _DerpCall = stream(
                pb.StreamDERPMapsRequest(), metadata=self._metadata(resume=False)
            )
            try:
                while True:
                    m = await call.read()
                    if m is _EOF:
                        break
                    assert isinstance(m, pb.DERPMap)
                    backoff.reset()
                    self._set_derp_map(m)
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                    log.info("tailnet client: server has no StreamDERPMaps")
                    return
                log.debug("tailnet client: StreamDERPMaps failed: %s", exc.details())
            finally:
                call.cancel()
            await asyncio.sleep(backoff.next())

    def _set_derp_map(self, m: pb.DERPMap) -> None:
        if self._derp_map is not None and self._derp_map == m:
            return
        self._derp_map = m
        self._derp_version += 1
        self._notify_derp()
        self._emit(DERPMapUpdated(m))

    async def _refresh_loop(self, channel: grpc.aio.Channel, peer_id: uuid.UUID) -> None:
        refresh: grpc.aio.UnaryUnaryMultiCallable[
            pb.RefreshResumeTokenRequest, pb.RefreshResumeTokenResponse
        ] = channel.unary_unary(
            _SERVICE + "RefreshResumeToken",
            request_serializer=pb.RefreshResumeTokenRequest.SerializeToString,
            response_deserializer=pb.RefreshResumeTokenResponse.FromString,
        )
        backoff = Backoff(0.5, 30.0)
        while True:
            md = self._metadata(resume=False) + [(MD_PEER_ID, str(peer_id))]
            try:
                resp = await refresh(pb.RefreshResumeTokenRequest(), metadata=md, timeout=30.0)
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                    log.info("tailnet client: resume tokens not supported by this server")
                    return
                log.debug("tailnet client: RefreshResumeToken failed: %s", exc.details())
                await asyncio.sleep(backoff.next())
                continue
            assert isinstance(resp, pb.RefreshResumeTokenResponse)
            backoff.reset()
            await asyncio.sleep(self._take_resume_token(resp))


def _copy_node(node: pb.Node) -> pb.Node:
    out = pb.Node()
    out.CopyFrom(node)
    return out


class AgentConnection(TailnetConnection):
    """A workspace agent's coordinator connection.

    Agents open no tunnels (clients tunnel to them) and acknowledge every NODE
    they receive with one ``ready_for_handshake`` request per response. Resume
    tokens are off (agent connections don't support them). The server derives
    our peer ID from the agent token.
    """

    _is_agent = True

    def __init__(
        self,
        target: str,
        token: str,
        *,
        node: pb.Node | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        send_acks: bool = True,
        options: ConnectionOptions | None = None,
    ) -> None:
        super().__init__(
            target,
            token,
            credentials=credentials,
            node=node,
            send_acks=send_acks,
            resume_tokens=False,
            options=options,
        )


class ClientConnection(TailnetConnection):
    """A client's coordinator connection.

    With ``agent_id`` the connection is bound to that agent (metadata
    ``tailnet-agent-id``) and keeps a tunnel to it, re-added after every
    reconnect. Without it (user-scoped, Coder Connect style) tunnels are managed
    with :meth:`add_tunnel` / :meth:`remove_tunnel`. Resume tokens are refreshed
    in the background and used on reconnect, so agents see LOST → NODE for the
    same peer ID rather than a new peer. ``resume_token`` seeds the first
    connection (e.g. one saved by a previous process).
    """

    def __init__(
        self,
        target: str,
        token: str,
        *,
        agent_id: uuid.UUID | None = None,
        tunnels: Iterable[uuid.UUID] = (),
        node: pb.Node | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        resume_tokens: bool = True,
        resume_token: str | None = None,
        options: ConnectionOptions | None = None,
    ) -> None:
        initial = ([agent_id] if agent_id is not None else []) + list(tunnels)
        super().__init__(
            target,
            token,
            credentials=credentials,
            node=node,
            send_acks=False,
            resume_tokens=resume_tokens,
            resume_token=resume_token,
            agent_id=agent_id,
            tunnels=initial,
            options=options,
        )
    @property
    def agent_id(self) -> uuid.UUID | None:
        """The agent this connection is bound to (``None`` for user-scoped clients)."""
        return self._agent_id

    @property
    def tunnels(self) -> list[uuid.UUID]:
        """Destinations we keep tunnels to (re-added after every reconnect)."""
        return list(self._tunnels)

    def add_tunnel(self, peer_id: uuid.UUID) -> None:
        """Open a tunnel to ``peer_id`` now (if connected) and after every reconnect."""
        if peer_id in self._tunnels:
            return
        self._tunnels[peer_id] = None
        if self._outbox is not None:
            self._outbox.put(_tunnel_req(peer_id, add=True))

    def remove_tunnel(self, peer_id: uuid.UUID) -> None:
        """Close the tunnel to ``peer_id``. While connected the coordinator answers
        with DISCONNECTED; while disconnected the peer is forgotten locally."""
        if peer_id not in self._tunnels:
            return
        del self._tunnels[peer_id]
        if self._outbox is not None:
            self._outbox.put(_tunnel_req(peer_id, add=False))
        elif self.peers.remove(peer_id):
            self._emit(PeerDisconnected(peer_id, "remove tunnel"))
