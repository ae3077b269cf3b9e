"""Pure relay registry (no sockets): duplicates, active selection, PeerGone subscriptions."""

from __future__ import annotations

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from derp.relay import Relay
from derp.server.wheel import TimerWheel

A, B, C = b"a" * 32, b"b" * 32, b"c" * 32


class Conn:
    """Fake connection handle (identity-hashed)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


def test_single_client_register_unregister() -> None:
    r: Relay[Conn] = Relay()
    a = Conn("a1")
    reg = r.register(A, a)
    assert not reg.duplicate and r.active[A] is a and A in r and len(r) == 1
    dep = r.unregister(A, a)
    assert dep.last and dep.peer_gone == () and A not in r and r.active == {}
    r.check_invariants()


def test_duplicates_last_writer_is_active() -> None:
    r: Relay[Conn] = Relay()
    a1, a2, a3 = Conn("a1"), Conn("a2"), Conn("a3")
    r.register(A, a1)
    assert r.register(A, a2).duplicate
    assert r.active[A] is a2  # newest is active
    assert r.note_activity(A, a1)
    assert r.active[A] is a1  # most recent sender receives
    assert not r.note_activity(A, a1)
    r.register(A, a3)
    r.note_activity(A, a2)
    # order of recency: a1 < a3 < a2
    dep = r.unregister(A, a2)
    assert not dep.last and dep.new_active is a3 and r.active[A] is a3
    dep = r.unregister(A, a3)
    assert dep.new_active is a1 and not r.is_duplicate(A)
    r.check_invariants()


def test_peer_gone_only_when_last_connection_leaves() -> None:
    r: Relay[Conn] = Relay()
    a1, a2, b, c = Conn("a1"), Conn("a2"), Conn("b"), Conn("c")
    r.register(A, a1)
    r.register(A, a2)
    r.register(B, b)
    r.register(C, c)
    r.note_delivery(A, b)
    r.note_delivery(A, b)  # idempotent
    assert r.subscribers(A) == (b,)
    assert r.unregister(A, a2).peer_gone == ()  # duplicate leaving: no PeerGone
    dep = r.unregister(A, a1)
    assert dep.last and dep.peer_gone == (b,)
    assert r.subscribers(A) == ()
    r.check_invariants()


def test_departed_receiver_loses_subscriptions() -> None:
    r: Relay[Conn] = Relay()
    a, b1, b2 = Conn("a"), Conn("b1"), Conn("b2")
    r.register(A, a)
    r.register(B, b1)
    r.note_delivery(A, b1)
    r.unregister(B, b1)
    r.register(B, b2)  # reconnected: has not heard from A on this connection
    assert r.unregister(A, a).peer_gone == ()
    r.check_invariants()


def test_watchers_hook() -> None:
    r: Relay[Conn] = Relay()
    w, a = Conn("w"), Conn("a")
    r.register(A, a)
    assert r.add_watcher(w) == [A]
    r.register(B, Conn("b"))
    assert r.register(C, Conn("c")).watchers == (w,)
    assert r.unregister(A, a).watchers == (w,)


def test_unknown_unregister_and_activity_are_noops() -> None:
    r: Relay[Conn] = Relay()
    assert not r.unregister(A, Conn("x")).last
    assert not r.note_activity(A, Conn("x"))
    r.check_invariants()


class RelayMachine(RuleBasedStateMachine):
    """Random register/activity/unregister/delivery sequences against a simple model."""

    def __init__(self) -> None:
        super().__init__()
        self.relay: Relay[Conn] = Relay()
        # model: key -> list of conns in recency order (most recent last)
        self.model: dict[bytes, list[Conn]] = {}
        self.subs: dict[bytes, set[Conn]] = {}
        self.n = 0

    def _all(self) -> list[tuple[bytes, Conn]]:
        return [(k, c) for k, cs in self.model.items() for c in cs]

    @rule(key=st.sampled_from([A, B, C]))
    def register(self, key: bytes) -> None:
        self.n += 1
        conn = Conn(f"{key[:1].decode()}{self.n}")
        reg = self.relay.register(key, conn)
        assert reg.duplicate == bool(self.model.get(key))
        self.model.setdefault(key, []).append(conn)

    @precondition(lambda self: bool(self.model))
    @rule(data=st.data())
    def activity(self, data: st.DataObject) -> None:
        key, conn = data.draw(st.sampled_from(self._all()))
        self.relay.note_activity(key, conn)
        order = self.model[key]
        order.remove(conn)
        order.append(conn)

    @precondition(lambda self: bool(self.model))
    @rule(data=st.data(), src=st.sampled_from([A, B, C]))
    def delivery(self, data: st.DataObject, src: bytes) -> None:
        _, receiver = data.draw(st.sampled_from(self._all()))
        self.relay.note_delivery(src, receiver)
        self.subs.setdefault(src, set()).add(receiver)

    @precondition(lambda self: bool(self.model))
    @rule(data=st.data())
    def unregister(self, data: st.DataObject) -> None:
        key, conn = data.draw(st.sampled_from(self._all()))
        dep = self.relay.unregister(key, conn)
        for s in self.subs.values():
            s.discard(conn)
        order = self.model[key]
        order.remove(conn)
        if order:
            assert not dep.last and dep.new_active is order[-1]
            assert dep.peer_gone == ()
        else:
            del self.model[key]
            assert dep.last and dep.new_active is None
            assert set(dep.peer_gone) == self.subs.pop(key, set())

    @invariant()
    def registry_matches_model(self) -> None:
        self.relay.check_invariants()
        assert set(self.relay.active) == set(self.model)
        for k, order in self.model.items():
            assert self.relay.active[k] is order[-1]
            assert set(self.relay.connections(k)) == set(order)
            assert self.relay.is_duplicate(k) == (len(order) > 1)


TestRelayMachine = RelayMachine.TestCase


# --------------------------------------------------------------------------- timer wheel


def test_wheel_never_early_and_at_most_one_slot_late() -> None:
    w: TimerWheel[str] = TimerWheel(1.0, now=100.0)
    w.schedule("a", 101.5)
    w.schedule("b", 103.0)
    assert w.pop_due(101.9) == []
    assert w.pop_due(102.0) == ["a"]
    assert w.pop_due(102.5) == []
    assert w.pop_due(103.0) == ["b"]
    assert len(w) == 0


def test_wheel_past_deadline_and_long_stall() -> None:
    w: TimerWheel[int] = TimerWheel(0.5, now=0.0)
    w.pop_due(10.0)
    w.schedule(1, 3.0)  # already past: next pop returns it
    w.schedule(2, 1e6)
    assert w.pop_due(10.1) == []  # already popped up to 10.0..10.5
    assert w.pop_due(10.5) == [1]
    assert w.pop_due(2e6) == [2]
