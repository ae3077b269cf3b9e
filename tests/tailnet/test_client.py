"""Integration tests: tailnet client libraries against a real server on 127.0.0.1.

Every test that uses the ``env`` fixture runs twice: over gRPC (a
``TailnetGrpcServer``) and over Coder's transport (the HTTP API's WebSocket
endpoints: yamux + DRPC), with the same service underneath.

Every wait is on an event with a generous timeout; nothing sleeps and hopes.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import grpc
import pytest

from tailnet.auth import addr_from_uuid
from tailnet.client import (
    AgentConnection,
    Backoff,
    ClientConnection,
    ConnectError,
    Connected,
    ConnectionLost,
    ConnectionOptions,
    CoordinatorError,
    Event,
    PeerDisconnected,
    PeerLost,
    PeerUpdated,
    ReadyForHandshake,
    Reconnected,
    ResumeTokenUpdated,
)
from tailnet.core import Coordinator
from tailnet.derpmap import StaticDERPMapSource, embedded_region, new_derp_map
from tailnet.identity import Principal, StaticTokenAuthenticator
from tailnet.resume import ResumeTokenProvider
from tailnet.http import ApiOptions, HttpApiServer, TailnetApi
from tailnet.server.grpc import TailnetGrpcServer
from tailnet.service import TailnetService
from tailnet.v2 import tailnet_pb2 as pb

WAIT = 20.0  # generous: the machine is shared and may be loaded
AGENT = uuid.UUID("a0000000-0000-4000-8000-000000000001")
USER = uuid.UUID("b0000000-0000-4000-8000-000000000002")
TS_PREFIX = ipaddress.IPv6Network("fd7a:115c:a1e0::/48")


def agent_node(ep: str = "10.0.0.1:41641") -> pb.Node:
    addr = f"{addr_from_uuid(TS_PREFIX, AGENT)}/128"
    return pb.Node(preferred_derp=999, addresses=[addr], allowed_ips=[addr], endpoints=[ep])


def client_node(ep: str = "10.0.0.2:41641") -> pb.Node:
    addr = "fd7a:115c:a1e0:ab12::2/128"
    return pb.Node(preferred_derp=999, addresses=[addr], allowed_ips=[addr], endpoints=[ep])


class Recorder:
    """``on_event`` callback that records events and lets tests await one."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self._changed = asyncio.Event()

    def __call__(self, ev: Event) -> None:
        self.events.append(ev)
        self._changed.set()

    def mark(self) -> int:
        return len(self.events)

    async def wait(
        self, pred: Callable[[Event], bool], *, since: int = 0, timeout: float = WAIT
    ) -> Event:
        async def scan() -> Event:
            i = since
            while True:
                while i < len(self.events):
                    ev = self.events[i]
                    i += 1
                    if pred(ev):
                        return ev
                self._changed.clear()
                await self._changed.wait()

        return await asyncio.wait_for(scan(), timeout)

    def of(self, kind: type) -> list[Event]:
        return [e for e in self.events if isinstance(e, kind)]


def opts(rec: Recorder, **kw: object) -> ConnectionOptions:
    o = ConnectionOptions(on_event=rec, backoff=Backoff(0.05, 0.5), close_timeout=5.0)
    for k, v in kw.items():
        setattr(o, k, v)
    return o


@dataclass
class Env:
    """A live coordinator (service + gRPC server or HTTP API) restartable on its port."""

    auth: StaticTokenAuthenticator
    derp: StaticDERPMapSource
    resume: ResumeTokenProvider
    transport: str = "grpc"
    srv: TailnetGrpcServer | HttpApiServer | None = None
    service: TailnetService | None = None
    port: int = 0
    conns: list[AgentConnection | ClientConnection] = field(default_factory=list)

    @property
    def target(self) -> str:
        if self.transport == "drpc":
            return f"http://127.0.0.1:{self.port}"
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        async def allow(_p: Principal, _agent: uuid.UUID) -> bool:
            return True

        svc = TailnetService(
            coordinator=Coordinator(),
            authenticator=self.auth,
            derp_maps=self.derp,
            resume=self.resume,
            tunnel_authorizer=allow,
        )
        self.service = svc
        if self.transport == "drpc":
            http = HttpApiServer(
                TailnetApi(svc, self.derp, agent_lookup=allow, options=ApiOptions())
            )
            await http.start("127.0.0.1", self.port)
            self.srv, self.port = http, http.port
            return
        srv = TailnetGrpcServer(svc)
        await srv.start("127.0.0.1", self.port)
        self.srv, self.port = srv, srv.port

    async def stop(self) -> None:
        if self.srv is not None:
            if isinstance(self.srv, HttpApiServer):
                assert self.service is not None
                self.service.close()
                await self.srv.stop(0.5)
            else:
                await self.srv.stop(0.5)
            self.srv = None

    def agent(self, rec: Recorder, **kw: object) -> AgentConnection:
        c = AgentConnection(self.target, "agent-tok", node=agent_node(), options=opts(rec, **kw))
        self.conns.append(c)
        return c

    def client(
        self, rec: Recorder, *, resume_token: str | None = None, **kw: object
    ) -> ClientConnection:
        c = ClientConnection(
            self.target,
            "user-tok",
            agent_id=AGENT,
            node=client_node(),
            resume_token=resume_token,
            options=opts(rec, **kw),
        )
        self.conns.append(c)
        return c


@pytest.fixture(params=["grpc", "drpc"])
async def env(request: pytest.FixtureRequest) -> AsyncIterator[Env]:
    auth = StaticTokenAuthenticator(
        {
            "agent-tok": Principal("agent", AGENT, "owner-ws-agent"),
            "user-tok": Principal("user", USER, "user"),
        }
    )
    derp = StaticDERPMapSource(new_derp_map(embedded_region("127.0.0.1", 3340, scheme="http")))
    e = Env(auth, derp, ResumeTokenProvider(), transport=request.param)
    await e.start()
    try:
        yield e
    finally:
        await asyncio.wait_for(asyncio.gather(*(c.close() for c in e.conns)), WAIT)
        await e.stop()


def is_node(pid: uuid.UUID | None, ep: str | None = None) -> Callable[[Event], bool]:
    return lambda ev: (
        isinstance(ev, PeerUpdated)
        and ev.peer_id == pid
        and (ep is None or list(ev.node.endpoints) == [ep])
    )


async def connect_pair(env: Env) -> tuple[AgentConnection, Recorder, ClientConnection, Recorder]:
    arec, crec = Recorder(), Recorder()
    agent = env.agent(arec)
    client = env.client(crec)
    assert await agent.start(WAIT) == AGENT
    cid = await client.start(WAIT)
    assert cid == client.peer_id and cid != AGENT
    await crec.wait(is_node(AGENT))
    await arec.wait(is_node(cid))
    return agent, arec, client, crec


async def test_agent_client_tunnel_nodes_and_automatic_rfh(env: Env) -> None:
    agent, arec, client, crec = await connect_pair(env)
    # The agent acknowledged the client's node: the client hears READY_FOR_HANDSHAKE.
    await crec.wait(lambda ev: ev == ReadyForHandshake(AGENT))
    assert client.peers.is_ready(AGENT)
    st = client.peers.get(AGENT)
    assert st is not None and st.node == agent_node() and not st.lost
    # The client never sends acks (ClientPolicy would reject them).
    assert not [e for e in crec.events if isinstance(e, CoordinatorError)]
    assert not [e for e in arec.events if isinstance(e, CoordinatorError)]
    # Node updates flow both ways.
    m = crec.mark()
    agent.update_node(agent_node("10.9.9.9:1"))
    await crec.wait(is_node(AGENT, "10.9.9.9:1"), since=m)
    m = arec.mark()
    client.update_node(client_node("10.8.8.8:1"))
    await arec.wait(is_node(client.peer_id, "10.8.8.8:1"), since=m)
    assert isinstance(crec.events[0], Connected)
    # Both follow the DERP map.
    assert client.derp_map is not None and 999 in client.derp_map.regions
    assert agent.derp_map is not None


async def test_node_updates_coalesce(env: Env) -> None:
    agent, arec, client, crec = await connect_pair(env)
    await client.flush(WAIT)
    before = client.node_updates_sent
    m = arec.mark()
    for i in range(50):
        client.update_node(client_node(f"10.1.0.{i}:1"))
    await client.flush(WAIT)
    await arec.wait(is_node(client.peer_id, "10.1.0.49:1"), since=m)
    # Only the latest node was sent (no send was in flight when we started).
    assert client.node_updates_sent - before == 1
    seen = [e for e in arec.events[m:] if is_node(client.peer_id)(e)]
    assert len(seen) == 1


async def test_derp_map_updates_are_followed(env: Env) -> None:
    rec = Recorder()
    client = env.client(rec)
    await client.start(WAIT)
    maps = client.derp_maps()
    first = await asyncio.wait_for(anext(maps), WAIT)
    assert set(first.regions) == {999}
    region = embedded_region("127.0.0.1", 3341, region_id=1000, scheme="http")
    env.derp.set(new_derp_map(embedded_region("127.0.0.1", 3340, scheme="http"), region))
    second = await asyncio.wait_for(anext(maps), WAIT)
    assert set(second.regions) == {999, 1000}
    assert client.derp_map == second
    await maps.aclose()


async def test_resume_token_keeps_peer_id(env: Env) -> None:
    gate = asyncio.Event()

    async def wait_gate() -> None:
        await asyncio.wait_for(gate.wait(), WAIT)

    arec, crec = Recorder(), Recorder()
    agent = env.agent(arec)
    client = env.client(crec, reconnect_gate=wait_gate)
    await agent.start(WAIT)
    cid = await client.start(WAIT)
    await arec.wait(is_node(cid))
    await crec.wait(lambda ev: isinstance(ev, ResumeTokenUpdated))
    assert client.resume_token is not None

    m = arec.mark()
    client.reconnect()
    # The agent sees the client LOST (stream died without Disconnect) ...
    await arec.wait(lambda ev: ev == PeerLost(cid, "lost"), since=m)
    gate.set()
    # ... and then NODE again for the *same* peer ID after the client resumed.
    await arec.wait(is_node(cid), since=m)
    rc = await crec.wait(lambda ev: isinstance(ev, Reconnected))
    assert rc == Reconnected(cid, resumed=True)
    assert client.peer_id == cid
    assert not [e for e in arec.events if isinstance(e, PeerDisconnected)]
    # The client marked its peers lost while disconnected, then found the agent again.
    lost_at = crec.events.index(PeerLost(AGENT, "coordinator connection lost"))
    assert any(is_node(AGENT)(e) for e in crec.events[lost_at:])
    st = client.peers.get(AGENT)
    assert st is not None and not st.lost


async def test_reconnect_after_server_restart(env: Env) -> None:
    agent, arec, client, crec = await connect_pair(env)
    ma, mc = arec.mark(), crec.mark()
    await env.stop()
    # Peers are marked LOST while the coordinator is away.
    await crec.wait(lambda ev: isinstance(ev, ConnectionLost), since=mc)
    await crec.wait(lambda ev: ev in (PeerLost(AGENT, "coordinator close"),
                                      PeerLost(AGENT, "coordinator connection lost")), since=mc)
    await arec.wait(lambda ev: isinstance(ev, PeerLost) and ev.peer_id == client.peer_id, since=ma)
    st = client.peers.get(AGENT)
    assert st is not None and st.lost
    await env.start()  # same port, fresh coordinator
    # Both reconnect; the client re-adds its tunnel and both re-send their nodes.
    await crec.wait(lambda ev: isinstance(ev, Reconnected), since=mc)
    await arec.wait(lambda ev: isinstance(ev, Reconnected), since=ma)
    await crec.wait(is_node(AGENT), since=mc)
    await arec.wait(is_node(client.peer_id), since=ma)
    st = client.peers.get(AGENT)
    assert st is not None and not st.lost
    assert env.service is not None
    assert env.service.coordinator.has_tunnel(client.peer_id, AGENT)  # type: ignore[attr-defined]


async def test_invalid_resume_token_is_dropped(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tailnet.client")
    someone = Principal("user", uuid.uuid4())
    bogus = ResumeTokenProvider().issue(uuid.uuid4(), someone).token  # signed with another key
    rec = Recorder()
    client = env.client(rec, resume_token=bogus)
    assert client.resume_token == bogus
    cid = await client.start(WAIT)
    assert client.sessions == 1 and client.connected
    await rec.wait(lambda ev: isinstance(ev, ResumeTokenUpdated))
    assert client.resume_token not in (None, bogus)
    assert cid is not None
    assert any("resume token rejected" in r.getMessage() for r in caplog.records)


async def test_clean_close_sends_disconnect(env: Env) -> None:
    agent, arec, client, crec = await connect_pair(env)
    cid = client.peer_id
    seen: list[Event] = []

    async def consume() -> None:
        async for ev in client.events():
            seen.append(ev)

    consumer = asyncio.ensure_future(consume())
    m = arec.mark()
    await asyncio.wait_for(client.close(), WAIT)
    await asyncio.wait_for(client.close(), WAIT)  # idempotent
    assert cid is not None
    await arec.wait(lambda ev: ev == PeerDisconnected(cid, "graceful disconnect"), since=m)
    await asyncio.wait_for(consumer, WAIT)  # the event iterator ends after close
    assert isinstance(seen[0], Connected)
    assert not client.connected
    assert not [e for e in crec.events if isinstance(e, ConnectionLost)]


async def test_bad_token_fails_start(env: Env) -> None:
    client = ClientConnection(env.target, "nope", agent_id=AGENT, options=opts(Recorder()))
    env.conns.append(client)
    with pytest.raises(ConnectError) as info:
        await client.start(WAIT)
    assert info.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_backoff_is_jittered_exponential_and_resets() -> None:
    b = Backoff(0.05, 10.0, rng=random.Random(1))
    delays = [b.next() for _ in range(12)]
    for n, d in enumerate(delays):
        cap = min(10.0, 0.05 * 2**n)
        assert cap / 2 <= d <= cap
    assert max(delays) <= 10.0 and delays[-1] >= 5.0
    b.reset()
    assert b.next() <= 0.05


async def test_user_scoped_add_and_remove_tunnel(env: Env) -> None:
    arec, urec = Recorder(), Recorder()
    agent = env.agent(arec)
    await agent.start(WAIT)
    user = ClientConnection(env.target, "user-tok", node=client_node(), options=opts(urec))
    env.conns.append(user)
    uid = await user.start(WAIT)
    assert user.agent_id is None and user.tunnels == []
    user.add_tunnel(AGENT)
    assert user.tunnels == [AGENT]
    await urec.wait(is_node(AGENT))
    await arec.wait(is_node(uid))
    m = urec.mark()
    user.remove_tunnel(AGENT)
    await urec.wait(lambda ev: ev == PeerDisconnected(AGENT, "remove tunnel"), since=m)
    await arec.wait(lambda ev: ev == PeerDisconnected(uid, "remove tunnel"))
    assert AGENT not in user.peers and user.tunnels == []


@pytest.mark.parametrize("transport", ["grpc", "drpc"])
def test_works_on_uvloop(transport: str) -> None:
    """The libraries are loop-agnostic: run an agent/client pair on uvloop."""
    import uvloop

    async def scenario() -> None:
        auth = StaticTokenAuthenticator(
            {
                "agent-tok": Principal("agent", AGENT, "a"),
                "user-tok": Principal("user", USER, "u"),
            }
        )
        derp = StaticDERPMapSource(new_derp_map(embedded_region("127.0.0.1", 1, scheme="http")))
        e = Env(auth, derp, ResumeTokenProvider(), transport=transport)
        await e.start()
        try:
            await connect_pair(e)
        finally:
            await asyncio.wait_for(asyncio.gather(*(c.close() for c in e.conns)), WAIT)
            await e.stop()

    uvloop.run(scenario())


async def test_expired_resume_token_is_not_used(env: Env) -> None:
    now = [time.time()]
    rec = Recorder()
    client = env.client(rec, wall_clock=lambda: now[0])
    await client.start(WAIT)
    ev = await rec.wait(lambda e: isinstance(e, ResumeTokenUpdated))
    assert isinstance(ev, ResumeTokenUpdated) and ev.expires_at > now[0]
    assert client.resume_token is not None
    now[0] = ev.expires_at + 1  # the token expired
    assert client.resume_token is None


async def test_start_after_close_is_refused(env: Env) -> None:
    client = env.client(Recorder())
    await client.close()
    with pytest.raises(ConnectionError):
        await client.start(WAIT)


async def test_flush_does_not_hang_when_the_session_ends_with_requests_unwritten() -> None:
    # A session that ends (stream broke) never writes its queue: flush() must
    # report that instead of waiting forever for an outbox nobody drains.
    from tailnet.client import _Outbox

    conn = ClientConnection("127.0.0.1:1", "token")
    outbox = _Outbox()
    outbox.put(pb.CoordinateRequest(add_tunnel=pb.CoordinateRequest.Tunnel(id=AGENT.bytes)))
    conn._outbox = outbox
    waiter = asyncio.ensure_future(conn.flush())
    outbox.end()  # what the session's teardown does
    with pytest.raises(ConnectionError):
        await asyncio.wait_for(waiter, WAIT)
    # Everything written before the end: flush() simply returns.
    done = _Outbox()
    done.idle.set()
    conn._outbox = done
    done.end()
    await asyncio.wait_for(conn.flush(), WAIT)
