"""Conformance backends that run the coordinator cases through real transports.

A :class:`TransportBackend` owns one :class:`~tailnet.stack.TailnetStack`
(in-memory coordinator, sockets on 127.0.0.1) and turns every ``Peer`` of a
case into one Coordinate stream of its own, as the control-plane principal
(admin token, unrestricted policy):

* ``drpc``: one WebSocket to ``/api/v2/tailnet`` per peer, yamux + DRPC
  (:class:`~tailnet.rpc.tailnet_client.TailnetClient`);
* ``grpc``: one ``Coordinate`` call per peer on a shared ``grpc.aio`` channel.

The peer ID a case chooses is imposed with a resume token minted by the
stack's service for that peer ID (through :meth:`TailnetService.issue_resume_token`,
so a token bound to the principal keeps working); the server's answer
(``Tailnet-Peer-Id`` header / ``tailnet-peer-id`` metadata) is checked.

The ``CoordLike`` verbs are synchronous in the cases; here each queues an
operation on the peer's ordered worker:

=============  ===========================================================
``connect``    dial, start the Coordinate stream (Invoke with the first recv)
``handle``     send the request (ignored once the stream is over, as the core
               ignores requests of a connection that is no longer current)
``lost``       a round trip (every earlier request applied, as with the
               core's ordered verbs), then drop the connection without a
               goodbye: the TCP connection is aborted (DRPC: no WebSocket
               close frame) / the call is cancelled (gRPC: RST_STREAM). The
               sink is closed locally with ``error``: a dropped peer hears
               nothing from the server, the reason is its own.
``close``      the stack's service closes (coordinator close), at once
=============  ===========================================================

Responses go to the peer's sink. The end of the stream is
``sink.close(error)``: ``error`` is the final error-only response the server
sent just before ending the stream (removed from the recorded responses, so
the sink reads as the core's ``close(error)``), or the transport's error text
(DRPC Error packet / gRPC status details); "ready for handshake error: you do
not share a tunnel …" responses are never close errors (the core sends them
on live streams only).

:meth:`TransportBackend.settle` returns once the server applied every
operation queued so far: per peer, after its earlier operations, a
ReadyForHandshake to a marker ID nobody uses, whose error response (filtered
out of the sink) comes back through the coordinator once every earlier
request of that stream was handled; for a stream that sent Disconnect, its
end; for a dropped one, the coordinator no longer having the peer (or a
newer connection of the same ID having been applied) — polled, bounded.
"""

from __future__ import annotations

import asyncio
import dataclasses
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Final, Protocol

import grpc
import grpc.aio

from tailnet.config import StackConfig
from tailnet.core import READY_FOR_HANDSHAKE_ERROR, PeerSink
from tailnet.identity import MD_AUTHORIZATION, MD_PEER_ID, MD_RESUME_TOKEN, MD_VERSION
from tailnet.rpc.mux import RpcError
from tailnet.rpc.tailnet_client import TailnetClient
from tailnet.rpc.websocket import DialError
from tailnet.service import StreamIdentity, TailnetService
from tailnet.stack import TailnetStack
from tailnet.v2 import tailnet_pb2 as pb
from tailnet.v2 import tailnet_pb2_grpc as pb_grpc
from tailnet.version import CURRENT_VERSION, format_version

from .cases import CASE_LIMITS, TRANSPORT_BACKENDS, WAIT, RecSink

__all__ = ["TransportBackend", "open_transport_backend"]

#: Bound on one queued operation (a dial, waiting for a dial slot included; a send;
#: a round trip): the cases' own bound, a thousand dials on a loaded machine take a while.
OP_TIMEOUT: Final = WAIT
#: Dials in flight at once (a case may join a thousand peers).
MAX_DIALS: Final = 32

Req = pb.CoordinateRequest
_NO_TUNNEL: Final = f"{READY_FOR_HANDSHAKE_ERROR}: you do not share a tunnel with "


class _Stream(Protocol):
    """One Coordinate call as the backend drives it."""

    async def send(self, req: pb.CoordinateRequest) -> None: ...

    def responses(self) -> AsyncIterator[pb.CoordinateResponse]:
        """Every response, then the end (an exception: the transport's error)."""
        ...

    def abort(self) -> None:
        """Drop the peer without a goodbye."""
        ...

    async def close(self) -> None:
        """Release everything (the stream is over or abandoned)."""
        ...


class _DrpcStream:
    def __init__(self, client: TailnetClient) -> None:
        self.client = client
        self.call = client.coordinate()

    async def send(self, req: pb.CoordinateRequest) -> None:
        await self.call.send(req)

    async def responses(self) -> AsyncIterator[pb.CoordinateResponse]:
        while True:
            resp = await self.call.recv()  # the first recv writes the Invoke
            if resp is None:
                return
            yield resp

    def abort(self) -> None:
        self.client.rpc.pipe.abort()  # TCP gone, no WebSocket close frame

    async def close(self) -> None:
        await self.call.close()
        await self.client.close()


class _GrpcStream:
    def __init__(self, stub: pb_grpc.TailnetStub, metadata: tuple[tuple[str, str], ...]) -> None:
        self._q: asyncio.Queue[pb.CoordinateRequest | None] = asyncio.Queue()
        self.call = stub.Coordinate(self._requests(), metadata=metadata)

    async def _requests(self) -> AsyncIterator[pb.CoordinateRequest]:
        while (req := await self._q.get()) is not None:
            yield req

    async def send(self, req: pb.CoordinateRequest) -> None:
        if self.call.done():
            raise ConnectionError("Coordinate call is over")
        self._q.put_nowait(req)

    async def responses(self) -> AsyncIterator[pb.CoordinateResponse]:
        # The iterator, not call.read(): read() drops messages still buffered
        # once the status has arrived.
        async for resp in self.call:
            yield resp

    def abort(self) -> None:
        self.call.cancel()

    async def close(self) -> None:
        self._q.put_nowait(None)
        if not self.call.done():
            self.call.cancel()


Op = Callable[[], Awaitable[None]]


class _Conn:
    """One peer connection: an ordered operation worker plus a response reader."""

    def __init__(self, backend: TransportBackend, seq: int, peer_id: uuid.UUID, name: str,
                 sink: RecSink) -> None:
        self.backend = backend
        self.seq = seq
        self.peer_id = peer_id
        self.name = name
        self.sink = sink
        self.stream: _Stream | None = None
        self.ended = asyncio.Event()  # the stream is over (server end, error or drop)
        self.disconnecting = False  # a Disconnect was sent: the server ends the stream
        self.aborted = False  # dropped by ``lost``
        self.applied = False  # a round trip completed: the server has this connection
        self.closing = False  # teardown
        self.failure: BaseException | None = None
        self._markers_sent = 0
        self._markers_seen = 0
        self._progress = asyncio.Event()
        self._ops: asyncio.Queue[tuple[str, Op, asyncio.Future[None] | None]] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        self._worker = loop.create_task(self._work())
        self._reader: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"<peer {self.name} {str(self.peer_id)[:8]} #{self.seq}>"

    # ------------------------------------------------------------ operations

    def queue(self, what: str, op: Op, *, wait: bool = False) -> asyncio.Future[None] | None:
        fut = asyncio.get_running_loop().create_future() if wait else None
        self._ops.put_nowait((what, op, fut))
        return fut

    async def _work(self) -> None:
        while True:
            what, op, fut = await self._ops.get()
            try:
                if self.failure is not None:
                    raise RuntimeError(f"{self!r}: earlier operation failed") from self.failure
                await asyncio.wait_for(op(), OP_TIMEOUT)
            except Exception as exc:
                if self.failure is None:
                    self.failure = exc
                    self.backend.failures.append(f"{self!r} {what}: {exc!r}")
                if fut is not None and not fut.done():
                    fut.set_exception(exc)
            else:
                if fut is not None and not fut.done():
                    fut.set_result(None)

    async def op_connect(self) -> None:
        try:
            self.stream = await self.backend.open(self.peer_id)
        except _Refused as exc:  # the server refused the stream: it ends at once
            self.ended.set()
            self.sink.close(exc.message)
            return
        self._reader = asyncio.get_running_loop().create_task(self._read(self.stream))

    async def op_send(self, req: pb.CoordinateRequest) -> None:
        if self.ended.is_set() or self.aborted or self.stream is None:
            return  # as the core ignores requests of a connection that is not current
        if req.HasField("disconnect"):
            self.disconnecting = True
        try:
            await self.stream.send(req)
        except (ConnectionError, grpc.aio.AioRpcError):
            # Only acceptable because the server ended the stream meanwhile.
            await asyncio.wait_for(self.ended.wait(), OP_TIMEOUT)

    async def op_lost(self, error: str | None) -> None:
        if self.ended.is_set() or self.aborted or self.stream is None:
            return  # not current: the core ignores it too
        if not self.disconnecting:
            await self._round_trip()
        if self.ended.is_set():
            return
        self.aborted = True
        self.stream.abort()
        self.sink.close(error)

    async def op_settle(self) -> None:
        if self.ended.is_set() or self.stream is None:
            return
        if self.aborted:
            await self._wait_removed()
        elif self.disconnecting:
            await self.ended.wait()
        else:
            await self._round_trip()

    # ------------------------------------------------------------ markers

    async def _round_trip(self) -> None:
        assert self.stream is not None
        self._markers_sent += 1
        n = self._markers_sent
        marker = Req(ready_for_handshake=[Req.ReadyForHandshake(id=self.backend.marker.bytes)])
        try:
            await self.stream.send(marker)
        except (ConnectionError, grpc.aio.AioRpcError):
            pass  # the stream is ending: wait for that below
        while self._markers_seen < n and not self.ended.is_set():
            self._progress.clear()
            await self._progress.wait()
        if self._markers_seen >= n:
            self.applied = True

    async def _wait_removed(self) -> None:
        """Poll the coordinator until this dropped connection has been removed."""
        coord = self.backend.service.coordinator
        newer = [c for c in self.backend.conns if c.peer_id == self.peer_id and c.seq > self.seq]
        while True:
            if all(p.id != self.peer_id for p in coord.peers()):
                return
            if any(c.applied for c in newer):
                return  # replaced: removing the dropped one is a no-op now
            await asyncio.sleep(0.005)

    # ------------------------------------------------------------ responses

    async def _read(self, stream: _Stream) -> None:
        sink = self.sink
        marker_text = _NO_TUNNEL + f'"{self.backend.marker}"'
        last: pb.CoordinateResponse | None = None
        error: str | None = None
        try:
            async for resp in stream.responses():
                if resp.error == marker_text and not resp.peer_updates:
                    self._markers_seen += 1
                    self._progress.set()
                    continue
                last = resp
                sink.send(resp)
        except RpcError as exc:  # DRPC Error packet
            error = exc.message
        except grpc.aio.AioRpcError as exc:  # gRPC status other than OK
            error = exc.details() or exc.code().name
        except ConnectionError as exc:  # DRPC: the connection went away under the call
            error = str(exc)
        except asyncio.CancelledError:  # gRPC: our own cancel (lost, teardown)
            if not (self.aborted or self.closing):
                raise
        finally:
            self.ended.set()
            self._progress.set()
            if not self.aborted:
                if (
                    error is None
                    and last is not None
                    and last.error
                    and not last.peer_updates
                    and not last.error.startswith(_NO_TUNNEL)
                    and sink.responses
                    and sink.responses[-1] is last
                ):
                    sink.responses.pop()  # the core's close(error), as the wire carries it
                    error = last.error
                sink.close(error)
        await stream.close()  # release the connection (the call is over)

    # ------------------------------------------------------------ teardown

    async def shutdown(self) -> None:
        self.closing = True
        self._worker.cancel()
        try:
            await self._worker
        except asyncio.CancelledError:
            pass
        if self.stream is not None:
            try:
                await asyncio.wait_for(self.stream.close(), 5.0)
            except Exception as exc:  # noqa: BLE001 - teardown must reach every peer
                self.backend.failures.append(f"{self!r} close: {exc!r}")
        if self._reader is not None:
            try:
                await asyncio.wait_for(self._reader, 5.0)
            except (Exception, asyncio.CancelledError) as exc:
                if not isinstance(exc, (ConnectionError, asyncio.CancelledError)):
                    self.backend.failures.append(f"{self!r} reader: {exc!r}")


class _TransportCoord:
    """The ``CoordLike`` verbs of one transport backend (see module docstring)."""

    def __init__(self, backend: TransportBackend) -> None:
        self.b = backend

    def connect(self, peer_id: uuid.UUID, name: str, sink: PeerSink) -> None:
        if not isinstance(sink, RecSink) or sink.capacity is not None:
            raise NotImplementedError("transport backends take unbounded RecSinks only")
        conn = _Conn(self.b, len(self.b.conns), peer_id, name, sink)
        self.b.conns.append(conn)
        self.b.by_sink[id(sink)] = conn
        conn.queue("connect", conn.op_connect)

    def _conn(self, sink: PeerSink) -> _Conn:
        return self.b.by_sink[id(sink)]

    def handle(self, peer_id: uuid.UUID, sink: PeerSink, req: pb.CoordinateRequest) -> None:
        conn = self._conn(sink)
        assert conn.peer_id == peer_id
        r = Req()
        r.CopyFrom(req)
        conn.queue("send", lambda: conn.op_send(r))

    def lost(self, peer_id: uuid.UUID, sink: PeerSink, error: str | None = None) -> None:
        conn = self._conn(sink)
        assert conn.peer_id == peer_id
        conn.queue("lost", lambda: conn.op_lost(error))

    def close(self) -> None:
        self.b.service.close()


class TransportBackend:
    """A conformance backend over one transport of a running stack (module docstring)."""

    replicas = 1
    transport = True

    def __init__(self, kind: str, stack: TailnetStack, base_ident: StreamIdentity) -> None:
        if kind not in TRANSPORT_BACKENDS:
            raise ValueError(f"unknown transport {kind!r}")
        self.kind = kind
        self.stack = stack
        self.base_ident = base_ident
        self.marker = uuid.uuid4()  # never a peer: ReadyForHandshake to it is a round trip
        self.conns: list[_Conn] = []
        self.by_sink: dict[int, _Conn] = {}
        self.failures: list[str] = []
        self._coord = _TransportCoord(self)
        self._dials = asyncio.Semaphore(MAX_DIALS)
        self._channel: grpc.aio.Channel | None = None
        self._stub: pb_grpc.TailnetStub | None = None
        if kind == "grpc":
            assert stack.grpc_target is not None
            self._channel = grpc.aio.insecure_channel(stack.grpc_target)
            self._stub = pb_grpc.TailnetStub(self._channel)  # type: ignore[no-untyped-call]

    @property
    def service(self) -> TailnetService:
        assert self.stack.service is not None
        return self.stack.service

    def coord(self, i: int) -> _TransportCoord:
        return self._coord

    def resume_token(self, peer_id: uuid.UUID) -> str:
        """A token the server accepts as ``peer_id`` (minted by the service)."""
        ident = dataclasses.replace(self.base_ident, peer_id=peer_id)
        return str(self.service.issue_resume_token(ident).token)

    async def open(self, peer_id: uuid.UUID) -> _Stream:
        token = self.resume_token(peer_id)
        version = format_version(CURRENT_VERSION)
        async with self._dials:
            if self.kind == "drpc":
                query = urllib.parse.urlencode({"version": version, "resume_token": token})
                try:
                    client = await TailnetClient.connect(
                        f"{self.stack.ws_url}/api/v2/tailnet?{query}", self.stack.admin_token,
                        open_timeout=OP_TIMEOUT,
                    )
                except DialError as exc:  # refused before the upgrade (503, 429)
                    raise _Refused(exc.message) from None
                if client.peer_id != str(peer_id):
                    await client.close()
                    raise AssertionError(f"server assigned peer {client.peer_id}, not {peer_id}")
                return _DrpcStream(client)
            assert self._stub is not None
            stream = _GrpcStream(self._stub, (
                (MD_AUTHORIZATION, f"Bearer {self.stack.admin_token}"),
                (MD_RESUME_TOKEN, token),
                (MD_VERSION, version),
            ))
            md = dict(await stream.call.initial_metadata() or ())
            if MD_PEER_ID not in md and stream.call.done():  # refused: status, no metadata
                raise _Refused(await stream.call.details() or "refused")
            if md.get(MD_PEER_ID) != str(peer_id):
                await stream.close()
                raise AssertionError(f"server assigned peer {md.get(MD_PEER_ID)}, not {peer_id}")
            return stream

    async def settle(self) -> None:
        futs = [c.queue("settle", c.op_settle, wait=True) for c in self.conns]
        done = [f for f in futs if f is not None]
        if done:
            await asyncio.wait_for(asyncio.gather(*done), WAIT)

    async def aclose(self) -> None:
        """Close every stream, the channel and the stack; ``failures`` then lists
        whatever went wrong in the backend itself (failed operations, a sink closed twice)."""
        try:
            await asyncio.gather(*(c.shutdown() for c in self.conns))
            if self._channel is not None:
                await self._channel.close(None)
        finally:
            await self.stack.stop(grace=2.0)
        for c in self.conns:
            if c.sink.close_calls > 1:
                self.failures.append(f"{c!r}: sink closed {c.sink.close_calls} times")


class _Refused(Exception):
    """The server refused a Coordinate stream (its message is the refusal's text)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


async def open_transport_backend(kind: str) -> TransportBackend:
    """Start a stack serving ``kind`` on 127.0.0.1 and wrap it as a backend."""
    stack = TailnetStack(StackConfig(
        http_addr="127.0.0.1:0",
        grpc_addr="127.0.0.1:0" if kind == "grpc" else None,
        stun_addr=None,
        data_dir=None,
        # every peer of a case is the admin principal; big_init opens over a thousand
        max_peers_per_principal=4096,
        max_streams_per_grpc_connection=4096,  # the gRPC backend shares one channel
        max_tunnels_per_peer=CASE_LIMITS.max_tunnels_per_peer,
    ))
    await stack.start()
    try:
        service = stack.service
        assert service is not None
        call = await service.authenticate({MD_AUTHORIZATION: f"Bearer {stack.admin_token}"})
        base = await service.resolve_stream(call)
        return TransportBackend(kind, stack, base)
    except BaseException:
        await stack.stop()
        raise
