"""DRPC v0.0.33 (storj.io/drpc) without I/O: wire codec, packet reassembly, stream state.

In Coder every yamux stream carries one DRPC *transport*; on a transport RPCs (DRPC
*streams*) run one after the other, never two at once. Nothing here reads a socket or a
clock: feed received bytes to ``receive_data()``, act on ``events_received()``, write
``data_to_send()`` to the yamux stream. Spec: coder-transport.md §3 (sources: storj/drpc
``drpcwire``, ``drpcstream``, ``drpcmanager`` at v0.0.33).

Wire
----
A *frame* is ``control | varint stream_id | varint message_id | varint length | data``
with ``control = kind << 1 | done (0x01) | control flag (0x80)``; varints are unsigned
LEB128 of at most 10 bytes. A *packet* (one Invoke, one Message, ...) travels as frames of
at most 64 KiB of data sharing its kind and (stream, message) id; only the last frame has
``done`` set. Kinds: 1 Invoke (method path), 2 Message (protobuf bytes), 3 Error (8-byte
big-endian code + text), 4 Cancel (empty; sent with the control flag, ``0x89``), 5 Close,
6 CloseSend (both empty), 7 InvokeMetadata (key/value entries that precede the Invoke).
The control flag means "skip me if you do not know my kind".

Packet flow of one RPC::

    client -> server:  [InvokeMetadata] Invoke Message* [CloseSend] [Close | Cancel]
    server -> client:  Message* then CloseSend (unary, plain drpc), Close (Coder's
                       streaming handlers) or Error

A Go client flushes its Invoke together with its first Message (or before its first Recv);
a unary call is Invoke, Message, CloseSend in one write.

Id rules
--------
* Each side numbers the packets it sends on a stream 1, 2, 3, ... (the *message id*). A
  client numbers its streams 1, 2, 3, ...; the server answers on the client's stream id
  with its own message ids. Coder opens one transport per RPC, so Go always uses stream 1.
* A received packet's (stream, message) id, compared lexicographically, must not be lower
  than the previous packet's (stream, message + 1): else "id monotonicity violation". The
  first acceptable id is (1, 1), so stream id 0 is never valid.
* A frame with the id of the packet being assembled continues it (with the same kind, else
  "packet kind change"); a frame with a higher id silently discards an incomplete packet.
* Packets for an older stream are ignored. An Invoke (or InvokeMetadata) for a higher
  stream id starts the next RPC; on the server it supersedes a live stream.

What ends a stream
------------------
A stream is *terminated* (event :class:`StreamFinished`; packets for it are ignored from
then on, our sends fail or are no-ops) by: a received Close, Error or Cancel; CloseSend sent
by both sides; our ``send_close()``, ``send_error()`` or ``send_cancel()``; an Invoke for a
higher stream id; the end of the transport (``receive_eof()`` or a protocol error). A
received CloseSend only half-closes: the remote sends no more Messages, we still may.

What ends the transport
-----------------------
:class:`DrpcProtocolError`, after which the adapter tears the yamux stream down: a varint
longer than 10 bytes, id monotonicity violation, packet kind change, data overflow (a packet
above ``max_size``, or a frame that could not fit in ``max_size + 28`` bytes of buffer: Go's
``MaximumBufferSize`` rule), an unknown kind without the control flag (with it: skipped),
Invoke on the live stream, InvokeMetadata on an existing stream, malformed metadata, and any
other packet for a stream that was never invoked. For the last case a Go manager cancels the
current stream and then stops reading for good; the transport is as good as dead, so this
core ends it instead of waiting for the peer to give up.

Memory: the reader holds at most one incomplete frame header (< 31 bytes) and one packet
being assembled (at most ``max_size`` bytes). Completed events and outgoing bytes are held
until the caller takes them; an adapter bounds them by taking them after every call and
by yamux flow control. DRPC itself has no flow control.

Text: method names, error texts and metadata are UTF-8 with ``surrogateescape``: bytes that
are not UTF-8 survive a round trip and :func:`unknown_rpc_message` echoes them as Go does.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import TypeAlias

__all__ = [
    "MAX_MESSAGE_SIZE",
    "SPLIT_SIZE",
    "UNIMPLEMENTED",
    "BytesLike",
    "CancelReceived",
    "ClientConnection",
    "CloseReceived",
    "CloseSendReceived",
    "DrpcError",
    "DrpcProtocolError",
    "DrpcStreamClosed",
    "ErrorReceived",
    "Event",
    "InvokeReceived",
    "Kind",
    "MessageReceived",
    "Packet",
    "PacketReader",
    "ServerConnection",
    "StreamFinished",
    "decode_error_body",
    "decode_metadata",
    "decode_varint",
    "encode_error_body",
    "encode_frame",
    "encode_metadata",
    "encode_packet",
    "encode_varint",
    "unknown_rpc_message",
]


BytesLike: TypeAlias = bytes | bytearray | memoryview
"""What the functions and methods here accept as input bytes (``bytes`` is fastest)."""

# ---------------------------------------------------------------------------------------
# Errors


class DrpcError(Exception):
    """Base class of this module's DRPC errors (bad arguments raise ValueError)."""


class DrpcProtocolError(DrpcError):
    """The peer broke the DRPC protocol: the whole transport (one yamux stream) must end.

    The message says why, starting with Go's wording where Go has one ("id monotonicity
    violation", "packet kind change", "data overflow", "unknown packet kind",
    "invoke on existing stream", "varint too long").
    """


class DrpcStreamClosed(DrpcError):
    """``send_message()`` on a stream that cannot send: none started, already terminated,
    or our CloseSend already sent. Nothing was queued; the transport is fine."""


# ---------------------------------------------------------------------------------------
# Constants


class Kind(IntEnum):
    """Packet kinds of drpc v0.0.33 (``drpcwire/packet.go``); 0 is reserved."""

    INVOKE = 1
    MESSAGE = 2
    ERROR = 3
    CANCEL = 4
    CLOSE = 5
    CLOSE_SEND = 6
    INVOKE_METADATA = 7


MAX_MESSAGE_SIZE = 4 << 20
"""Largest packet accepted (Coder's ``MaxMessageSize``, also drpc's default)."""
SPLIT_SIZE = 64 * 1024
"""Most data bytes per frame when we send (drpc's default split size)."""
UNIMPLEMENTED = 12
"""``drpcerr.Unimplemented``: the error code Go clients recognise as "not implemented"."""

# Go's maxFrameOverhead: control byte + three 9-byte varints. A frame larger than
# max_size + this can never be parsed by a Go reader, which reports "data overflow".
_MAX_FRAME_OVERHEAD = 1 + 9 + 9 + 9
# Longest possible frame header: control byte + three 10-byte varints.
_MAX_HEADER = 1 + 10 + 10 + 10
_MASK64 = (1 << 64) - 1

_INVOKE = 1
_MESSAGE = 2
_ERROR = 3
_CANCEL = 4
_CLOSE = 5
_CLOSE_SEND = 6
_INVOKE_METADATA = 7

_DONE = 0x01
_CONTROL = 0x80
_KIND_NAMES = (
    "Reserved", "Invoke", "Message", "Error", "Cancel", "Close", "CloseSend", "InvokeMetadata",
)
_KINDS: tuple[Kind, ...] = (Kind.INVOKE, *Kind)  # index = wire kind; [0] is never used
_BYTE = [bytes((i,)) for i in range(128)]
# Control byte -> kind, for control bytes of a last frame (done set) of a known kind, else 0.
_FAST_KIND = bytes(
    (c >> 1) & 0x3F if c & _DONE and 0 < (c >> 1) & 0x3F < 8 else 0 for c in range(256)
)


def _kind_name(kind: int) -> str:
    return _KIND_NAMES[kind] if 0 <= kind < len(_KIND_NAMES) else f"Kind({kind})"


# ---------------------------------------------------------------------------------------
# Varints, frames, packets


def encode_varint(n: int) -> bytes:
    """Unsigned LEB128 (protobuf) encoding of ``0 <= n < 2**64``; 65536 is ``80 80 04``."""
    if 0 <= n < 0x80:
        return _BYTE[n]
    if n < 0 or n > _MASK64:
        raise ValueError(f"varint out of range: {n}")
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _read_varint(buf: BytesLike, pos: int, end: int) -> tuple[int, int]:
    """Decode a varint at ``buf[pos:end]``: ``(value, next_pos)``, or ``(0, -1)`` if the
    bytes end first. More than 10 bytes is an error; bits above 64 are dropped as Go does."""
    result = 0
    shift = 0
    while shift < 70:
        if pos >= end:
            return 0, -1
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result & _MASK64, pos
        shift += 7
    raise DrpcProtocolError("varint too long")


def decode_varint(buf: BytesLike, pos: int = 0) -> tuple[int, int]:
    """Decode the varint at ``buf[pos:]``; returns ``(value, position after it)``.

    Raises :class:`DrpcProtocolError` ("varint too long") after 10 bytes with the
    continuation bit, and :class:`ValueError` if ``buf`` ends inside the varint.
    """
    if pos < len(buf):
        b = buf[pos]
        if b < 0x80:
            return b, pos + 1
    value, end = _read_varint(buf, pos, len(buf))
    if end < 0:
        raise ValueError("truncated varint")
    return value, end


def _header(control: int, stream_id: int, message_id: int, length: int) -> bytes:
    if stream_id < 0x80 and message_id < 0x80 and length < 0x80:
        return bytes((control, stream_id, message_id, length))
    return (
        bytes((control,)) + encode_varint(stream_id) + encode_varint(message_id)
        + encode_varint(length)
    )


def encode_frame(
    kind: int,
    stream_id: int,
    message_id: int,
    data: BytesLike,
    *,
    done: bool = True,
    control: bool = False,
) -> bytes:
    """One frame. ``kind`` may be any 0..63 (tests use unknown kinds); no splitting."""
    if not 0 <= kind < 64:
        raise ValueError(f"kind out of range: {kind}")
    ctrl = kind << 1 | (_DONE if done else 0) | (_CONTROL if control else 0)
    return _header(ctrl, stream_id, message_id, len(data)) + bytes(data)


def _append_packet(
    out: list[bytes | memoryview],
    kind: int,
    stream_id: int,
    message_id: int,
    data: bytes,
    split: int,
) -> None:
    """Append the frames of one packet to ``out`` without copying ``data`` (which must be
    immutable). Only Cancel carries the control flag, as in Go."""
    base = kind << 1 | (_CONTROL if kind == _CANCEL else 0)
    n = len(data)
    if n <= split or split <= 0:
        out.append(_header(base | _DONE, stream_id, message_id, n))
        if n:
            out.append(data)
        return
    view = memoryview(data)
    for offset in range(0, n, split):
        chunk = view[offset : offset + split]
        last = offset + split >= n
        out.append(_header(base | _DONE if last else base, stream_id, message_id, len(chunk)))
        out.append(chunk)


def encode_packet(
    kind: int, stream_id: int, message_id: int, data: BytesLike = b"", *, split: int = SPLIT_SIZE
) -> bytes:
    """Frames of one packet: data cut into pieces of at most ``split`` bytes (``split <= 0``:
    one frame), only the last with done set. Cancel gets the control flag (``0x89``)."""
    if not 0 <= kind < 64:
        raise ValueError(f"kind out of range: {kind}")
    out: list[bytes | memoryview] = []
    _append_packet(out, kind, stream_id, message_id, bytes(data), split)
    return b"".join(out)


# ---------------------------------------------------------------------------------------
# Payloads


def encode_error_body(code: int, text: str) -> bytes:
    """Error packet body: 8-byte big-endian ``code`` then the UTF-8 ``text``."""
    return code.to_bytes(8, "big") + text.encode("utf-8", "surrogateescape")


def decode_error_body(body: BytesLike) -> tuple[int, str]:
    """``(code, text)`` of an Error body. Fewer than 8 bytes: code 0 and the bytes kept as
    text with Go's note appended (``drpcwire.UnmarshalError``)."""
    if len(body) < 8:
        text = bytes(body).decode("utf-8", "surrogateescape")
        return 0, f"{text} (drpcwire note: invalid error data)"
    return int.from_bytes(body[:8], "big"), bytes(body[8:]).decode("utf-8", "surrogateescape")


def _encode_string_field(tag: int, value: str) -> bytes:
    raw = value.encode("utf-8", "surrogateescape")
    return _BYTE[tag] + encode_varint(len(raw)) + raw


def encode_metadata(metadata: dict[str, str]) -> bytes:
    """InvokeMetadata body: per pair, ``0a <len> (0a <len> key 12 <len> value)``."""
    out = []
    for key, value in metadata.items():
        entry = _encode_string_field(0x0A, key) + _encode_string_field(0x12, value)
        out.append(b"\x0a" + encode_varint(len(entry)) + entry)
    return b"".join(out)


def _read_field(buf: bytes, pos: int, end: int, tag: int) -> tuple[bytes, int]:
    if pos >= end or buf[pos] != tag:
        raise DrpcProtocolError("invalid invoke metadata")
    length, pos = _read_varint(buf, pos + 1, end)
    if pos < 0 or length > end - pos:
        raise DrpcProtocolError("invalid invoke metadata")
    return buf[pos : pos + length], pos + length


def decode_metadata(body: BytesLike) -> dict[str, str]:
    """Parse an InvokeMetadata body as strictly as ``drpcmetadata.Decode``: each entry is
    exactly key then value; a repeated key keeps the last value. Raises
    :class:`DrpcProtocolError` ("invalid invoke metadata") on anything else."""
    buf = bytes(body)
    out: dict[str, str] = {}
    pos, end = 0, len(buf)
    while pos < end:
        entry, pos = _read_field(buf, pos, end, 0x0A)
        key, inner = _read_field(entry, 0, len(entry), 0x0A)
        value, inner = _read_field(entry, inner, len(entry), 0x12)
        if inner != len(entry):
            raise DrpcProtocolError("invalid invoke metadata")
        out[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
    return out


_GO_ESCAPES = {
    "\a": "\\a", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t",
    "\v": "\\v", '"': '\\"', "\\": "\\\\",
}


def _go_quote(text: str) -> str:
    """Go's ``strconv.Quote`` (``%q``) of the string whose bytes ``text`` holds (with
    ``surrogateescape`` for bytes that are not UTF-8). Go's ``IsPrint`` is Python's
    ``isprintable`` (letters, marks, numbers, punctuation, symbols, ASCII space)."""
    if text.isascii() and text.isprintable() and '"' not in text and "\\" not in text:
        return f'"{text}"'
    parts = ['"']
    for ch in text:
        escaped = _GO_ESCAPES.get(ch)
        if escaped is not None:
            parts.append(escaped)
            continue
        cp = ord(ch)
        if 0xDC80 <= cp <= 0xDCFF:  # a byte that was not UTF-8: Go writes \xNN
            parts.append(f"\\x{cp - 0xDC00:02x}")
        elif 0xD800 <= cp <= 0xDFFF:  # not encodable; Go's invalid rune becomes U+FFFD
            parts.append("\\ufffd")
        elif ch.isprintable():
            parts.append(ch)
        elif cp < 0x20 or cp == 0x7F:
            parts.append(f"\\x{cp:02x}")
        elif cp < 0x10000:
            parts.append(f"\\u{cp:04x}")
        else:
            parts.append(f"\\U{cp:08x}")
    parts.append('"')
    return "".join(parts)


def unknown_rpc_message(path: str) -> str:
    """Error text a Go drpcmux sends (code 0) for a method it does not know:
    ``protocol error: unknown rpc: "<path>"`` with Go ``%q`` quoting."""
    return "protocol error: unknown rpc: " + _go_quote(path)


# ---------------------------------------------------------------------------------------
# Packets and reassembly


@dataclass(frozen=True, slots=True)
class Packet:
    """One reassembled packet of a known kind."""

    kind: Kind
    stream_id: int
    message_id: int
    data: bytes


_Deliver: TypeAlias = Callable[[int, int, int, bytes], None]


def _no_deliver(kind: int, stream_id: int, message_id: int, data: bytes) -> None:
    raise AssertionError("packet delivered outside feed()")


class _Reassembler:
    """Frames in, packets out (``drpcwire.Reader`` semantics); calls
    ``deliver(kind, stream_id, message_id, data)`` for each complete packet of a known kind.

    State: ``_head`` holds an incomplete frame header; ``_remaining`` counts the data bytes
    of the current frame still to come (they go straight into ``_pdata``). ``_sid, _mid``
    is Go's ``Reader.id``: the id of the packet being assembled, or after a complete packet
    the lowest acceptable next id.
    """

    __slots__ = (
        "_max", "_deliver", "_head", "_sid", "_mid", "_active", "_pkind", "_pcontrol",
        "_pdata", "_remaining", "_frame_done", "_error",
    )

    def __init__(self, max_size: int) -> None:
        if max_size <= 0:
            raise ValueError("max_size must be positive")
        self._max = max_size
        self._deliver: _Deliver = _no_deliver
        self._head = b""
        self._sid = 1
        self._mid = 1
        self._active = False
        self._pkind = 0
        self._pcontrol = False
        self._pdata = bytearray()
        self._remaining = 0
        self._frame_done = False
        self._error: str | None = None  # text only: a stored exception would hold our frames

    @property
    def buffered(self) -> int:
        return len(self._head) + len(self._pdata)

    def feed(self, data: BytesLike, deliver: _Deliver) -> None:
        """Parse ``data``; ``deliver`` is called for each complete packet.

        ``deliver`` is passed per call, not kept: the owner's bound method stored
        here would make the owner and this reader a reference cycle.
        """
        if self._error is not None:
            raise DrpcProtocolError(self._error)
        self._deliver = deliver
        try:
            self._feed(data if type(data) is bytes else bytes(data))
        except DrpcProtocolError as exc:
            self._error = str(exc)
            self._head = b""
            self._pdata = bytearray()
            self._active = False
            self._remaining = 0
            raise
        finally:
            self._deliver = _no_deliver

    def _feed(self, data: bytes) -> None:
        n = len(data)
        pos = 0
        if self._remaining:
            # In the middle of a frame's data: it goes straight into the packet buffer.
            take = self._remaining if self._remaining < n else n
            self._pdata += memoryview(data)[:take]
            self._remaining -= take
            if self._remaining:
                return
            pos = take
            if self._frame_done:
                self._complete()
        if self._head:
            pos = self._resume_header(data, pos, n)
            if pos < 0:
                return
        # Fast path: a whole single-frame packet of a known kind with one-byte varints
        # and a new id (every small Message). Go's Reader.id lives in locals meanwhile.
        max_size = self._max
        deliver = self._deliver
        fast_kind = _FAST_KIND
        floor_sid = self._sid
        floor_mid = self._mid
        active = self._active
        while True:
            if n - pos < 4:  # no frame is shorter than 4 bytes
                self._sid = floor_sid
                self._mid = floor_mid
                if pos < n:
                    self._head = data[pos:]
                return
            sid = data[pos + 1]
            mid = data[pos + 2]
            length = data[pos + 3]
            end = pos + 4 + length
            kind = fast_kind[data[pos]]
            if (
                kind
                and (sid | mid | length) < 0x80
                and end <= n
                and length <= max_size
                and not active
                and (sid > floor_sid or (sid == floor_sid and mid >= floor_mid))
            ):
                floor_sid = sid
                floor_mid = mid + 1
                deliver(kind, sid, mid, data[pos + 4 : end])
                pos = end
                continue
            self._sid = floor_sid
            self._mid = floor_mid
            pos = self._general_frame(data, pos, n)
            if pos < 0:
                return
            floor_sid = self._sid
            floor_mid = self._mid
            active = self._active

    def _general_frame(self, data: bytes, pos: int, n: int) -> int:
        """Parse the header at ``data[pos:]`` with any varints and handle its frame.
        Returns the position after the frame, or -1 if the input ran out (an incomplete
        header is kept in ``_head``)."""
        sid, p = _read_varint(data, pos + 1, n)
        if p >= 0:
            mid, p = _read_varint(data, p, n)
            if p >= 0:
                length, p = _read_varint(data, p, n)
                if p >= 0:
                    return self._frame(data[pos], sid, mid, length, p - pos, data, p, n)
        self._head = data[pos:]
        return -1

    def _resume_header(self, data: bytes, pos: int, n: int) -> int:
        """Complete the header held in ``_head`` with bytes from ``data[pos:]``; handle the
        frame it starts. Returns where parsing goes on in ``data``, or -1 if all used."""
        old = len(self._head)
        head = self._head + data[pos : pos + _MAX_HEADER - old]
        hn = len(head)
        fields: list[int] = []
        p = 1
        if hn >= 4:
            for _ in range(3):
                value, p = _read_varint(head, p, hn)
                if p < 0:
                    break
                fields.append(value)
        if len(fields) < 3:
            # Still incomplete: with all 31 bytes the varints would have parsed or failed.
            self._head = head
            return -1
        self._head = b""
        sid, mid, length = fields
        start = pos + p - old  # where the frame's data begins in data
        return self._frame(head[0], sid, mid, length, p, data, start, n)

    def _frame(
        self, ctrl: int, sid: int, mid: int, length: int, header_len: int,
        data: bytes, p: int, n: int,
    ) -> int:
        """General frame path (``drpcwire.Reader.ReadPacketUsing``): checks, then appends
        the frame's data to the packet being assembled. Returns the position after the
        frame, or -1 if its data continues in later input."""
        if length > self._max or header_len + length > self._max + _MAX_FRAME_OVERHEAD:
            raise DrpcProtocolError(f"data overflow: frame of {length} bytes")
        if sid < self._sid or (sid == self._sid and mid < self._mid):
            raise DrpcProtocolError(
                f"id monotonicity violation: got stream {sid} message {mid}, "
                f"expected at least stream {self._sid} message {self._mid}"
            )
        kind = (ctrl >> 1) & 0x3F
        if sid != self._sid or mid != self._mid or not self._active:
            # A new packet; a higher id discards an incomplete one.
            self._sid = sid
            self._mid = mid
            self._active = True
            self._pkind = kind
            self._pcontrol = bool(ctrl & _CONTROL)
            if self._pdata:
                self._pdata = bytearray()
        elif kind != self._pkind:
            raise DrpcProtocolError(
                f"packet kind change: {_kind_name(self._pkind)} to {_kind_name(kind)}"
            )
        elif ctrl & _CONTROL:
            self._pcontrol = True
        if len(self._pdata) + length > self._max:
            raise DrpcProtocolError(
                f"data overflow: packet above {self._max} bytes "
                f"(stream {sid} message {mid})"
            )
        end = p + length
        self._frame_done = bool(ctrl & _DONE)
        if end <= n:
            if length:
                self._pdata += memoryview(data)[p:end]
            if self._frame_done:
                self._complete()
            return end
        self._pdata += memoryview(data)[p:n]
        self._remaining = end - n
        return -1

    def _complete(self) -> None:
        """The last frame of the packet being assembled has arrived."""
        payload = bytes(self._pdata)
        self._pdata = bytearray()
        self._active = False
        mid = self._mid
        self._mid = mid + 1
        kind = self._pkind
        if 0 < kind < 8:
            self._deliver(kind, self._sid, mid, payload)
        elif not self._pcontrol:
            raise DrpcProtocolError(f"unknown packet kind: {_kind_name(kind)}")


class PacketReader:
    """Reassemble packets from frames split anywhere (spec §3.3, §3.4, §3.10).

    ``receive_data()`` parses at once and raises :class:`DrpcProtocolError` on a
    violation; packets completed before it stay available from ``next_packet()``, and
    every later ``receive_data()`` raises the same error. Packets of an unknown kind are
    skipped when they carry the control flag (their id still counts), an error otherwise.
    Buffered: at most ``max_size`` bytes of the packet being assembled plus an incomplete
    frame header (< 31 bytes); completed packets wait in a queue for ``next_packet()``.
    """

    __slots__ = ("_reader", "_packets")

    def __init__(self, max_size: int = MAX_MESSAGE_SIZE) -> None:
        self._packets: deque[Packet] = deque()
        self._reader = _Reassembler(max_size)

    def _queue(self, kind: int, stream_id: int, message_id: int, data: bytes) -> None:
        self._packets.append(Packet(_KINDS[kind], stream_id, message_id, data))

    def receive_data(self, data: BytesLike) -> None:
        """Feed received bytes; then call ``next_packet()`` until it returns None."""
        self._reader.feed(data, self._queue)

    def next_packet(self) -> Packet | None:
        """The next complete packet, or None if more data is needed."""
        return self._packets.popleft() if self._packets else None

    @property
    def buffered(self) -> int:
        """Bytes held for incomplete frames and packets (not counting queued packets)."""
        return self._reader.buffered


# ---------------------------------------------------------------------------------------
# Events


@dataclass(frozen=True, slots=True)
class InvokeReceived:
    """The client started an RPC (server side only); a previous live stream has ended."""

    stream_id: int
    method: str
    """Method path, e.g. ``/coder.tailnet.v2.Tailnet/Coordinate``."""
    metadata: dict[str, str]
    """From an InvokeMetadata packet for the same stream id; usually empty."""


@dataclass(frozen=True, slots=True)
class MessageReceived:
    """A Message packet on the live stream (none are delivered after the remote's
    CloseSend or Close)."""

    stream_id: int
    data: bytes


@dataclass(frozen=True, slots=True)
class CloseSendReceived:
    """The remote sends no more Messages (Recv returns EOF); we may still send."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class CloseReceived:
    """The remote closed the stream (Recv returns EOF); :class:`StreamFinished` follows."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class CancelReceived:
    """The remote cancelled the stream; :class:`StreamFinished` follows."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class ErrorReceived:
    """The remote ended the stream with an error; :class:`StreamFinished` follows."""

    stream_id: int
    code: int
    message: str


@dataclass(frozen=True, slots=True)
class StreamFinished:
    """The stream is terminated on both sides: nothing more is sent or accepted for it.

    Emitted exactly once per stream, whatever ended it, including our own
    ``send_close()``/``send_error()``/``send_cancel()``/CloseSend, a superseding Invoke,
    ``receive_eof()`` and a protocol error.
    """

    stream_id: int


Event: TypeAlias = (
    InvokeReceived
    | MessageReceived
    | CloseSendReceived
    | CloseReceived
    | CancelReceived
    | ErrorReceived
    | StreamFinished
)
"""Any event of :class:`ServerConnection` or :class:`ClientConnection`."""


# ---------------------------------------------------------------------------------------
# Connections


class _Connection:
    """What both sides share: one DRPC transport with at most one live stream.

    Stream state (``drpcstream.Stream``): ``_sid`` is the current stream (0: none yet),
    ``_live`` whether it is not terminated, ``_sent_close_send`` / ``_recv_closed`` the
    two half-closes, ``_mid`` the last message id we sent on it.
    """

    __slots__ = (
        "_reader", "_events", "_out", "_split", "_sid", "_mid", "_live",
        "_sent_close_send", "_recv_closed", "_failed", "_eof",
    )

    def __init__(self, *, max_size: int = MAX_MESSAGE_SIZE, split_size: int = SPLIT_SIZE) -> None:
        self._reader = _Reassembler(max_size)
        self._events: list[Event] = []
        self._out: list[bytes | memoryview] = []
        self._split = split_size
        self._sid = 0
        self._mid = 0
        self._live = False
        self._sent_close_send = False
        self._recv_closed = False
        self._failed: str | None = None  # text only (see _Reassembler._error)
        self._eof = False

    # -- input ---------------------------------------------------------------------------

    def receive_data(self, data: BytesLike) -> None:
        """Feed bytes read from the transport, then call ``events_received()`` and
        ``data_to_send()``.

        Raises :class:`DrpcProtocolError` when the peer broke the protocol: the transport
        must be torn down. Events of the packets before the violation, then
        :class:`StreamFinished` for a live stream, are still in ``events_received()``;
        every later ``receive_data()`` raises the same error.
        """
        if self._failed is not None:
            raise DrpcProtocolError(self._failed)
        if self._eof:
            raise DrpcError("receive_data() after receive_eof()")
        try:
            self._reader.feed(data, self._on_packet)
        except DrpcProtocolError as exc:
            self._failed = str(exc)
            self._terminate()
            raise

    def receive_eof(self) -> None:
        """The transport ended (yamux FIN or reset): a live stream terminates, as Go's
        manager cancels it. An incomplete packet is dropped."""
        if not self._eof:
            self._eof = True
            self._terminate()

    def events_received(self) -> list[Event]:
        """Events since the last call, in order."""
        events = self._events
        if not events:
            return []
        self._events = []
        return events

    def data_to_send(self) -> bytes:
        """Bytes to write to the transport, since the last call (may be empty)."""
        out = self._out
        if not out:
            return b""
        self._out = []
        return b"".join(out)

    # -- introspection --------------------------------------------------------------------

    @property
    def current_stream_id(self) -> int | None:
        """Id of the most recent stream, live or not; None before the first."""
        return self._sid or None

    def terminated(self, stream_id: int | None = None) -> bool:
        """True unless ``stream_id`` (default: the current stream) is the live stream."""
        if stream_id is None:
            return not self._live
        return not (self._live and stream_id == self._sid)

    @property
    def can_send(self) -> bool:
        """Whether ``send_message()`` would queue a Message now."""
        return self._live and not self._sent_close_send

    @property
    def remote_closed(self) -> bool:
        """The remote ended its sending side of the current stream (or it terminated)."""
        return self._recv_closed or not self._live

    @property
    def failed(self) -> DrpcProtocolError | None:
        """The protocol error that ended the transport, if any."""
        return None if self._failed is None else DrpcProtocolError(self._failed)

    # -- commands on the current stream ---------------------------------------------------

    def send_message(self, data: BytesLike) -> None:
        """Queue a Message with the next message id, split into frames of at most
        ``split_size`` bytes. ``data`` should be at most the peer's limit (4 MiB for Go);
        nothing checks that here, as in Go. Raises :class:`DrpcStreamClosed` when the
        stream cannot send (see :attr:`can_send`)."""
        if not self._live or self._sent_close_send:
            raise DrpcStreamClosed(self._why_closed())
        self._mid += 1
        _append_packet(
            self._out, _MESSAGE, self._sid, self._mid,
            data if type(data) is bytes else bytes(data), self._split,
        )

    def send_error(self, code: int, message: str) -> None:
        """Queue an Error and terminate the stream; a no-op once terminated (Go's
        ``SendError``). ``message`` reaches the peer: never put secrets in it."""
        if self._live:
            self._send_control(_ERROR, encode_error_body(code, message))
            self._terminate()

    def send_close(self) -> None:
        """Queue a Close and terminate the stream (how Coder's streaming handlers end);
        a no-op once terminated."""
        if self._live:
            self._send_control(_CLOSE, b"")
            self._terminate()

    def send_close_send(self) -> None:
        """Queue a CloseSend: we send no more Messages. The stream terminates once both
        sides sent one. A no-op if already sent or terminated."""
        if self._live and not self._sent_close_send:
            self._send_control(_CLOSE_SEND, b"")
            self._sent_close_send = True
            if self._recv_closed:
                self._terminate()

    def send_cancel(self) -> None:
        """Queue a Cancel (control flag set) and terminate the stream; a no-op once
        terminated. Go sends this only with SoftCancel, which Coder leaves off."""
        if self._live:
            self._send_control(_CANCEL, b"")
            self._terminate()

    # -- internals ------------------------------------------------------------------------

    def _why_closed(self) -> str:
        if not self._sid:
            return "no stream"
        if self._live:
            return f"stream {self._sid}: CloseSend already sent"
        return f"stream {self._sid} is terminated"

    def _send_control(self, kind: int, body: bytes) -> None:
        self._mid += 1
        _append_packet(self._out, kind, self._sid, self._mid, body, self._split)

    def _start_stream(self, stream_id: int) -> None:
        self._sid = stream_id
        self._mid = 0
        self._live = True
        self._sent_close_send = False
        self._recv_closed = False

    def _terminate(self) -> None:
        if self._live:
            self._live = False
            self._events.append(StreamFinished(self._sid))

    def _on_packet(self, kind: int, sid: int, mid: int, data: bytes) -> None:
        """Route one packet (``drpcmanager.manageReader``), then apply it to the live
        stream (``drpcstream.Stream.HandlePacket``)."""
        if sid == self._sid:
            if not self._live:
                return  # anything after termination is ignored
            if kind == 2:  # Message, the hot path
                if not self._recv_closed:
                    self._events.append(MessageReceived(sid, data))
            elif kind == _CLOSE_SEND:
                if not self._recv_closed:
                    self._recv_closed = True
                    self._events.append(CloseSendReceived(sid))
                    if self._sent_close_send:
                        self._terminate()
            elif kind == _CLOSE:
                self._recv_closed = True
                self._events.append(CloseReceived(sid))
                self._terminate()
            elif kind == _ERROR:
                code, text = decode_error_body(data)
                self._events.append(ErrorReceived(sid, code, text))
                self._terminate()
            elif kind == _CANCEL:
                self._events.append(CancelReceived(sid))
                self._terminate()
            elif kind == _INVOKE:
                raise DrpcProtocolError(f"invoke on existing stream {sid}")
            else:  # InvokeMetadata: Go reports it as an unknown kind on a live stream
                raise DrpcProtocolError(
                    f"unknown packet kind: {_kind_name(kind)} on existing stream {sid}"
                )
        elif sid > self._sid:
            self._on_new_stream(kind, sid, data)
        # else: a late packet for an older stream, ignored

    def _on_new_stream(self, kind: int, sid: int, data: bytes) -> None:
        raise NotImplementedError


class ServerConnection(_Connection):
    """The server side of one DRPC transport (``drpcserver.ServeOne``).

    Each Invoke (optionally preceded by InvokeMetadata for the same stream id) yields
    :class:`InvokeReceived`; the RPC's packets follow as events. The handler answers with
    ``send_message()`` and ends with ``send_close_send()`` (unary, plain drpc),
    ``send_close()`` (what Coder's streaming handlers do) or ``send_error()``. After a
    stream ends the transport waits for an Invoke with a higher stream id; an Invoke for a
    higher id while a stream is live terminates that stream first (:class:`StreamFinished`
    then :class:`InvokeReceived`). Commands always act on the newest stream: an adapter
    must stop a handler at its :class:`StreamFinished` before it can write to a newer one.
    """

    __slots__ = ("_meta", "_meta_sid")

    def __init__(self, *, max_size: int = MAX_MESSAGE_SIZE, split_size: int = SPLIT_SIZE) -> None:
        super().__init__(max_size=max_size, split_size=split_size)
        self._meta: dict[str, str] = {}
        self._meta_sid = 0

    def _on_new_stream(self, kind: int, sid: int, data: bytes) -> None:
        if kind == _INVOKE:
            self._terminate()
            metadata = self._meta if self._meta_sid == sid else {}
            self._meta = {}
            self._meta_sid = 0
            self._start_stream(sid)
            self._events.append(
                InvokeReceived(sid, data.decode("utf-8", "surrogateescape"), metadata)
            )
        elif kind == _INVOKE_METADATA:
            self._terminate()
            self._meta = decode_metadata(data)  # the last one before the Invoke wins, as in Go
            self._meta_sid = sid
        else:
            raise DrpcProtocolError(
                f"{_kind_name(kind)} packet for stream {sid}, which was never invoked"
            )


class ClientConnection(_Connection):
    """The client side of one DRPC transport (``drpcconn.Conn``).

    ``invoke()`` starts stream 1, 2, ... and queues [InvokeMetadata] + Invoke; the adapter
    decides when to flush (Go flushes the Invoke with the first Message or before the first
    Recv). Then ``send_message()``, ``send_close_send()`` (half-close; never a yamux FIN
    before the final packet), ``send_close()`` / ``send_cancel()`` to abandon the call.
    The server's packets arrive as :class:`MessageReceived`, :class:`CloseSendReceived`,
    :class:`CloseReceived` or :class:`ErrorReceived`, then :class:`StreamFinished`.
    """

    __slots__ = ()

    def invoke(self, method: str, metadata: dict[str, str] | None = None) -> int:
        """Start the next stream and queue its Invoke; returns the new stream id.

        Raises :class:`DrpcError` while the previous stream is live (one RPC at a time
        per transport: finish it with a Close, Cancel or both CloseSends first) or once
        the transport ended."""
        if self._failed is not None or self._eof:
            raise DrpcError("the transport has ended")
        if self._live:
            raise DrpcError(f"stream {self._sid} is still live")
        self._start_stream(self._sid + 1)
        if metadata:
            self._send_control(_INVOKE_METADATA, encode_metadata(metadata))
        self._send_control(_INVOKE, method.encode("utf-8", "surrogateescape"))
        return self._sid

    def _on_new_stream(self, kind: int, sid: int, data: bytes) -> None:
        raise DrpcProtocolError(
            f"{_kind_name(kind)} packet for stream {sid}, which this client never invoked"
        )
