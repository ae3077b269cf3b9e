"""Relay hooks for sibling workers (no sockets): elsewhere, stand-ins, step aside,
the observer, and the route table's preferred links."""

from __future__ import annotations

from derp.peers import RouteTable
from derp.relay import Relay

A, B = b"a" * 32, b"b" * 32


class Conn:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


class Observer:
    def __init__(self) -> None:
        self.log: list[tuple[str, bytes, object]] = []

    def registered(self, key: bytes, conn: object) -> None:
        self.log.append(("registered", key, conn))

    def departed(self, key: bytes) -> None:
        self.log.append(("departed", key, None))

    def reactivated(self, key: bytes, conn: object) -> None:
        self.log.append(("reactivated", key, conn))


def test_key_elsewhere_is_a_duplicate_and_owes_watchers_nothing() -> None:
    r: Relay[Conn] = Relay()
    obs = Observer()
    r.observer = obs
    w, a = Conn("watcher"), Conn("a")
    r.add_watcher(w)
    r.elsewhere[A] = 1
    assert r.register(A, a).duplicate
    dep = r.unregister(A, a)
    assert dep.last and dep.watchers == ()  # the host still has A
    assert obs.log == [("registered", A, a), ("departed", A, None)]
    r.check_invariants()


def test_step_aside_take_back_and_reactivation() -> None:
    r: Relay[Conn] = Relay()
    obs = Observer()
    r.observer = obs
    a1, a2, si = Conn("a1"), Conn("a2"), Conn("stand-in")
    r.register(A, a1)
    r.register(A, a2)
    r.elsewhere[A] = 1
    assert not r.step_aside(B, si)  # no local connection of B
    assert r.step_aside(A, si) and r.active[A] is si and r.is_aside(A)
    r.check_invariants()
    r.unregister(A, a2)  # a departing duplicate does not take A back
    assert r.active[A] is si
    assert r.note_activity(A, a1)  # a local connection speaks: A is back
    assert r.active[A] is a1 and not r.is_aside(A)
    assert obs.log[-1] == ("reactivated", A, a1)
    r.step_aside(A, si)
    assert r.take_back(A) and r.active[A] is a1
    assert not r.take_back(A)
    r.check_invariants()


def test_route_remote_and_stand_ins_are_never_subscribed() -> None:
    r: Relay[Conn] = Relay()
    b, si = Conn("b"), Conn("stand-in")
    r.stand_ins.add(si)
    r.elsewhere[A] = 1
    r.route_remote(A, si)
    assert r.active[A] is si and A not in r  # routed, not local
    r.note_delivery(B, si)
    assert r.subscribers(B) == ()
    r.register(A, Conn("a"))  # a local connection wins over the stand-in
    assert r.active[A] is not si
    r.route_remote(A, None)  # no effect on a local key
    assert A in r.active
    r.register(B, b)
    r.route_remote(B, si)
    assert r.active[B] is b
    r.check_invariants()


def test_route_table_prefers_sibling_links() -> None:
    fwd: dict[bytes, object] = {}
    t: RouteTable[str] = RouteTable(fwd)
    t.prefer("w1")
    t.prefer("w2")
    t.add(A, "mesh1")
    t.add(A, "w1")  # a sibling goes before the mesh link
    assert t.route(A) == "w1" and fwd[A] == "w1"
    t.add(A, "w2")
    assert t.links_for(A) == ("w1", "w2", "mesh1")
    t.promote(A, "w2")  # w2's connection of A became the active one
    assert t.route(A) == "w2"
    t.promote(A, "mesh1")  # only preferred links are promoted
    assert t.route(A) == "w2"
    t.check_invariants()
    assert t.drop_link("w2") == [] and t.drop_link("w1") == []
    assert t.route(A) == "mesh1" and t.is_preferred("w1")
    t.forget_preference("w1")
    assert not t.is_preferred("w1")
    t.check_invariants()
