"""DERP over WebSocket (spec §2.3): both sides, RFC 6455 framing by :mod:`derp.wsframing`.

After an RFC 6455 handshake with subprotocol ``derp`` the WebSocket is just a
byte stream carrying the usual DERP frames (ServerKey first, no 101 DERP
headers, no fast start). Received binary messages (and their continuation
frames) are concatenated, so a message may hold several DERP frames or part
of one. The DERP code above never sees WebSocket framing: it talks to a
:class:`WsTransport`, a thin ``asyncio.Transport`` look-alike, exactly as it
would to a TCP transport.

Wiring (server)::

    TCP or TLS transport ──► WsPipe (asyncio.Protocol; WsFramer inside)
                               │ payloads of one read   ▲ send_binary(write data)
                               ▼ (one data_received)    │
                             DerpConnection  ◄──────  WsTransport

The handshakes use ``websockets``' sans-I/O ``ServerProtocol``/``ClientProtocol``
(request validation, ``Sec-WebSocket-Accept``, subprotocol); the framing after
it is :class:`derp.wsframing.WsFramer`, which parses every frame of a read in
one loop (clients that send one message per packet are the norm).

Rules, both sides:

* permessage-deflate is never negotiated (WireGuard data is incompressible);
* a text message closes the connection with 1003 (unsupported data);
* close codes 1000/1001 (or any close frame) are end of stream for DERP;
* outgoing bytes are split into messages of at most :data:`MAX_SEND_MESSAGE`
  (32 KiB): Go's WebSocket library (what Tailscale's client and Coder use)
  reads at most 32,768 bytes per message by default and closes a larger one
  with 1009; DERP over WebSocket is a byte stream, so the cut may fall
  anywhere, even inside a frame;
* an incoming message larger than :data:`MAX_MESSAGE_SIZE` (256 KiB + 64: a
  ClientInfo of the maximal size, or several 64 KiB packets in one flush)
  closes with 1009; malformed framing closes with 1002; the reason (and the
  close code and reason the peer sent) is logged at INFO;
* flow control is the underlying transport's: ``pause_writing``/
  ``resume_writing`` pass through to the DERP protocol, ``pause_reading``
  etc. pass down.

:func:`accept_websocket` is the server entry point (called by the HTTP front
door with the parsed h11 request), :func:`websocket_client` the client one
(called by :class:`derp.client.DerpClient` on a freshly dialed transport).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from typing import Any, Final, Protocol, TypeVar, cast

import h11
from websockets.client import ClientProtocol
from websockets.datastructures import Headers
from websockets.frames import CloseCode
from websockets.http11 import Request, Response
from websockets.protocol import OPEN as WS_OPEN
from websockets.server import ServerProtocol
from websockets.typing import Subprotocol
from websockets.uri import parse_uri

from .errors import HandshakeError
from .wsframing import CLOSED, MAX_MESSAGE_SIZE, MAX_SEND_MESSAGE, OPEN, WsFramer

__all__ = [
    "MAX_MESSAGE_SIZE",
    "MAX_SEND_MESSAGE",
    "SUBPROTOCOL",
    "WsPipe",
    "WsTransport",
    "accept_websocket",
    "websocket_client",
]

log = logging.getLogger("derp.websocket")
# websockets logs every open/close at INFO on the logger we pass; keep that quiet.
_ws_log = logging.getLogger("derp.websocket.protocol")
_ws_log.setLevel(logging.WARNING)

SUBPROTOCOL: Final = Subprotocol("derp")
_MAX_RESPONSE_HEAD: Final = 16 * 1024


class _Stats(Protocol):
    websocket_accepts: int


class _Acceptor(Protocol):
    def accept(
        self,
        transport: asyncio.Transport,
        *,
        fast_start: bool = False,
        initial_data: bytes = b"",
        remote_addr: object = None,
    ) -> object: ...


class WsTransport(asyncio.Transport):
    """What the DERP protocol above writes to: every write becomes binary message(s)."""

    __slots__ = ("_pipe",)

    def __init__(self, pipe: WsPipe) -> None:
        super().__init__()
        self._pipe = pipe

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if data:
            self._pipe.send_binary(data if type(data) is bytes else bytes(data))

    def writelines(self, list_of_data: Iterable[bytes | bytearray | memoryview]) -> None:
        self.write(b"".join(list_of_data))

    def close(self) -> None:
        self._pipe.close(CloseCode.NORMAL_CLOSURE)

    def abort(self) -> None:
        self._pipe.closing = True  # later writes are dropped, not sent to a dead socket
        self._pipe.transport.abort()

    def is_closing(self) -> bool:
        return self._pipe.closing or self._pipe.transport.is_closing()

    def can_write_eof(self) -> bool:
        return False

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._pipe.inner = cast(asyncio.Protocol, protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        inner = self._pipe.inner
        assert inner is not None
        return inner

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._pipe.transport.get_extra_info(name, default)

    def pause_reading(self) -> None:
        self._pipe.transport.pause_reading()

    def resume_reading(self) -> None:
        self._pipe.transport.resume_reading()

    def is_reading(self) -> bool:
        return bool(self._pipe.transport.is_reading())

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._pipe.transport.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        return int(self._pipe.transport.get_write_buffer_size())

    def get_write_buffer_limits(self) -> tuple[int, int]:
        limits = self._pipe.transport.get_write_buffer_limits()
        return (int(limits[0]), int(limits[1]))


class WsPipe(asyncio.Protocol):
    """The real transport's protocol: WebSocket frames in, DERP byte stream out.

    ``inner`` is the DERP protocol (server :class:`~derp.server.conn.DerpConnection`
    or the client's link); it is ``None`` until the handshake is done.
    """

    def __init__(self, transport: asyncio.Transport, framer: WsFramer) -> None:
        self.transport = transport
        self.framer = framer
        self.inner: asyncio.Protocol | None = None
        self.closing = False
        self.close_reason = ""
        self.wst = WsTransport(self)

    # ---------------------------------------------------------------- outgoing

    def send_binary(self, data: bytes) -> None:
        """Send ``data`` as binary messages of at most :data:`MAX_SEND_MESSAGE` bytes.

        Dropped once the WebSocket is no longer open: the peer's close frame
        (or EOF, or a protocol error) closes it before the DERP side learns of
        it, and a write then must be a no-op, not an error escaping into
        ``data_received`` or into another connection's task.
        """
        if self.closing or self.framer.state != OPEN:
            return
        self.transport.writelines(self.framer.encode_binary(data))

    def close(self, code: int, reason: str = "") -> None:
        """Send a close frame (if open) and close the connection after it."""
        if self.closing:
            return
        self.closing = True
        self.framer.send_close(code, reason)
        self._flush()
        self.transport.close()

    def _flush(self) -> None:
        out = self.framer.data_to_send()
        if out and not self.transport.is_closing():
            self.transport.writelines(out)

    # ---------------------------------------------------------------- incoming

    def data_received(self, data: bytes) -> None:
        framer = self.framer
        payload = framer.receive_data(data)
        self._flush()  # pongs, close replies
        inner = self.inner
        if payload and inner is not None:
            inner.data_received(payload)
        if framer.state == CLOSED:
            self._closed_by_protocol()

    def _closed_by_protocol(self) -> None:
        framer = self.framer
        if self.close_reason:
            return
        if framer.error:
            reason = f"WebSocket error: {framer.error} (sent {framer.close_code})"
        else:
            reason = f"closed by peer ({_describe_close(framer.close_rcvd)})"
        self.close_reason = reason
        log.info("derp websocket: closing %s: %s", self.peer(), reason)
        self.closing = True
        self.transport.close()

    def peer(self) -> object:
        return self.transport.get_extra_info("peername")

    def eof_received(self) -> bool | None:
        self.framer.receive_eof()
        self.closing = True
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        inner = self.inner
        if inner is not None:
            inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self.inner is not None:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.inner is not None:
            self.inner.resume_writing()


def _describe_close(rcvd: tuple[int, str] | None) -> str:
    """The close frame the peer sent, as ``code N 'reason'`` (``no code`` if empty)."""
    if rcvd is None:
        return "no close frame"
    code, reason = rcvd
    if code == CloseCode.NO_STATUS_RCVD:
        return "no code"
    if code == CloseCode.ABNORMAL_CLOSURE:
        return "no close frame"
    return f"code {code} {reason!r}" if reason else f"code {code}"


# --------------------------------------------------------------------------- server


def _ws_request(req: h11.Request) -> Request:
    headers = Headers()
    for k, v in req.headers:
        headers[k.decode("latin-1")] = v.decode("latin-1")
    return Request(req.target.decode("latin-1"), headers)


def accept_websocket(
    server: _Acceptor,
    transport: asyncio.Transport,
    req: h11.Request,
    leftover: bytes,
    remote_addr: object = None,
    stats: _Stats | None = None,
) -> bool:
    """Answer a ``/derp`` WebSocket upgrade on ``transport`` and start DERP over it.

    Returns False if the handshake was refused (the HTTP error response is
    written and the transport closed), True if the DERP connection started.
    """
    ws = ServerProtocol(
        subprotocols=[SUBPROTOCOL],
        extensions=None,  # no permessage-deflate
        max_size=MAX_MESSAGE_SIZE,
        logger=_ws_log,
    )
    response = ws.accept(_ws_request(req))
    if response.status_code != 101 or ws.subprotocol != SUBPROTOCOL:
        if response.status_code == 101:
            # Negotiated something else: refuse like derper, with 1008.
            ws.send_response(response)
            ws.send_close(CloseCode.POLICY_VIOLATION, "subprotocol derp required")
        else:
            ws.send_response(response)
        for chunk in ws.data_to_send():
            if chunk:
                transport.write(chunk)
        transport.close()
        log.info("derp websocket: refused %s: %s", remote_addr, ws.handshake_exc or "subprotocol")
        return False
    # h11 already parsed the request, so ``ws`` only served to build the
    # response; the framer does the framing from here on.
    ws.send_response(response)
    for chunk in ws.data_to_send():
        transport.write(chunk)
    pipe = WsPipe(transport, WsFramer(client=False))
    transport.set_protocol(pipe)
    if stats is not None:
        stats.websocket_accepts += 1
    server.accept(pipe.wst, fast_start=True, remote_addr=remote_addr)
    if leftover:
        pipe.data_received(leftover)
    return True


# --------------------------------------------------------------------------- client

P = TypeVar("P", bound=asyncio.Protocol)


class _ClientHandshake(WsPipe):
    """Client pipe that completes the WebSocket handshake before attaching ``inner``.

    The response head (up to the blank line) goes to ``websockets``'
    ``ClientProtocol`` for validation; bytes after it are frames, kept in
    ``early`` until :func:`websocket_client` attached the inner protocol.
    """

    def __init__(self, transport: asyncio.Transport, ws: ClientProtocol) -> None:
        super().__init__(transport, WsFramer(client=True))
        self.ws = ws
        self.head = bytearray()
        self.opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        #: bytes that arrived after the 101 response, before ``inner`` was attached
        self.early = b""

    def data_received(self, data: bytes) -> None:
        if self.opened.done():
            if self.inner is None:
                self.early += data
            else:
                super().data_received(data)
            return
        self.head += data
        end = self.head.find(b"\r\n\r\n")
        if end < 0:
            if len(self.head) > _MAX_RESPONSE_HEAD:
                self._refused("response head too large")
            return
        head = bytes(self.head[: end + 4])
        self.early = bytes(self.head[end + 4 :])
        self.head = bytearray()
        ws = self.ws
        ws.receive_data(head)
        if ws.state is WS_OPEN:
            ws.events_received()
            if ws.subprotocol != SUBPROTOCOL:
                self._refused(f"server chose WebSocket subprotocol {ws.subprotocol!r}")
                return
            self.opened.set_result(None)
            return
        exc = getattr(ws, "handshake_exc", None)
        status = head.split(b"\r\n", 1)[0].decode("latin-1")
        self._refused(f"WebSocket upgrade failed: {exc or status}")

    def _refused(self, why: str) -> None:
        if not self.opened.done():
            self.opened.set_exception(HandshakeError(why))
        self.closing = True

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.opened.done():
            self.opened.set_exception(HandshakeError("connection closed during WebSocket upgrade"))
        super().connection_lost(exc)


async def websocket_client(
    transport: asyncio.Transport,
    protocol_factory: Callable[[], P],
    *,
    host_header: str,
    secure: bool,
    path: str = "/derp",
) -> P:
    """Upgrade a connected ``transport`` to a DERP WebSocket; return the inner protocol.

    The inner protocol gets ``connection_made(WsTransport)`` and then the
    binary byte stream. On any failure (or cancellation) the transport is
    aborted and the error raised (:class:`~derp.errors.HandshakeError` for
    refusals).
    """
    uri = parse_uri(f"{'wss' if secure else 'ws'}://{host_header}{path}")
    ws = ClientProtocol(
        uri, subprotocols=[SUBPROTOCOL], extensions=None, max_size=MAX_MESSAGE_SIZE, logger=_ws_log
    )
    pipe = _ClientHandshake(transport, ws)
    transport.set_protocol(pipe)
    try:
        ws.send_request(ws.connect())
        for chunk in ws.data_to_send():
            if chunk:
                transport.write(chunk)
        await pipe.opened
    except BaseException:
        transport.abort()
        raise
    inner = protocol_factory()
    pipe.inner = inner
    inner.connection_made(pipe.wst)
    early, pipe.early = pipe.early, b""
    if early:  # frames that came with the 101 response
        pipe.data_received(early)
    return inner
