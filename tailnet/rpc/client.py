"""A DRPC client over yamux over a WebSocket, as Coder's Go clients call (any asyncio loop).

Like Coder's ``multiplexedDRPC`` (coder-transport.md §4.1): the client is the
yamux **client** (odd stream ids); every RPC opens a fresh yamux stream carrying
its own DRPC connection (DRPC stream id 1), and the stream is FIN-ed when the
call is over. Usable for any registered service, not only Tailnet::

    client = await RpcClient.connect(url, token)        # GET + WebSocket upgrade
    resp = await client.unary("/coder.tailnet.v2.Tailnet/RefreshResumeToken",
                              pb.RefreshResumeTokenRequest(), pb.RefreshResumeTokenResponse)
    maps = await client.server_stream("/coder.tailnet.v2.Tailnet/StreamDERPMaps",
                                      pb.StreamDERPMapsRequest(), pb.DERPMap)
    first = await maps.recv()
    coord = client.bidi("/coder.tailnet.v2.Tailnet/Coordinate", pb.CoordinateResponse)
    await coord.send(req); resp = await coord.recv()
    await client.close()

Call endings as Go's drpc client sees them: a Message then CloseSend or Close
from the server ends the responses (``recv()`` → ``None``); an Error packet
raises :class:`~tailnet.rpc.mux.RpcError` (code 12 = unimplemented). The
Invoke of a streaming call is buffered until its first ``send``/``recv`` (as
Go's ``NewStream`` does); a unary call is one write (Invoke, Message, CloseSend).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import ssl as ssl_module
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Generic, TypeVar

from google.protobuf.message import DecodeError, Message

from . import drpc
from .mux import RpcError
from .session import Pipe, YamuxConnection, YamuxStream
from .websocket import ClientPipe, dial

__all__ = ["RpcClient", "ClientStream"]

log = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)

_EOF = object()


class ClientStream(Generic[M]):
    """One RPC on its own yamux stream (see the module docstring)."""

    def __init__(
        self,
        client: RpcClient,
        method: str,
        response_type: type[M],
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        self.method = method
        self._client = client
        self._response_type = response_type
        self._ys: YamuxStream = client.yamux.open_stream()
        self._drpc = drpc.ClientConnection()
        self._drpc.invoke(method, dict(metadata) if metadata else None)
        self._flushed = False
        self._inbox: collections.deque[object] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._unconsumed = 0
        self._done = False  # the server ended the call (or the stream is gone)
        self._closed = False  # we are done with the stream
        self._ys.on_data = self._on_data
        self._ys.on_end = self._on_end

    # input ----------------------------------------------------------------

    def _on_data(self, data: bytes) -> None:
        self._unconsumed += len(data)
        try:
            self._drpc.receive_data(data)
            events = self._drpc.events_received()
        except drpc.DrpcError as exc:
            log.info("rpc client: %s: protocol error from server: %s", self.method, exc)
            self._push(RpcError(0, f"protocol error: {exc}"))
            self._ys.close()
            return
        for ev in events:
            if isinstance(ev, drpc.MessageReceived):
                self._push(ev.data)
            elif isinstance(ev, drpc.ErrorReceived):
                self._push(RpcError(ev.code, ev.message))
            elif isinstance(ev, (drpc.CloseReceived, drpc.CloseSendReceived, drpc.CancelReceived)):
                self._push(_EOF)
        if not self._inbox:
            self._release()
        self._write_nowait()

    def _push(self, item: object) -> None:
        if self._done:
            return
        if item is _EOF or isinstance(item, RpcError):
            self._done = True
        self._inbox.append(item)
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _on_end(self) -> None:
        if not self._done:
            reason = self._client.yamux.close_reason if self._client.yamux.closed else ""
            self._push(ConnectionError(f"{self.method}: connection lost {reason}".rstrip()))
            self._done = True
        self._ys.close()

    def _release(self) -> None:
        n = self._unconsumed
        if n:
            self._unconsumed = 0
            self._ys.consumed(n)

    # output ---------------------------------------------------------------

    def _write_nowait(self) -> None:
        data = self._drpc.data_to_send()
        if data:
            self._ys.write_nowait(data)

    async def _write(self) -> None:
        self._flushed = True
        data = self._drpc.data_to_send()
        if data:
            await self._ys.write(data)

    async def send(self, msg: Message) -> None:
        """Send one request (flushes the buffered Invoke with it)."""
        if self._closed or self._done:
            raise ConnectionError(f"{self.method}: call is over")
        self._drpc.send_message(msg.SerializeToString())
        await self._write()

    async def close_send(self) -> None:
        """No more requests (DRPC CloseSend; the stream stays open for responses)."""
        if not self._closed and not self._done:
            self._drpc.send_close_send()
            await self._write()

    async def recv(self) -> M | None:
        """The next response, ``None`` once the server ended the call."""
        if not self._flushed:
            await self._write()
        while not self._inbox:
            if self._closed:
                return None
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        item = self._inbox.popleft()
        if not self._inbox:
            self._release()
        if item is _EOF:
            self._inbox.appendleft(item)
            return None
        if isinstance(item, BaseException):
            self._inbox.appendleft(item)
            raise item
        assert isinstance(item, bytes)
        try:
            return self._response_type.FromString(item)
        except DecodeError as exc:
            await self.close()
            raise RpcError(0, f"invalid {self._response_type.DESCRIPTOR.name}: {exc}") from None

    def __aiter__(self) -> AsyncIterator[M]:
        return self._iter()

    async def _iter(self) -> AsyncIterator[M]:
        while True:
            m = await self.recv()
            if m is None:
                return
            yield m

    async def close(self) -> None:
        """End the call from our side: Close (if the server has not ended it), then FIN."""
        if self._closed:
            return
        self._closed = True
        if not self._done and self._flushed:
            try:
                self._drpc.send_close()
            except drpc.DrpcError:
                pass
            self._write_nowait()
        self._ys.close()
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)


class RpcClient:
    """A yamux client session on one WebSocket; one yamux stream per RPC."""

    def __init__(self, pipe: Pipe, *, keepalive_interval: float | None = 30.0) -> None:
        self.pipe = pipe
        self.yamux = YamuxConnection(
            pipe, client=True, on_stream=None, keepalive_interval=keepalive_interval,
            name="rpc client",
        )
        self._reader = asyncio.get_running_loop().create_task(self.yamux.run())

    @classmethod
    async def connect(
        cls,
        url: str,
        token: str | None,
        *,
        cookie: bool = False,
        headers: Sequence[tuple[str, str]] = (),
        ssl: ssl_module.SSLContext | None = None,
        open_timeout: float = 10.0,
        keepalive_interval: float | None = 30.0,
    ) -> RpcClient:
        """Dial ``url`` (see :func:`tailnet.rpc.websocket.dial`); raises ``DialError``."""
        pipe = await dial(
            url, token, cookie=cookie, headers=headers, ssl=ssl, open_timeout=open_timeout
        )
        return cls(pipe, keepalive_interval=keepalive_interval)

    @property
    def response_headers(self) -> Mapping[str, str]:
        """Headers of the 101 response (``Tailnet-Peer-Id`` from tailnet-core servers)."""
        pipe = self.pipe
        return pipe.response_headers if isinstance(pipe, ClientPipe) else {}

    @property
    def closed(self) -> bool:
        return self.yamux.closed

    async def wait_closed(self) -> None:
        await self.yamux.wait_closed()

    def bidi(
        self, method: str, response_type: type[M], metadata: Mapping[str, str] | None = None
    ) -> ClientStream[M]:
        """Start a bidirectional (or client-streaming) call; nothing is written yet."""
        return ClientStream(self, method, response_type, metadata)

    async def server_stream(
        self,
        method: str,
        request: Message,
        response_type: type[M],
        metadata: Mapping[str, str] | None = None,
    ) -> ClientStream[M]:
        """Start a server-streaming call: Invoke + request, then CloseSend (as Go)."""
        st = ClientStream(self, method, response_type, metadata)
        await st.send(request)
        await st.close_send()
        return st

    async def unary(
        self,
        method: str,
        request: Message,
        response_type: type[M],
        metadata: Mapping[str, str] | None = None,
    ) -> M:
        """One request, one response; raises ``RpcError`` (or ``ConnectionError``)."""
        st = ClientStream(self, method, response_type, metadata)
        try:
            st._drpc.send_message(request.SerializeToString())
            st._drpc.send_close_send()
            await st._write()
            resp = await st.recv()
            if resp is None:
                raise RpcError(0, f"{method}: server sent no response")
            return resp
        finally:
            await st.close()

    async def ping(self, timeout: float = 10.0) -> float:
        """A yamux ping; the round-trip time in seconds."""
        return await self.yamux.ping(timeout)

    async def close(self) -> None:
        """Close the yamux session and the WebSocket (as Coder's client does)."""
        if not self.yamux.closed:
            await self.yamux.close(1000, "")
        try:
            await asyncio.wait_for(asyncio.shield(self._reader), 5.0)
        except (TimeoutError, asyncio.CancelledError):
            self._reader.cancel()
        except Exception:  # the reader's own failure was logged there
            pass

    async def __aenter__(self) -> RpcClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
