"""RPC over WebSocket: the pure framing codec and the server path end to end."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tailnet.config import StackConfig
from tailnet.derpmap import embedded_region, new_derp_map
from tailnet.stack import AgentCredentials, TailnetStack
from tailnet.v2 import tailnet_pb2 as pb
from tailnet.wsrpc import (
    METHOD_COORDINATE,
    METHOD_STREAM_DERP_MAPS,
    Frame,
    FrameError,
    FrameKind,
    RpcError,
    StatusCode,
    WsRpcClient,
    decode_end,
    decode_frame,
    encode_end,
    encode_frame,
    encode_message,
    encode_open,
)

T = 10.0
Kind = pb.CoordinateResponse.PeerUpdate


# --------------------------------------------------------------------------- codec


def test_golden_bytes() -> None:
    assert encode_open(1, "/x") == b"\x01\x00\x00\x00\x01/x"
    assert encode_frame(FrameKind.CLOSE_SEND, 0x01020304) == b"\x03\x01\x02\x03\x04"
    assert encode_end(7, 16, "no") == b"\x04\x00\x00\x00\x07\x00\x00\x00\x10no"
    assert decode_end(b"\x00\x00\x00\x0cunknown rpc: /a") == (12, "unknown rpc: /a")


@given(
    kind=st.sampled_from([FrameKind.MESSAGE, FrameKind.CLOSE_SEND, FrameKind.END, FrameKind.CANCEL]),
    sid=st.integers(1, 2**32 - 1),
    payload=st.binary(max_size=64),
)
def test_round_trip(kind: FrameKind, sid: int, payload: bytes) -> None:
    assert decode_frame(encode_frame(kind, sid, payload)) == Frame(kind, sid, payload)


@given(sid=st.integers(1, 2**32 - 1), method=st.text(min_size=1, max_size=40))
def test_open_round_trip(sid: int, method: str) -> None:
    f = decode_frame(encode_open(sid, method))
    assert (f.kind, f.stream_id, f.payload.decode()) == (FrameKind.OPEN, sid, method)


@given(st.binary(max_size=32))
def test_decoder_is_total(data: bytes) -> None:
    try:
        decode_frame(data)
    except FrameError:
        pass


@pytest.mark.parametrize(
    "data",
    [b"", b"\x02\x00\x00\x00", b"\x09\x00\x00\x00\x01", b"\x02\x00\x00\x00\x00x",
     b"\x01\x00\x00\x00\x01", b"\x01\x00\x00\x00\x01\xff\xfe"],
)
def test_malformed_frames(data: bytes) -> None:
    with pytest.raises(FrameError):
        decode_frame(data)


def test_encode_rejects_bad_stream_ids() -> None:
    for sid in (0, 2**32):
        with pytest.raises(FrameError):
            encode_frame(FrameKind.MESSAGE, sid)
    with pytest.raises(FrameError):
        decode_end(b"\x00\x00")


# --------------------------------------------------------------------------- server path


@pytest.fixture
async def stack() -> AsyncIterator[TailnetStack]:
    s = TailnetStack(StackConfig(http_addr="127.0.0.1:0", grpc_addr=None, stun_addr=None))
    await s.start()
    try:
        yield s
    finally:
        await s.stop()


def _node(key_byte: int, addr: str, region: int = 999) -> pb.Node:
    return pb.Node(id=key_byte, key=b"np" + bytes([key_byte]) * 32, preferred_derp=region,
                   addresses=[addr + "/128"], allowed_ips=[addr + "/128"])


def _agent_addr(agent_id: uuid.UUID) -> str:
    from tailnet.auth import TAILSCALE_SERVICE_PREFIX, addr_from_uuid

    return str(addr_from_uuid(TAILSCALE_SERVICE_PREFIX, agent_id))


async def _next_update(stream: object) -> pb.CoordinateResponse:
    from tailnet.wsrpc import RpcStream

    assert isinstance(stream, RpcStream)
    while True:
        resp = await asyncio.wait_for(stream.recv(pb.CoordinateResponse), T)
        assert resp is not None
        if resp.peer_updates:
            return resp


async def _pair(stack: TailnetStack) -> tuple[AgentCredentials, str, WsRpcClient, WsRpcClient]:
    uid, user_token = stack.create_user()
    agent = stack.create_agent(owner_id=uid)
    ac = await WsRpcClient.connect(f"{stack.ws_url}/api/v2/workspaceagents/me/rpc?version=2.3", agent.token)
    cc = await WsRpcClient.connect(
        f"{stack.ws_url}/api/v2/workspaceagents/{agent.agent_id}/coordinate?version=2.3", user_token
    )
    return agent, user_token, ac, cc


async def test_coordinate_agent_and_client_over_websockets(stack: TailnetStack) -> None:
    agent, _, ac, cc = await _pair(stack)
    try:
        a = await ac.coordinate()
        c = await cc.coordinate()
        await a.send(pb.CoordinateRequest(
            update_self=pb.CoordinateRequest.UpdateSelf(node=_node(1, _agent_addr(agent.agent_id)))))
        await c.send(pb.CoordinateRequest(
            add_tunnel=pb.CoordinateRequest.Tunnel(id=agent.agent_id.bytes),
            update_self=pb.CoordinateRequest.UpdateSelf(node=_node(2, "fd7a:115c:a1e0::2")),
        ))
        # the client learns the agent's node (order of NODE/ack depends on timing)
        resp = await _next_update(c)
        upd = resp.peer_updates[0]
        assert upd.kind == Kind.NODE and uuid.UUID(bytes=upd.id) == agent.agent_id
        assert upd.node.key == b"np" + b"\x01" * 32 and upd.node.preferred_derp == 999
        # the agent learns the client's node and acks it
        resp = await _next_update(a)
        upd = resp.peer_updates[0]
        assert upd.kind == Kind.NODE and str(uuid.UUID(bytes=upd.id)) == cc.peer_id
        await a.send(pb.CoordinateRequest(
            ready_for_handshake=[pb.CoordinateRequest.ReadyForHandshake(id=upd.id)]))
        resp = await _next_update(c)
        assert resp.peer_updates[0].kind == Kind.READY_FOR_HANDSHAKE
        # graceful disconnect of the client: the agent sees DISCONNECTED, the stream ends OK
        await c.send(pb.CoordinateRequest(disconnect=pb.CoordinateRequest.Disconnect()))
        await c.close_send()
        assert await asyncio.wait_for(c.recv(pb.CoordinateResponse), T) is None
        resp = await _next_update(a)
        assert resp.peer_updates[0].kind == Kind.DISCONNECTED
    finally:
        await cc.close()
        await ac.close()


async def test_policy_violation_ends_only_that_stream(stack: TailnetStack) -> None:
    agent, _, ac, cc = await _pair(stack)
    try:
        c = await cc.coordinate()
        other = uuid.uuid4()
        await c.send(pb.CoordinateRequest(add_tunnel=pb.CoordinateRequest.Tunnel(id=other.bytes)))
        with pytest.raises(RpcError) as info:
            async for _ in c.iter(pb.CoordinateResponse):
                pass
        assert info.value.code == StatusCode.PERMISSION_DENIED
        assert "invalid agent id" in info.value.message
        # the connection still works for other RPCs
        dm = await cc.stream_derp_maps()
        m = await asyncio.wait_for(dm.recv(pb.DERPMap), T)
        assert m is not None and 999 in m.regions
    finally:
        await cc.close()
        await ac.close()


async def test_stream_derp_maps_and_change(stack: TailnetStack) -> None:
    _, user_token = stack.create_user()
    client = await WsRpcClient.connect(f"{stack.ws_url}/api/v2/tailnet?version=2.3", user_token)
    try:
        s = await client.stream_derp_maps()
        first = await asyncio.wait_for(s.recv(pb.DERPMap), T)
        assert first is not None and first.HasField("home_params")
        src = stack.derp_maps
        assert hasattr(src, "set")
        src.set(new_derp_map(embedded_region("127.0.0.1", 1, scheme="http", region_id=900)))
        second = await asyncio.wait_for(s.recv(pb.DERPMap), T)
        assert second is not None and set(second.regions) == {900}
        await s.cancel()
    finally:
        await client.close()


async def test_refresh_resume_token_and_resume(stack: TailnetStack) -> None:
    uid, user_token = stack.create_user()
    agent = stack.create_agent(owner_id=uid)
    url = f"{stack.ws_url}/api/v2/workspaceagents/{agent.agent_id}/coordinate?version=2.3"
    client = await WsRpcClient.connect(url, user_token)
    try:
        # no live Coordinate stream yet: refused
        with pytest.raises(RpcError) as info:
            await client.refresh_resume_token()
        assert info.value.code == StatusCode.FAILED_PRECONDITION
        c = await client.coordinate()
        await c.send(pb.CoordinateRequest())

        async def refreshed() -> pb.RefreshResumeTokenResponse:
            while True:
                try:
                    return await client.refresh_resume_token()
                except RpcError:
                    await asyncio.sleep(0.02)

        resp = await asyncio.wait_for(refreshed(), T)
        assert resp.token and resp.refresh_in.seconds > 0
        peer = client.peer_id
    finally:
        await client.close()
    again = await WsRpcClient.connect(f"{url}&resume_token={resp.token}", user_token)
    try:
        assert again.peer_id == peer
    finally:
        await again.close()


async def test_agent_connection_has_no_resume_tokens(stack: TailnetStack) -> None:
    agent = stack.create_agent()
    client = await WsRpcClient.connect(f"{stack.ws_url}/api/v2/workspaceagents/me/rpc", agent.token)
    try:
        with pytest.raises(RpcError) as info:
            await client.refresh_resume_token()
        assert info.value.code == StatusCode.UNIMPLEMENTED
    finally:
        await client.close()


async def test_workspace_updates_and_telemetry(stack: TailnetStack) -> None:
    uid, user_token = stack.create_user()
    agent = stack.create_agent(owner_id=uid)
    client = await WsRpcClient.connect(f"{stack.ws_url}/api/v2/tailnet?version=2.3", user_token)
    try:
        s = await client.workspace_updates(pb.WorkspaceUpdatesRequest(workspace_owner_id=uid.bytes))
        upd = await asyncio.wait_for(s.recv(pb.WorkspaceUpdate), T)
        assert upd is not None
        assert [uuid.UUID(bytes=a.id) for a in upd.upserted_agents] == [agent.agent_id]
        await s.cancel()
        assert await client.post_telemetry(pb.TelemetryRequest()) == pb.TelemetryResponse()
    finally:
        await client.close()


async def test_unknown_method_and_bad_protobuf_end_one_stream(stack: TailnetStack) -> None:
    _, user_token = stack.create_user()
    client = await WsRpcClient.connect(f"{stack.ws_url}/api/v2/tailnet", user_token)
    try:
        s = await client.open("/coder.tailnet.v2.Tailnet/Nope")
        with pytest.raises(RpcError) as info:
            await asyncio.wait_for(s.recv_bytes(), T)
        assert info.value.code == StatusCode.UNIMPLEMENTED
        assert info.value.message == "unknown rpc: /coder.tailnet.v2.Tailnet/Nope"
        c = await client.open(METHOD_COORDINATE)
        await c.send(b"\xff\xff\xff")
        with pytest.raises(RpcError) as info:
            await asyncio.wait_for(c.recv_bytes(), T)
        assert info.value.code == StatusCode.INVALID_ARGUMENT
        ok = await client.open(METHOD_STREAM_DERP_MAPS)
        await ok.close_send()  # empty request is fine
        assert await asyncio.wait_for(ok.recv(pb.DERPMap), T) is not None
    finally:
        await client.close()


@pytest.mark.parametrize(
    "bad",
    [b"\x02", "text", encode_message(77, pb.CoordinateRequest()), encode_end(1, 0)],
)
async def test_framing_violation_closes_only_that_connection(
    stack: TailnetStack, bad: bytes | str
) -> None:
    _, user_token = stack.create_user()
    victim = await WsRpcClient.connect(f"{stack.ws_url}/api/v2/tailnet", user_token)
    bystander = await WsRpcClient.connect(f"{stack.ws_url}/api/v2/tailnet", user_token)
    try:
        await victim.send_raw(bad)
        await asyncio.wait_for(victim.closed.wait(), T)
        assert victim.close_code == 1002
        s = await bystander.stream_derp_maps()
        assert await asyncio.wait_for(s.recv(pb.DERPMap), T) is not None
    finally:
        await victim.close()
        await bystander.close()


async def test_duplicate_stream_id_is_a_protocol_error(stack: TailnetStack) -> None:
    _, user_token = stack.create_user()
    client = await WsRpcClient.connect(f"{stack.ws_url}/api/v2/tailnet", user_token)
    try:
        await client.send_raw(encode_open(5, METHOD_STREAM_DERP_MAPS))
        await client.send_raw(encode_open(5, METHOD_STREAM_DERP_MAPS))
        await asyncio.wait_for(client.closed.wait(), T)
        assert client.close_code == 1002
    finally:
        await client.close()


async def test_shutdown_ends_coordinate_and_closes_1001() -> None:
    s = TailnetStack(StackConfig(http_addr="127.0.0.1:0", grpc_addr=None, stun_addr=None))
    await s.start()
    agent = s.create_agent()
    client = await WsRpcClient.connect(f"{s.ws_url}/api/v2/workspaceagents/me/rpc", agent.token)
    try:
        c = await client.coordinate()
        await c.send(pb.CoordinateRequest())
        assert s.service is not None
        coord = s.service.coordinator

        async def registered() -> None:
            while not coord.is_connected(agent.agent_id):
                await asyncio.sleep(0.01)

        await asyncio.wait_for(registered(), T)
        await asyncio.wait_for(s.stop(), T)
        await asyncio.wait_for(client.closed.wait(), T)
        assert client.close_code == 1001
        # the Coordinate stream saw the coordinator's close reason before the socket closed
        msgs = []
        try:
            async for resp in c.iter(pb.CoordinateResponse):
                msgs.append(resp)
        except RpcError:
            pass
        assert any(m.error == "coordinator closed" for m in msgs), (msgs, c.code, c.message)
    finally:
        await client.close()


async def test_extra_messages_on_a_unary_stream_do_not_stall_the_connection(
    stack: TailnetStack,
) -> None:
    """A unary-request runner reads one request; more MESSAGEs than the queue
    holds must be dropped, not block the connection's reader."""
    _, user_token = stack.create_user()
    client = await WsRpcClient.connect(f"{stack.ws_url}/api/v2/tailnet", user_token)
    try:
        maps = await client.stream_derp_maps()
        assert await asyncio.wait_for(maps.recv(pb.DERPMap), T) is not None
        for _ in range(100):
            await maps.send(pb.StreamDERPMapsRequest())
        other = await client.stream_derp_maps()
        assert await asyncio.wait_for(other.recv(pb.DERPMap), T) is not None
    finally:
        await client.close()
