"""Serve the Tailnet RPCs over one WebSocket (framing: :mod:`tailnet.wsrpc`).

Per connection::

    session = RpcSession(ws, service, call, ident)   # identity fixed by the HTTP upgrade
    await session.run()                              # until the socket closes

The reader loop decodes frames and dispatches them to streams; each stream
runs in its own task on top of :class:`~tailnet.service.TailnetService`, so the
semantics equal the gRPC adapter's. ``ServiceError`` → END with the numeric
status of the same name; any other exception → END INTERNAL "internal error"
(logged, never shown). A framing violation closes the WebSocket with 1002 and
ends every stream of that connection only.

Coordinate requests are handed to the service through a bounded queue
(:data:`REQUEST_QUEUE_SIZE`, Coder's 32); when a stream's queue is full the
reader waits, which pauses reading from the socket (backpressure).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Final

from google.protobuf.message import Message

from tailnet.identity import MD_PEER_ID
from tailnet.service import CallContext, ServiceError, Status, StreamIdentity, TailnetService
from tailnet.v2 import tailnet_pb2 as pb
from tailnet.wsrpc import (
    METHOD_COORDINATE,
    METHOD_POST_TELEMETRY,
    METHOD_REFRESH_RESUME_TOKEN,
    METHOD_STREAM_DERP_MAPS,
    METHOD_WORKSPACE_UPDATES,
    Frame,
    FrameError,
    FrameKind,
    StatusCode,
    decode_frame,
    encode_end,
    encode_message,
    parse_message,
)

from .websocket import CLOSE_GOING_AWAY, CLOSE_PROTOCOL_ERROR, ServerWebSocket

__all__ = ["RpcSession", "REQUEST_QUEUE_SIZE", "MAX_STREAMS"]

log = logging.getLogger(__name__)

REQUEST_QUEUE_SIZE: Final = 32
MAX_STREAMS: Final = 64
_CLOSE_SEND: Final = object()

_UNARY_REQUEST: Final[dict[str, type[Message]]] = {
    METHOD_STREAM_DERP_MAPS: pb.StreamDERPMapsRequest,
    METHOD_REFRESH_RESUME_TOKEN: pb.RefreshResumeTokenRequest,
    METHOD_POST_TELEMETRY: pb.TelemetryRequest,
    METHOD_WORKSPACE_UPDATES: pb.WorkspaceUpdatesRequest,
}


@dataclass(slots=True)
class _Stream:
    sid: int
    method: str
    inbox: asyncio.Queue[object] = field(
        default_factory=lambda: asyncio.Queue(REQUEST_QUEUE_SIZE)
    )
    task: asyncio.Task[None] | None = None
    ended: bool = False


class RpcSession:
    """All RPC streams of one WebSocket connection."""

    def __init__(
        self,
        ws: ServerWebSocket,
        service: TailnetService,
        call: CallContext,
        ident: StreamIdentity | None,
    ) -> None:
        self._ws = ws
        self._service = service
        self._call = call
        self._ident = ident
        self._streams: dict[int, _Stream] = {}
        self._used: set[int] = set()

    async def run(self) -> None:
        """Serve until the WebSocket closes; then cancel every stream."""
        try:
            while True:
                msg = await self._ws.recv()
                if msg is None:
                    return
                if isinstance(msg, str):
                    await self._protocol_error("text messages are not allowed")
                    return
                try:
                    frame = decode_frame(msg)
                except FrameError as exc:
                    await self._protocol_error(str(exc))
                    return
                if not await self._dispatch(frame):
                    return
        finally:
            for st in list(self._streams.values()):
                if st.task is not None:
                    st.task.cancel()
            tasks = [st.task for st in self._streams.values() if st.task is not None]
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
            self._streams.clear()

    async def shutdown(self, grace: float = 2.0) -> None:
        """Server going away: let streams finish (≤ ``grace`` s; the service is
        closed first, so Coordinate streams end after their final ``error``
        response), then close with 1001."""
        tasks = [st.task for st in self._streams.values() if st.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=grace)
        await self._ws.close(CLOSE_GOING_AWAY, "server shutting down")

    async def _protocol_error(self, reason: str) -> None:
        log.info("wsrpc: protocol error from %s: %s", self._ws.remote, reason)
        await self._ws.close(CLOSE_PROTOCOL_ERROR, reason[:120])

    async def _dispatch(self, frame: Frame) -> bool:
        sid = frame.stream_id
        if frame.kind is FrameKind.OPEN:
            if sid in self._used:
                await self._protocol_error(f"stream id {sid} already used")
                return False
            self._used.add(sid)
            method = frame.payload.decode("utf-8")
            if len(self._streams) >= MAX_STREAMS:
                await self._send_end(sid, StatusCode.RESOURCE_EXHAUSTED, "too many streams")
                return True
            runner = self._runner_for(method)
            if runner is None:
                await self._send_end(sid, StatusCode.UNIMPLEMENTED, f"unknown rpc: {method}")
                return True
            new = _Stream(sid, method)
            self._streams[sid] = new
            new.task = asyncio.get_running_loop().create_task(self._run_stream(new, runner))
            return True
        if frame.kind in (FrameKind.MESSAGE, FrameKind.CLOSE_SEND, FrameKind.CANCEL):
            st = self._streams.get(sid)
            if st is None:
                if sid not in self._used:
                    await self._protocol_error(f"frame for stream {sid} that was never opened")
                    return False
                return True  # late frame for a finished stream
            if frame.kind is FrameKind.CANCEL:
                st.ended = True
                if st.task is not None:
                    st.task.cancel()
                self._streams.pop(sid, None)
                return True
            item: bytes | object = _CLOSE_SEND
            if frame.kind is FrameKind.MESSAGE:
                item = frame.payload
                if st.method == METHOD_COORDINATE:
                    # parse here so a bad message ends this stream with INVALID_ARGUMENT
                    try:
                        item = parse_message(pb.CoordinateRequest, frame.payload)
                    except ValueError as exc:
                        await self._abort_stream(st, StatusCode.INVALID_ARGUMENT, str(exc))
                        return True
            await self._enqueue(st, item)
            return True
        await self._protocol_error(f"clients may not send {frame.kind.name} frames")
        return False

    # ------------------------------------------------------------------ streams

    def _runner_for(
        self, method: str
    ) -> Callable[[_Stream], Awaitable[None]] | None:
        if method == METHOD_COORDINATE:
            return self._coordinate
        if method in _UNARY_REQUEST:
            return self._unary_request
        return None

    async def _enqueue(self, st: _Stream, item: object) -> None:
        """Hand ``item`` to ``st``'s runner.

        Unary-request runners read only their first item, so once one is queued
        later ones are dropped (the reader must not wait for a queue nobody
        drains). A Coordinate stream applies backpressure: the reader waits
        while its queue is full, but only while the stream's task and the
        WebSocket are alive.
        """
        if st.method != METHOD_COORDINATE:
            if st.inbox.empty():
                st.inbox.put_nowait(item)
            return
        if not st.inbox.full():
            st.inbox.put_nowait(item)
            return
        put = asyncio.ensure_future(st.inbox.put(item))
        lost = asyncio.ensure_future(self._ws.wait_closed())
        waiters: set[asyncio.Future[None]] = {put, lost}
        if st.task is not None:
            waiters.add(st.task)
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            put.cancel()
            lost.cancel()

    async def _abort_stream(self, st: _Stream, code: int, message: str) -> None:
        st.ended = True
        self._streams.pop(st.sid, None)
        if st.task is not None:
            st.task.cancel()
            await asyncio.gather(st.task, return_exceptions=True)
        await self._send_end(st.sid, code, message)

    async def _send_end(self, sid: int, code: int, message: str = "") -> None:
        if self._ws.open:
            try:
                await self._ws.send(encode_end(sid, code, message))
            except ConnectionError:
                pass

    async def _send_msg(self, st: _Stream, msg: Message) -> None:
        await self._ws.send(encode_message(st.sid, msg))

    async def _run_stream(self, st: _Stream, runner: Callable[[_Stream], Awaitable[None]]) -> None:
        code: int = StatusCode.OK
        text = ""
        try:
            await runner(st)
        except asyncio.CancelledError:
            st.ended = True
            raise
        except ServiceError as exc:
            code, text = StatusCode[exc.status.name], exc.message
        except ConnectionError:
            st.ended = True
        except Exception:
            log.exception("wsrpc: %s stream %d failed", st.method, st.sid)
            code, text = StatusCode.INTERNAL, "internal error"
        finally:
            if self._streams.get(st.sid) is st:
                del self._streams[st.sid]
        if not st.ended:
            st.ended = True
            await self._send_end(st.sid, code, text)

    async def _requests(self, st: _Stream) -> AsyncIterator[pb.CoordinateRequest]:
        while True:
            item = await st.inbox.get()
            if item is _CLOSE_SEND:
                return
            assert isinstance(item, pb.CoordinateRequest)
            yield item

    async def _coordinate(self, st: _Stream) -> None:
        if self._ident is None:
            raise ServiceError(Status.UNIMPLEMENTED, "Coordinate is not available on this connection")
        async for resp in self._service.coordinate(self._ident, self._requests(st)):
            await self._send_msg(st, resp)

    async def _first_request(self, st: _Stream, cls: type[Message]) -> Message:
        item = await st.inbox.get()
        if item is _CLOSE_SEND:
            return cls()
        assert isinstance(item, bytes)
        try:
            return parse_message(cls, item)
        except ValueError as exc:
            raise ServiceError(Status.INVALID_ARGUMENT, str(exc)) from None

    async def _unary_request(self, st: _Stream) -> None:
        req = await self._first_request(st, _UNARY_REQUEST[st.method])
        svc = self._service
        call = self._call
        if st.method == METHOD_STREAM_DERP_MAPS:
            async for m in svc.stream_derp_maps(call):
                await self._send_msg(st, m)
        elif st.method == METHOD_REFRESH_RESUME_TOKEN:
            if self._ident is not None:
                md = dict(call.metadata)
                md[MD_PEER_ID] = str(self._ident.peer_id)
                call = CallContext(call.principal, call.version, md)
            await self._send_msg(st, await svc.refresh_resume_token(call))
        elif st.method == METHOD_POST_TELEMETRY:
            assert isinstance(req, pb.TelemetryRequest)
            await self._send_msg(st, await svc.post_telemetry(call, req))
        else:
            assert isinstance(req, pb.WorkspaceUpdatesRequest)
            async for upd in svc.workspace_updates(call, req):
                await self._send_msg(st, upd)

