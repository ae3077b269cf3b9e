"""DERP over WebSocket (spec §2.3): both sides, on top of ``websockets``' sans-I/O core.

After an RFC 6455 handshake with subprotocol ``derp`` the WebSocket is just a
byte stream carrying the usual DERP frames (ServerKey first, no 101 DERP
headers, no fast start). Each write becomes one binary message; received
binary messages (and their continuation frames) are concatenated, so a
message may hold several DERP frames or part of one. The DERP code above
never sees WebSocket framing: it talks to a :class:`WsTransport`, a thin
``asyncio.Transport`` look-alike, exactly as it would to a TCP transport.

Wiring (server)::

    TCP transport ──► WsPipe (asyncio.Protocol; websockets.ServerProtocol inside)
                        │ binary payloads        ▲ send_binary(write data)
                        ▼                        │
                      DerpConnection  ◄──────  WsTransport

Rules, both sides:

* permessage-deflate is never negotiated (WireGuard data is incompressible);
* a text message closes the connection with 1003 (unsupported data);
* close codes 1000/1001 (or any close frame) are end of stream for DERP;
* outgoing bytes are split into messages of at most :data:`MAX_SEND_MESSAGE`
  (32 KiB): Go's WebSocket library (what Tailscale's client and Coder use)
  accepts at most 32,768 bytes per message by default and closes a larger one
  with 1009; DERP over WebSocket is a byte stream, so the cut may fall
  anywhere, even inside a frame;
* an incoming message larger than :data:`MAX_MESSAGE_SIZE` (256 KiB + 64: a
  ClientInfo of the maximal size, or several 64 KiB packets in one flush)
  closes with 1009; malformed framing closes with 1002; the reason (and the
  close code and reason the peer sent) is logged at INFO;
* flow control is the TCP transport's: ``pause_writing``/``resume_writing``
  pass through to the DERP protocol, ``pause_reading`` etc. pass down;
* server side only: while the TCP write buffer is above its high-water mark
  (``pause_writing`` until ``resume_writing``) reading from the socket pauses
  too, so WebSocket pings (each answered with a pong by the framing layer,
  below the DERP connection's own write queues) cannot grow the server
  without bound from a client that never reads; the DERP write timeout then
  drops such a client as it would over TCP. Reading resumes only when neither
  this nor the DERP side (rate limit, admission) wants it paused.

CPU budget: a read is fed to the frame parser :data:`READ_SLICE` bytes at a
time until it is all parsed or :data:`PARSE_BUDGET` seconds went by; what was
parsed is delivered (one ``data_received`` for all its binary payloads), and
the rest waits, socket reading paused, for a later loop iteration (through
the loop's shared lane, :mod:`derp.fairlane`, so several floods together take
about one budget per iteration), and only while neither the DERP side nor the
write buffer holds reading (so the byte budgets above hold for it too). A read full of
one-byte messages (a 256 KiB read holds ~37,000; ~3 µs each in the parser) so
holds the event loop for a few ms at a time, not for 100 ms. Bytes read
meanwhile are appended after the pending ones, an EOF is handled after them,
and a connection loss drops them. Reads that fit in one slice (the per-packet
case) are fed at once, as before.

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
from websockets.frames import CloseCode, Frame, Opcode
from websockets.http11 import Request
from websockets.protocol import CLIENT, OPEN, SERVER, Protocol as WsProtocol
from websockets.server import ServerProtocol
from websockets.typing import Subprotocol
from websockets.uri import parse_uri

from .fairlane import feed_slices, lane_for
from .errors import HandshakeError
from .frames import HEADER_LEN, MAX_CLIENT_INFO_LEN

__all__ = [
    "MAX_MESSAGE_SIZE",
    "MAX_SEND_MESSAGE",
    "PARSE_BUDGET",
    "READ_SLICE",
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
#: Largest WebSocket message accepted (either side).
MAX_MESSAGE_SIZE: Final = MAX_CLIENT_INFO_LEN + HEADER_LEN + 59
#: Largest WebSocket message sent (either side): Go's default read limit.
MAX_SEND_MESSAGE: Final = 32 * 1024
#: Bytes fed to the frame parser at a time, and the parsing time per callback
#: after which the rest of a read waits for a later loop iteration (module
#: docstring: CPU budget).
READ_SLICE: Final = 4 * 1024
PARSE_BUDGET: Final = 0.002

_BINARY, _CONT, _TEXT, _CLOSE = Opcode.BINARY, Opcode.CONT, Opcode.TEXT, Opcode.CLOSE


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
    """What the DERP protocol above writes to: every write is one binary message."""

    __slots__ = ("_pipe",)

    def __init__(self, pipe: WsPipe) -> None:
        super().__init__()
        self._pipe = pipe

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if data:
            self._pipe.send_binary(data)

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
        self._pipe.set_reading_paused(inner=True)

    def resume_reading(self) -> None:
        self._pipe.set_reading_paused(inner=False)

    def is_reading(self) -> bool:
        return not self._pipe.inner_paused and bool(self._pipe.transport.is_reading())

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
    or the client's link); it is ``None`` until the handshake is done, and
    bytes received before that are buffered in the websockets parser.
    """

    def __init__(
        self, transport: asyncio.Transport, ws: WsProtocol, *, read_follows_write: bool = False
    ) -> None:
        self.transport = transport
        self.ws = ws
        self.inner: asyncio.Protocol | None = None
        self.closing = False
        self.close_reason = ""
        self.wst = WsTransport(self)
        #: client frames are masked (RFC 6455 §5.3)
        self._mask = ws.side is CLIENT
        #: pause reading while the socket's writes are backpressured (server side)
        self.read_follows_write = read_follows_write
        #: the DERP side asked to pause reading (rate limit, admission)
        self.inner_paused = False
        #: the socket is above its write high-water mark
        self.write_paused = False
        #: part of a read waits to be parsed (CPU budget): ``_rx[_rx_off:]``; an
        #: EOF that came after it; whether a callback to go on is scheduled
        self.parse_paused = False
        self._rx: bytes | None = None
        self._rx_off = 0
        self._eof_pending = False
        self._slice_scheduled = False

    def set_reading_paused(
        self, *, inner: bool | None = None, write: bool | None = None, parse: bool | None = None
    ) -> None:
        """Record why reading should pause; read from the socket only if nobody wants a pause.

        The rest of a read still waiting to be parsed (``parse``) goes on once
        neither the DERP side nor the write buffer holds reading.
        """
        was = self.inner_paused or self.write_paused or self.parse_paused
        if inner is not None:
            self.inner_paused = inner
        if write is not None:
            self.write_paused = write
        if parse is not None:
            self.parse_paused = parse
        now = self.inner_paused or self.write_paused or self.parse_paused
        if self._rx is not None and not self.closing:
            self._schedule_slice()
        if now != was and not self.closing:
            if now:
                self.transport.pause_reading()
            else:
                self.transport.resume_reading()

    # ---------------------------------------------------------------- outgoing

    def send_binary(self, data: bytes | bytearray | memoryview) -> None:
        """Send ``data`` as binary messages of at most :data:`MAX_SEND_MESSAGE` bytes.

        Dropped once the WebSocket is no longer OPEN.

        The peer's close frame (or EOF, or a protocol error) leaves the
        websockets state CLOSING/CLOSED before the DERP side learns of it, and
        a write then must be a no-op, not an ``InvalidState`` escaping into
        ``data_received`` or into another connection's task.
        """
        ws = self.ws
        if self.closing or ws.state is not OPEN:
            return
        # What ws.send_binary does, minus its per-call bookkeeping (~0.3 µs a
        # message): websockets' own Frame serializes the message, and it goes
        # straight to the socket. Whatever the protocol itself queued (pongs,
        # close replies) is flushed as soon as it is produced, so it is sent
        # first and the order of frames on the wire is kept.
        self._flush()
        mask = self._mask
        n = len(data)
        if n <= MAX_SEND_MESSAGE:
            self.transport.write(Frame(_BINARY, data).serialize(mask=mask))
        else:
            view = memoryview(data)
            self.transport.write(
                b"".join(
                    Frame(_BINARY, view[i : i + MAX_SEND_MESSAGE]).serialize(mask=mask)
                    for i in range(0, n, MAX_SEND_MESSAGE)
                )
            )

    def close(self, code: int, reason: str = "") -> None:
        """Send a close frame (if open) and close the TCP connection after it."""
        if self.closing:
            return
        self.closing = True
        if self.ws.state is OPEN:
            self.ws.send_close(code, reason)
            self._flush()
        self.transport.close()

    def _flush(self) -> None:
        writes = self.ws.data_to_send()
        if not writes:
            return
        eof = False
        if writes[-1] == b"":  # websockets' SEND_EOF marker: half-close after these bytes
            writes.pop()
            eof = True
        if writes:
            self.transport.write(writes[0] if len(writes) == 1 else b"".join(writes))
        if eof:
            self.closing = True
            self.transport.close()

    # ---------------------------------------------------------------- incoming

    def data_received(self, data: bytes) -> None:
        pending = self._rx
        if pending is not None:  # earlier bytes still wait to be parsed: keep the order
            self._rx = pending[self._rx_off :] + data
            self._rx_off = 0
            return
        self._parse(data, 0)

    def _parse(self, data: bytes, off: int) -> None:
        """Feed ``data[off:]`` to the framing layer, within the CPU budget; deliver.

        A read that fits in :data:`READ_SLICE` is fed at once (the common case).
        A longer one is fed a slice at a time until it is all fed or
        :data:`PARSE_BUDGET` seconds went by; the rest waits in ``_rx`` with
        reading paused, and :meth:`_next_slice` goes on in a later loop
        iteration. What was parsed is delivered before that, in one call.
        """
        n = len(data)
        off = feed_slices(self.ws.receive_data, data, off, READ_SLICE, PARSE_BUDGET)
        if off < n:
            self._rx, self._rx_off = data, off
            self._process()
            if self.closing:  # closed while delivering: the rest is of no use
                self._rx = None
            else:
                self.set_reading_paused(parse=True)
                self._schedule_slice()
            return
        self._rx = None
        self._rx_off = 0
        self._process()
        if self._eof_pending:  # as eof_received would have, then close (it returned True)
            self._eof_pending = False
            self.ws.receive_eof()
            self._flush()
            if not self.closing:
                self.closing = True
                self.transport.close()
            return
        if self.parse_paused:
            self.set_reading_paused(parse=False)

    def _schedule_slice(self) -> None:
        if not self._slice_scheduled and not self.inner_paused and not self.write_paused:
            self._slice_scheduled = True
            lane_for(asyncio.get_running_loop()).defer(self._next_slice)

    def _next_slice(self) -> None:
        """Go on parsing the pending read (see :meth:`_parse`)."""
        self._slice_scheduled = False
        pending = self._rx
        if pending is None:
            return
        if self.closing:
            self._rx = None
            return
        if self.inner_paused or self.write_paused:
            return  # set_reading_paused schedules us again once both clear
        self._parse(pending, self._rx_off)

    def _process(self) -> None:
        self._handle(self.ws.events_received())

    def _handle(self, events: list[Any]) -> None:
        ws = self.ws
        chunks: list[bytes] = []
        reason = ""
        for ev in events:
            op = getattr(ev, "opcode", None)
            if op is _BINARY or op is _CONT:
                if not reason:
                    chunks.append(bytes(ev.data))
            elif op is _TEXT:
                if not reason:
                    reason = "text message on a DERP WebSocket"
                    ws.fail(CloseCode.UNSUPPORTED_DATA, "DERP needs binary messages")
            elif op is _CLOSE:
                reason = reason or f"closed by peer ({_describe_close(ws)})"
        exc = getattr(ws, "parser_exc", None)
        if exc is not None and not reason:
            reason = f"WebSocket error: {exc}"
        self._flush()  # pongs, close replies, EOF
        inner = self.inner
        if chunks and inner is not None:
            inner.data_received(chunks[0] if len(chunks) == 1 else b"".join(chunks))
        if reason and not self.close_reason:
            self.close_reason = reason
            log.info("derp websocket: closing %s: %s", self.peer(), reason)
            self.closing = True
            self.transport.close()

    def peer(self) -> object:
        return self.transport.get_extra_info("peername")

    def eof_received(self) -> bool | None:
        if self._rx is not None:
            self._eof_pending = True  # handled once the bytes read before it are parsed
            return True
        self.ws.receive_eof()
        self._flush()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self._rx = None  # the peer is gone: what it still had sent is moot
        inner = self.inner
        if inner is not None:
            inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self.read_follows_write:
            self.set_reading_paused(write=True)
        if self.inner is not None:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.read_follows_write:
            self.set_reading_paused(write=False)
        if self.inner is not None:
            self.inner.resume_writing()


def _describe_close(ws: WsProtocol) -> str:
    """The close frame the peer sent, as ``code N "reason"`` (``no code`` if empty).

    ``ws.close_code`` is not set until the closing handshake completes, so it
    reads ``None`` while the reply is still being sent: use the frame itself.
    """
    rcvd = ws.close_rcvd
    if rcvd is None:
        return "no close frame"
    code = int(rcvd.code)
    if code == CloseCode.NO_STATUS_RCVD:
        return "no code"
    return f"code {code} {rcvd.reason!r}" if rcvd.reason else f"code {code}"


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
    # response; a fresh OPEN protocol does the framing from here on.
    ws.send_response(response)
    for chunk in ws.data_to_send():
        transport.write(chunk)
    framing = WsProtocol(SERVER, state=OPEN, max_size=MAX_MESSAGE_SIZE, logger=_ws_log)
    pipe = WsPipe(transport, framing, read_follows_write=True)
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
    """Client pipe that completes the WebSocket handshake before attaching ``inner``."""

    def __init__(self, transport: asyncio.Transport, ws: ClientProtocol) -> None:
        super().__init__(transport, ws)
        self.opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        #: frames that arrived together with the 101 response
        self.early: list[Any] = []

    def _process(self) -> None:
        if self.inner is None and self.opened.done():
            # Upgraded, inner not attached yet: keep frames for websocket_client().
            self.early.extend(e for e in self.ws.events_received() if hasattr(e, "opcode"))
            return
        if self.inner is None:
            ws = self.ws
            if ws.state is OPEN:
                # The Response event is first; frames may follow in the same read.
                events = ws.events_received()
                if ws.subprotocol != SUBPROTOCOL:
                    self.opened.set_exception(
                        HandshakeError(f"server chose WebSocket subprotocol {ws.subprotocol!r}")
                    )
                    return
                self.early = [e for e in events if hasattr(e, "opcode")]
                self.opened.set_result(None)
                return  # frames are processed once inner is attached
            handshake_exc = getattr(ws, "handshake_exc", None)
            if handshake_exc is not None:
                self.opened.set_exception(
                    HandshakeError(f"WebSocket upgrade failed: {handshake_exc}")
                )
                self._flush()
                return
            return
        super()._process()

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
        pipe._flush()
        await pipe.opened
    except BaseException:
        transport.abort()
        raise
    inner = protocol_factory()
    pipe.inner = inner
    inner.connection_made(pipe.wst)
    early, pipe.early = pipe.early, []
    pipe._handle(early + ws.events_received())  # frames that came with the 101 response
    return inner
