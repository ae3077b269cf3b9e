"""Tests for the sans-I/O yamux core (``tailnet.rpc.yamux``), no sockets.

Golden bytes are written by hand from coder-transport.md §2 and §5.1 (hex literals);
the encoder is never used to produce expected values. Property tests wire a client
and a server Session together through an in-memory link with arbitrary chunking.
"""

from __future__ import annotations

import itertools
import random
from collections import defaultdict
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from tailnet.rpc.yamux import (
    HEADER_LEN,
    INITIAL_WINDOW,
    ConnectionTerminated,
    DataReceived,
    Event,
    Flag,
    FrameType,
    GoAwayCode,
    GoAwayReceived,
    Header,
    PingAcked,
    PingReceived,
    Session,
    StreamAccepted,
    StreamClosed,
    StreamEnded,
    StreamOpened,
    StreamReset,
    WindowOpened,
    YamuxError,
    YamuxProtocolError,
    YamuxStreamError,
    decode_header,
    encode_header,
)


def h(text: str) -> bytes:
    return bytes.fromhex(text)


# Hand-written golden frames (spec §2.1-§2.9, §5.1).
SYN1 = h("00 01 00 01 00 00 00 01 00 00 00 00")
SYN2 = h("00 01 00 01 00 00 00 02 00 00 00 00")
SYN3 = h("00 01 00 01 00 00 00 03 00 00 00 00")
SYN5 = h("00 01 00 01 00 00 00 05 00 00 00 00")
SYN7 = h("00 01 00 01 00 00 00 07 00 00 00 00")
ACK1 = h("00 01 00 02 00 00 00 01 00 00 00 00")
ACK2 = h("00 01 00 02 00 00 00 02 00 00 00 00")
FIN1 = h("00 01 00 04 00 00 00 01 00 00 00 00")
FIN_ACK1 = h("00 01 00 06 00 00 00 01 00 00 00 00")
RST1 = h("00 01 00 08 00 00 00 01 00 00 00 00")
RST3 = h("00 01 00 08 00 00 00 03 00 00 00 00")
RST5 = h("00 01 00 08 00 00 00 05 00 00 00 00")
CREDIT_192565_1 = h("00 01 00 00 00 00 00 01 00 02 f0 35")
CREDIT_256K_1 = h("00 01 00 00 00 00 00 01 00 04 00 00")
PING_0 = h("00 02 00 01 00 00 00 00 00 00 00 00")
PONG_0 = h("00 02 00 02 00 00 00 00 00 00 00 00")
PING_1 = h("00 02 00 01 00 00 00 00 00 00 00 01")
PING_DEADBEEF = h("00 02 00 01 00 00 00 00 de ad be ef")
PONG_DEADBEEF = h("00 02 00 02 00 00 00 00 de ad be ef")
GOAWAY_NORMAL = h("00 03 00 00 00 00 00 00 00 00 00 00")
GOAWAY_PROTOCOL = h("00 03 00 00 00 00 00 00 00 00 00 01")
GOAWAY_INTERNAL = h("00 03 00 00 00 00 00 00 00 00 00 02")
GOAWAY_7 = h("00 03 00 00 00 00 00 00 00 00 00 07")

# §5.2: Data sid 1 len 48 carrying the DRPC Invoke + empty Message of StreamDERPMaps.
DATA1_LEN48 = h("00 00 00 00 00 00 00 01 00 00 00 30")
INVOKE_DERPMAPS = h(
    "03 01 01 28 2f 63 6f 64 65 72 2e 74 61 69 6c 6e 65 74 2e 76 32 2e 54 61 69 6c 6e 65"
    "74 2f 53 74 72 65 61 6d 44 45 52 50 4d 61 70 73 05 01 02 00"
)
DATA1_LEN4 = h("00 00 00 00 00 00 00 01 00 00 00 04")
CLOSESEND = h("0d 01 03 00")


def events(sess: Session) -> list[Event]:
    return sess.events_received()


def terminated_events(evs: list[Event]) -> list[ConnectionTerminated]:
    return [e for e in evs if isinstance(e, ConnectionTerminated)]


# ------------------------------------------------------------------------------------
# Header codec


@pytest.mark.parametrize(
    ("args", "golden"),
    [
        ((FrameType.WINDOW_UPDATE, Flag.SYN, 1, 0), SYN1),
        ((FrameType.WINDOW_UPDATE, Flag.ACK, 1, 0), ACK1),
        ((FrameType.WINDOW_UPDATE, Flag.FIN, 1, 0), FIN1),
        ((FrameType.WINDOW_UPDATE, Flag.RST, 1, 0), RST1),
        ((FrameType.WINDOW_UPDATE, Flag.FIN | Flag.ACK, 1, 0), FIN_ACK1),
        ((FrameType.WINDOW_UPDATE, 0, 1, 192565), CREDIT_192565_1),
        ((FrameType.PING, Flag.SYN, 0, 0), PING_0),
        ((FrameType.PING, Flag.ACK, 0, 0), PONG_0),
        ((FrameType.PING, Flag.SYN, 0, 0xDEADBEEF), PING_DEADBEEF),
        ((FrameType.PING, Flag.ACK, 0, 0xDEADBEEF), PONG_DEADBEEF),
        ((FrameType.GO_AWAY, 0, 0, GoAwayCode.NORMAL), GOAWAY_NORMAL),
        ((FrameType.GO_AWAY, 0, 0, GoAwayCode.PROTOCOL_ERROR), GOAWAY_PROTOCOL),
        ((FrameType.GO_AWAY, 0, 0, GoAwayCode.INTERNAL_ERROR), GOAWAY_INTERNAL),
        ((FrameType.DATA, 0, 1, 48), DATA1_LEN48),
        ((FrameType.DATA, Flag.SYN, 0xFFFFFFFD, 0xFFFFFFFF), h("00 00 00 01 ff ff ff fd ffffffff")),
    ],
)
def test_header_golden(args: tuple[int, int, int, int], golden: bytes) -> None:
    assert encode_header(*args) == golden
    ftype, flags, sid, length = args
    assert decode_header(golden) == Header(0, FrameType(ftype), Flag(flags), sid, length)
    assert len(golden) == HEADER_LEN


def test_decode_header_errors() -> None:
    with pytest.raises(YamuxProtocolError, match="version") as exc:
        decode_header(h("01 00 00 00 00 00 00 01 00 00 00 00"))
    assert exc.value.code == GoAwayCode.PROTOCOL_ERROR
    with pytest.raises(YamuxProtocolError, match="type"):
        decode_header(h("00 04 00 00 00 00 00 00 00 00 00 00"))
    with pytest.raises(ValueError):
        decode_header(SYN1[:11])
    with pytest.raises(ValueError):
        encode_header(FrameType.DATA, 0, 1 << 32, 0)
    # Unknown flag bits are kept (Go ignores them).
    assert decode_header(h("00 01 00 11 00 00 00 01 00 00 00 00")).flags == 0x11


@given(
    ftype=st.sampled_from(list(FrameType)),
    flags=st.integers(0, 0xFFFF),
    sid=st.integers(0, 0xFFFFFFFF),
    length=st.integers(0, 0xFFFFFFFF),
)
def test_header_round_trip(ftype: FrameType, flags: int, sid: int, length: int) -> None:
    raw = encode_header(ftype, flags, sid, length)
    assert len(raw) == HEADER_LEN
    assert decode_header(raw) == Header(0, ftype, Flag(flags), sid, length)


def test_error_classes() -> None:
    assert YamuxError("x").code == GoAwayCode.INTERNAL_ERROR
    assert YamuxProtocolError("x").code == GoAwayCode.PROTOCOL_ERROR
    assert issubclass(YamuxProtocolError, YamuxError)
    assert issubclass(YamuxStreamError, YamuxError)
    assert YamuxStreamError("x", 3).stream_id == 3


def test_session_rejects_small_window() -> None:
    with pytest.raises(ValueError):
        Session(client=True, window=INITIAL_WINDOW - 1)


# ------------------------------------------------------------------------------------
# Bytes the session emits


def test_open_stream_bytes_and_ids() -> None:
    c = Session(client=True)
    assert c.open_stream() == 1
    assert c.data_to_send() == SYN1
    assert c.open_stream() == 3
    assert c.data_to_send() == SYN3
    assert c.data_to_send() == b""
    s = Session(client=False)
    assert s.open_stream() == 2
    assert s.data_to_send() == SYN2
    assert s.stream_ids() == [2] and s.is_open(2) and s.streams == 1


def test_accept_sends_ack_only_on_accept() -> None:
    s = Session(client=False)
    s.receive_data(SYN1)
    assert events(s) == [StreamOpened(1)]
    assert s.data_to_send() == b""  # Go ACKs only on Accept
    assert s.backlog == 1
    s.accept_stream(1)
    assert s.data_to_send() == ACK1
    assert s.backlog == 0
    s.accept_stream(1)  # idempotent
    s.accept_stream(99)  # unknown: no-op
    assert s.data_to_send() == b""
    c = Session(client=True)
    c.open_stream()
    c.data_to_send()
    c.receive_data(ACK1)
    assert events(c) == [StreamAccepted(1)]
    c.receive_data(ACK1)  # a second ACK changes nothing
    assert events(c) == []


def test_data_frames_golden_derpmaps_flow() -> None:
    """§5.2: SYN, Data len 48 (Invoke + Message), Data len 4 (CloseSend), then FIN."""
    c = Session(client=True)
    sid = c.open_stream()
    c.send_data(sid, INVOKE_DERPMAPS)
    c.send_data(sid, bytearray(CLOSESEND))
    assert c.data_to_send() == SYN1 + DATA1_LEN48 + INVOKE_DERPMAPS + DATA1_LEN4 + CLOSESEND
    assert c.send_window(sid) == INITIAL_WINDOW - 52
    s = Session(client=False)
    s.receive_data(SYN1 + DATA1_LEN48 + INVOKE_DERPMAPS + DATA1_LEN4 + CLOSESEND)
    assert events(s) == [
        StreamOpened(1),
        DataReceived(1, INVOKE_DERPMAPS),
        DataReceived(1, CLOSESEND),
    ]
    assert s.recv_window(1) == INITIAL_WINDOW - 52
    s.accept_stream(1)
    s.send_data(1, h("05 01 01 00"))
    assert s.data_to_send() == ACK1 + h("00 00 00 00 00 00 00 01 00 00 00 04 05 01 01 00")
    c.close_stream(sid)
    assert c.data_to_send() == FIN1


def test_first_data_frame_of_unaccepted_stream_carries_ack() -> None:
    s = Session(client=False)
    s.receive_data(SYN1)
    s.send_data(1, b"hi")
    assert s.data_to_send() == h("00 00 00 02 00 00 00 01 00 00 00 02") + b"hi"
    assert s.backlog == 0
    s.accept_stream(1)  # already acknowledged by the Data frame
    assert s.data_to_send() == b""


def test_close_before_accept_is_fin_ack() -> None:
    s = Session(client=False)
    s.receive_data(SYN1)
    s.close_stream(1)
    assert s.data_to_send() == FIN_ACK1
    s.close_stream(1)  # never a second FIN
    assert s.data_to_send() == b""
    with pytest.raises(YamuxStreamError):
        s.send_data(1, b"x")


def test_window_credit_192565_after_consumption() -> None:
    """Credit returns only when >= 128 KiB is owed, as Go (§2.6, §5.1)."""
    s = Session(client=False)
    payload = bytes(range(256)) * 752 + bytes(53)  # 192565 bytes
    assert len(payload) == 192565
    s.receive_data(SYN1 + h("00 00 00 00 00 00 00 01 00 02 f0 35") + payload)
    evs = events(s)
    assert evs[0] == StreamOpened(1)
    assert b"".join(e.data for e in evs if isinstance(e, DataReceived)) == payload
    s.accept_stream(1)
    assert s.data_to_send() == ACK1
    s.consumed(1, 131071)  # owed: 131071 < 131072
    assert s.data_to_send() == b""
    s.consumed(1, 192565 - 131071)
    assert s.data_to_send() == CREDIT_192565_1
    assert s.recv_window(1) == INITIAL_WINDOW
    with pytest.raises(YamuxStreamError):
        s.consumed(1, 1)  # nothing left to consume


def test_ping_bytes_and_replies() -> None:
    c = Session(client=True)
    assert c.ping() == 0
    assert c.data_to_send() == PING_0
    assert c.ping() == 1
    assert c.data_to_send() == PING_1
    assert c.ping(0xDEADBEEF) == 0xDEADBEEF
    assert c.data_to_send() == PING_DEADBEEF
    assert c.ping() == 2  # explicit opaques do not move the counter
    c.data_to_send()
    s = Session(client=False)
    s.receive_data(PING_0 + PING_DEADBEEF)
    assert s.data_to_send() == PONG_0 + PONG_DEADBEEF
    assert events(s) == [PingReceived(0), PingReceived(0xDEADBEEF)]
    c.receive_data(PONG_DEADBEEF + PONG_0 + PONG_0)  # second PONG_0 is unknown: ignored
    assert events(c) == [PingAcked(0xDEADBEEF), PingAcked(0)]
    assert c.data_to_send() == b""
    c.cancel_ping(1)
    c.receive_data(h("00 02 00 02 00 00 00 00 00 00 00 01"))
    assert events(c) == []
    assert not c.terminated


def test_go_away_and_terminate_bytes() -> None:
    s = Session(client=False)
    s.go_away()
    assert s.data_to_send() == GOAWAY_NORMAL and s.local_go_away
    for code, golden in [
        (GoAwayCode.PROTOCOL_ERROR, GOAWAY_PROTOCOL),
        (GoAwayCode.INTERNAL_ERROR, GOAWAY_INTERNAL),
        (GoAwayCode.NORMAL, GOAWAY_NORMAL),
    ]:
        t = Session(client=True)
        t.terminate(code, "bye")
        assert t.data_to_send() == golden
        assert events(t) == [ConnectionTerminated(code, "bye", False)]
        assert t.terminated
    quiet = Session(client=True)
    quiet.terminate(None, "closed")  # like Go's Session.Close: no GoAway
    assert quiet.data_to_send() == b""
    assert events(quiet) == [ConnectionTerminated(0, "closed", False)]


# ------------------------------------------------------------------------------------
# Fatal input: GoAway(1) queued, ConnectionTerminated(1, remote=False)


FATAL_INPUTS = {
    "bad version": h("01 01 00 01 00 00 00 01 00 00 00 00"),
    "type 4": h("00 04 00 00 00 00 00 00 00 00 00 00"),
    "type 255": h("00 ff 00 00 00 00 00 00 00 00 00 00"),
    "duplicate SYN": SYN1 + SYN1,
    "duplicate SYN on data": SYN1 + h("00 00 00 01 00 00 00 01 00 00 00 01 41"),
    # SYN + Data claiming 262145 bytes: fatal at the header, before any body byte.
    "recv window exceeded": h("00 00 00 01 00 00 00 01 00 04 00 01"),
    "recv window exceeded after use": SYN1
    + h("00 00 00 00 00 00 00 01 00 03 00 00")
    + bytes(0x30000)
    + h("00 00 00 00 00 00 00 01 00 01 00 01"),
    "second FIN": SYN1 + FIN1 + FIN1,
    "second FIN on data": SYN1 + h("00 00 00 04 00 00 00 01 00 00 00 01 41") + FIN1,
}


@pytest.mark.parametrize("name", sorted(FATAL_INPUTS))
@pytest.mark.parametrize("chunk", [0, 1, 5])
def test_fatal_input(name: str, chunk: int) -> None:
    s = Session(client=False)
    raw = FATAL_INPUTS[name]
    if chunk:
        for i in range(0, len(raw), chunk):
            s.receive_data(raw[i : i + chunk])
    else:
        s.receive_data(raw)
    evs = events(s)
    term = terminated_events(evs)
    assert len(term) == 1 and evs[-1] is term[0]
    assert term[0].code == GoAwayCode.PROTOCOL_ERROR and not term[0].remote
    assert s.data_to_send() == GOAWAY_PROTOCOL
    assert s.terminated and s.streams == 0
    # Everything afterwards is ignored; commands fail or do nothing.
    s.receive_data(PING_0)
    s.receive_eof()
    assert events(s) == [] and s.data_to_send() == b""
    with pytest.raises(YamuxError):
        s.open_stream()
    with pytest.raises(YamuxError):
        s.send_data(1, b"x")
    with pytest.raises(YamuxError):
        s.ping()
    s.close_stream(1)
    s.reset_stream(1)
    s.consumed(1, 1)
    s.accept_stream(1)
    s.go_away()
    s.terminate(GoAwayCode.INTERNAL_ERROR, "again")
    assert events(s) == [] and s.data_to_send() == b""


def test_fatal_reasons() -> None:
    s = Session(client=False)
    s.receive_data(h("00 00 00 01 00 00 00 01 00 04 00 01"))
    assert "recv window exceeded" in terminated_events(events(s))[0].reason
    s = Session(client=False)
    s.receive_data(SYN1 + SYN1)
    assert "duplicate stream" in terminated_events(events(s))[0].reason
    s = Session(client=False)
    s.receive_data(SYN1 + FIN1 + FIN1)
    assert "unexpected FIN" in terminated_events(events(s))[0].reason


def test_server_opened_stream_is_acked_by_client() -> None:
    c = Session(client=True)
    c.receive_data(SYN2)
    assert events(c) == [StreamOpened(2)]
    c.accept_stream(2)
    assert c.data_to_send() == ACK2


def test_full_window_consumed_returns_256k() -> None:
    s = Session(client=False)
    s.receive_data(h("00 00 00 01 00 00 00 01 00 04 00 00") + bytes(INITIAL_WINDOW))
    s.accept_stream(1)
    assert s.data_to_send() == ACK1
    s.consumed(1, INITIAL_WINDOW)
    assert s.data_to_send() == CREDIT_256K_1
    s.receive_data(h("00 00 00 00 00 00 00 01 00 04 00 00") + bytes(INITIAL_WINDOW))
    assert not s.terminated and s.recv_window(1) == 0


def test_window_exactly_full_is_fine() -> None:
    s = Session(client=False)
    s.receive_data(h("00 00 00 01 00 00 00 01 00 04 00 00") + bytes(INITIAL_WINDOW))
    assert not s.terminated
    assert s.recv_window(1) == 0
    s.receive_data(h("00 00 00 00 00 00 00 01 00 00 00 00"))  # empty Data: fine
    assert not s.terminated
    s.receive_data(h("00 00 00 00 00 00 00 01 00 00 00 01"))
    assert s.terminated and s.data_to_send() == GOAWAY_PROTOCOL


@pytest.mark.parametrize(
    ("raw", "code", "reason"),
    [
        (GOAWAY_PROTOCOL, 1, "yamux protocol error"),
        (GOAWAY_INTERNAL, 2, "remote yamux internal error"),
        (GOAWAY_7, 7, "unexpected go away"),
    ],
)
def test_remote_go_away_error_is_fatal(raw: bytes, code: int, reason: str) -> None:
    c = Session(client=True)
    c.open_stream()
    c.data_to_send()
    c.receive_data(raw + PING_0)
    evs = events(c)
    assert evs[0] == GoAwayReceived(code)
    assert isinstance(evs[1], ConnectionTerminated)
    assert evs[1].code == code and evs[1].remote and reason in evs[1].reason
    assert len(evs) == 2
    assert c.data_to_send() == b""  # Go sends nothing back, and the ping is ignored


def test_receive_eof() -> None:
    c = Session(client=True)
    c.receive_data(SYN2[:5])
    c.receive_eof()
    evs = events(c)
    assert len(evs) == 1 and isinstance(evs[0], ConnectionTerminated)
    assert evs[0].code == 0 and evs[0].remote and "middle of a frame" in evs[0].reason
    c.receive_eof()
    assert events(c) == [] and c.data_to_send() == b""


# ------------------------------------------------------------------------------------
# Non-fatal input


def test_unknown_stream_frames_are_ignored() -> None:
    s = Session(client=False)
    s.receive_data(
        h("00 00 00 00 00 00 00 09 00 00 00 05")  # Data for unknown stream 9
        + b"junk!"
        + h("00 01 00 00 00 00 00 09 00 01 00 00")  # WindowUpdate for it
        + h("00 01 00 08 00 00 00 09 00 00 00 00")  # RST for it
        + h("00 01 00 04 00 00 00 09 00 00 00 00")  # FIN for it
        + h("00 00 00 02 00 00 00 09 00 ff ff ff")  # big Data with ACK: payload skipped...
    )
    assert s.data_to_send() == b"" and events(s) == []
    s.receive_data(bytes(0xFFFFFF - 3))
    s.receive_data(b"abc" + PING_0)  # ...so the ping after it is parsed in step
    assert s.data_to_send() == PONG_0
    assert events(s) == [PingReceived(0)]
    assert not s.terminated


def test_remote_go_away_normal() -> None:
    c = Session(client=True)
    sid = c.open_stream()
    c.data_to_send()
    c.receive_data(GOAWAY_NORMAL)
    assert events(c) == [GoAwayReceived(0)]
    assert c.remote_go_away and not c.terminated
    with pytest.raises(YamuxError, match="not accepting"):
        c.open_stream()
    c.send_data(sid, b"still fine")  # existing streams continue
    assert c.data_to_send() == h("00 00 00 00 00 00 00 01 00 00 00 0a") + b"still fine"


def test_backlog_overflow_answers_rst() -> None:
    s = Session(client=False, accept_backlog=2)
    s.receive_data(SYN1 + SYN3 + SYN5)
    assert events(s) == [StreamOpened(1), StreamOpened(3)]
    assert s.data_to_send() == RST5
    assert not s.is_open(5) and s.backlog == 2
    s.accept_stream(1)
    assert s.data_to_send() == ACK1
    s.receive_data(SYN7)
    assert events(s) == [StreamOpened(7)]
    assert s.data_to_send() == b""


def test_syn_after_local_go_away_is_rst() -> None:
    s = Session(client=False)
    s.go_away()
    assert s.data_to_send() == GOAWAY_NORMAL
    s.receive_data(SYN1 + h("00 00 00 01 00 00 00 03 00 00 00 02") + b"hi" + PING_0)
    assert s.data_to_send() == RST1 + RST3 + PONG_0
    assert events(s) == [PingReceived(0)]
    assert s.streams == 0


def test_max_streams_answers_rst() -> None:
    s = Session(client=False, max_streams=2)
    s.open_stream()
    s.data_to_send()
    s.receive_data(SYN1 + SYN3)
    assert events(s) == [StreamOpened(1)]
    assert s.data_to_send() == RST3
    with pytest.raises(YamuxError, match="too many"):
        s.open_stream()
    s.reset_stream(1)
    assert s.data_to_send() == RST1
    s.receive_data(SYN3)  # ids are not checked for reuse, as Go
    assert events(s) == [StreamOpened(3)]


def test_flags_on_data_frames() -> None:
    s = Session(client=False)
    # SYN + payload, then FIN + payload: data is delivered before the end.
    s.receive_data(h("00 00 00 01 00 00 00 01 00 00 00 03") + b"abc")
    s.receive_data(h("00 00 00 04 00 00 00 01 00 00 00 02") + b"de")
    assert events(s) == [
        StreamOpened(1),
        DataReceived(1, b"abc"),
        DataReceived(1, b"de"),
        StreamEnded(1),
    ]
    # Data after the peer's FIN is dropped, not delivered.
    s.receive_data(h("00 00 00 00 00 00 00 01 00 00 00 01") + b"z")
    assert events(s) == [] and not s.terminated
    s.send_data(1, b"reply")  # half-close: we may still write
    s.close_stream(1)
    assert s.data_to_send() == h("00 00 00 02 00 00 00 01 00 00 00 05") + b"reply" + FIN1
    assert events(s) == [StreamClosed(1)]
    assert not s.is_open(1)
    # ACK on a Data frame for our opened stream; RST on a Data frame drops its payload.
    c = Session(client=True)
    c.open_stream()
    c.data_to_send()
    c.receive_data(h("00 00 00 02 00 00 00 01 00 00 00 01") + b"x")
    assert events(c) == [StreamAccepted(1), DataReceived(1, b"x")]
    c.receive_data(h("00 00 00 08 00 00 00 01 00 00 00 02") + b"yy" + PING_0)
    assert events(c) == [StreamReset(1), PingReceived(0)]
    assert c.data_to_send() == PONG_0


def test_fin_payload_split_reports_end_after_last_byte() -> None:
    s = Session(client=False)
    s.receive_data(SYN1)
    s.accept_stream(1)
    s.close_stream(1)  # our FIN first
    assert s.data_to_send() == ACK1 + FIN1
    events(s)
    raw = h("00 00 00 04 00 00 00 01 00 00 00 04") + b"tail"
    s.receive_data(raw[:14])
    s.close_stream(1)  # a command mid-frame must not close the stream early
    assert events(s) == [DataReceived(1, b"ta")]
    assert s.is_open(1)
    s.receive_data(raw[14:])
    assert events(s) == [DataReceived(1, b"il"), StreamEnded(1), StreamClosed(1)]
    assert not s.is_open(1) and s.data_to_send() == b""


def test_peer_reset_discards_pending_and_fails_writes() -> None:
    c = Session(client=True)
    sid = c.open_stream()
    c.send_data(sid, bytes(INITIAL_WINDOW + 10))
    assert c.pending_bytes(sid) == 10
    c.data_to_send()
    c.receive_data(RST1)
    assert events(c) == [StreamReset(1)]
    assert c.pending_bytes(sid) == 0 and not c.is_open(sid)
    with pytest.raises(YamuxStreamError) as exc:
        c.send_data(sid, b"x")
    assert exc.value.stream_id == sid
    c.receive_data(h("00 01 00 00 00 00 00 01 00 04 00 00"))  # credit for a gone stream
    assert events(c) == [] and c.data_to_send() == b""


def test_local_reset() -> None:
    s = Session(client=False)
    s.receive_data(SYN1)
    s.reset_stream(1)
    assert s.data_to_send() == RST1
    assert s.backlog == 0 and s.streams == 0
    s.reset_stream(1)
    assert s.data_to_send() == b"" and events(s) == [StreamOpened(1)]


def test_send_window_blocks_and_fin_waits_for_pending() -> None:
    c = Session(client=True)
    sid = c.open_stream()
    c.data_to_send()
    c.send_data(sid, b"a" * (INITIAL_WINDOW - 4))
    c.send_data(sid, b"bbbbbbbb")  # 4 fit, 4 wait
    c.send_data(sid, b"cc")
    out = c.data_to_send()
    assert out[:12] == h("00 00 00 00 00 00 00 01 00 03 ff fc")
    assert out[-16:] == h("00 00 00 00 00 00 00 01 00 00 00 04") + b"bbbb"
    assert c.send_window(sid) == 0 and c.pending_bytes(sid) == 6
    c.close_stream(sid)
    assert c.data_to_send() == b""  # FIN waits for the pending bytes
    with pytest.raises(YamuxStreamError):
        c.send_data(sid, b"late")
    c.receive_data(h("00 01 00 00 00 00 00 01 00 00 00 05"))  # 5 bytes of credit
    assert events(c) == [WindowOpened(1)]
    assert c.data_to_send() == h("00 00 00 00 00 00 00 01 00 00 00 05") + b"bbbbc"
    c.receive_data(h("00 01 00 00 00 00 00 01 00 02 00 00"))
    assert events(c) == [WindowOpened(1)]
    assert c.data_to_send() == h("00 00 00 00 00 00 00 01 00 00 00 01") + b"c" + FIN1
    c.receive_data(FIN1)
    assert events(c) == [StreamEnded(1), StreamClosed(1)]
    assert c.streams == 0


def test_larger_window_is_advertised_on_syn_and_ack() -> None:
    c = Session(client=True, window=INITIAL_WINDOW * 2)
    c.open_stream()
    assert c.data_to_send() == h("00 01 00 01 00 00 00 01 00 04 00 00")
    assert c.recv_window(1) == 2 * INITIAL_WINDOW
    s = Session(client=False, window=INITIAL_WINDOW * 2)
    s.receive_data(SYN1)
    s.accept_stream(1)
    assert s.data_to_send() == h("00 01 00 02 00 00 00 01 00 04 00 00")


def test_stream_ids_exhausted() -> None:
    c = Session(client=True)
    c._next_id = 0xFFFFFFFD  # last odd id Go still opens
    assert c.open_stream() == 0xFFFFFFFD
    with pytest.raises(YamuxError, match="exhausted"):
        c.open_stream()


def test_open_skips_ids_the_peer_took() -> None:
    c = Session(client=True)
    c.receive_data(SYN1)  # peer used our parity; Go does not check
    assert events(c) == [StreamOpened(1)]
    assert c.open_stream() == 3


# ------------------------------------------------------------------------------------
# Two sessions wired together


class Peer:
    """A session plus a tiny application: records events, consumes on demand."""

    def __init__(self, sess: Session, *, auto_accept: bool = True) -> None:
        self.s = sess
        self.auto_accept = auto_accept
        self.received: dict[int, bytearray] = defaultdict(bytearray)
        self.unconsumed: dict[int, int] = defaultdict(int)
        self.opened: list[int] = []
        self.accepted: set[int] = set()
        self.ended: set[int] = set()
        self.closed: set[int] = set()
        self.reset: set[int] = set()
        self.pings_acked: list[int] = []
        self.terminated: list[ConnectionTerminated] = []

    def handle(self) -> None:
        for ev in self.s.events_received():
            if isinstance(ev, DataReceived):
                assert ev.data, "empty DataReceived"
                assert ev.stream_id not in self.ended
                self.received[ev.stream_id] += ev.data
                self.unconsumed[ev.stream_id] += len(ev.data)
            elif isinstance(ev, StreamOpened):
                self.opened.append(ev.stream_id)
                if self.auto_accept:
                    self.s.accept_stream(ev.stream_id)
            elif isinstance(ev, StreamAccepted):
                self.accepted.add(ev.stream_id)
            elif isinstance(ev, StreamEnded):
                assert ev.stream_id not in self.ended
                self.ended.add(ev.stream_id)
            elif isinstance(ev, StreamClosed):
                self.closed.add(ev.stream_id)
            elif isinstance(ev, StreamReset):
                self.reset.add(ev.stream_id)
            elif isinstance(ev, PingAcked):
                self.pings_acked.append(ev.opaque)
            elif isinstance(ev, ConnectionTerminated):
                self.terminated.append(ev)

    def consume(self, rnd: random.Random | None = None) -> None:
        for sid, n in list(self.unconsumed.items()):
            if n:
                k = n if rnd is None else rnd.randint(1, n)
                self.s.consumed(sid, k)
                self.unconsumed[sid] -= k


class Monitor:
    """Independent check of one direction's frames: WindowUpdates without SYN/ACK/FIN/RST
    give >= 128 KiB; Data never exceeds 256 KiB + the credit the other side emitted."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.sent: dict[int, int] = defaultdict(int)
        self.credit_out: dict[int, int] = defaultdict(int)  # credit this side granted
        self.small_updates: list[int] = []

    def feed(self, data: bytes, other: Monitor) -> None:
        self.buf += data
        while len(self.buf) >= HEADER_LEN:
            hdr = decode_header(self.buf)
            body = hdr.length if hdr.type == FrameType.DATA else 0
            assert len(self.buf) >= HEADER_LEN + body, "frame split across data_to_send()"
            del self.buf[: HEADER_LEN + body]
            if hdr.type == FrameType.WINDOW_UPDATE:
                self.credit_out[hdr.stream_id] += hdr.length
                if not hdr.flags and hdr.length < INITIAL_WINDOW // 2:
                    self.small_updates.append(hdr.length)
            elif hdr.type == FrameType.DATA:
                self.sent[hdr.stream_id] += hdr.length
                limit = INITIAL_WINDOW + other.credit_out[hdr.stream_id]
                assert self.sent[hdr.stream_id] <= limit, "send window exceeded"
        assert not self.buf, "partial frame in data_to_send()"


def chunker(mode: str, rnd: random.Random) -> Iterator[int]:
    if mode == "byte":
        return itertools.repeat(1)
    if mode == "whole":
        return itertools.repeat(1 << 40)
    if mode == "small":
        return (rnd.randint(1, 20) for _ in itertools.count())
    if mode == "medium":
        return (rnd.randint(1, 3000) for _ in itertools.count())
    return (rnd.randint(1, 70_000) for _ in itertools.count())


class Link:
    def __init__(self, rnd: random.Random, mode: str, **kw: int) -> None:
        self.c = Peer(Session(client=True, **kw))
        self.s = Peer(Session(client=False, **kw))
        self.rnd = rnd
        self.mode = mode
        self.mon = {id(self.c): Monitor(), id(self.s): Monitor()}

    def transfer(self, src: Peer, dst: Peer) -> bool:
        src.handle()  # events produced by commands (e.g. StreamClosed after close_stream)
        data = src.s.data_to_send()
        if not data:
            return False
        self.mon[id(src)].feed(data, self.mon[id(dst)])
        mode = self.mode
        if mode in ("byte", "small") and len(data) > 20_000:
            mode = "medium"  # keep the suite fast: tiny cuts only for small transfers
        sizes = chunker(mode, self.rnd)
        off = 0
        while off < len(data):
            k = next(sizes)
            piece = data[off : off + k]
            kind = self.rnd.random()
            if kind < 0.8:
                dst.s.receive_data(piece)
            else:
                dst.s.receive_data(bytearray(piece) if kind < 0.9 else memoryview(piece))
            off += k
        dst.handle()
        return True

    def pump(self, consume: bool = True, rounds: int = 10_000) -> None:
        for _ in range(rounds):
            moved = self.transfer(self.c, self.s) | self.transfer(self.s, self.c)
            if consume:
                self.c.consume()
                self.s.consume()
                moved |= self.transfer(self.c, self.s) | self.transfer(self.s, self.c)
            if not moved:
                return
        raise AssertionError("link did not settle")

    def check_healthy(self) -> None:
        for p in (self.c, self.s):
            assert p.terminated == [] and not p.s.terminated
            assert self.mon[id(p)].small_updates == []


def run_exchange(rnd: random.Random, mode: str, plan: list[tuple[bool, int]]) -> None:
    """Open one stream per plan entry (by the client if True), send ``size`` random bytes
    from each end in random pieces with lazy consumption, close, and check delivery."""
    link = Link(rnd, mode)
    streams: list[tuple[Peer, Peer, int]] = []
    for by_client, _ in plan:
        opener, acceptor = (link.c, link.s) if by_client else (link.s, link.c)
        streams.append((opener, acceptor, opener.s.open_stream()))
    payloads: dict[tuple[int, int], bytes] = {}
    cursors: dict[tuple[int, int], int] = {}
    for (opener, acceptor, sid), (_, size) in zip(streams, plan, strict=True):
        for p in (opener, acceptor):
            payloads[(id(p), sid)] = rnd.randbytes(size)
            cursors[(id(p), sid)] = 0
    peers = {id(link.c): link.c, id(link.s): link.s}
    active = list(payloads)
    for _ in range(100_000):
        if not active:
            break
        key = rnd.choice(active)
        peer = peers[key[0]]
        sid = key[1]
        if key[0] == id(link.s) and sid % 2 == 1 and sid not in peer.opened:
            pass  # the acceptor has not seen the SYN yet; it cannot write
        elif key[0] == id(link.c) and sid % 2 == 0 and sid not in peer.opened:
            pass
        elif peer.s.pending_bytes(sid) < 100_000:  # the adapter's backpressure
            data = payloads[key]
            cur = cursors[key]
            n = min(len(data) - cur, rnd.choice([1, 100, 5000, 70_000, 300_000]))
            peer.s.send_data(sid, data[cur : cur + n])
            cursors[key] = cur + n
            if cursors[key] == len(data):
                peer.s.close_stream(sid)
                active.remove(key)
        action = rnd.random()
        if action < 0.5:
            link.transfer(link.c, link.s)
            link.transfer(link.s, link.c)
        if action < 0.3:
            link.c.consume(rnd)
            link.s.consume(rnd)
        if not any(pp.s.pending_bytes(k[1]) < 100_000 for k in active for pp in [peers[k[0]]]):
            link.pump()
    assert not active
    link.pump()
    link.check_healthy()
    for (pid, sid), data in payloads.items():
        receiver = link.s if pid == id(link.c) else link.c
        assert bytes(receiver.received[sid]) == data
        assert sid in receiver.ended and sid in receiver.closed
    for p in (link.c, link.s):
        assert p.s.streams == 0 and p.s.backlog == 0


@settings(max_examples=30)
@given(
    seed=st.integers(0, 2**32),
    plan=st.lists(
        st.tuples(st.booleans(), st.one_of(st.integers(0, 3000), st.integers(200_000, 700_000))),
        min_size=1,
        max_size=4,
    ),
    mode=st.sampled_from(["whole", "large", "medium"]),
)
def test_exchange_large_random_chunks(seed: int, plan: list[tuple[bool, int]], mode: str) -> None:
    run_exchange(random.Random(seed), mode, plan)


@settings(max_examples=30)
@given(
    seed=st.integers(0, 2**32),
    plan=st.lists(st.tuples(st.booleans(), st.integers(0, 1500)), min_size=1, max_size=4),
)
def test_exchange_byte_at_a_time(seed: int, plan: list[tuple[bool, int]]) -> None:
    run_exchange(random.Random(seed), "byte", plan)


def test_exchange_window_cycles_use_big_updates_only() -> None:
    """3 MiB one way, consumed lazily in random steps: credit only in >=128 KiB updates."""
    rnd = random.Random(7)
    link = Link(rnd, "large")
    sid = link.c.s.open_stream()
    data = rnd.randbytes(3 << 20)
    link.c.s.send_data(sid, data)
    link.c.s.close_stream(sid)
    for _ in range(1000):
        link.transfer(link.c, link.s)
        link.s.consume(rnd)
        link.transfer(link.s, link.c)
        if bytes(link.s.received[sid]) == data:
            break
    link.pump()
    link.check_healthy()
    assert bytes(link.s.received[sid]) == data
    assert sid in link.s.ended
    updates = link.mon[id(link.s)].credit_out[sid]
    assert updates >= len(data) - INITIAL_WINDOW


def merged(evs: list[Event]) -> list[Event]:
    """Coalesce adjacent DataReceived of one stream (chunking may split them)."""
    out: list[Event] = []
    for ev in evs:
        if isinstance(ev, DataReceived) and out:
            last = out[-1]
            if isinstance(last, DataReceived) and last.stream_id == ev.stream_id:
                out[-1] = DataReceived(ev.stream_id, last.data + ev.data)
                continue
        out.append(ev)
    return out


@settings(max_examples=60)
@given(seed=st.integers(0, 2**32), cuts=st.lists(st.integers(1, 40), min_size=1, max_size=50))
def test_chunking_does_not_change_events(seed: int, cuts: list[int]) -> None:
    """One recorded byte stream, fed whole, byte-at-a-time and in random cuts, gives the
    same events and the same reply bytes."""
    rnd = random.Random(seed)
    c = Session(client=True)
    for _ in range(rnd.randint(1, 4)):
        sid = c.open_stream()
        for _ in range(rnd.randint(0, 3)):
            c.send_data(sid, rnd.randbytes(rnd.choice([0, 1, 13, 300])))
            if rnd.random() < 0.3:
                c.ping()
        if rnd.random() < 0.5:
            c.close_stream(sid)
        elif rnd.random() < 0.3:
            c.reset_stream(sid)
    c.ping(0xDEADBEEF)
    raw = c.data_to_send()

    def run(pieces: Iterator[int]) -> tuple[list[Event], bytes]:
        s = Session(client=False)
        off = 0
        while off < len(raw):
            k = next(pieces)
            s.receive_data(raw[off : off + k])
            off += k
        return merged(s.events_received()), s.data_to_send()

    whole = run(itertools.repeat(len(raw)))
    assert whole[0][-1] == PingReceived(0xDEADBEEF)
    assert run(itertools.repeat(1)) == whole
    assert run(itertools.cycle(cuts)) == whole


# ------------------------------------------------------------------------------------
# Stateful: random commands on both ends


class YamuxPair(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.rnd = random.Random(0)
        self.link = Link(self.rnd, "small")
        self.link.c.auto_accept = False
        self.link.s.auto_accept = False
        self.sent: dict[tuple[int, int], bytearray] = defaultdict(bytearray)
        self.resets: set[int] = set()
        self.pings: dict[int, list[int]] = defaultdict(list)

    def peer(self, client: bool) -> Peer:
        return self.link.c if client else self.link.s

    def other(self, client: bool) -> Peer:
        return self.link.s if client else self.link.c

    def writable(self, p: Peer) -> list[int]:
        ids = []
        for sid in p.s.stream_ids():
            mine = (sid % 2 == 1) == p.s.client
            if mine or sid in p.opened:
                ids.append(sid)
        return sorted(ids)

    @rule(client=st.booleans())
    def open(self, client: bool) -> None:
        p = self.peer(client)
        if p.s.streams < 8:
            p.s.open_stream()

    @rule(
        client=st.booleans(),
        data=st.data(),
        size=st.sampled_from([0, 1, 7, 1000, 70_000, 200_000]),
    )
    def send(self, client: bool, data: st.DataObject, size: int) -> None:
        p = self.peer(client)
        ids = self.writable(p)
        if not ids:
            return
        sid = data.draw(st.sampled_from(ids))
        if p.s.pending_bytes(sid) > 300_000:
            return
        payload = self.rnd.randbytes(size)
        try:
            p.s.send_data(sid, payload)
        except YamuxStreamError:
            return
        self.sent[(id(p), sid)] += payload

    @rule(client=st.booleans())
    def accept_all(self, client: bool) -> None:
        p = self.peer(client)
        for sid in p.opened:
            p.s.accept_stream(sid)

    @rule(client=st.booleans(), partial=st.booleans())
    def consume(self, client: bool, partial: bool) -> None:
        self.peer(client).consume(self.rnd if partial else None)

    @rule(client=st.booleans(), data=st.data())
    def close(self, client: bool, data: st.DataObject) -> None:
        p = self.peer(client)
        ids = self.writable(p)
        if ids:
            p.s.close_stream(data.draw(st.sampled_from(ids)))

    @rule(client=st.booleans(), data=st.data())
    def reset(self, client: bool, data: st.DataObject) -> None:
        p = self.peer(client)
        ids = self.writable(p)
        if ids:
            sid = data.draw(st.sampled_from(ids))
            p.s.reset_stream(sid)
            self.resets.add(sid)

    @rule(client=st.booleans())
    def ping(self, client: bool) -> None:
        self.pings[int(client)].append(self.peer(client).s.ping())

    @rule(
        direction=st.booleans(),
        mode=st.sampled_from(["byte", "small", "medium", "large", "whole"]),
    )
    def transfer(self, direction: bool, mode: str) -> None:
        self.link.mode = mode
        a, b = (self.link.c, self.link.s) if direction else (self.link.s, self.link.c)
        self.link.transfer(a, b)

    @invariant()
    def healthy(self) -> None:
        self.link.check_healthy()
        for p in (self.link.c, self.link.s):
            q = self.link.s if p is self.link.c else self.link.c
            for sid, got in p.received.items():
                sent = self.sent[(id(q), sid)]
                assert sent[: len(got)] == got, "delivered bytes are not a prefix of sent"
            for sid in p.s.stream_ids():
                assert 0 <= p.s.recv_window(sid) <= INITIAL_WINDOW
                assert p.s.send_window(sid) >= 0 and p.s.pending_bytes(sid) >= 0

    def teardown(self) -> None:
        link = self.link
        for p in (link.c, link.s):
            for sid in p.opened:
                p.s.accept_stream(sid)
        link.pump()
        link.check_healthy()
        for p in (link.c, link.s):
            q = link.s if p is link.c else link.c
            for (pid, sid), data in self.sent.items():
                if pid == id(q) and sid not in self.resets:
                    assert bytes(p.received[sid]) == bytes(data)
            assert sorted(p.pings_acked) == sorted(self.pings[int(p is link.c)])


TestYamuxPair = YamuxPair.TestCase
TestYamuxPair.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
