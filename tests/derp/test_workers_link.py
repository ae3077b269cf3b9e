"""derp.workers.link: the worker-link codec (golden bytes written by hand, round trips,
arbitrary chunking) and derp.workers.stats pure helpers."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from derp.stats import ServerStats
from derp.stunserver import StunStats
from derp.workers.link import (
    Active,
    ClosePeer,
    Frames,
    Gone,
    Hello,
    LinkDecoder,
    LinkEncoder,
    LinkError,
    Packet,
    Pause,
    Present,
    Resume,
    Stats,
)
from derp.workers.stats import decode_stats, encode_stats, merge_stats

K1 = bytes(range(32))
K2 = bytes(range(32, 64))


def _events(data: bytes, *, hello: bool = False) -> list[object]:
    dec = LinkDecoder(expect_hello=hello)
    dec.receive_data(data)
    out: list[object] = []
    for ev in dec.events_received():
        if isinstance(ev, Packet):
            ev = Packet(ev.src, ev.dst, bytes(ev.payload))
        out.append(ev)
    return out


# --------------------------------------------------------------------------- golden bytes


def test_golden_hello() -> None:
    # type 01, length 0000000c, "DWL1", index 0002, count 0004, pid 00003039 (12345)
    wire = bytes.fromhex("01" "0000000c" "44574c31" "0002" "0004" "00003039")
    enc = LinkEncoder()
    enc.hello(2, 4, 12345)
    assert enc.data_to_send() == wire
    assert _events(wire, hello=True) == [Hello(2, 4, 12345)]


def test_golden_present_gone_active_close_pause_resume() -> None:
    ip = bytes.fromhex("00000000000000000000ffff7f000001")  # ::ffff:127.0.0.1
    present = (
        "02" "00000033" + K1.hex() + "00000000000000000000ffff7f000001" + "1f90" + "01"
    )  # port 8080, flags 0x01
    wire = bytes.fromhex(
        present
        + "03" "00000020" + K2.hex()
        + "04" "00000028" + K1.hex() + "0000000000000102"  # ACTIVE: key, stamp 258
        + "07" "00000020" + K2.hex()
        + "09" "00000020" + K1.hex()
        + "0a" "00000020" + K2.hex()
    )
    enc = LinkEncoder()
    enc.present(K1, ip, 8080, 1)
    enc.gone(K2)
    enc.active(K1, 258)
    enc.close_peer(K2)
    enc.pause(K1)
    enc.resume(K2)
    assert enc.data_to_send() == wire
    assert _events(wire) == [
        Present(K1, ip, 8080, 1), Gone(K2), Active(K1, 258), ClosePeer(K2), Pause(K1), Resume(K2)
    ]
    assert Present(K1, ip, 8080, 1).payload == bytes.fromhex(present)[5:]


def test_golden_packet_and_stats() -> None:
    wire = bytes.fromhex(
        "05" "00000043" + K1.hex() + K2.hex() + "aabbcc"  # 64 + 3 bytes
        + "06" "00000002" + "7b7d"  # "{}"
    )
    enc = LinkEncoder()
    enc.packet(K1, K2, memoryview(b"\xaa\xbb\xcc"))
    enc.stats(b"{}")
    assert enc.pending_bytes == len(wire)
    assert enc.data_to_send() == wire
    assert enc.data_to_send() == b""
    assert _events(wire) == [Packet(K1, K2, b"\xaa\xbb\xcc"), Stats(b"{}")]
    enc.packet(K1, K2, memoryview(b"\xaa\xbb\xcc"))
    enc.stats(b"{}")
    assert b"".join(enc.chunks_to_send()) == wire and enc.pending_bytes == 0
    assert enc.chunks_to_send() == []


def test_golden_frames() -> None:
    # FRAMES: dst K2, src K1, then two DERP RecvPacket frames from K1 (0x05, len 32+2 and 32+0)
    recv = "05" "00000022" + K1.hex() + "0102" + "05" "00000020" + K1.hex()
    wire = bytes.fromhex("08" "0000008c" + K2.hex() + K1.hex() + recv)  # 64 + 39 + 37 = 140
    enc = LinkEncoder()
    enc.frames(K2, bytes.fromhex(recv), K1)
    assert enc.pending_bytes == len(wire)
    assert enc.data_to_send() == wire
    dec = LinkDecoder(expect_hello=False)
    dec.receive_data(wire)
    (ev,) = dec.events_received()
    assert isinstance(ev, Frames)
    assert (ev.dst, bytes(ev.data), ev.src) == (K2, bytes.fromhex(recv), K1)
    # frames from two sources: the src field is 32 zero bytes, src is empty
    mixed = "05" "00000020" + K1.hex() + "05" "00000020" + K2.hex()
    wire = bytes.fromhex("08" "0000008a" + K1.hex() + "00" * 32 + mixed)  # 64 + 2 * 37 = 138
    enc.frames_parts(K1, [bytes.fromhex(mixed[:74]), bytes.fromhex(mixed[74:])], 74)
    assert b"".join(enc.chunks_to_send()) == wire
    dec.receive_data(wire)
    (ev,) = dec.events_received()
    assert isinstance(ev, Frames) and ev.src == b"" and bytes(ev.data) == bytes.fromhex(mixed)


@pytest.mark.parametrize(
    "inner",
    [
        "06" "00000020" + K1.hex(),  # not RecvPacket
        "05" "0000001f" + K1.hex()[:62],  # RecvPacket shorter than a key
        "05" "00000022" + K1.hex(),  # runs past the end
    ],
)
def test_frames_with_a_bad_first_frame_fail_the_link(inner: str) -> None:
    body = K2 + K1 + bytes.fromhex(inner)
    dec = LinkDecoder(expect_hello=False)
    with pytest.raises(LinkError):
        dec.receive_data(bytes([8]) + len(body).to_bytes(4, "big") + body)


def test_frames_shorter_than_keys_and_one_frame_fail_the_link() -> None:
    body = K2 + K1 + bytes.fromhex("05" "00000020") + K1[:31]  # 100 bytes: one short
    dec = LinkDecoder(expect_hello=False)
    with pytest.raises(LinkError):
        dec.receive_data(bytes([8]) + len(body).to_bytes(4, "big") + body)
    with pytest.raises(ValueError):
        LinkEncoder().frames(K2, b"", K1)


def test_a_split_frame_is_joined_once() -> None:
    # one PACKET frame split over three reads, then a STATS frame in the last read
    wire = bytes.fromhex("05" "00000043" + K1.hex() + K2.hex() + "aabbcc" + "06" "00000002" "7b7d")
    dec = LinkDecoder(expect_hello=False)
    dec.receive_data(wire[:3])
    assert dec.buffered == 3 and dec.events_received() == []
    dec.receive_data(wire[3:40])
    assert dec.buffered == 40
    dec.receive_data(wire[40:])
    ev = dec.events_received()
    assert dec.buffered == 0
    assert [type(e) for e in ev] == [Packet, Stats]
    assert bytes(ev[0].payload) == b"\xaa\xbb\xcc" and ev[1] == Stats(b"{}")


def test_unknown_type_is_skipped() -> None:
    wire = bytes.fromhex("7f" "00000002" "0102" "03" "00000020" + K1.hex())
    assert _events(wire) == [Gone(K1)]


@pytest.mark.parametrize(
    "wire, why",
    [
        (bytes.fromhex("03" "0000001f") + bytes(31), "GONE of 31 bytes"),
        (bytes.fromhex("05" "0000003f") + bytes(63), "PACKET shorter than two keys"),
        (bytes.fromhex("05" "00010041"), "PACKET over 64 KiB"),
        (bytes.fromhex("02" "00000032") + bytes(50), "PRESENT of 50 bytes"),
        (bytes.fromhex("04" "00000020") + bytes(32), "ACTIVE without its stamp"),
        (bytes.fromhex("7f" "7fffffff"), "frame over the bound"),
    ],
)
def test_malformed_frames_fail_the_link(wire: bytes, why: str) -> None:
    dec = LinkDecoder(expect_hello=False)
    with pytest.raises(LinkError):
        dec.receive_data(wire)
    with pytest.raises(LinkError):  # the decoder stays failed
        dec.receive_data(b"")


def test_first_frame_must_be_hello() -> None:
    dec = LinkDecoder()
    with pytest.raises(LinkError, match="HELLO"):
        dec.receive_data(bytes.fromhex("03" "00000020") + K1)
    dec = LinkDecoder()
    with pytest.raises(LinkError, match="magic"):
        dec.receive_data(bytes.fromhex("01" "0000000c" "58585858" "0000" "0001" "00000001"))
    dec = LinkDecoder()
    dec.receive_data(bytes.fromhex("01" "0000000c" "44574c31" "0000" "0001" "00000001"))
    with pytest.raises(LinkError, match="second HELLO"):
        dec.receive_data(bytes.fromhex("01" "0000000c" "44574c31" "0000" "0001" "00000001"))


# --------------------------------------------------------------------------- properties

keys = st.binary(min_size=32, max_size=32)
events = st.one_of(
    st.builds(Present, keys, st.binary(min_size=16, max_size=16), st.integers(0, 65535), st.integers(0, 255)),
    st.builds(Gone, keys),
    st.builds(Active, keys, st.integers(0, 2**64 - 1)),
    st.builds(ClosePeer, keys),
    st.builds(Pause, keys),
    st.builds(Resume, keys),
    st.builds(Packet, keys, keys, st.binary(max_size=300)),
    st.builds(Stats, st.binary(max_size=100)),
    st.builds(
        lambda dst, src, pkts: Frames(
            dst, b"".join(b"\x05" + (32 + len(p)).to_bytes(4, "big") + src + p for p in pkts), src
        ),
        keys,
        keys.filter(any),  # 32 zero bytes mean "several sources" on the wire
        st.lists(st.binary(max_size=80), min_size=1, max_size=4),
    ),
)


def _encode(evs: list[object]) -> bytes:
    enc = LinkEncoder()
    enc.hello(1, 2, 3)
    for ev in evs:
        if isinstance(ev, Present):
            enc.present(ev.key, ev.ip, ev.port, ev.flags)
        elif isinstance(ev, Gone):
            enc.gone(ev.key)
        elif isinstance(ev, Active):
            enc.active(ev.key, ev.stamp)
        elif isinstance(ev, ClosePeer):
            enc.close_peer(ev.key)
        elif isinstance(ev, Pause):
            enc.pause(ev.key)
        elif isinstance(ev, Resume):
            enc.resume(ev.key)
        elif isinstance(ev, Packet):
            enc.packet(ev.src, ev.dst, ev.payload)
        elif isinstance(ev, Stats):
            enc.stats(ev.data)
        elif isinstance(ev, Frames):
            enc.frames(ev.dst, bytes(ev.data), ev.src)
    return enc.data_to_send()


def _plain(ev: object) -> object:
    if isinstance(ev, Packet):
        return Packet(ev.src, ev.dst, bytes(ev.payload))
    if isinstance(ev, Frames):
        return Frames(ev.dst, bytes(ev.data), ev.src)
    return ev


@settings(max_examples=150, deadline=None)
@given(st.lists(events, max_size=12), st.data())
def test_round_trip_any_chunking(evs: list[object], data: st.DataObject) -> None:
    wire = _encode(evs)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=8)))
    dec = LinkDecoder()
    got: list[object] = []
    prev = 0
    for cut in [*cuts, len(wire)]:
        dec.receive_data(wire[prev:cut])
        prev = cut
        for ev in dec.events_received():
            got.append(_plain(ev))
    assert got == [Hello(1, 2, 3), *evs]
    assert dec.buffered == 0


@settings(max_examples=30, deadline=None)
@given(st.lists(events, max_size=5))
def test_round_trip_byte_at_a_time(evs: list[object]) -> None:
    wire = _encode(evs)
    dec = LinkDecoder()
    got: list[object] = []
    for i in range(len(wire)):
        dec.receive_data(wire[i : i + 1])
        for ev in dec.events_received():
            got.append(_plain(ev))
    assert got == [Hello(1, 2, 3), *evs]


# --------------------------------------------------------------------------- stats and limits


def test_merge_stats_sums_workers() -> None:
    a, b = ServerStats(), ServerStats()
    sa, sb = StunStats(), StunStats()
    a.packets_sent, b.packets_sent = 3, 4
    a.current_connections, b.current_connections = 1, 2
    a.drop(("unknown_dest", "other"), 10)
    b.drop(("unknown_dest", "other"), 5, 2)
    a.average_queue_duration_ms, b.average_queue_duration_ms = 1.5, 7.0
    sb.requests["success"] = 9
    doc = decode_stats(encode_stats(1, b, sb, {"x": 1.0}))
    total, tstun = ServerStats(), StunStats()
    merge_stats(total, tstun, a, sa, [doc])
    assert total.packets_sent == 7
    assert total.current_connections == 3
    assert total.packets_dropped[("unknown_dest", "other")] == 3
    assert total.bytes_dropped[("unknown_dest", "other")] == 15
    assert total.average_queue_duration_ms == 7.0
    assert tstun.requests["success"] == 9
    merge_stats(total, tstun, a, sa, [])  # a sibling gone: recomputed, not accumulated
    assert total.packets_sent == 3


def test_decode_stats_rejects_other_shapes() -> None:
    with pytest.raises(ValueError):
        decode_stats(b"[]")
    with pytest.raises(ValueError):
        decode_stats(b"not json")

