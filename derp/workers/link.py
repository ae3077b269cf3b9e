"""Worker-link framing: the sans-I/O codec between sibling ``derper`` workers.

The workers of one host (``derper --workers N``) form a full mesh of
Unix-domain-socket links, one per pair. Every link carries one byte stream per
direction of frames::

    type u8 ‖ length u32 (big endian) ‖ payload (length bytes)

    type  name        payload                                      meaning
    0x01  HELLO       "DWL1" ‖ index u16 ‖ count u16 ‖ pid u32     first frame, each way
    0x02  PRESENT     key[32] ‖ ip[16] ‖ port u16 ‖ flags u8       sender holds a connection of key
    0x03  GONE        key[32]                                      sender's last connection of key left
    0x04  ACTIVE      key[32] ‖ stamp u64                          sender's connection of key is now
                                                                   the most recently active one
                                                                   (stamp: the sender's Lamport
                                                                   clock; see below)
    0x05  PACKET      src[32] ‖ dst[32] ‖ packet (0..64 KiB)       deliver packet from src to dst
    0x06  STATS       JSON object (≤ 1 MiB)                        sender's counters (derp.workers.stats)
    0x07  CLOSE_PEER  key[32]                                      close the receiver's connections
                                                                   of key (a mesh peer's ClosePeer)
    0x08  FRAMES      dst[32] ‖ src[32] ‖ RecvPacket frames         append these exact DERP frames
                      (1+, ≤ 1 MiB)                                to dst's connection (hot path);
                                                                   src: the key every frame comes
                                                                   from, 32 zero bytes if several
    0x09  PAUSE       key[32]                                      the sender's connection of key
                                                                   stopped taking writes (its
                                                                   socket is full): queue for it
    0x0a  RESUME      key[32]                                      ... takes writes again

FRAMES is what a packet crossing workers normally travels as: the sending
worker's packet path builds RecvPacket frames (``0x05 ‖ len ‖ src ‖ packet``)
for the sibling's stand-in exactly as for a local connection, and the
receiving worker appends the bytes to its client's write batch unchanged.

Trust: a link joins two workers of one ``derper`` (a Unix socket in a private
directory), and the frames in a FRAMES blob were checked when the sending
worker read them from its client, then rewritten in place. So the decoder
checks what keeps the *link* in step (every frame's length against its type
and bounds, HELLO first) and the first inner frame's header, but does not walk
the inner frames one by one: that walk cost as much as a third of a crossing
packet's CPU. A sibling with a bug could garble only the stream of that one
destination, whose client then disconnects.

PRESENT is sent once per *connection* that registers (and once per key when a
link comes up: the full state), GONE once per key when its last connection on
the sender leaves, like DERP's PeerPresent/PeerGone (spec §4). The PRESENT
payload is the 51-byte PeerPresent layout, so a worker can answer a mesh
peer's WatchConns with its siblings' keys unchanged.

ACTIVE carries a Lamport stamp so that two claims crossing on a link are
ordered the same way on both ends: every worker keeps a counter, raises it past
every stamp it receives, and stamps each claim with counter + 1; of two claims
for one key the one with the higher ``(stamp, worker index)`` wins everywhere.
A claim made after hearing another therefore always beats it, and two made at
the same moment pick one winner instead of each side deferring to the other.

Batching: :class:`LinkEncoder` only appends to a list; the adapter calls
:meth:`LinkEncoder.data_to_send` once per event-loop iteration and writes the
result with one ``write`` (many packets per syscall, none per packet).
:class:`LinkDecoder` takes whatever bytes arrive (any chunking, byte-at-a-time
included) and returns complete frames as events; packet payloads are
``memoryview`` slices of the received chunk (no copy).

Errors: a frame whose length is wrong for its type, longer than its bound, or
a first frame that is not a valid HELLO raises :class:`LinkError`; the adapter
closes that link (its routes drop, the sibling redials). Unknown types are
skipped (forward compatible). Memory per link is bounded by the largest frame
(``MAX_LINK_FRAME``) plus one read.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Final, NamedTuple, Union

from ..errors import DerpError
from ..frames import KEY_LEN, MAX_PACKET_SIZE

__all__ = [
    "Active",
    "ClosePeer",
    "Frames",
    "Gone",
    "HELLO_MAGIC",
    "Hello",
    "LinkDecoder",
    "LinkEncoder",
    "LinkError",
    "LinkEvent",
    "LinkFrame",
    "MAX_FRAMES_LEN",
    "MAX_LINK_FRAME",
    "MAX_STATS_LEN",
    "Packet",
    "Pause",
    "Present",
    "Resume",
    "Stats",
]

_HDR = struct.Struct(">BI")
_HELLO = struct.Struct(">4sHHI")
_PRESENT_TAIL = struct.Struct(">16sHB")

HELLO_MAGIC: Final = b"DWL1"
#: Largest STATS payload accepted.
MAX_STATS_LEN: Final = 1 << 20
_MAX_PACKET_FRAME: Final = 2 * KEY_LEN + MAX_PACKET_SIZE
#: Largest frame payload of any type.
MAX_LINK_FRAME: Final = max(MAX_STATS_LEN, _MAX_PACKET_FRAME, 2 * KEY_LEN + (1 << 20))
_PRESENT_LEN: Final = KEY_LEN + _PRESENT_TAIL.size
_STAMP: Final = struct.Struct(">Q")
_ACTIVE_LEN: Final = KEY_LEN + _STAMP.size


class LinkFrame(enum.IntEnum):
    """Frame types of the worker link."""

    HELLO = 0x01
    PRESENT = 0x02
    GONE = 0x03
    ACTIVE = 0x04
    PACKET = 0x05
    STATS = 0x06
    CLOSE_PEER = 0x07
    FRAMES = 0x08
    PAUSE = 0x09
    RESUME = 0x0A


_T_HELLO = LinkFrame.HELLO.value
_T_PRESENT = LinkFrame.PRESENT.value
_T_GONE = LinkFrame.GONE.value
_T_ACTIVE = LinkFrame.ACTIVE.value
_T_PACKET = LinkFrame.PACKET.value
_T_STATS = LinkFrame.STATS.value
_T_CLOSE = LinkFrame.CLOSE_PEER.value
_T_FRAMES = LinkFrame.FRAMES.value
_T_PAUSE = LinkFrame.PAUSE.value
_T_RESUME = LinkFrame.RESUME.value
#: Largest FRAMES payload.
MAX_FRAMES_LEN: Final = 1 << 20
_RECV_T: Final = 0x05  # DERP RecvPacket
_MAX_RECV_LEN: Final = KEY_LEN + MAX_PACKET_SIZE
_NO_SRC: Final = bytes(KEY_LEN)


class LinkError(DerpError):
    """A sibling worker broke the link protocol (the link is closed)."""


@dataclass(frozen=True, slots=True)
class Hello:
    """The sibling's worker index, the worker count it was started with, its pid."""

    index: int
    count: int
    pid: int


@dataclass(frozen=True, slots=True)
class Present:
    """The sibling holds a connection of ``key`` (remote address, PeerPresent flags)."""

    key: bytes
    ip: bytes
    port: int
    flags: int

    @property
    def payload(self) -> bytes:
        """The 51-byte PeerPresent payload (key ‖ ip ‖ port ‖ flags)."""
        return self.key + _PRESENT_TAIL.pack(self.ip, self.port, self.flags)


@dataclass(frozen=True, slots=True)
class Gone:
    """The sibling's last connection of ``key`` left."""

    key: bytes


@dataclass(frozen=True, slots=True)
class Active:
    """The sibling's connection of ``key`` is now the most recently active one;
    ``stamp`` orders this claim against others for ``key`` (module docstring)."""

    key: bytes
    stamp: int


class Packet(NamedTuple):
    """A packet from ``src`` for the receiver's connection of ``dst`` (a tuple: the
    one event per relayed packet, so it is the cheapest immutable value)."""

    src: bytes
    dst: bytes
    payload: bytes | memoryview


class Frames(NamedTuple):
    """DERP RecvPacket frames for the receiver's connection of ``dst``; ``src`` is
    the source key they all share, or ``b""`` if they come from several (or the
    sender did not know)."""

    dst: bytes
    data: bytes | memoryview
    src: bytes


@dataclass(frozen=True, slots=True)
class Stats:
    """The sibling's counters (a JSON object, see :mod:`derp.workers.stats`)."""

    data: bytes


@dataclass(frozen=True, slots=True)
class ClosePeer:
    """Close the receiver's connections of ``key``."""

    key: bytes


@dataclass(frozen=True, slots=True)
class Pause:
    """The sender's connection of ``key`` takes no writes for now: hold packets for it
    (bounded, as for a local connection whose socket is full)."""

    key: bytes


@dataclass(frozen=True, slots=True)
class Resume:
    """The sender's connection of ``key`` takes writes again."""

    key: bytes


LinkEvent = Union[Hello, Present, Gone, Active, Packet, Frames, Stats, ClosePeer, Pause, Resume]


def _key(key: bytes) -> bytes:
    if len(key) != KEY_LEN:
        raise ValueError(f"key must be {KEY_LEN} bytes, got {len(key)}")
    return key


class LinkEncoder:
    """Builds outgoing frames into one pending buffer (see the module docstring).

    Commands append; :meth:`data_to_send` returns everything pending as one
    ``bytes`` and empties the buffer. ``pending_bytes`` lets the adapter bound
    what it queues for a sibling that stopped reading.
    """

    __slots__ = ("_out", "pending_bytes")

    def __init__(self) -> None:
        self._out: list[bytes | bytearray | memoryview] = []
        self.pending_bytes = 0

    def __bool__(self) -> bool:
        return bool(self._out)

    def data_to_send(self) -> bytes:
        """All pending frames as one chunk (``b""`` if none)."""
        out = self._out
        if not out:
            return b""
        data = b"".join(out)
        out.clear()
        self.pending_bytes = 0
        return data

    def chunks_to_send(self) -> list[bytes | bytearray | memoryview]:
        """All pending frames as a list of buffers (for ``writelines``: no join,
        no copy); the encoder starts a new list."""
        out = self._out
        self._out = []
        self.pending_bytes = 0
        return out

    def _frame(self, ftype: int, payload: bytes) -> None:
        self._out.append(_HDR.pack(ftype, len(payload)) + payload)
        self.pending_bytes += 5 + len(payload)

    def hello(self, index: int, count: int, pid: int) -> None:
        self._frame(_T_HELLO, _HELLO.pack(HELLO_MAGIC, index, count, pid))

    def present(self, key: bytes, ip: bytes, port: int, flags: int) -> None:
        if len(ip) != 16:
            raise ValueError("ip must be 16 bytes")
        self._frame(_T_PRESENT, _key(key) + _PRESENT_TAIL.pack(ip, port, flags))

    def present_raw(self, payload: bytes) -> None:
        """PRESENT from a 51-byte PeerPresent payload (key ‖ ip ‖ port ‖ flags)."""
        if len(payload) != _PRESENT_LEN:
            raise ValueError("PRESENT payload must be 51 bytes")
        self._frame(_T_PRESENT, payload)

    def gone(self, key: bytes) -> None:
        self._frame(_T_GONE, _key(key))

    def active(self, key: bytes, stamp: int) -> None:
        self._frame(_T_ACTIVE, _key(key) + _STAMP.pack(stamp))

    def close_peer(self, key: bytes) -> None:
        self._frame(_T_CLOSE, _key(key))

    def pause(self, key: bytes) -> None:
        self._frame(_T_PAUSE, _key(key))

    def resume(self, key: bytes) -> None:
        self._frame(_T_RESUME, _key(key))

    def stats(self, data: bytes) -> None:
        if len(data) > MAX_STATS_LEN:
            raise ValueError("stats payload too large")
        self._frame(_T_STATS, data)

    def frames(self, dst: bytes, data: bytes | bytearray | memoryview, src: bytes = b"") -> None:
        """Queue DERP RecvPacket frames for ``dst`` (the caller built them: whole,
        well-formed frames); ``src`` is the key all of them come from, or ``b""``."""
        self.frames_parts(dst, [data], len(data), src)

    def frames_parts(
        self,
        dst: bytes,
        parts: list[bytes | bytearray | memoryview],
        nbytes: int,
        src: bytes = b"",
    ) -> None:
        """Queue one FRAMES frame whose payload is ``parts`` back to back
        (``nbytes`` in all, each part whole RecvPacket frames): no join, the
        adapter's ``writelines`` sends the parts as they are."""
        if not 0 < nbytes <= MAX_FRAMES_LEN:
            raise ValueError("FRAMES payload must be 1 byte to 1 MiB")
        self._out.append(_HDR.pack(_T_FRAMES, 2 * KEY_LEN + nbytes) + _key(dst) + (src or _NO_SRC))
        self._out.extend(parts)
        self.pending_bytes += 5 + 2 * KEY_LEN + nbytes

    def packet(self, src: bytes, dst: bytes, payload: bytes | memoryview) -> None:
        """Queue a packet (hot path: one header+keys object and the payload view)."""
        n = len(payload)
        if n > MAX_PACKET_SIZE:
            raise ValueError("packet too large")
        out = self._out
        out.append(_HDR.pack(_T_PACKET, 64 + n) + src + dst)
        out.append(payload)
        self.pending_bytes += 69 + n


class LinkDecoder:
    """Parses the incoming byte stream of one link into :data:`LinkEvent` values.

    The first frame must be HELLO (``expect_hello``); after that any order.
    :meth:`receive_data` raises :class:`LinkError` on a malformed frame; the
    decoder is then unusable (the link is closed).
    """

    __slots__ = ("_parts", "_have", "_need", "_events", "_hello", "_failed")

    def __init__(self, *, expect_hello: bool = True) -> None:
        #: the pieces of an incomplete frame, their bytes, and the frame's size
        #: (0 while its header is incomplete)
        self._parts: list[bytes | memoryview] = []
        self._have = 0
        self._need = 0
        self._events: list[LinkEvent] = []
        self._hello = expect_hello
        self._failed = False

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete frame held."""
        return self._have

    def events_received(self) -> list[LinkEvent]:
        """Events parsed so far (the list is handed over; a new one starts)."""
        ev = self._events
        self._events = []
        return ev

    def receive_data(self, data: bytes) -> None:
        """Feed received bytes; complete frames become events.

        An incomplete frame at the end is kept as pieces of the reads it came
        in; the call that completes it joins them once and parses the rest of
        its data in place (no byte is copied twice, however frames are split).
        """
        if self._failed:
            raise LinkError("link already failed")
        pos = 0
        parts = self._parts
        if parts:
            have = self._have
            need = self._need
            if not need:  # under 5 bytes held: the header first
                head = b"".join(parts) + data[: 5 - have]
                if len(head) < 5:
                    parts[:] = [head]
                    self._have = len(head)
                    return
                ftype, length = _HDR.unpack(head)
                if length > MAX_LINK_FRAME:
                    self._fail()
                    raise LinkError(f"link frame type 0x{ftype:02x} of {length} bytes")
                need = self._need = 5 + length
            take = need - have
            if len(data) < take:
                parts.append(data)
                self._have = have + len(data)
                return
            parts.append(memoryview(data)[:take])
            frame = b"".join(parts)
            parts.clear()
            self._have = self._need = 0
            self._parse(frame, 0)
            pos = take
            if pos >= len(data):
                return
        self._parse(data, pos)

    def _fail(self) -> None:
        self._failed = True
        self._parts.clear()
        self._have = self._need = 0

    def _parse(self, data: bytes, pos: int) -> None:
        n = len(data)
        events = self._events
        mv: memoryview | None = None
        unpack = _HDR.unpack_from
        try:
            while n - pos >= 5:
                ftype, length = unpack(data, pos)
                if length > MAX_LINK_FRAME:
                    raise LinkError(f"link frame type 0x{ftype:02x} of {length} bytes")
                start = pos + 5
                end = start + length
                if ftype == _T_FRAMES:
                    if length < 2 * KEY_LEN + 5 + KEY_LEN or length > 2 * KEY_LEN + MAX_FRAMES_LEN:
                        raise LinkError(f"FRAMES of {length} bytes")
                    if end > n:
                        break
                    if self._hello:
                        raise LinkError("first link frame is not HELLO")
                    at = start + 2 * KEY_LEN
                    rtype, rlen = unpack(data, at)
                    if rtype != _RECV_T or rlen < KEY_LEN or rlen > _MAX_RECV_LEN or at + 5 + rlen > end:
                        raise LinkError(f"FRAMES starts with a bad frame (type 0x{rtype:02x}, {rlen} bytes)")
                    if mv is None:
                        mv = memoryview(data)
                    src = data[start + KEY_LEN : at]
                    events.append(
                        Frames(data[start : start + KEY_LEN], mv[at:end], b"" if src == _NO_SRC else src)
                    )
                elif ftype == _T_PACKET:
                    if length < 64 or length > _MAX_PACKET_FRAME:
                        raise LinkError(f"PACKET of {length} bytes")
                    if end > n:
                        break
                    if self._hello:
                        raise LinkError("first link frame is not HELLO")
                    if mv is None:
                        mv = memoryview(data)
                    events.append(
                        Packet(data[start : start + 32], data[start + 32 : start + 64], mv[start + 64 : end])
                    )
                else:
                    self._check_length(ftype, length)
                    if end > n:
                        break
                    self._control(ftype, data[start:end])
                pos = end
        except LinkError:
            self._fail()
            raise
        if pos < n:
            self._parts.append(memoryview(data)[pos:])
            self._have = n - pos
            self._need = 5 + _HDR.unpack_from(data, pos)[1] if n - pos >= 5 else 0

    @staticmethod
    def _check_length(ftype: int, length: int) -> None:
        if ftype == _T_HELLO:
            ok = length == _HELLO.size
        elif ftype == _T_PRESENT:
            ok = length == _PRESENT_LEN
        elif ftype in (_T_GONE, _T_CLOSE, _T_PAUSE, _T_RESUME):
            ok = length == KEY_LEN
        elif ftype == _T_ACTIVE:
            ok = length == _ACTIVE_LEN
        elif ftype == _T_STATS:
            ok = length <= MAX_STATS_LEN
        else:
            ok = True  # unknown: skipped, bounded by MAX_LINK_FRAME
        if not ok:
            raise LinkError(f"link frame type 0x{ftype:02x} of {length} bytes")

    def _control(self, ftype: int, payload: bytes) -> None:
        if self._hello:
            if ftype != _T_HELLO:
                raise LinkError("first link frame is not HELLO")
            magic, index, count, pid = _HELLO.unpack(payload)
            if magic != HELLO_MAGIC:
                raise LinkError("bad HELLO magic")
            self._hello = False
            self._events.append(Hello(index, count, pid))
            return
        if ftype == _T_PRESENT:
            ip, port, flags = _PRESENT_TAIL.unpack_from(payload, KEY_LEN)
            self._events.append(Present(payload[:KEY_LEN], ip, port, flags))
        elif ftype == _T_GONE:
            self._events.append(Gone(payload))
        elif ftype == _T_ACTIVE:
            self._events.append(Active(payload[:KEY_LEN], _STAMP.unpack_from(payload, KEY_LEN)[0]))
        elif ftype == _T_STATS:
            self._events.append(Stats(payload))
        elif ftype == _T_CLOSE:
            self._events.append(ClosePeer(payload))
        elif ftype == _T_PAUSE:
            self._events.append(Pause(payload))
        elif ftype == _T_RESUME:
            self._events.append(Resume(payload))
        elif ftype == _T_HELLO:
            raise LinkError("second HELLO on a link")
        # unknown types: skipped
