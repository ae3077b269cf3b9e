"""Socket-free tests of the PG coordinator's pure parts: payload codec and mapper."""

from __future__ import annotations

import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tailnet.core import MAX_UPDATES_PER_RESPONSE
from tailnet.pg.mapper import (
    GONE,
    UNTUNNELED,
    Binding,
    BindingKind,
    BindingRow,
    LocalPeers,
    Trigger,
    best_binding,
)
from tailnet.pg.payload import (
    MAX_PAYLOAD,
    PayloadError,
    PeerCode,
    PeerEvent,
    RfhEvent,
    TunnelEvent,
    decode_heartbeat,
    decode_peer_events,
    decode_rfh_events,
    decode_tunnel_events,
    encode_heartbeat,
    encode_peer_events,
    encode_rfh_events,
    encode_tunnel_events,
)
from tailnet.v2 import tailnet_pb2 as pb

from ..cases import RecSink

PU = pb.CoordinateResponse.PeerUpdate
uuids = st.uuids()


@given(st.lists(st.builds(PeerEvent, uuids, st.sampled_from(PeerCode)), max_size=600))
def test_peer_events_round_trip_within_limit(events: list[PeerEvent]) -> None:
    payloads = encode_peer_events(events)
    assert all(0 < len(p.encode()) <= MAX_PAYLOAD for p in payloads)
    assert [e for p in payloads for e in decode_peer_events(p)] == events


@given(st.lists(st.builds(TunnelEvent, uuids, uuids, st.booleans()), max_size=400))
def test_tunnel_events_round_trip_within_limit(events: list[TunnelEvent]) -> None:
    payloads = encode_tunnel_events(events)
    assert all(len(p.encode()) <= MAX_PAYLOAD for p in payloads)
    assert [e for p in payloads for e in decode_tunnel_events(p)] == events


@given(st.lists(st.builds(RfhEvent, uuids, uuids), max_size=400))
def test_rfh_events_round_trip_within_limit(events: list[RfhEvent]) -> None:
    payloads = encode_rfh_events(events)
    assert all(len(p.encode()) <= MAX_PAYLOAD for p in payloads)
    assert [e for p in payloads for e in decode_rfh_events(p)] == events


@given(uuids)
def test_heartbeat_round_trip(u: uuid.UUID) -> None:
    assert decode_heartbeat(encode_heartbeat(u)) == u


@given(st.text(max_size=80))
def test_garbage_raises_payload_error_only(text: str) -> None:
    for dec in (decode_peer_events, decode_tunnel_events, decode_rfh_events, decode_heartbeat):
        try:
            dec(text)  # type: ignore[operator]
        except PayloadError:
            pass


@pytest.mark.parametrize("bad", ["", "x" + "0" * 32, "n" + "g" * 32, "a" + "0" * 63])
def test_bad_entries(bad: str) -> None:
    with pytest.raises(PayloadError):
        decode_peer_events(bad)


def _row(peer: uuid.UUID, n: int, alive: bool, at: float) -> BindingRow:
    return BindingRow(peer, uuid.uuid4(), pb.Node(id=n).SerializeToString(), alive, at)


def test_best_binding_newest_live_node_wins() -> None:
    p = uuid.uuid4()
    assert best_binding([]) is GONE
    assert best_binding([_row(p, 1, False, 5.0)]).kind is BindingKind.LOST
    b = best_binding([_row(p, 1, True, 1.0), _row(p, 2, True, 2.0), _row(p, 3, False, 9.0)])
    assert b.kind is BindingKind.NODE and b.node is not None and b.node.id == 2


def _node(n: int) -> Binding:
    node = pb.Node(id=n)
    return Binding(BindingKind.NODE, node.SerializeToString(deterministic=True), node)


def test_deliver_dedups_and_reports_gone_only_if_told() -> None:
    lp = LocalPeers()
    sink = RecSink()
    x = lp.add(uuid.uuid4(), "x", sink)
    p, q = uuid.uuid4(), uuid.uuid4()
    lp.deliver(x, [(q, GONE, Trigger.DISCONNECT)])
    assert sink.updates() == []
    lp.deliver(x, [(p, _node(1), Trigger.NODE)])
    lp.deliver(x, [(p, _node(1), Trigger.NODE)])
    assert [u.reason for u in sink.updates()] == ["node update"]
    assert lp.told_about(p) == {x.id}
    lp.deliver(x, [(p, UNTUNNELED, Trigger.REMOVE_TUNNEL)])
    assert sink.summary()[-1][1:] == ("DISCONNECTED", "remove tunnel")
    assert lp.told_about(p) == set() and x.sent == {}


def test_refused_send_is_not_committed_and_marks_dirty() -> None:
    lp = LocalPeers()
    sink = RecSink(capacity=0)
    x = lp.add(uuid.uuid4(), "x", sink)
    p = uuid.uuid4()
    lp.deliver(x, [(p, _node(1), Trigger.NODE)])
    assert x.dirty and x.sent == {} and not sink.closed
    sink.capacity = None
    x.dirty = False
    lp.deliver(x, [(p, _node(1), Trigger.RESYNC)])
    assert x.sent and [u.node.id for u in sink.updates()] == [1]


def test_init_batches_are_chunked() -> None:
    lp = LocalPeers()
    sink = RecSink()
    x = lp.add(uuid.uuid4(), "x", sink)
    items = [(uuid.uuid4(), _node(i), Trigger.INIT) for i in range(2 * MAX_UPDATES_PER_RESPONSE + 5)]
    lp.deliver(x, items)
    assert [len(r.peer_updates) for r in sink.responses] == [1024, 1024, 5]
    assert {u.reason for u in sink.updates()} == {"init"}


def test_big_nodes_split_below_frame_limit() -> None:
    lp = LocalPeers()
    sink = RecSink()
    x = lp.add(uuid.uuid4(), "x", sink)
    big = pb.Node(id=1, endpoints=["e" * 1000] * 20)  # ~20 KB per node
    b = Binding(BindingKind.NODE, big.SerializeToString(deterministic=True), big)
    lp.deliver(x, [(uuid.uuid4(), b, Trigger.RESYNC) for _ in range(600)])
    assert len(sink.responses) > 1
    assert all(r.ByteSize() < 4 * 1024 * 1024 for r in sink.responses)
    assert sum(len(r.peer_updates) for r in sink.responses) == 600


def test_overwrite_closes_old_and_close_all_reports_lost() -> None:
    lp = LocalPeers()
    s1, s2, s3 = RecSink(), RecSink(), RecSink()
    pid = uuid.uuid4()
    a = lp.add(pid, "a", s1)
    a2 = lp.add(pid, "a", s2)
    assert s1.closed and s1.close_error == "peer ID overwritten by new connection"
    assert a2.overwrites == 1 and lp.conns[pid] is a2 and a is not a2
    other = lp.add(uuid.uuid4(), "o", s3)
    lp.deliver(other, [(pid, _node(1), Trigger.NODE)])
    lp.close_all("coordinator closed", "coordinator close")
    assert s3.summary()[-2][1:] == ("LOST", "coordinator close")
    assert s2.close_error == s3.close_error == "coordinator closed"
    assert lp.conns == {} and lp.told == {}


def test_listener_ignores_termination_of_a_replaced_connection() -> None:
    from tailnet.pg.pubsub import Listener

    lst = Listener("postgresql://unused", ["ch"], lambda c, p: None, lambda: None)
    old, current = object(), object()
    lst._conn = current
    lst._terminated(old)  # late callback from the connection replaced on reconnect
    assert not lst._lost.is_set()
    lst._terminated(current)
    assert lst._lost.is_set()
