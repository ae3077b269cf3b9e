"""gRPC (``grpc.aio``) transport for the Tailnet service.

A thin adapter: every method reads the call metadata, asks
:class:`~tailnet.service.TailnetService` to authenticate the call, runs the
matching service method, and maps :class:`~tailnet.service.ServiceError` to
``context.abort(<status>, <message>)`` — the only place errors become gRPC
statuses. Method paths are ``/coder.tailnet.v2.Tailnet/<Method>`` (from the
generated code). On ``Coordinate`` the server sends initial metadata
``tailnet-peer-id: <uuid>`` before any response.

Lifecycle: ``await server.start(host, port)`` (port 0 = ephemeral; the bound
port is in ``server.port``), ``await server.stop(grace)``: first
``service.close()`` — every peer is reported LOST "coordinator close" and every
stream ends after a final ``error`` response — then ``grpc.aio`` stops,
cancelling whatever is left after ``grace`` seconds.

Works on any asyncio loop, including uvloop.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any, NoReturn

import grpc
import grpc.aio

from tailnet.identity import MD_PEER_ID, metadata_dict
from tailnet.service import CallContext, ServiceError, StreamIdentity, TailnetService
from tailnet.v2 import tailnet_pb2 as pb
from tailnet.v2 import tailnet_pb2_grpc as pb_grpc

__all__ = ["MAX_MESSAGE_SIZE", "TailnetServicer", "TailnetGrpcServer"]

#: Like Coder's DRPC reader limit.
MAX_MESSAGE_SIZE = 4 << 20

_Ctx = grpc.aio.ServicerContext
#: What ``context.read()`` returns once the peer half-closes.
_EOF: object = grpc.aio.EOF  # type: ignore[attr-defined]
log = logging.getLogger(__name__)


def _status(err: ServiceError) -> grpc.StatusCode:
    return grpc.StatusCode[err.status.name]


async def _abort(context: _Ctx[Any, Any], exc: Exception, method: str) -> NoReturn:
    """The single place where errors become gRPC statuses.

    :class:`ServiceError` carries its own status and client-safe text; anything
    else is a bug: logged, and reported as INTERNAL without exception text.
    """
    if isinstance(exc, ServiceError):
        await context.abort(_status(exc), exc.message)
    log.exception("%s failed", method, exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, "internal error")


class TailnetServicer(pb_grpc.TailnetServicer):
    """``coder.tailnet.v2.Tailnet`` servicer delegating to a :class:`TailnetService`."""

    def __init__(self, service: TailnetService) -> None:
        self._service = service

    async def _call(self, context: _Ctx[Any, Any]) -> CallContext:
        return await self._service.authenticate(metadata_dict(context.invocation_metadata()))

    async def _resolve(self, context: _Ctx[Any, Any]) -> StreamIdentity:
        return await self._service.resolve_stream(await self._call(context))

    async def Coordinate(  # noqa: N802 (generated name)
        self,
        request_iterator: AsyncIterator[pb.CoordinateRequest],
        context: _Ctx[pb.CoordinateRequest, pb.CoordinateResponse],
    ) -> None:
        # A coroutine (not an async generator): grpc.aio then hands the stream to
        # us through context.read()/context.write(), without its own request and
        # response generators; the service runs one reader task and writes from here.
        try:
            ident = await self._resolve(context)  # the CallContext is not kept alive
            await context.send_initial_metadata(((MD_PEER_ID, str(ident.peer_id)),))
            await self._service.run_coordinate(ident, context.read, context.write, _EOF)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _abort(context, exc, "Coordinate")

    async def StreamDERPMaps(  # noqa: N802
        self,
        request: pb.StreamDERPMapsRequest,
        context: _Ctx[pb.StreamDERPMapsRequest, pb.DERPMap],
    ) -> AsyncIterator[pb.DERPMap]:
        try:
            call = await self._call(context)
            async for m in self._service.stream_derp_maps(call):
                yield m
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _abort(context, exc, "StreamDERPMaps")

    async def RefreshResumeToken(  # noqa: N802
        self,
        request: pb.RefreshResumeTokenRequest,
        context: _Ctx[pb.RefreshResumeTokenRequest, pb.RefreshResumeTokenResponse],
    ) -> pb.RefreshResumeTokenResponse:
        try:
            return await self._service.refresh_resume_token(await self._call(context))
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _abort(context, exc, "RefreshResumeToken")

    async def PostTelemetry(  # noqa: N802
        self,
        request: pb.TelemetryRequest,
        context: _Ctx[pb.TelemetryRequest, pb.TelemetryResponse],
    ) -> pb.TelemetryResponse:
        try:
            return await self._service.post_telemetry(await self._call(context), request)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _abort(context, exc, "PostTelemetry")

    async def WorkspaceUpdates(  # noqa: N802
        self,
        request: pb.WorkspaceUpdatesRequest,
        context: _Ctx[pb.WorkspaceUpdatesRequest, pb.WorkspaceUpdate],
    ) -> AsyncIterator[pb.WorkspaceUpdate]:
        try:
            call = await self._call(context)
            async for upd in self._service.workspace_updates(call, request):
                yield upd
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _abort(context, exc, "WorkspaceUpdates")


class TailnetGrpcServer:
    """A ``grpc.aio`` server hosting one :class:`TailnetService`."""

    def __init__(self, service: TailnetService) -> None:
        self.service = service
        self._server: grpc.aio.Server | None = None
        self.port = 0
        self.host = ""

    @property
    def target(self) -> str:
        """``host:port`` to dial (IPv6 hosts bracketed)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        """Bind ``host:port`` (0 = ephemeral) and start serving."""
        if self._server is not None:
            raise RuntimeError("server already started")
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_SIZE),
                ("grpc.max_send_message_length", MAX_MESSAGE_SIZE),
                ("grpc.so_reuseport", 0),
            ]
        )
        pb_grpc.add_TailnetServicer_to_server(  # type: ignore[no-untyped-call]
            TailnetServicer(self.service), server
        )
        bind_host = f"[{host}]" if ":" in host else host
        bound = server.add_insecure_port(f"{bind_host}:{port}")
        if bound == 0:
            raise OSError(f"cannot bind gRPC server to {bind_host}:{port}")
        await server.start()
        self._server, self.host, self.port = server, host, bound

    async def stop(self, grace: float = 1.0) -> None:
        """Close the service (peers LOST "coordinator close"), then stop gRPC."""
        self.service.close()
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
