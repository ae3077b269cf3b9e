"""Wire-format golden tests and generated-code freshness for ``tailnet.proto``.

The golden byte strings are built by hand from protobuf's encoding rules
(tag = field << 3 | wire type; varints little-endian base 128; negative int32
as 10-byte varints; length-delimited sub-messages and map entries; doubles as
8 little-endian bytes), so they check field numbers and types independently of
the generated code. Each is decoded, checked field by field, and re-encoded
deterministically to the same bytes.
"""

from __future__ import annotations

import struct
import subprocess
import sys
import uuid
from pathlib import Path

from tailnet.v2 import tailnet_pb2 as pb

ROOT = Path(__file__).resolve().parents[2]

VARINT, I64, LEN = 0, 1, 2


def varint(n: int) -> bytes:
    if n < 0:
        n += 1 << 64
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def tag(field: int, wire: int) -> bytes:
    return varint(field << 3 | wire)


def ld(field: int, payload: bytes) -> bytes:
    return tag(field, LEN) + varint(len(payload)) + payload


def vf(field: int, n: int) -> bytes:
    return tag(field, VARINT) + varint(n)


def dbl(field: int, x: float) -> bytes:
    return tag(field, I64) + struct.pack("<d", x)


def test_varint_helper_matches_spec_examples() -> None:
    assert varint(1) == b"\x01"
    assert varint(150) == b"\x96\x01"
    assert varint(999) == b"\xe7\x07"
    assert varint(-1) == b"\xff" * 9 + b"\x01"


KEY = b"np" + bytes(range(32))
DISCO = "discokey:" + "ab" * 32

NODE_BYTES = b"".join(
    [
        vf(1, 5),  # id
        ld(2, vf(1, 1_700_000_000) + vf(2, 500)),  # as_of Timestamp{seconds, nanos}
        ld(3, KEY),  # key
        ld(4, DISCO.encode()),  # disco
        vf(5, 999),  # preferred_derp
        ld(6, ld(1, b"999-v4") + dbl(2, 0.25)),  # derp_latency entry
        ld(7, vf(1, 999) + ld(2, b"forced")),  # derp_forced_websocket entry
        ld(8, b"fd7a:115c:a1e0::1/128"),  # addresses
        ld(9, b"fd7a:115c:a1e0::1/128"),  # allowed_ips
        ld(10, b"192.0.2.1:41641"),  # endpoints
        ld(10, b"[2001:db8::1]:41641"),
    ]
)


def test_node_golden() -> None:
    assert NODE_BYTES[:2] == b"\x08\x05"
    n = pb.Node.FromString(NODE_BYTES)
    assert n.id == 5
    assert n.as_of.seconds == 1_700_000_000 and n.as_of.nanos == 500
    assert n.key == KEY and len(n.key) == 34
    assert n.disco == DISCO
    assert n.preferred_derp == 999
    assert dict(n.derp_latency) == {"999-v4": 0.25}
    assert dict(n.derp_forced_websocket) == {999: "forced"}
    assert list(n.addresses) == ["fd7a:115c:a1e0::1/128"]
    assert list(n.allowed_ips) == ["fd7a:115c:a1e0::1/128"]
    assert list(n.endpoints) == ["192.0.2.1:41641", "[2001:db8::1]:41641"]
    assert n.SerializeToString(deterministic=True) == NODE_BYTES


DERP_NODE = b"".join(
    [
        ld(1, b"999b"),  # name
        vf(2, 999),  # region_id
        ld(3, b"127.0.0.1"),  # host_name
        vf(7, -1),  # stun_port = -1: ten-byte varint
        vf(9, 3340),  # derp_port
        vf(11, 1),  # force_http
        vf(13, 1),  # can_port_80
    ]
)
REGION = b"".join(
    [
        vf(1, 999),  # region_id
        vf(2, 1),  # embedded_relay
        ld(3, b"coder"),  # region_code
        ld(4, b"Coder Embedded Relay"),  # region_name
        ld(6, DERP_NODE),  # nodes
    ]
)
DERP_MAP_BYTES = ld(1, ld(1, vf(1, 999) + dbl(2, 0.5))) + ld(2, vf(1, 999) + ld(2, REGION))


def test_derp_map_golden() -> None:
    assert b"\x38" + b"\xff" * 9 + b"\x01" in DERP_MAP_BYTES
    assert b"\x48\x8c\x1a" in DERP_MAP_BYTES  # derp_port 3340
    m = pb.DERPMap.FromString(DERP_MAP_BYTES)
    assert dict(m.home_params.region_score) == {999: 0.5}
    r = m.regions[999]
    assert (r.region_id, r.embedded_relay, r.region_code, r.region_name) == (
        999, True, "coder", "Coder Embedded Relay",
    )
    (node,) = r.nodes
    assert (node.name, node.region_id, node.host_name) == ("999b", 999, "127.0.0.1")
    assert (node.stun_port, node.derp_port, node.force_http, node.can_port_80) == (
        -1, 3340, True, True,
    )
    assert not node.stun_only and not node.insecure_for_tests
    assert m.SerializeToString(deterministic=True) == DERP_MAP_BYTES


PEER_A = uuid.UUID("0102030405060708090a0b0c0d0e0f10")
PEER_B = uuid.UUID("f0e0d0c0b0a090807060504030201000")
RESPONSE_BYTES = b"".join(
    [
        ld(1, ld(1, PEER_A.bytes) + ld(2, vf(5, 1)) + vf(3, 1) + ld(4, b"init")),
        ld(1, ld(1, PEER_B.bytes) + vf(3, 3) + ld(4, b"lost")),
        ld(2, b"peer ID overwritten by new connection"),
    ]
)


def test_coordinate_response_golden() -> None:
    r = pb.CoordinateResponse.FromString(RESPONSE_BYTES)
    a, b = r.peer_updates
    assert a.id == PEER_A.bytes and a.kind == pb.CoordinateResponse.PeerUpdate.NODE
    assert a.node.preferred_derp == 1 and a.reason == "init"
    assert b.id == PEER_B.bytes and b.kind == pb.CoordinateResponse.PeerUpdate.LOST
    assert not b.HasField("node") and b.reason == "lost"
    assert r.error == "peer ID overwritten by new connection"
    assert r.SerializeToString(deterministic=True) == RESPONSE_BYTES


def test_coordinate_request_golden() -> None:
    raw = b"".join(
        [
            ld(1, ld(1, vf(5, 7))),  # update_self{node{preferred_derp=7}}
            ld(2, b""),  # disconnect{}
            ld(3, ld(1, PEER_A.bytes)),  # add_tunnel
            ld(4, ld(1, PEER_B.bytes)),  # remove_tunnel
            ld(5, ld(1, PEER_A.bytes)),  # ready_for_handshake[0]
        ]
    )
    r = pb.CoordinateRequest.FromString(raw)
    assert r.update_self.node.preferred_derp == 7 and r.HasField("disconnect")
    assert r.add_tunnel.id == PEER_A.bytes and r.remove_tunnel.id == PEER_B.bytes
    assert [x.id for x in r.ready_for_handshake] == [PEER_A.bytes]
    assert r.SerializeToString(deterministic=True) == raw


def test_method_paths() -> None:
    svc = pb.DESCRIPTOR.services_by_name["Tailnet"]
    assert svc.full_name == "coder.tailnet.v2.Tailnet"
    assert sorted(m.name for m in svc.methods) == [
        "Coordinate", "PostTelemetry", "RefreshResumeToken", "StreamDERPMaps", "WorkspaceUpdates",
    ]
    source = (ROOT / "tailnet" / "v2" / "tailnet_pb2_grpc.py").read_text()
    assert "/coder.tailnet.v2.Tailnet/Coordinate" in source


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    """``python proto/generate.py`` reproduces the committed tailnet/v2 files exactly."""
    subprocess.run(
        [sys.executable, str(ROOT / "proto" / "generate.py"), "--out", str(tmp_path)],
        check=True,
        cwd=ROOT,
        timeout=120,
    )
    for name in ("tailnet_pb2.py", "tailnet_pb2.pyi", "tailnet_pb2_grpc.py"):
        fresh = (tmp_path / "tailnet" / "v2" / name).read_text()
        committed = (ROOT / "tailnet" / "v2" / name).read_text()
        assert fresh == committed, f"tailnet/v2/{name} is stale: run python proto/generate.py"
