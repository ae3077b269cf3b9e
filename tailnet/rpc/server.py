"""Serve a :class:`~tailnet.rpc.mux.Mux` over yamux + DRPC (Go's ``drpcserver``).

As coderd does (coder-transport.md §4.1): the WebSocket is a yamux **server**
session; every stream the client opens carries its own DRPC connection, served
by a :class:`_RpcStream`; on it the client invokes one RPC at a time (Coder's
clients: exactly one, on DRPC stream id 1).

Per stream::

    yamux data ──► drpc.ServerConnection.receive_data ──► events
      InvokeReceived     → look the path up; unknown → Error(0, 'protocol error: unknown rpc: "…"')
                           known → start the handler task (one at a time)
      MessageReceived    → the call's inbox (parsed when the handler asks)
      CloseSendReceived  → end of requests (recv() returns None)
      Close/Cancel/Error → the handler is cancelled; nothing more is sent
    handler returns    → unary: Message + CloseSend; streaming: CloseSend, or
                         Close where registered ``end_with_close`` (Coder's handlers)
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
import collections
import logging
from collections.abc import Mapping
from typing import Any, Final

from google.protobuf.message import DecodeError, Message

from . import drpc
from .mux import UNIMPLEMENTED, Method, MethodKind, Mux, RpcError
from .session import Pipe, YamuxConnection, YamuxStream

__all__ = ["DEFAULT_MAX_STREAMS", "RpcServerConnection"]

log = logging.getLogger(__name__)

#: Streams one connection may have open at once (Coder's clients use 3-5).
DEFAULT_MAX_STREAMS: Final = 64

_CLOSE_SEND: Final = object()


class _Call:
    """A running RPC; implements :class:`~tailnet.rpc.mux.ServerCall`."""

    __slots__ = (
        "method",
        "metadata",
        "context",
        "_rpc",
        "_request_type",
        "_inbox",
        "_waiter",
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
        self._request_type = method.request_type
        self._inbox: collections.deque[object] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self.ended = False
        self.task: asyncio.Task[None] | None = None

    def _push(self, item: object) -> None:
        self._inbox.append(item)
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def send(self, msg: Message) -> None:
        if self.ended:
            raise ConnectionError("call is over")
        data = msg.SerializeToString()
        if len(data) > drpc.MAX_MESSAGE_SIZE:
            raise RpcError(0, f"response of {len(data)} bytes exceeds {drpc.MAX_MESSAGE_SIZE}")
        rpc = self._rpc
        rpc.drpc.send_message(data)
        await rpc.write_out()

    async def recv(self) -> Message | None:
        while not self._inbox:
            if self.ended:
                return None
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        item = self._inbox.popleft()
        if not self._inbox:
            self._rpc.release()
        if item is _CLOSE_SEND:
            self._inbox.appendleft(item)  # stays at the end for later calls
            return None
        assert isinstance(item, bytes)
        try:
            return self._request_type.FromString(item)
        except DecodeError as exc:
            raise RpcError(0, f"invalid {self._request_type.DESCRIPTOR.name}: {exc}") from None


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
                    call._push(_CLOSE_SEND)
            elif isinstance(ev, (drpc.CloseReceived, drpc.CancelReceived, drpc.ErrorReceived)):
                self.stop_call()
        call = self.call
        if call is None or call.ended or not call._inbox:
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
        self.conn._rpcs.discard(self)
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
        call.task = asyncio.get_running_loop().create_task(self.run(call, method))

    def stop_call(self) -> None:
        call = self.call
        if call is None:
            return
        self.call = None  # the call and this stream refer to each other
        if not call.ended:
            call.ended = True
            call._wake()
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
        self.conn._rpcs.discard(self)
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

    # ---------------------------------------------------------------- handler

    async def run(self, call: _Call, method: Method) -> None:
        d = self.drpc
        try:
            kind = method.kind
            if kind is MethodKind.UNARY or kind is MethodKind.SERVER_STREAM:
                req = await call.recv()
                if req is None:
                    req = method.request_type()
                result = await method.handler(call, req)
            else:
                result = await method.handler(call)
            if call.ended:
                return
            if not kind.server_streams:
                if not isinstance(result, Message):
                    raise TypeError(f"{method.path} handler returned {type(result).__name__}")
                await call.send(result)
                call.ended = True
                d.send_close_send()
            else:
                call.ended = True
                if method.end_with_close:
                    d.send_close()
                else:
                    d.send_close_send()
        except asyncio.CancelledError:
            call.ended = True
            return
        except RpcError as exc:
            if call.ended and not method.end_with_close:
                return
            call.ended = True
            if method.end_with_close and exc.code != UNIMPLEMENTED:
                log.info("rpc %s: %s ended: %s", self.conn.name, method.path, exc.message)
            d.send_error(exc.code, exc.message)
        except (ConnectionError, drpc.DrpcError):
            call.ended = True
            return
        except Exception:
            call.ended = True
            log.exception("rpc %s: %s handler failed", self.conn.name, method.path)
            d.send_error(0, "internal error")
        finally:
            call.task = None
            if self.call is call:
                self.call = None  # the call and this stream refer to each other
        try:
            await self.write_out()
        except ConnectionError:
            pass


class RpcServerConnection:
    """Serve ``mux`` on one WebSocket pipe until it closes.

    ``context`` is handed to every handler as ``call.context`` (for the Tailnet
    service: who is calling and with which peer identity).
    """

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
        self._rpcs: set[_RpcStream] = set()
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
        self._rpcs.add(_RpcStream(self, ys))

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
        tasks = [
            rpc.call.task
            for rpc in self._rpcs
            if rpc.call is not None and rpc.call.task is not None
        ]
        if tasks:
            await asyncio.wait(tasks, timeout=grace)
        await self.yamux.close(code, "server shutting down")
