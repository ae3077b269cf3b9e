"""Serve a :class:`~tailnet.rpc.mux.Mux` over yamux + DRPC (Go's ``drpcserver``).

As coderd does (coder-transport.md §4.1): the WebSocket is a yamux **server**
session; every stream the client opens carries its own DRPC connection, served
by a :class:`_RpcStream`; on it the client invokes one RPC at a time (Coder's
clients: exactly one, on DRPC stream id 1).

Per stream::

    yamux data ──► drpc.ServerConnection.receive_data ──► events
      InvokeReceived     → look the path up; unknown → Error(0, 'protocol error: unknown rpc: "…"')
                           known → the handler task (one at a time) starts: bidi and
                           client streaming at once, unary and server streaming once
                           their request (Message, or a bare CloseSend) is in
      MessageReceived    → the call's inbox (parsed when the handler asks)
      CloseSendReceived  → end of requests (recv() returns None)
      Close/Cancel/Error → the handler is cancelled; nothing more is sent
    handler returns    → unary: Message + CloseSend; streaming: CloseSend, or
                         Close where registered ``end_with_close`` (Coder's handlers);
                         a streaming handler that called ``call.hold()`` leaves the
                         call open with no task: it ends at ``call.finish()``, and
                         the ``call.listen`` callback hears input and the peer's end
    RpcError           → Error(code, text); other exceptions → Error(0, "internal error")
    yamux FIN          → not a half-close in DRPC: the running call is cancelled
                         and we FIN back (Go tears the DRPC connection down on EOF)
    bad DRPC input     → Error(0, "protocol error: …") if a call can still hear it,
                         then FIN; only this stream ends, logged with the reason

Flow control: bytes a stream received are given back to the client's yamux
window only once its handler has taken every parsed message (or when they
produced none), so a handler that stops reading stalls only its own stream,
and memory per stream stays within one window plus one message
(``drpc.MAX_MESSAGE_SIZE``). A connection serves at most ``max_streams`` streams.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final

from google.protobuf.message import DecodeError, Message

from . import drpc
from .mux import UNIMPLEMENTED, Method, Mux, RpcError
from .session import Pipe, YamuxConnection, YamuxStream

__all__ = ["DEFAULT_MAX_STREAMS", "RpcServerConnection"]

log = logging.getLogger(__name__)

#: Streams one connection may have open at once (Coder's clients use 3-5).
DEFAULT_MAX_STREAMS: Final = 64

class _Call:
    """A running RPC; implements :class:`~tailnet.rpc.mux.ServerCall`.

    The inbox is a plain list consumed from ``_head`` (usually 0-2 items; an
    empty deque costs a ~0.6 KB block, and two calls live per connected peer);
    CloseSend is a flag, seen once the queued messages are taken.
    """

    __slots__ = (
        "method",
        "metadata",
        "context",
        "_rpc",
        "_method",
        "_inbox",
        "_head",
        "_close_send",
        "_waiter",
        "_listener",
        "_held",
        "_ended_waiter",
        "ended",
        "task",
    )

    def __init__(
        self, rpc: _RpcStream, method: Method, metadata: Mapping[str, str], context: Any
    ) -> None:
        self.method = method.path
        self.metadata = metadata
        self.context = context
        self._rpc = rpc
        self._method = method
        self._inbox: list[bytes] = []
        self._head = 0
        self._close_send = False
        self._waiter: asyncio.Future[None] | None = None
        self._listener: Callable[[], None] | None = None
        self._held = False
        self._ended_waiter: asyncio.Future[None] | None = None
        self.ended = False
        self.task: asyncio.Task[None] | None = None

    @property
    def has_input(self) -> bool:
        """Parsed messages are waiting to be taken by the handler."""
        return self._head < len(self._inbox)

    def _push(self, data: bytes) -> None:
        self._inbox.append(data)
        self._wake()

    def _push_close_send(self) -> None:
        self._close_send = True
        self._wake()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)
        listener = self._listener
        if listener is not None:
            listener()

    @property
    def ready(self) -> bool:
        return self._head < len(self._inbox) or self.ended or self._close_send

    def listen(self, on_input: Callable[[], None] | None) -> None:
        self._listener = on_input

    def hold(self) -> None:
        if not self._method.kind.server_streams:
            raise TypeError(f"{self.method}: only a streaming call can be held open")
        self._held = True

    def finish(self, exc: BaseException | None = None) -> None:
        """End a held call as if its handler had returned (``exc`` None) or raised."""
        self._held = False
        self._listener = None  # usually refers to the holder, which refers to us
        if self.ended:
            return
        rpc = self._rpc
        try:
            if exc is None:
                self.ended = True
                if self._method.end_with_close:
                    rpc.drpc.send_close()
                else:
                    rpc.drpc.send_close_send()
            elif not self._send_failure(exc):
                return
        finally:
            exc = None
            if self.ended:
                self._ended()
        rpc.write_nowait()

    def _ended(self) -> None:
        """The call is over: wake whoever waits for that; break the call/stream cycle."""
        w = self._ended_waiter
        if w is not None:
            self._ended_waiter = None
            if not w.done():
                w.set_result(None)
        rpc = self._rpc
        if rpc.call is self:
            rpc.call = None  # the call and its stream refer to each other

    async def wait_ended(self) -> None:
        """Return once the call is over (used at shutdown for held calls)."""
        if self.ended:
            return
        if self._ended_waiter is None:
            self._ended_waiter = asyncio.get_running_loop().create_future()
        await asyncio.shield(self._ended_waiter)

    def _encode(self, msg: Message) -> bytes:
        """``msg`` serialized for sending; the call must be open and the
        message within DRPC's bound."""
        if self.ended:
            raise ConnectionError("call is over")
        data = msg.SerializeToString()
        if len(data) > drpc.MAX_MESSAGE_SIZE:
            raise RpcError(0, f"response of {len(data)} bytes exceeds {drpc.MAX_MESSAGE_SIZE}")
        return data

    async def send(self, msg: Message) -> None:
        data = self._encode(msg)
        rpc = self._rpc
        rpc.drpc.send_message(data)
        await rpc.write_out()

    def send_nowait(self, msg: Message) -> bool:
        data = self._encode(msg)
        rpc = self._rpc
        ys = rpc.ys
        if ys.gone or ys.local_closed or ys.reset:
            raise ConnectionError("yamux stream closed")
        rpc.drpc.send_message(data)
        rpc.write_nowait()
        return ys.sendable

    async def drain(self) -> None:
        if self.ended:
            raise ConnectionError("call is over")
        await self._rpc.ys.drain()

    async def recv(self) -> Message | None:
        inbox = self._inbox
        while self._head >= len(inbox):
            if self.ended or self._close_send:
                return None
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        item = inbox[self._head]
        inbox[self._head] = b""  # taken: free it now
        self._head += 1
        if self._head >= len(inbox):
            inbox.clear()
            self._head = 0
            self._rpc.release()
        return self._parse(item)

    def _parse(self, item: bytes) -> Message:
        rt = self._method.request_type
        try:
            return rt.FromString(item)
        except DecodeError as exc:
            raise RpcError(0, f"invalid {rt.DESCRIPTOR.name}: {exc}") from None

    def _request_nowait(self) -> Message | None:
        """For unary / server-streaming calls: the request, once its Message or a
        bare CloseSend arrived (then an empty request, as Go's server reads it);
        ``None`` while neither has. Raises ``RpcError`` if it does not parse."""
        if self._head < len(self._inbox):
            item = self._inbox[self._head]
            self._inbox.clear()
            self._head = 0
            return self._parse(item)
        if self._close_send:
            return self._method.request_type()
        return None

    # ---------------------------------------------------------------- ending

    def _start(self, aw: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(aw)
        self.task = task
        task.add_done_callback(self._handler_done)

    def _handler_done(self, task: asyncio.Task[Any]) -> None:
        """The handler returned or raised: end the call on the wire (see module doc).

        A callback, not a wrapper coroutine around the handler: a long-lived call
        (Coordinate, StreamDERPMaps) then holds one coroutine frame less.
        """
        if self.task is task:
            self.task = None
        method = self._method
        rpc = self._rpc
        d = rpc.drpc
        if task.cancelled():
            self.ended = True
            return
        exc = task.exception()
        try:
            if exc is None:
                if self.ended:
                    return
                try:
                    result = task.result()
                    if self._held:
                        return  # stays open until finish() or the peer ends it
                    if not method.kind.server_streams:
                        if not isinstance(result, Message):
                            raise TypeError(
                                f"{method.path} handler returned {type(result).__name__}"
                            )
                        # The response may exceed the peer's window: send it from a task.
                        self._start(self._send_response(result))
                        return
                except TypeError as err:
                    exc = err
                else:
                    self.ended = True
                    if method.end_with_close:
                        d.send_close()
                    else:
                        d.send_close_send()
            if exc is not None and not self._send_failure(exc):
                return
        finally:
            exc = None  # a kept exception would tie this frame to its own traceback
            if self.ended:
                self._listener = None
                self._ended()
        rpc.write_nowait()  # the ending packets are a few bytes: no need to wait

    def _send_failure(self, exc: BaseException) -> bool:
        """Queue the ending for a handler that raised ``exc``; False if nothing to send."""
        method = self._method
        rpc = self._rpc
        d = rpc.drpc
        if isinstance(exc, RpcError):
            if self.ended and not method.end_with_close:
                return False
            self.ended = True
            if method.end_with_close and exc.code != UNIMPLEMENTED:
                log.info("rpc %s: %s ended: %s", rpc.conn.name, method.path, exc.message)
            code, text = exc.code, exc.message
        elif isinstance(exc, (ConnectionError, drpc.DrpcError)):
            self.ended = True
            return False
        else:
            self.ended = True
            log.error("rpc %s: %s handler failed", rpc.conn.name, method.path,
                      exc_info=(type(exc), exc, exc.__traceback__))
            code, text = 0, "internal error"
        try:
            d.send_error(code, text)
        except drpc.DrpcError:
            return False
        return True


    async def _send_response(self, result: Message) -> None:
        """Unary success: Message (waiting for window as needed), then CloseSend."""
        await self.send(result)
        if not self.ended:
            self.ended = True
            self._rpc.drpc.send_close_send()
        # _handler_done of this task: ended, so it only flushes nothing further
        self._rpc.write_nowait()


class _RpcStream:
    """One yamux stream = one DRPC server connection (see module docstring)."""

    __slots__ = ("conn", "ys", "drpc", "call", "unconsumed", "finished")

    def __init__(self, conn: RpcServerConnection, ys: YamuxStream) -> None:
        self.conn = conn
        self.ys = ys
        self.drpc = drpc.ServerConnection()
        self.call: _Call | None = None
        self.unconsumed = 0
        self.finished = False
        ys.on_data = self.on_data
        ys.on_end = self.on_end

    # ---------------------------------------------------------------- input

    def on_data(self, data: bytes) -> None:
        self.unconsumed += len(data)
        try:
            self.drpc.receive_data(data)
            events = self.drpc.events_received()
        except drpc.DrpcError as exc:
            self.protocol_error(str(exc))
            return
        for ev in events:
            if isinstance(ev, drpc.MessageReceived):
                call = self.call
                if call is not None and not call.ended:
                    call._push(ev.data)
            elif isinstance(ev, drpc.InvokeReceived):
                self.invoke(ev.method, ev.metadata)
            elif isinstance(ev, drpc.CloseSendReceived):
                call = self.call
                if call is not None:
                    call._push_close_send()
            elif isinstance(ev, (drpc.CloseReceived, drpc.CancelReceived, drpc.ErrorReceived)):
                self.stop_call()
        call = self.call
        if call is not None:
            self._maybe_start(call)
        if call is None or call.ended or not call.has_input:
            self.release()
        self.write_nowait()

    def release(self) -> None:
        """Give the bytes received so far back to the client's window."""
        n = self.unconsumed
        if n:
            self.unconsumed = 0
            self.ys.consumed(n)

    def on_end(self) -> None:
        """Peer FIN, RST, or session end: cancel the call; FIN back."""
        self.stop_call()
        self.finished = True
        self.conn._forget(self)
        self.ys.close()

    def invoke(self, path: str, metadata: Mapping[str, str]) -> None:
        self.stop_call()  # a newer Invoke supersedes the running call (Go's manager)
        method = self.conn.mux.lookup(path)
        if method is None:
            log.info("rpc %s: unknown method %r", self.conn.name, path[:200])
            self.drpc.send_error(0, drpc.unknown_rpc_message(path))
            return
        call = _Call(self, method, metadata, self.conn.context)
        self.call = call
        if method.kind.client_streams:
            call._start(method.handler(call))
        # unary / server streaming: started by _maybe_start once the request is in

    def _maybe_start(self, call: _Call) -> None:
        """Start a unary / server-streaming handler once its request arrived."""
        if call.task is not None or call.ended or call._method.kind.client_streams:
            return
        try:
            req = call._request_nowait()
        except RpcError as exc:
            call.ended = True
            self.drpc.send_error(exc.code, exc.message)
            return
        if req is not None:
            call._start(call._method.handler(call, req))

    def stop_call(self) -> None:
        call = self.call
        if call is None:
            return
        self.call = None  # the call and this stream refer to each other
        if not call.ended:
            call.ended = True
            call._wake()  # a held call's holder hears it through its listener
            call._listener = None
            call._held = False
            w = call._ended_waiter
            if w is not None and not w.done():
                w.set_result(None)
            call._ended_waiter = None
            task = call.task
            call.task = None
            if task is not None:
                task.cancel()

    def protocol_error(self, reason: str) -> None:
        log.info("rpc %s: stream %d: DRPC protocol error: %s", self.conn.name, self.ys.id, reason)
        call = self.call
        if call is not None and not call.ended:
            self.stop_call()
            try:
                self.drpc.send_error(0, f"protocol error: {reason}")
            except drpc.DrpcError:
                pass
            self.write_nowait()
        self.finished = True
        self.conn._forget(self)
        self.ys.close()

    # ---------------------------------------------------------------- output

    def write_nowait(self) -> None:
        data = self.drpc.data_to_send()
        if data:
            self.ys.write_nowait(data)

    async def write_out(self) -> None:
        data = self.drpc.data_to_send()
        if data:
            await self.ys.write(data)


class RpcServerConnection:
    """Serve ``mux`` on one WebSocket pipe until it closes.

    ``context`` is handed to every handler as ``call.context`` (for the Tailnet
    service: who is calling and with which peer identity).
    """

    __slots__ = ("mux", "context", "name", "_rpcs", "yamux")

    def __init__(
        self,
        pipe: Pipe,
        mux: Mux,
        context: Any = None,
        *,
        max_streams: int = DEFAULT_MAX_STREAMS,
        keepalive_interval: float | None = 30.0,
        keepalive_timeout: float = 10.0,
        name: str = "",
    ) -> None:
        self.mux = mux
        self.context = context
        self.name = name or "connection"
        # Live streams (a list: 1-5 per connection, and a set costs 4x the memory).
        self._rpcs: list[_RpcStream] = []
        self.yamux = YamuxConnection(
            pipe,
            client=False,
            on_stream=self._on_stream,
            max_streams=max_streams,
            keepalive_interval=keepalive_interval,
            keepalive_timeout=keepalive_timeout,
            name=f"rpc {self.name}",
        )

    def _on_stream(self, ys: YamuxStream) -> None:
        self._rpcs.append(_RpcStream(self, ys))

    def _forget(self, rpc: _RpcStream) -> None:
        try:
            self._rpcs.remove(rpc)
        except ValueError:
            pass

    async def run(self) -> None:
        """Serve until the peer goes away; then cancel and await every call."""
        try:
            await self.yamux.run()
        finally:
            await self._cancel_all()

    async def _cancel_all(self) -> None:
        tasks = []
        for rpc in list(self._rpcs):
            call = rpc.call
            if call is not None and call.task is not None:
                tasks.append(call.task)
            rpc.stop_call()
        self._rpcs.clear()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def shutdown(self, grace: float = 2.0, code: int = 1001) -> None:
        """Server going away: GoAway (no new streams), let running calls end
        (≤ ``grace`` s; Coordinate streams end once the service is closed), close."""
        self.yamux.go_away()
        tasks: list[asyncio.Future[None]] = []
        for rpc in self._rpcs:
            call = rpc.call
            if call is None:
                continue
            if call.task is not None:
                tasks.append(call.task)
            elif call._held:
                tasks.append(asyncio.ensure_future(call.wait_ended()))
        if tasks:
            await asyncio.wait(tasks, timeout=grace)
        await self.yamux.close(code, "server shutting down")
