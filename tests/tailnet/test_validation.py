"""Node and request caps (:func:`tailnet.core.validate_request` with :class:`tailnet.limits.Limits`).

What real Coder clients send must always pass (a node as ``tailnet/node.go``
builds it, an agent's ack of a full 1024-update response); anything beyond a
cap is refused with a message naming the cap, checked cheaply (counts before
per-entry work).
"""

from __future__ import annotations

import dataclasses
import uuid

import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import given
from hypothesis import strategies as st

from tailnet.auth import CODER_SERVICE_PREFIX, TAILSCALE_SERVICE_PREFIX, addr_from_uuid
from tailnet.core import MAX_UPDATES_PER_RESPONSE, RequestError, validate_node, validate_request
from tailnet.limits import DEFAULT_LIMITS, Limits
from tailnet.v2 import tailnet_pb2 as pb

Req = pb.CoordinateRequest
L = DEFAULT_LIMITS
PEER = uuid.UUID("5d4f3a9e-6f0b-4c8e-9a51-0d2b7e3c1f44")


def coder_node(regions: int = 40, endpoints: int = 24) -> pb.Node:
    """A node shaped like Coder's ``nodeUpdater.nodeLocked`` output (JSON → proto)."""
    addrs = [
        f"{addr_from_uuid(TAILSCALE_SERVICE_PREFIX, PEER)}/128",
        f"{addr_from_uuid(CODER_SERVICE_PREFIX, PEER)}/128",
    ]
    n = pb.Node(
        id=0x1234_5678_9ABC,
        as_of=Timestamp(seconds=1_700_000_000, nanos=123_456_789),
        key=b"np" + bytes(range(32)),
        disco="discokey:" + bytes(range(100, 132)).hex(),
        preferred_derp=999,
        addresses=addrs,
        allowed_ips=addrs,  # Coder: AllowedIPs = Addresses
        endpoints=[f"192.168.{i // 250}.{i % 250}:41641" for i in range(endpoints // 2)]
        + [f"[2001:db8::{i:x}]:41641" for i in range(endpoints - endpoints // 2)],
    )
    for r in range(regions):
        n.derp_latency[f"{900 + r}-v4"] = 0.0123 + r / 1000
        n.derp_latency[f"{900 + r}-v6"] = 0.0234 + r / 1000
    n.derp_forced_websocket[999] = "DERP is behind a proxy that strips Upgrade headers"
    return n


def upd(node: pb.Node) -> Req:
    return Req(update_self=Req.UpdateSelf(node=node))


def test_what_coder_clients_send_passes() -> None:
    validate_request(upd(coder_node()))
    validate_request(upd(coder_node(regions=200, endpoints=120)))  # a big deployment, busy host
    validate_request(upd(pb.Node()))  # an empty Node is still a Node
    # An agent acknowledging a full response: one entry per NODE update.
    ack = Req(ready_for_handshake=[Req.ReadyForHandshake(id=uuid.uuid4().bytes)
                                   for _ in range(MAX_UPDATES_PER_RESPONSE)])
    validate_request(ack)
    assert coder_node().ByteSize() < L.max_node_bytes // 8


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("key", b"np" + b"\x01" * 31, "node key must be 34 bytes"),
        ("key", b"np" + b"\x01" * 33, "got 35 bytes"),
        ("key", b"nk" + b"\x01" * 32, "node key must be 34 bytes"),
        ("disco", "discokey:" + "a" * 63, "node disco must be"),
        ("disco", "discokey:" + "g" * 64, "node disco must be"),
        ("disco", "disco:" + "a" * 67, "node disco must be"),
        ("disco", "discokey:" + "a" * 10_000, "got 1000 characters"),  # length is capped in the text
    ],
)
def test_key_lengths_are_exact(field: str, value: object, match: str) -> None:
    n = coder_node()
    setattr(n, field, value)
    with pytest.raises(RequestError, match=match):
        validate_request(upd(n))


def test_disco_key_accepts_upper_case_hex() -> None:
    n = coder_node()
    n.disco = "discokey:" + "AB" * 32  # Go's hex decoder accepts either case
    validate_node(n)


_COUNTED = {
    "addresses": "max_addresses",
    "allowed_ips": "max_allowed_ips",
    "endpoints": "max_endpoints",
    "derp_latency": "max_derp_latency",
    "derp_forced_websocket": "max_derp_forced_websocket",
}
#: small caps so hypothesis explores both sides of every boundary cheaply
SMALL = Limits(max_addresses=3, max_allowed_ips=4, max_endpoints=5, max_derp_latency=6,
               max_derp_forced_websocket=2, max_node_bytes=600)


def _fill(n: pb.Node, field: str, count: int) -> None:
    if field == "derp_latency":
        for i in range(count):
            n.derp_latency[f"{i}-v4"] = 0.5
    elif field == "derp_forced_websocket":
        for i in range(count):
            n.derp_forced_websocket[i] = "x"
    else:
        getattr(n, field).extend(f"10.0.0.{i}/32" for i in range(count))


@given(
    counts=st.fixed_dictionaries({f: st.integers(0, 8) for f in _COUNTED}),
    pad=st.integers(0, 700),
)
def test_counts_and_size_caps(counts: dict[str, int], pad: int) -> None:
    """Refused iff a count or the size is over its cap; the message names the first one."""
    n = pb.Node(id=1, preferred_derp=999)
    for field, count in counts.items():
        _fill(n, field, count)
    if pad:
        n.MergeFromString(_unknown_field(b"p" * pad))  # size without changing any count
    over = [name for field, name in _COUNTED.items() if counts[field] > getattr(SMALL, name)]
    if over:
        with pytest.raises(RequestError, match=rf"\({over[0]}\)$"):
            validate_request(upd(n), SMALL)
    elif n.ByteSize() > SMALL.max_node_bytes:
        with pytest.raises(RequestError, match=r"bytes; at most 600 are allowed \(max_node_bytes\)"):
            validate_request(upd(n), SMALL)
    else:
        validate_request(upd(n), SMALL)


def _unknown_field(payload: bytes) -> bytes:
    """Field 99, wire type 2 (length-delimited): not in our schema."""
    return bytes([0x9A, 0x06]) + _varint(len(payload)) + payload  # tag = 99 << 3 | 2


def test_unknown_fields_count_towards_the_node_size() -> None:
    n = pb.Node.FromString(_unknown_field(b"z" * 70_000))
    assert n.ByteSize() > L.max_node_bytes
    with pytest.raises(RequestError, match="max_node_bytes"):
        validate_request(upd(n))


def _varint(v: int) -> bytes:
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        out.append(b | (0x80 if v else 0))
        if not v:
            return bytes(out)


def test_ready_for_handshake_count_is_checked_before_entries() -> None:
    """200,000 entries (a 4 MB request) are refused on their count alone."""
    entries = [Req.ReadyForHandshake(id=b"bad")] + [
        Req.ReadyForHandshake(id=b"\x01" * 16) for _ in range(199_999)
    ]
    req = Req(ready_for_handshake=entries)
    with pytest.raises(RequestError) as exc:
        validate_request(req)
    assert str(exc.value) == (
        "request has 200000 ready_for_handshake entries; at most 1024 are allowed "
        "(max_ready_for_handshake)"
    )
    with pytest.raises(RequestError, match=r"^ready_for_handshake\[0\]\.id must be a 16-byte"):
        validate_request(Req(ready_for_handshake=entries[:10]))


@given(st.lists(st.binary(min_size=0, max_size=20), max_size=12), st.integers(1, 12))
def test_ready_for_handshake_entries(ids: list[bytes], cap: int) -> None:
    req = Req(ready_for_handshake=[Req.ReadyForHandshake(id=i) for i in ids])
    limits = Limits(max_ready_for_handshake=cap)
    bad = [i for i, x in enumerate(ids) if len(x) != 16]
    if len(ids) > cap:
        with pytest.raises(RequestError, match="max_ready_for_handshake"):
            validate_request(req, limits)
    elif bad:
        with pytest.raises(RequestError, match=rf"^ready_for_handshake\[{bad[0]}\]\.id"):
            validate_request(req, limits)
    else:
        validate_request(req, limits)


def test_limits_must_be_positive_integers() -> None:
    for name in ("max_node_bytes", "max_peers_per_principal", "peer_buffer_bytes"):
        for bad in (0, -1, 1.5, True):
            with pytest.raises(ValueError, match=name):
                Limits(**{name: bad})  # type: ignore[arg-type]
    assert dataclasses.replace(L, max_endpoints=1).max_endpoints == 1
