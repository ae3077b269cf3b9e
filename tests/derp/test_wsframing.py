"""derp.wsframing: RFC 6455 framing, sans-I/O.

Golden vectors are the examples of RFC 6455 §5.7 (their text opcode 0x1 changed to
binary 0x2 where DERP needs binary), written here by hand; round trips go through
arbitrary chunking, byte by byte included.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings, strategies as st

from derp.wsframing import CLOSED, CLOSING, OPEN, WsFramer, apply_mask, encode_frame

HELLO_MASKED_BINARY = bytes.fromhex("82 85 37 fa 21 3d 7f 9f 4d 51 58")  # §5.7, opcode 2
HELLO_FRAGMENTS = bytes.fromhex("02 03 48 65 6c") + bytes.fromhex("80 02 6c 6f")  # §5.7, opcode 2
PING_HELLO = bytes.fromhex("89 05 48 65 6c 6c 6f")
PONG_HELLO_MASKED = bytes.fromhex("8a 85 37 fa 21 3d 7f 9f 4d 51 58")


def _server() -> WsFramer:
    return WsFramer(client=False)


def _client() -> WsFramer:
    return WsFramer(client=True)


def _close_code(wire: bytes, masked: bool) -> int:
    """The status code of the one close frame in ``wire``."""
    assert wire[0] == 0x88
    n = wire[1] & 0x7F
    assert bool(wire[1] & 0x80) == masked
    body = apply_mask(wire[6 : 6 + n], wire[2:6]) if masked else wire[2 : 2 + n]
    return int(struct.unpack(">H", body[:2])[0])


def test_rfc_masked_hello_to_server() -> None:
    f = _server()
    assert f.receive_data(HELLO_MASKED_BINARY) == b"Hello"
    assert f.state == OPEN and f.data_to_send() == []


def test_rfc_fragmented_hello_to_client() -> None:
    f = _client()
    assert f.receive_data(HELLO_FRAGMENTS) == b"Hello"


def test_rfc_256_and_64k_unmasked_frames_to_client() -> None:
    f = _client()
    wire = bytes.fromhex("82 7e 01 00") + bytes(range(256))
    wire += bytes.fromhex("82 7f 00 00 00 00 00 01 00 00") + b"\xab" * 65536
    assert f.receive_data(wire) == bytes(range(256)) + b"\xab" * 65536


def test_rfc_ping_is_answered_with_a_masked_pong_by_a_client() -> None:
    f = _client()
    assert f.receive_data(PING_HELLO) == b""
    (pong,) = f.data_to_send()
    assert pong[:2] == PONG_HELLO_MASKED[:2]
    assert apply_mask(pong[6:], pong[2:6]) == b"Hello"


def test_server_sends_unmasked_messages_of_at_most_32k() -> None:
    f = _server()
    assert b"".join(f.encode_binary(bytes(range(256)))) == bytes.fromhex("82 7e 01 00") + bytes(
        range(256)
    )
    assert f.encode_binary(b"hi") == [b"\x82\x02", b"hi"]
    chunks = f.encode_binary(b"\x01" * 65536)  # two messages of 32,768 bytes
    assert chunks[0] == bytes.fromhex("82 7e 80 00") and chunks[2] == bytes.fromhex("82 7e 80 00")
    assert len(chunks) == 4 and chunks[1] == chunks[3] == b"\x01" * 32768
    assert b"".join(f.encode_binary(b"\x02" * 70000))[:2] == b"\x82\x7e"


def test_client_masks_every_message() -> None:
    f = _client()
    head, body = f.encode_binary(b"Hello")
    assert head[:2] == b"\x82\x85" and len(head) == 6
    assert body != b"Hello" and apply_mask(body, head[2:6]) == b"Hello"


@settings(max_examples=200, deadline=None)
@given(
    payloads=st.lists(st.binary(max_size=3000), max_size=8),
    cuts=st.lists(st.integers(min_value=0, max_value=30000), max_size=20),
    to_server=st.booleans(),
    max_send=st.sampled_from([1, 125, 126, 1000, 65536]),
)
def test_round_trip_with_any_chunking(
    payloads: list[bytes], cuts: list[int], to_server: bool, max_send: int
) -> None:
    sender = WsFramer(client=to_server, max_send=max_send)
    receiver = WsFramer(client=not to_server)
    wire = b"".join(c for p in payloads if p for c in sender.encode_binary(p))
    points = sorted({c % (len(wire) + 1) for c in cuts}) + [len(wire)]
    got, last = b"", 0
    for c in points:
        got += receiver.receive_data(wire[last:c])
        last = c
    assert got == b"".join(payloads)
    assert receiver.state == OPEN and receiver.data_to_send() == []


def test_byte_by_byte_with_control_frames_between() -> None:
    sender = _client()
    wire = b"".join(sender.encode_binary(b"A" * 300))
    wire += encode_frame(9, b"ping!", mask=True)
    wire += b"".join(sender.encode_binary(b"B" * 70000))
    wire += encode_frame(10, b"", mask=True)
    f = WsFramer(client=False)
    got = b"".join(f.receive_data(wire[i : i + 1]) for i in range(len(wire)))
    assert got == b"A" * 300 + b"B" * 70000
    (pong,) = f.data_to_send()
    assert pong == b"\x8a\x05ping!"


def _failing(wire: bytes, *, client: bool = False, max_message: int = 1000) -> WsFramer:
    f = WsFramer(client=client, max_message=max_message)
    f.receive_data(wire)
    assert f.state == CLOSED and f.error
    return f


@pytest.mark.parametrize(
    ("wire", "code"),
    [
        (bytes.fromhex("82 05") + b"Hello", 1002),  # unmasked towards a server
        (bytes.fromhex("c2 85 37 fa 21 3d 7f 9f 4d 51 58"), 1002),  # RSV1
        (bytes.fromhex("81 85 37 fa 21 3d 7f 9f 4d 51 58"), 1003),  # text
        (bytes.fromhex("83 80 00 00 00 00"), 1002),  # reserved opcode 3
        (bytes.fromhex("8b 80 00 00 00 00"), 1002),  # reserved control opcode 0xb
        (bytes.fromhex("80 80 00 00 00 00"), 1002),  # continuation outside a message
        (bytes.fromhex("02 80 00 00 00 00 82 80 00 00 00 00"), 1002),  # new message inside one
        (bytes.fromhex("09 80 00 00 00 00"), 1002),  # fragmented ping
        (bytes.fromhex("89 fe 00 7e 00 00 00 00") + bytes(126), 1002),  # 126-byte ping
        (bytes.fromhex("82 ff 80 00 00 00 00 00 00 00 00 00 00 00"), 1002),  # 64-bit top bit
        (bytes.fromhex("82 fe 03 e9 00 00 00 00"), 1009),  # 1001 bytes > 1000: on the header
        (bytes.fromhex("02 fe 01 f4 00 00 00 00") + bytes(500) + bytes.fromhex("80 fe 01 f5"), 1009),
        (bytes.fromhex("88 81 00 00 00 00 03"), 1002),  # close with a 1-byte body
        (bytes.fromhex("88 82 00 00 00 00 03 ed"), 1002),  # close code 1005 may not be sent
        (bytes.fromhex("88 84 00 00 00 00 03 e8 ff fe"), 1007),  # reason not UTF-8
    ],
)
def test_protocol_violations_fail_with_the_right_code(wire: bytes, code: int) -> None:
    f = _failing(wire)
    (close,) = f.data_to_send()
    assert _close_code(close, masked=False) == code == f.close_code
    assert f.receive_data(HELLO_MASKED_BINARY) == b""  # nothing after the failure


def test_masked_frame_to_a_client_is_refused() -> None:
    f = _failing(HELLO_MASKED_BINARY, client=True)
    (close,) = f.data_to_send()
    assert _close_code(close, masked=True) == 1002


def test_data_before_a_failure_is_delivered() -> None:
    f = WsFramer(client=False)
    assert f.receive_data(HELLO_MASKED_BINARY + bytes.fromhex("81 80 00 00 00 00")) == b"Hello"
    assert f.state == CLOSED and f.close_code == 1003


def test_peer_close_is_echoed_and_ends_input() -> None:
    f = _server()
    close = encode_frame(8, struct.pack(">H", 1001) + "bye ✓".encode(), mask=True)
    assert f.receive_data(HELLO_MASKED_BINARY + close + HELLO_MASKED_BINARY) == b"Hello"
    assert f.state == CLOSED and f.close_rcvd == (1001, "bye ✓") and not f.error
    assert f.data_to_send() == [b"\x88\x02\x03\xe9"]


def test_empty_close_is_no_status_and_answered_with_empty_close() -> None:
    f = _client()
    f.receive_data(b"\x88\x00")
    (reply,) = f.data_to_send()
    assert f.close_rcvd == (1005, "") and reply[:2] == b"\x88\x80" and len(reply) == 6


def test_our_close_then_the_reply() -> None:
    f = _server()
    f.send_close(1000, "done")
    assert f.state == CLOSING and f.close_code == 1000
    assert f.data_to_send() == [b"\x88\x06\x03\xe8done"]
    f.send_close(1001)  # only once
    assert f.data_to_send() == []
    f.receive_data(encode_frame(8, b"\x03\xe8", mask=True))
    assert f.state == CLOSED and f.close_rcvd == (1000, "") and f.data_to_send() == []


def test_eof_without_close_frame() -> None:
    f = _server()
    f.receive_data(HELLO_MASKED_BINARY[:4])
    f.receive_eof()
    assert f.state == CLOSED and f.close_rcvd == (1006, "") and not f.error
    assert f.receive_data(HELLO_MASKED_BINARY) == b""


def test_oversized_frame_is_refused_before_it_is_buffered() -> None:
    f = WsFramer(client=False, max_message=1000)
    f.receive_data(bytes.fromhex("82 ff 00 00 00 00 7f ff ff ff"))  # a 2 GiB frame announced
    assert f.state == CLOSED and f.close_code == 1009
