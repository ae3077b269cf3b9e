"""Tests for the pure client-side peer table (:mod:`tailnet.peers`); no sockets."""

from __future__ import annotations

import uuid

from hypothesis import given
from hypothesis import strategies as st

from tailnet.peers import (
    PeerDisconnected,
    PeerLost,
    PeerTable,
    PeerUpdated,
    ReadyForHandshake,
)
from tailnet.v2 import tailnet_pb2 as pb

PU = pb.CoordinateResponse.PeerUpdate
A = uuid.UUID(int=1)
B = uuid.UUID(int=2)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def node(derp: int = 999, ep: str = "1.2.3.4:5") -> pb.Node:
    return pb.Node(preferred_derp=derp, endpoints=[ep])


def upd(pid: uuid.UUID, kind: int, n: pb.Node | None = None, reason: str = "") -> PU:
    u = PU(id=pid.bytes, kind=kind, reason=reason)  # type: ignore[arg-type]
    if n is not None:
        u.node.CopyFrom(n)
    return u


def test_node_then_lost_then_node_clears_lost() -> None:
    clock = FakeClock()
    t = PeerTable(clock=clock)
    assert t.apply(upd(A, PU.NODE, node(), "init")) == PeerUpdated(A, node(), "init")
    assert A in t and len(t) == 1
    clock.now = 200.0
    assert t.apply(upd(A, PU.LOST, reason="lost")) == PeerLost(A, "lost")
    st_ = t.get(A)
    assert st_ is not None and st_.lost and st_.lost_at == 200.0
    # Lost peers are kept, and a second LOST is not a new event.
    assert t.apply(upd(A, PU.LOST)) is None
    assert t.node_of(A) == node()
    # The same node again un-loses the peer (that's how reconnect "init" works).
    assert t.apply(upd(A, PU.NODE, node())) == PeerUpdated(A, node(), "")
    st_ = t.get(A)
    assert st_ is not None and not st_.lost and st_.lost_at is None


def test_duplicate_node_is_silent_changed_node_is_not() -> None:
    t = PeerTable()
    t.apply(upd(A, PU.NODE, node()))
    assert t.apply(upd(A, PU.NODE, node())) is None
    assert t.apply(upd(A, PU.NODE, node(ep="9.9.9.9:1"))) == PeerUpdated(A, node(ep="9.9.9.9:1"))


def test_node_without_preferred_derp_is_ignored() -> None:
    t = PeerTable()
    assert t.apply(upd(A, PU.NODE, node(derp=0))) is None
    assert A not in t
    # ... but agents still acknowledge it.
    resp = pb.CoordinateResponse(peer_updates=[upd(A, PU.NODE, node(derp=0))])
    events, acks = t.apply_response(resp)
    assert events == [] and acks == [A]


def test_disconnected_removes() -> None:
    t = PeerTable()
    t.apply(upd(A, PU.NODE, node()))
    assert t.apply(upd(A, PU.DISCONNECTED, reason="graceful disconnect")) == PeerDisconnected(
        A, "graceful disconnect"
    )
    assert A not in t
    assert t.apply(upd(A, PU.DISCONNECTED)) is None
    assert t.apply(upd(A, PU.LOST)) is None  # unknown peers are not resurrected by LOST


def test_rfh_remembered_before_node() -> None:
    t = PeerTable()
    assert t.apply(upd(A, PU.READY_FOR_HANDSHAKE)) == ReadyForHandshake(A)
    assert A not in t and t.is_ready(A)
    t.apply(upd(A, PU.NODE, node()))
    st_ = t.get(A)
    assert st_ is not None and st_.ready_for_handshake and t.is_ready(A)
    # After node, RFH flags the existing entry.
    t.apply(upd(B, PU.NODE, node()))
    assert not t.is_ready(B)
    t.apply(upd(B, PU.READY_FOR_HANDSHAKE))
    assert t.is_ready(B)


def test_malformed_updates_are_skipped() -> None:
    t = PeerTable()
    assert t.apply(PU(id=b"short", kind=PU.NODE, node=node())) is None
    assert t.apply(upd(A, PU.KIND_UNSPECIFIED)) is None
    assert t.malformed == 2 and len(t) == 0


def test_apply_response_acks_each_node_once() -> None:
    t = PeerTable()
    resp = pb.CoordinateResponse(
        peer_updates=[
            upd(A, PU.NODE, node()),
            upd(B, PU.LOST),
            upd(A, PU.NODE, node(ep="x")),
            upd(B, PU.NODE, node()),
        ]
    )
    events, acks = t.apply_response(resp)
    assert acks == [A, B]
    assert [type(e) for e in events] == [PeerUpdated, PeerUpdated, PeerUpdated]


def test_mark_all_lost_idempotent_and_expire() -> None:
    clock = FakeClock()
    t = PeerTable(clock=clock)
    t.apply(upd(A, PU.NODE, node()))
    t.apply(upd(B, PU.NODE, node()))
    assert {e.peer_id for e in t.mark_all_lost()} == {A, B}
    assert t.mark_all_lost() == []
    clock.now += 10
    t.apply(upd(B, PU.NODE, node()))  # B found again
    assert t.expire_lost(5.0) == [A]
    assert A not in t and B in t


# Property test: the table against a tiny reference model --------------------

IDS = [uuid.UUID(int=i) for i in range(1, 4)]

op = st.one_of(
    st.tuples(st.just("node"), st.sampled_from(IDS), st.integers(0, 2), st.integers(0, 2)),
    st.tuples(st.just("lost"), st.sampled_from(IDS), st.just(0), st.just(0)),
    st.tuples(st.just("disc"), st.sampled_from(IDS), st.just(0), st.just(0)),
    st.tuples(st.just("rfh"), st.sampled_from(IDS), st.just(0), st.just(0)),
    st.tuples(st.just("all_lost"), st.sampled_from(IDS), st.just(0), st.just(0)),
)


@given(st.lists(op, max_size=40))
def test_table_matches_model(ops: list[tuple[str, uuid.UUID, int, int]]) -> None:
    t = PeerTable()
    # model: id -> [node, lost, ready]; pending ready set
    model: dict[uuid.UUID, list[object]] = {}
    pending: set[uuid.UUID] = set()
    for name, pid, derp, ep in ops:
        if name == "node":
            n = node(derp=derp, ep=str(ep))
            ev = t.apply(upd(pid, PU.NODE, n))
            if derp == 0:
                assert ev is None
            elif pid not in model:
                model[pid] = [n, False, pid in pending]
                pending.discard(pid)
                assert isinstance(ev, PeerUpdated)
            else:
                changed = model[pid][0] != n or model[pid][1]
                model[pid][0] = n
                model[pid][1] = False
                assert (ev is not None) == changed
        elif name == "lost":
            ev = t.apply(upd(pid, PU.LOST))
            was = pid in model and not model[pid][1]
            assert (ev is not None) == was
            if pid in model:
                model[pid][1] = True
        elif name == "disc":
            ev = t.apply(upd(pid, PU.DISCONNECTED))
            assert (ev is not None) == (pid in model)
            model.pop(pid, None)
            pending.discard(pid)
        elif name == "rfh":
            assert t.apply(upd(pid, PU.READY_FOR_HANDSHAKE)) == ReadyForHandshake(pid)
            if pid in model:
                model[pid][2] = True
            else:
                pending.add(pid)
        else:
            evs = t.mark_all_lost()
            assert {e.peer_id for e in evs} == {p for p, m in model.items() if not m[1]}
            for m in model.values():
                m[1] = True
        # Invariants after every step.
        assert {s.peer_id for s in t} == set(model)
        for s in t:
            m = model[s.peer_id]
            assert s.node == m[0] and s.lost == m[1] and s.ready_for_handshake == m[2]
            assert (s.lost_at is not None) == s.lost
            assert s.node.preferred_derp != 0
        for pid in IDS:
            if pid not in model:
                assert t.is_ready(pid) == (pid in pending)
