"""ReplicaMesh: mesh links that follow the live replicas (in-process relays on 127.0.0.1)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest

from derp.client import DerpClient
from derp.events import PacketReceived
from derp.keys import PrivateKey
from derp.mesh import Mesh, parse_mesh_peer
from derp.server import DerpServer, ServerConfig
from tailnet.pg.replicas import Replica
from tailnet.replicamesh import ReplicaMesh

KEY = bytes(range(32))
T = 10.0
IDS = [uuid.UUID(int=i + 1) for i in range(4)]


async def until(cond: object, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + T
    while not cond():  # type: ignore[operator]
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


@pytest.fixture
async def relays() -> AsyncIterator[list[DerpServer]]:
    servers = [DerpServer(ServerConfig(private_key=PrivateKey.generate(), mesh_key=KEY))
               for _ in range(3)]
    for s in servers:
        await s.start("127.0.0.1", 0)
    yield servers
    for s in servers:
        await s.stop(1.0)


def rep(i: int, port: int, region: int = 999) -> Replica:
    return Replica(IDS[i], f"http://127.0.0.1:{port}", region, f"h{i}", 0.0, 1.0)


async def test_links_follow_the_live_replicas(relays: list[DerpServer]) -> None:
    s0, s1, s2 = relays
    static = f"http://127.0.0.1:{s2.port}"
    mesh = Mesh(s0, [parse_mesh_peer(static)], retry_interval=0.1)
    mesh.start()
    changes: list[int] = []
    rm = ReplicaMesh(mesh, IDS[0], 999, on_change=lambda: changes.append(1))
    rm.start()
    k0, k1 = PrivateKey.generate(), PrivateKey.generate()
    c0 = DerpClient(f"http://127.0.0.1:{s0.port}/derp", k0)
    c1 = DerpClient(f"http://127.0.0.1:{s1.port}/derp", k1)
    try:
        # this replica, one in another region, one without a relay URL: only s1 is linked
        others = [Replica(IDS[3], "", 999, "h3", 0.0, 1.0), rep(2, s2.port, region=7)]
        rm.update([rep(0, s0.port), rep(1, s1.port), *others])
        await until(lambda: IDS[1] in rm.links() and rm.links()[IDS[1]].connected, "link to 1")
        await asyncio.gather(c0.connect(), c1.connect())
        await until(lambda: k1.public.raw in mesh.routes, "route to k1")
        await c0.send(k1.public, b"across")
        ev = await asyncio.wait_for(c1.recv(), T)
        assert isinstance(ev, PacketReceived) and ev.data == b"across"
        status = rm.status()
        assert {(x["replica_id"], x["state"]) for x in status} == {(str(IDS[1]), "up"),
                                                                   (None, "up")}
        assert [x["url"] for x in status] == sorted(x["url"] for x in status)
        assert changes
        # Replica 1 no longer live in the database, but its relay answers: kept.
        rounds = rm.rounds
        rm.update([rep(0, s0.port)])
        await until(lambda: rm.rounds > rounds, "one reconciliation")
        assert rm.links()[IDS[1]].connected
        # ... until its relay goes down: removed, with its routes.
        await s1.stop(1.0)
        await until(lambda: IDS[1] not in rm.links(), "link to 1 removed")
        assert k1.public.raw not in mesh.routes
        assert [x["replica_id"] for x in rm.status()] == [None]
        # A replica whose relay URL changes gets a new link.
        rm.update([rep(0, s0.port), rep(2, s2.port)])
        await until(lambda: IDS[2] in rm.links() and rm.links()[IDS[2]].connected, "link to 2")
        old = rm.links()[IDS[2]]
        rm.update([rep(0, s0.port), Replica(IDS[2], static + "/", 999, "h2", 0.0, 1.0)])
        await until(lambda: rm.links().get(IDS[2]) not in (None, old), "new link to 2")
        assert old not in mesh.links
    finally:
        await asyncio.gather(c0.close(), c1.close())
        await rm.stop()
        await mesh.stop()


async def test_link_records_state_and_reason(relays: list[DerpServer]) -> None:
    s0, s1, _ = relays
    mesh = Mesh(s0, [], retry_interval=0.1)
    mesh.start()
    seen: list[bool] = []
    mesh.on_link_change.append(lambda link: seen.append(link.connected))
    try:
        link = mesh.add_peer(parse_mesh_peer(f"http://127.0.0.1:{s1.port}"))
        await until(lambda: link.connected, "link up")
        assert link.last_error is None and link.generation == 1
        up_since = link.since
        await s1.stop(1.0)
        await until(lambda: not link.connected, "link down")
        assert link.last_error and link.since >= up_since
        assert seen[:2] == [True, False]
        await mesh.remove_link(link)
        assert link not in mesh.links
        await mesh.remove_link(link)  # unknown now: no-op
    finally:
        await mesh.stop()
