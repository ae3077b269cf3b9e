"""Server-side WebSocket over a raw asyncio transport, using ``websockets``' sans-I/O core.

Hand-over flow (the HTTP front door has already parsed and authorized the
request with h11)::

    ws = ServerWebSocket.upgrade(transport, h11_request, extra_headers, trailing_bytes)
      1. the request head is re-serialized and fed to websockets.ServerProtocol,
         which validates the RFC 6455 handshake (``accept``) and builds the 101
      2. the 101 (plus our extra headers) is written; the transport's protocol
         becomes this object; bytes already read after the head are replayed
    await ws.recv()        -> bytes | str | None  (None once closed)
    await ws.send(data)    -> waits while the transport is above its write high-water mark
    await ws.close(code, reason)

Pings: with ``ping_interval`` the server pings; a pong must arrive within
``ping_timeout`` or the connection is closed with 1011. Pings from the client
are answered by websockets automatically.

Weight per connection (there is one per peer): no task and no
``asyncio.Event``. The ping schedule is one loop timer at a time (next ping,
or the pong deadline); a future exists only while someone waits in
:meth:`recv`, :meth:`drain`/:meth:`send` or :meth:`wait_closed`. The
handshake is done by one ``ServerProtocol`` and the connection served by a
second one created in the OPEN state, so the handshake request (headers) is
not kept alive for the connection's life by the first one's parser.

Byte budget (whatever the client sends or refuses to read): reading from the
socket is paused while either

* the transport's write buffer is above its high-water mark (``pause_writing``
  until ``resume_writing``): nothing the client provokes — pongs to its pings,
  the reply to its close frame, echoes — can pile up unread on our side; at
  most one read's worth of replies is written past the mark; or
* the inbound queue holds ``max_queue`` messages or ``max_queue_bytes`` bytes;
  it resumes when the handler has drained it below half of both.

So per connection we hold at most ``max_queue_bytes`` + one message
(``max_size``) + one read of queued input, plus the write buffer's high-water
mark + one read's worth of replies.

CPU budget: a read is fed to the parser :data:`READ_SLICE` bytes at a time,
until it is all parsed or :data:`PARSE_BUDGET` seconds were spent; the rest
waits (reading paused) for a later loop iteration, under the same two
conditions, through the loop's shared lane (:mod:`derp.fairlane`: several
floods together take about one budget per iteration, not one each). A read full of tiny frames (a 256 KiB read holds ~37,000 one-byte
messages, ~7 µs each to parse) so never holds the event loop, and with it
every other connection, for more than a few ms, while bulk data (big frames
are cheap per byte) is parsed a whole read at a time as before. An EOF is
handled after the bytes read before it; bytes read before a connection loss
are dropped.

Logging: the ``websockets`` core logs through
:data:`tailnet.redact.WS_PROTOCOL_LOG`, whose filter removes credentials
(headers, query values, message contents) from its DEBUG output.

Invariants: every write goes through :meth:`_flush`, which writes whatever the
sans-I/O core produced, and closes the transport when the core signals EOF.
Reading is switched only by :meth:`_update_reading`, from the conditions
above (and while read bytes still wait to be parsed).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Sequence
from typing import cast

import h11
from websockets.datastructures import Headers
from websockets.exceptions import InvalidState
from websockets.frames import Frame, Opcode
from websockets.http11 import Request as WsRequest
from websockets.protocol import State
from websockets.server import ServerProtocol

from derp.fairlane import feed_slices, lane_for
from tailnet.redact import WS_PROTOCOL_LOG

__all__ = [
    "ServerWebSocket",
    "CLOSE_GOING_AWAY",
    "CLOSE_PROTOCOL_ERROR",
    "CLOSE_INTERNAL",
    "MAX_QUEUE",
    "MAX_QUEUE_BYTES",
    "READ_SLICE",
    "PARSE_BUDGET",
]

log = logging.getLogger(__name__)

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_INTERNAL = 1011

#: Default inbound queue bounds: messages, and bytes (whichever is reached first).
MAX_QUEUE = 64
MAX_QUEUE_BYTES = 1 << 20
#: Bytes handed to the frame parser at a time, and the parsing time per callback
#: after which the rest of a read waits for the next loop iteration (module
#: docstring: CPU budget).
READ_SLICE = 1024
PARSE_BUDGET = 0.002


class ServerWebSocket(asyncio.Protocol):
    """One accepted WebSocket (see module docstring)."""

    __slots__ = (
        "_proto",
        "_transport",
        "_messages",
        "_queued_bytes",
        "_recv_waiter",
        "_write_paused",
        "_drain_waiter",
        "_max_queue",
        "_max_queue_bytes",
        "_queue_full",
        "_reading",
        "_lost",
        "_lost_waiter",
        "_ping_interval",
        "_ping_timeout",
        "_ping_timer",
        "_ping_data",
        "_close_timer",
        "_rx_pending",
        "_rx_off",
        "_slice_scheduled",
        "_eof_pending",
    )

    def __init__(
        self,
        proto: ServerProtocol,
        transport: asyncio.Transport,
        *,
        ping_interval: float | None = 15.0,
        ping_timeout: float = 30.0,
        max_queue: int = MAX_QUEUE,
        max_queue_bytes: int = MAX_QUEUE_BYTES,
    ) -> None:
        self._proto = proto
        self._transport = transport
        #: received messages not yet taken by recv() (at most max_queue + one read)
        self._messages: list[bytes | str] = []
        self._queued_bytes = 0
        #: futures that exist only while someone waits (see module docstring)
        self._recv_waiter: asyncio.Future[None] | None = None
        self._write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._max_queue = max_queue
        self._max_queue_bytes = max_queue_bytes
        self._queue_full = False
        self._reading = True
        self._lost = False
        self._lost_waiter: asyncio.Future[None] | None = None
        self._ping_interval = ping_interval
        self._ping_timeout = ping_timeout
        #: the next ping, or (after one was sent) the pong deadline
        self._ping_timer: asyncio.TimerHandle | None = None
        #: payload of the ping awaiting its pong (None: no ping outstanding)
        self._ping_data: bytes | None = None
        self._close_timer: asyncio.TimerHandle | None = None
        #: a read not parsed yet from offset _rx_off on (CPU budget), whether a
        #: callback to go on is scheduled, and an EOF received after it
        self._rx_pending: bytes | None = None
        self._rx_off = 0
        self._slice_scheduled = False
        self._eof_pending = False

    # ------------------------------------------------------------------ handshake

    @classmethod
    def upgrade(
        cls,
        transport: asyncio.Transport,
        request: h11.Request,
        *,
        extra_headers: Sequence[tuple[str, str]] = (),
        trailing: bytes = b"",
        max_size: int = 4 << 20,
        ping_interval: float | None = 15.0,
        ping_timeout: float = 30.0,
        max_queue: int = MAX_QUEUE,
        max_queue_bytes: int = MAX_QUEUE_BYTES,
    ) -> ServerWebSocket | None:
        """Perform the handshake on ``transport``; ``None`` if it was not a valid
        WebSocket request (an HTTP error was written and the transport closed).

        ``max_size`` bounds one message; ``max_queue``/``max_queue_bytes`` the
        inbound queue (see the module docstring)."""
        proto = ServerProtocol(max_size=max_size, logger=WS_PROTOCOL_LOG)
        headers = Headers()
        for raw_name, raw_value in request.headers.raw_items():
            headers[raw_name.decode("latin-1")] = raw_value.decode("latin-1")
        ws_req = WsRequest(request.target.decode("latin-1"), headers)
        proto.receive_data(ws_req.serialize())
        events = proto.events_received()
        parsed = events[0] if events and isinstance(events[0], WsRequest) else None
        if parsed is None:
            response = proto.reject(400, "Invalid WebSocket request.\n")
        else:
            response = proto.accept(parsed)
        if response.status_code == 101:
            for name, value in extra_headers:
                response.headers[name] = value
        proto.send_response(response)
        head = proto.data_to_send()
        if response.status_code != 101:
            for chunk in head:
                if chunk:
                    transport.write(chunk)
            transport.close()
            return None
        for chunk in head:
            transport.write(chunk)
        # Serve the connection with a protocol that never saw the request: the
        # handshake one keeps it (and its headers) alive in its parser's frame.
        served = ServerProtocol(state=State.OPEN, max_size=max_size, logger=WS_PROTOCOL_LOG)
        served.extensions = proto.extensions
        served.subprotocol = proto.subprotocol
        ws = cls(
            served,
            transport,
            ping_interval=ping_interval,
            ping_timeout=ping_timeout,
            max_queue=max_queue,
            max_queue_bytes=max_queue_bytes,
        )
        transport.set_protocol(ws)
        transport.resume_reading()  # from here on only _update_reading() switches it
        if ping_interval:
            ws._ping_timer = asyncio.get_running_loop().call_later(ping_interval, ws._send_ping)
        if trailing:
            ws.data_received(trailing)
        return ws

    # ------------------------------------------------------------------ asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # pragma: no cover
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        pending = self._rx_pending
        if pending is not None:  # earlier bytes still wait: keep the order
            self._rx_pending = pending[self._rx_off :] + data
            self._rx_off = 0
            return
        self._parse(data, 0)

    def eof_received(self) -> bool | None:
        if self._rx_pending is not None:
            self._eof_pending = True  # handled once what was read before is parsed
            return True
        self._proto.receive_eof()
        self._process()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._rx_pending = None  # the peer is gone: what it still had sent is moot
        if self._proto.state is not State.CLOSED:
            try:
                self._proto.receive_eof()
            except Exception:  # pragma: no cover - already failing
                pass
        # websockets keeps the parser's exception (EOFError on an abrupt end, or the
        # protocol error) on the protocol; its traceback holds the parser frame, which
        # holds the protocol: a reference cycle per connection unless we cut it.
        parser_exc = self._proto.parser_exc
        if parser_exc is not None:
            parser_exc.__traceback__ = None
        self._lost = True
        self._write_paused = False
        self._wake_recv()
        self._wake_drain()
        fut = self._lost_waiter
        if fut is not None and not fut.done():
            fut.set_result(None)
        if self._ping_timer is not None:
            self._ping_timer.cancel()
            self._ping_timer = None
        if self._close_timer is not None:
            self._close_timer.cancel()
            self._close_timer = None

    def pause_writing(self) -> None:
        self._write_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake_drain()
        self._update_reading()

    # ------------------------------------------------------------------ internals

    def _process(self) -> None:
        for event in self._proto.events_received():
            if not isinstance(event, Frame):
                continue
            if event.opcode is Opcode.BINARY:
                self._messages.append(bytes(event.data))
                self._queued_bytes += len(event.data)
            elif event.opcode is Opcode.TEXT:
                text = bytes(event.data).decode("utf-8", errors="replace")
                self._messages.append(text)
                self._queued_bytes += len(text)  # the same measure recv() subtracts
            elif event.opcode is Opcode.PONG:
                if self._ping_data is not None and bytes(event.data) == self._ping_data:
                    self._pong_received()
            # CONT frames never surface: websockets reassembles fragmented messages
        if self._messages:
            self._wake_recv()
            if (
                len(self._messages) >= self._max_queue
                or self._queued_bytes >= self._max_queue_bytes
            ):
                self._queue_full = True
        if self._proto.state is State.CLOSED:
            self._wake_recv()
        self._flush()
        self._update_reading()

    def _update_reading(self) -> None:
        """Read from the socket only while the queue has room and writes are not
        backpressured (module docstring: byte budget), and no read bytes wait to
        be parsed (those are fed first, a slice per loop iteration)."""
        want = not self._write_paused and not self._queue_full
        if want and self._rx_pending is not None:
            if not self._slice_scheduled and not self._lost:
                self._slice_scheduled = True
                lane_for(asyncio.get_running_loop()).defer(self._next_slice)
            want = False
        if want == self._reading or self._lost:
            return
        self._reading = want
        if want:
            self._transport.resume_reading()
        else:
            self._transport.pause_reading()

    def _parse(self, data: bytes, off: int) -> None:
        """Feed ``data[off:]`` to the parser READ_SLICE bytes at a time until it is
        all parsed or PARSE_BUDGET is spent; the rest waits in ``_rx_pending``
        (reading paused; :meth:`_update_reading` schedules :meth:`_next_slice`)."""
        n = len(data)
        off = feed_slices(self._proto.receive_data, data, off, READ_SLICE, PARSE_BUDGET)
        if off < n:
            self._rx_pending, self._rx_off = data, off
        else:
            self._rx_pending = None
            if self._eof_pending:
                self._eof_pending = False
                self._proto.receive_eof()
        self._process()

    def _next_slice(self) -> None:
        """Go on parsing the current read (see _update_reading)."""
        self._slice_scheduled = False
        pending = self._rx_pending
        if pending is None or self._lost:
            return
        if self._write_paused or self._queue_full:
            return  # _update_reading schedules us again when that changes
        self._parse(pending, self._rx_off)

    def _flush(self) -> None:
        for chunk in self._proto.data_to_send():
            if chunk:
                self._transport.write(chunk)
            else:  # EOF marker: the closing handshake is over on our side
                self._transport.close()
        if self._proto.close_expected() and self._close_timer is None:
            loop = asyncio.get_running_loop()
            self._close_timer = loop.call_later(5.0, self._transport.abort)

    def _wake_recv(self) -> None:
        fut = self._recv_waiter
        if fut is not None:
            self._recv_waiter = None
            if not fut.done():
                fut.set_result(None)

    def _wake_drain(self) -> None:
        fut = self._drain_waiter
        if fut is not None:
            self._drain_waiter = None
            if not fut.done():
                fut.set_result(None)

    # keepalive: one timer at a time (next ping, or the pong deadline)

    def _send_ping(self) -> None:
        self._ping_timer = None
        if not self.open:
            return
        data = os.urandom(4)
        try:
            self._proto.send_ping(data)
        except InvalidState:  # pragma: no cover - not open any more
            return
        self._ping_data = data
        self._flush()
        loop = asyncio.get_running_loop()
        self._ping_timer = loop.call_later(self._ping_timeout, self._pong_overdue)

    def _pong_received(self) -> None:
        self._ping_data = None
        if self._ping_timer is not None:
            self._ping_timer.cancel()
            self._ping_timer = None
        if self._ping_interval and self.open:
            loop = asyncio.get_running_loop()
            self._ping_timer = loop.call_later(self._ping_interval, self._send_ping)

    def _pong_overdue(self) -> None:
        self._ping_timer = None
        if not self.open:
            return
        log.info("websocket: no pong within %.0f s, closing", self._ping_timeout)
        self._start_close(CLOSE_INTERNAL, "keepalive ping timeout")

    def _start_close(self, code: int, reason: str) -> None:
        """Send a close frame (the transport is aborted if the peer does not answer
        within 5 s: see _flush) and wake recv()."""
        if self._proto.state is State.OPEN:
            try:
                self._proto.send_close(code, reason)
            except InvalidState:  # pragma: no cover
                pass
            self._flush()
        self._wake_recv()

    # ------------------------------------------------------------------ public API

    @property
    def open(self) -> bool:
        return self._proto.state is State.OPEN and not self._lost

    @property
    def close_code(self) -> int | None:
        return self._proto.close_code

    @property
    def queued_bytes(self) -> int:
        """Bytes of received messages waiting for :meth:`recv`."""
        return self._queued_bytes

    @property
    def remote(self) -> object:
        return self._transport.get_extra_info("peername")

    async def recv(self) -> bytes | str | None:
        """The next message, or ``None`` once the connection is closing/closed."""
        while True:
            if self._messages:
                msg = self._messages.pop(0)
                self._queued_bytes -= len(msg)
                if (
                    self._queue_full
                    and len(self._messages) <= self._max_queue // 2
                    and self._queued_bytes <= self._max_queue_bytes // 2
                ):
                    self._queue_full = False
                    self._update_reading()
                return msg
            if self._proto.state is not State.OPEN or self._lost:
                return None
            fut = self._recv_waiter
            if fut is None or fut.done():  # done: cancelled with an earlier caller
                fut = self._recv_waiter = asyncio.get_running_loop().create_future()
            await fut

    async def send(self, data: bytes) -> None:
        """Send one binary message; waits while the write buffer is full.

        Raises ``ConnectionError`` if the connection is no longer open.
        """
        if not self.open:
            raise ConnectionError("websocket is closed")
        self._proto.send_binary(data)
        self._flush()
        if self._write_paused:
            await self.drain()

    def write(self, data: bytes) -> None:
        """Queue one binary message without waiting; dropped once not open."""
        if self.open:
            self._proto.send_binary(data)
            self._flush()

    @property
    def writable(self) -> bool:
        """False while the transport's write buffer is above its high-water mark."""
        return not self._write_paused

    async def drain(self) -> None:
        """Return once the write buffer is below its high-water mark or the socket is gone."""
        while self._write_paused:
            fut = self._drain_waiter
            if fut is None:
                fut = self._drain_waiter = asyncio.get_running_loop().create_future()
            # shielded: one waiter's cancellation must not cancel the others' future
            await asyncio.shield(fut)

    async def close(self, code: int = CLOSE_NORMAL, reason: str = "", timeout: float = 5.0) -> None:
        """Start the closing handshake and wait (≤ ``timeout``) until the TCP connection is gone."""
        self._start_close(code, reason)
        if self._lost:
            return
        try:
            await asyncio.wait_for(self.wait_closed(), timeout)
        except TimeoutError:
            self._transport.abort()

    def abort(self) -> None:
        self._transport.abort()

    async def wait_closed(self) -> None:
        """Return once the TCP connection is gone."""
        if self._lost:
            return
        fut = self._lost_waiter
        if fut is None:
            fut = self._lost_waiter = asyncio.get_running_loop().create_future()
        await asyncio.shield(fut)
