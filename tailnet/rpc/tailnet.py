"""The ``coder.tailnet.v2.Tailnet`` service as DRPC handlers on a :class:`~tailnet.rpc.mux.Mux`.

Each WebSocket connection carries a :class:`TailnetContext`: the caller's
identity, API version and peer identity, all fixed by the HTTP upgrade
(coder-transport.md §4.2, §4.5). Handlers call the transport-independent
:class:`~tailnet.service.TailnetService`, so semantics equal the gRPC adapter's;
only the endings are DRPC's, as a Coder server ends them (§3.9, §3.11):

* Coordinate, StreamDERPMaps, WorkspaceUpdates end with **Close** (Coder's
  handlers ``defer stream.Close()``); a coordinator-side end (Disconnect
  answered, overwrite, slow consumer, policy violation, shutdown) sends the
  final ``CoordinateResponse.error`` first where the service has one;
* RefreshResumeToken, PostTelemetry are unary: Message then CloseSend, or an
  Error packet (code 12 for "not supported here", 0 otherwise);
* RefreshResumeToken signs the connection's peer ID, whatever the order of
  streams (Coder's client calls it concurrently with Coordinate);
* on the agent endpoint (``/me/rpc``) RefreshResumeToken and WorkspaceUpdates
  answer code 12 (Coder leaves their providers unset there);
* a request that does not parse ends only its call with an Error packet
  (Coordinate: the peer is LOST to its tunnel peers first).

Coordinate and StreamDERPMaps are *held* calls (one of each per connected
peer): once started, no task or coroutine frame waits for them; short tasks
run only while requests, responses or a new map are in flight
(:class:`~tailnet.service.CoordinateRun`, :class:`~tailnet.service.DERPMapWatch`).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from tailnet.service import (
    CallContext,
    CoordinateRun,
    DERPMapWatch,
    ServiceError,
    Status,
    StreamIdentity,
    TailnetService,
)
from tailnet.v2 import tailnet_pb2 as pb

from .mux import UNIMPLEMENTED, MethodKind, Mux, RpcError, ServerCall
from .tailnet_client import (
    METHOD_COORDINATE,
    METHOD_POST_TELEMETRY,
    METHOD_REFRESH_RESUME_TOKEN,
    METHOD_STREAM_DERP_MAPS,
    METHOD_WORKSPACE_UPDATES,
)

__all__ = ["TailnetContext", "register_tailnet"]


@dataclass(frozen=True, slots=True)
class TailnetContext:
    """Per-connection identity (``call.context`` of every Tailnet handler)."""

    call: CallContext
    ident: StreamIdentity
    agent_api: bool = False


def _rpc_error(exc: ServiceError) -> RpcError:
    code = UNIMPLEMENTED if exc.status is Status.UNIMPLEMENTED else 0
    return RpcError(code, exc.message)


def _ctx(call: ServerCall) -> TailnetContext:
    ctx = call.context
    if not isinstance(ctx, TailnetContext):
        raise RpcError(UNIMPLEMENTED, "Unimplemented")
    return ctx


class _CoordinateCall:
    """A held Coordinate call driven by a :class:`~tailnet.service.CoordinateRun`.

    Input (a request, CloseSend, or the call's end) reaches ``on_input``: the
    run reads on demand, or is cancelled once the peer ended the call. When the
    service ends the stream (``on_end``) the call ends with Close (Coder's
    ``defer stream.Close()``; also after a failure's final error response), or
    with an Error packet if a request did not parse (the peer is lost first).
    """

    __slots__ = ("call", "run", "bad")

    def __init__(self, call: ServerCall) -> None:
        self.call = call
        self.run: CoordinateRun | None = None
        self.bad: tuple[int, str] | None = None

    async def read(self) -> object:
        try:
            return await self.call.recv()
        except RpcError as exc:  # unparsable request: this peer is lost
            self.bad = (exc.code, exc.message)
            return None

    def ready(self) -> bool:
        return self.call.ready

    def on_input(self) -> None:
        run = self.run
        if run is None:
            return
        if self.call.ended:
            self.run = None
            self.call.listen(None)
            run.cancel()
        else:
            run.input()

    def on_end(self, exc: BaseException | None) -> None:
        self.run = None
        call = self.call
        bad, self.bad = self.bad, None
        if bad is not None:
            call.finish(RpcError(*bad))
        elif exc is None or isinstance(exc, ServiceError):
            call.finish()
        else:
            call.finish(exc)


class _DERPMapsCall:
    """A held StreamDERPMaps call fed by a :class:`~tailnet.service.DERPMapWatch`.

    A map is sent from a task that exists only while it is being sent (the
    peer's window may be closed); when it is out the watch is resumed. The call
    ends with Close when the service closes (``end``); if the peer ends the call
    (``on_input`` sees it ended) or a send fails, the watch is cancelled.
    ``stop`` drops every reference between the call, the watch and this object.
    """

    __slots__ = ("call", "watch", "task")

    def __init__(self, call: ServerCall) -> None:
        self.call = call
        self.watch: DERPMapWatch | None = None
        self.task: asyncio.Task[None] | None = None

    def send(self, m: pb.DERPMap) -> None:
        task = asyncio.ensure_future(self.call.send(m))
        self.task = task
        task.add_done_callback(self._sent)

    def _sent(self, task: asyncio.Task[None]) -> None:
        if self.task is not task:
            return
        self.task = None
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            self.stop()
            self.call.finish(exc)  # ConnectionError: the call is already over
            return
        if self.watch is not None:
            self.watch.resume()

    def end(self) -> None:
        """The service closed: end with Close (as the generator's return did)."""
        self.stop()
        self.call.finish()

    def on_input(self) -> None:
        if self.call.ended:
            self.stop()

    def stop(self) -> None:
        watch, self.watch = self.watch, None
        if watch is not None:
            watch.cancel()
        task, self.task = self.task, None
        if task is not None:
            task.cancel()
        self.call.listen(None)


class _Handlers:
    """The five RPCs bound to one service (methods registered on a Mux)."""

    def __init__(self, service: TailnetService) -> None:
        self.service = service

    async def coordinate(self, call: ServerCall) -> None:
        """Open the stream, then hold the call: no task while the peer is idle
        (:class:`_CoordinateCall`, :class:`~tailnet.service.CoordinateRun`)."""
        ctx = _ctx(call)
        h = _CoordinateCall(call)
        try:
            run = await self.service.start_coordinate(
                ctx.ident, read=h.read, ready=h.ready, send=call.send, on_end=h.on_end,
                send_nowait=call.send_nowait, drain=call.drain,
            )
        except ServiceError as exc:  # refused before it started (e.g. coordinator closed)
            await call.send(pb.CoordinateResponse(error=exc.message))
            return
        h.run = run
        call.hold()
        call.listen(h.on_input)
        if call.ended:  # ended while we were starting: the listener missed it
            h.on_input()

    async def stream_derp_maps(self, call: ServerCall, req: pb.StreamDERPMapsRequest) -> None:
        """The current map, then the call is held open without a task: each change
        is sent from a short task (:class:`_DERPMapsCall`)."""
        _ctx(call)
        pusher = _DERPMapsCall(call)
        watch = self.service.watch_derp_maps(pusher.send, pusher.end)
        pusher.watch = watch
        try:
            await call.send(watch.first())
        except BaseException:
            pusher.stop()
            raise
        call.hold()
        call.listen(pusher.on_input)
        watch.resume()

    async def refresh_resume_token(
        self, call: ServerCall, req: pb.RefreshResumeTokenRequest
    ) -> pb.RefreshResumeTokenResponse:
        ctx = _ctx(call)
        if ctx.agent_api:
            raise RpcError(UNIMPLEMENTED, "Unimplemented")
        try:
            return self.service.issue_resume_token(ctx.ident)
        except ServiceError as exc:
            raise _rpc_error(exc) from None

    async def post_telemetry(
        self, call: ServerCall, req: pb.TelemetryRequest
    ) -> pb.TelemetryResponse:
        try:
            return await self.service.post_telemetry(_ctx(call).call, req)
        except ServiceError as exc:
            raise _rpc_error(exc) from None

    async def workspace_updates(
        self, call: ServerCall, req: pb.WorkspaceUpdatesRequest
    ) -> None:
        ctx = _ctx(call)
        if ctx.agent_api:
            raise RpcError(UNIMPLEMENTED, "Unimplemented")
        try:
            async for upd in self.service.workspace_updates(ctx.call, req):
                await call.send(upd)
        except ServiceError as exc:
            raise _rpc_error(exc) from None


def register_tailnet(mux: Mux, service: TailnetService) -> Mux:
    """Register the Tailnet service's five methods on ``mux``; returns ``mux``."""
    h = _Handlers(service)
    mux.register(METHOD_COORDINATE, MethodKind.BIDI, pb.CoordinateRequest, h.coordinate,
                 end_with_close=True)
    mux.register(METHOD_STREAM_DERP_MAPS, MethodKind.SERVER_STREAM, pb.StreamDERPMapsRequest,
                 h.stream_derp_maps, end_with_close=True)
    mux.register(METHOD_REFRESH_RESUME_TOKEN, MethodKind.UNARY, pb.RefreshResumeTokenRequest,
                 h.refresh_resume_token)
    mux.register(METHOD_POST_TELEMETRY, MethodKind.UNARY, pb.TelemetryRequest, h.post_telemetry)
    mux.register(METHOD_WORKSPACE_UPDATES, MethodKind.SERVER_STREAM, pb.WorkspaceUpdatesRequest,
                 h.workspace_updates, end_with_close=True)
    return mux
