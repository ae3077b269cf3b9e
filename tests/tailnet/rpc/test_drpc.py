"""DRPC v0.0.33 core: golden bytes from coder-transport.md (§3.2, §5.2-§5.6, written here by
hand), codec round trips, reassembly under any chunking, both connection state machines
wired together, and every transport-fatal case."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tailnet.rpc.drpc import (
    MAX_MESSAGE_SIZE,
    SPLIT_SIZE,
    UNIMPLEMENTED,
    CancelReceived,
    ClientConnection,
    CloseReceived,
    CloseSendReceived,
    DrpcError,
    DrpcProtocolError,
    DrpcStreamClosed,
    ErrorReceived,
    Event,
    InvokeReceived,
    Kind,
    MessageReceived,
    Packet,
    PacketReader,
    ServerConnection,
    StreamFinished,
    decode_error_body,
    decode_metadata,
    decode_varint,
    encode_error_body,
    encode_frame,
    encode_metadata,
    encode_packet,
    encode_varint,
    unknown_rpc_message,
)

H = bytes.fromhex

PATH_DERP_MAPS = "/coder.tailnet.v2.Tailnet/StreamDERPMaps"
# §5.2, as captured: Invoke s1 m1 with the 40-byte path, then the empty Message s1 m2.
INVOKE_DERP_MAPS = H(
    "03 01 01 28 2f 63 6f 64 65 72 2e 74 61 69 6c 6e 65 74 2e 76 32 2e 54 61 69 6c 6e 65"
    "74 2f 53 74 72 65 61 6d 44 45 52 50 4d 61 70 73"
)
EMPTY_MESSAGE_M2 = H("05 01 02 00")
CLOSE_SEND_M3 = H("0d 01 03 00")
CLOSE_M4 = H("0b 01 04 00")


def server_events(data: bytes, server: ServerConnection | None = None) -> list[Event]:
    server = server or ServerConnection()
    server.receive_data(data)
    return server.events_received()


# --------------------------------------------------------------------------- golden bytes


def test_control_byte_of_every_kind() -> None:
    """§3.2: control byte with done=1 per kind; Cancel carries the control bit."""
    expected = {
        Kind.INVOKE: "03 01 01 00",
        Kind.MESSAGE: "05 01 01 00",
        Kind.ERROR: "07 01 01 00",
        Kind.CANCEL: "89 01 01 00",
        Kind.CLOSE: "0b 01 01 00",
        Kind.CLOSE_SEND: "0d 01 01 00",
        Kind.INVOKE_METADATA: "0f 01 01 00",
    }
    for kind, hexed in expected.items():
        assert encode_packet(kind, 1, 1) == H(hexed), kind
        reader = PacketReader()
        reader.receive_data(H(hexed))
        assert reader.next_packet() == Packet(kind, 1, 1, b"")
    # A Message frame that is not the last one of its packet.
    assert encode_frame(Kind.MESSAGE, 1, 1, b"", done=False) == H("04 01 01 00")
    assert encode_frame(Kind.CANCEL, 1, 4, b"", control=True) == H("89 01 04 00")


def test_varint_golden() -> None:
    cases = {
        0: "00", 1: "01", 127: "7f", 128: "80 01", 300: "ac 02", 65536: "80 80 04",
        37856: "e0 a7 02", 4 << 20: "80 80 80 02", (1 << 64) - 1: "ff ff ff ff ff ff ff ff ff 01",
    }
    for value, hexed in cases.items():
        assert encode_varint(value) == H(hexed)
        assert decode_varint(H("aa " + hexed), 1) == (value, 1 + len(H(hexed)))
    # Non-minimal encodings are accepted, as Go's ReadVarint does.
    assert decode_varint(H("81 80 00")) == (1, 3)
    with pytest.raises(ValueError):
        decode_varint(H("80 80"))
    with pytest.raises(DrpcProtocolError, match="varint too long"):
        decode_varint(H("80" * 10 + "01"))
    with pytest.raises(ValueError):
        encode_varint(-1)
    with pytest.raises(ValueError):
        encode_varint(1 << 64)


def test_stream_derp_maps_client_bytes() -> None:
    """§5.2: what a Go client writes for StreamDERPMaps, and how the server reads it."""
    client = ClientConnection()
    assert client.invoke(PATH_DERP_MAPS) == 1
    client.send_message(b"")
    assert client.data_to_send() == INVOKE_DERP_MAPS + EMPTY_MESSAGE_M2
    client.send_close_send()
    assert client.data_to_send() == CLOSE_SEND_M3
    client.send_close()
    assert client.data_to_send() == CLOSE_M4

    server = ServerConnection()
    server.receive_data(INVOKE_DERP_MAPS + EMPTY_MESSAGE_M2 + CLOSE_SEND_M3)
    assert server.events_received() == [
        InvokeReceived(1, PATH_DERP_MAPS, {}),
        MessageReceived(1, b""),
        CloseSendReceived(1),
    ]
    # Server reply: Message s1 m1 with the map (here 3 fake bytes), then Close s1 m2.
    server.send_message(b"\x0a\x01\x02")
    assert server.data_to_send() == H("05 01 01 03 0a 01 02")
    server.send_close()
    assert server.data_to_send() == H("0b 01 02 00")
    assert server.events_received() == [StreamFinished(1)]
    server.receive_data(CLOSE_M4)  # the client's Close after ours: ignored
    assert server.events_received() == []


def test_error_frames_golden() -> None:
    """§5.3: Unimplemented (code 12) and a Go mux's unknown-method error (code 0)."""
    unimplemented = H(
        "07 01 01 15 00 00 00 00 00 00 00 0c 55 6e 69 6d 70 6c 65 6d 65 6e 74 65 64"
    )
    unknown = (
        H("07 01 01 45 00 00 00 00 00 00 00 00")
        + b'protocol error: unknown rpc: "/coder.tailnet.v2.Tailnet/Nope"'
    )
    for body, code, text in [
        (unimplemented, UNIMPLEMENTED, "Unimplemented"),
        (unknown, 0, unknown_rpc_message("/coder.tailnet.v2.Tailnet/Nope")),
    ]:
        server = ServerConnection()
        server.receive_data(H("03 01 01 04 2f 61 2f 62"))  # Invoke "/a/b"
        assert server.events_received() == [InvokeReceived(1, "/a/b", {})]
        server.send_error(code, text)
        assert server.data_to_send() == body
        assert server.events_received() == [StreamFinished(1)]

        client = ClientConnection()
        client.invoke("/a/b")
        client.receive_data(body)
        assert client.events_received() == [ErrorReceived(1, code, text), StreamFinished(1)]
    assert unknown_rpc_message("/coder.tailnet.v2.Tailnet/Nope") == (
        'protocol error: unknown rpc: "/coder.tailnet.v2.Tailnet/Nope"'
    )


def test_unary_and_stream_ends_golden() -> None:
    """§5.4: unary response and stream ends, both directions."""
    server = ServerConnection()
    server.receive_data(H("03 01 01 01 78 05 01 02 00 0d 01 03 00"))  # Invoke, Message, CloseSend
    server.send_message(b"")
    assert server.data_to_send() == H("05 01 01 00")
    server.send_close_send()
    assert server.data_to_send() == H("0d 01 02 00")
    assert server.events_received()[-1] == StreamFinished(1)

    # Coordinate: client Disconnect request then the server's hang-up.
    client = ClientConnection()
    client.invoke("/coder.tailnet.v2.Tailnet/Coordinate")
    client.send_message(H("12 00"))
    assert client.data_to_send().endswith(H("05 01 02 02 12 00"))
    client.receive_data(H("05 01 01 00 0b 01 02 00"))
    assert client.events_received() == [
        MessageReceived(1, b""), CloseReceived(1), StreamFinished(1),
    ]


@pytest.mark.parametrize(
    ("method", "length"),
    [
        ("Coordinate", 0x24),
        ("PostTelemetry", 0x27),
        ("WorkspaceUpdates", 0x2A),
        ("RefreshResumeToken", 0x2C),
        ("StreamDERPMaps", 0x28),
    ],
)
def test_method_path_lengths(method: str, length: int) -> None:
    """§5.5: Invoke ``03 01 01 <len>`` + path."""
    path = "/coder.tailnet.v2.Tailnet/" + method
    client = ClientConnection()
    client.invoke(path)
    wire = client.data_to_send()
    assert wire == H("03 01 01") + bytes((length,)) + path.encode()
    assert server_events(wire) == [InvokeReceived(1, path, {})]


def test_large_message_split_golden() -> None:
    """§5.6: a 300000-byte Message m3 is 4 frames ``04 01 03 80 80 04`` + ``05 01 03 e0 a7 02``."""
    payload = bytes(random.Random(1).randbytes(300000))
    head = H("04 01 03 80 80 04")
    wire = encode_packet(Kind.MESSAGE, 1, 3, payload)
    expected = b"".join(head + payload[i * 65536 : (i + 1) * 65536] for i in range(4))
    expected += H("05 01 03 e0 a7 02") + payload[4 * 65536 :]
    assert wire == expected
    assert len(payload) - 4 * 65536 == 37856

    server = ServerConnection()
    server.receive_data(H("03 01 01 01 78 05 01 02 00"))
    server.send_message(b"")
    server.send_message(b"")
    server.send_message(payload)  # our third message: m3
    assert server.data_to_send()[8:] == expected

    reader = PacketReader()
    reader.receive_data(expected)
    assert reader.next_packet() == Packet(Kind.MESSAGE, 1, 3, payload)


def test_metadata_golden() -> None:
    """§3.6: k="k", v="v" is ``0a 06 0a 01 6b 12 01 76``; it takes m1 and the Invoke m2."""
    body = H("0a 06 0a 01 6b 12 01 76")
    assert encode_metadata({"k": "v"}) == body
    assert decode_metadata(body) == {"k": "v"}
    assert decode_metadata(b"") == {}
    client = ClientConnection()
    client.invoke("/a", {"k": "v"})
    wire = H("0f 01 01 08") + body + H("03 01 02 02 2f 61")
    assert client.data_to_send() == wire
    assert server_events(wire) == [InvokeReceived(1, "/a", {"k": "v"})]


def test_error_body() -> None:
    assert encode_error_body(12, "x") == H("00 00 00 00 00 00 00 0c 78")
    assert decode_error_body(H("00 00 00 00 00 00 01 00 68 69")) == (256, "hi")
    # Fewer than 8 bytes: code 0 and the text kept with Go's note (drpcwire/error.go).
    assert decode_error_body(b"oops") == (0, "oops (drpcwire note: invalid error data)")
    assert decode_error_body(b"") == (0, " (drpcwire note: invalid error data)")


def test_unknown_rpc_quotes_like_go() -> None:
    """Go's %q: escapes for quote, backslash, C escapes, other controls as \\xNN, other
    non-printables as \\uNNNN / \\UNNNNNNNN, bytes that are not UTF-8 as \\xNN."""
    invalid = b"/\xff\xed\xa0\x80".decode("utf-8", "surrogateescape")
    cases = {
        "/a/b": '"/a/b"',
        'q"b\\': '"q\\"b\\\\"',
        "\a\b\f\n\r\t\v": '"\\a\\b\\f\\n\\r\\t\\v"',
        "\x00\x1f\x7f": '"\\x00\\x1f\\x7f"',
        "é😀": '"é😀"',
        "\x85\u00a0\u200b": '"\\u0085\\u00a0\\u200b"',
        "\U000e0001": '"\\U000e0001"',
        invalid: '"/\\xff\\xed\\xa0\\x80"',
    }
    for path, quoted in cases.items():
        assert unknown_rpc_message(path) == "protocol error: unknown rpc: " + quoted
    # A method that is not UTF-8 reaches the server event with its bytes intact.
    events = server_events(H("03 01 01 05 2f ff ed a0 80"))
    assert events == [InvokeReceived(1, invalid, {})]


# --------------------------------------------------------------------------- codec properties


@given(st.integers(min_value=0, max_value=(1 << 64) - 1))
def test_varint_roundtrip(value: int) -> None:
    encoded = encode_varint(value)
    assert len(encoded) <= 10
    assert decode_varint(encoded + b"\x01") == (value, len(encoded))


@st.composite
def packet_lists(draw: st.DrawFn) -> list[Packet]:
    """Packets with increasing (stream, message) ids, sizes around the split sizes used."""
    packets: list[Packet] = []
    sid, mid = 1, 1
    for _ in range(draw(st.integers(0, 12))):
        if draw(st.booleans()):
            mid += draw(st.integers(0, 3))
        else:
            sid += draw(st.integers(1, 2))
            mid = draw(st.integers(1, 3))
        kind = draw(st.sampled_from(Kind))
        data = draw(st.binary(max_size=300))
        packets.append(Packet(kind, sid, mid, data))
        mid += 1
    return packets


@given(packet_lists(), st.integers(min_value=1, max_value=80), st.randoms(use_true_random=False))
def test_packets_roundtrip_any_chunking(
    packets: list[Packet], split: int, rnd: random.Random
) -> None:
    """Encoded packets, cut anywhere, come back whole and in order."""
    wire = b"".join(
        encode_packet(p.kind, p.stream_id, p.message_id, p.data, split=split) for p in packets
    )
    reader = PacketReader()
    got: list[Packet] = []
    pos = 0
    while pos < len(wire):
        step = rnd.choice((1, 1, 2, 3, 5, 17, 64, 1000))
        reader.receive_data(wire[pos : pos + step])
        pos += step
        while (packet := reader.next_packet()) is not None:
            got.append(packet)
        assert reader.buffered <= 300 + 31
    assert got == packets
    assert reader.buffered == 0


@given(packet_lists())
def test_packets_byte_at_a_time(packets: list[Packet]) -> None:
    wire = b"".join(
        encode_packet(p.kind, p.stream_id, p.message_id, p.data, split=7) for p in packets
    )
    reader = PacketReader()
    got: list[Packet] = []
    for i in range(len(wire)):
        reader.receive_data(wire[i : i + 1])
        while (packet := reader.next_packet()) is not None:
            got.append(packet)
    assert got == packets


@given(
    st.integers(0, 63),
    st.integers(0, (1 << 64) - 1),
    st.integers(0, (1 << 64) - 1),
    st.binary(max_size=50),
    st.booleans(),
    st.booleans(),
)
def test_frame_layout(
    kind: int, sid: int, mid: int, data: bytes, done: bool, control: bool
) -> None:
    frame = encode_frame(kind, sid, mid, data, done=done, control=control)
    assert frame[0] == kind << 1 | done | control << 7
    got_sid, pos = decode_varint(frame, 1)
    got_mid, pos = decode_varint(frame, pos)
    length, pos = decode_varint(frame, pos)
    assert (got_sid, got_mid, length, frame[pos:]) == (sid, mid, len(data), data)


def test_skips_unknown_kinds_with_control_bit_and_discards_abandoned_packets() -> None:
    wire = (
        encode_frame(0, 1, 1, b"reserved", control=True)  # kind 0 with the control bit
        + encode_frame(9, 1, 2, b"a", done=False, control=True)
        + encode_frame(9, 1, 2, b"b")  # control bit on any frame counts: skipped
        + encode_frame(Kind.MESSAGE, 1, 3, b"half", done=False)
        + encode_frame(Kind.MESSAGE, 1, 4, b"whole")  # higher id: "half" is discarded
        + encode_frame(Kind.MESSAGE, 1, 5, b"x", done=False)
        + encode_frame(Kind.ERROR, 2, 1, b"")  # higher id, other kind: fine
    )
    for chunk in (len(wire), 1, 3):
        reader = PacketReader()
        for i in range(0, len(wire), chunk):
            reader.receive_data(wire[i : i + chunk])
        assert reader.next_packet() == Packet(Kind.MESSAGE, 1, 4, b"whole")
        assert reader.next_packet() == Packet(Kind.ERROR, 2, 1, b"")
        assert reader.next_packet() is None
        # The skipped control packet at (1, 2) still moved the id on.
        with pytest.raises(DrpcProtocolError, match="id monotonicity violation"):
            reader.receive_data(encode_frame(Kind.MESSAGE, 1, 6, b""))


def test_large_ids_and_non_minimal_varints() -> None:
    big = (1 << 64) - 1
    reader = PacketReader()
    reader.receive_data(encode_frame(Kind.MESSAGE, 1 << 40, big, b"z"))
    assert reader.next_packet() == Packet(Kind.MESSAGE, 1 << 40, big, b"z")
    reader = PacketReader()
    reader.receive_data(H("05 81 00 81 80 00 82 00 68 69"))  # s1 m1 len 2, over-long varints
    assert reader.next_packet() == Packet(Kind.MESSAGE, 1, 1, b"hi")


# --------------------------------------------------------------------------- reader errors


def fails(data: bytes, match: str, reader: PacketReader | None = None) -> PacketReader:
    reader = reader or PacketReader()
    with pytest.raises(DrpcProtocolError, match=match):
        reader.receive_data(data)
    return reader


@pytest.mark.parametrize(
    ("wire", "match"),
    [
        ("05 00 01 00", "id monotonicity violation"),  # stream id 0
        ("05 01 00 00", "id monotonicity violation"),  # message id 0
        ("05 01 01 00 05 01 01 00", "id monotonicity violation"),  # same id twice
        ("05 02 01 00 05 01 09 00", "id monotonicity violation"),  # older stream
        ("05 01 03 00 05 01 02 00", "id monotonicity violation"),  # older message
        ("04 01 01 01 61 07 01 01 00", "packet kind change"),
        ("01 01 01 00", "unknown packet kind: Reserved"),
        ("11 01 01 00", "unknown packet kind: Kind\\(8\\)"),
        ("10 01 01 00 11 01 01 00", "unknown packet kind"),  # decided on the last frame
        ("05" + " 80" * 10 + " 01 01 00", "varint too long"),
    ],
)
def test_reader_protocol_errors(wire: str, match: str) -> None:
    data = H(wire)
    fails(data, match)
    # The same verdict however the bytes arrive.
    reader = PacketReader()
    with pytest.raises(DrpcProtocolError, match=match):
        for i in range(len(data)):
            reader.receive_data(data[i : i + 1])


def test_reader_keeps_packets_before_an_error_and_stays_failed() -> None:
    reader = fails(H("05 01 01 01 61 05 01 01 00"), "id monotonicity violation")
    assert reader.next_packet() == Packet(Kind.MESSAGE, 1, 1, b"a")
    assert reader.next_packet() is None
    with pytest.raises(DrpcProtocolError, match="id monotonicity violation"):
        reader.receive_data(H("05 01 05 00"))
    assert reader.buffered == 0


def test_max_message_size_boundary_single_frame() -> None:
    """A 4 MiB packet is accepted; 4 MiB + 1 fails as soon as the header is read."""
    ok = b"\xab" * MAX_MESSAGE_SIZE
    reader = PacketReader()
    frame = encode_frame(Kind.MESSAGE, 1, 1, ok)
    for i in range(0, len(frame), SPLIT_SIZE):
        reader.receive_data(frame[i : i + SPLIT_SIZE])
        assert reader.buffered <= MAX_MESSAGE_SIZE + 28
    packet = reader.next_packet()
    assert packet is not None and packet.data == ok

    header = H("05 01 01 81 80 80 02")  # length 4 MiB + 1
    reader = fails(header, "data overflow")
    assert reader.buffered == 0


def test_max_message_size_boundary_split() -> None:
    """Split over 64 KiB frames: exactly max_size is fine, one more byte is not."""
    ok = bytes(MAX_MESSAGE_SIZE)
    reader = PacketReader()
    reader.receive_data(encode_packet(Kind.MESSAGE, 1, 1, ok))
    packet = reader.next_packet()
    assert packet is not None and len(packet.data) == MAX_MESSAGE_SIZE

    wire = encode_packet(Kind.MESSAGE, 1, 2, ok + b"!")
    reader2 = PacketReader()
    with pytest.raises(DrpcProtocolError, match="data overflow"):
        for i in range(0, len(wire), SPLIT_SIZE):
            reader2.receive_data(wire[i : i + SPLIT_SIZE])
            assert reader2.buffered <= MAX_MESSAGE_SIZE + 28
    assert reader2.buffered == 0


@pytest.mark.parametrize("max_size", [1, 10, 100])
def test_overflow_exactly_at_max_plus_one(max_size: int) -> None:
    for split in (1, 3, max_size):
        reader = PacketReader(max_size)
        reader.receive_data(encode_packet(Kind.MESSAGE, 1, 1, b"a" * max_size, split=split))
        assert reader.next_packet() == Packet(Kind.MESSAGE, 1, 1, b"a" * max_size)
        fails(encode_packet(Kind.MESSAGE, 1, 2, b"a" * (max_size + 1), split=split),
              "data overflow", PacketReader(max_size))


def test_frame_too_big_for_go_buffer_overflows() -> None:
    """A frame that cannot fit in max_size + 28 bytes (over-long varints) is "data
    overflow", as Go's reader can never parse it."""
    max_size = 64
    ten = "80 80 80 80 80 80 80 80 80 00"  # zero, spelled in 10 bytes
    length = bytes.fromhex("c0 80 80 80 80 80 80 80 80 00")  # 64 in 10 bytes
    header = H("05 81 " + ten[3:] + " 81 " + ten[3:]) + length  # 31-byte header
    assert len(header) == 31
    fails(header, "data overflow", PacketReader(max_size))
    # With minimal varints the same frame fits and is accepted.
    reader = PacketReader(max_size)
    reader.receive_data(encode_frame(Kind.MESSAGE, 1, 1, bytes(max_size)))
    assert reader.next_packet() is not None


def test_reader_bounds_what_it_holds_whatever_is_sent() -> None:
    """Garbage-free floods: a declared huge frame fails at once; an endless header never
    grows past 30 bytes (it fails with "varint too long")."""
    fails(H("05 01 01 ff ff ff ff 0f"), "data overflow")
    reader = PacketReader()
    with pytest.raises(DrpcProtocolError, match="varint too long"):
        reader.receive_data(H("05"))
        for _ in range(40):
            reader.receive_data(H("80"))
            assert reader.buffered <= 30


# --------------------------------------------------------------------------- connections


@dataclass
class Pipe:
    """A client and a server wired together, bytes cut by ``rnd`` (None: whole)."""

    rnd: random.Random | None = None
    split: int = SPLIT_SIZE
    client: ClientConnection = field(init=False)
    server: ServerConnection = field(init=False)

    def __post_init__(self) -> None:
        self.client = ClientConnection(split_size=self.split)
        self.server = ServerConnection(split_size=self.split)

    def _move(self, data: bytes, dst: ServerConnection | ClientConnection) -> list[Event]:
        if self.rnd is None:
            dst.receive_data(data)
        else:
            pos = 0
            while pos < len(data):
                step = self.rnd.choice((1, 2, 7, 64, 4096))
                dst.receive_data(data[pos : pos + step])
                pos += step
        return dst.events_received()

    def to_server(self) -> list[Event]:
        return self._move(self.client.data_to_send(), self.server)

    def to_client(self) -> list[Event]:
        return self._move(self.server.data_to_send(), self.client)


messages = st.lists(st.binary(max_size=200), max_size=8)


@settings(max_examples=60)
@given(
    st.binary(max_size=300),
    st.binary(max_size=300),
    st.integers(1, 100),
    st.randoms(use_true_random=False),
)
def test_unary_exchange(request: bytes, response: bytes, split: int, rnd: random.Random) -> None:
    """Go's unary shape: Invoke+Message+CloseSend; Message then CloseSend back."""
    pipe = Pipe(rnd, split)
    sid = pipe.client.invoke("/svc/Unary")
    pipe.client.send_message(request)
    pipe.client.send_close_send()
    assert pipe.to_server() == [
        InvokeReceived(sid, "/svc/Unary", {}),
        MessageReceived(sid, request),
        CloseSendReceived(sid),
    ]
    pipe.server.send_message(response)
    pipe.server.send_close_send()
    assert pipe.server.events_received() == [StreamFinished(sid)]
    assert pipe.to_client() == [
        MessageReceived(sid, response), CloseSendReceived(sid), StreamFinished(sid),
    ]
    # The client's racing Close after a finished call goes nowhere.
    pipe.client.send_close()
    assert pipe.client.data_to_send() == b""
    assert pipe.client.terminated() and pipe.server.terminated()


@settings(max_examples=60)
@given(messages, st.integers(1, 100), st.randoms(use_true_random=False), st.booleans())
def test_server_streaming_exchange(
    responses: list[bytes], split: int, rnd: random.Random, end_with_close: bool
) -> None:
    pipe = Pipe(rnd, split)
    sid = pipe.client.invoke("/svc/Stream")
    pipe.client.send_message(b"req")
    pipe.client.send_close_send()
    pipe.to_server()
    got: list[Event] = []
    for response in responses:
        pipe.server.send_message(response)
        got += pipe.to_client()
    if end_with_close:  # Coder's streaming handlers
        pipe.server.send_close()
        tail: list[Event] = [CloseReceived(sid), StreamFinished(sid)]
    else:  # plain drpc
        pipe.server.send_close_send()
        tail = [CloseSendReceived(sid), StreamFinished(sid)]
    got += pipe.to_client()
    assert got == [MessageReceived(sid, r) for r in responses] + tail


@settings(max_examples=60)
@given(
    st.lists(st.tuples(st.booleans(), st.binary(max_size=150)), max_size=12),
    st.integers(1, 100),
    st.randoms(use_true_random=False),
)
def test_bidi_exchange(script: list[tuple[bool, bytes]], split: int, rnd: random.Random) -> None:
    """Coordinate's shape: messages both ways in any order, then Disconnect and Close."""
    pipe = Pipe(rnd, split)
    sid = pipe.client.invoke("/svc/Bidi")
    to_server: list[Event] = []
    to_client: list[Event] = []
    for from_client, data in script:
        if from_client:
            pipe.client.send_message(data)
        else:
            if not to_server:  # the server can answer only once it saw the Invoke
                to_server += pipe.to_server()
            pipe.server.send_message(data)
        if rnd.random() < 0.5:
            to_server += pipe.to_server()
            to_client += pipe.to_client()
    pipe.client.send_message(b"\x12\x00")
    to_server += pipe.to_server()
    pipe.server.send_close()
    to_server += pipe.server.events_received()
    to_client += pipe.to_client()
    assert to_server == (
        [InvokeReceived(sid, "/svc/Bidi", {})]
        + [MessageReceived(sid, d) for c, d in script if c]
        + [MessageReceived(sid, b"\x12\x00"), StreamFinished(sid)]
    )
    assert to_client == [MessageReceived(sid, d) for c, d in script if not c] + [
        CloseReceived(sid), StreamFinished(sid),
    ]


def test_several_rpcs_one_after_another_on_one_transport() -> None:
    """drpcserver.ServeOne loops: stream ids 1, 2, 3 on one transport; late packets of an
    older stream are ignored."""
    pipe = Pipe()
    for expected_sid in (1, 2, 3):
        sid = pipe.client.invoke("/svc/M", {"n": str(expected_sid)})
        assert sid == expected_sid
        pipe.client.send_message(b"q")
        pipe.client.send_close_send()
        assert pipe.to_server() == [
            InvokeReceived(sid, "/svc/M", {"n": str(sid)}),
            MessageReceived(sid, b"q"),
            CloseSendReceived(sid),
        ]
        assert pipe.server.current_stream_id == sid
        pipe.server.send_message(b"a")
        pipe.server.send_close_send()
        pipe.server.events_received()
        assert pipe.to_client() == [
            MessageReceived(sid, b"a"), CloseSendReceived(sid), StreamFinished(sid),
        ]
    # The client's late Close for stream 3 (its m5, after metadata, Invoke, Message,
    # CloseSend): ignored.
    pipe.server.receive_data(encode_packet(Kind.CLOSE, 3, 5))
    assert pipe.server.events_received() == []


# --------------------------------------------------------------------------- server rules


def invoke(sid: int, path: str = "/a", mid: int = 1) -> bytes:
    raw = path.encode()
    return H("03") + encode_varint(sid) + encode_varint(mid) + encode_varint(len(raw)) + raw


def live_server(sid: int = 1) -> ServerConnection:
    server = ServerConnection()
    server.receive_data(invoke(sid))
    assert server.events_received() == [InvokeReceived(sid, "/a", {})]
    return server


def test_server_remote_endings() -> None:
    cases: list[tuple[bytes, list[Event]]] = [
        (H("0b 01 02 00"), [CloseReceived(1), StreamFinished(1)]),
        (H("89 01 02 00"), [CancelReceived(1), StreamFinished(1)]),
        (
            H("07 01 02 09 00 00 00 00 00 00 00 03 65"),
            [ErrorReceived(1, 3, "e"), StreamFinished(1)],
        ),
    ]
    for wire, events in cases:
        server = live_server()
        server.receive_data(wire + H("05 01 03 00 0b 01 04 00"))  # later packets ignored
        assert server.events_received() == events
        assert server.terminated() and server.remote_closed and not server.can_send
    # After the remote's CloseSend we may still send; our CloseSend then ends the stream.
    server = live_server()
    server.receive_data(H("0d 01 02 00 05 01 03 01 61"))  # a Message after CloseSend: dropped
    assert server.events_received() == [CloseSendReceived(1)]
    assert server.can_send and server.remote_closed
    server.send_message(b"x")
    server.send_close_send()
    assert server.events_received() == [StreamFinished(1)]
    assert server.data_to_send() == H("05 01 01 01 78 0d 01 02 00")


def test_server_local_endings_and_sends_after_them() -> None:
    endings: list[Callable[[ServerConnection], None]] = [
        ServerConnection.send_close,
        ServerConnection.send_cancel,
        lambda s: s.send_error(UNIMPLEMENTED, "Unimplemented"),
    ]
    for end in endings:
        server = live_server()
        end(server)
        assert server.events_received() == [StreamFinished(1)]
        server.data_to_send()
        # No-ops once terminated; a Message raises.
        server.send_close()
        server.send_error(1, "x")
        server.send_close_send()
        server.send_cancel()
        assert server.data_to_send() == b""
        with pytest.raises(DrpcStreamClosed, match="terminated"):
            server.send_message(b"late")
        assert server.events_received() == []
    server = live_server()
    server.send_close_send()
    server.send_close_send()  # once only
    assert server.data_to_send() == H("0d 01 01 00")
    with pytest.raises(DrpcStreamClosed, match="CloseSend already sent"):
        server.send_message(b"x")
    server.send_error(5, "late error")  # still allowed before termination, as in Go
    assert server.data_to_send() == H("07 01 02 12 00 00 00 00 00 00 00 05") + b"late error"
    with pytest.raises(DrpcStreamClosed, match="no stream"):
        ServerConnection().send_message(b"x")


def test_server_invoke_on_existing_stream_is_fatal() -> None:
    server = live_server()
    server.receive_data(H("05 01 02 01 61"))
    with pytest.raises(DrpcProtocolError, match="invoke on existing stream"):
        server.receive_data(invoke(1, mid=3))
    # Events before the violation survive; the live stream is finished.
    assert server.events_received() == [MessageReceived(1, b"a"), StreamFinished(1)]
    assert server.failed is not None
    with pytest.raises(DrpcProtocolError, match="invoke on existing stream"):
        server.receive_data(H("05 01 09 00"))
    with pytest.raises(DrpcStreamClosed):
        server.send_message(b"x")


def test_server_invoke_metadata_on_existing_stream_is_fatal() -> None:
    server = live_server()
    with pytest.raises(DrpcProtocolError, match="unknown packet kind: InvokeMetadata"):
        server.receive_data(H("0f 01 02 00"))


def test_server_ignores_anything_for_a_terminated_stream() -> None:
    server = live_server()
    server.send_close()
    server.receive_data(invoke(1, mid=2) + H("0f 01 03 00 05 01 04 00"))
    assert server.events_received() == [StreamFinished(1)]


def test_server_higher_invoke_supersedes_live_stream() -> None:
    """drpcmanager: an Invoke for a higher stream id cancels the live stream."""
    server = live_server()
    server.receive_data(H("05 01 02 00") + invoke(2, "/b"))
    assert server.events_received() == [
        MessageReceived(1, b""), StreamFinished(1), InvokeReceived(2, "/b", {}),
    ]
    server.send_message(b"")
    assert server.data_to_send() == H("05 02 01 00")  # message ids restart for the new stream
    assert server.terminated(1) and not server.terminated(2) and not server.terminated()


def test_server_metadata_rules() -> None:
    meta = encode_metadata({"a": "1", "b": "2"})
    # Metadata for stream 1 then Invoke 1: attached.
    server = ServerConnection()
    server.receive_data(encode_packet(Kind.INVOKE_METADATA, 1, 1, meta) + invoke(1, mid=2))
    assert server.events_received() == [InvokeReceived(1, "/a", {"a": "1", "b": "2"})]
    # Metadata for stream 2 ends the live stream 1 even before the Invoke; the last
    # metadata before the Invoke wins; metadata for another stream id is not attached.
    server.receive_data(
        encode_packet(Kind.INVOKE_METADATA, 2, 1, meta)
        + encode_packet(Kind.INVOKE_METADATA, 2, 2, encode_metadata({"c": "3"}))
        + invoke(2, mid=3)
        + encode_packet(Kind.CLOSE, 2, 4)
        + encode_packet(Kind.INVOKE_METADATA, 3, 1, meta)
        + invoke(4)
    )
    assert server.events_received() == [
        StreamFinished(1),
        InvokeReceived(2, "/a", {"c": "3"}),
        CloseReceived(2),
        StreamFinished(2),
        InvokeReceived(4, "/a", {}),
    ]
    bad_bodies = (
        "0a 05 0a 01 6b 12 01",  # entry longer than the body
        "0b 00",  # wrong entry tag
        "0a 00",  # empty entry: no key
        "0a 03 0a 01 6b",  # no value
        "0a 07 0a 01 6b 12 01 76 00",  # trailing byte inside the entry
    )
    for bad in bad_bodies:
        with pytest.raises(DrpcProtocolError, match="invalid invoke metadata"):
            decode_metadata(H(bad))
        fails_server = ServerConnection()
        with pytest.raises(DrpcProtocolError, match="invalid invoke metadata"):
            fails_server.receive_data(encode_packet(Kind.INVOKE_METADATA, 1, 1, H(bad)))


@pytest.mark.parametrize(
    "kind", [Kind.MESSAGE, Kind.CLOSE, Kind.CLOSE_SEND, Kind.CANCEL, Kind.ERROR]
)
def test_server_packet_for_a_stream_never_invoked_is_fatal(kind: Kind) -> None:
    with pytest.raises(DrpcProtocolError, match="never invoked"):
        ServerConnection().receive_data(encode_packet(kind, 1, 1))
    # For a higher id than the live stream: Go cancels the stream and stops reading.
    server = live_server()
    with pytest.raises(DrpcProtocolError, match="for stream 2, which was never invoked"):
        server.receive_data(encode_packet(kind, 2, 1))
    assert server.events_received() == [StreamFinished(1)]


def test_unknown_kind_on_live_stream() -> None:
    server = live_server()
    server.receive_data(encode_frame(12, 1, 2, b"future", control=True) + H("05 01 03 00"))
    assert server.events_received() == [MessageReceived(1, b"")]
    with pytest.raises(DrpcProtocolError, match="unknown packet kind"):
        server.receive_data(encode_frame(12, 1, 4, b"future"))
    assert server.events_received() == [StreamFinished(1)]


def test_receive_eof() -> None:
    server = live_server()
    server.receive_data(H("05 01 02 05 61"))  # an incomplete Message: dropped
    server.receive_eof()
    server.receive_eof()
    assert server.events_received() == [StreamFinished(1)]
    with pytest.raises(DrpcError, match="after receive_eof"):
        server.receive_data(b"x")
    client = ClientConnection()
    client.receive_eof()
    with pytest.raises(DrpcError, match="ended"):
        client.invoke("/a")


def test_data_may_be_bytearray_or_memoryview() -> None:
    client = ClientConnection()
    client.invoke("/a")
    payload = bytearray(b"mutable")
    client.send_message(payload)
    payload[:] = b"changed"
    wire = client.data_to_send()
    server = ServerConnection()
    server.receive_data(memoryview(bytearray(wire)))
    assert server.events_received()[-1] == MessageReceived(1, b"mutable")


# --------------------------------------------------------------------------- client rules


def test_client_one_stream_at_a_time() -> None:
    client = ClientConnection()
    assert client.current_stream_id is None and client.terminated()
    client.invoke("/a")
    with pytest.raises(DrpcError, match="still live"):
        client.invoke("/b")
    client.send_cancel()
    assert client.data_to_send() == invoke(1) + H("89 01 02 00")
    assert client.events_received() == [StreamFinished(1)]
    assert client.invoke("/b") == 2
    assert client.data_to_send() == invoke(2, "/b")


def test_client_rejects_packets_for_streams_it_never_invoked() -> None:
    client = ClientConnection()
    with pytest.raises(DrpcProtocolError, match="never invoked"):
        client.receive_data(H("05 01 01 00"))
    client = ClientConnection()
    client.invoke("/a")
    with pytest.raises(DrpcProtocolError, match="Invoke packet for stream 2"):
        client.receive_data(invoke(2))
    assert client.events_received() == [StreamFinished(1)]
    client = ClientConnection()
    client.invoke("/a")
    with pytest.raises(DrpcProtocolError, match="invoke on existing stream"):
        client.receive_data(invoke(1))


def test_client_close_send_then_server_close() -> None:
    pipe = Pipe()
    sid = pipe.client.invoke("/svc/Stream")
    pipe.client.send_message(b"")
    pipe.client.send_close_send()
    assert not pipe.client.can_send and not pipe.client.terminated()
    pipe.to_server()
    pipe.server.send_message(b"m")
    pipe.server.send_close()
    assert pipe.to_client() == [MessageReceived(sid, b"m"), CloseReceived(sid), StreamFinished(sid)]
