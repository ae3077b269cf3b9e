"""Pure STUN codec for DERP nodes: binding requests and responses (spec §5). No I/O.

Only the Binding method is supported, as in Tailscale (``net/stun``). Every
message starts with the RFC 5389 header::

    offset 0  type(2)   0x0001 request / 0x0101 success response; top two bits zero
    offset 2  length(2) bytes of attributes after the header (multiple of 4)
    offset 4  cookie(4) 21 12 A4 42
    offset 8  txid(12)  chosen by the client, echoed by the server
    offset 20 attributes: type(2) ‖ length(2) ‖ value, padded to 4 bytes

Requests (:func:`parse_binding_request`). Two kinds are answered:

* Tailscale's 40-byte request: SOFTWARE (0x8022) = ``tailnode`` followed by
  FINGERPRINT (0x8028) = CRC-32 of everything before it XOR ``0x5354554E``.
  This is all Go's derper answers.
* Plain RFC 5389 binding requests from generic STUN clients (no SOFTWARE, or a
  different one). Decision: we answer these too, because a generic client is
  harmless (the reply reveals only the sender's own address, which is exactly
  what STUN is for) and it makes ordinary tools (``stunclient``, browsers)
  usable against our relay. The request must still be well formed: a correct
  header, attributes that fit exactly, and, if a FINGERPRINT is present, it
  must be the last attribute and verify. :attr:`BindingRequest.tailscale`
  tells the two kinds apart.

Anything else raises :class:`StunError` (``not_stun`` in server counters).

Responses (:func:`build_binding_response`) carry exactly one attribute,
XOR-MAPPED-ADDRESS (0x0020): ``0x00 ‖ family ‖ port ^ 0x2112 ‖ addr ^ (cookie ‖ txid)``
with family 0x01 for IPv4 (a v4-mapped IPv6 source is unmapped first) and
0x02 for IPv6. No SOFTWARE, no FINGERPRINT, like derper.

:func:`parse_binding_response` (client side) accepts XOR-MAPPED-ADDRESS as
0x0020 or the misnumbered 0x8020, falls back to MAPPED-ADDRESS (0x0001),
and ignores bytes past the header's length. It never raises anything but
:class:`StunError` for any input.
"""

from __future__ import annotations

import ipaddress
import os
import struct
import zlib
from dataclasses import dataclass
from typing import Final

__all__ = [
    "MAGIC_COOKIE",
    "BINDING_REQUEST",
    "BINDING_SUCCESS",
    "ATTR_MAPPED_ADDRESS",
    "ATTR_XOR_MAPPED_ADDRESS",
    "ATTR_XOR_MAPPED_ADDRESS_ALT",
    "ATTR_SOFTWARE",
    "ATTR_FINGERPRINT",
    "FINGERPRINT_XOR",
    "SOFTWARE",
    "HEADER_LEN",
    "TXID_LEN",
    "StunError",
    "BindingRequest",
    "BindingResponse",
    "new_txid",
    "is_stun",
    "build_binding_request",
    "parse_binding_request",
    "build_binding_response",
    "parse_binding_response",
    "fingerprint",
]

MAGIC_COOKIE: Final = b"\x21\x12\xa4\x42"
BINDING_REQUEST: Final = 0x0001
BINDING_SUCCESS: Final = 0x0101
ATTR_MAPPED_ADDRESS: Final = 0x0001
ATTR_XOR_MAPPED_ADDRESS: Final = 0x0020
ATTR_XOR_MAPPED_ADDRESS_ALT: Final = 0x8020
ATTR_SOFTWARE: Final = 0x8022
ATTR_FINGERPRINT: Final = 0x8028
FINGERPRINT_XOR: Final = 0x5354554E
SOFTWARE: Final = b"tailnode"
HEADER_LEN: Final = 20
TXID_LEN: Final = 12

_HDR = struct.Struct(">HH4s12s")
_ATTR = struct.Struct(">HH")
_FAMILY_V4 = 0x01
_FAMILY_V6 = 0x02


class StunError(ValueError):
    """The datagram is not a STUN message we handle (the text says why)."""


@dataclass(frozen=True, slots=True)
class BindingRequest:
    """A parsed binding request; ``tailscale`` if it had SOFTWARE=tailnode + FINGERPRINT."""

    txid: bytes
    tailscale: bool


@dataclass(frozen=True, slots=True)
class BindingResponse:
    """A parsed binding success response: the address the server saw."""

    txid: bytes
    ip: str
    port: int


def new_txid() -> bytes:
    """A random 12-byte transaction ID."""
    return os.urandom(TXID_LEN)


def fingerprint(data: bytes | memoryview) -> int:
    """The FINGERPRINT value for the message bytes preceding the attribute."""
    return (zlib.crc32(data) ^ FINGERPRINT_XOR) & 0xFFFFFFFF


def is_stun(data: bytes) -> bool:
    """Cheap test: top two bits zero, the cookie, and at least a header."""
    return len(data) >= HEADER_LEN and data[0] & 0xC0 == 0 and data[4:8] == MAGIC_COOKIE


def build_binding_request(txid: bytes | None = None) -> bytes:
    """Tailscale's 40-byte binding request (SOFTWARE ``tailnode`` + FINGERPRINT)."""
    if txid is None:
        txid = new_txid()
    if len(txid) != TXID_LEN:
        raise ValueError(f"txid must be {TXID_LEN} bytes")
    head = _HDR.pack(BINDING_REQUEST, 20, MAGIC_COOKIE, txid)
    body = _ATTR.pack(ATTR_SOFTWARE, len(SOFTWARE)) + SOFTWARE
    msg = head + body + _ATTR.pack(ATTR_FINGERPRINT, 4)
    return msg + struct.pack(">I", fingerprint(head + body))


def _attributes(data: bytes, length: int) -> list[tuple[int, int, int]]:
    """``(type, value offset, value length)`` of each attribute in ``data[20:20+length]``."""
    out: list[tuple[int, int, int]] = []
    pos = HEADER_LEN
    end = HEADER_LEN + length
    while pos < end:
        if end - pos < 4:
            raise StunError("truncated attribute header")
        atype, alen = _ATTR.unpack_from(data, pos)
        vpos = pos + 4
        if vpos + alen > end:
            raise StunError(f"attribute 0x{atype:04x} of {alen} bytes overruns the message")
        out.append((atype, vpos, alen))
        pos = vpos + ((alen + 3) & ~3)
    if pos != end:
        raise StunError("attribute padding overruns the message")
    return out


def _header(data: bytes) -> tuple[int, int, bytes]:
    if len(data) < HEADER_LEN:
        raise StunError(f"{len(data)} bytes is shorter than a STUN header")
    if data[0] & 0xC0:
        raise StunError("top two bits of the message type are not zero")
    mtype, length, cookie, txid = _HDR.unpack_from(data, 0)
    if cookie != MAGIC_COOKIE:
        raise StunError("no STUN magic cookie")
    if length % 4:
        raise StunError(f"message length {length} is not a multiple of 4")
    return mtype, length, txid


def parse_binding_request(data: bytes) -> BindingRequest:
    """Validate a binding request (see the module rules) or raise :class:`StunError`."""
    mtype, length, txid = _header(data)
    if mtype != BINDING_REQUEST:
        raise StunError(f"message type 0x{mtype:04x} is not a binding request")
    if HEADER_LEN + length != len(data):
        raise StunError(f"header length {length} does not match {len(data) - HEADER_LEN} bytes")
    attrs = _attributes(data, length)
    software = False
    has_fp = False
    for i, (atype, vpos, alen) in enumerate(attrs):
        if atype == ATTR_SOFTWARE and data[vpos : vpos + alen] == SOFTWARE:
            software = True
        elif atype == ATTR_FINGERPRINT:
            if i != len(attrs) - 1:
                raise StunError("FINGERPRINT is not the last attribute")
            if alen != 4:
                raise StunError(f"FINGERPRINT of {alen} bytes")
            (want,) = struct.unpack_from(">I", data, vpos)
            if fingerprint(memoryview(data)[: vpos - 4]) != want:
                raise StunError("FINGERPRINT does not match")
            has_fp = True
    return BindingRequest(bytes(txid), software and has_fp)


def _unmap(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> (
    ipaddress.IPv4Address | ipaddress.IPv6Address
):
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def build_binding_response(txid: bytes, ip: str, port: int) -> bytes:
    """Binding success with one XOR-MAPPED-ADDRESS for ``ip``:``port``.

    ``ip`` may be IPv4, IPv6 or v4-mapped IPv6 (sent as IPv4, family 0x01);
    an IPv6 scope suffix (``%eth0``) is ignored.
    """
    if len(txid) != TXID_LEN:
        raise ValueError(f"txid must be {TXID_LEN} bytes")
    if not 0 <= port <= 0xFFFF:
        raise ValueError(f"port {port} out of range")
    addr = _unmap(ipaddress.ip_address(ip.split("%", 1)[0]))
    raw = addr.packed
    family = _FAMILY_V4 if len(raw) == 4 else _FAMILY_V6
    mask = (MAGIC_COOKIE + txid)[: len(raw)]
    xaddr = bytes(a ^ b for a, b in zip(raw, mask))
    value = bytes((0, family)) + struct.pack(">H", port ^ 0x2112) + xaddr
    attr = _ATTR.pack(ATTR_XOR_MAPPED_ADDRESS, len(value)) + value
    return _HDR.pack(BINDING_SUCCESS, len(attr), MAGIC_COOKIE, txid) + attr


def _decode_address(value: bytes, xor: bytes | None) -> tuple[str, int] | None:
    if len(value) < 4:
        return None
    family = value[1]
    (port,) = struct.unpack_from(">H", value, 2)
    raw = value[4:]
    if family == _FAMILY_V4 and len(raw) == 4:
        pass
    elif family == _FAMILY_V6 and len(raw) == 16:
        pass
    else:
        return None
    if xor is not None:
        port ^= 0x2112
        raw = bytes(a ^ b for a, b in zip(raw, xor))
    addr = _unmap(ipaddress.ip_address(raw))
    return str(addr), port


def parse_binding_response(data: bytes) -> BindingResponse:
    """Parse a binding success response (client side) or raise :class:`StunError`."""
    mtype, length, txid = _header(data)
    if mtype != BINDING_SUCCESS:
        raise StunError(f"message type 0x{mtype:04x} is not a binding success response")
    if HEADER_LEN + length > len(data):
        raise StunError("message shorter than its header length")
    xor = MAGIC_COOKIE + txid
    xmapped: tuple[str, int] | None = None
    mapped: tuple[str, int] | None = None
    for atype, vpos, alen in _attributes(data, length):
        value = data[vpos : vpos + alen]
        if atype in (ATTR_XOR_MAPPED_ADDRESS, ATTR_XOR_MAPPED_ADDRESS_ALT):
            if xmapped is None:
                xmapped = _decode_address(value, xor)
        elif atype == ATTR_MAPPED_ADDRESS and mapped is None:
            mapped = _decode_address(value, None)
    found = xmapped or mapped
    if found is None:
        raise StunError("response has no usable (XOR-)MAPPED-ADDRESS")
    return BindingResponse(bytes(txid), found[0], found[1])
