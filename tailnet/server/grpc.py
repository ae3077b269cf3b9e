"""gRPC (``grpc.aio``) transport for the Tailnet service.

A thin adapter: every method reads the call metadata, asks
:class:`~tailnet.service.TailnetService` to authenticate the call, runs the
matching service method, and maps :class:`~tailnet.service.ServiceError` to
the call's status and details (:func:`_end_with_error`, the only place errors
become gRPC statuses). Method paths are ``/coder.tailnet.v2.Tailnet/<Method>``
(from the generated code). On ``Coordinate`` the server sends initial metadata
``tailnet-peer-id: <uuid>`` before any response.

Errors end a call with ``context.set_code()``/``set_details()`` and a normal
return, never ``context.abort()``: grpc.aio keeps the ``AbortError`` on the
call's state, and its traceback (frames holding the context) ties the call into
a reference cycle that only a full GC pass would free.

Revocation: each streaming call (Coordinate, StreamDERPMaps, WorkspaceUpdates)
is registered under its token in ``sessions``
(:class:`~tailnet.identity.SessionRegistry`) while it runs; revoking the token
cancels the call's task and the call ends with UNAUTHENTICATED "session token
revoked" (a Coordinate peer is then LOST to its tunnel peers).

Limits: ``grpc.max_concurrent_streams`` = ``service.limits.max_streams_per_grpc_connection``
(HTTP/2 SETTINGS: a client's further calls on that connection wait until one
ends); ``RESOURCE_EXHAUSTED`` when a principal has too many Coordinate streams.

Lifecycle: ``await server.start(host, port)`` (port 0 = ephemeral; the bound
port is in ``server.port``), ``await server.stop(grace)``: first
``service.close()`` — every peer is reported LOST "coordinator close" and every
stream ends after a final ``error`` response — then ``grpc.aio`` stops,
cancelling whatever is left after ``grace`` seconds.

Works on any asyncio loop, including uvloop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio

from tailnet.identity import MD_PEER_ID, SessionRegistry, metadata_dict, token_from_metadata
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


class _WriteFailed(Exception):
    """``context.write`` failed: the transport ended the call (the client
    cancelled it, reset the stream or dropped the connection), typically while
    the write was blocked by a client that had stopped reading."""


def _end_with_error(context: _Ctx[Any, Any], exc: Exception, method: str) -> None:
    """The single place where errors become gRPC statuses; the handler then returns.

    :class:`ServiceError` carries its own status and client-safe text; a failed
    write (:class:`_WriteFailed`) is the client's end of the call; anything
    else is a bug: logged, and reported as INTERNAL without exception text.
    (grpc.aio discards a unary handler's return value when the code is not OK.)
    """
    if isinstance(exc, ServiceError):
        context.set_code(_status(exc))
        context.set_details(exc.message)
        return
    if isinstance(exc, _WriteFailed):
        # The client cancelled or dropped the call while we were writing to it
        # (a write blocked by a peer that stopped reading fails then): an
        # ordinary end, not a bug, and nobody is left to tell.
        log.debug("%s: write failed, the client went away (%s)", method, exc)
        return
    log.error("%s failed", method, exc_info=exc)
    context.set_code(grpc.StatusCode.INTERNAL)
    context.set_details("internal error")


_REVOKED = "session token revoked"


class _Revocation:
    """Registers the running call's task under its token; revoking cancels the task.

    Released by :meth:`close` (the registry then holds nothing of the call).
    """

    __slots__ = ("fired", "_task", "_unregister")

    def __init__(self, sessions: SessionRegistry | None, context: _Ctx[Any, Any]) -> None:
        self.fired = False
        self._task = asyncio.current_task()
        token = token_from_metadata(metadata_dict(context.invocation_metadata()))
        self._unregister = (
            sessions.open(token, self._fire) if sessions is not None and token else None
        )

    def _fire(self) -> None:
        self.fired = True
        if self._task is not None:
            self._task.cancel()

    def ended_by_revocation(self, context: _Ctx[Any, Any]) -> bool:
        """After a CancelledError: if this revocation caused it, take the cancellation
        back and set UNAUTHENTICATED on the call (the handler then returns)."""
        if not self.fired:
            return False
        task = asyncio.current_task()
        if task is not None:
            task.uncancel()
        context.set_code(grpc.StatusCode.UNAUTHENTICATED)
        context.set_details(_REVOKED)
        return True

    def close(self) -> None:
        if self._unregister is not None:
            self._unregister()
        self._unregister = self._task = None


class TailnetServicer(pb_grpc.TailnetServicer):
    """``coder.tailnet.v2.Tailnet`` servicer delegating to a :class:`TailnetService`."""

    def __init__(self, service: TailnetService, sessions: SessionRegistry | None = None) -> None:
        self._service = service
        self._sessions = sessions

    async def _call(self, context: _Ctx[Any, Any]) -> CallContext:
        try:
            return await self._service.authenticate(metadata_dict(context.invocation_metadata()))
        except ServiceError as exc:
            log.info("auth failed: grpc from %s: %s", context.peer(), exc.message)
            raise

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
        rev = _Revocation(self._sessions, context)
        try:
            ident = await self._resolve(context)  # the CallContext is not kept alive
            md = ((MD_PEER_ID, str(ident.peer_id)),)
            p = ident.principal
            # One line per stream: endpoint, principal (never the token), peer, remote.
            name = (
                f"grpc Coordinate {p.kind} {p.id} ({p.name or ident.name}) peer {ident.peer_id}"
                f"{' resumed' if ident.resumed else ''} from {context.peer()}"
            )

            async def accepted() -> None:
                # Only an accepted stream gets the peer ID: a refused one (limit,
                # coordinator closed or unhealthy) ends with its status and no
                # initial metadata, so clients never mistake it for a session.
                await context.send_initial_metadata(md)
                opened.append(True)
                log.info("coordinate stream open: %s", name)

            async def write(resp: pb.CoordinateResponse) -> None:
                try:
                    await context.write(resp)
                except Exception as exc:  # grpc's ExecuteBatchError: the call is gone
                    raise _WriteFailed(type(exc).__name__) from None

            opened: list[bool] = []
            try:
                await self._service.run_coordinate(
                    ident, context.read, write, _EOF, on_open=accepted
                )
            finally:
                if opened:
                    log.info("coordinate stream closed: %s", name)
        except asyncio.CancelledError:
            if not rev.ended_by_revocation(context):
                raise
        except Exception as exc:
            _end_with_error(context, exc, "Coordinate")
        finally:
            rev.close()

    async def StreamDERPMaps(  # noqa: N802
        self,
        request: pb.StreamDERPMapsRequest,
        context: _Ctx[pb.StreamDERPMapsRequest, pb.DERPMap],
    ) -> AsyncIterator[pb.DERPMap]:
        rev = _Revocation(self._sessions, context)
        try:
            call = await self._call(context)
            async for m in self._service.stream_derp_maps(call):
                yield m
        except asyncio.CancelledError:
            if not rev.ended_by_revocation(context):
                raise
        except Exception as exc:
            _end_with_error(context, exc, "StreamDERPMaps")
        finally:
            rev.close()

    async def RefreshResumeToken(  # noqa: N802
        self,
        request: pb.RefreshResumeTokenRequest,
        context: _Ctx[pb.RefreshResumeTokenRequest, pb.RefreshResumeTokenResponse],
    ) -> pb.RefreshResumeTokenResponse:
        try:
            return await self._service.refresh_resume_token(await self._call(context))
        except Exception as exc:
            _end_with_error(context, exc, "RefreshResumeToken")
            return pb.RefreshResumeTokenResponse()  # discarded: the status is not OK

    async def PostTelemetry(  # noqa: N802
        self,
        request: pb.TelemetryRequest,
        context: _Ctx[pb.TelemetryRequest, pb.TelemetryResponse],
    ) -> pb.TelemetryResponse:
        try:
            return await self._service.post_telemetry(await self._call(context), request)
        except Exception as exc:
            _end_with_error(context, exc, "PostTelemetry")
            return pb.TelemetryResponse()  # discarded: the status is not OK

    async def WorkspaceUpdates(  # noqa: N802
        self,
        request: pb.WorkspaceUpdatesRequest,
        context: _Ctx[pb.WorkspaceUpdatesRequest, pb.WorkspaceUpdate],
    ) -> AsyncIterator[pb.WorkspaceUpdate]:
        rev = _Revocation(self._sessions, context)
        try:
            call = await self._call(context)
            async for upd in self._service.workspace_updates(call, request):
                yield upd
        except asyncio.CancelledError:
            if not rev.ended_by_revocation(context):
                raise
        except Exception as exc:
            _end_with_error(context, exc, "WorkspaceUpdates")
        finally:
            rev.close()


class TailnetGrpcServer:
    """A ``grpc.aio`` server hosting one :class:`TailnetService`.

    ``max_concurrent_streams`` (default ``service.limits.max_streams_per_grpc_connection``)
    caps the concurrent RPCs of one client connection. ``sessions``: where
    streaming calls register for revocation (see module docstring).
    """

    def __init__(
        self,
        service: TailnetService,
        *,
        max_concurrent_streams: int | None = None,
        sessions: SessionRegistry | None = None,
    ) -> None:
        self.service = service
        self.sessions = sessions
        self.max_concurrent_streams = (
            max_concurrent_streams
            if max_concurrent_streams is not None
            else service.limits.max_streams_per_grpc_connection
        )
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
                ("grpc.max_concurrent_streams", self.max_concurrent_streams),
                ("grpc.so_reuseport", 0),
            ]
        )
        pb_grpc.add_TailnetServicer_to_server(  # type: ignore[no-untyped-call]
            TailnetServicer(self.service, self.sessions), server
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
