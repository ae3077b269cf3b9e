"""DERP v2 frame codec: constants, frame types, encoders and an incremental decoder.

Pure: no sockets, no asyncio, no crypto. Every transport (TCP, WebSocket), the
server, the client library, the benchmarks and the property tests share it.

Wire format (both directions, after the HTTP upgrade)::

    offset 0     uint8   frame type
    offset 1..4  uint32  big-endian payload length (header not included)
    offset 5..   payload

Frames are a pure byte stream: segment or WebSocket message boundaries carry no
meaning, so :class:`FrameDecoder` accepts arbitrary chunks.

Payload layouts (``‖`` is concatenation, keys are raw 32-byte Curve25519)::

    0x01 ServerKey      magic(8) ‖ server key(32) [‖ ignored future bytes]
    0x02 ClientInfo     client key(32) ‖ nonce(24) ‖ box(JSON)          56 <= len <= 256 KiB
    0x03 ServerInfo     nonce(24) ‖ box(JSON)
    0x04 SendPacket     dst key(32) ‖ packet (<= 64 KiB)
    0x05 RecvPacket     src key(32) ‖ packet
    0x06 KeepAlive      empty
    0x07 NotePreferred  1 byte: 0x01 home, 0x00 not home                 len == 1
    0x08 PeerGone       peer key(32) [‖ reason(1)]
    0x09 PeerPresent    peer key(32) [‖ ip(16) ‖ port(2, BE) ‖ flags(1)]
    0x0a ForwardPacket  src key(32) ‖ dst key(32) ‖ packet (<= 64 KiB)
    0x10 WatchConns     empty                                            len == 0
    0x11 ClosePeer      target key(32)                                   len == 32
    0x12 Ping           8 opaque bytes (server accepts 8..1000, keeps 8)
    0x13 Pong           the 8 bytes of the Ping answered
    0x14 Health         UTF-8 problem text; empty = healthy again
    0x15 Restarting     reconnect-in ms (uint32 BE) ‖ try-for ms (uint32 BE)

Unknown frame types decode like any other (type + payload) and callers skip
them; that is what keeps the protocol forward compatible.

Error contract: decoding either returns a frame or raises :class:`FrameError`
(a :class:`derp.errors.ProtocolError`); anything else is a bug.

The JSON inside ClientInfo/ServerInfo boxes is decoded with
:func:`decode_json_payload`: nesting deeper than :data:`MAX_JSON_DEPTH` or more
than :data:`MAX_JSON_CONTAINERS` arrays/objects is a ``ValueError`` like any
other bad JSON (never a ``RecursionError``).
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from enum import IntEnum, IntFlag
from typing import Any, Iterator, NamedTuple, Union

from .errors import FrameError

__all__ = [
    "MAGIC",
    "PROTOCOL_VERSION",
    "HEADER_LEN",
    "KEY_LEN",
    "NONCE_LEN",
    "MAX_PACKET_SIZE",
    "MAX_CLIENT_INFO_LEN",
    "MAX_SERVER_INFO_LEN",
    "MAX_CLIENT_FRAME_SIZE",
    "KEEPALIVE_INTERVAL",
    "MAX_JSON_DEPTH",
    "MAX_JSON_CONTAINERS",
    "DISCO_MAGIC",
    "FrameType",
    "PeerGoneReason",
    "PeerPresentFlags",
    "Frame",
    "FrameDecoder",
    "encode_frame",
    "encode_header",
    "encode_server_key",
    "encode_client_info",
    "encode_server_info",
    "encode_send_packet",
    "encode_recv_packet",
    "encode_keep_alive",
    "encode_note_preferred",
    "encode_peer_gone",
    "encode_peer_present",
    "encode_forward_packet",
    "encode_watch_conns",
    "encode_close_peer",
    "encode_ping",
    "encode_pong",
    "encode_health",
    "encode_restarting",
    "looks_like_disco",
    "decode_json_payload",
    "ServerKey",
    "ClientInfo",
    "ServerInfo",
    "SendPacket",
    "RecvPacket",
    "KeepAlive",
    "NotePreferred",
    "PeerGone",
    "PeerPresent",
    "ForwardPacket",
    "WatchConns",
    "ClosePeer",
    "Ping",
    "Pong",
    "Health",
    "Restarting",
    "UnknownFrame",
    "TypedFrame",
    "parse_frame",
    "encode",
]

# --------------------------------------------------------------------------- constants

MAGIC = b"DERP\xf0\x9f\x94\x91"  # "DERP" + UTF-8 of U+1F511 (key emoji)
PROTOCOL_VERSION = 2
HEADER_LEN = 5
KEY_LEN = 32
NONCE_LEN = 24
MAX_PACKET_SIZE = 64 * 1024
MAX_CLIENT_INFO_LEN = 256 * 1024
MAX_SERVER_INFO_LEN = NONCE_LEN + (1 << 20)
#: A Go client kills the connection on any frame larger than this.
MAX_CLIENT_FRAME_SIZE = 1 << 20
#: The server sends a KeepAlive at least this often (plus per-connection jitter).
KEEPALIVE_INTERVAL = 60.0
#: Disco messages start with "TS" + U+1F4AC; they use the disco queue and NotHere.
DISCO_MAGIC = b"TS\xf0\x9f\x92\xac"
_DISCO_MIN_LEN = 62  # magic(6) + sender disco key(32) + nonce(24)

#: Deepest JSON nesting accepted in ClientInfo/ServerInfo (real ones are one flat object).
MAX_JSON_DEPTH = 32
#: Most arrays + objects accepted in one ClientInfo/ServerInfo JSON document.
MAX_JSON_CONTAINERS = 256

_HDR = struct.Struct(">BI")
_U32X2 = struct.Struct(">II")
_JSON_STRING = re.compile(rb'"[^"\\]*+(?:\\.[^"\\]*+)*+"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


class FrameType(IntEnum):
    """Frame type byte; names mirror Tailscale's ``Frame*`` constants."""

    SERVER_KEY = 0x01
    CLIENT_INFO = 0x02
    SERVER_INFO = 0x03
    SEND_PACKET = 0x04
    RECV_PACKET = 0x05
    KEEP_ALIVE = 0x06
    NOTE_PREFERRED = 0x07
    PEER_GONE = 0x08
    PEER_PRESENT = 0x09
    FORWARD_PACKET = 0x0A
    WATCH_CONNS = 0x10
    CLOSE_PEER = 0x11
    PING = 0x12
    PONG = 0x13
    HEALTH = 0x14
    RESTARTING = 0x15


class PeerGoneReason(IntEnum):
    """Reason byte of a PeerGone frame."""

    DISCONNECTED = 0x00  # a peer that sent to you left the region
    NOT_HERE = 0x01  # you sent disco to a key this region does not know
    MESH_CONN_BROKE = 0xF0  # never on the wire: synthesised when a mesh link drops


class PeerPresentFlags(IntFlag):
    """Flags byte of a 51-byte PeerPresent frame (0 = server sends no flags)."""

    IS_REGULAR = 0x01
    IS_MESH_PEER = 0x02
    IS_PROBER = 0x04
    NOT_IDEAL = 0x08


# --------------------------------------------------------------------------- encoding


def encode_header(frame_type: int, length: int) -> bytes:
    """Return the 5-byte header for a frame of ``length`` payload bytes."""
    return _HDR.pack(frame_type, length)


def encode_frame(frame_type: int, payload: bytes = b"") -> bytes:
    """Return one whole frame: header followed by ``payload``."""
    return _HDR.pack(frame_type, len(payload)) + payload


def _check_key(key: bytes, what: str = "key") -> None:
    if len(key) != KEY_LEN:
        raise ValueError(f"{what} must be {KEY_LEN} bytes, got {len(key)}")


def encode_server_key(server_key: bytes) -> bytes:
    """ServerKey: magic ‖ 32-byte server public key (40-byte payload)."""
    _check_key(server_key, "server key")
    return _HDR.pack(FrameType.SERVER_KEY, 40) + MAGIC + server_key


def encode_client_info(client_key: bytes, sealed: bytes) -> bytes:
    """ClientInfo: client public key ‖ ``sealed`` (nonce ‖ NaCl box of the JSON)."""
    _check_key(client_key, "client key")
    return encode_frame(FrameType.CLIENT_INFO, client_key + sealed)


def encode_server_info(sealed: bytes) -> bytes:
    """ServerInfo: ``sealed`` (nonce ‖ NaCl box of the JSON)."""
    return encode_frame(FrameType.SERVER_INFO, sealed)


def encode_send_packet(dst: bytes, packet: bytes) -> bytes:
    """SendPacket to ``dst``; the packet may be empty, at most 64 KiB."""
    _check_key(dst, "destination key")
    if len(packet) > MAX_PACKET_SIZE:
        raise ValueError(f"packet of {len(packet)} bytes exceeds {MAX_PACKET_SIZE}")
    return _HDR.pack(FrameType.SEND_PACKET, KEY_LEN + len(packet)) + dst + packet


def encode_recv_packet(src: bytes, packet: bytes) -> bytes:
    """RecvPacket from ``src`` (v2 format: the source key leads the payload)."""
    _check_key(src, "source key")
    return _HDR.pack(FrameType.RECV_PACKET, KEY_LEN + len(packet)) + src + packet


def encode_keep_alive() -> bytes:
    """KeepAlive (empty payload)."""
    return b"\x06\x00\x00\x00\x00"


def encode_note_preferred(preferred: bool) -> bytes:
    """NotePreferred: one byte, 1 if this is the client's home region."""
    return b"\x07\x00\x00\x00\x01" + (b"\x01" if preferred else b"\x00")


def encode_peer_gone(peer: bytes, reason: int = PeerGoneReason.DISCONNECTED) -> bytes:
    """PeerGone: peer key ‖ reason byte."""
    _check_key(peer, "peer key")
    return _HDR.pack(FrameType.PEER_GONE, KEY_LEN + 1) + peer + bytes((reason,))


def encode_peer_present(
    peer: bytes, ip16: bytes = bytes(16), port: int = 0, flags: int = 0
) -> bytes:
    """PeerPresent, current 51-byte form: key ‖ 16-byte IP ‖ BE port ‖ flags."""
    _check_key(peer, "peer key")
    if len(ip16) != 16:
        raise ValueError("ip must be the 16-byte form")
    if not 0 <= port <= 0xFFFF or not 0 <= flags <= 0xFF:
        raise ValueError("port must fit 16 bits and flags 8 bits")
    return (
        _HDR.pack(FrameType.PEER_PRESENT, 51)
        + peer
        + ip16
        + port.to_bytes(2, "big")
        + bytes((flags,))
    )


def encode_forward_packet(src: bytes, dst: bytes, packet: bytes) -> bytes:
    """ForwardPacket (mesh): src key ‖ dst key ‖ packet."""
    _check_key(src, "source key")
    _check_key(dst, "destination key")
    if len(packet) > MAX_PACKET_SIZE:
        raise ValueError(f"packet of {len(packet)} bytes exceeds {MAX_PACKET_SIZE}")
    return _HDR.pack(FrameType.FORWARD_PACKET, 2 * KEY_LEN + len(packet)) + src + dst + packet


def encode_watch_conns() -> bytes:
    """WatchConns (mesh; empty payload)."""
    return b"\x10\x00\x00\x00\x00"


def encode_close_peer(peer: bytes) -> bytes:
    """ClosePeer (mesh): target key."""
    _check_key(peer, "peer key")
    return _HDR.pack(FrameType.CLOSE_PEER, KEY_LEN) + peer


def encode_ping(data: bytes) -> bytes:
    """Ping with 8 opaque bytes."""
    if len(data) != 8:
        raise ValueError("ping data must be 8 bytes")
    return b"\x12\x00\x00\x00\x08" + data


def encode_pong(data: bytes) -> bytes:
    """Pong echoing the 8 bytes of a Ping."""
    if len(data) != 8:
        raise ValueError("pong data must be 8 bytes")
    return b"\x13\x00\x00\x00\x08" + data


def encode_health(problem: str) -> bytes:
    """Health: UTF-8 problem text; ``""`` means healthy again."""
    return encode_frame(FrameType.HEALTH, problem.encode("utf-8"))


def encode_restarting(reconnect_in_ms: int, try_for_ms: int) -> bytes:
    """Restarting: reconnect after ``reconnect_in_ms``, keep trying for ``try_for_ms``."""
    if not (0 <= reconnect_in_ms <= 0xFFFFFFFF and 0 <= try_for_ms <= 0xFFFFFFFF):
        raise ValueError("restart durations must fit an unsigned 32-bit millisecond count")
    return _HDR.pack(FrameType.RESTARTING, 8) + _U32X2.pack(reconnect_in_ms, try_for_ms)


def looks_like_disco(packet: bytes | memoryview) -> bool:
    """True if ``packet`` is a disco message (selects the disco queue and NotHere)."""
    return len(packet) >= _DISCO_MIN_LEN and packet[:6] == DISCO_MAGIC


def decode_json_payload(
    data: bytes, max_depth: int = MAX_JSON_DEPTH, max_containers: int = MAX_JSON_CONTAINERS
) -> Any:
    """``json.loads(data)`` with its shape bounded: ``ValueError`` when arrays and
    objects nest deeper than ``max_depth`` or number more than ``max_containers``.

    The shape is checked before decoding: strings are cut out and everything
    but brackets deleted (C-speed passes), the opening brackets counted, and
    (when there are more than ``max_depth``) the brackets walked, stopping at
    the first one too deep or unbalanced (at most ``2 × max_containers + 1``
    steps). So the decoder never recurses deeper than ``max_depth``, never
    builds a huge tree of containers, and never raises ``RecursionError``.
    Errors: ``ValueError`` (``UnicodeDecodeError`` and ``JSONDecodeError``
    included) for anything that is not acceptable JSON.
    """
    brackets = _JSON_STRING.sub(b"", data).translate(None, _NOT_BRACKETS)
    opens = brackets.count(b"[") + brackets.count(b"{")
    if opens > max_containers:
        raise ValueError(f"JSON has more than {max_containers} arrays and objects")
    if opens > max_depth:
        depth = 0
        for c in brackets:
            if c == 0x5B or c == 0x7B:  # [ {
                depth += 1
                if depth > max_depth:
                    raise ValueError(f"JSON nested deeper than {max_depth} levels")
            else:
                depth -= 1
                if depth < 0:
                    raise ValueError("JSON brackets are unbalanced")
    return json.loads(data)


# --------------------------------------------------------------------------- decoding


class Frame(NamedTuple):
    """One raw frame: its type byte (possibly unknown) and its payload."""

    type: int
    payload: bytes


class FrameDecoder:
    """Incremental frame decoder over an arbitrary chunking of the byte stream.

    Usage: ``feed(chunk)`` then iterate (or call :meth:`next_frame` until it
    returns ``None``). A frame whose declared length exceeds ``max_frame_size``
    raises :class:`FrameError` as soon as its header is seen, before the payload
    is buffered; the decoder is then unusable (the caller closes the connection).

    Invariant: ``buffered`` is the count of bytes fed but not yet returned as
    part of a frame; decoding is independent of how the input was split.
    """

    __slots__ = ("_buf", "_pos", "max_frame_size")

    def __init__(self, max_frame_size: int = MAX_CLIENT_FRAME_SIZE) -> None:
        self._buf = bytearray()
        self._pos = 0
        self.max_frame_size = max_frame_size

    @property
    def buffered(self) -> int:
        """Bytes received but not yet consumed as a complete frame."""
        return len(self._buf) - self._pos

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Append received bytes."""
        if self._pos and self._pos == len(self._buf):
            self._buf.clear()
            self._pos = 0
        self._buf += data

    def next_frame(self) -> Frame | None:
        """Return the next complete frame, or ``None`` if more bytes are needed."""
        buf = self._buf
        pos = self._pos
        avail = len(buf) - pos
        if avail < HEADER_LEN:
            self._compact()
            return None
        ftype, length = _HDR.unpack_from(buf, pos)
        if length > self.max_frame_size:
            raise FrameError(
                f"frame type 0x{ftype:02x} of {length} bytes exceeds limit {self.max_frame_size}"
            )
        end = pos + HEADER_LEN + length
        if end > len(buf):
            self._compact()
            return None
        payload = bytes(buf[pos + HEADER_LEN : end])
        self._pos = end
        return Frame(ftype, payload)

    def _compact(self) -> None:
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0

    def __iter__(self) -> Iterator[Frame]:
        while True:
            frame = self.next_frame()
            if frame is None:
                return
            yield frame


# --------------------------------------------------------------------------- typed frames
#
# Typed views of each frame, for clients, tests and tools. The server hot path
# works on raw (type, payload) pairs and never builds these objects.


@dataclass(frozen=True, slots=True)
class ServerKey:
    key: bytes
    extra: bytes = b""


@dataclass(frozen=True, slots=True)
class ClientInfo:
    key: bytes
    sealed: bytes  # nonce(24) ‖ box


@dataclass(frozen=True, slots=True)
class ServerInfo:
    sealed: bytes  # nonce(24) ‖ box


@dataclass(frozen=True, slots=True)
class SendPacket:
    dst: bytes
    packet: bytes


@dataclass(frozen=True, slots=True)
class RecvPacket:
    src: bytes
    packet: bytes


@dataclass(frozen=True, slots=True)
class KeepAlive:
    pass


@dataclass(frozen=True, slots=True)
class NotePreferred:
    preferred: bool


@dataclass(frozen=True, slots=True)
class PeerGone:
    peer: bytes
    reason: int = PeerGoneReason.DISCONNECTED


@dataclass(frozen=True, slots=True)
class PeerPresent:
    peer: bytes
    ip16: bytes = bytes(16)
    port: int = 0
    flags: int = 0


@dataclass(frozen=True, slots=True)
class ForwardPacket:
    src: bytes
    dst: bytes
    packet: bytes


@dataclass(frozen=True, slots=True)
class WatchConns:
    pass


@dataclass(frozen=True, slots=True)
class ClosePeer:
    peer: bytes


@dataclass(frozen=True, slots=True)
class Ping:
    data: bytes


@dataclass(frozen=True, slots=True)
class Pong:
    data: bytes


@dataclass(frozen=True, slots=True)
class Health:
    problem: str


@dataclass(frozen=True, slots=True)
class Restarting:
    reconnect_in_ms: int
    try_for_ms: int


@dataclass(frozen=True, slots=True)
class UnknownFrame:
    type: int
    payload: bytes


TypedFrame = Union[
    ServerKey,
    ClientInfo,
    ServerInfo,
    SendPacket,
    RecvPacket,
    KeepAlive,
    NotePreferred,
    PeerGone,
    PeerPresent,
    ForwardPacket,
    WatchConns,
    ClosePeer,
    Ping,
    Pong,
    Health,
    Restarting,
    UnknownFrame,
]


def _need(cond: bool, ftype: FrameType, rule: str, length: int) -> None:
    if not cond:
        raise FrameError(f"{ftype.name} frame of {length} bytes: {rule}")


def parse_frame(frame_type: int, payload: bytes) -> TypedFrame:
    """Decode one frame's payload into its typed form, enforcing the length rules.

    The rules are the strict ones a server applies to client frames and a
    client applies to server frames (spec §1.3). Raises :class:`FrameError`.
    """
    n = len(payload)
    try:
        t = FrameType(frame_type)
    except ValueError:
        return UnknownFrame(frame_type, payload)
    if t is FrameType.SERVER_KEY:
        _need(40 <= n <= 1024, t, "length must be 40..1024", n)
        _need(payload[:8] == MAGIC, t, "bad magic", n)
        return ServerKey(payload[8:40], payload[40:])
    if t is FrameType.CLIENT_INFO:
        _need(56 <= n <= MAX_CLIENT_INFO_LEN, t, "length must be 56..256 KiB", n)
        return ClientInfo(payload[:32], payload[32:])
    if t is FrameType.SERVER_INFO:
        _need(24 <= n <= MAX_SERVER_INFO_LEN, t, "length must be 24..24+1 MiB", n)
        return ServerInfo(payload)
    if t is FrameType.SEND_PACKET:
        _need(KEY_LEN <= n <= KEY_LEN + MAX_PACKET_SIZE, t, "need key and <= 64 KiB packet", n)
        return SendPacket(payload[:32], payload[32:])
    if t is FrameType.RECV_PACKET:
        _need(KEY_LEN <= n <= KEY_LEN + MAX_PACKET_SIZE, t, "need key and <= 64 KiB packet", n)
        return RecvPacket(payload[:32], payload[32:])
    if t is FrameType.KEEP_ALIVE:
        return KeepAlive()
    if t is FrameType.NOTE_PREFERRED:
        _need(n == 1, t, "length must be exactly 1", n)
        return NotePreferred(payload[0] != 0)
    if t is FrameType.PEER_GONE:
        _need(n >= KEY_LEN, t, "need a 32-byte key", n)
        return PeerGone(payload[:32], payload[32] if n > 32 else PeerGoneReason.DISCONNECTED)
    if t is FrameType.PEER_PRESENT:
        _need(n >= KEY_LEN, t, "need a 32-byte key", n)
        ip16 = payload[32:48] if n >= 48 else bytes(16)
        port = int.from_bytes(payload[48:50], "big") if n >= 50 else 0
        flags = payload[50] if n >= 51 else 0
        return PeerPresent(payload[:32], ip16, port, flags)
    if t is FrameType.FORWARD_PACKET:
        _need(
            2 * KEY_LEN <= n <= 2 * KEY_LEN + MAX_PACKET_SIZE, t, "need 2 keys and <= 64 KiB", n
        )
        return ForwardPacket(payload[:32], payload[32:64], payload[64:])
    if t is FrameType.WATCH_CONNS:
        _need(n == 0, t, "length must be 0", n)
        return WatchConns()
    if t is FrameType.CLOSE_PEER:
        _need(n == KEY_LEN, t, "length must be 32", n)
        return ClosePeer(payload)
    if t is FrameType.PING:
        _need(8 <= n <= 1000, t, "length must be 8..1000", n)
        return Ping(payload[:8])
    if t is FrameType.PONG:
        _need(n >= 8, t, "length must be >= 8", n)
        return Pong(payload[:8])
    if t is FrameType.HEALTH:
        try:
            return Health(payload.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise FrameError(f"HEALTH frame is not UTF-8: {exc}") from None
    # RESTARTING
    _need(n >= 8, t, "length must be >= 8", n)
    a, b = _U32X2.unpack_from(payload)
    return Restarting(a, b)


def encode(frame: TypedFrame) -> bytes:
    """Encode a typed frame (inverse of :func:`parse_frame` for canonical frames)."""
    if isinstance(frame, ServerKey):
        _check_key(frame.key, "server key")
        return encode_frame(FrameType.SERVER_KEY, MAGIC + frame.key + frame.extra)
    if isinstance(frame, ClientInfo):
        return encode_client_info(frame.key, frame.sealed)
    if isinstance(frame, ServerInfo):
        return encode_server_info(frame.sealed)
    if isinstance(frame, SendPacket):
        return encode_send_packet(frame.dst, frame.packet)
    if isinstance(frame, RecvPacket):
        return encode_recv_packet(frame.src, frame.packet)
    if isinstance(frame, KeepAlive):
        return encode_keep_alive()
    if isinstance(frame, NotePreferred):
        return encode_note_preferred(frame.preferred)
    if isinstance(frame, PeerGone):
        return encode_peer_gone(frame.peer, frame.reason)
    if isinstance(frame, PeerPresent):
        return encode_peer_present(frame.peer, frame.ip16, frame.port, frame.flags)
    if isinstance(frame, ForwardPacket):
        return encode_forward_packet(frame.src, frame.dst, frame.packet)
    if isinstance(frame, WatchConns):
        return encode_watch_conns()
    if isinstance(frame, ClosePeer):
        return encode_close_peer(frame.peer)
    if isinstance(frame, Ping):
        return encode_ping(frame.data)
    if isinstance(frame, Pong):
        return encode_pong(frame.data)
    if isinstance(frame, Health):
        return encode_health(frame.problem)
    if isinstance(frame, Restarting):
        return encode_restarting(frame.reconnect_in_ms, frame.try_for_ms)
    return encode_frame(frame.type, frame.payload)
