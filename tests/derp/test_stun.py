"""STUN codec (golden bytes, properties) and the UDP responder/client on 127.0.0.1."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import struct
import zlib
from collections.abc import AsyncIterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from derp.stun import (
    ATTR_MAPPED_ADDRESS,
    ATTR_XOR_MAPPED_ADDRESS_ALT,
    MAGIC_COOKIE,
    StunError,
    build_binding_request,
    build_binding_response,
    fingerprint,
    is_stun,
    parse_binding_request,
    parse_binding_response,
)
from derp.stunserver import StunServer, stun_request

WAIT = 20.0

TXID = bytes.fromhex("b7e7a701bc34d686fa87dfae")

# RFC 5769 §2.1 sample request (SOFTWARE "STUN test client", PRIORITY, ICE-CONTROLLED,
# USERNAME, MESSAGE-INTEGRITY, FINGERPRINT): a generic, non-Tailscale binding request.
RFC5769_REQUEST = bytes.fromhex(
    "000100582112a442b7e7a701bc34d686fa87dfae"
    "802200105354554e20746573742063 6c69656e74".replace(" ", "")
    + "002400046e0001ff"
    "80290008932ff9b151263b36"
    "000600096576746a3a68367659202020"
    "000800149aeaa70cbfd8cb56781ef2b5b2d3f249c1b571a2"
    "80280004e57a3bcf"
)

# RFC 5769 §2.2 sample IPv4 response: 192.0.2.1:32853.
RFC5769_RESPONSE_V4 = bytes.fromhex(
    "0101003c2112a442b7e7a701bc34d686fa87dfae"
    "8022000b7465737420766563746f7220"
    "0020000800 01a147e112a643".replace(" ", "")
    + "000800142b91f599fd9e90c38c7489f92af9ba53f06be7d7"
    "80280004c07d4c96"
)


# ----------------------------------------------------------------- golden bytes


def test_tailscale_request_bytes() -> None:
    req = build_binding_request(TXID)
    assert len(req) == 40
    assert req[:20] == b"\x00\x01\x00\x14" + MAGIC_COOKIE + TXID
    assert req[20:32] == b"\x80\x22\x00\x08tailnode"
    assert req[32:36] == b"\x80\x28\x00\x04"
    crc = (zlib.crc32(req[:32]) ^ 0x5354554E) & 0xFFFFFFFF
    assert req[36:] == struct.pack(">I", crc)
    parsed = parse_binding_request(req)
    assert parsed.txid == TXID and parsed.tailscale


def test_rfc5769_request_is_answered_as_plain_stun() -> None:
    parsed = parse_binding_request(RFC5769_REQUEST)
    assert parsed.txid == TXID
    assert not parsed.tailscale  # SOFTWARE is not "tailnode"


def test_fingerprint_matches_rfc5769_vectors() -> None:
    assert fingerprint(RFC5769_REQUEST[:-8]) == 0xE57A3BCF
    assert fingerprint(RFC5769_RESPONSE_V4[:-8]) == 0xC07D4C96


def test_rfc5769_response_parses() -> None:
    resp = parse_binding_response(RFC5769_RESPONSE_V4)
    assert (resp.txid, resp.ip, resp.port) == (TXID, "192.0.2.1", 32853)


def test_response_v4_bytes_match_rfc5769_attribute() -> None:
    out = build_binding_response(TXID, "192.0.2.1", 32853)
    assert out == (
        b"\x01\x01\x00\x0c" + MAGIC_COOKIE + TXID + bytes.fromhex("002000080001a147e112a643")
    )


def test_response_unmaps_v4_in_v6() -> None:
    out = build_binding_response(TXID, "::ffff:192.0.2.1", 32853)
    assert out == build_binding_response(TXID, "192.0.2.1", 32853)
    assert out[25] == 0x01  # family IPv4


def test_response_v6_bytes() -> None:
    # RFC 5769 §2.3 XOR-MAPPED-ADDRESS for 2001:db8:1234:5678:11:2233:4455:6677 port 32853.
    out = build_binding_response(TXID, "2001:db8:1234:5678:11:2233:4455:6677", 32853)
    assert out[:4] == b"\x01\x01\x00\x18"
    assert out[20:] == bytes.fromhex(
        "002000140002a147" "0113a9faa5d3f179bc25f4b5bed2b9d9"
    )


def test_response_parser_accepts_misnumbered_and_mapped_address() -> None:
    good = build_binding_response(TXID, "10.1.2.3", 4242)
    alt = good[:20] + struct.pack(">H", ATTR_XOR_MAPPED_ADDRESS_ALT) + good[22:]
    assert parse_binding_response(alt).ip == "10.1.2.3"
    plain = struct.pack(">HH", ATTR_MAPPED_ADDRESS, 8) + b"\x00\x01" + struct.pack(">H", 4242)
    plain += bytes([10, 1, 2, 3])
    msg = struct.pack(">HH", 0x0101, len(plain)) + MAGIC_COOKIE + TXID + plain
    r = parse_binding_response(msg)
    assert (r.ip, r.port) == ("10.1.2.3", 4242)
    # Bytes past the header's length are ignored.
    assert parse_binding_response(good + b"junk").port == 4242


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00\x01",
        b"GET / HTTP/1.1\r\n\r\n....",
        # bad cookie
        b"\x00\x01\x00\x00" + b"\x00\x00\x00\x00" + TXID,
        # top bits set
        b"\xc0\x01\x00\x00" + MAGIC_COOKIE + TXID,
        # not a request (a response)
        build_binding_response(TXID, "1.2.3.4", 1),
        # length does not match
        b"\x00\x01\x00\x08" + MAGIC_COOKIE + TXID,
        # attribute overruns
        b"\x00\x01\x00\x04" + MAGIC_COOKIE + TXID + b"\x80\x22\x00\x08",
    ],
)
def test_malformed_requests_rejected(data: bytes) -> None:
    with pytest.raises(StunError):
        parse_binding_request(data)


def test_bad_fingerprint_rejected() -> None:
    req = bytearray(build_binding_request(TXID))
    req[-1] ^= 1
    with pytest.raises(StunError, match="FINGERPRINT"):
        parse_binding_request(bytes(req))


def test_fingerprint_not_last_rejected() -> None:
    req = build_binding_request(TXID)
    body = req[32:40] + req[20:32]  # FINGERPRINT first, then SOFTWARE
    with pytest.raises(StunError):
        parse_binding_request(req[:20] + body)


# ----------------------------------------------------------------- properties


@given(st.binary(min_size=12, max_size=12))
def test_request_roundtrip(txid: bytes) -> None:
    req = build_binding_request(txid)
    assert is_stun(req)
    p = parse_binding_request(req)
    assert p.txid == txid and p.tailscale


ips = st.one_of(
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(str),
)


@given(st.binary(min_size=12, max_size=12), ips, st.integers(0, 65535))
def test_response_roundtrip(txid: bytes, ip: str, port: int) -> None:
    r = parse_binding_response(build_binding_response(txid, ip, port))
    want = ipaddress.ip_address(ip)
    if isinstance(want, ipaddress.IPv6Address) and want.ipv4_mapped is not None:
        want = want.ipv4_mapped
    assert (r.txid, ipaddress.ip_address(r.ip), r.port) == (txid, want, port)


@given(st.binary(max_size=200))
def test_parsers_are_total(data: bytes) -> None:
    for parse in (parse_binding_request, parse_binding_response):
        try:
            parse(data)
        except StunError:
            pass


@given(st.binary(min_size=12, max_size=12), st.integers(0, 39), st.integers(1, 255))
def test_any_corruption_of_tailscale_request_is_rejected_or_plain(
    txid: bytes, pos: int, flip: int
) -> None:
    req = bytearray(build_binding_request(txid))
    req[pos] ^= flip
    try:
        p = parse_binding_request(bytes(req))
    except StunError:
        return
    # The CRC covers bytes 0..31, so a survivor lost its FINGERPRINT attribute
    # (its type was changed, bytes 32-33, or the SOFTWARE length, byte 23, now
    # swallows it) and is at most a plain RFC 5389 request.
    assert pos in (23, 32, 33) and not p.tailscale


# ----------------------------------------------------------------- server + client


@pytest.fixture
async def stun() -> AsyncIterator[StunServer]:
    srv = StunServer()
    await srv.start("127.0.0.1", 0)
    yield srv
    await srv.stop()


async def test_stun_request_gets_own_address(stun: StunServer) -> None:
    ip, port, rtt = await asyncio.wait_for(stun_request("127.0.0.1", stun.port, 10.0), WAIT)
    assert ip == "127.0.0.1" and 0 < port < 65536 and rtt >= 0
    assert stun.stats.requests["success"] >= 1
    assert stun.stats.addr_family["ipv4"] >= 1


class _Udp(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.q: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: object) -> None:
        self.q.put_nowait(data)


async def test_garbage_is_counted_and_server_keeps_answering(stun: StunServer) -> None:
    loop = asyncio.get_running_loop()
    t, p = await loop.create_datagram_endpoint(_Udp, remote_addr=("127.0.0.1", stun.port))
    try:
        local_port = t.get_extra_info("sockname")[1]
        for junk in (b"\x00", b"x" * 100, b"\x00\x01\x00\x00" + b"\x00" * 16):
            t.sendto(junk)
        # A plain RFC 5389 request (no attributes) is answered.
        t.sendto(b"\x00\x01\x00\x00" + MAGIC_COOKIE + TXID)
        data = await asyncio.wait_for(p.q.get(), WAIT)
        r = parse_binding_response(data)
        assert (r.txid, r.ip, r.port) == (TXID, "127.0.0.1", local_port)
        # Datagrams are handled in order, so the junk was counted before the answer.
        assert stun.stats.requests["not_stun"] == 3
        assert stun.stats.requests["success"] == 1
        assert p.q.empty()
    finally:
        t.close()


async def test_stun_request_times_out_without_server() -> None:
    # A bound UDP socket that never answers: the client gives up with TimeoutError.
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    try:
        with pytest.raises(TimeoutError):
            await stun_request("127.0.0.1", sock.getsockname()[1], timeout=0.3)
    finally:
        sock.close()


async def test_stun_ipv6_loopback() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    srv = StunServer()
    try:
        await srv.start("::1", 0)
    except OSError:
        pytest.skip("no IPv6 loopback")
    try:
        ip, _port, _rtt = await asyncio.wait_for(stun_request("::1", srv.port, 10.0), WAIT)
        assert ip == "::1"
        assert srv.stats.addr_family["ipv6"] == 1
    finally:
        await srv.stop()


@pytest.mark.parametrize("host", ["", "localhost"])
async def test_stun_server_all_interfaces_and_host_name(host: str) -> None:
    """``""`` binds dual-stack (IPv4 clients answered as IPv4, family 0x01); a host
    name is resolved (without blocking the loop) and bound."""
    srv = StunServer()
    await srv.start(host, 0)
    try:
        target = "127.0.0.1"
        if host == "localhost":
            target = str(srv._transport.get_extra_info("sockname")[0]) if srv._transport else ""
        ip, _port, _rtt = await asyncio.wait_for(stun_request(target, srv.port, 10.0), WAIT)
        assert ip == target
        assert srv.stats.requests["success"] == 1
    finally:
        await srv.stop()
