"""derp.workers.node: two ACTIVE claims for one key that cross on a link.

Two workers of one host each hold a connection of the same key. When both
connections become the most recently active at the same moment, each worker
sends ACTIVE before it has read the other's. The Lamport stamps in ACTIVE
order the two claims the same way on both ends, so exactly one worker keeps
its connection as the key's receiver and the other steps aside. (Without the
stamps, each worker deferred to the other and both connections received.)

In-process: two DerpServers joined by real WorkerNode links on one event loop.
The two claims are made in one synchronous block, so neither link frame can be
read before both are written.
"""

from __future__ import annotations

from derp.keys import PrivateKey
from derp.server.conn import DerpConnection
from derp.workers.node import WorkerNode

from .conftest import Host, RawClient, make_config, start_host, wait_until


async def _client(h: Host, worker: int, clients: list[RawClient], key: PrivateKey | None = None) -> RawClient:
    c = await RawClient.open(h.servers[worker].port, key)
    clients.append(c)
    await c.handshake()
    await h.known(c.pub, worker)
    return c


async def _barrier(h: Host, clients: list[RawClient]) -> None:
    """Every worker has read everything its sibling wrote before this call: a
    fresh client on each worker is known to the other (links keep order)."""
    for w in (0, 1):
        await _client(h, w, clients)


def _conn(h: Host, worker: int, key: bytes) -> DerpConnection:
    conns = h.servers[worker].relay.connections(key)
    assert len(conns) == 1
    return conns[0]


async def test_crossing_active_claims_leave_exactly_one_receiver(
    hosts: list[Host], clients: list[RawClient]
) -> None:
    h = await start_host(make_config(), 2)
    hosts.append(h)
    key = PrivateKey.generate()
    k = key.public.raw
    k0 = await _client(h, 0, clients, key)
    k1 = await _client(h, 1, clients, key)  # newest: worker 0 steps aside
    s0 = await _client(h, 0, clients)
    s1 = await _client(h, 1, clients)
    r0, r1 = h.servers[0].relay, h.servers[1].relay
    assert r0.is_aside(k) and not r1.is_aside(k)

    # Worker 1 as if it had stepped aside for an earlier claim of worker 0's;
    # then both connections speak in the same instant: two ACTIVE cross.
    n1: WorkerNode = h.nodes[1]
    assert r1.step_aside(k, n1._stand_in(k, n1.links[0]))  # type: ignore[arg-type]
    assert r0.note_activity(k, _conn(h, 0, k))
    assert r1.note_activity(k, _conn(h, 1, k))
    assert not r0.is_aside(k) and not r1.is_aside(k)
    await _barrier(h, clients)

    # Equal stamps: the higher worker index wins, on both ends.
    assert r0.is_aside(k) and not r1.is_aside(k)
    h.check_invariants()
    s0.send_packet(k, b"from w0")
    s1.send_packet(k, b"from w1")
    got = {await k1.recv_packet(), await k1.recv_packet()}
    assert got == {(s0.pub, b"from w0"), (s1.pub, b"from w1")}

    # A later claim beats it: k0 speaks, worker 0 claims with a higher stamp.
    k0.send_packet(s0.pub, b"k0 speaks")
    assert await s0.recv_packet() == (k0.pub, b"k0 speaks")
    await wait_until(lambda: r1.is_aside(k) and not r0.is_aside(k))
    s1.send_packet(k, b"to k0")
    assert await k0.recv_packet() == (s1.pub, b"to k0")
