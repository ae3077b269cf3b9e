"""gRPC integration tests: the Tailnet service on 127.0.0.1 over real sockets.

Every wait is bounded (``asyncio.wait_for`` with generous timeouts); nothing
sleeps and hopes. One test runs the whole stack under uvloop.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import grpc
import grpc.aio
import jwt
import pytest
import uvloop

from tailnet.auth import TAILSCALE_SERVICE_PREFIX, addr_from_uuid
from tailnet.core import Coordinator
from tailnet.derpmap import StaticDERPMapSource, embedded_region, new_derp_map
from tailnet.identity import Principal, StaticTokenAuthenticator
from tailnet.limits import DEFAULT_LIMITS, Limits
from tailnet.resume import ResumeKeyStore, ResumeTokenProvider
from tailnet.server.grpc import TailnetGrpcServer
from tailnet.service import TailnetService
from tailnet.v2 import tailnet_pb2 as pb
from tailnet.v2 import tailnet_pb2_grpc as pb_grpc
from tailnet.workspaces import InMemoryWorkspaceProvider

T = 20.0  # generous per-wait timeout (loaded CI machines)
Kind = pb.CoordinateResponse.PeerUpdate
SC = grpc.StatusCode

USER = uuid.UUID("11111111-1111-4111-8111-111111111111")
OTHER_USER = uuid.UUID("22222222-2222-4222-8222-222222222222")
AGENT = uuid.UUID("aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa")
AGENT2 = uuid.UUID("bbbbbbbb-bbbb-4bbb-8bbb-bbbbbbbbbbbb")
OTHER_AGENT = uuid.UUID("cccccccc-cccc-4ccc-8ccc-cccccccccccc")  # owned by OTHER_USER
WS = uuid.UUID("dddddddd-dddd-4ddd-8ddd-dddddddddddd")
OTHER_WS = uuid.UUID("eeeeeeee-eeee-4eee-8eee-eeeeeeeeeeee")
CP = uuid.UUID("ffffffff-ffff-4fff-8fff-ffffffffffff")

TOKENS = {
    "agent-token": Principal("agent", AGENT, "me-ws-main"),
    "agent2-token": Principal("agent", AGENT2, "me-ws-second"),
    "user-token": Principal("user", USER, "me"),
    "other-token": Principal("user", OTHER_USER, "other"),
    "cp-token": Principal("control_plane", CP, "coderd"),
}


class FakeClock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class Stack:
    server: TailnetGrpcServer
    service: TailnetService
    coordinator: Coordinator
    derp: StaticDERPMapSource
    workspaces: InMemoryWorkspaceProvider
    resume: ResumeTokenProvider
    clock: FakeClock
    channel: grpc.aio.Channel
    stub: pb_grpc.TailnetStub
    peers: list[Peer] = field(default_factory=list)

    def peer(self, token: str | None, **md: str) -> Peer:
        p = Peer(self.stub, md_for(token, **md))
        self.peers.append(p)
        return p


def md_for(token: str | None, **extra: str) -> tuple[tuple[str, str], ...]:
    md: list[tuple[str, str]] = []
    if token is not None:
        md.append(("authorization", f"Bearer {token}"))
    for k, v in extra.items():
        md.append((k.replace("_", "-"), v))
    return tuple(md)


class Peer:
    """A Coordinate stream driven from a test: queue requests, read responses."""

    def __init__(self, stub: pb_grpc.TailnetStub, metadata: tuple[tuple[str, str], ...]) -> None:
        self._q: asyncio.Queue[pb.CoordinateRequest | None] = asyncio.Queue()
        self.call = stub.Coordinate(self._requests(), metadata=metadata)
        # Iterate (not call.read()): read() drops messages still buffered once the
        # status has arrived; the iterator yields every message, then the status.
        self._responses = self.call.__aiter__()

    async def _requests(self) -> AsyncIterator[pb.CoordinateRequest]:
        while True:
            req = await self._q.get()
            if req is None:
                return
            yield req

    def send(self, req: pb.CoordinateRequest) -> None:
        self._q.put_nowait(req)

    def done_writing(self) -> None:
        self._q.put_nowait(None)

    async def peer_id(self) -> uuid.UUID:
        md = await asyncio.wait_for(self.call.initial_metadata(), T)
        return uuid.UUID(dict(md)["tailnet-peer-id"])

    async def recv(self) -> pb.CoordinateResponse:
        try:
            resp = await asyncio.wait_for(anext(self._responses), T)
        except StopAsyncIteration:
            raise AssertionError("stream ended unexpectedly") from None
        assert isinstance(resp, pb.CoordinateResponse)
        return resp

    async def expect(
        self, pred: Callable[[pb.CoordinateResponse.PeerUpdate], bool]
    ) -> pb.CoordinateResponse.PeerUpdate:
        """Read responses until a peer update matching ``pred`` arrives."""
        while True:
            resp = await self.recv()
            assert not resp.error, f"unexpected error {resp.error!r}"
            for u in resp.peer_updates:
                if pred(u):
                    return u

    async def expect_update(
        self, kind: int, about: uuid.UUID, reason: str | None = None
    ) -> pb.CoordinateResponse.PeerUpdate:
        u = await self.expect(lambda u: u.kind == kind and u.id == about.bytes)
        if reason is not None:
            assert u.reason == reason
        return u

    async def expect_end(self) -> tuple[list[pb.CoordinateResponse], grpc.StatusCode, str]:
        """Read to the end; return the remaining responses, status code and details."""
        rest: list[pb.CoordinateResponse] = []
        while True:
            try:
                resp = await asyncio.wait_for(anext(self._responses), T)
            except StopAsyncIteration:
                break
            rest.append(resp)
        code = await asyncio.wait_for(self.call.code(), T)
        details = await self.call.details()
        return rest, code, details or ""

    async def expect_error_end(self) -> tuple[str, grpc.StatusCode, str]:
        """Read to the end: (last ``error`` response text, status code, status details)."""
        rest: list[pb.CoordinateResponse] = []
        try:
            while True:
                rest.append(await asyncio.wait_for(anext(self._responses), T))
        except StopAsyncIteration:
            code, details = await end_status(self.call)
        except grpc.aio.AioRpcError as exc:  # non-OK status, after every message
            code, details = exc.code(), exc.details() or ""
        errors = [r.error for r in rest if r.error]
        return (errors[-1] if errors else ""), code, details


async def end_status(call: grpc.aio.Call) -> tuple[grpc.StatusCode, str]:
    code = await asyncio.wait_for(call.code(), T)
    return code, (await call.details()) or ""


def node_for(peer_id: uuid.UUID, *, derp: int = 999, endpoints: int = 0) -> pb.Node:
    addr = f"{addr_from_uuid(TAILSCALE_SERVICE_PREFIX, peer_id)}/128"
    return pb.Node(
        id=peer_id.int & 0x7FFFFFFF,
        key=b"np" + peer_id.bytes * 2,
        disco="discokey:" + peer_id.hex * 2,
        preferred_derp=derp,
        addresses=[addr],
        allowed_ips=[addr],
        endpoints=[f"192.0.2.{i % 250}:{1000 + i}" for i in range(endpoints)],
    )


def update_self(peer_id: uuid.UUID, **kw: int) -> pb.CoordinateRequest:
    return pb.CoordinateRequest(
        update_self=pb.CoordinateRequest.UpdateSelf(node=node_for(peer_id, **kw))
    )


def add_tunnel(dst: uuid.UUID) -> pb.CoordinateRequest:
    return pb.CoordinateRequest(add_tunnel=pb.CoordinateRequest.Tunnel(id=dst.bytes))


async def make_stack(limits: Limits = DEFAULT_LIMITS, **service_kw: object) -> Stack:
    clock = FakeClock()
    coordinator = Coordinator(limits=limits)
    derp = StaticDERPMapSource(new_derp_map(embedded_region("127.0.0.1", 3340, scheme="http")))
    workspaces = InMemoryWorkspaceProvider()
    workspaces.upsert_workspace(USER, WS, "ws")
    workspaces.upsert_agent(WS, AGENT, "main")
    workspaces.upsert_agent(WS, AGENT2, "second")
    workspaces.upsert_workspace(OTHER_USER, OTHER_WS, "theirs")
    workspaces.upsert_agent(OTHER_WS, OTHER_AGENT, "main")
    resume = ResumeTokenProvider(ResumeKeyStore.generate(now=clock()), clock=clock)
    service = TailnetService(
        coordinator=coordinator,
        authenticator=StaticTokenAuthenticator(TOKENS),
        derp_maps=derp,
        resume=resume,
        workspaces=workspaces,
        limits=limits,
        **service_kw,  # type: ignore[arg-type]
    )
    server = TailnetGrpcServer(service)
    await server.start("127.0.0.1", 0)
    channel = grpc.aio.insecure_channel(
        server.target, options=[("grpc.http2.bdp_probe", 0)]
    )
    return Stack(
        server, service, coordinator, derp, workspaces, resume, clock, channel,
        pb_grpc.TailnetStub(channel),
    )


@pytest.fixture
async def stack() -> AsyncIterator[Stack]:
    s = await make_stack()
    try:
        yield s
    finally:
        for p in s.peers:
            p.call.cancel()
        await s.channel.close()
        await s.server.stop(0)


async def connect_agent(s: Stack, token: str = "agent-token") -> tuple[Peer, uuid.UUID]:
    agent = s.peer(token)
    agent_id = await agent.peer_id()
    agent.send(update_self(agent_id))
    return agent, agent_id


async def connect_client(s: Stack, agent_id: uuid.UUID, **md: str) -> tuple[Peer, uuid.UUID]:
    client = s.peer("user-token", tailnet_agent_id=str(agent_id), **md)
    cid = await client.peer_id()
    client.send(add_tunnel(agent_id))
    client.send(update_self(cid))
    return client, cid


# --------------------------------------------------------------------------- Coordinate


async def test_agent_and_client_exchange_nodes_and_rfh(stack: Stack) -> None:
    agent, agent_id = await connect_agent(stack)
    assert agent_id == AGENT  # agents coordinate as their agent ID
    client, cid = await connect_client(stack, AGENT)
    assert cid not in (AGENT, USER)
    u = await client.expect_update(Kind.NODE, AGENT)
    assert u.node.preferred_derp == 999 and u.node.key == node_for(AGENT).key
    await agent.expect_update(Kind.NODE, cid)
    agent.send(
        pb.CoordinateRequest(
            ready_for_handshake=[pb.CoordinateRequest.ReadyForHandshake(id=cid.bytes)]
        )
    )
    await client.expect_update(Kind.READY_FOR_HANDSHAKE, AGENT)
    assert (cid, AGENT) in stack.coordinator.tunnels()


async def test_graceful_disconnect_is_disconnected(stack: Stack) -> None:
    agent, _ = await connect_agent(stack)
    client, cid = await connect_client(stack, AGENT)
    await agent.expect_update(Kind.NODE, cid)
    client.send(pb.CoordinateRequest(disconnect=pb.CoordinateRequest.Disconnect()))
    await agent.expect_update(Kind.DISCONNECTED, cid, "graceful disconnect")
    rest, code, _ = await client.expect_end()
    assert code == SC.OK and not any(r.error for r in rest)


@pytest.mark.parametrize("how", ["half_close", "cancel"])
async def test_dropped_stream_is_lost(stack: Stack, how: str) -> None:
    agent, _ = await connect_agent(stack)
    client, cid = await connect_client(stack, AGENT)
    await agent.expect_update(Kind.NODE, cid)
    if how == "half_close":
        client.done_writing()
    else:
        client.call.cancel()
    await agent.expect_update(Kind.LOST, cid, "lost")
    assert not stack.coordinator.is_connected(cid)


async def test_duplicate_peer_id_overwrites_old_connection(stack: Stack) -> None:
    agent1, _ = await connect_agent(stack)
    client, cid = await connect_client(stack, AGENT)
    await agent1.expect_update(Kind.NODE, cid)
    agent2, agent2_id = await connect_agent(stack)
    assert agent2_id == AGENT
    error, code, _ = await agent1.expect_error_end()
    assert error == "peer ID overwritten by new connection" and code == SC.OK
    # The new connection inherited the tunnel: it gets the client's node ("init").
    await agent2.expect_update(Kind.NODE, cid, "init")
    # The client was told nothing about LOST/DISCONNECTED; its stream still works.
    client.send(update_self(cid, derp=1))
    u = await agent2.expect_update(Kind.NODE, cid, "node update")
    assert u.node.preferred_derp == 1
    assert stack.coordinator.is_connected(cid)


@pytest.mark.parametrize(
    ("req", "text"),
    [
        (pb.CoordinateRequest(update_self=pb.CoordinateRequest.UpdateSelf()),
         "update_self node is required"),
        (pb.CoordinateRequest(add_tunnel=pb.CoordinateRequest.Tunnel(id=b"abc")),
         "add_tunnel.id must be a 16-byte UUID"),
        (pb.CoordinateRequest(remove_tunnel=pb.CoordinateRequest.Tunnel(id=b"x" * 17)),
         "remove_tunnel.id must be a 16-byte UUID"),
    ],
)
async def test_malformed_request_ends_only_that_stream(
    stack: Stack, req: pb.CoordinateRequest, text: str
) -> None:
    agent, _ = await connect_agent(stack)
    bystander, bid = await connect_client(stack, AGENT)
    await agent.expect_update(Kind.NODE, bid)
    bad = stack.peer("cp-token")
    bad_id = await bad.peer_id()
    bad.send(add_tunnel(AGENT))
    bad.send(update_self(bad_id))
    await agent.expect_update(Kind.NODE, bad_id)
    bad.send(req)
    error, code, details = await bad.expect_error_end()
    assert code == SC.INVALID_ARGUMENT
    assert text in error and text in details
    await agent.expect_update(Kind.LOST, bad_id)
    # Others are undisturbed.
    bystander.send(update_self(bid, derp=7))
    u = await agent.expect_update(Kind.NODE, bid, "node update")
    assert u.node.preferred_derp == 7


async def _expect_denied(peer: Peer, text: str) -> None:
    error, code, details = await peer.expect_error_end()
    assert code == SC.PERMISSION_DENIED, (code, details)
    assert error.startswith("authorization: ") and text in error
    assert text in details


async def test_agent_cannot_open_tunnels(stack: Stack) -> None:
    agent, _ = await connect_agent(stack)
    agent.send(add_tunnel(AGENT2))
    await _expect_denied(agent, "agents cannot open tunnels")


async def test_agent_address_must_match_its_id(stack: Stack) -> None:
    agent = stack.peer("agent-token")
    await agent.peer_id()
    agent.send(update_self(AGENT2))  # addresses derived from someone else's ID
    await _expect_denied(agent, "invalid node address")


async def test_client_bound_to_agent_cannot_tunnel_elsewhere(stack: Stack) -> None:
    client = stack.peer("user-token", tailnet_agent_id=str(AGENT))
    await client.peer_id()
    client.send(add_tunnel(AGENT2))
    await _expect_denied(client, f"invalid agent id, expected {AGENT}")


async def test_client_cannot_send_ready_for_handshake(stack: Stack) -> None:
    client = stack.peer("user-token", tailnet_agent_id=str(AGENT))
    await client.peer_id()
    client.send(
        pb.CoordinateRequest(
            ready_for_handshake=[pb.CoordinateRequest.ReadyForHandshake(id=AGENT.bytes)]
        )
    )
    await _expect_denied(client, "clients may not send ready_for_handshake")


async def test_client_addresses_must_be_single_hosts(stack: Stack) -> None:
    client = stack.peer("user-token", tailnet_agent_id=str(AGENT))
    await client.peer_id()
    node = node_for(uuid.uuid4())
    node.addresses[:] = ["fd7a:115c:a1e0::/64"]
    client.send(pb.CoordinateRequest(update_self=pb.CoordinateRequest.UpdateSelf(node=node)))
    error, code, _ = await client.expect_error_end()
    assert code == SC.PERMISSION_DENIED and error.startswith("authorization: ")


async def test_user_policy_tunnels_only_to_readable_agents(stack: Stack) -> None:
    agent, _ = await connect_agent(stack)
    user = stack.peer("user-token")  # no agent id: UserPolicy
    uid = await user.peer_id()
    user.send(add_tunnel(AGENT))
    user.send(update_self(uid))
    await agent.expect_update(Kind.NODE, uid)
    user.send(add_tunnel(OTHER_AGENT))
    await _expect_denied(user, "workspace agent not found or you do not have permission")
    await agent.expect_update(Kind.LOST, uid)


async def test_user_cannot_bind_to_foreign_agent(stack: Stack) -> None:
    call = stack.peer("user-token", tailnet_agent_id=str(OTHER_AGENT)).call
    code, details = await end_status(call)
    assert code == SC.PERMISSION_DENIED
    assert "workspace agent not found or you do not have permission" in details
    bad = stack.peer("user-token", tailnet_agent_id="not-a-uuid").call
    assert (await end_status(bad))[0] == SC.INVALID_ARGUMENT


async def test_control_plane_is_unrestricted(stack: Stack) -> None:
    agent, _ = await connect_agent(stack)
    cp = stack.peer("cp-token")
    cp_id = await cp.peer_id()
    assert cp_id != CP
    cp.send(add_tunnel(AGENT))
    cp.send(add_tunnel(OTHER_AGENT))
    node = node_for(cp_id)
    node.addresses[:] = ["10.0.0.0/8"]
    cp.send(pb.CoordinateRequest(update_self=pb.CoordinateRequest.UpdateSelf(node=node)))
    u = await agent.expect_update(Kind.NODE, cp_id)
    assert list(u.node.addresses) == ["10.0.0.0/8"]


@pytest.mark.parametrize(
    "metadata",
    [(), (("authorization", "Bearer nope"),), (("coder-session-token", "nope"),),
     (("authorization", "Basic dXNlcjpwYXNz"),)],
)
async def test_missing_or_unknown_token_is_unauthenticated(
    stack: Stack, metadata: tuple[tuple[str, str], ...]
) -> None:
    call = stack.stub.Coordinate(iter(()), metadata=metadata)
    code, details = await end_status(call)
    assert code == SC.UNAUTHENTICATED and "session token" in details
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await asyncio.wait_for(
            stack.stub.PostTelemetry(pb.TelemetryRequest(), metadata=metadata), T
        )
    assert exc.value.code() == SC.UNAUTHENTICATED


async def test_session_token_header_is_accepted(stack: Stack) -> None:
    resp = await asyncio.wait_for(
        stack.stub.PostTelemetry(
            pb.TelemetryRequest(), metadata=(("coder-session-token", "user-token"),)
        ),
        T,
    )
    assert resp == pb.TelemetryResponse()


@pytest.mark.parametrize(
    ("version", "code"),
    [("2.0", SC.OK), ("2.3", SC.OK), ("2.4", SC.FAILED_PRECONDITION),
     ("3.0", SC.FAILED_PRECONDITION), ("1.0", SC.FAILED_PRECONDITION),
     ("two", SC.INVALID_ARGUMENT), ("2", SC.INVALID_ARGUMENT)],
)
async def test_version_negotiation(stack: Stack, version: str, code: grpc.StatusCode) -> None:
    md = md_for("user-token", tailnet_version=version)
    if code == SC.OK:
        await asyncio.wait_for(stack.stub.PostTelemetry(pb.TelemetryRequest(), metadata=md), T)
        return
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await asyncio.wait_for(stack.stub.PostTelemetry(pb.TelemetryRequest(), metadata=md), T)
    assert exc.value.code() == code
    assert "API version" in (exc.value.details() or "")
    call = stack.stub.Coordinate(iter(()), metadata=md)
    assert (await end_status(call))[0] == code


async def test_slow_consumer_is_evicted_alone(stack: Stack) -> None:
    agent, _ = await connect_agent(stack)
    slow, slow_id = await connect_client(stack, AGENT)
    fast, fast_id = await connect_client(stack, AGENT)
    await agent.expect_update(Kind.NODE, slow_id)
    await agent.expect_update(Kind.NODE, fast_id)
    # `slow` never reads. The agent floods node updates (4 KiB each) until the
    # coordinator evicts `slow` (its 512-response queue plus the HTTP/2 windows fill).
    evicted = asyncio.ensure_future(
        agent.expect_update(Kind.DISCONNECTED, slow_id, "failed update")
    )

    # `fast` keeps reading throughout (cancelling a pending gRPC read would cancel
    # the call, so the reader runs until it sees the marker update sent at the end).
    fast_done = asyncio.ensure_future(
        fast.expect(lambda u: u.kind == Kind.NODE and u.node.preferred_derp == 4242)
    )
    for i in range(20_000):
        agent.send(update_self(AGENT, derp=1 + i % 1000, endpoints=120))
        if i % 64 == 63:
            await asyncio.wait({evicted}, timeout=0.05)
            if evicted.done():
                break
    await asyncio.wait_for(evicted, T)
    assert not stack.coordinator.is_connected(slow_id)
    assert stack.coordinator.is_connected(fast_id)
    error, code, _ = await slow.expect_error_end()
    assert error == "failed to update tunnel peer mapping" and code == SC.OK
    # The fast client still gets fresh updates.
    agent.send(update_self(AGENT, derp=4242))
    await asyncio.wait_for(fast_done, T)


async def test_graceful_shutdown_marks_peers_lost(stack: Stack) -> None:
    agent, _ = await connect_agent(stack)
    client, cid = await connect_client(stack, AGENT)
    await client.expect_update(Kind.NODE, AGENT)
    await agent.expect_update(Kind.NODE, cid)
    derp_call = stack.stub.StreamDERPMaps(pb.StreamDERPMapsRequest(), metadata=md_for("user-token"))
    await asyncio.wait_for(derp_call.read(), T)
    await asyncio.wait_for(stack.server.stop(5.0), T)
    # Both ends hear LOST about the other before their streams end cleanly.
    await client.expect_update(Kind.LOST, AGENT, "coordinator close")
    await agent.expect_update(Kind.LOST, cid, "coordinator close")
    error, code, _ = await client.expect_error_end()
    assert error == "coordinator closed" and code == SC.OK
    assert (await agent.expect_error_end())[:2] == ("coordinator closed", SC.OK)
    assert await asyncio.wait_for(derp_call.read(), T) is grpc.aio.EOF
    assert (await end_status(derp_call))[0] == SC.OK


# --------------------------------------------------------------------------- resume tokens


async def _refresh(s: Stack, token: str, peer_id: uuid.UUID) -> pb.RefreshResumeTokenResponse:
    return await asyncio.wait_for(
        s.stub.RefreshResumeToken(
            pb.RefreshResumeTokenRequest(), metadata=md_for(token, tailnet_peer_id=str(peer_id))
        ),
        T,
    )


async def test_resume_token_keeps_peer_id(stack: Stack) -> None:
    agent, _ = await connect_agent(stack)
    client, cid = await connect_client(stack, AGENT)
    await agent.expect_update(Kind.NODE, cid)
    resp = await _refresh(stack, "user-token", cid)
    header = jwt.get_unverified_header(resp.token)
    assert header["alg"] == "HS512" and header["kid"] == "1"
    claims = jwt.decode(resp.token, options={"verify_signature": False})
    assert claims["sub"] == str(cid) and claims["principal"] == f"user:{USER}"
    assert claims["exp"] == int(stack.clock.now) + 24 * 3600
    assert resp.refresh_in.ToSeconds() == 12 * 3600
    assert resp.expires_at.ToSeconds() == int(stack.clock.now) + 24 * 3600
    # Reconnect (the old stream dies first) with the token: same peer ID, agent sees
    # LOST then NODE for the same peer.
    client.call.cancel()
    await agent.expect_update(Kind.LOST, cid)
    again, again_id = await connect_client(stack, AGENT, tailnet_resume_token=resp.token)
    assert again_id == cid
    await agent.expect_update(Kind.NODE, cid)
    # Rotation: old tokens stay valid, new ones carry the next kid.
    stack.resume.rotate()
    assert jwt.get_unverified_header((await _refresh(stack, "user-token", cid)).token)["kid"] == "2"
    third = stack.peer("user-token", tailnet_resume_token=resp.token)
    assert await third.peer_id() == cid


async def _resume_refused(s: Stack, token: str) -> str:
    call = s.peer("user-token", tailnet_resume_token=token).call
    code, details = await end_status(call)
    assert code == SC.UNAUTHENTICATED
    assert details.startswith("Invalid resume token: resume_token")
    return details


async def test_invalid_resume_tokens_are_refused(stack: Stack) -> None:
    client = stack.peer("user-token")
    cid = await client.peer_id()
    good = (await _refresh(stack, "user-token", cid)).token
    forged = jwt.encode(
        {"sub": str(uuid.uuid4()), "exp": int(stack.clock.now) + 60},
        b"k" * 64, algorithm="HS512", headers={"kid": "1"},
    )
    assert "bad signature" in await _resume_refused(stack, forged)
    assert "malformed" in await _resume_refused(stack, "garbage")
    unknown_kid = jwt.encode(
        {"sub": str(cid), "exp": int(stack.clock.now) + 60},
        b"k" * 64, algorithm="HS512", headers={"kid": "77"},
    )
    assert "unknown" in await _resume_refused(stack, unknown_kid)
    stack.clock.now += 24 * 3600 + 1
    assert "expired" in await _resume_refused(stack, good)


async def test_refresh_resume_token_preconditions(stack: Stack) -> None:
    async def status(token: str, **md: str) -> grpc.StatusCode:
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await asyncio.wait_for(
                stack.stub.RefreshResumeToken(
                    pb.RefreshResumeTokenRequest(), metadata=md_for(token, **md)
                ),
                T,
            )
        return exc.value.code()

    client = stack.peer("user-token")
    cid = await client.peer_id()
    assert await status("agent-token", tailnet_peer_id=str(AGENT)) == SC.UNIMPLEMENTED
    assert await status("user-token") == SC.FAILED_PRECONDITION  # no tailnet-peer-id
    assert await status("user-token", tailnet_peer_id="xyz") == SC.INVALID_ARGUMENT
    assert await status("user-token", tailnet_peer_id=str(uuid.uuid4())) == SC.FAILED_PRECONDITION
    # Someone else's live peer.
    assert await status("other-token", tailnet_peer_id=str(cid)) == SC.FAILED_PRECONDITION
    await _refresh(stack, "user-token", cid)


# --------------------------------------------------------------------------- DERP maps


async def test_derp_maps_pushed_on_change_including_home_params(stack: Stack) -> None:
    call = stack.stub.StreamDERPMaps(pb.StreamDERPMapsRequest(), metadata=md_for("agent-token"))
    first = await asyncio.wait_for(call.read(), T)
    assert isinstance(first, pb.DERPMap)
    assert first.HasField("home_params")
    assert first.regions[999].nodes[0].name == "999b" and first.regions[999].nodes[0].force_http
    same = pb.DERPMap()
    same.CopyFrom(first)
    stack.derp.set(same)  # equal: not pushed
    changed = pb.DERPMap()
    changed.CopyFrom(first)
    changed.home_params.region_score[999] = 0.5  # HomeParams-only change
    stack.derp.set(changed)
    second = await asyncio.wait_for(call.read(), T)
    assert second.home_params.region_score[999] == 0.5
    port80 = pb.DERPMap()
    port80.CopyFrom(changed)
    port80.regions[999].nodes[0].can_port_80 = True  # CanPort80-only change
    stack.derp.set(port80)
    third = await asyncio.wait_for(call.read(), T)
    assert third.regions[999].nodes[0].can_port_80
    call.cancel()


# --------------------------------------------------------------------------- telemetry


async def test_post_telemetry_counts_and_validates(stack: Stack) -> None:
    md = md_for("user-token")
    ev = pb.TelemetryEvent(id=uuid.uuid4().bytes, application="cli", home_derp=999)
    await asyncio.wait_for(stack.stub.PostTelemetry(pb.TelemetryRequest(events=[ev, ev]), metadata=md), T)
    assert stack.service.telemetry.events == 2 and stack.service.telemetry.requests == 1
    assert [e.application for e in stack.service.telemetry.recent()] == ["cli", "cli"]
    bad = pb.TelemetryEvent(id=b"short")
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await asyncio.wait_for(
            stack.stub.PostTelemetry(pb.TelemetryRequest(events=[ev, bad]), metadata=md), T
        )
    assert exc.value.code() == SC.INVALID_ARGUMENT and "events[1].id" in (exc.value.details() or "")
    assert stack.service.telemetry.events == 2 and stack.service.telemetry.rejected == 1


# --------------------------------------------------------------------------- workspace updates


async def test_workspace_updates_snapshot_then_diffs(stack: Stack) -> None:
    call = stack.stub.WorkspaceUpdates(
        pb.WorkspaceUpdatesRequest(workspace_owner_id=USER.bytes),
        metadata=md_for("user-token", tailnet_version="2.3"),
    )
    snap = await asyncio.wait_for(call.read(), T)
    assert isinstance(snap, pb.WorkspaceUpdate)
    assert [w.id for w in snap.upserted_workspaces] == [WS.bytes]
    assert {a.id for a in snap.upserted_agents} == {AGENT.bytes, AGENT2.bytes}
    assert not snap.deleted_workspaces and not snap.deleted_agents
    # Another owner's change is not streamed; ours is, as a diff.
    stack.workspaces.upsert_agent(OTHER_WS, uuid.uuid4(), "x")
    stack.workspaces.upsert_workspace(USER, WS, "ws", pb.Workspace.STOPPED)
    diff = await asyncio.wait_for(call.read(), T)
    assert [(w.id, w.status) for w in diff.upserted_workspaces] == [(WS.bytes, pb.Workspace.STOPPED)]
    assert not diff.upserted_agents and not diff.deleted_agents
    stack.workspaces.delete_agent(AGENT2)
    diff = await asyncio.wait_for(call.read(), T)
    assert [(a.id, a.name) for a in diff.deleted_agents] == [(AGENT2.bytes, "second")]
    call.cancel()


async def test_workspace_updates_filter_by_access(stack: Stack) -> None:
    call = stack.stub.WorkspaceUpdates(
        pb.WorkspaceUpdatesRequest(workspace_owner_id=USER.bytes),
        metadata=md_for("other-token"),
    )
    snap = await asyncio.wait_for(call.read(), T)
    assert snap == pb.WorkspaceUpdate()  # nothing readable: empty snapshot
    stack.workspaces.share_workspace(WS, OTHER_USER)
    diff = await asyncio.wait_for(call.read(), T)
    assert [w.id for w in diff.upserted_workspaces] == [WS.bytes]
    call.cancel()
    for token, owner, code in [
        ("agent-token", USER.bytes, SC.UNIMPLEMENTED),
        ("user-token", b"\x01\x02", SC.INVALID_ARGUMENT),
    ]:
        bad = stack.stub.WorkspaceUpdates(
            pb.WorkspaceUpdatesRequest(workspace_owner_id=owner), metadata=md_for(token)
        )
        assert (await end_status(bad))[0] == code


# --------------------------------------------------------------------------- uvloop


def test_grpc_stack_runs_on_uvloop() -> None:
    async def scenario() -> None:
        assert isinstance(asyncio.get_running_loop(), uvloop.Loop)
        s = await make_stack()
        try:
            agent, _ = await connect_agent(s)
            client, cid = await connect_client(s, AGENT)
            await client.expect_update(Kind.NODE, AGENT)
            await agent.expect_update(Kind.NODE, cid)
            derp = s.stub.StreamDERPMaps(pb.StreamDERPMapsRequest(), metadata=md_for("user-token"))
            assert isinstance(await asyncio.wait_for(derp.read(), T), pb.DERPMap)
            derp.cancel()
            await asyncio.wait_for(s.server.stop(5.0), T)
            await client.expect_update(Kind.LOST, AGENT, "coordinator close")
        finally:
            for p in s.peers:
                p.call.cancel()
            await s.channel.close()
            await s.server.stop(0)

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(asyncio.wait_for(scenario(), 60))


# --------------------------------------------------------------------------- failing backends


class _BrokenAuthenticator:
    async def authenticate(self, token: str) -> Principal | None:
        raise RuntimeError("database down")


async def test_failing_backends_fail_closed_without_leaking_details() -> None:
    async def broken_authorizer(principal: Principal, agent_id: uuid.UUID) -> bool:
        raise RuntimeError("secret internal detail")

    s = await make_stack(tunnel_authorizer=broken_authorizer)
    try:
        call = s.peer("user-token", tailnet_agent_id=str(AGENT)).call
        code, details = await end_status(call)
        assert code == SC.PERMISSION_DENIED and "secret" not in details
        s.service._auth = _BrokenAuthenticator()  # noqa: SLF001 (test-only swap)
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await asyncio.wait_for(
                s.stub.PostTelemetry(pb.TelemetryRequest(), metadata=md_for("user-token")), T
            )
        assert exc.value.code() == SC.UNAVAILABLE
        assert "database" not in (exc.value.details() or "")
    finally:
        for p in s.peers:
            p.call.cancel()
        await s.channel.close()
        await s.server.stop(0)


# --------------------------------------------------------------------------- QueueSink


def _resp(n: int) -> pb.CoordinateResponse:
    return pb.CoordinateResponse(error=f"r{n}")


async def test_queue_sink_back_pressure_and_final_error() -> None:
    from tailnet.service import QueueSink, Status

    sink = QueueSink(maxsize=2)
    assert sink.send(_resp(1)) and sink.send(_resp(2))
    assert not sink.send(_resp(3))  # full: the coordinator evicts this peer
    assert len(sink) == 2
    sink.fail(Status.INVALID_ARGUMENT, "bad request")
    sink.fail(Status.INTERNAL, "later failure")  # the first failure decides
    sink.close("ignored")
    assert sink.send(_resp(4))  # dropped after close, reported as accepted
    got = [r.error async for r in sink.drain()]
    assert got == ["r1", "r2", "bad request"]  # queued first, close error last
    assert sink.failure is not None and sink.failure.status is Status.INVALID_ARGUMENT


async def test_queue_sink_wait_wakes_on_send_and_on_close() -> None:
    from tailnet.service import QueueSink

    sink = QueueSink()
    waiter = asyncio.ensure_future(sink.wait())
    await asyncio.sleep(0)  # let the consumer park (a yield, not a timed wait)
    assert sink._waiter is not None  # parked: the send below must wake it
    assert sink.send(_resp(1))
    await asyncio.wait_for(waiter, T)
    assert sink.pop() is not None and sink.pop() is None
    waiter = asyncio.ensure_future(sink.wait())
    await asyncio.sleep(0)
    assert sink._waiter is not None
    sink.close()
    await asyncio.wait_for(waiter, T)
    assert [r async for r in sink.drain()] == []  # closed without error: no final response
