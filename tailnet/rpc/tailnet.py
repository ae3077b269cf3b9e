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
"""

from __future__ import annotations

from dataclasses import dataclass

from tailnet.service import CallContext, ServiceError, Status, StreamIdentity, TailnetService
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


class _Handlers:
    """The five RPCs bound to one service (methods registered on a Mux)."""

    def __init__(self, service: TailnetService) -> None:
        self.service = service

    async def coordinate(self, call: ServerCall) -> None:
        ctx = _ctx(call)
        bad: list[RpcError] = []
        wrote = False

        async def read() -> object:
            try:
                return await call.recv()
            except RpcError as exc:  # unparsable request: this peer is lost
                bad.append(exc)
                return None

        async def write(resp: pb.CoordinateResponse) -> None:
            nonlocal wrote
            wrote = True
            await call.send(resp)

        def write_nowait(resp: pb.CoordinateResponse) -> bool:
            nonlocal wrote
            if call.send_nowait(resp):
                wrote = True
                return True
            return False

        try:
            await self.service.run_coordinate(
                ctx.ident, read, write, None, write_nowait=write_nowait
            )
        except ServiceError as exc:
            if not wrote:  # refused before it started (e.g. coordinator closed)
                await call.send(pb.CoordinateResponse(error=exc.message))
        if bad:
            # a fresh error: re-raising the stored one would tie this frame to its traceback
            code, message = bad[0].code, bad[0].message
            bad.clear()
            raise RpcError(code, message)

    async def stream_derp_maps(self, call: ServerCall, req: pb.StreamDERPMapsRequest) -> None:
        ctx = _ctx(call)
        try:
            async for m in self.service.stream_derp_maps(ctx.call):
                await call.send(m)
        except ServiceError as exc:
            raise _rpc_error(exc) from None

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
