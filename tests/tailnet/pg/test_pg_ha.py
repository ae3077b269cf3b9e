"""High-availability behaviour of the PostgreSQL coordinator against a real server.

Covers what the shared conformance cases cannot: schema migrations, a replica
in another process killed with SIGKILL, PostgreSQL restarts, a dropped LISTEN
connection, self-fencing when heartbeats fail, resume on another replica through
:class:`TailnetService`, batching, bad notifications and retention cleanup.
Every wait is bounded; polling is only used for conditions with a deadline.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg  # type: ignore[import-untyped]
import pytest

from tailnet.errors import CoordinatorClosed
from tailnet.identity import MD_RESUME_TOKEN, Principal
from tailnet.pg import CLOSE_ERR_UNHEALTHY, PgCoordinator, PgCoordinatorConfig, migrate
from tailnet.pg.payload import CHAN_PEER, MAX_PAYLOAD
from tailnet.resume import ResumeTokenProvider
from tailnet.service import CallContext, StreamIdentity, TailnetService
from tailnet.v2 import tailnet_pb2 as pb

from ..cases import WAIT, RecSink, node
from ..pgserver import PgServer, pg_dsn, pg_server  # noqa: F401  (fixtures)
from .fixtures import Replicas, replicas  # noqa: F401  (fixture)
from .serve import until

PU = pb.CoordinateResponse.PeerUpdate
Req = pb.CoordinateRequest
# Expiry 1.8 s: a replica stalled for a moment on a loaded machine must not read as
# dead (a spurious LOST/NODE flap would break the exact sequences asserted below).
HERE = Path(__file__).resolve().parent


def upd(n: pb.Node) -> Req:
    return Req(update_self=Req.UpdateSelf(node=n))


def add(dst: uuid.UUID) -> Req:
    return Req(add_tunnel=Req.Tunnel(id=dst.bytes))


def join(
    coord: PgCoordinator, n: pb.Node | None = None, peer_id: uuid.UUID | None = None
) -> tuple[uuid.UUID, RecSink]:
    pid = peer_id or uuid.uuid4()
    sink = RecSink()
    coord.connect(pid, "p", sink)
    if n is not None:
        coord.handle(pid, sink, upd(n))
    return pid, sink


async def test_migrations_are_idempotent(pg_dsn: str) -> None:
    conn = await asyncpg.connect(pg_dsn)
    try:
        assert await migrate(conn) == [1, 2]
        assert await migrate(conn) == []
        idx = {r["indexname"] for r in await conn.fetch("SELECT indexname FROM pg_indexes")}
        for name in ("tailnet_peers_coordinator_id_idx", "tailnet_tunnels_src_id_idx",
                     "tailnet_tunnels_dst_id_idx", "tailnet_peers_lost_updated_at_idx"):
            assert name in idx
    finally:
        await conn.close()


async def test_sigkilled_replica_lost_then_node(pg_dsn: str, replicas: Replicas) -> None:
    b = await replicas()
    client, csink = join(b, node(2))
    agent = uuid.uuid4()
    env = dict(os.environ, PYTHONPATH=str(HERE.parents[2]))
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "replica_proc.py"), pg_dsn, "0.3", str(agent), "1"],
        stdout=subprocess.PIPE, env=env,
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), WAIT)
        assert line.startswith(b"READY"), line
        b.handle(client, csink, add(agent))
        await csink.wait_node(agent, 1, "add tunnel")
        proc.send_signal(signal.SIGKILL)
        await csink.wait_kind(agent, PU.LOST, "lost")
        # The agent comes back on the surviving replica: NODE again, never DISCONNECTED.
        join(b, node(3), peer_id=agent)
        await csink.wait_node(agent, 3)
        kinds = [k for k, _ in csink.kinds_about(agent)]
        assert kinds == ["NODE", "LOST", "NODE"], kinds
    finally:
        proc.kill()
        proc.wait()


async def test_postgres_restart_is_survived(pg_server: PgServer, replicas: Replicas) -> None:
    # Slow heartbeats and a long expiry: the outage (however slow the restart is on a
    # loaded machine) must neither fence the replicas nor make either read as dead.
    cfg = PgCoordinatorConfig(heartbeat_interval=5.0, missed_heartbeats=12, retry_max=0.3,
                              listen_probe_interval=1.0)
    a = await replicas(cfg)
    b = await replicas(cfg)
    agent, asink = join(a, node(1))
    client, csink = join(b, node(2))
    b.handle(client, csink, add(agent))
    await csink.wait_node(agent, 1)
    await asink.wait_node(client, 2)
    try:
        pg_server.stop()
        a.handle(agent, asink, upd(node(5)))  # written while the server is down
        await asyncio.sleep(0)  # let the writer attempt (and fail) once
    finally:
        pg_server.start()
    await csink.wait_node(agent, 5)
    b.handle(client, csink, upd(node(6)))
    await asink.wait_node(client, 6)
    assert not asink.closed and not csink.closed
    assert [k for k, _ in csink.kinds_about(agent)] == ["NODE", "NODE"]


async def test_unhealthy_after_failed_heartbeats(pg_server: PgServer, replicas: Replicas) -> None:
    # Fencing counts failed writes (fast while the server is down), not the expiry:
    # a long expiry keeps a's peers alive to b even if a's heartbeats lag after recovery.
    a = await replicas(PgCoordinatorConfig(heartbeat_interval=0.2, missed_heartbeats=50,
                                           retry_max=0.3))
    _, sink = join(a, node(1))
    try:
        pg_server.stop()
        await sink.wait_closed()
        assert sink.close_error == CLOSE_ERR_UNHEALTHY
        assert not a.healthy
        with pytest.raises(CoordinatorClosed, match="coordinator unhealthy"):
            a.connect(uuid.uuid4(), "x", RecSink())
    finally:
        pg_server.start()
    await until(lambda: a.healthy, "healthy again")
    b = await replicas()
    p, psink = join(a, node(7))
    q, qsink = join(b, node(8))
    b.handle(q, qsink, add(p))
    await qsink.wait_node(p, 7)


async def test_dropped_listen_connection_resyncs(pg_dsn: str, replicas: Replicas) -> None:
    a = await replicas()
    b = await replicas()
    agent, asink = join(a, node(1))
    client, csink = join(b, node(2))
    b.handle(client, csink, add(agent))
    await csink.wait_node(agent, 1)
    assert b._listener is not None
    pid = await b._listener.backend_pid()
    conn = await asyncpg.connect(pg_dsn)
    try:
        assert await conn.fetchval("SELECT pg_terminate_backend($1)", pid)
    finally:
        await conn.close()
    a.handle(agent, asink, upd(node(9)))
    await csink.wait_node(agent, 9)
    await until(lambda: b._listener is not None and b._listener.reconnects >= 1, "reconnect")
    assert not csink.closed


async def test_resume_on_another_replica_keeps_id_and_tunnels(replicas: Replicas) -> None:
    a = await replicas()
    b = await replicas()
    resume = ResumeTokenProvider()
    # TailnetService only needs the coordinator verbs here (no auth, no DERP maps).
    svc_a = TailnetService(coordinator=a, authenticator=None, derp_maps=None, resume=resume)  # type: ignore[arg-type]  # noqa: E501
    svc_b = TailnetService(coordinator=b, authenticator=None, derp_maps=None, resume=resume)  # type: ignore[arg-type]  # noqa: E501
    agent, asink = join(b, node(1))
    principal = Principal(kind="control_plane", id=uuid.uuid4(), name="cp")

    Stream = tuple[
        StreamIdentity, asyncio.Queue[Req | None], list[pb.CoordinateResponse], asyncio.Task[None]
    ]

    async def stream(svc: TailnetService, token: str | None) -> Stream:
        md = {MD_RESUME_TOKEN: token} if token else {}
        ident = await svc.resolve_stream(CallContext(principal, (2, 0), md))
        q: asyncio.Queue[Req | None] = asyncio.Queue()
        got: list[pb.CoordinateResponse] = []

        async def reqs() -> AsyncIterator[Req]:
            while (r := await q.get()) is not None:
                yield r

        async def run() -> None:
            async for resp in svc.coordinate(ident, reqs()):
                got.append(resp)

        return ident, q, got, asyncio.ensure_future(run())

    ident, q, got, task = await stream(svc_a, None)
    await q.put(upd(node(2)))
    await q.put(add(agent))
    await asink.wait_node(ident.peer_id, 2)
    # The agent's node reaches the client asynchronously (across replicas): wait for it.
    await until(lambda: any(u.id == agent.bytes and u.kind == PU.NODE
                            for r in got for u in r.peer_updates), "the agent's node")
    token = resume.issue(ident.peer_id, principal).token
    await q.put(None)  # the stream ends without Disconnect: LOST
    await asyncio.wait_for(task, WAIT)
    await asink.wait_kind(ident.peer_id, PU.LOST, "lost")

    ident2, q2, got2, task2 = await stream(svc_b, token)
    assert ident2.resumed and ident2.peer_id == ident.peer_id
    # Tunnels are kept: the init batch carries the agent without re-adding the tunnel.
    await until(lambda: any(u.id == agent.bytes and u.reason == "init"
                            for r in got2 for u in r.peer_updates), "init with the agent")
    await q2.put(upd(node(3)))
    await asink.wait_node(ident.peer_id, 3)
    assert [k for k, _ in asink.kinds_about(ident.peer_id)] == ["NODE", "LOST", "NODE"]
    await q2.put(Req(disconnect=Req.Disconnect()))
    await asyncio.wait_for(task2, WAIT)
    await asink.wait_kind(ident.peer_id, PU.DISCONNECTED, "graceful disconnect")


async def test_resume_on_another_replica_reauthorizes_inherited_tunnels(
    replicas: Replicas,
) -> None:
    """A lost user peer keeps its tunnels in the database; when it resumes (on another
    replica) after losing access to one agent, that tunnel is deleted before the new
    connection's "init" batch is computed; the other is inherited."""
    a = await replicas()
    b = await replicas()
    resume = ResumeTokenProvider()
    allowed: set[uuid.UUID] = set()

    async def may_reach(p: Principal, agent_id: uuid.UUID) -> bool:
        return agent_id in allowed

    def service(coord: PgCoordinator) -> TailnetService:
        return TailnetService(coordinator=coord, authenticator=None, derp_maps=None,  # type: ignore[arg-type]  # noqa: E501
                              resume=resume, tunnel_authorizer=may_reach)

    svc_a, svc_b = service(a), service(b)
    ag1, sink1 = join(a, node(1))
    ag2, sink2 = join(a, node(2))
    allowed |= {ag1, ag2}
    user = Principal("user", uuid.uuid4(), "u")

    async def stream(svc: TailnetService, token: str | None) -> tuple[
        StreamIdentity, asyncio.Queue[Req | None], list[pb.CoordinateResponse], asyncio.Task[None]
    ]:
        md = {MD_RESUME_TOKEN: token} if token else {}
        ident = await svc.resolve_stream(CallContext(user, (2, 0), md))
        q: asyncio.Queue[Req | None] = asyncio.Queue()
        got: list[pb.CoordinateResponse] = []

        async def reqs() -> AsyncIterator[Req]:
            while (r := await q.get()) is not None:
                yield r

        async def run() -> None:
            async for resp in svc.coordinate(ident, reqs()):
                got.append(resp)

        return ident, q, got, asyncio.ensure_future(run())

    ident, q, _, task = await stream(svc_b, None)
    for r in (add(ag1), add(ag2), upd(node(3))):
        await q.put(r)
    await sink1.wait_node(ident.peer_id, 3)
    await sink2.wait_node(ident.peer_id, 3)
    token = resume.issue(ident.peer_id, user).token
    await q.put(None)  # lost: pgcoord keeps the peer's tunnels
    await asyncio.wait_for(task, WAIT)
    await sink2.wait_kind(ident.peer_id, PU.LOST, "lost")
    assert {(s, d) for _, s, d in await a.fetch_tunnels()} == {
        (ident.peer_id, ag1), (ident.peer_id, ag2)}

    allowed.discard(ag2)
    ident2, q2, got2, task2 = await stream(svc_a, token)
    assert ident2.resumed and ident2.peer_id == ident.peer_id
    await until(lambda: a.is_connected(ident.peer_id), "the resumed connection")
    assert {(s, d) for _, s, d in await a.fetch_tunnels()} == {(ident.peer_id, ag1)}
    await until(lambda: any(u.reason == "init" for r in got2 for u in r.peer_updates),
                "the init batch")
    assert [(u.id, u.reason) for r in got2 for u in r.peer_updates] == [(ag1.bytes, "init")]
    await q2.put(upd(node(4)))
    await sink1.wait_node(ident.peer_id, 4)
    await b.flush()
    await a.flush()
    assert sink2.nodes_about(ident.peer_id) == [3]  # ag2 never hears of the new connection
    await q2.put(Req(disconnect=Req.Disconnect()))
    await asyncio.wait_for(task2, WAIT)


async def test_many_updates_are_batched(replicas: Replicas) -> None:
    a = await replicas()
    b = await replicas()
    client, csink = join(b, node(1))
    agents = [join(a)[0] for _ in range(600)]
    for ag in agents:
        b.handle(client, csink, add(ag))
    await b.flush()
    sinks = {ag: a._local.conns[ag].sink for ag in agents}
    before = a.write_batches
    for i, ag in enumerate(agents):
        a.handle(ag, sinks[ag], upd(node(1000 + i)))
    await a.flush()
    assert a.write_batches - before <= 2  # 600 updates, one or two transactions
    await csink.wait_for(lambda: len({u.id for u in csink.updates() if u.kind == PU.NODE}) == 600,
                         "600 nodes")
    assert MAX_PAYLOAD < 8000


async def test_bad_notification_is_ignored_and_resyncs(pg_dsn: str, replicas: Replicas) -> None:
    a = await replicas()
    agent, asink = join(a, node(1))
    client, csink = join(a, node(2))
    a.handle(client, csink, add(agent))
    await csink.wait_node(agent, 1)
    before = a.resyncs
    conn = await asyncpg.connect(pg_dsn)
    try:
        await conn.execute("SELECT pg_notify($1, 'garbage')", CHAN_PEER)
    finally:
        await conn.close()
    await until(lambda: a.resyncs > before, "resync after a bad payload")
    a.handle(agent, asink, upd(node(4)))
    await csink.wait_node(agent, 4)
    assert not csink.closed and not asink.closed


async def test_cleanup_dead_replicas_lost_peers(pg_dsn: str, replicas: Replicas) -> None:
    cfg = PgCoordinatorConfig(heartbeat_interval=0.3, retention=0.5, retry_max=0.3)
    a = await replicas(cfg)
    dead = await replicas(cfg)
    p, psink = join(dead, node(1))
    q, qsink = join(a, node(2))
    a.handle(q, qsink, add(p))
    await qsink.wait_node(p, 1)
    a.lost(q, qsink)
    await dead.stop()  # its peers become lost, its heartbeat stops
    await a.flush()
    conn = await asyncpg.connect(pg_dsn)

    async def gone() -> bool:
        await a.cleanup_now()
        n = await conn.fetchval("SELECT count(*) FROM tailnet_peers")
        c = await conn.fetchval("SELECT count(*) FROM tailnet_coordinators")
        t = await conn.fetchval("SELECT count(*) FROM tailnet_tunnels")
        return bool(n == 0 and c == 1 and t == 0)

    try:
        await until(gone, "cleanup")
    finally:
        await conn.close()


async def test_refused_send_is_retried_by_the_dirty_resync(replicas: Replicas) -> None:
    a = await replicas()
    b = await replicas()
    agent, asink = join(a, node(1))
    client = uuid.uuid4()
    csink = RecSink(capacity=0)  # a slow consumer: every send is refused for now
    b.connect(client, "slow", csink)
    b.handle(client, csink, upd(node(2)))
    b.handle(client, csink, add(agent))
    await until(lambda: b._local.refused_sends >= 1, "a refused send")
    csink.capacity = None  # the consumer catches up: the next heartbeat resyncs it
    await csink.wait_node(agent, 1)
    assert not csink.closed  # slow consumers are not kicked (pgcoord)
