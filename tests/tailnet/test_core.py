"""Behaviour of the pure coordinator core (spec coordinator.md §2.4–§2.9)."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from tailnet.core import (
    CLOSE_ERR_COORDINATOR_CLOSE,
    CLOSE_ERR_FAILED_UPDATE,
    CLOSE_ERR_OVERWRITTEN,
    MAX_UPDATES_PER_RESPONSE,
    Coordinator,
    CoordinatorClosed,
    RequestError,
    validate_request,
)
from tailnet.v2 import tailnet_pb2 as pb

Req = pb.CoordinateRequest
PU = pb.CoordinateResponse.PeerUpdate


def node(n: int, **kw: Any) -> pb.Node:
    return pb.Node(id=n, preferred_derp=999, **kw)


def upd(n: pb.Node) -> Req:
    return Req(update_self=Req.UpdateSelf(node=n))


def add(dst: uuid.UUID) -> Req:
    return Req(add_tunnel=Req.Tunnel(id=dst.bytes))


def rm(dst: uuid.UUID) -> Req:
    return Req(remove_tunnel=Req.Tunnel(id=dst.bytes))


def rfh(*ids: uuid.UUID) -> Req:
    return Req(ready_for_handshake=[Req.ReadyForHandshake(id=i.bytes) for i in ids])


DISC = Req(disconnect=Req.Disconnect())


class Net:
    """Tiny harness: named peers with fake sinks on one Coordinator."""

    def __init__(self, coord: Coordinator, make_sink: Any) -> None:
        self.c = coord
        self.make_sink = make_sink
        self.ids: dict[str, uuid.UUID] = {}
        self.sinks: dict[str, Any] = {}

    def join(self, name: str, n: pb.Node | None = None, capacity: int | None = None) -> Any:
        pid = self.ids.setdefault(name, uuid.uuid4())
        sink = self.make_sink(capacity)
        self.sinks[name] = sink
        self.c.connect(pid, name, sink)
        if n is not None:
            self.c.handle(pid, sink, upd(n))
        return sink

    def req(self, name: str, r: Req) -> None:
        self.c.handle(self.ids[name], self.sinks[name], r)

    def lost(self, name: str, error: str | None = None) -> None:
        self.c.lost(self.ids[name], self.sinks[name], error)

    def clear(self) -> None:
        for s in self.sinks.values():
            s.clear()


@pytest.fixture
def net(core_coord: Coordinator, core_sink: Any) -> Net:
    return Net(core_coord, core_sink)


# --------------------------------------------------------------------------- init


def test_init_batches_connected_tunnel_peers_with_nodes(net: Net) -> None:
    agent_id = net.ids.setdefault("agent", uuid.uuid4())
    for name in ("c1", "c2", "c3"):
        net.join(name, node(1) if name != "c3" else None)
        net.req(name, add(agent_id))
    net.join("other", node(9))  # no tunnel
    agent = net.join("agent")
    assert len(agent.responses) == 1, "init is ONE batched response"
    got = {(a, k, r) for a, k, r in agent.summary()}
    assert got == {(net.ids["c1"], "NODE", "init"), (net.ids["c2"], "NODE", "init")}
    # nobody else is told anything on connect
    assert all(not net.sinks[n].responses for n in ("c1", "c2", "c3", "other"))


def test_init_empty_sends_nothing(net: Net) -> None:
    assert net.join("lonely").responses == []


def test_init_is_chunked_above_limit(net: Net) -> None:
    agent_id = net.ids.setdefault("agent", uuid.uuid4())
    n = MAX_UPDATES_PER_RESPONSE + 5
    for i in range(n):
        net.join(f"c{i}", node(i))
        net.req(f"c{i}", add(agent_id))
    agent = net.join("agent")
    assert [len(r.peer_updates) for r in agent.responses] == [MAX_UPDATES_PER_RESPONSE, 5]


# --------------------------------------------------------------------------- update self


def test_update_self_fans_out_to_tunnel_peers_both_directions(net: Net) -> None:
    net.join("agent", node(1))
    net.join("client", node(2))
    net.join("stranger", node(3))
    net.req("client", add(net.ids["agent"]))
    net.clear()
    net.req("agent", upd(node(10)))
    assert net.sinks["client"].summary() == [(net.ids["agent"], "NODE", "node update")]
    assert net.sinks["client"].updates()[0].node.id == 10
    net.req("client", upd(node(20)))
    assert net.sinks["agent"].summary() == [(net.ids["client"], "NODE", "node update")]
    assert net.sinks["stranger"].responses == []
    assert net.c.node_of(net.ids["agent"]) == node(10)


def test_each_node_update_in_its_own_response(net: Net) -> None:
    net.join("agent", node(1))
    for name in ("c1", "c2"):
        net.join(name)
        net.req(name, add(net.ids["agent"]))
    net.clear()
    net.req("agent", upd(node(5)))
    for name in ("c1", "c2"):
        assert len(net.sinks[name].responses) == 1
        assert len(net.sinks[name].responses[0].peer_updates) == 1


def test_identical_node_is_deduplicated(net: Net) -> None:
    n = node(1, derp_latency={"999-v4": 0.1, "1-v4": 0.2, "2-v6": 0.3}, endpoints=["1.2.3.4:5"])
    net.join("agent", n)
    net.join("client")
    net.req("client", add(net.ids["agent"]))
    assert len(net.sinks["client"].updates()) == 1
    for _ in range(5):
        # rebuilt objects with the same content (maps inserted in other orders)
        again = node(1, endpoints=["1.2.3.4:5"])
        for k in ("2-v6", "999-v4", "1-v4"):
            again.derp_latency[k] = n.derp_latency[k]
        net.req("agent", upd(again))
    assert len(net.sinks["client"].updates()) == 1
    assert net.c.stats().updates_suppressed >= 5
    net.req("agent", upd(node(2)))
    assert len(net.sinks["client"].updates()) == 2


def test_update_self_stores_a_copy(net: Net) -> None:
    n = node(1)
    net.join("agent", n)
    n.id = 77
    assert net.c.node_of(net.ids["agent"]) == node(1)


# --------------------------------------------------------------------------- tunnels


def test_add_tunnel_to_offline_peer_then_it_connects(net: Net) -> None:
    agent_id = net.ids.setdefault("agent", uuid.uuid4())
    client = net.join("client", node(2))
    net.req("client", add(agent_id))
    assert (net.ids["client"], agent_id) in net.c.tunnels()
    assert client.responses == []
    agent = net.join("agent")
    assert agent.summary() == [(net.ids["client"], "NODE", "init")]
    assert client.responses == []  # agent has no node yet
    net.req("agent", upd(node(1)))
    assert client.summary() == [(agent_id, "NODE", "node update")]


def test_add_tunnel_both_connected_exchanges_nodes(net: Net) -> None:
    net.join("agent", node(1))
    net.join("client", node(2))
    net.req("client", add(net.ids["agent"]))
    assert net.sinks["client"].summary() == [(net.ids["agent"], "NODE", "add tunnel")]
    assert net.sinks["agent"].summary() == [(net.ids["client"], "NODE", "add tunnel")]


def test_add_tunnel_without_nodes_sends_nothing(net: Net) -> None:
    net.join("agent")
    net.join("client")
    net.req("client", add(net.ids["agent"]))
    assert net.sinks["agent"].responses == [] and net.sinks["client"].responses == []
    # only the side that has a node is announced
    net.req("client", rm(net.ids["agent"]))
    net.req("agent", upd(node(1)))
    net.req("client", add(net.ids["agent"]))
    assert net.sinks["client"].summary() == [(net.ids["agent"], "NODE", "add tunnel")]
    assert net.sinks["agent"].responses == []


def test_update_then_add_tunnel_in_one_request(net: Net) -> None:
    net.join("agent", node(1))
    net.join("client")
    r = upd(node(2))
    r.add_tunnel.id = net.ids["agent"].bytes
    net.req("client", r)
    assert net.sinks["agent"].summary() == [(net.ids["client"], "NODE", "add tunnel")]
    assert net.sinks["client"].summary() == [(net.ids["agent"], "NODE", "add tunnel")]


def test_remove_tunnel_disconnects_both_sides(net: Net) -> None:
    net.join("agent", node(1))
    net.join("client", node(2))
    net.req("client", add(net.ids["agent"]))
    net.clear()
    net.req("client", rm(net.ids["agent"]))
    assert net.sinks["client"].summary() == [(net.ids["agent"], "DISCONNECTED", "remove tunnel")]
    assert net.sinks["agent"].summary() == [(net.ids["client"], "DISCONNECTED", "remove tunnel")]
    assert net.c.tunnels() == []
    net.clear()
    net.req("agent", upd(node(5)))
    assert net.sinks["client"].responses == []


def test_remove_tunnel_never_announced_is_suppressed(net: Net) -> None:
    net.join("agent")
    net.join("client", node(2))
    net.req("client", add(net.ids["agent"]))
    net.clear()
    net.req("client", rm(net.ids["agent"]))
    # client was never told about the agent (no node); agent was told about client
    assert net.sinks["client"].responses == []
    assert net.sinks["agent"].summary() == [(net.ids["client"], "DISCONNECTED", "remove tunnel")]
    net.clear()
    net.req("client", rm(net.ids["agent"]))  # removing again: nothing more
    assert net.sinks["client"].responses == [] and net.sinks["agent"].responses == []


def test_remove_tunnel_keeps_views_if_reverse_tunnel_exists(net: Net) -> None:
    net.join("a", node(1))
    net.join("b", node(2))
    net.req("a", add(net.ids["b"]))
    net.req("b", add(net.ids["a"]))
    net.clear()
    net.req("a", rm(net.ids["b"]))
    assert net.sinks["a"].responses == [] and net.sinks["b"].responses == []
    assert net.c.shares_tunnel(net.ids["a"], net.ids["b"])
    net.req("b", upd(node(3)))
    assert net.sinks["a"].summary() == [(net.ids["b"], "NODE", "node update")]


def test_self_tunnel_is_ignored(net: Net) -> None:
    net.join("a", node(1))
    net.req("a", add(net.ids["a"]))
    assert net.c.tunnels() == []
    net.req("a", upd(node(2)))
    net.req("a", rm(net.ids["a"]))
    assert net.sinks["a"].responses == []


# --------------------------------------------------------------------------- leaving


def test_graceful_disconnect(net: Net) -> None:
    agent = net.join("agent", node(1))
    client = net.join("client", node(2))
    net.req("client", add(net.ids["agent"]))
    net.clear()
    net.req("client", DISC)
    assert agent.summary() == [(net.ids["client"], "DISCONNECTED", "graceful disconnect")]
    assert client.closed and client.close_error is None and client.close_calls == 1
    assert not net.c.is_connected(net.ids["client"])
    assert net.c.tunnels() == []  # src-tunnels deleted
    # later requests on the dead connection are ignored
    net.req("client", upd(node(7)))
    net.lost("client")
    assert agent.summary() == [(net.ids["client"], "DISCONNECTED", "graceful disconnect")]
    assert client.close_calls == 1 and not client.sent_after_close


def test_disconnect_stops_processing_rest_of_request(net: Net) -> None:
    net.join("agent", node(1))
    net.join("client", node(2))
    net.req("client", add(net.ids["agent"]))
    net.clear()
    r = Req(
        disconnect=Req.Disconnect(),
        ready_for_handshake=[Req.ReadyForHandshake(id=net.ids["agent"].bytes)],
    )
    net.req("client", r)
    assert [k for _, k, _ in net.sinks["agent"].summary()] == ["DISCONNECTED"]


def test_lost_sends_lost_and_keeps_dst_tunnels(net: Net) -> None:
    agent = net.join("agent", node(1))
    client = net.join("client", node(2))
    net.req("client", add(net.ids["agent"]))
    net.clear()
    net.lost("agent", "stream reset")
    assert client.summary() == [(net.ids["agent"], "LOST", "lost")]
    assert agent.closed and agent.close_error == "stream reset"
    assert net.c.tunnels() == [(net.ids["client"], net.ids["agent"])]
    # agent reconnects with the SAME node: client is re-told (LOST cleared memory)
    agent2 = net.join("agent")
    assert agent2.summary() == [(net.ids["client"], "NODE", "init")]
    net.req("agent", upd(node(1)))
    assert client.summary()[-1] == (net.ids["agent"], "NODE", "node update")


def test_lost_of_never_announced_peer_is_suppressed(net: Net) -> None:
    net.join("agent", node(1))
    client = net.join("client")
    net.req("client", add(net.ids["agent"]))
    net.clear()
    net.lost("client")
    assert net.sinks["agent"].responses == []
    assert client.closed


# --------------------------------------------------------------------------- RFH


def test_rfh_without_tunnel_is_non_fatal_error(net: Net) -> None:
    agent = net.join("agent", node(1))
    other = net.join("other", node(2))
    net.req("agent", rfh(net.ids["other"]))
    assert agent.errors() == [
        f'ready for handshake error: you do not share a tunnel with "{net.ids["other"]}"'
    ]
    assert not agent.closed and net.c.is_connected(net.ids["agent"])
    assert other.responses == []


def test_rfh_forwarded_along_tunnel_not_deduped(net: Net) -> None:
    net.join("agent", node(1))
    client = net.join("client", node(2))
    net.req("client", add(net.ids["agent"]))
    net.clear()
    net.req("agent", rfh(net.ids["client"]))
    net.req("agent", rfh(net.ids["client"]))
    assert client.summary() == [(net.ids["agent"], "READY_FOR_HANDSHAKE", "")] * 2
    assert not client.updates()[0].HasField("node")


def test_rfh_to_offline_tunnel_peer_is_dropped(net: Net) -> None:
    agent = net.join("agent", node(1))
    net.join("client", node(2))
    net.req("client", add(net.ids["agent"]))
    net.lost("client")
    net.clear()
    assert net.c.tunnels() == []
    # tunnel gone with the client: error
    net.req("agent", rfh(net.ids["client"]))
    assert len(agent.errors()) == 1
    # tunnel to an offline dst still exists → silently dropped
    agent_id = net.ids["agent"]
    net.join("c2", node(3))
    net.req("c2", add(agent_id))
    net.lost("agent")
    agent2 = net.join("agent")
    agent2.clear()
    c2 = net.ids["c2"]
    net.lost("c2")  # c2 gone: its src-tunnel too
    net.req("agent", rfh(c2))
    assert len(agent2.errors()) == 1


def test_rfh_target_full_tears_down_sender_as_lost(net: Net) -> None:
    agent = net.join("agent")  # no node: the client is never told about it
    client = net.join("client", node(2))
    net.req("client", add(net.ids["agent"]))
    assert client.responses == []
    client.capacity = 0
    agent.clear()
    net.req("agent", rfh(net.ids["client"]))
    assert agent.closed and agent.close_error and "ready for handshake" in agent.close_error
    assert not net.c.is_connected(net.ids["agent"])
    assert net.c.is_connected(net.ids["client"]), "the full target is not evicted"


# --------------------------------------------------------------------------- duplicates


def test_duplicate_id_replaces_old_connection(net: Net) -> None:
    agent = net.join("agent", node(1))
    client1 = net.join("client", node(2))
    net.req("client", add(net.ids["agent"]))
    agent.clear()
    client2 = net.join("client")
    assert client1.closed and client1.close_error == CLOSE_ERR_OVERWRITTEN
    assert agent.responses == [], "nobody is told LOST/DISCONNECTED"
    assert client2.summary() == [(net.ids["agent"], "NODE", "init")]
    assert net.c.tunnels() == [(net.ids["client"], net.ids["agent"])]
    [info] = [p for p in net.c.peers() if p.id == net.ids["client"]]
    assert info.overwrites == 1 and info.node is None
    # the old connection is dead: its requests/loss are ignored
    net.c.handle(net.ids["client"], client1, upd(node(99)))
    net.c.lost(net.ids["client"], client1)
    assert net.c.is_connected(net.ids["client"]) and agent.responses == []
    # same node again from the new connection: agent already has it → suppressed
    net.req("client", upd(node(2)))
    assert agent.responses == []
    net.req("client", upd(node(3)))
    assert agent.summary() == [(net.ids["client"], "NODE", "node update")]
    assert not client1.sent_after_close


# --------------------------------------------------------------------------- slow consumers


def test_full_recipient_is_evicted_others_unaffected(net: Net) -> None:
    net.join("agent", node(1))
    slow = net.join("slow")
    fast = net.join("fast")
    watcher = net.join("watcher", node(4))
    net.req("slow", add(net.ids["agent"]))  # slow now holds 1 response
    net.req("slow", upd(node(2)))
    net.req("watcher", add(net.ids["slow"]))
    net.req("fast", add(net.ids["agent"]))
    net.clear()
    slow.capacity = 0
    net.req("agent", upd(node(10)))
    assert slow.closed and slow.close_error == CLOSE_ERR_FAILED_UPDATE
    assert not net.c.is_connected(net.ids["slow"])
    assert fast.summary() == [(net.ids["agent"], "NODE", "node update")]
    assert watcher.summary() == [(net.ids["slow"], "DISCONNECTED", "failed update")]
    assert net.sinks["agent"].summary() == [(net.ids["slow"], "DISCONNECTED", "failed update")]
    assert net.c.stats().evictions == 1
    assert (net.ids["watcher"], net.ids["slow"]) in net.c.tunnels()


def test_eviction_cascade_does_not_break_fanout(net: Net) -> None:
    net.join("agent", node(1))
    sinks = []
    for i in range(6):
        s = net.join(f"c{i}", node(100 + i))
        net.req(f"c{i}", add(net.ids["agent"]))
        sinks.append(s)
    net.clear()
    for s in sinks[::2]:
        s.capacity = 0
    net.req("agent", upd(node(2)))
    for i, s in enumerate(sinks):
        if i % 2 == 0:
            assert s.closed and not net.c.is_connected(net.ids[f"c{i}"])
        else:
            assert not s.closed
            assert s.summary() == [(net.ids["agent"], "NODE", "node update")]
    got = {a for a, k, r in net.sinks["agent"].summary() if k == "DISCONNECTED"}
    assert got == {net.ids[f"c{i}"] for i in (0, 2, 4)}


def test_sink_raising_is_evicted(net: Net) -> None:
    net.join("agent", node(1))
    bad = net.join("bad", node(2))
    good = net.join("good")
    net.req("bad", add(net.ids["agent"]))
    net.req("good", add(net.ids["agent"]))

    def boom(resp: pb.CoordinateResponse) -> bool:
        raise OSError("broken")

    bad.send = boom
    net.req("agent", upd(node(3)))
    assert not net.c.is_connected(net.ids["bad"])
    assert good.summary()[-1] == (net.ids["agent"], "NODE", "node update")


def test_init_to_full_new_connection_evicts_it(net: Net) -> None:
    net.join("agent", node(1))
    net.join("client", node(2))
    net.req("client", add(net.ids["agent"]))
    net.clear()
    client2 = net.join("client", capacity=0)
    assert client2.closed and client2.close_error == CLOSE_ERR_FAILED_UPDATE
    # agent knew the old node of "client": it is told DISCONNECTED
    assert net.sinks["agent"].summary() == [(net.ids["client"], "DISCONNECTED", "failed update")]


def test_reentrant_call_from_send_is_refused_and_contained(net: Net) -> None:
    net.join("agent", node(1))
    client = net.join("client", node(2))
    net.req("client", add(net.ids["agent"]))
    errors: list[BaseException] = []

    def reenter(resp: pb.CoordinateResponse) -> bool:
        try:
            net.c.lost(net.ids["client"], client)
        except RuntimeError as exc:
            errors.append(exc)
            raise
        return True

    client.send = reenter
    net.req("agent", upd(node(3)))
    assert errors and not net.c.is_connected(net.ids["client"])


def test_close_callback_may_reenter(net: Net, core_sink: Any) -> None:
    net.join("agent", node(1))
    client = net.join("client", node(2))
    net.req("client", add(net.ids["agent"]))
    calls: list[str] = []
    orig_close = client.close

    def close(error: str | None = None) -> None:
        orig_close(error)
        net.c.lost(net.ids["client"], client)  # stale: must be a no-op
        calls.append("closed")

    client.close = close
    net.req("client", DISC)
    assert calls == ["closed"]


# --------------------------------------------------------------------------- close


def test_close_marks_everyone_lost(net: Net) -> None:
    agent = net.join("agent", node(1))
    client = net.join("client", node(2))
    net.req("client", add(net.ids["agent"]))
    net.clear()
    net.c.close()
    for s in (agent, client):
        assert s.closed and s.close_error == CLOSE_ERR_COORDINATOR_CLOSE
    # Both ends of the tunnel hear LOST about the other, exactly once.
    for s, other in ((agent, "client"), (client, "agent")):
        kinds = s.summary()
        assert kinds == [(net.ids[other], "LOST", "coordinator close")], kinds
    assert net.c.peers() == [] and net.c.closed
    with pytest.raises(CoordinatorClosed):
        net.join("late")
    net.req("agent", upd(node(5)))  # no-op
    net.c.close()  # idempotent
    assert agent.close_calls == 1


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("req", "message"),
    [
        (Req(update_self=Req.UpdateSelf()), "update_self node is required"),
        (Req(add_tunnel=Req.Tunnel(id=b"short")), "add_tunnel.id"),
        (Req(add_tunnel=Req.Tunnel()), "add_tunnel.id"),
        (Req(remove_tunnel=Req.Tunnel(id=b"x" * 17)), "remove_tunnel.id"),
        (
            Req(ready_for_handshake=[Req.ReadyForHandshake(id=b"x" * 16), Req.ReadyForHandshake()]),
            "ready_for_handshake[1].id",
        ),
    ],
)
def test_validate_request_errors(req: Req, message: str) -> None:
    with pytest.raises(RequestError, match=message.replace("[", r"\[").replace("]", r"\]")):
        validate_request(req)


def test_validate_accepts_empty_and_empty_node() -> None:
    validate_request(Req())
    validate_request(Req(update_self=Req.UpdateSelf(node=pb.Node())))
    with pytest.raises(RequestError, match="coordinate request is required"):
        validate_request(None)  # type: ignore[arg-type]


def test_handle_invalid_request_changes_nothing(net: Net) -> None:
    net.join("agent", node(1))
    client = net.join("client", node(2))
    bad = upd(node(3))
    bad.add_tunnel.id = b"123"
    with pytest.raises(RequestError):
        net.req("client", bad)
    assert net.c.node_of(net.ids["client"]) == node(2)
    assert net.c.tunnels() == [] and not client.closed


def test_empty_request_is_noop(net: Net) -> None:
    net.join("agent", node(1))
    net.req("agent", Req())
    assert net.sinks["agent"].responses == []


# --------------------------------------------------------------------------- debug


def test_debug_snapshot_uses_clock(net: Net, core_clock: Any) -> None:
    core_clock.now = 5.0
    net.join("agent", node(1))
    net.join("client")
    core_clock.now = 7.0
    net.req("client", add(net.ids["agent"]))
    infos = {p.name: p for p in net.c.peers()}
    assert infos["agent"].created == 5.0 and infos["agent"].node == node(1)
    assert infos["client"].last_write == 7.0 and infos["agent"].last_write == 5.0
    assert net.c.tunnels() == [(net.ids["client"], net.ids["agent"])]
    assert net.c.tunnel_peers(net.ids["agent"]) == {net.ids["client"]}
    s = net.c.stats()
    assert (s.peers, s.tunnels) == (2, 1)
