"""Tests for the pure DERP frame codec :mod:`derp.frames`.

Layers:

* golden byte vectors for every frame type, written out by hand from the wire
  spec (``derp.md`` §1.3-1.4), decoded with :class:`FrameDecoder` +
  :func:`parse_frame` and re-encoded to the very same bytes;
* every length/format rule of the spec table raises :class:`FrameError`;
* decoder behaviour: unknown types are skippable, oversize headers fail before
  the payload is buffered, chunking never changes the result;
* Hypothesis round trips over every typed frame.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from derp import frames as F
from derp.errors import FrameError, ProtocolError

KEY_A = bytes(range(1, 33))  # 01 02 .. 20
KEY_B = bytes(range(0xA0, 0xC0))  # a0 .. bf
NONCE = bytes(range(0x40, 0x58))  # 24 bytes
BOX = bytes(16) + b"ciphertext"  # tag + "ciphertext" (opaque to the codec)
MAGIC_HEX = "44 45 52 50 f0 9f 94 91"


def h(text: str) -> bytes:
    """Bytes from spaced hex, so vectors read like the spec tables."""
    return bytes.fromhex(text)


def decode_all(data: bytes, decoder: F.FrameDecoder | None = None) -> list[F.Frame]:
    dec = decoder if decoder is not None else F.FrameDecoder()
    dec.feed(data)
    return list(dec)


def decode_one(data: bytes) -> F.TypedFrame:
    dec = F.FrameDecoder()
    raw = decode_all(data, dec)
    assert len(raw) == 1, raw
    assert dec.buffered == 0
    return F.parse_frame(raw[0].type, raw[0].payload)


# --------------------------------------------------------------------------- golden vectors

GOLDEN: list[tuple[str, bytes, F.TypedFrame]] = [
    (
        "server_key",
        h("01 00 00 00 28") + h(MAGIC_HEX) + KEY_A,
        F.ServerKey(KEY_A),
    ),
    (
        "client_info",
        # 32 key + 24 nonce + 16 tag + 10 ciphertext = 82 = 0x52
        h("02 00 00 00 52") + KEY_A + NONCE + BOX,
        F.ClientInfo(KEY_A, NONCE + BOX),
    ),
    (
        "server_info",
        # derper's {"version":2}: 24 + 16 + 13 = 53 = 0x35
        h("03 00 00 00 35") + NONCE + bytes(16) + b'{"version":2}',
        F.ServerInfo(NONCE + bytes(16) + b'{"version":2}'),
    ),
    (
        "send_packet",
        h("04 00 00 00 25") + KEY_B + b"hello",
        F.SendPacket(KEY_B, b"hello"),
    ),
    (
        "send_packet_empty",
        h("04 00 00 00 20") + KEY_B,
        F.SendPacket(KEY_B, b""),
    ),
    (
        "recv_packet",
        h("05 00 00 00 23") + KEY_A + b"abc",
        F.RecvPacket(KEY_A, b"abc"),
    ),
    ("keep_alive", h("06 00 00 00 00"), F.KeepAlive()),
    ("note_preferred_true", h("07 00 00 00 01 01"), F.NotePreferred(True)),
    ("note_preferred_false", h("07 00 00 00 01 00"), F.NotePreferred(False)),
    (
        "peer_gone_disconnected",
        h("08 00 00 00 21") + KEY_A + h("00"),
        F.PeerGone(KEY_A, F.PeerGoneReason.DISCONNECTED),
    ),
    (
        "peer_gone_not_here",
        h("08 00 00 00 21") + KEY_A + h("01"),
        F.PeerGone(KEY_A, F.PeerGoneReason.NOT_HERE),
    ),
    (
        "peer_present_51",
        # key ‖ ::ffff:127.0.0.1 ‖ port 41641 (0xa2a9) ‖ flags IsRegular
        h("09 00 00 00 33")
        + KEY_B
        + h("00000000 00000000 0000ffff 7f000001")
        + h("a2 a9")
        + h("01"),
        F.PeerPresent(
            KEY_B,
            h("00000000 00000000 0000ffff 7f000001"),
            41641,
            F.PeerPresentFlags.IS_REGULAR,
        ),
    ),
    (
        "forward_packet",
        h("0a 00 00 00 42") + KEY_A + KEY_B + b"wg",
        F.ForwardPacket(KEY_A, KEY_B, b"wg"),
    ),
    ("watch_conns", h("10 00 00 00 00"), F.WatchConns()),
    ("close_peer", h("11 00 00 00 20") + KEY_B, F.ClosePeer(KEY_B)),
    ("ping", h("12 00 00 00 08 01 02 03 04 05 06 07 08"), F.Ping(h("0102030405060708"))),
    ("pong", h("13 00 00 00 08 08 07 06 05 04 03 02 01"), F.Pong(h("0807060504030201"))),
    ("health", h("14 00 00 00 07") + b"no home", F.Health("no home")),
    ("health_ok", h("14 00 00 00 00"), F.Health("")),
    (
        "restarting",
        # reconnect in 1000 ms (0x3e8), try for 30000 ms (0x7530)
        h("15 00 00 00 08 00 00 03 e8 00 00 75 30"),
        F.Restarting(1000, 30000),
    ),
]


def test_golden_covers_every_frame_type() -> None:
    covered = {decode_all(wire)[0].type for _, wire, _ in GOLDEN}
    assert covered == {int(t) for t in F.FrameType}


@pytest.mark.parametrize(("name", "wire", "frame"), GOLDEN, ids=[g[0] for g in GOLDEN])
def test_golden_decode_and_reencode(name: str, wire: bytes, frame: F.TypedFrame) -> None:
    assert decode_one(wire) == frame
    assert F.encode(frame) == wire


def test_golden_specific_encoders() -> None:
    """The dedicated encoders produce the same golden bytes as :func:`encode`."""
    g = {name: wire for name, wire, _ in GOLDEN}
    assert F.encode_server_key(KEY_A) == g["server_key"]
    assert F.encode_client_info(KEY_A, NONCE + BOX) == g["client_info"]
    assert F.encode_server_info(NONCE + bytes(16) + b'{"version":2}') == g["server_info"]
    assert F.encode_send_packet(KEY_B, b"hello") == g["send_packet"]
    assert F.encode_recv_packet(KEY_A, b"abc") == g["recv_packet"]
    assert F.encode_keep_alive() == g["keep_alive"]
    assert F.encode_note_preferred(True) == g["note_preferred_true"]
    assert F.encode_note_preferred(False) == g["note_preferred_false"]
    assert F.encode_peer_gone(KEY_A) == g["peer_gone_disconnected"]
    assert F.encode_peer_gone(KEY_A, F.PeerGoneReason.NOT_HERE) == g["peer_gone_not_here"]
    assert (
        F.encode_peer_present(KEY_B, h("00000000 00000000 0000ffff 7f000001"), 41641, 1)
        == g["peer_present_51"]
    )
    assert F.encode_forward_packet(KEY_A, KEY_B, b"wg") == g["forward_packet"]
    assert F.encode_watch_conns() == g["watch_conns"]
    assert F.encode_close_peer(KEY_B) == g["close_peer"]
    assert F.encode_ping(h("0102030405060708")) == g["ping"]
    assert F.encode_pong(h("0807060504030201")) == g["pong"]
    assert F.encode_health("no home") == g["health"]
    assert F.encode_restarting(1000, 30000) == g["restarting"]
    assert F.encode_header(0x04, 0x25) == h("04 00 00 00 25")
    assert F.encode_frame(0x42, b"xy") == h("42 00 00 00 02") + b"xy"


def test_constants_match_spec() -> None:
    assert F.MAGIC == h(MAGIC_HEX)
    assert F.MAGIC == "DERP\U0001f511".encode()
    assert F.DISCO_MAGIC == h("54 53 f0 9f 92 ac")
    assert F.PROTOCOL_VERSION == 2
    assert F.HEADER_LEN == 5
    assert F.KEY_LEN == 32
    assert F.NONCE_LEN == 24
    assert F.MAX_PACKET_SIZE == 65536
    assert F.MAX_CLIENT_FRAME_SIZE == 1 << 20
    assert int(F.PeerGoneReason.MESH_CONN_BROKE) == 0xF0
    assert [int(f) for f in F.PeerPresentFlags] == [1, 2, 4, 8]


# --------------------------------------------------------------------------- older / longer forms


def test_peer_gone_without_reason_byte_is_disconnected() -> None:
    """Pre-2023 servers send a 32-byte PeerGone; the reason defaults to Disconnected."""
    assert decode_one(h("08 00 00 00 20") + KEY_A) == F.PeerGone(KEY_A, 0)


@pytest.mark.parametrize(
    ("tail", "expected"),
    [
        (b"", F.PeerPresent(KEY_B)),  # 2020 form: key only
        (bytes(15) + b"\x01", F.PeerPresent(KEY_B, bytes(15) + b"\x01")),  # ip, no port
        (bytes(16) + h("00 50"), F.PeerPresent(KEY_B, bytes(16), 80)),  # 2023 form, 50 bytes
    ],
    ids=["32", "48", "50"],
)
def test_peer_present_short_forms(tail: bytes, expected: F.PeerPresent) -> None:
    wire = F.encode_header(0x09, 32 + len(tail)) + KEY_B + tail
    assert decode_one(wire) == expected


def test_server_key_future_bytes_are_kept_aside() -> None:
    wire = F.encode_header(0x01, 44) + F.MAGIC + KEY_A + b"more"
    frame = decode_one(wire)
    assert frame == F.ServerKey(KEY_A, b"more")
    assert F.encode(frame) == wire


def test_ping_keeps_only_first_eight_bytes() -> None:
    wire = F.encode_frame(0x12, bytes(range(1, 11)))  # 10 bytes: accepted, 8 kept
    assert decode_one(wire) == F.Ping(bytes(range(1, 9)))
    wire = F.encode_frame(0x12, bytes(1000))  # upper bound inclusive
    assert decode_one(wire) == F.Ping(bytes(8))


def test_pong_and_restarting_accept_longer_payloads() -> None:
    assert decode_one(F.encode_frame(0x13, bytes(range(12)))) == F.Pong(bytes(range(8)))
    assert decode_one(F.encode_frame(0x15, h("00000001 00000002 ffff"))) == F.Restarting(1, 2)


def test_note_preferred_any_nonzero_byte_is_true() -> None:
    assert decode_one(h("07 00 00 00 01 ff")) == F.NotePreferred(True)


def test_packet_limits_are_inclusive() -> None:
    big = bytes(F.MAX_PACKET_SIZE)
    assert F.parse_frame(0x04, KEY_A + big) == F.SendPacket(KEY_A, big)
    assert F.parse_frame(0x05, KEY_A + big) == F.RecvPacket(KEY_A, big)
    assert F.parse_frame(0x0A, KEY_A + KEY_B + big) == F.ForwardPacket(KEY_A, KEY_B, big)
    assert F.parse_frame(0x01, F.MAGIC + KEY_A + bytes(1024 - 40)) == F.ServerKey(
        KEY_A, bytes(984)
    )
    ci = F.parse_frame(0x02, bytes(F.MAX_CLIENT_INFO_LEN))
    assert isinstance(ci, F.ClientInfo) and len(ci.sealed) == F.MAX_CLIENT_INFO_LEN - 32


# --------------------------------------------------------------------------- length rules


LENGTH_VIOLATIONS: list[tuple[str, int, bytes]] = [
    ("server_key_short", 0x01, F.MAGIC + KEY_A[:31]),
    ("server_key_long", 0x01, F.MAGIC + KEY_A + bytes(1024 - 40 + 1)),
    ("server_key_bad_magic", 0x01, b"DERP\x00\x00\x00\x00" + KEY_A),
    ("client_info_short", 0x02, KEY_A + bytes(23)),
    ("client_info_long", 0x02, bytes(F.MAX_CLIENT_INFO_LEN + 1)),
    ("server_info_short", 0x03, bytes(23)),
    ("server_info_long", 0x03, bytes(F.MAX_SERVER_INFO_LEN + 1)),
    ("send_packet_short", 0x04, bytes(31)),
    ("send_packet_long", 0x04, KEY_A + bytes(F.MAX_PACKET_SIZE + 1)),
    ("recv_packet_short", 0x05, bytes(31)),
    ("recv_packet_long", 0x05, KEY_A + bytes(F.MAX_PACKET_SIZE + 1)),
    ("note_preferred_empty", 0x07, b""),
    ("note_preferred_two", 0x07, b"\x01\x01"),
    ("peer_gone_short", 0x08, bytes(31)),
    ("peer_present_short", 0x09, bytes(31)),
    ("forward_packet_short", 0x0A, bytes(63)),
    ("forward_packet_long", 0x0A, KEY_A + KEY_B + bytes(F.MAX_PACKET_SIZE + 1)),
    ("watch_conns_nonempty", 0x10, b"\x00"),
    ("close_peer_short", 0x11, bytes(31)),
    ("close_peer_long", 0x11, bytes(33)),
    ("ping_short", 0x12, bytes(7)),
    ("ping_long", 0x12, bytes(1001)),
    ("pong_short", 0x13, bytes(7)),
    ("health_not_utf8", 0x14, b"\xff\xfe"),
    ("restarting_short", 0x15, bytes(7)),
]


@pytest.mark.parametrize(
    ("name", "ftype", "payload"), LENGTH_VIOLATIONS, ids=[v[0] for v in LENGTH_VIOLATIONS]
)
def test_length_rule_violations_raise_frame_error(name: str, ftype: int, payload: bytes) -> None:
    with pytest.raises(FrameError) as info:
        F.parse_frame(ftype, payload)
    assert isinstance(info.value, ProtocolError)
    if ftype != 0x14:  # the message names the frame type, for logs
        assert F.FrameType(ftype).name in str(info.value)


def test_every_constrained_type_has_a_violation_case() -> None:
    unconstrained = {F.FrameType.KEEP_ALIVE}
    constrained = {F.FrameType(v[1]) for v in LENGTH_VIOLATIONS}
    assert constrained | unconstrained == set(F.FrameType)


@pytest.mark.parametrize(
    ("call", "exc"),
    [
        (lambda: F.encode_server_key(bytes(31)), ValueError),
        (lambda: F.encode_client_info(bytes(33), NONCE), ValueError),
        (lambda: F.encode_send_packet(bytes(31), b""), ValueError),
        (lambda: F.encode_send_packet(KEY_A, bytes(F.MAX_PACKET_SIZE + 1)), ValueError),
        (lambda: F.encode_recv_packet(b"", b""), ValueError),
        (lambda: F.encode_peer_gone(bytes(31)), ValueError),
        (lambda: F.encode_peer_present(KEY_A, bytes(4)), ValueError),
        (lambda: F.encode_forward_packet(KEY_A, bytes(31), b""), ValueError),
        (lambda: F.encode_forward_packet(KEY_A, KEY_B, bytes(F.MAX_PACKET_SIZE + 1)), ValueError),
        (lambda: F.encode_close_peer(bytes(33)), ValueError),
        (lambda: F.encode_ping(bytes(7)), ValueError),
        (lambda: F.encode_pong(bytes(9)), ValueError),
        (lambda: F.encode(F.ServerKey(bytes(31))), ValueError),
        (lambda: F.encode(F.SendPacket(bytes(33), b"")), ValueError),
    ],
)
def test_encoders_reject_bad_arguments(call: object, exc: type[Exception]) -> None:
    assert callable(call)
    with pytest.raises(exc):
        call()


# --------------------------------------------------------------------------- decoder behaviour


def test_unknown_frame_types_decode_and_are_skippable() -> None:
    ka = F.encode_keep_alive()
    stream = F.encode_frame(0x0B, b"future") + ka + F.encode_frame(0xFF, b"") + ka
    raw = decode_all(stream)
    typed = [F.parse_frame(fr.type, fr.payload) for fr in raw]
    assert typed == [
        F.UnknownFrame(0x0B, b"future"),
        F.KeepAlive(),
        F.UnknownFrame(0xFF, b""),
        F.KeepAlive(),
    ]
    known = [t for t in typed if not isinstance(t, F.UnknownFrame)]
    assert known == [F.KeepAlive(), F.KeepAlive()]
    assert F.encode(F.UnknownFrame(0x0B, b"future")) == stream[:11]


def test_oversize_declared_length_raises_before_payload_is_buffered() -> None:
    dec = F.FrameDecoder(max_frame_size=1000)
    dec.feed(h("04 00 00 03 e9"))  # header only: 1001 bytes declared
    assert dec.buffered == 5
    with pytest.raises(FrameError, match="1001"):
        dec.next_frame()


def test_default_limit_is_one_mebibyte() -> None:
    dec = F.FrameDecoder()
    dec.feed(F.encode_header(0x05, (1 << 20) + 1))
    with pytest.raises(FrameError):
        list(dec)
    ok = F.FrameDecoder()
    ok.feed(F.encode_header(0x42, 1 << 20))
    assert ok.next_frame() is None  # exactly at the limit: waits for the payload


def test_go_client_reading_http_response_as_frame_hits_limit() -> None:
    """'HTTP/1.1 101' read as a frame header is type 0x48 with a huge length."""
    dec = F.FrameDecoder()
    dec.feed(b"HTTP/1.1 101 Switching Protocols\r\n")
    with pytest.raises(FrameError):
        dec.next_frame()


def test_partial_header_and_payload_wait_for_more() -> None:
    wire = F.encode_send_packet(KEY_A, b"payload")
    dec = F.FrameDecoder()
    dec.feed(wire[:3])
    assert dec.next_frame() is None
    assert dec.buffered == 3
    dec.feed(wire[3:10])
    assert dec.next_frame() is None
    assert dec.buffered == 10
    dec.feed(wire[10:])
    assert dec.next_frame() == F.Frame(0x04, KEY_A + b"payload")
    assert dec.next_frame() is None
    assert dec.buffered == 0


def test_decoder_accepts_bytearray_and_memoryview() -> None:
    wire = F.encode_ping(bytes(8)) + F.encode_pong(bytes(8))
    dec = F.FrameDecoder()
    dec.feed(bytearray(wire[:7]))
    dec.feed(memoryview(wire)[7:])
    assert [fr.type for fr in dec] == [0x12, 0x13]


def test_frame_payload_is_immutable_copy() -> None:
    dec = F.FrameDecoder()
    src = bytearray(F.encode_health("x"))
    dec.feed(src)
    frame = dec.next_frame()
    src[5] = ord("y")
    assert frame is not None and type(frame.payload) is bytes and frame.payload == b"x"


# --------------------------------------------------------------------------- disco


def test_looks_like_disco() -> None:
    disco = F.DISCO_MAGIC + bytes(56)  # 62 bytes: the minimum
    assert F.looks_like_disco(disco)
    assert F.looks_like_disco(memoryview(disco + b"box"))
    assert not F.looks_like_disco(disco[:61])
    assert not F.looks_like_disco(b"TS\xf0\x9f\x92\xad" + bytes(56))
    assert not F.looks_like_disco(b"")
    assert not F.looks_like_disco(bytes(1400))  # a WireGuard-sized non-disco packet


@given(st.binary(max_size=200))
def test_looks_like_disco_property(packet: bytes) -> None:
    expected = len(packet) >= 62 and packet.startswith(b"TS\xf0\x9f\x92\xac")
    assert F.looks_like_disco(packet) is expected
    assert F.looks_like_disco(F.DISCO_MAGIC + packet) is (len(packet) >= 56)


# --------------------------------------------------------------------------- hypothesis

keys = st.binary(min_size=32, max_size=32)
packets = st.binary(max_size=1500)
sealed = st.binary(min_size=24, max_size=200)
u32 = st.integers(min_value=0, max_value=2**32 - 1)
known_types = {int(t) for t in F.FrameType}

typed_frames: st.SearchStrategy[F.TypedFrame] = st.one_of(
    st.builds(F.ServerKey, keys, st.binary(max_size=64)),
    st.builds(F.ClientInfo, keys, sealed),
    st.builds(F.ServerInfo, sealed),
    st.builds(F.SendPacket, keys, packets),
    st.builds(F.RecvPacket, keys, packets),
    st.just(F.KeepAlive()),
    st.builds(F.NotePreferred, st.booleans()),
    st.builds(F.PeerGone, keys, st.integers(min_value=0, max_value=255)),
    st.builds(
        F.PeerPresent,
        keys,
        st.binary(min_size=16, max_size=16),
        st.integers(min_value=0, max_value=65535),
        st.integers(min_value=0, max_value=255),
    ),
    st.builds(F.ForwardPacket, keys, keys, packets),
    st.just(F.WatchConns()),
    st.builds(F.ClosePeer, keys),
    st.builds(F.Ping, st.binary(min_size=8, max_size=8)),
    st.builds(F.Pong, st.binary(min_size=8, max_size=8)),
    st.builds(F.Health, st.text(st.characters(codec="utf-8"), max_size=80)),
    st.builds(F.Restarting, u32, u32),
    st.builds(
        F.UnknownFrame,
        st.integers(min_value=0, max_value=255).filter(lambda t: t not in known_types),
        st.binary(max_size=100),
    ),
)


@given(typed_frames)
def test_roundtrip_typed_frame(frame: F.TypedFrame) -> None:
    wire = F.encode(frame)
    ftype, length = struct.unpack(">BI", wire[:5])
    assert length == len(wire) - 5
    assert decode_one(wire) == frame
    assert F.parse_frame(ftype, wire[5:]) == frame


@given(st.lists(typed_frames, max_size=20))
def test_many_frames_in_one_feed(frames: list[F.TypedFrame]) -> None:
    stream = b"".join(F.encode(f) for f in frames)
    dec = F.FrameDecoder()
    dec.feed(stream)
    out = []
    while (raw := dec.next_frame()) is not None:
        out.append(F.parse_frame(raw.type, raw.payload))
    assert out == frames
    assert dec.buffered == 0


@st.composite
def stream_and_cuts(draw: st.DrawFn) -> tuple[list[F.TypedFrame], bytes, list[int]]:
    frames = draw(st.lists(typed_frames, max_size=12))
    stream = b"".join(F.encode(f) for f in frames)
    cuts = draw(st.lists(st.integers(min_value=0, max_value=len(stream)), max_size=30))
    return frames, stream, sorted(cuts)


@given(stream_and_cuts())
def test_chunking_invariance(case: tuple[list[F.TypedFrame], bytes, list[int]]) -> None:
    frames, stream, cuts = case
    bounds = [0, *cuts, len(stream)]
    dec = F.FrameDecoder()
    out: list[F.Frame] = []
    for a, b in zip(bounds, bounds[1:]):
        dec.feed(stream[a:b])  # may be empty
        out.extend(dec)
        # invariant: everything fed and not yet returned is still buffered
        assert dec.buffered == b - sum(5 + len(fr.payload) for fr in out)
    assert [F.parse_frame(fr.type, fr.payload) for fr in out] == frames
    assert dec.buffered == 0


@given(st.lists(typed_frames, min_size=1, max_size=5))
def test_byte_at_a_time(frames: list[F.TypedFrame]) -> None:
    stream = b"".join(F.encode(f) for f in frames)
    dec = F.FrameDecoder()
    out: list[F.Frame] = []
    for i in range(len(stream)):
        dec.feed(stream[i : i + 1])
        out.extend(dec)
    assert out == decode_all(stream)
    assert [F.parse_frame(fr.type, fr.payload) for fr in out] == frames


@given(st.integers(min_value=0, max_value=255), st.binary(max_size=300))
def test_parse_frame_is_total(ftype: int, payload: bytes) -> None:
    """Any (type, payload) either parses or raises FrameError, nothing else."""
    try:
        frame = F.parse_frame(ftype, payload)
    except FrameError:
        return
    assert isinstance(frame, F.TypedFrame.__args__)  # type: ignore[attr-defined]


@given(st.binary(max_size=400), st.integers(min_value=0, max_value=300))
def test_decoder_is_total_on_garbage(data: bytes, limit: int) -> None:
    dec = F.FrameDecoder(max_frame_size=limit)
    dec.feed(data)
    try:
        for fr in dec:
            assert len(fr.payload) <= limit
    except FrameError:
        pass


def test_encoders_reject_out_of_range_integers() -> None:
    """Out-of-range ports, flags and restart durations are ValueErrors, not struct errors."""
    import pytest as _pytest

    from derp import frames as _f

    key = bytes(range(1, 33))
    with _pytest.raises(ValueError):
        _f.encode_peer_present(key, bytes(16), 65536, 0)
    with _pytest.raises(ValueError):
        _f.encode_peer_present(key, bytes(16), 1, 256)
    with _pytest.raises(ValueError):
        _f.encode_restarting(-1, 0)
    with _pytest.raises(ValueError):
        _f.encode_restarting(0, 1 << 32)
