"""Hypothesis state machine for the coordinator core.

Random connects (including duplicate IDs), node updates, add/remove tunnel,
graceful disconnects, losses, READY_FOR_HANDSHAKE, full buffers, stale requests
and close, against recording sinks. Every delivered update is checked *at send
time* (the sink inspects the coordinator's tunnels and the current operation);
after every step the independent tunnel model and the peers' views are compared
with the coordinator.

Invariants:

* every connected peer's view of each connected tunnel peer that has a node
  equals that peer's latest node; a view never mentions a disconnected peer or a
  peer it shares no tunnel with;
* NODE and READY_FOR_HANDSHAKE only travel along tunnels (at send time); an
  identical NODE is never re-sent to the same connection;
* LOST only during lost()/close() of that peer (or its READY_FOR_HANDSHAKE
  teardown); DISCONNECTED only during disconnect / remove tunnel / eviction of a
  full peer; both only about peers announced to that connection;
* nothing is sent to a closed sink; every sink is closed at most once.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from tailnet.core import (
    CLOSE_ERR_COORDINATOR_CLOSE,
    CLOSE_ERR_FAILED_UPDATE,
    CLOSE_ERR_OVERWRITTEN,
    Coordinator,
    CoordinatorClosed,
)
from tailnet.v2 import tailnet_pb2 as pb

Req = pb.CoordinateRequest
PU = pb.CoordinateResponse.PeerUpdate
IDS = [uuid.UUID(int=i + 1) for i in range(5)]
pids = st.sampled_from(IDS)


def make_node(k: int) -> pb.Node:
    return pb.Node(id=k, preferred_derp=1, derp_latency={"1-v4": 0.1 * k, "2-v4": 0.2})


@dataclass
class RecSink:
    machine: CoordinatorMachine
    pid: uuid.UUID
    capacity: int | None = None
    count: int = 0
    closed: bool = False
    close_calls: int = 0
    close_error: str | None = None
    view: dict[uuid.UUID, bytes] = field(default_factory=dict)

    def send(self, resp: pb.CoordinateResponse) -> bool:
        m = self.machine
        if self.closed:
            m.violations.append(f"send to closed sink of {self.pid}")
            return False
        if self.capacity is not None and self.count >= self.capacity:
            return False
        self.count += 1
        for u in resp.peer_updates:
            m.check_update(self, u)
        if resp.error:
            m.check_error(self, resp.error)
        return True

    def close(self, error: str | None = None) -> None:
        self.close_calls += 1
        self.closed = True
        self.close_error = error


class _Fixed:
    """Stands in for ``st.DataObject`` when a rule is called from ``start``."""

    def __init__(self, value: uuid.UUID) -> None:
        self.value = value

    def draw(self, strategy: object) -> uuid.UUID:
        return self.value


class CoordinatorMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.c = Coordinator()
        self.current: dict[uuid.UUID, RecSink] = {}
        self.retired: list[RecSink] = []
        self.nodes: dict[uuid.UUID, bytes] = {}  # latest node of the current connection
        self.tunnels: set[tuple[uuid.UUID, uuid.UUID]] = set()
        self.op: tuple[str, uuid.UUID | None, uuid.UUID | None] = ("idle", None, None)
        self.violations: list[str] = []
        self.is_closed = False
        self.rfh_targets: list[uuid.UUID] = []
        self.steps = 0

    # ------------------------------------------------------------ send-time checks

    def shares(self, a: uuid.UUID, b: uuid.UUID) -> bool:
        return self.c.shares_tunnel(a, b)

    def check_update(self, sink: RecSink, u: pb.CoordinateResponse.PeerUpdate) -> None:
        about = uuid.UUID(bytes=u.id)
        op, x, y = self.op
        bad = self.violations.append
        if about == sink.pid:
            bad(f"{sink.pid} told about itself")
        if u.kind == PU.NODE:
            b = u.node.SerializeToString(deterministic=True)
            if not self.shares(sink.pid, about):
                bad(f"NODE about {about} to {sink.pid} without tunnel")
            if sink.view.get(about) == b:
                bad(f"duplicate NODE about {about} to {sink.pid}")
            sink.view[about] = b
        elif u.kind == PU.READY_FOR_HANDSHAKE:
            if not (op == "rfh" and x == about and self.shares(sink.pid, about)):
                bad(f"RFH about {about} to {sink.pid} during {self.op}")
        elif u.kind in (PU.LOST, PU.DISCONNECTED):
            if about not in sink.view:
                bad(f"{PU.Kind.Name(u.kind)} about never-announced {about} to {sink.pid}")
            sink.view.pop(about, None)
            if u.kind == PU.LOST:
                ok = (
                    (op == "lost" and x == about and u.reason == "lost")
                    or (op == "rfh" and x == about and u.reason == "lost")
                    or (op == "close" and u.reason == "coordinator close")
                )
            elif u.reason == "graceful disconnect":
                ok = op == "disconnect" and x == about
            elif u.reason == "remove tunnel":
                ok = op == "remove" and {x, y} == {sink.pid, about}
            elif u.reason == "failed update":
                s = self.current.get(about)
                ok = s is not None and s.capacity is not None
            else:
                ok = False
            if not ok:
                bad(f"{PU.Kind.Name(u.kind)} {u.reason!r} about {about} during {self.op}")
        else:
            bad(f"unexpected kind {u.kind}")

    def check_error(self, sink: RecSink, error: str) -> None:
        op, x, _ = self.op
        prefix = "ready for handshake error: you do not share a tunnel with "
        target = error.removeprefix(prefix).strip('"')
        if not (
            op == "rfh"
            and x == sink.pid
            and error.startswith(prefix)
            and target in {str(t) for t in self.rfh_targets}
            and not self.shares(sink.pid, uuid.UUID(target))
        ):
            self.violations.append(f"unexpected error {error!r} to {sink.pid} during {self.op}")

    # ------------------------------------------------------------ helpers

    def run(self, op: str, x: uuid.UUID | None, y: uuid.UUID | None, req: Req) -> None:
        assert x is not None
        self.steps += 1
        self.op = (op, x, y)
        self.c.handle(x, self.current[x], req)
        self.op = ("idle", None, None)
        self.sync()

    def sync(self) -> None:
        """Forget connections the coordinator closed; drop their src-tunnels in the model."""
        for pid, sink in list(self.current.items()):
            if sink.closed:
                assert sink.close_error != CLOSE_ERR_OVERWRITTEN
                del self.current[pid]
                self.nodes.pop(pid, None)
                self.retired.append(sink)
                self.tunnels = {t for t in self.tunnels if t[0] != pid}

    # ------------------------------------------------------------ rules

    @initialize(
        n=st.integers(2, len(IDS)),
        ks=st.lists(st.integers(0, 3) | st.none(), min_size=len(IDS), max_size=len(IDS)),
        links=st.lists(st.tuples(pids, pids), max_size=6),
    )
    def start(self, n: int, ks: list[int | None], links: list[tuple[uuid.UUID, uuid.UUID]]) -> None:
        """Start from a populated network so short runs still exercise fan-out."""
        for pid, k in zip(IDS[:n], ks):
            self.connect(pid, False)
            if k is not None:
                self.update(_Fixed(pid), k)
        for src, dst in links:
            if src in self.current:
                self.add_tunnel(_Fixed(src), dst)

    @rule(pid=pids, full=st.sampled_from([False, False, False, True]))
    def connect(self, pid: uuid.UUID, full: bool) -> None:
        sink = RecSink(self, pid, capacity=0 if full else None)
        old = self.current.get(pid)
        if self.is_closed:
            try:
                self.c.connect(pid, "p", sink)
            except CoordinatorClosed:
                return
            raise AssertionError("connect after close must raise")
        self.current[pid] = sink
        self.nodes.pop(pid, None)
        self.op = ("connect", pid, None)
        self.c.connect(pid, "p", sink)
        self.op = ("idle", None, None)
        if old is not None:
            assert old.closed and old.close_error == CLOSE_ERR_OVERWRITTEN
            self.retired.append(old)
        if full and any(self.shares(pid, o) and o in self.nodes for o in self.current if o != pid):
            assert sink.closed and sink.close_error == CLOSE_ERR_FAILED_UPDATE
        self.sync()

    @precondition(lambda self: self.current)
    @rule(data=st.data(), k=st.integers(0, 3))
    def update(self, data: st.DataObject, k: int) -> None:
        pid = data.draw(st.sampled_from(sorted(self.current)))
        n = make_node(k)
        self.nodes[pid] = n.SerializeToString(deterministic=True)
        self.run("update", pid, None, Req(update_self=Req.UpdateSelf(node=n)))
        if pid not in self.current:
            self.nodes.pop(pid, None)

    @precondition(lambda self: self.current)
    @rule(data=st.data(), dst=pids)
    def add_tunnel(self, data: st.DataObject, dst: uuid.UUID) -> None:
        pid = data.draw(st.sampled_from(sorted(self.current)))
        if pid != dst:
            self.tunnels.add((pid, dst))
        self.run("add", pid, dst, Req(add_tunnel=Req.Tunnel(id=dst.bytes)))

    @precondition(lambda self: self.current)
    @rule(data=st.data(), dst=pids)
    def remove_tunnel(self, data: st.DataObject, dst: uuid.UUID) -> None:
        pid = data.draw(st.sampled_from(sorted(self.current)))
        self.tunnels.discard((pid, dst))
        self.run("remove", pid, dst, Req(remove_tunnel=Req.Tunnel(id=dst.bytes)))

    @precondition(lambda self: self.current)
    @rule(data=st.data())
    def disconnect(self, data: st.DataObject) -> None:
        pid = data.draw(st.sampled_from(sorted(self.current)))
        sink = self.current[pid]
        self.run("disconnect", pid, None, Req(disconnect=Req.Disconnect()))
        assert sink.closed
        assert pid not in self.current

    @precondition(lambda self: self.current)
    @rule(data=st.data(), error=st.sampled_from([None, "eof"]))
    def lose(self, data: st.DataObject, error: str | None) -> None:
        pid = data.draw(st.sampled_from(sorted(self.current)))
        sink = self.current[pid]
        self.op = ("lost", pid, None)
        self.c.lost(pid, sink, error)
        self.op = ("idle", None, None)
        assert sink.closed and sink.close_error == error
        self.sync()

    @precondition(lambda self: self.current)
    @rule(data=st.data(), to=st.lists(pids, min_size=1, max_size=2))
    def ready_for_handshake(self, data: st.DataObject, to: list[uuid.UUID]) -> None:
        pid = data.draw(st.sampled_from(sorted(self.current)))
        req = Req(ready_for_handshake=[Req.ReadyForHandshake(id=t.bytes) for t in to])
        self.rfh_targets = to
        self.run("rfh", pid, None, req)

    @precondition(lambda self: self.current)
    @rule(data=st.data())
    def fill_buffer(self, data: st.DataObject) -> None:
        pid = data.draw(st.sampled_from(sorted(self.current)))
        sink = self.current[pid]
        sink.capacity = sink.count

    @precondition(lambda self: self.retired)
    @rule(data=st.data(), k=st.integers(0, 3))
    def stale_connection_is_ignored(self, data: st.DataObject, k: int) -> None:
        sink = data.draw(st.sampled_from(self.retired))
        before = (self.c.tunnels(), [(p.id, p.node) for p in self.c.peers()])
        req = Req(update_self=Req.UpdateSelf(node=make_node(k)), disconnect=Req.Disconnect())
        req.add_tunnel.id = IDS[k].bytes
        self.op = ("stale", sink.pid, None)
        self.c.handle(sink.pid, sink, req)
        self.c.lost(sink.pid, sink, "late")
        self.op = ("idle", None, None)
        assert (self.c.tunnels(), [(p.id, p.node) for p in self.c.peers()]) == before

    @precondition(lambda self: not self.is_closed and self.steps >= 30)
    @rule()
    def close(self) -> None:
        self.op = ("close", None, None)
        self.c.close()
        self.op = ("idle", None, None)
        self.is_closed = True
        for sink in self.current.values():
            assert sink.closed and sink.close_error == CLOSE_ERR_COORDINATOR_CLOSE
        self.retired.extend(self.current.values())
        self.current.clear()
        self.nodes.clear()
        self.tunnels.clear()

    # ------------------------------------------------------------ invariants

    @invariant()
    def no_violations(self) -> None:
        assert self.violations == [], self.violations

    @invariant()
    def model_matches_coordinator(self) -> None:
        assert {p.id for p in self.c.peers()} == set(self.current)
        assert set(self.c.tunnels()) == self.tunnels
        for pid in self.current:
            n = self.c.node_of(pid)
            got = None if n is None else n.SerializeToString(deterministic=True)
            assert got == self.nodes.get(pid)

    @invariant()
    def views_are_consistent(self) -> None:
        for a, sink in self.current.items():
            for b in sink.view:
                assert b in self.current, f"{a} still has a view of gone {b}"
                assert self.shares(a, b), f"{a} has a view of non-tunnel peer {b}"
            for b in self.current:
                if b != a and self.shares(a, b) and b in self.nodes:
                    assert sink.view.get(b) == self.nodes[b], f"{a}'s view of {b} is stale"

    @invariant()
    def sinks_closed_at_most_once(self) -> None:
        for sink in self.retired:
            assert sink.close_calls == 1


CoordinatorMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=50, deadline=None
)
TestCoordinatorMachine = CoordinatorMachine.TestCase
