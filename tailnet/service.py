"""Transport-independent Tailnet service: identity, coordination sessions and the other RPCs.

A transport (gRPC: :mod:`tailnet.server.grpc`; Coder's yamux + DRPC: :mod:`tailnet.rpc`)
does three things per call:

1. ``call = await service.authenticate(metadata)`` — token → :class:`Principal`
   (``UNAUTHENTICATED`` if missing/unknown), then the API version check
   (``INVALID_ARGUMENT`` if malformed, ``FAILED_PRECONDITION`` if unsupported);
2. invokes one of the RPC methods below with that :class:`CallContext`;
3. maps a raised :class:`ServiceError` to its status (``ServiceError.status``
   names mirror gRPC status codes) — in exactly one place.

Coordinate flow (:meth:`TailnetService.coordinate`)::

    ident = await service.resolve_stream(call)      # peer ID + policy (+ resume token)
    async for resp in service.coordinate(ident, requests):
        send(resp)                                  # may end by raising ServiceError
    # or, cheaper (no async generators; what the gRPC adapter uses):
    await service.run_coordinate(ident, read, write, eof)
    # or without a task of its own (what the DRPC adapter uses: one per peer):
    run = await service.start_coordinate(ident, read=, ready=, send=, on_end=)
    run.input()   # whenever requests may be waiting;  run.cancel() if the call ended

StreamDERPMaps likewise: :meth:`TailnetService.stream_derp_maps` (an async
generator) or :meth:`TailnetService.watch_derp_maps` (callbacks, no task).

* Opening a stream: at most ``limits.max_peers_per_principal`` concurrent
  Coordinate streams per principal (kind + id), else ``RESOURCE_EXHAUSTED``
  naming the limit. A replacing connection (same peer ID still connected) or a
  resumed one first has the tunnels it would inherit re-authorized against its
  own policy; refused ones are removed (as RemoveTunnel) before it connects.
* The peer's responses go through a :class:`QueueSink` (bounded by
  ``limits.peer_buffer_responses`` responses, 512, and
  ``limits.peer_buffer_bytes`` serialized bytes, 8 MiB). The coordinator writes
  without blocking; past either bound it evicts the peer (slow consumer), which
  ends only that stream: what was still queued for it is dropped, and only the
  close error is left to write.
* A reader task runs (with ``start_coordinate`` only while requests wait;
  responses are then written by a task that exists only while some are
  queued), for every request: ``validate_request`` (once, with
  ``limits``) → ``await policy.authorize`` → ``coordinator.handle(...,
  validated=True)``. A malformed request (or one beyond a node/request cap)
  sends ``CoordinateResponse(error=<text>)`` and ends the stream with
  ``INVALID_ARGUMENT`` (``RESOURCE_EXHAUSTED`` for ``max_tunnels_per_peer``);
  an authorization failure sends ``"authorization: …"`` and ends with
  ``PERMISSION_DENIED``; in every case the peer is reported LOST to its tunnel
  peers and nothing else is disturbed.
* ``Disconnect`` → tunnel peers see DISCONNECTED, the stream ends cleanly.
  The request stream ending (or the call being cancelled) without Disconnect
  → LOST, the stream ends.
* A close initiated by the coordinator (overwrite by a newer connection with
  the same peer ID, slow-consumer eviction, :meth:`TailnetService.close`) sends
  the close reason as a final ``error`` response and ends the stream cleanly.

Peer identity (server-assigned, never from messages): agents use their agent
ID under ``AgentPolicy``; users get a fresh (or resumed) ID under
``ClientPolicy(agent)`` when they name an agent (``tailnet-agent-id``) or
``UserPolicy`` otherwise; the control plane gets a fresh (or resumed) ID under
``UnrestrictedPolicy``. See :mod:`tailnet.identity` for the metadata contract.

Concurrency: everything runs on one event loop; the coordinator core is only
touched from that loop and never across an ``await``.

Garbage: a stream leaves no reference cycles behind (exceptions stored for
later are never raised themselves, so no traceback links them back to the
frames holding them); the servers' tuned GC then never has to find them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

from tailnet.auth import (
    TUNNEL_DENIED,
    AgentPolicy,
    ClientPolicy,
    CoordinateePolicy,
    UnrestrictedPolicy,
    UserPolicy,
)
from tailnet.core import (
    CLOSE_ERR_FAILED_UPDATE,
    RESPONSE_BUFFER_SIZE,
    CoordinatorAPI,
    validate_request,
)
from tailnet.derpmap import DERPMapSource, derp_maps_equal, with_home_params
from tailnet.errors import AuthorizationError, CoordinatorClosed, LimitExceeded, RequestError
from tailnet.identity import (
    MD_AGENT_ID,
    MD_PEER_ID,
    MD_RESUME_TOKEN,
    MD_VERSION,
    Authenticator,
    Principal,
    token_from_metadata,
)
from tailnet.limits import DEFAULT_LIMITS, Limits
from tailnet.metrics import ServiceStats
from tailnet.resume import InvalidResumeToken, LegacyResumeToken, ResumeTokenProvider
from tailnet.telemetry import InvalidTelemetry, TelemetryBuffer
from tailnet.v2 import tailnet_pb2 as pb
from tailnet.version import CURRENT_VERSION, InvalidVersion, UnsupportedVersion, check_version
from tailnet.workspaces import (
    EMPTY_SNAPSHOT,
    InMemoryWorkspaceProvider,
    WorkspaceProvider,
    WorkspaceSnapshot,
    diff_snapshots,
    update_is_empty,
)

__all__ = [
    "RESPONSE_QUEUE_SIZE",
    "Status",
    "ServiceError",
    "CallContext",
    "CoordinateRun",
    "DERPMapWatch",
    "StreamIdentity",
    "QueueSink",
    "TunnelAuthorizer",
    "TailnetService",
    "response_size",
]

log = logging.getLogger(__name__)

#: Responses buffered per peer before the coordinator evicts it (Coder: 512).
RESPONSE_QUEUE_SIZE = RESPONSE_BUFFER_SIZE

TunnelAuthorizer = Callable[[Principal, uuid.UUID], Awaitable[bool]]
_T = TypeVar("_T")

#: End-of-requests sentinel for :meth:`TailnetService.coordinate`'s reader.
_END: object = object()


class Status(enum.Enum):
    """Call outcome; names equal ``grpc.StatusCode`` member names."""

    OK = "ok"
    INVALID_ARGUMENT = "invalid argument"
    UNAUTHENTICATED = "unauthenticated"
    PERMISSION_DENIED = "permission denied"
    FAILED_PRECONDITION = "failed precondition"
    RESOURCE_EXHAUSTED = "resource exhausted"
    UNIMPLEMENTED = "unimplemented"
    UNAVAILABLE = "unavailable"
    INTERNAL = "internal"


class ServiceError(Exception):
    """Ends a call with ``status``; ``message`` is safe to show the caller."""

    def __init__(self, status: Status, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _metadata_uuid(key: str, text: str) -> uuid.UUID:
    """Parse a UUID metadata value; ``INVALID_ARGUMENT`` naming ``key`` if malformed."""
    try:
        return uuid.UUID(text)
    except ValueError:
        raise ServiceError(Status.INVALID_ARGUMENT, f"invalid {key} {text!r}: not a UUID") from None


@dataclass(frozen=True, slots=True)
class CallContext:
    """An authenticated call: who, at which negotiated API version, with which metadata."""

    principal: Principal
    version: tuple[int, int]
    metadata: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class StreamIdentity:
    """Everything a Coordinate stream needs: the server-assigned peer and its policy."""

    principal: Principal
    peer_id: uuid.UUID
    name: str
    policy: CoordinateePolicy
    resumed: bool = False


#: (response, serialized size) of the last response measured by :func:`response_size`.
_last_size: tuple[pb.CoordinateResponse | None, int] = (None, 0)


def response_size(resp: pb.CoordinateResponse) -> int:
    """Serialized size of ``resp``, computed once per response object.

    The coordinator shares one response object between all recipients of a
    fan-out and sends it to them one after the other, so a one-entry cache
    keyed by identity (holding a strong reference, so the identity cannot be
    reused) measures each response once, not once per recipient.
    """
    global _last_size
    last, size = _last_size
    if resp is not last:
        size = resp.ByteSize()
        _last_size = (resp, size)
    return size


class QueueSink:
    """A bounded per-peer response queue (the coordinator's ``PeerSink``).

    ``send`` never blocks: it returns ``False`` when ``maxsize`` responses, or
    responses totalling more than ``max_bytes`` serialized bytes, would be
    waiting (the coordinator then evicts the peer). A response is always
    accepted into an empty queue, so one large response (an "init" batch) never
    evicts a peer that keeps up. After ``close`` further sends are dropped
    (returning ``True``: the peer is going away anyway); an eviction also drops
    what was still queued (see :meth:`close`).
    The single consumer takes responses with :meth:`pop` and sleeps in
    :meth:`wait` while the queue is empty and open; once closed and empty, the
    close error (if any) is the stream's final ``CoordinateResponse(error=…)``.
    :meth:`drain` wraps that protocol as an async iterator.

    ``failure`` (set by :meth:`fail`) records a status other than OK for the
    transport to end the stream with (never raise that object itself: raise a
    copy, or its traceback would tie this sink into a reference cycle). Owned by
    the event loop thread. Lean by design (one per connected peer):
    ``__slots__``, a small list, and at most one waiter future, created only
    while the consumer sleeps.
    """

    __slots__ = (
        "_bytes", "_listener", "_max_bytes", "_maxsize", "_queue", "_waiter", "closed", "error",
        "failure",
    )

    def __init__(
        self, maxsize: int = RESPONSE_QUEUE_SIZE, max_bytes: int = DEFAULT_LIMITS.peer_buffer_bytes
    ) -> None:
        # A list, not a deque: it usually holds 0-2 responses, and an empty deque
        # costs a 64-slot block (~0.5 KB) per connected peer.
        self._queue: list[tuple[pb.CoordinateResponse, int]] = []
        self._maxsize = maxsize
        self._max_bytes = max_bytes
        self._bytes = 0
        self._waiter: asyncio.Future[None] | None = None
        #: called (instead of a waiting consumer) when a response or the close arrives
        self._listener: Callable[[], None] | None = None
        self.closed = False
        self.error: str | None = None
        self.failure: ServiceError | None = None

    def listen(self, on_ready: Callable[[], None] | None) -> None:
        """Call ``on_ready()`` whenever a response is queued or the sink closes (a
        consumer without a waiting task); ``None`` stops."""
        self._listener = on_ready

    def _wake(self) -> None:
        w = self._waiter
        if w is not None:
            self._waiter = None
            if not w.done():
                w.set_result(None)
        listener = self._listener
        if listener is not None:
            listener()

    def send(self, resp: pb.CoordinateResponse) -> bool:
        """Queue ``resp`` (``False``: over the limits, see the class docstring)."""
        if self.closed:
            return True
        q = self._queue
        size = response_size(resp)
        if q and (len(q) >= self._maxsize or self._bytes + size > self._max_bytes):
            return False
        q.append((resp, size))
        self._bytes += size
        if self._waiter is not None or self._listener is not None:
            self._wake()
        return True

    def close(self, error: str | None = None) -> None:
        """Idempotent; the first close decides the final error text.

        An eviction (``error`` is the coordinator's slow-consumer text,
        :data:`tailnet.core.CLOSE_ERR_FAILED_UPDATE`) also drops the responses
        still queued: the peer is cut off, and one that does not read would
        otherwise keep up to ``max_bytes`` of stale updates alive for as long as
        it holds its stream open. Only the final error is left to write.
        """
        if self.closed:
            return
        self.closed = True
        self.error = error
        if error == CLOSE_ERR_FAILED_UPDATE:
            self._queue.clear()
            self._bytes = 0
        self._wake()

    def fail(self, status: Status, message: str) -> None:
        """Record why the stream ends abnormally, then close with ``message``."""
        if self.failure is None and not self.closed:
            self.failure = ServiceError(status, message)
        self.close(message)

    def raise_failure(self) -> None:
        """Raise (a copy of) :attr:`failure`, if any."""
        f = self.failure
        if f is not None:
            raise ServiceError(f.status, f.message)

    def __len__(self) -> int:
        return len(self._queue)

    @property
    def queued_bytes(self) -> int:
        """Serialized bytes of the responses waiting."""
        return self._bytes

    def pop(self) -> pb.CoordinateResponse | None:
        """The oldest queued response, or ``None`` if the queue is empty."""
        q = self._queue
        if not q:
            return None
        resp, size = q.pop(0)
        self._bytes -= size
        return resp

    async def wait(self) -> None:
        """Return once a response is queued or the sink is closed (single consumer)."""
        if self._queue or self.closed:
            return
        w: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiter = w
        try:
            await w
        finally:
            if self._waiter is w:
                self._waiter = None

    async def drain(self) -> AsyncIterator[pb.CoordinateResponse]:
        """Yield responses until closed (see class docstring)."""
        while True:
            while (resp := self.pop()) is not None:
                yield resp
            if self.closed:
                if self.error:
                    yield pb.CoordinateResponse(error=self.error)
                return
            await self.wait()


class DERPMapWatch:
    """StreamDERPMaps without a task: the same maps as
    :meth:`TailnetService.stream_derp_maps`, pushed through callbacks.

    Flow: :meth:`first` returns the current map (send it); after each map is
    sent the consumer calls :meth:`resume`, which either calls ``on_map`` with a
    map that differs from the last one sent, or waits (one future registered
    with the DERP map source and the service's close, with a done-callback) and
    checks again at the next change. Changes while a map is being sent
    coalesce. ``on_end()`` is called once the service closes; :meth:`cancel`
    stops the watch (idempotent). Callbacks run on the event loop.
    """

    __slots__ = ("_svc", "_on_map", "_on_end", "_version", "_last", "_fut", "closed")

    def __init__(
        self, svc: TailnetService, on_map: Callable[[pb.DERPMap], None], on_end: Callable[[], None]
    ) -> None:
        self._svc = svc
        self._on_map = on_map
        self._on_end = on_end
        self._version = 0
        self._last: pb.DERPMap | None = None
        self._fut: asyncio.Future[None] | None = None
        self.closed = False

    def first(self) -> pb.DERPMap:
        self._version, last = self._svc._derp_map_to_send()
        self._last = last
        return last

    def resume(self) -> None:
        """The last map was sent: push the next change (now or when it happens)."""
        if self.closed or self._fut is not None:
            return
        svc = self._svc
        if svc.closed:
            self.closed = True
            self._on_end()
            return
        src = svc._derp_maps
        if src.version != self._version:
            self._version, cur = svc._derp_map_to_send()
            last = self._last
            if cur is not last and (last is None or not derp_maps_equal(last, cur)):
                self._last = cur
                self._on_map(cur)
                return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        src.add_waiter(fut)
        svc._close_waiters.add(fut)
        fut.add_done_callback(self._fired)
        self._fut = fut

    def _fired(self, fut: asyncio.Future[None]) -> None:
        self._unregister(fut)
        if self._fut is fut:
            self._fut = None
            if not fut.cancelled():
                self.resume()

    def _unregister(self, fut: asyncio.Future[None]) -> None:
        self._svc._derp_maps.remove_waiter(fut)
        self._svc._close_waiters.discard(fut)

    def cancel(self) -> None:
        self.closed = True
        fut, self._fut = self._fut, None
        if fut is not None:
            fut.remove_done_callback(self._fired)
            self._unregister(fut)
            fut.cancel()


class CoordinateRun:
    """A Coordinate stream without a task of its own (callback form of
    :meth:`TailnetService.run_coordinate`; made by
    :meth:`TailnetService.start_coordinate`).

    Requests are read by an on-demand reader task (the transport calls
    :meth:`input` whenever ``read()`` may not wait); responses are written in
    order by a task that exists only while responses are queued (``send`` may
    wait for the peer's window) — or, with ``send_nowait``/``drain``, from a
    loop callback scheduled when the first one is queued (never inside the
    coordinator's call that queued it), the task starting only once the
    transport must be waited for. When the sink is closed and drained the
    close error is written, then ``on_end(None)`` — or ``on_end(ServiceError)``
    for a failure status, or ``on_end(exc)`` if a send failed. :meth:`cancel`
    (the transport ended the call) stops both tasks. Either way the peer leaves
    the coordinator once, and every reference to the transport is dropped.
    """

    __slots__ = ("_svc", "_ident", "_sink", "_live", "_reader", "_send", "_send_nowait",
                 "_drain", "_on_end", "_task", "_soon", "over")

    def __init__(
        self,
        svc: TailnetService,
        ident: StreamIdentity,
        sink: QueueSink,
        live: _LiveStream,
        read: Callable[[], Awaitable[object]],
        ready: Callable[[], bool],
        eof: object,
        send: Callable[[pb.CoordinateResponse], Awaitable[object]],
        on_end: Callable[[BaseException | None], None],
        send_nowait: Callable[[pb.CoordinateResponse], bool] | None = None,
        drain: Callable[[], Awaitable[object]] | None = None,
    ) -> None:
        self._svc = svc
        self._ident = ident
        self._sink = sink
        self._live = live
        self._reader: _OnDemandReader | None = _OnDemandReader(
            svc, ident, sink, read, eof, ready, None
        )
        self._send: Callable[[pb.CoordinateResponse], Awaitable[object]] | None = send
        self._send_nowait = send_nowait if drain is not None else None
        self._drain = drain
        self._on_end: Callable[[BaseException | None], None] | None = on_end
        self._task: asyncio.Task[bool] | None = None
        self._soon = False  # a _write_soon callback is scheduled
        self.over = False
        sink.listen(self._kick)

    def input(self) -> None:
        """Requests may be waiting (the transport's "input arrived" callback)."""
        reader = self._reader
        if reader is not None:
            reader.kick()

    def _kick(self) -> None:
        if self._task is not None or self._soon or self.over:
            return
        sink = self._sink
        if not len(sink) and not sink.closed:
            return
        if self._send_nowait is not None:
            # write from the next loop iteration (as a task would), never inside
            # the coordinator call that queued the response
            self._soon = True
            asyncio.get_running_loop().call_soon(self._write_soon)
            return
        self._start_task(False)

    def _write_soon(self) -> None:
        self._soon = False
        if self._task is not None or self.over:
            return
        sink = self._sink
        drain_first = False
        send_nowait = self._send_nowait
        if send_nowait is not None and not sink.closed:
            try:
                while (resp := sink.pop()) is not None:
                    if not send_nowait(resp):
                        drain_first = True
                        break
            except Exception as exc:  # the call is over, or a response too big
                self._end(exc)
                return
            if not drain_first and not len(sink) and not sink.closed:
                return  # all written at once
        self._start_task(drain_first)

    def _start_task(self, drain_first: bool) -> None:
        task = asyncio.ensure_future(self._write_out(drain_first))
        self._task = task
        task.add_done_callback(self._written)

    async def _write_out(self, drain_first: bool = False) -> bool:
        """Write what is queued; True once the stream's ending was written too."""
        sink = self._sink
        send = self._send
        assert send is not None
        if drain_first and self._drain is not None:
            await self._drain()
        while (resp := sink.pop()) is not None:
            await send(resp)
        if not sink.closed:
            return False
        if sink.error:
            await send(pb.CoordinateResponse(error=sink.error))
        sink.raise_failure()
        return True

    def _written(self, task: asyncio.Task[bool]) -> None:
        if self._task is not task:
            return
        self._task = None
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            self._end(exc)
        elif task.result():
            self._end(None)
        else:
            self._kick()  # responses that came while the task was finishing

    def cancel(self) -> None:
        """The transport ended the call: stop reading and writing; the peer is lost."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
        self._end(None, notify=False)

    def _end(self, exc: BaseException | None, *, notify: bool = True) -> None:
        if self.over:
            return
        self.over = True
        on_end = self._on_end
        self._on_end = self._send = self._send_nowait = self._drain = None
        self._sink.listen(None)
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.cancel()
        self._svc._end_stream(self._ident, self._sink, self._live)
        if notify and on_end is not None:
            on_end(exc)


class _OnDemandReader:
    """Runs :meth:`TailnetService._read_requests` as a task only while requests
    wait (see :meth:`TailnetService.run_coordinate`). One task at a time, so
    requests are handled in order; :meth:`kick` is the transport's "input
    arrived" callback. ``cancel`` unregisters it and cancels a running task."""

    __slots__ = ("_svc", "_ident", "_sink", "_read", "_eof", "_ready", "_listen", "_task")

    def __init__(
        self,
        svc: TailnetService,
        ident: StreamIdentity,
        sink: QueueSink,
        read: Callable[[], Awaitable[object]],
        eof: object,
        ready: Callable[[], bool],
        listen: Callable[[Callable[[], None] | None], None] | None,
    ) -> None:
        self._svc = svc
        self._ident = ident
        self._sink = sink
        self._read = read
        self._eof = eof
        self._ready = ready
        self._listen = listen
        self._task: asyncio.Task[None] | None = None
        if listen is not None:
            listen(self.kick)

    def kick(self) -> None:
        if self._task is not None or self._sink.closed or not self._ready():
            return
        task = asyncio.ensure_future(
            self._svc._read_requests(self._ident, self._sink, self._read, self._eof, self._ready)
        )
        self._task = task
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        if self._task is task:
            self._task = None
            if not task.cancelled():
                self.kick()  # input that arrived while the task was finishing

    def cancel(self) -> None:
        if self._listen is not None:
            self._listen(None)  # the callback refers to us: no cycle left behind
        task, self._task = self._task, None
        if task is not None:
            task.cancel()


@dataclass(slots=True)
class _LiveStream:
    principal: Principal
    sink: QueueSink


class TailnetService:
    """The five Tailnet RPCs on top of a coordinator core (see module docstring).

    ``tunnel_authorizer(principal, agent_id)`` decides which agents a *user*
    may tunnel to; if omitted and ``workspaces`` is an
    :class:`InMemoryWorkspaceProvider`, its ``authorize_tunnel`` is used,
    otherwise users may tunnel nowhere.

    ``limits`` (:class:`tailnet.limits.Limits`, public as :attr:`limits`) are
    enforced here and read by the transports (``max_streams_per_session``,
    ``max_streams_per_grpc_connection``); pass the same object to the
    coordinator so ``max_tunnels_per_peer`` matches. ``response_queue_size``,
    if given, overrides ``limits.peer_buffer_responses``.
    """

    def __init__(
        self,
        *,
        coordinator: CoordinatorAPI,
        authenticator: Authenticator,
        derp_maps: DERPMapSource,
        resume: ResumeTokenProvider | None = None,
        workspaces: WorkspaceProvider | None = None,
        tunnel_authorizer: TunnelAuthorizer | None = None,
        telemetry: TelemetryBuffer | None = None,
        server_version: tuple[int, int] = CURRENT_VERSION,
        limits: Limits = DEFAULT_LIMITS,
        response_queue_size: int | None = None,
    ) -> None:
        self.coordinator = coordinator
        self._auth = authenticator
        self._derp_maps = derp_maps
        self._resume = resume
        self._workspaces = workspaces
        if tunnel_authorizer is None and isinstance(workspaces, InMemoryWorkspaceProvider):
            tunnel_authorizer = workspaces.authorize_tunnel
        self._tunnel_auth = tunnel_authorizer
        self.telemetry = telemetry if telemetry is not None else TelemetryBuffer()
        self._server_version = server_version
        if response_queue_size is not None:
            limits = dataclasses.replace(limits, peer_buffer_responses=response_queue_size)
        self.limits = limits
        self._streams: dict[uuid.UUID, _LiveStream] = {}
        #: open Coordinate streams per principal (kind, id), for max_peers_per_principal
        self._principal_streams: dict[tuple[str, uuid.UUID], int] = {}
        self._closing = asyncio.Event()
        #: futures resolved by close() (StreamDERPMaps waiters; no task per stream)
        self._close_waiters: set[asyncio.Future[None]] = set()
        #: the DERP map as sent (home_params present) for one source version,
        #: shared by every StreamDERPMaps stream
        self._derp_sent: tuple[int, pb.DERPMap] | None = None
        #: counters for metrics and the dashboard (tailnet.metrics)
        self.stats = ServiceStats()

    @property
    def closed(self) -> bool:
        return self._closing.is_set()

    def peer_principal(self, peer_id: uuid.UUID) -> Principal | None:
        """The principal of ``peer_id``'s open Coordinate stream on this process, if any."""
        live = self._streams.get(peer_id)
        return live.principal if live is not None else None

    def peers_by_kind(self) -> dict[str, int]:
        """Open Coordinate streams by principal kind (``agent``, ``user``, ``control_plane``)."""
        out: dict[str, int] = {}
        for live in self._streams.values():
            kind = live.principal.kind
            out[kind] = out.get(kind, 0) + 1
        return out

    # -- identity -----------------------------------------------------------
    async def authenticate(
        self, metadata: Mapping[str, str], *, server_version: tuple[int, int] | None = None
    ) -> CallContext:
        """Authenticate a call and negotiate its API version.

        ``server_version`` overrides the version checked against (the agent
        endpoint speaks the Agent API's numbering, :data:`AGENT_API_VERSION`).
        """
        token = token_from_metadata(metadata)
        if token is None:
            self.stats.auth_failures += 1
            raise ServiceError(
                Status.UNAUTHENTICATED,
                "missing session token: send metadata 'authorization: Bearer <token>' "
                "or 'coder-session-token: <token>'",
            )
        try:
            principal = await self._auth.authenticate(token)
        except Exception:
            log.exception("authenticator failed")
            raise ServiceError(Status.UNAVAILABLE, "authentication backend unavailable") from None
        if principal is None:
            self.stats.auth_failures += 1
            raise ServiceError(Status.UNAUTHENTICATED, "invalid or unknown session token")
        try:
            version = check_version(
                metadata.get(MD_VERSION), server_version or self._server_version
            )
        except InvalidVersion as exc:
            raise ServiceError(Status.INVALID_ARGUMENT, str(exc)) from None
        except UnsupportedVersion as exc:
            raise ServiceError(Status.FAILED_PRECONDITION, str(exc)) from None
        return CallContext(principal, version, dict(metadata))

    async def _authorize_tunnel(self, principal: Principal, agent_id: uuid.UUID) -> bool:
        if self._tunnel_auth is None:
            return False
        try:
            return await self._tunnel_auth(principal, agent_id)
        except Exception:  # a failing authorizer denies; details go to the log only
            log.exception("tunnel authorizer failed for agent %s", agent_id)
            return False

    def _peer_id_for_client(self, call: CallContext) -> tuple[uuid.UUID, bool]:
        token = call.metadata.get(MD_RESUME_TOKEN, "").strip()
        if not token or self._resume is None:
            return uuid.uuid4(), False
        try:
            return self._resume.verify(token, call.principal), True
        except LegacyResumeToken:
            return uuid.uuid4(), False
        except InvalidResumeToken as exc:
            self.stats.resume_refused += 1
            raise ServiceError(Status.UNAUTHENTICATED, str(exc)) from None

    async def resolve_stream(self, call: CallContext) -> StreamIdentity:
        """Assign the peer ID and coordination policy of a new Coordinate stream."""
        p = call.principal
        if p.kind == "agent":
            return StreamIdentity(p, p.id, p.name or "agent", AgentPolicy(p.id))
        peer_id, resumed = self._peer_id_for_client(call)
        if p.kind == "control_plane":
            return StreamIdentity(
                p, peer_id, p.name or "control_plane", UnrestrictedPolicy(), resumed
            )
        agent_text = call.metadata.get(MD_AGENT_ID, "").strip()
        if agent_text:
            agent_id = _metadata_uuid(MD_AGENT_ID, agent_text)
            if not await self._authorize_tunnel(p, agent_id):
                self.stats.denied_connect += 1
                raise ServiceError(Status.PERMISSION_DENIED, TUNNEL_DENIED)
            return StreamIdentity(p, peer_id, "client", ClientPolicy(agent_id), resumed)

        async def authorize(agent_id: uuid.UUID) -> bool:
            return await self._authorize_tunnel(p, agent_id)

        return StreamIdentity(p, peer_id, "client", UserPolicy(authorize), resumed)

    # -- Coordinate -----------------------------------------------------------
    @staticmethod
    def _principal_key(p: Principal) -> tuple[str, uuid.UUID]:
        return (p.kind, p.id)

    def principal_streams(self, principal: Principal) -> int:
        """Coordinate streams of ``principal`` open (or opening) right now."""
        return self._principal_streams.get(self._principal_key(principal), 0)

    def _release_principal(self, key: tuple[str, uuid.UUID]) -> None:
        n = self._principal_streams.get(key, 0) - 1
        if n > 0:
            self._principal_streams[key] = n
        else:
            self._principal_streams.pop(key, None)

    async def _reauthorize_inherited(self, ident: StreamIdentity) -> None:
        """Check the tunnels ``ident`` would inherit against ``ident.policy``.

        Only a resumed peer ID, or one whose previous connection is still
        registered (a replacement), can inherit tunnels it did not add itself.
        Each inherited ``peer → dst`` is checked as an AddTunnel(dst) of the new
        stream would be; refused ones are revoked (both ends see DISCONNECTED
        "remove tunnel" if they knew each other) before the new connection
        registers, so its "init" batch never carries their nodes. A tunnel the
        replaced connection (same principal: resume tokens and agent IDs are
        bound to it) adds while this check runs is inherited unchecked; Coder's
        clients re-add all their tunnels after every reconnect anyway. If the
        coordinator cannot answer (HA database down), the stream is refused with
        ``UNAVAILABLE`` rather than inheriting unchecked tunnels.
        """
        coord = self.coordinator
        if not (ident.resumed or coord.is_connected(ident.peer_id)):
            return
        try:
            inherited = await coord.tunnels_from(ident.peer_id)
        except Exception as exc:  # e.g. the HA coordinator's database is unreachable
            log.warning("coordinate: peer %s: cannot read inherited tunnels: %r",
                        ident.peer_id, exc)
            raise ServiceError(
                Status.UNAVAILABLE, "coordinator unavailable: cannot check inherited tunnels"
            ) from None
        if not inherited:
            return
        denied: list[uuid.UUID] = []
        for dst in inherited:
            req = pb.CoordinateRequest(add_tunnel=pb.CoordinateRequest.Tunnel(id=dst.bytes))
            try:
                await ident.policy.authorize(ident.peer_id, req)
            except AuthorizationError:
                denied.append(dst)
        if denied:
            log.info(
                "coordinate: peer %s: %d inherited tunnel(s) not authorized for the new "
                "connection; removed", ident.peer_id, len(denied),
            )
            try:
                await coord.revoke_tunnels(ident.peer_id, denied)
            except Exception as exc:
                log.warning("coordinate: peer %s: cannot revoke inherited tunnels: %r",
                            ident.peer_id, exc)
                raise ServiceError(
                    Status.UNAVAILABLE, "coordinator unavailable: cannot revoke inherited tunnels"
                ) from None

    async def _open_stream(self, ident: StreamIdentity) -> tuple[QueueSink, _LiveStream]:
        if self.closed:
            self.stats.streams_refused["closed"] += 1
            raise ServiceError(Status.UNAVAILABLE, "coordinator is closed")
        key = self._principal_key(ident.principal)
        n = self._principal_streams.get(key, 0)
        cap = self.limits.max_peers_per_principal
        if n >= cap:
            log.info("coordinate: %s %s refused: %d streams open (max_peers_per_principal)",
                     ident.principal.kind, ident.principal.id, n)
            self.stats.streams_refused["limit"] += 1
            raise ServiceError(
                Status.RESOURCE_EXHAUSTED,
                f"too many concurrent Coordinate streams for this principal: {n} open, "
                f"at most {cap} allowed (max_peers_per_principal)",
            )
        self._principal_streams[key] = n + 1  # reserved across the awaits below
        try:
            await self._reauthorize_inherited(ident)
            if self.closed:
                raise ServiceError(Status.UNAVAILABLE, "coordinator is closed")
            lim = self.limits
            sink = QueueSink(lim.peer_buffer_responses, lim.peer_buffer_bytes)
            try:
                self.coordinator.connect(ident.peer_id, ident.name, sink)
            except CoordinatorClosed as exc:
                self.stats.streams_refused["closed"] += 1
                raise ServiceError(Status.UNAVAILABLE, str(exc)) from None
        except BaseException:
            self._release_principal(key)
            raise
        live = _LiveStream(ident.principal, sink)
        self._streams[ident.peer_id] = live
        log.debug("coordinate: peer %s (%s) connected", ident.peer_id, ident.name)
        return sink, live

    def _end_stream(self, ident: StreamIdentity, sink: QueueSink, live: _LiveStream) -> None:
        self.coordinator.lost(ident.peer_id, sink)
        if self._streams.get(ident.peer_id) is live:
            del self._streams[ident.peer_id]
        self._release_principal(self._principal_key(ident.principal))
        log.debug("coordinate: peer %s stream ended (%s)", ident.peer_id, sink.error)

    async def coordinate(
        self, ident: StreamIdentity, requests: AsyncIterator[pb.CoordinateRequest]
    ) -> AsyncIterator[pb.CoordinateResponse]:
        """Run one Coordinate stream; yields responses, may end with :class:`ServiceError`.

        The async-iterator form, for transports that consume generators (WebSocket
        RPC); :meth:`run_coordinate` is the cheaper reader/writer form.
        """
        sink, live = await self._open_stream(ident)
        reader = asyncio.ensure_future(
            self._read_requests(ident, sink, aiter(requests).__anext__, _END)
        )
        try:
            async for resp in sink.drain():
                yield resp
            sink.raise_failure()
        finally:
            reader.cancel()
            self._end_stream(ident, sink, live)

    async def run_coordinate(
        self,
        ident: StreamIdentity,
        read: Callable[[], Awaitable[object]],
        write: Callable[[pb.CoordinateResponse], Awaitable[object]],
        eof: object = None,
        on_open: Callable[[], Awaitable[object]] | None = None,
        *,
        ready: Callable[[], bool] | None = None,
        listen: Callable[[Callable[[], None] | None], None] | None = None,
    ) -> None:
        """Run one Coordinate stream over reader/writer callables; same semantics as
        :meth:`coordinate`.

        With ``ready`` (``read()`` would not wait) and ``listen`` (register a
        callback for "input arrived"; ``None`` unregisters) the requests are read
        on demand: a reader task runs only while requests are waiting, so an idle
        peer costs no task, coroutine frames or waiter (one stream per peer).

        ``read()`` returns the next request, or ``eof`` once the peer half-closed
        (raising ``StopAsyncIteration`` also ends the requests); ``write(resp)``
        sends one response. The calling task is the writer; one reader task runs
        the requests. Returns after a clean end (the close error, if any, was
        written last); raises :class:`ServiceError` for a failure status.
        ``on_open()`` runs once the stream is accepted (the gRPC adapter sends its
        initial metadata then, so a refused stream never looks accepted).
        """
        sink, live = await self._open_stream(ident)
        reader: asyncio.Future[None] | _OnDemandReader | None = None
        try:
            if on_open is not None:
                await on_open()
            if ready is not None and listen is not None:
                reader = _OnDemandReader(self, ident, sink, read, eof, ready, listen)
                reader.kick()
            else:
                reader = asyncio.ensure_future(self._read_requests(ident, sink, read, eof))
            while True:
                resp = sink.pop()
                if resp is not None:
                    await write(resp)
                elif sink.closed:
                    break
                else:
                    await sink.wait()
            if sink.error:
                await write(pb.CoordinateResponse(error=sink.error))
            sink.raise_failure()
        finally:
            if reader is not None:
                reader.cancel()
            self._end_stream(ident, sink, live)

    async def start_coordinate(
        self,
        ident: StreamIdentity,
        *,
        read: Callable[[], Awaitable[object]],
        ready: Callable[[], bool],
        send: Callable[[pb.CoordinateResponse], Awaitable[object]],
        on_end: Callable[[BaseException | None], None],
        eof: object = None,
        send_nowait: Callable[[pb.CoordinateResponse], bool] | None = None,
        drain: Callable[[], Awaitable[object]] | None = None,
    ) -> CoordinateRun:
        """Open a Coordinate stream that runs without a task of its own (see
        :class:`CoordinateRun`); same semantics as :meth:`run_coordinate`.
        Raises :class:`ServiceError` if the stream is refused."""
        sink, live = await self._open_stream(ident)
        run = CoordinateRun(
            self, ident, sink, live, read, ready, eof, send, on_end, send_nowait, drain
        )
        run.input()
        run._kick()
        return run

    def _fail(self, ident: StreamIdentity, sink: QueueSink, status: Status, msg: str) -> None:
        log.info("coordinate: closing peer %s: %s", ident.peer_id, msg)
        sink.fail(status, msg)
        self.coordinator.lost(ident.peer_id, sink, msg)

    async def _read_requests(
        self,
        ident: StreamIdentity,
        sink: QueueSink,
        read: Callable[[], Awaitable[object]],
        eof: object,
        ready: Callable[[], bool] | None = None,
    ) -> None:
        """Reader loop: validate → authorize → handle, until the stream ends (or,
        with ``ready``, until no request is waiting: :class:`_OnDemandReader`)."""
        peer_id = ident.peer_id
        authorize = ident.policy.authorize
        handle = self.coordinator.handle
        limits = self.limits
        stats = self.stats
        clock = time.perf_counter
        try:
            while True:
                if ready is not None and not ready():
                    return  # idle: the on-demand reader starts us again
                try:
                    req = await read()
                except StopAsyncIteration:
                    break
                if req is eof:
                    break
                if sink.closed:
                    return
                if not isinstance(req, pb.CoordinateRequest):
                    raise TypeError(f"read() returned {type(req).__name__}")
                try:
                    validate_request(req, limits)
                except RequestError as exc:
                    self._fail(ident, sink, Status.INVALID_ARGUMENT, str(exc))
                    return
                try:
                    await authorize(peer_id, req)
                except AuthorizationError as exc:
                    stats.denied_request += 1
                    self._fail(ident, sink, Status.PERMISSION_DENIED, exc.wire_message)
                    return
                if sink.closed:
                    return
                stats.requests_received += 1
                if req.HasField("update_self"):
                    stats.node_updates_received += 1
                t0 = clock()
                try:
                    handle(peer_id, sink, req, validated=True)
                except LimitExceeded as exc:
                    self._fail(ident, sink, Status.RESOURCE_EXHAUSTED, str(exc))
                    return
                except RequestError as exc:
                    self._fail(ident, sink, Status.INVALID_ARGUMENT, str(exc))
                    return
                stats.fanout.observe(clock() - t0)
                if req.HasField("disconnect"):
                    sink.close()
                    return
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug or a transport read failure: end only this peer
            log.exception("coordinate: peer %s request loop failed", peer_id)
            if not sink.closed:
                self._fail(ident, sink, Status.INTERNAL, "internal error")
            return
        # Request stream ended without Disconnect: the peer is lost.
        self.coordinator.lost(peer_id, sink)
        sink.close()

    # -- unary/streaming helpers ----------------------------------------------
    async def _or_closing(self, aw: Awaitable[_T]) -> tuple[bool, _T | None]:
        """Await ``aw`` unless the service closes first: (True, result) or (False, None)."""
        task = asyncio.ensure_future(aw)
        closing = asyncio.ensure_future(self._closing.wait())
        try:
            await asyncio.wait({task, closing}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            closing.cancel()
            if not task.done():
                task.cancel()
        if task.done() and not task.cancelled():
            return True, task.result()
        return False, None

    # -- StreamDERPMaps -------------------------------------------------------
    def _derp_map_to_send(self) -> tuple[int, pb.DERPMap]:
        """The source's version and its map with ``home_params`` present: one copy
        per version, shared by every stream (never mutated once made)."""
        src = self._derp_maps
        version = src.version
        sent = self._derp_sent
        if sent is None or sent[0] != version:
            sent = self._derp_sent = (version, with_home_params(src.current()))
        return sent

    def watch_derp_maps(
        self, on_map: Callable[[pb.DERPMap], None], on_end: Callable[[], None]
    ) -> DERPMapWatch:
        """Callback form of :meth:`stream_derp_maps` (see :class:`DERPMapWatch`)."""
        return DERPMapWatch(self, on_map, on_end)

    async def stream_derp_maps(self, call: CallContext) -> AsyncIterator[pb.DERPMap]:
        """Current map at once, then each map that differs from the last one sent.

        Waits with one future registered with the source (next version) and with
        :meth:`close`: no task per stream (one stream per connected peer)."""
        src = self._derp_maps
        version, last = self._derp_map_to_send()
        yield last
        loop = asyncio.get_running_loop()
        waiters = self._close_waiters
        while not self.closed:
            if src.version == version:
                fut: asyncio.Future[None] = loop.create_future()
                src.add_waiter(fut)
                waiters.add(fut)
                try:
                    await fut
                finally:
                    src.remove_waiter(fut)
                    waiters.discard(fut)
                continue
            version, cur = self._derp_map_to_send()
            if cur is not last and not derp_maps_equal(last, cur):
                last = cur
                yield last

    # -- RefreshResumeToken ---------------------------------------------------
    async def refresh_resume_token(self, call: CallContext) -> pb.RefreshResumeTokenResponse:
        """Issue a token for the caller's live Coordinate peer (metadata tailnet-peer-id)."""
        if self._resume is None or call.principal.kind == "agent":
            raise ServiceError(
                Status.UNIMPLEMENTED, "resume tokens not supported on this connection"
            )
        text = call.metadata.get(MD_PEER_ID, "").strip()
        if not text:
            raise ServiceError(
                Status.FAILED_PRECONDITION,
                f"RefreshResumeToken needs metadata {MD_PEER_ID} naming your live "
                "Coordinate stream's peer ID",
            )
        peer_id = _metadata_uuid(MD_PEER_ID, text)
        live = self._streams.get(peer_id)
        if live is None or live.principal != call.principal or live.sink.closed:
            raise ServiceError(
                Status.FAILED_PRECONDITION,
                f"no live Coordinate stream of yours has peer ID {peer_id}",
            )
        self.stats.resume_issued += 1
        return self._resume.issue(peer_id, call.principal)

    def issue_resume_token(self, ident: StreamIdentity) -> pb.RefreshResumeTokenResponse:
        """A token for the peer ID a connection was given at upgrade time.

        Coder's transport fixes the peer ID per WebSocket connection (a fresh
        UUID, or the one a presented resume token carried), so the token does
        not depend on the Coordinate stream being open yet: Coder's client calls
        RefreshResumeToken concurrently with Coordinate, possibly first.
        """
        if self._resume is None or ident.principal.kind == "agent":
            raise ServiceError(
                Status.UNIMPLEMENTED, "resume tokens not supported on this connection"
            )
        self.stats.resume_issued += 1
        return self._resume.issue(ident.peer_id, ident.principal)

    # -- PostTelemetry --------------------------------------------------------
    async def post_telemetry(
        self, call: CallContext, req: pb.TelemetryRequest
    ) -> pb.TelemetryResponse:
        """Validate and record telemetry events."""
        try:
            self.telemetry.record(req)
        except InvalidTelemetry as exc:
            raise ServiceError(Status.INVALID_ARGUMENT, str(exc)) from None
        return pb.TelemetryResponse()

    # -- WorkspaceUpdates -----------------------------------------------------
    async def workspace_updates(
        self, call: CallContext, req: pb.WorkspaceUpdatesRequest
    ) -> AsyncIterator[pb.WorkspaceUpdate]:
        """First a full snapshot, then non-empty diffs of what the caller may read."""
        provider = self._workspaces
        if provider is None or call.principal.kind == "agent":
            raise ServiceError(
                Status.UNIMPLEMENTED, "workspace updates not supported on this connection"
            )
        if len(req.workspace_owner_id) != 16:
            raise ServiceError(
                Status.INVALID_ARGUMENT,
                f"parse workspace owner ID: expected 16 bytes, got {len(req.workspace_owner_id)}",
            )
        owner_id = uuid.UUID(bytes=req.workspace_owner_id)
        subscription = provider.subscribe(owner_id, call.principal)

        async def next_snapshot() -> WorkspaceSnapshot:
            return await anext(subscription)

        prev = EMPTY_SNAPSHOT
        first = True
        try:
            while not self.closed:
                try:
                    ok, snap = await self._or_closing(next_snapshot())
                except StopAsyncIteration:
                    return
                if not ok or snap is None:
                    return
                upd = diff_snapshots(prev, snap)
                prev = snap
                if first or not update_is_empty(upd):
                    first = False
                    yield upd
        finally:
            aclose = getattr(subscription, "aclose", None)
            if aclose is not None:
                try:
                    await aclose()
                except RuntimeError:  # still running (cancelled mid-step): nothing to do
                    pass

    # -- shutdown -------------------------------------------------------------
    def close(self) -> None:
        """Graceful shutdown: peers see LOST "coordinator close", every stream ends."""
        if self._closing.is_set():
            return
        self._closing.set()
        for fut in self._close_waiters:
            if not fut.done():
                fut.set_result(None)
        self.coordinator.close()
        for live in list(self._streams.values()):
            live.sink.close("coordinator closed")
