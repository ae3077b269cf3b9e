"""HA as one system (issue 10): ``tailnet serve`` replicas mesh their embedded relays.

Real processes (``tests/tailnet/pg/serve.py``) on one throw-away PostgreSQL:
the demo flow split across replicas (agent coordinating and DERP-connected on
replica A, its client on replica B, NaCl-sealed packets both ways), a third
replica joining, a replica SIGKILLed, a PostgreSQL restart, a replica with the
wrong mesh key, a standalone relay joining the embedded region, and the
health report's view of all that. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import pytest

from derp.client import DerpClient
from derp.errors import DerpError
from derp.events import PeerGoneReceived
from derp.keys import PrivateKey, PublicKey, seal
from derp.mesh import parse_mesh_peer
from derp.server import DerpServer, ServerConfig
from tailnet.auth import TAILSCALE_SERVICE_PREFIX, addr_from_uuid
from tailnet.client import AgentConnection, ClientConnection, PeerLost, PeerUpdated
from tailnet.config import StackConfig
from tailnet.demo import make_node
from tailnet.stack import AgentCredentials, TailnetStack

from ..pgserver import PgServer, pg_dsn, pg_server  # noqa: F401  (fixtures)
from .serve import (
    T,
    Replica,
    admin_token,
    derp_login,
    echo_sealed,
    fully_meshed,
    ping_until_answered,
    start_replica,
    until,
    wait_health,
)

REGION = 999


def mint(data_dir: Path) -> tuple[str, AgentCredentials]:
    """A user token and an agent owned by that user, written to the shared tokens file
    (running replicas reload it on the first unknown token)."""
    stack = TailnetStack(StackConfig(data_dir=data_dir))
    stack.prepare_data_dir(create_admin=False)
    uid, user_token = stack.create_user()
    return user_token, stack.create_agent(owner_id=uid)


async def wait_event(conn: Any, pred: Any, what: str) -> Any:
    async def loop() -> Any:
        async for ev in conn.events():
            if pred(ev):
                return ev
        raise AssertionError(f"connection closed while waiting for {what}")

    return await asyncio.wait_for(loop(), T)


async def next_gone(q: asyncio.Queue[object], key: PublicKey) -> PeerGoneReceived:
    while True:
        ev = await asyncio.wait_for(q.get(), T)
        if isinstance(ev, PeerGoneReceived) and ev.peer == key:
            return ev


class Split:
    """The demo flow split across replicas: agent on ``a``, its client on ``b``."""

    def __init__(self, user_token: str, creds: AgentCredentials) -> None:
        self.user_token = user_token
        self.creds = creds
        self.agent_key = PrivateKey.generate()
        self.client_key = PrivateKey.generate()
        self.agent: AgentConnection | None = None
        self.client: ClientConnection | None = None
        self.derp_agent: DerpClient | None = None
        self.derp_client: DerpClient | None = None
        self.rejected = asyncio.Event()
        self.agent_events: asyncio.Queue[object] = asyncio.Queue()
        self._echo: asyncio.Task[None] | None = None

    async def agent_on(self, r: Replica) -> None:
        aid = self.creds.agent_id
        node = make_node(self.agent_key, addr_from_uuid(TAILSCALE_SERVICE_PREFIX, aid), REGION)
        self.agent = AgentConnection(r.api, self.creds.token, node=node)
        await self.agent.start(T)
        self.derp_agent = await derp_login(r.derp_url, self.agent_key)
        self._echo = asyncio.ensure_future(echo_sealed(
            self.derp_agent, self.agent_key, self.client_key.public, self.rejected,
            self.agent_events))

    async def client_on(self, r: Replica) -> uuid.UUID:
        """Coordinate on ``r`` until both sides learned the other's key, then log in
        to ``r``'s relay."""
        assert self.agent is not None
        aid = self.creds.agent_id
        node = make_node(self.client_key, addr_from_uuid(TAILSCALE_SERVICE_PREFIX, uuid.uuid4()),
                         REGION)
        self.client = ClientConnection(r.api, self.user_token, agent_id=aid, node=node)
        peer = await self.client.start(T)
        ev = await wait_event(self.client, lambda e: isinstance(e, PeerUpdated)
                              and e.peer_id == aid, "the agent's NODE")
        assert ev.node.key == b"np" + self.agent_key.public.raw
        ev = await wait_event(self.agent, lambda e: isinstance(e, PeerUpdated)
                              and e.peer_id == peer, "the client's NODE")
        assert ev.node.key == b"np" + self.client_key.public.raw
        self.derp_client = await derp_login(r.derp_url, self.client_key)
        return peer

    async def exchange(self, n: int = 3) -> None:
        """Sealed pings client → agent, sealed pongs agent → client; one tampered box
        is rejected by the agent."""
        assert self.derp_client is not None
        for i in range(n):
            payload = f"ping #{i} {uuid.uuid4()}".encode()
            await ping_until_answered(self.derp_client, self.client_key,
                                      self.agent_key.public, payload)
        box = bytearray(seal(self.client_key, self.agent_key.public, b"tampered"))
        box[-1] ^= 1
        self.rejected.clear()
        await self.derp_client.send(self.agent_key.public, bytes(box))
        await asyncio.wait_for(self.rejected.wait(), T)

    async def drop_client(self) -> None:
        conns = [c for c in (self.derp_client, self.client) if c is not None]
        self.derp_client = self.client = None
        await asyncio.gather(*(c.close() for c in conns), return_exceptions=True)

    async def close(self) -> None:
        if self._echo is not None:
            self._echo.cancel()
            await asyncio.gather(self._echo, return_exceptions=True)
        await self.drop_client()
        conns = [c for c in (self.derp_agent, self.agent) if c is not None]
        await asyncio.gather(*(c.close() for c in conns), return_exceptions=True)


async def stop_all(replicas: list[Replica]) -> None:
    await asyncio.gather(*(r.stop() for r in replicas), return_exceptions=True)


async def test_two_replicas_split_demo_known_admission(pg_dsn: str, tmp_path: Path) -> None:
    a = await start_replica("a", pg_dsn, tmp_path, "--derp-admission", "known")
    b = await start_replica("b", pg_dsn, tmp_path, "--derp-admission", "known")
    split = Split(*mint(tmp_path))
    try:
        admin = admin_token(tmp_path)
        await wait_health(a, admin, fully_meshed(2), "A and B meshed")
        # derp_admission=known in HA: a key no replica's coordinator knows is refused.
        stranger = DerpClient(b.derp_url, PrivateKey.generate(), connect_timeout=T)
        with pytest.raises((DerpError, OSError, EOFError)):
            await asyncio.wait_for(stranger.connect(), T)
        await stranger.close()

        await split.agent_on(a)
        await split.client_on(b)  # B admits the client; A's agent key is known on B too
        await split.exchange()
        # The agent's key, known through A's coordinator, is admitted by B's relay too.
        probe = await derp_login(b.derp_url, split.agent_key)
        await probe.close()
        # PeerGone crosses replicas: the client leaves B's relay, the agent on A hears it.
        await split.drop_client()
        await next_gone(split.agent_events, split.client_key.public)
    finally:
        await split.close()
        await stop_all([a, b])


async def test_third_replica_joins_then_is_sigkilled(pg_dsn: str, tmp_path: Path) -> None:
    a = await start_replica("a", pg_dsn, tmp_path)
    b = await start_replica("b", pg_dsn, tmp_path)
    replicas = [a, b]
    split = Split(*mint(tmp_path))
    try:
        admin = admin_token(tmp_path)
        await wait_health(a, admin, fully_meshed(2), "A and B meshed")
        c = await start_replica("c", pg_dsn, tmp_path)
        replicas.append(c)
        mesh = await wait_health(a, admin, fully_meshed(3), "A, B and C meshed")
        c_id = next(r["id"] for r in mesh["relays"] if r["relay_url"] == c.api)

        await split.agent_on(a)
        client_peer = await split.client_on(c)
        await split.exchange(2)

        await c.kill()
        # The coordinator: the client's peer is LOST to the agent.
        await wait_event(split.agent, lambda e: isinstance(e, PeerLost)
                         and e.peer_id == client_peer, "the client LOST")
        # The relay: A's link to C broke, so the agent gets PeerGone for the client.
        await next_gone(split.agent_events, split.client_key.public)
        # C leaves every mesh: A and B stop reporting it and keep their own link.
        mesh = await wait_health(a, admin, fully_meshed(2), "C gone from the mesh")
        assert c_id not in {x["replica_id"] for r in mesh["relays"] for x in r["links"]}
        # The client reconnects to another replica and relays again.
        await split.drop_client()
        await split.client_on(b)
        await split.exchange(2)
    finally:
        await split.close()
        await stop_all(replicas)


async def test_postgres_restart_keeps_the_mesh(
    pg_server: PgServer, pg_dsn: str, tmp_path: Path  # noqa: F811
) -> None:
    # Default heartbeats (2 s, dead after 6 s, fenced after 3 failed writes): a restart
    # of a few seconds neither fences a replica nor makes one read as dead.
    a = await start_replica("a", pg_dsn, tmp_path, heartbeat=2.0)
    b = await start_replica("b", pg_dsn, tmp_path, heartbeat=2.0)
    ka, kb = PrivateKey.generate(), PrivateKey.generate()
    da = db = None
    rejected = asyncio.Event()
    echo: asyncio.Task[None] | None = None
    try:
        admin = admin_token(tmp_path)
        before = await wait_health(a, admin, fully_meshed(2), "A and B meshed")
        da = await derp_login(a.derp_url, ka)
        db = await derp_login(b.derp_url, kb)
        echo = asyncio.ensure_future(echo_sealed(da, ka, kb.public, rejected))
        await ping_until_answered(db, kb, ka.public, b"before")
        pg_server.stop()
        try:
            await ping_until_answered(db, kb, ka.public, b"while PostgreSQL is down")
        finally:
            pg_server.start()
        after = await wait_health(a, admin, fully_meshed(2), "A and B meshed after the restart")
        since = {(r["id"], x["url"]): x["since"] for r in before["relays"] for x in r["links"]}
        assert since == {(r["id"], x["url"]): x["since"] for r in after["relays"]
                         for x in r["links"]}, "a mesh link went down during the restart"
        await ping_until_answered(db, kb, ka.public, b"after")
    finally:
        if echo is not None:
            echo.cancel()
            await asyncio.gather(echo, return_exceptions=True)
        for c in (da, db):
            if c is not None:
                await c.close()
        await stop_all([a, b])


async def test_standalone_relay_joins_and_wrong_mesh_key_is_refused(
    pg_dsn: str, tmp_path: Path
) -> None:
    good, wrong = bytes(range(32)), bytes(range(1, 33))
    (tmp_path / "good.key").write_text(good.hex())
    (tmp_path / "wrong.key").write_text(wrong.hex())
    # A standalone relay of the embedded region (ours here; a derper meshes the same
    # way) with the region's key, meshing towards replica A once A is up.
    derper = DerpServer(ServerConfig(private_key=PrivateKey.generate(), mesh_key=good,
                                     mesh_retry_interval=0.2))
    await derper.start("127.0.0.1", 0)
    d_url = f"http://127.0.0.1:{derper.port}"
    a = await start_replica("a", pg_dsn, tmp_path, "--derp-mesh-key-file",
                            str(tmp_path / "good.key"), "--derp-mesh-with", d_url)
    b = await start_replica("b", pg_dsn, tmp_path, "--derp-mesh-key-file",
                            str(tmp_path / "wrong.key"))
    from derp.mesh import Mesh

    d_mesh = Mesh(derper, [parse_mesh_peer(a.api)], retry_interval=0.2)
    d_mesh.start()
    ka, kd = PrivateKey.generate(), PrivateKey.generate()
    da = dd = None
    rejected = asyncio.Event()
    echo: asyncio.Task[None] | None = None
    try:
        admin = admin_token(tmp_path)

        def view(mesh: dict[str, Any]) -> bool:
            by_url = {r["relay_url"]: r for r in mesh.get("relays", [])}
            if set(by_url) != {a.api, b.api}:
                return False
            ra, rb = by_url[a.api], by_url[b.api]
            states_a = {x["url"]: x["state"] for x in ra["links"]}
            states_b = {x["url"]: x["state"] for x in rb["links"]}
            return (states_a == {d_url + "/derp": "up", b.api + "/derp": "down"}
                    and states_b == {a.api + "/derp": "down"})

        mesh = await wait_health(a, admin, view, "A meshed with the derper, not with B")
        # A and B refuse each other's WatchConns (wrong key): warned, with the reason.
        texts = " ".join(w["message"] for w in mesh["warnings"])
        assert mesh["severity"] == "warning" and "is not meshed with" in texts
        assert all(w["code"] == "EMESH01" for w in mesh["warnings"])
        assert b.api.removeprefix("http://") in texts
        # The standalone relay joined the region: its client and A's exchange packets.
        da = await derp_login(a.derp_url, ka)
        dd = await derp_login(d_url + "/derp", kd)
        echo = asyncio.ensure_future(echo_sealed(da, ka, kd.public, rejected))
        await ping_until_answered(dd, kd, ka.public, b"via the standalone relay")
        assert d_mesh.links[0].connected
        await until(lambda: ka.public.raw in d_mesh.routes, "route to A's client on D")
    finally:
        if echo is not None:
            echo.cancel()
            await asyncio.gather(echo, return_exceptions=True)
        for c in (da, dd):
            if c is not None:
                await c.close()
        await stop_all([a, b])
        await d_mesh.stop()
        await derper.stop(1.0)
