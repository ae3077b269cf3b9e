"""Sans-I/O yamux v0.1.2 core, wire-compatible with hashicorp/yamux as Coder runs it.

Coder multiplexes DRPC over one WebSocket byte stream with yamux (DefaultConfig on both
sides). This module is only the state machine: bytes in (:meth:`Session.receive_data`),
events out (:meth:`Session.events_received`), bytes out (:meth:`Session.data_to_send`),
commands as methods. No sockets, no clock, no asyncio. One owner calls it (one task).
After every ``receive_data``/``receive_eof``/command the caller must send
``data_to_send()`` to the transport and handle ``events_received()``.

Wire format (spec coder-transport.md §2)
----------------------------------------
Every frame starts with a 12-byte big-endian header::

    version u8 (=0) | type u8 | flags u16 | stream id u32 | length u32

=================  ======================================  ============
type               length means                            body
=================  ======================================  ============
0 Data             payload bytes that follow               ``length``
1 WindowUpdate     credit added to the receiver's send     none
                   window of that stream
2 Ping             opaque value echoed in the reply        none
3 GoAway           reason: 0 normal, 1 protocol, 2 internal none
=================  ======================================  ============

Flags (Data or WindowUpdate; SYN/ACK also on Ping): SYN 1 open, ACK 2 accept,
FIN 4 half-close, RST 8 reset. Ping and GoAway use stream id 0.

Stream flow (who sends what)
----------------------------
::

    opener                                   acceptor
    open_stream()  WindowUpdate|SYN len 0 ─►  StreamOpened (SYN-received, in backlog)
    send_data() may follow at once, up to the initial 256 KiB window, before any ACK
    StreamAccepted ◄─ WindowUpdate|ACK len 0  accept_stream()   (Go ACKs on Accept)
    close_stream() WindowUpdate|FIN ───────►  StreamEnded  (half-close; it may still send)
    StreamEnded    ◄────────────────── FIN    close_stream()
    StreamClosed (both FINs exchanged: the stream is forgotten on each side)

* Ids: the yamux client opens odd ids from 1, the server even ids from 2, step 2, never
  reused; opening fails at ids >= 2**32 - 2. Received ids are not parity-checked (as Go).
* The first frame we send on an inbound stream carries ACK (accept_stream's
  WindowUpdate, or the first Data frame, or the FIN: ``FIN|ACK`` = 0x0006).
* Flags on a received frame are applied in Go's order: SYN (before the stream lookup),
  then ACK, FIN, RST. Data frames may carry any of them; the payload of a Data frame with
  FIN is delivered before :class:`StreamEnded`.
* RST (either way) forgets the stream at once; pending outbound data is dropped.
* Frames for unknown ids are ignored without reply (a Data payload is skipped).
* Incoming SYN is answered with WindowUpdate|RST (and nothing is emitted) while we have
  sent GoAway, when ``max_streams`` live streams exist, or when ``accept_backlog``
  opened streams are not yet accepted. A SYN on a live id is fatal.

Flow control (per stream, per direction; no session-wide window)
----------------------------------------------------------------
* Both directions start at :data:`INITIAL_WINDOW` (256 KiB). Only Data payload counts.
* Sending: each Data frame carries at most the current send window; the rest stays
  pending (:meth:`Session.pending_bytes`) in order and is framed when WindowUpdates
  arrive (:class:`WindowOpened`). A FIN requested by ``close_stream`` goes out only after
  all pending data.
* Receiving: a Data frame longer than the remaining receive window is fatal. Received
  bytes stay "buffered" until the application reports them with :meth:`Session.consumed`.
  Credit is Go's ``delta = window - buffered - recv_window``, sent as a WindowUpdate (flags
  0) only when ``delta >= window // 2`` (128 KiB by default), or with any value when it
  rides on SYN/ACK. So at any time ``recv_window + buffered <= window``, and a session's
  inbound memory is bounded by ``window * max_streams`` plus one partial header.

What is fatal (the session ends with :class:`ConnectionTerminated`)
-------------------------------------------------------------------
Detected locally (GoAway(1) is queued, ``remote=False``): version != 0, type > 3,
duplicate SYN on a live id, a Data frame larger than the receive window, a FIN on a
stream that already received FIN. Remote (nothing is sent back, ``remote=True``):
GoAway with code 1, 2 or unknown (after :class:`GoAwayReceived`), transport EOF. Local:
:meth:`Session.terminate`. Not fatal: frames for unknown ids, RST, GoAway 0, an ACK ping
with an unknown id. After termination all input is ignored; ``open_stream``,
``send_data`` and ``ping`` raise :class:`YamuxError`; other commands do nothing; queued
output (with the GoAway) is still returned by ``data_to_send``; live streams are dropped
without per-stream events.

Timers (Go's keepalive every 30 s with a 10 s reply deadline, StreamOpenTimeout 75 s,
StreamCloseTimeout 5 min) belong to the adapter: it owns the clock and calls
:meth:`Session.ping`, :meth:`Session.reset_stream` and :meth:`Session.terminate`.

Deliberate differences from Go, all invisible to a conforming peer: a locally detected
protocol error always queues GoAway(1) (Go skips it for a bad version or type); the
first frame on an inbound stream always carries ACK (Go omits it when the peer's FIN
arrived before Accept); ``close_stream`` flushes pending data before FIN (Go's Close
fails a blocked Write); data received after the peer's FIN is dropped (Go buffers it).
"""

from __future__ import annotations

import struct
from collections import deque
from dataclasses import dataclass
from enum import IntEnum, IntFlag
from typing import NamedTuple, TypeAlias

__all__ = [
    "HEADER_LEN",
    "INITIAL_WINDOW",
    "VERSION",
    "MAX_STREAM_ID",
    "FrameType",
    "Flag",
    "GoAwayCode",
    "Header",
    "encode_header",
    "decode_header",
    "YamuxError",
    "YamuxProtocolError",
    "YamuxStreamError",
    "StreamOpened",
    "StreamAccepted",
    "DataReceived",
    "StreamEnded",
    "StreamReset",
    "StreamClosed",
    "WindowOpened",
    "PingReceived",
    "PingAcked",
    "GoAwayReceived",
    "ConnectionTerminated",
    "Event",
    "Session",
]

HEADER_LEN = 12
"""Size of every frame header."""
INITIAL_WINDOW = 256 * 1024
"""Initial per-stream window in both directions (Go's initialStreamWindow)."""
VERSION = 0
"""The only protocol version."""
MAX_STREAM_ID = 0xFFFF_FFFF
"""Largest 32-bit value (stream ids, lengths, ping opaques)."""

_U32 = 0xFFFF_FFFF
# Go refuses to open ids >= MaxUint32 - 1 (ErrStreamsExhausted).
_ID_LIMIT = 0xFFFF_FFFF - 1


class FrameType(IntEnum):
    """Header ``type`` byte."""

    DATA = 0
    WINDOW_UPDATE = 1
    PING = 2
    GO_AWAY = 3


class Flag(IntFlag):
    """Header ``flags`` bits."""

    SYN = 1
    ACK = 2
    FIN = 4
    RST = 8


class GoAwayCode(IntEnum):
    """GoAway reason codes (carried in ``length``)."""

    NORMAL = 0
    PROTOCOL_ERROR = 1
    INTERNAL_ERROR = 2


# Plain ints for the hot path (enum member access is slower than a global int).
_DATA = 0
_WU = 1
_PING = 2
_GOAWAY = 3
_SYN = 1
_ACK = 2
_FIN = 4
_RST = 8

_HDR = struct.Struct(">BBHII")
_pack = _HDR.pack
_unpack_from = _HDR.unpack_from


class YamuxError(Exception):
    """Base of all yamux errors; ``code`` is the GoAway code that fits (2 = internal)."""

    code: int = GoAwayCode.INTERNAL_ERROR

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class YamuxProtocolError(YamuxError):
    """The remote violated the protocol (GoAway code 1)."""

    code: int = GoAwayCode.PROTOCOL_ERROR


class YamuxStreamError(YamuxError):
    """A stream command on a stream that is reset, closed for writing or unknown."""

    def __init__(self, message: str, stream_id: int) -> None:
        super().__init__(message)
        self.stream_id = stream_id


class Header(NamedTuple):
    """A decoded frame header."""

    version: int
    type: FrameType
    flags: Flag
    stream_id: int
    length: int


def encode_header(ftype: int, flags: int, stream_id: int, length: int) -> bytes:
    """Encode a 12-byte header (version 0). ``ValueError`` if a field is out of range."""
    try:
        return _pack(VERSION, ftype, flags, stream_id, length)
    except struct.error as exc:
        raise ValueError(f"yamux header field out of range: {exc}") from None


def decode_header(buf: bytes | bytearray | memoryview) -> Header:
    """Decode the first 12 bytes of ``buf``.

    Raises :class:`YamuxProtocolError` on version != 0 or type > 3 (both session-fatal in
    Go), ``ValueError`` if fewer than 12 bytes are given. Unknown flag bits are kept.
    """
    if len(buf) < HEADER_LEN:
        raise ValueError(f"yamux header needs {HEADER_LEN} bytes, got {len(buf)}")
    version, ftype, flags, stream_id, length = _unpack_from(buf, 0)
    if version != VERSION:
        raise YamuxProtocolError(f"invalid protocol version {version}")
    if ftype > _GOAWAY:
        raise YamuxProtocolError(f"invalid msg type {ftype}")
    return Header(version, FrameType(ftype), Flag(flags), stream_id, length)


# ------------------------------------------------------------------------------------
# Events


@dataclass(frozen=True, slots=True)
class StreamOpened:
    """The peer sent SYN for a new stream; call :meth:`Session.accept_stream` to ACK it."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamAccepted:
    """The peer ACKed a stream we opened."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class DataReceived:
    """Payload bytes; they count against the receive window until ``consumed()``.

    One Data frame may be reported as several events when it arrives in pieces.
    """

    stream_id: int
    data: bytes


@dataclass(frozen=True, slots=True)
class StreamEnded:
    """The peer sent FIN: no more data will arrive; we may still send."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamReset:
    """The peer sent RST: the stream is gone and pending outbound data was discarded."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamClosed:
    """Both FINs were exchanged: the stream is forgotten."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class WindowOpened:
    """The peer granted window and pending outbound bytes were framed."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class PingReceived:
    """The peer pinged us; the ACK reply is already queued."""

    opaque: int


@dataclass(frozen=True, slots=True)
class PingAcked:
    """The reply to a ping we sent."""

    opaque: int


@dataclass(frozen=True, slots=True)
class GoAwayReceived:
    """The peer sent GoAway. Code 0: no new local streams; others are followed by
    :class:`ConnectionTerminated`."""

    code: int


@dataclass(frozen=True, slots=True)
class ConnectionTerminated:
    """The session is over.

    ``code`` is the GoAway code we sent (local) or received (remote; 0 for EOF);
    ``remote`` is true when the peer ended the session (error GoAway or EOF).
    """

    code: int
    reason: str
    remote: bool


Event: TypeAlias = (
    StreamOpened
    | StreamAccepted
    | DataReceived
    | StreamEnded
    | StreamReset
    | StreamClosed
    | WindowOpened
    | PingReceived
    | PingAcked
    | GoAwayReceived
    | ConnectionTerminated
)

_REMOTE_GO_AWAY_REASONS: dict[int, str] = {
    GoAwayCode.PROTOCOL_ERROR: "yamux protocol error",
    GoAwayCode.INTERNAL_ERROR: "remote yamux internal error",
}


class _Stream:
    """Per-stream state. Go's states map onto the flags: SYN-sent = outbound and not
    acked; SYN-received = need_ack; LocalClose = fin_sent; RemoteClose = remote_fin;
    Closed = both (then forgotten); Reset = forgotten."""

    __slots__ = (
        "id",
        "outbound",
        "acked",
        "need_ack",
        "send_window",
        "recv_window",
        "buffered",
        "pending",
        "pending_len",
        "fin_requested",
        "fin_sent",
        "remote_fin",
        "gone",
    )

    def __init__(self, stream_id: int, outbound: bool) -> None:
        self.id = stream_id
        self.outbound = outbound
        self.acked = False  # outbound: the peer's ACK arrived
        self.need_ack = not outbound  # inbound: our first frame must carry ACK
        self.send_window = INITIAL_WINDOW
        self.recv_window = INITIAL_WINDOW
        # received (or announced by the current frame header) but not yet consumed()
        self.buffered = 0
        self.pending: deque[memoryview] | None = None
        self.pending_len = 0
        self.fin_requested = False  # close_stream() called: no more send_data
        self.fin_sent = False
        self.remote_fin = False
        self.gone = False  # forgotten (reset, closed or session over)


class Session:
    """One yamux session (either end). See the module docstring for the protocol.

    ``client`` picks the id parity of streams we open (odd for the yamux client).
    ``window`` is our receive window per stream (Go's MaxStreamWindowSize, >= 256 KiB).
    ``accept_backlog`` bounds opened-but-unaccepted inbound streams (Go: 256);
    ``max_streams`` bounds live streams of both directions (our own memory guard).
    """

    def __init__(
        self,
        *,
        client: bool,
        accept_backlog: int = 256,
        max_streams: int = 1024,
        window: int = INITIAL_WINDOW,
    ) -> None:
        if not INITIAL_WINDOW <= window <= _U32:
            raise ValueError(f"window must be in [{INITIAL_WINDOW}, {_U32}], got {window}")
        if accept_backlog < 1 or max_streams < 1:
            raise ValueError("accept_backlog and max_streams must be >= 1")
        self._client = client
        self._accept_backlog = accept_backlog
        self._max_streams = max_streams
        self._window = window
        self._half = window // 2
        self._streams: dict[int, _Stream] = {}
        self._next_id = 1 if client else 2
        self._backlog = 0  # live inbound streams still owing our ACK
        self._ping_id = 0
        self._pings: set[int] = set()
        self._local_go_away = False
        self._remote_go_away = False
        self._terminated = False
        self._events: list[Event] = []
        self._out: list[bytes | memoryview] = []
        # Receive side: a partial header, or the rest of a Data payload.
        self._hdr = bytearray()
        self._rx_remaining = 0
        self._rx_stream: _Stream | None = None  # payload goes there; None: skip it
        self._rx_fin: _Stream | None = None  # FIN of the current frame, reported at its end

    # --------------------------------------------------------------------------------
    # Introspection

    @property
    def client(self) -> bool:
        """True for the yamux client (odd stream ids)."""
        return self._client

    @property
    def terminated(self) -> bool:
        """True once the session is over."""
        return self._terminated

    @property
    def streams(self) -> int:
        """Number of live streams (both directions)."""
        return len(self._streams)

    @property
    def local_go_away(self) -> bool:
        """We sent GoAway: incoming SYNs are refused."""
        return self._local_go_away

    @property
    def remote_go_away(self) -> bool:
        """The peer sent GoAway 0: :meth:`open_stream` fails."""
        return self._remote_go_away

    @property
    def backlog(self) -> int:
        """Inbound streams not yet accepted (nor acknowledged by a frame of ours)."""
        return self._backlog

    def stream_ids(self) -> list[int]:
        """Ids of the live streams."""
        return list(self._streams)

    def is_open(self, stream_id: int) -> bool:
        """True while the stream is live (not reset, not fully closed)."""
        return stream_id in self._streams

    def send_window(self, stream_id: int) -> int:
        """Bytes we may still send on the stream now (0 if unknown)."""
        st = self._streams.get(stream_id)
        return st.send_window if st is not None else 0

    def recv_window(self, stream_id: int) -> int:
        """Bytes the peer may still send on the stream now (0 if unknown)."""
        st = self._streams.get(stream_id)
        return st.recv_window if st is not None else 0

    def pending_bytes(self, stream_id: int) -> int:
        """Outbound bytes not yet framed, waiting for window (0 if unknown)."""
        st = self._streams.get(stream_id)
        return st.pending_len if st is not None else 0

    # --------------------------------------------------------------------------------
    # I/O

    def events_received(self) -> list[Event]:
        """Return and clear the events produced since the last call."""
        events = self._events
        self._events = []
        return events

    def data_to_send(self) -> bytes:
        """Return and clear everything queued for the transport (``b""`` if nothing).

        A frame's header and body are always adjacent.
        """
        out = self._out
        if not out:
            return b""
        self._out = []
        if len(out) == 1:
            only = out[0]
            if type(only) is bytes:
                return only
        return b"".join(out)

    def receive_eof(self) -> None:
        """The transport is gone: the session ends (``ConnectionTerminated(remote=True)``)."""
        if self._terminated:
            return
        reason = "connection closed by peer"
        if self._hdr or self._rx_remaining:
            reason += " in the middle of a frame"
        self._terminate(GoAwayCode.NORMAL, reason, remote=True, send=False)

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes from the transport, split anywhere.

        Never raises for peer misbehaviour: a protocol error ends the session with
        :class:`ConnectionTerminated` and queues GoAway(1). Holds at most one partial
        header between calls (payload bytes are handed out as they arrive).
        """
        if self._terminated or not data:
            return
        buf: bytes = data if type(data) is bytes else bytes(data)
        n = len(buf)
        off = 0
        events = self._events
        hdr = self._hdr
        while off < n:
            remaining = self._rx_remaining
            if remaining:
                take = n - off
                if take > remaining:
                    take = remaining
                st = self._rx_stream
                if st is not None and not st.gone:
                    chunk = buf if take == n else buf[off : off + take]
                    events.append(DataReceived(st.id, chunk))
                off += take
                remaining -= take
                self._rx_remaining = remaining
                if not remaining:
                    self._end_frame()
                continue
            if hdr:
                need = HEADER_LEN - len(hdr)
                hdr += buf[off : off + need]
                off += need
                if len(hdr) < HEADER_LEN:
                    return
                version, ftype, flags, sid, length = _unpack_from(hdr, 0)
                hdr.clear()
            elif n - off >= HEADER_LEN:
                version, ftype, flags, sid, length = _unpack_from(buf, off)
                off += HEADER_LEN
            else:
                hdr += buf[off:]
                return
            if version != VERSION:
                self._protocol_error(f"invalid protocol version {version}")
                return
            if ftype <= _WU:
                self._on_stream_frame(ftype, flags, sid, length)
            elif ftype == _PING:
                self._on_ping(flags, length)
            elif ftype == _GOAWAY:
                self._on_go_away(length)
            else:
                self._protocol_error(f"invalid msg type {ftype}")
            if self._terminated:
                return

    # --------------------------------------------------------------------------------
    # Commands

    def open_stream(self) -> int:
        """Open a stream: queue WindowUpdate|SYN (delta = window - 256 KiB, 0 by default).

        Data may be sent at once, before the peer's ACK. Raises :class:`YamuxError` if
        the session is over, the peer sent GoAway, ``max_streams`` streams are live or
        the ids are exhausted.
        """
        if self._terminated:
            raise YamuxError("session terminated")
        if self._remote_go_away:
            raise YamuxError("remote end is not accepting connections")
        streams = self._streams
        if len(streams) >= self._max_streams:
            raise YamuxError(f"too many streams ({len(streams)})")
        sid = self._next_id
        while sid in streams:  # only if the peer SYNed one of our ids
            sid += 2
        if sid >= _ID_LIMIT:
            raise YamuxError("streams exhausted")
        self._next_id = sid + 2
        st = _Stream(sid, outbound=True)
        streams[sid] = st
        self._send_window_update(st, _SYN)
        return sid

    def accept_stream(self, stream_id: int) -> None:
        """ACK an inbound stream (WindowUpdate|ACK, delta 0 by default), as Go's Accept.

        No-op if the stream is unknown (e.g. already reset) or already acknowledged.
        """
        if self._terminated:
            return
        st = self._streams.get(stream_id)
        if st is None:
            return
        if st.outbound:
            raise YamuxStreamError(f"stream {stream_id} was opened locally", stream_id)
        if st.need_ack:
            st.need_ack = False
            self._backlog -= 1
            self._send_window_update(st, _ACK)

    def send_data(self, stream_id: int, data: bytes | bytearray | memoryview) -> None:
        """Queue ``data`` on the stream.

        Frames as much as the send window allows now (Data frames of at most the window);
        the rest stays pending in order (:meth:`pending_bytes`) until WindowUpdates come.
        On an inbound stream not yet acknowledged the first frame carries ACK.
        Raises :class:`YamuxStreamError` if the stream is reset, unknown or closed for
        writing, :class:`YamuxError` if the session is over.
        """
        st = self._writable(stream_id)
        if not data:
            return
        buf: bytes = data if type(data) is bytes else bytes(data)
        if st.pending_len:
            assert st.pending is not None
            st.pending.append(memoryview(buf))
            st.pending_len += len(buf)
            return
        window = st.send_window
        if window > _U32:
            window = _U32
        n = len(buf)
        out = self._out
        if n <= window:
            out.append(_pack(VERSION, _DATA, self._take_flags(st), stream_id, n))
            out.append(buf)
            st.send_window -= n
            return
        view = memoryview(buf)
        if window:
            out.append(_pack(VERSION, _DATA, self._take_flags(st), stream_id, window))
            out.append(view[:window])
            st.send_window -= window
            view = view[window:]
        if st.pending is None:
            st.pending = deque()
        st.pending.append(view)
        st.pending_len = len(view)

    def consumed(self, stream_id: int, n: int) -> None:
        """The application processed ``n`` received bytes: return credit to the peer.

        A WindowUpdate goes out only once the credit owed reaches half the window
        (128 KiB by default), exactly as Go. No-op for unknown streams.
        """
        if self._terminated:
            return
        st = self._streams.get(stream_id)
        if st is None:
            return
        undelivered = self._rx_remaining if self._rx_stream is st else 0
        if n < 0 or n > st.buffered - undelivered:
            raise YamuxStreamError(
                f"consumed({n}) but {st.buffered - undelivered} bytes are unconsumed",
                stream_id,
            )
        st.buffered -= n
        self._send_window_update(st, 0)

    def close_stream(self, stream_id: int) -> None:
        """Half-close: WindowUpdate|FIN (with ACK if we never acknowledged: 0x0006).

        The FIN follows any pending data. Idempotent; never sends a second FIN; no-op for
        unknown streams. Reading continues until :class:`StreamEnded`.
        """
        if self._terminated:
            return
        st = self._streams.get(stream_id)
        if st is None or st.fin_requested:
            return
        st.fin_requested = True
        if not st.pending_len:
            self._send_fin(st)
            self._maybe_forget(st)

    def reset_stream(self, stream_id: int) -> None:
        """Abort the stream: WindowUpdate|RST, forget it (no event). No-op if unknown."""
        if self._terminated:
            return
        st = self._streams.get(stream_id)
        if st is None:
            return
        self._out.append(_pack(VERSION, _WU, _RST, stream_id, 0))
        self._forget(st)

    def ping(self, opaque: int | None = None) -> int:
        """Queue a Ping SYN and return its opaque value.

        Without ``opaque`` the session counter is used (0, 1, 2, ... like Go). The
        matching reply produces :class:`PingAcked` once.
        """
        if self._terminated:
            raise YamuxError("session terminated")
        if opaque is None:
            opaque = self._ping_id
            self._ping_id = (opaque + 1) & _U32
        elif not 0 <= opaque <= _U32:
            raise ValueError(f"ping opaque out of range: {opaque}")
        self._pings.add(opaque)
        self._out.append(_pack(VERSION, _PING, _SYN, 0, opaque))
        return opaque

    def cancel_ping(self, opaque: int) -> None:
        """Forget an unanswered ping (a late reply is then ignored, as Go after 10 s)."""
        self._pings.discard(opaque)

    def go_away(self, code: int = GoAwayCode.NORMAL) -> None:
        """Queue GoAway(code); from now on incoming SYNs are answered with RST.

        Existing streams continue. Use :meth:`terminate` to end the session.
        """
        if self._terminated:
            return
        if not 0 <= code <= _U32:
            raise ValueError(f"GoAway code out of range: {code}")
        self._local_go_away = True
        self._out.append(_pack(VERSION, _GOAWAY, 0, 0, code))

    def terminate(self, code: int | None, reason: str) -> None:
        """End the session locally: queue GoAway(code) (none if ``code`` is None, like
        Go's Session.Close) and emit ``ConnectionTerminated(remote=False)``."""
        if self._terminated:
            return
        if code is not None and not 0 <= code <= _U32:
            raise ValueError(f"GoAway code out of range: {code}")
        self._terminate(
            GoAwayCode.NORMAL if code is None else code, reason, remote=False, send=code is not None
        )

    # --------------------------------------------------------------------------------
    # Receive handlers

    def _on_stream_frame(self, ftype: int, flags: int, sid: int, length: int) -> None:
        streams = self._streams
        events = self._events
        if flags & _SYN:
            # Go's incomingStream order: local GoAway, duplicate, then capacity.
            if self._local_go_away:
                self._out.append(_pack(VERSION, _WU, _RST, sid, 0))
            elif sid in streams:
                self._protocol_error(f"duplicate stream {sid} declared")
                return
            elif len(streams) >= self._max_streams or self._backlog >= self._accept_backlog:
                self._out.append(_pack(VERSION, _WU, _RST, sid, 0))
            else:
                streams[sid] = _Stream(sid, outbound=False)
                self._backlog += 1
                events.append(StreamOpened(sid))
        st = streams.get(sid)
        if st is None:
            # Unknown (never opened, reset or closed): drop silently, skip the payload.
            if ftype == _DATA and length:
                self._rx_remaining = length
                self._rx_stream = None
            return
        fin = False
        already_ended = st.remote_fin
        if flags & (_ACK | _FIN | _RST):
            if flags & _ACK and st.outbound and not st.acked:
                st.acked = True
                events.append(StreamAccepted(sid))
            if flags & _FIN:
                if already_ended:
                    self._protocol_error(f"unexpected FIN flag on stream {sid}")
                    return
                st.remote_fin = fin = True
            if flags & _RST:
                self._forget(st)
                events.append(StreamReset(sid))
        if ftype == _WU:
            if st.gone:
                return
            if fin:
                events.append(StreamEnded(sid))
            if length:
                st.send_window += length
                if st.pending_len and self._flush(st):
                    events.append(WindowOpened(sid))
            self._maybe_forget(st)
            return
        # Data
        if length > st.recv_window:
            self._protocol_error(
                f"recv window exceeded (stream {sid}, remain {st.recv_window}, recv {length})"
            )
            return
        st.recv_window -= length
        if st.gone or already_ended:
            # Reset in this frame, or data after the peer's FIN: not delivered.
            if length:
                self._rx_remaining = length
                self._rx_stream = None
            return
        if fin:
            self._rx_fin = st
        if length:
            st.buffered += length
            self._rx_remaining = length
            self._rx_stream = st
        else:
            self._end_frame()

    def _end_frame(self) -> None:
        """The current Data payload is complete: report a FIN it carried."""
        self._rx_stream = None
        st = self._rx_fin
        if st is not None:
            self._rx_fin = None
            if not st.gone:
                self._events.append(StreamEnded(st.id))
                self._maybe_forget(st)

    def _on_ping(self, flags: int, opaque: int) -> None:
        if flags & _SYN:
            self._out.append(_pack(VERSION, _PING, _ACK, 0, opaque))
            self._events.append(PingReceived(opaque))
        elif opaque in self._pings:  # any non-SYN ping is a reply, as in Go
            self._pings.discard(opaque)
            self._events.append(PingAcked(opaque))

    def _on_go_away(self, code: int) -> None:
        if code == GoAwayCode.NORMAL:
            self._remote_go_away = True
            self._events.append(GoAwayReceived(GoAwayCode.NORMAL))
            return
        known = code in _REMOTE_GO_AWAY_REASONS
        self._events.append(GoAwayReceived(GoAwayCode(code) if known else code))
        reason = _REMOTE_GO_AWAY_REASONS.get(code, f"unexpected go away received ({code})")
        self._terminate(code, reason, remote=True, send=False)

    # --------------------------------------------------------------------------------
    # Helpers

    def _writable(self, stream_id: int) -> _Stream:
        if self._terminated:
            raise YamuxError("session terminated")
        st = self._streams.get(stream_id)
        if st is None:
            raise YamuxStreamError(f"stream {stream_id} is reset or closed", stream_id)
        if st.fin_requested:
            raise YamuxStreamError(f"stream {stream_id} is closed for writing", stream_id)
        return st

    def _take_flags(self, st: _Stream) -> int:
        """Flags for our next frame on ``st``: ACK once on an inbound stream."""
        if st.need_ack:
            st.need_ack = False
            self._backlog -= 1
            return _ACK
        return 0

    def _send_window_update(self, st: _Stream, flags: int) -> None:
        """Go's sendWindowUpdate: credit = window - buffered - recv_window, sent only
        when >= half the window, or whenever flags must go out."""
        delta = self._window - st.buffered - st.recv_window
        if not flags and delta < self._half:
            return
        st.recv_window += delta
        self._out.append(_pack(VERSION, _WU, flags, st.id, delta))

    def _send_fin(self, st: _Stream) -> None:
        self._out.append(_pack(VERSION, _WU, _FIN | self._take_flags(st), st.id, 0))
        st.fin_sent = True

    def _flush(self, st: _Stream) -> bool:
        """Frame pending bytes up to the send window (one Data frame), then a requested
        FIN once nothing is pending. Returns True if any bytes were framed."""
        pending = st.pending
        window = st.send_window
        if window > _U32:
            window = _U32
        framed = False
        if pending and window:
            parts: list[memoryview] = []
            if st.pending_len <= window:
                total = st.pending_len
                parts.extend(pending)
                pending.clear()
            else:
                total = 0
                while total < window:
                    chunk = pending[0]
                    room = window - total
                    if len(chunk) <= room:
                        pending.popleft()
                        parts.append(chunk)
                        total += len(chunk)
                    else:
                        parts.append(chunk[:room])
                        pending[0] = chunk[room:]
                        total += room
            out = self._out
            out.append(_pack(VERSION, _DATA, self._take_flags(st), st.id, total))
            out.extend(parts)
            st.send_window -= total
            st.pending_len -= total
            framed = True
        if st.fin_requested and not st.fin_sent and not st.pending_len:
            self._send_fin(st)
        return framed

    def _maybe_forget(self, st: _Stream) -> None:
        """Forget a stream once both FINs are out (and the FIN's payload delivered)."""
        if st.fin_sent and st.remote_fin and not st.gone and self._rx_fin is not st:
            self._forget(st)
            self._events.append(StreamClosed(st.id))

    def _forget(self, st: _Stream) -> None:
        st.gone = True
        del self._streams[st.id]
        if st.need_ack:
            st.need_ack = False
            self._backlog -= 1
        st.pending = None
        st.pending_len = 0

    def _protocol_error(self, reason: str) -> None:
        self._terminate(GoAwayCode.PROTOCOL_ERROR, reason, remote=False, send=True)

    def _terminate(self, code: int, reason: str, *, remote: bool, send: bool) -> None:
        if send:
            self._out.append(_pack(VERSION, _GOAWAY, 0, 0, code))
        self._terminated = True
        for st in self._streams.values():
            st.gone = True
            st.pending = None
            st.pending_len = 0
        self._streams.clear()
        self._backlog = 0
        self._pings.clear()
        self._hdr.clear()
        self._rx_remaining = 0
        self._rx_stream = None
        self._rx_fin = None
        self._events.append(ConnectionTerminated(code, reason, remote))
