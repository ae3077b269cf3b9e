"""Behavioural cases shared by every coordinator implementation.

Each case is an ``async def case_…(net: Net)`` that drives coordinator verbs
through :class:`Net` and asserts what the peers' sinks receive. The in-memory
:class:`tailnet.core.Coordinator` delivers synchronously, the PostgreSQL one
asynchronously (and may coalesce quick successive node updates), so cases:

* wait for deliveries with :meth:`RecSink.wait_for` (bounded by ``WAIT``), never sleep;
* assert absence only after a later, positive marker was received, with
  :meth:`Net.settle` (every pending write committed) between the action and the
  marker, so the marker is ordered after the action on every backend;
* compare node *sequences without repeats* (coalescing may skip an intermediate
  node, never re-send an identical one).

A backend places peers on replicas: ``join(..., replica=i)`` uses replica
``i % replicas`` so multi-replica backends run the same case across replicas.
Backends build their coordinators with :data:`CASE_LIMITS` (a tunnel cap the
cases can reach cheaply).

Transport backends (``transports.py``: the same verbs carried by DRPC or gRPC
streams to a running stack, ``Backend.transport``) see a stream end only once the
server's end arrived, so a case that checks how a sink was closed waits with
:meth:`Net.closed` (which still requires verb backends to have closed it within
the verb). A case that needs the bare coordinator verbs is marked :func:`skip_on`
for the backends where it cannot run, with the reason.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Protocol

from tailnet.core import (
    CLOSE_ERR_COORDINATOR_CLOSE,
    CLOSE_ERR_OVERWRITTEN,
    MAX_UPDATES_PER_RESPONSE,
    CoordinatorClosed,
    LimitExceeded,
    PeerSink,
)
from tailnet.limits import Limits
from tailnet.v2 import tailnet_pb2 as pb

__all__ = [
    "WAIT", "CASE_LIMITS", "TRANSPORT_BACKENDS", "RecSink", "Backend", "Net", "Peer", "CASES",
    "SKIP_ON", "skip_on", "node",
]

WAIT = 30.0
#: Limits every backend's coordinators are built with (room for case_big_init_is_chunked).
CASE_LIMITS = Limits(max_tunnels_per_peer=MAX_UPDATES_PER_RESPONSE + 100)

Req = pb.CoordinateRequest
PU = pb.CoordinateResponse.PeerUpdate
KindName = PU.Kind.Name


#: Backend ids (``test_conformance.py``) that reach the coordinator through a transport.
TRANSPORT_BACKENDS = ("drpc", "grpc")

Case = Callable[["Net"], Awaitable[None]]

#: case → {backend id: reason the case cannot run there}
SKIP_ON: dict[Case, dict[str, str]] = {}


def skip_on(backends: Iterable[str], reason: str) -> Callable[[Case], Case]:
    """Mark a case as not runnable on ``backends`` (the test skips it, giving ``reason``)."""

    def mark(case: Case) -> Case:
        SKIP_ON.setdefault(case, {}).update({b: reason for b in backends})
        return case

    return mark


def node(n: int, **kw: Any) -> pb.Node:
    return pb.Node(id=n, preferred_derp=999, **kw)


class RecSink:
    """Records responses; lets tests wait for a condition with a timeout."""

    def __init__(self, capacity: int | None = None) -> None:
        self.responses: list[pb.CoordinateResponse] = []
        self.capacity = capacity
        self.closed = False
        self.close_error: str | None = None
        self.close_calls = 0
        self._changed = asyncio.Event()

    def send(self, resp: pb.CoordinateResponse) -> bool:
        if self.closed:
            return True
        if self.capacity is not None and len(self.responses) >= self.capacity:
            return False
        self.responses.append(resp)
        self._changed.set()
        return True

    def close(self, error: str | None = None) -> None:
        self.close_calls += 1
        self.closed = True
        self.close_error = error
        self._changed.set()

    async def wait_for(self, pred: Callable[[], bool], what: str = "condition",
                       timeout: float = WAIT) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not pred():
            left = deadline - loop.time()
            if left <= 0:
                raise AssertionError(f"timed out waiting for {what}; got {self.summary()}")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), left)
            except TimeoutError:
                pass

    # views ---------------------------------------------------------------
    def updates(self) -> list[PU]:
        return [u for r in self.responses for u in r.peer_updates]

    def about(self, peer: uuid.UUID) -> list[PU]:
        return [u for u in self.updates() if u.id == peer.bytes]

    def kinds_about(self, peer: uuid.UUID) -> list[tuple[str, str]]:
        return [(KindName(u.kind), u.reason) for u in self.about(peer)]

    def nodes_about(self, peer: uuid.UUID) -> list[int]:
        """Node ids received about ``peer``, consecutive repeats collapsed."""
        out: list[int] = []
        for u in self.about(peer):
            if u.kind == PU.NODE and (not out or out[-1] != u.node.id):
                out.append(u.node.id)
        return out

    def last_about(self, peer: uuid.UUID) -> PU | None:
        a = self.about(peer)
        return a[-1] if a else None

    def errors(self) -> list[str]:
        return [r.error for r in self.responses if r.error]

    def summary(self) -> list[tuple[str, str, str]]:
        return [(str(uuid.UUID(bytes=u.id))[:8], KindName(u.kind), u.reason) for u in self.updates()] + [
            ("error", e, "") for e in self.errors()
        ] + ([("closed", str(self.close_error), "")] if self.closed else [])

    # conditions ----------------------------------------------------------
    async def wait_node(self, peer: uuid.UUID, node_id: int, reason: str | None = None) -> PU:
        def ok() -> bool:
            u = self.last_about(peer)
            return u is not None and u.kind == PU.NODE and u.node.id == node_id and (
                reason is None or u.reason == reason
            )

        await self.wait_for(ok, f"NODE {node_id} about {peer}")
        u = self.last_about(peer)
        assert u is not None
        return u

    async def wait_kind(self, peer: uuid.UUID, kind: int, reason: str | None = None) -> None:
        def ok() -> bool:
            u = self.last_about(peer)
            return u is not None and u.kind == kind and (reason is None or u.reason == reason)

        await self.wait_for(ok, f"{KindName(kind)} {reason} about {peer}")

    async def wait_closed(self) -> None:
        await self.wait_for(lambda: self.closed, "sink closed")


class CoordLike(Protocol):
    def connect(self, peer_id: uuid.UUID, name: str, sink: PeerSink) -> None: ...
    def handle(self, peer_id: uuid.UUID, sink: PeerSink, req: pb.CoordinateRequest) -> None: ...
    def lost(self, peer_id: uuid.UUID, sink: PeerSink, error: str | None = None) -> None: ...
    def close(self) -> None: ...
    async def tunnels_from(self, peer_id: uuid.UUID) -> set[uuid.UUID]: ...
    async def revoke_tunnels(self, peer_id: uuid.UUID, dsts: list[uuid.UUID]) -> None: ...


class Backend(Protocol):
    """What a coordinator implementation provides to the cases."""

    replicas: int
    transport: bool
    """True if the verbs reach the coordinator through a transport (effects arrive later)."""

    def coord(self, i: int) -> CoordLike: ...

    async def settle(self) -> None:
        """Return once every request handled so far is durably applied."""
        ...


class Peer:
    def __init__(self, net: Net, name: str, peer_id: uuid.UUID, replica: int, sink: RecSink) -> None:
        self.net = net
        self.name = name
        self.id = peer_id
        self.replica = replica
        self.sink = sink

    @property
    def coord(self) -> CoordLike:
        return self.net.backend.coord(self.replica)

    def req(self, r: pb.CoordinateRequest) -> None:
        self.coord.handle(self.id, self.sink, r)

    def update(self, n: pb.Node) -> None:
        self.req(Req(update_self=Req.UpdateSelf(node=n)))

    def add(self, dst: Peer | uuid.UUID) -> None:
        d = dst.id if isinstance(dst, Peer) else dst
        self.req(Req(add_tunnel=Req.Tunnel(id=d.bytes)))

    def remove(self, dst: Peer) -> None:
        self.req(Req(remove_tunnel=Req.Tunnel(id=dst.id.bytes)))

    def rfh(self, *dsts: Peer | uuid.UUID) -> None:
        ids = [d.id if isinstance(d, Peer) else d for d in dsts]
        self.req(Req(ready_for_handshake=[Req.ReadyForHandshake(id=i.bytes) for i in ids]))

    def disconnect(self) -> None:
        self.req(Req(disconnect=Req.Disconnect()))

    def lost(self, error: str | None = None) -> None:
        self.coord.lost(self.id, self.sink, error)


class Net:
    """Named peers on a backend (see module docstring)."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self._next = 0

    def join(
        self,
        name: str,
        n: pb.Node | None = None,
        *,
        replica: int | None = None,
        peer_id: uuid.UUID | None = None,
        capacity: int | None = None,
    ) -> Peer:
        if replica is None:
            replica = self._next
            self._next += 1
        replica %= self.backend.replicas
        sink = RecSink(capacity)
        p = Peer(self, name, peer_id or uuid.uuid4(), replica, sink)
        p.coord.connect(p.id, name, sink)
        if n is not None:
            p.update(n)
        return p

    async def settle(self) -> None:
        await self.backend.settle()

    async def closed(self, sink: RecSink) -> None:
        """Wait until ``sink`` is closed; a verb backend must have closed it already."""
        if not self.backend.transport:
            assert sink.closed, f"the verb returned without closing the sink: {sink.summary()}"
        await sink.wait_closed()


# ---------------------------------------------------------------------- cases


async def case_add_tunnel_exchanges_nodes(net: Net) -> None:
    agent = net.join("agent", node(1))
    client = net.join("client", node(2))
    await net.settle()
    client.add(agent)
    # Across replicas the first NODE may be computed from a node notification that
    # arrives after the tunnel row is already visible, so it carries that trigger's
    # reason ("node update"); one process always says "add tunnel".
    ok = {"add tunnel"} if net.backend.replicas == 1 else {"add tunnel", "node update"}
    for sink, about, n in ((client.sink, agent.id, 1), (agent.sink, client.id, 2)):
        u = await sink.wait_node(about, n)
        assert u.reason in ok, (u.reason, ok)


async def case_tunnel_to_offline_peer_then_init(net: Net) -> None:
    client = net.join("client", node(2))
    agent_id = uuid.uuid4()
    client.add(agent_id)
    await net.settle()
    agent = net.join("agent", peer_id=agent_id)
    await agent.sink.wait_node(client.id, 2, "init")
    assert agent.sink.responses[0].peer_updates[0].reason == "init"
    agent.update(node(1))
    await client.sink.wait_node(agent.id, 1, "node update")


async def case_node_updates_fan_out(net: Net) -> None:
    agent = net.join("agent", node(1))
    clients = [net.join(f"c{i}", node(10 + i)) for i in range(3)]
    for c in clients:
        c.add(agent)
    for c in clients:
        await c.sink.wait_node(agent.id, 1)
    await agent.sink.wait_for(
        lambda: all(agent.sink.last_about(c.id) is not None for c in clients), "3 client nodes"
    )
    agent.update(node(2))
    # Across replicas a late tunnel notification may be processed with the node
    # update and lend it its reason ("add tunnel"); the node itself is the new one.
    ok = {"node update"} if net.backend.replicas == 1 else {"node update", "add tunnel"}
    for c in clients:
        u = await c.sink.wait_node(agent.id, 2)
        assert u.reason in ok, (u.reason, ok)
        assert c.sink.nodes_about(agent.id) == [1, 2]


async def case_identical_node_suppressed(net: Net) -> None:
    agent = net.join("agent", node(1))
    client = net.join("client", node(2))
    client.add(agent)
    await client.sink.wait_node(agent.id, 1)
    agent.update(node(1))
    await net.settle()
    agent.update(node(3))
    await client.sink.wait_node(agent.id, 3)
    ids = [u.node.id for u in client.sink.about(agent.id)]
    assert ids == [1, 3], ids


async def case_remove_tunnel_disconnects_both(net: Net) -> None:
    agent = net.join("agent", node(1))
    client = net.join("client", node(2))
    client.add(agent)
    await client.sink.wait_node(agent.id, 1)
    await agent.sink.wait_node(client.id, 2)
    client.remove(agent)
    await client.sink.wait_kind(agent.id, PU.DISCONNECTED, "remove tunnel")
    await agent.sink.wait_kind(client.id, PU.DISCONNECTED, "remove tunnel")


async def case_reverse_tunnel_keeps_view(net: Net) -> None:
    a = net.join("a", node(1))
    b = net.join("b", node(2))
    a.add(b)
    b.add(a)
    await a.sink.wait_node(b.id, 2)
    await b.sink.wait_node(a.id, 1)
    await net.settle()
    a.remove(b)
    await net.settle()
    b.update(node(3))  # marker
    await a.sink.wait_node(b.id, 3)
    assert ("DISCONNECTED", "remove tunnel") not in a.sink.kinds_about(b.id)
    assert ("DISCONNECTED", "remove tunnel") not in b.sink.kinds_about(a.id)


async def case_graceful_disconnect(net: Net) -> None:
    agent = net.join("agent", node(1))
    client = net.join("client", node(2))
    client.add(agent)
    await agent.sink.wait_node(client.id, 2)
    await client.sink.wait_node(agent.id, 1)
    client.disconnect()
    await net.closed(client.sink)
    assert client.sink.close_error is None
    await agent.sink.wait_kind(client.id, PU.DISCONNECTED, "graceful disconnect")


async def case_lost_peer(net: Net) -> None:
    agent = net.join("agent", node(1))
    client = net.join("client", node(2))
    client.add(agent)
    await client.sink.wait_node(agent.id, 1)
    agent.lost("boom")
    await net.closed(agent.sink)
    assert agent.sink.close_error == "boom"
    await client.sink.wait_kind(agent.id, PU.LOST, "lost")


async def case_gone_never_announced_is_suppressed(net: Net) -> None:
    client = net.join("client", node(9))
    silent = net.join("silent")  # never sends a node
    marker = net.join("marker", node(1))
    client.add(silent)
    client.add(marker)
    await client.sink.wait_node(marker.id, 1)
    silent.disconnect()
    await net.settle()
    marker.update(node(2))
    await client.sink.wait_node(marker.id, 2)
    assert client.sink.about(silent.id) == []


async def case_ready_for_handshake(net: Net) -> None:
    agent = net.join("agent", node(1))
    client = net.join("client", node(2))
    client.add(agent)
    await agent.sink.wait_node(client.id, 2)
    agent.rfh(client)
    # Across replicas the RFH may overtake the agent's NODE (clients remember an RFH
    # until the node arrives), so look for it anywhere in what the client received.
    def rfhs() -> list[PU]:
        return [u for u in client.sink.about(agent.id) if u.kind == PU.READY_FOR_HANDSHAKE]

    await client.sink.wait_for(lambda: bool(rfhs()), f"READY_FOR_HANDSHAKE about {agent.id}")
    assert all(not u.HasField("node") for u in rfhs())


async def case_ready_for_handshake_without_tunnel(net: Net) -> None:
    agent = net.join("agent", node(1))
    stranger = net.join("stranger", node(2))
    agent.rfh(stranger)
    want = f'ready for handshake error: you do not share a tunnel with "{stranger.id}"'
    await agent.sink.wait_for(lambda: want in agent.sink.errors(), "RFH error")
    agent.rfh(agent)
    want_self = f'ready for handshake error: you do not share a tunnel with "{agent.id}"'
    await agent.sink.wait_for(lambda: want_self in agent.sink.errors(), "self RFH error")
    assert not agent.sink.closed
    assert stranger.sink.about(agent.id) == []


async def case_self_tunnel_ignored(net: Net) -> None:
    a = net.join("a", node(1))
    marker = net.join("m", node(5))
    a.add(a)
    a.add(marker)
    await a.sink.wait_node(marker.id, 5)
    await net.settle()
    a.update(node(2))
    await marker.sink.wait_node(a.id, 2)
    assert a.sink.about(a.id) == []


async def case_duplicate_id_replaces_connection(net: Net) -> None:
    agent = net.join("agent", node(1))
    client = net.join("client", node(2))
    client.add(agent)
    await agent.sink.wait_node(client.id, 2)
    await net.settle()
    first = agent.sink
    again = net.join("agent", replica=agent.replica, peer_id=agent.id)
    await net.closed(first)
    assert first.close_error == CLOSE_ERR_OVERWRITTEN
    await again.sink.wait_node(client.id, 2, "init")
    again.update(node(7))
    await client.sink.wait_node(agent.id, 7)
    kinds = [k for k, _ in client.sink.kinds_about(agent.id)]
    assert "LOST" not in kinds and "DISCONNECTED" not in kinds


async def case_lost_then_back_is_lost_then_node(net: Net) -> None:
    """A client losing its stream and coming back with the same ID (resume)."""
    agent = net.join("agent", node(1))
    client = net.join("client", node(2))
    client.add(agent)
    await agent.sink.wait_node(client.id, 2)
    client.lost()
    await agent.sink.wait_kind(client.id, PU.LOST, "lost")
    back = net.join("client", peer_id=client.id, replica=client.replica + 1)
    back.add(agent)
    back.update(node(3))
    await agent.sink.wait_node(client.id, 3)
    await back.sink.wait_node(agent.id, 1)
    kinds = [k for k, _ in agent.sink.kinds_about(client.id)]
    assert kinds == ["NODE", "LOST", "NODE"], kinds


async def case_close_reports_coordinator_close(net: Net) -> None:
    agent = net.join("agent", node(1), replica=0)
    client = net.join("client", node(2), replica=1)
    client.add(agent)
    await client.sink.wait_node(agent.id, 1)
    await agent.sink.wait_node(client.id, 2)
    agent.coord.close()
    await net.closed(agent.sink)
    assert agent.sink.close_error == CLOSE_ERR_COORDINATOR_CLOSE
    if client.replica == agent.replica:
        await client.sink.wait_kind(agent.id, PU.LOST, "coordinator close")
    else:
        # Across replicas the kind is what matters: a replica that resynchronises
        # (e.g. because the set of live replicas changed) between the closing
        # replica's commit and its close notification reads a plain lost row and
        # reports LOST "lost"; otherwise it reports "coordinator close".
        await client.sink.wait_kind(agent.id, PU.LOST)
        last = client.sink.last_about(agent.id)
        assert last is not None and last.reason in ("coordinator close", "lost")


# Over a transport the caller of connect is a client on the other side of a socket:
# the refusal can only arrive on its stream, never as an exception raised in the
# caller. test_conformance.py checks that refusal for the transport backends
# (the stream ends with CoordinatorClosed's text).
@skip_on(TRANSPORT_BACKENDS, "connect raising CoordinatorClosed is a coordinator-verb contract")
async def case_connect_after_close_raises(net: Net) -> None:
    agent = net.join("agent", node(1), replica=0)
    await net.settle()
    agent.coord.close()
    await net.closed(agent.sink)
    try:
        agent.coord.connect(uuid.uuid4(), "late", RecSink())
    except CoordinatorClosed:
        pass
    else:
        raise AssertionError("connect after close must raise CoordinatorClosed")


async def case_big_init_is_chunked(net: Net) -> None:
    n = MAX_UPDATES_PER_RESPONSE + 76
    client = net.join("client", node(1), replica=0)
    agents = [net.join(f"a{i}", node(100 + i), replica=1) for i in range(n)]
    for a in agents:
        client.add(a)
    await client.sink.wait_for(
        lambda: len({u.id for u in client.sink.updates() if u.kind == PU.NODE}) == n, "all nodes"
    )
    await net.settle()
    again = net.join("client", replica=0, peer_id=client.id)
    await again.sink.wait_for(lambda: len(again.sink.updates()) >= n, "init batch")
    sizes = [len(r.peer_updates) for r in again.sink.responses]
    assert all(s <= MAX_UPDATES_PER_RESPONSE for s in sizes), sizes
    assert len(sizes) == 2, sizes
    assert {u.reason for u in again.sink.updates()} == {"init"}
    assert all(r.ByteSize() < 4 * 1024 * 1024 for r in again.sink.responses)


@skip_on(TRANSPORT_BACKENDS, "LimitExceeded raised by the verb and tunnels_from() are "
         "coordinator-verb contracts (the transport form is in test_hardening.py)")
async def case_tunnel_cap(net: Net) -> None:
    """AddTunnel beyond max_tunnels_per_peer raises LimitExceeded; nothing is applied."""
    cap = CASE_LIMITS.max_tunnels_per_peer
    client = net.join("client", node(1))
    dsts = [uuid.uuid4() for _ in range(cap)]
    for d in dsts:
        client.add(d)
    client.add(dsts[0])  # re-adding a recorded tunnel is fine
    client.add(client.id)  # self-tunnels are ignored and never count
    extra = uuid.uuid4()
    try:
        client.add(extra)
    except LimitExceeded as exc:
        assert str(exc) == (
            f"add_tunnel refused: this peer already has {cap} tunnels; at most {cap} are "
            "allowed (max_tunnels_per_peer)"
        )
    else:
        raise AssertionError("AddTunnel over the cap must raise LimitExceeded")
    await net.settle()
    assert await client.coord.tunnels_from(client.id) == set(dsts)
    client.req(Req(remove_tunnel=Req.Tunnel(id=dsts[0].bytes)))
    client.add(extra)  # room again
    await net.settle()
    assert await client.coord.tunnels_from(client.id) == set(dsts[1:]) | {extra}
    assert not client.sink.closed


@skip_on(TRANSPORT_BACKENDS, "drives the coordinator's revoke_tunnels()/tunnels_from() "
         "directly (the service's re-authorization over gRPC is in test_hardening.py)")
async def case_revoke_inherited_tunnels(net: Net) -> None:
    """What the service does before a replacing connection registers: the refused
    inherited tunnels are revoked (both ends hear DISCONNECTED), the rest inherited."""
    a = net.join("a", node(1))
    b = net.join("b", node(2))
    client = net.join("client", node(3))
    client.add(a)
    client.add(b)
    for p, n in ((a, 1), (b, 2)):
        await client.sink.wait_node(p.id, n)
        await p.sink.wait_node(client.id, 3)
    await net.settle()
    coord = client.coord
    assert await coord.tunnels_from(client.id) == {a.id, b.id}
    await coord.revoke_tunnels(client.id, [b.id])
    await b.sink.wait_kind(client.id, PU.DISCONNECTED, "remove tunnel")
    await client.sink.wait_kind(b.id, PU.DISCONNECTED, "remove tunnel")
    assert await coord.tunnels_from(client.id) == {a.id}
    again = net.join("client", replica=client.replica, peer_id=client.id)
    await again.sink.wait_node(a.id, 1, "init")
    await net.settle()
    a.update(node(4))  # marker
    await again.sink.wait_node(a.id, 4)
    assert again.sink.about(b.id) == []
    assert [k for k, _ in a.sink.kinds_about(client.id)] == ["NODE"]


CASES: list[Case] = [
    case_add_tunnel_exchanges_nodes,
    case_tunnel_to_offline_peer_then_init,
    case_node_updates_fan_out,
    case_identical_node_suppressed,
    case_remove_tunnel_disconnects_both,
    case_reverse_tunnel_keeps_view,
    case_graceful_disconnect,
    case_lost_peer,
    case_gone_never_announced_is_suppressed,
    case_ready_for_handshake,
    case_ready_for_handshake_without_tunnel,
    case_self_tunnel_ignored,
    case_duplicate_id_replaces_connection,
    case_lost_then_back_is_lost_then_node,
    case_close_reports_coordinator_close,
    case_connect_after_close_raises,
    case_big_init_is_chunked,
    case_tunnel_cap,
    case_revoke_inherited_tunnels,
]
