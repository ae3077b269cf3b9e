"""Socket-free tests of replica discovery's pure parts and the mesh health section."""

from __future__ import annotations

import uuid

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from tailnet.health import CODE_DERP_MESH, derp_report, mesh_report
from tailnet.pg.mapper import BindingRow
from tailnet.pg.replicas import (
    NodeKeyIndex,
    Replica,
    mesh_targets,
    node_key_of,
    replicas_changed,
)
from tailnet.v2 import tailnet_pb2 as pb

IDS = [uuid.UUID(int=i + 1) for i in range(4)]
KEYS = [b"np" + bytes([i]) * 32 for i in range(4)]


def rep(i: int, url: str = "", region: int = 999, hb: float = 1.0) -> Replica:
    return Replica(IDS[i], url or f"http://10.0.0.{i}:3000", region, f"h{i}", 0.0, hb)


def node(k: bytes) -> bytes:
    return pb.Node(id=1, key=k).SerializeToString()


def test_mesh_targets_same_region_other_replicas_with_url() -> None:
    rs = [rep(0), rep(1), rep(2, region=1000), Replica(IDS[3], "", 999, "h3", 0.0, 1.0)]
    assert mesh_targets(rs, IDS[0], 999) == {IDS[1]: "http://10.0.0.1:3000"}
    assert mesh_targets(rs, IDS[2], 1000) == {}


def test_replicas_changed_ignores_heartbeat_times() -> None:
    assert not replicas_changed([rep(0, hb=1.0)], [rep(0, hb=2.0)])
    assert replicas_changed([rep(0)], [rep(0, url="http://other:1")])
    assert replicas_changed([rep(0)], [rep(0), rep(1)])


def test_node_key_of() -> None:
    assert node_key_of(node(KEYS[1])) == KEYS[1]
    assert node_key_of(pb.Node(id=1).SerializeToString()) is None
    assert node_key_of(b"\xff\xff garbage") is None


class KeyIndexMachine(RuleBasedStateMachine):
    """Random updates and reloads against a model: peer → keys of its live rows."""

    def __init__(self) -> None:
        super().__init__()
        self.idx = NodeKeyIndex()
        self.rows: dict[tuple[uuid.UUID, uuid.UUID], tuple[bytes, bool]] = {}

    def _model(self) -> set[bytes]:
        return {k for (k, alive) in self.rows.values() if alive}

    @rule(peer=st.sampled_from(IDS), coord=st.sampled_from(IDS[:2]),
          k=st.sampled_from(KEYS), alive=st.booleans())
    def put_row(self, peer: uuid.UUID, coord: uuid.UUID, k: bytes, alive: bool) -> None:
        self.rows[(peer, coord)] = (k, alive)
        self._notify(peer)

    @rule(peer=st.sampled_from(IDS), coord=st.sampled_from(IDS[:2]))
    def delete_row(self, peer: uuid.UUID, coord: uuid.UUID) -> None:
        self.rows.pop((peer, coord), None)
        self._notify(peer)

    @rule()
    def reload(self) -> None:
        self.idx.replace_all(
            (p, node(k)) for (p, _), (k, alive) in self.rows.items() if alive
        )

    def _notify(self, peer: uuid.UUID) -> None:
        rows = {peer: [BindingRow(p, c, node(k), alive, 0.0)
                       for (p, c), (k, alive) in self.rows.items() if p == peer]}
        self.idx.update([peer], rows)

    @invariant()
    def agrees(self) -> None:
        self.idx.check_invariants()
        for k in KEYS:
            assert (k in self.idx) == (k in self._model())


TestKeyIndex = KeyIndexMachine.TestCase


def _relay(i: int, links: list[dict[str, object]] | None, url: str | None = None) -> dict[str, object]:
    return {"id": str(IDS[i]), "hostname": f"h{i}",
            "relay_url": f"http://10.0.0.{i}:3000" if url is None else url,
            "region_id": 999, "started_at": 1.0, "heartbeat_at": 2.0, "links": links}


def _link(i: int | None, state: str = "up", url: str = "") -> dict[str, object]:
    return {"url": url or f"http://10.0.0.{i}:3000/derp",
            "replica_id": str(IDS[i]) if i is not None else None,
            "state": state, "since": 1700000000.0, "error": None if state == "up" else "boom"}


def test_mesh_report_all_meshed_is_ok() -> None:
    m = mesh_report([_relay(0, [_link(1)]), _relay(1, [_link(0)])], self_id=str(IDS[0]))
    assert m["severity"] == "ok" and m["warnings"] == []
    assert m["relays"][0]["links"][0]["since"] == "2023-11-14T22:13:20Z"
    assert [r["not_meshed_with"] for r in m["relays"]] == [[], []]


def test_mesh_report_warns_about_every_gap() -> None:
    relays = [
        _relay(0, [_link(1, "down"), _link(None, "down", "http://derper:3340/derp")]),
        _relay(1, None),  # has not reported its links yet
        _relay(2, [], url=""),  # cannot be dialled
    ]
    m = mesh_report(relays, self_id=str(IDS[0]))
    texts = [w["message"] for w in m["warnings"]]
    assert m["severity"] == "warning" and {w["code"] for w in m["warnings"]} == {CODE_DERP_MESH}
    assert any("h0" in t and "not meshed with replica h1" in t and "boom" in t for t in texts)
    assert any("h1" in t and "not reported" in t for t in texts)
    assert any("h2" in t and "no relay URL" in t for t in texts)
    assert any("http://derper:3340/derp is down" in t for t in texts)
    assert m["relays"][0]["not_meshed_with"] == [str(IDS[1])]
    # The mesh's warnings make an otherwise healthy DERP section a warning, never an error.
    d = derp_report({}, m)
    assert d["mesh"]["relays"] and d["severity"] == "error"  # no regions at all: error
    ok_region = {"severity": "ok", "warnings": []}
    d = derp_report({999: ok_region}, m)
    assert d["severity"] == "warning" and d["healthy"] and len(d["warnings"]) == len(texts)
