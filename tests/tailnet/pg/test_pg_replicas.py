"""Replica discovery, the shared mesh key and the node-key index against a real PostgreSQL.

In-process :class:`PgCoordinator` replicas (the process-level behaviour is in
``test_replica_mesh.py``). Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import uuid

import asyncpg  # type: ignore[import-untyped]
import pytest

from tailnet.pg import PgCoordinator, PgCoordinatorConfig, Replica, ReplicaInfo
from tailnet.v2 import tailnet_pb2 as pb

from ..cases import RecSink
from ..pgserver import pg_dsn, pg_server  # noqa: F401  (fixtures)
from .fixtures import Replicas, replicas  # noqa: F401  (fixture)
from .serve import until



async def crash(c: PgCoordinator) -> None:
    """Stop ``c`` as a SIGKILL would: no "stopped" mark, no lost rows, heartbeats end."""
    c._stopped = True
    for t in c._tasks:
        t.cancel()
    await asyncio.gather(*c._tasks, return_exceptions=True)
    if c._listener is not None:
        await c._listener.stop()
    c._pool.terminate()


def key(i: int) -> bytes:
    return b"np" + bytes([i]) * 32


def upd(k: bytes) -> pb.CoordinateRequest:
    return pb.CoordinateRequest(update_self=pb.CoordinateRequest.UpdateSelf(
        node=pb.Node(id=1, key=k, preferred_derp=999)))


async def test_replicas_discover_each_other_and_stop(replicas: Replicas) -> None:
    # A long heartbeat: discovery must come from the notification, not the timer.
    slow = PgCoordinatorConfig(heartbeat_interval=30.0, retry_max=0.3)
    a = await replicas(slow)
    b = await replicas(slow)
    seen: list[tuple[Replica, ...]] = []
    a.add_replica_listener(seen.append)
    await a.register_replica(ReplicaInfo("http://10.0.0.1:3000", 999, "host-a"),
                             mesh_status=lambda: '[{"url":"x"}]')
    assert [r.id for r in a.replicas] == [a.id]
    await b.register_replica(ReplicaInfo("http://10.0.0.2:3000", 999, "host-b"))
    await until(lambda: {r.id for r in a.replicas} == {a.id, b.id}, "A sees B")
    rb = next(r for r in a.replicas if r.id == b.id)
    assert (rb.relay_url, rb.region_id, rb.hostname) == ("http://10.0.0.2:3000", 999, "host-b")
    assert rb.heartbeat_at > 0 and rb.started_at > 0
    ra = next(r for r in await b.fetch_replicas() if r.id == a.id)
    assert ra.mesh_status == '[{"url":"x"}]' and ra.status_at is not None
    # A graceful stop leaves the set at once (notified), long before the expiry.
    await b.stop()
    await until(lambda: {r.id for r in a.replicas} == {a.id}, "B gone after its stop")
    assert [len(s) for s in seen] == [1, 2, 1]


async def test_dead_replica_leaves_the_set(replicas: Replicas) -> None:
    a = await replicas()
    b = await replicas()
    await a.register_replica(ReplicaInfo("http://a", 999, "a"))
    await b.register_replica(ReplicaInfo("http://b", 999, "b"))
    await until(lambda: len(a.replicas) == 2, "both live")
    await crash(b)
    await until(lambda: [r.id for r in a.replicas] == [a.id], "B dead after the expiry")


async def test_mesh_key_is_created_once(pg_dsn: str, replicas: Replicas) -> None:
    coords = [await replicas() for _ in range(3)]
    keys = await asyncio.gather(*(c.derp_mesh_key() for _ in range(4) for c in coords))
    assert len(set(keys)) == 1 and len(keys[0]) == 32
    conn = await asyncpg.connect(pg_dsn)
    try:
        assert await conn.fetchval("SELECT count(*) FROM tailnet_derp_mesh_key") == 1
    finally:
        await conn.close()


async def test_node_keys_of_every_replica(replicas: Replicas) -> None:
    a = await replicas()
    b = await replicas()
    a.track_node_keys()
    assert not a.knows_node_key(key(1))
    p, psink = uuid.uuid4(), RecSink()
    b.connect(p, "p", psink)
    b.handle(p, psink, upd(key(1)))
    await until(lambda: a.knows_node_key(key(1)), "A knows B's peer key")
    b.handle(p, psink, upd(key(2)))
    await until(lambda: a.knows_node_key(key(2)) and not a.knows_node_key(key(1)),
                "the new key replaces the old")
    # The same peer ID moves to A with the same key, then leaves B: still known.
    q = RecSink()
    a.connect(p, "p", q)
    a.handle(p, q, upd(key(2)))
    await a.quiesce()  # A's row is committed before B's LOST (else the marker may overtake it)
    b.lost(p, psink)
    marker, msink = uuid.uuid4(), RecSink()  # notified after the LOST, in commit order
    b.connect(marker, "m", msink)
    b.handle(marker, msink, upd(key(9)))
    await until(lambda: a.knows_node_key(key(9)), "the marker's key")
    assert a.knows_node_key(key(2))
    a.lost(p, q)
    await until(lambda: not a.knows_node_key(key(2)), "a lost peer's key is forgotten")
    # A dead replica's peers are forgotten; a reload after a missed notification agrees.
    r, rsink = uuid.uuid4(), RecSink()
    b.connect(r, "r", rsink)
    b.handle(r, rsink, upd(key(3)))
    await until(lambda: a.knows_node_key(key(3)), "A knows r")
    loads = a.node_key_loads
    a._request_resync_all()
    await until(lambda: a.node_key_loads > loads, "a full reload")
    assert a.knows_node_key(key(3))
    await crash(b)
    await until(lambda: not a.knows_node_key(key(3)), "a dead replica's keys are forgotten")
