"""HTTP API of the embedded stack: auth, errors, connection info, DERP-map WebSocket, debug pages.

Every test runs a real in-memory :class:`TailnetStack` on 127.0.0.1 ephemeral ports.
"""

from __future__ import annotations

import asyncio
import json
import socket
import urllib.error
import urllib.request
import uuid
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from tailnet.config import StackConfig
from tailnet.derpmap import derp_map_from_json, embedded_region, new_derp_map
from tailnet.stack import TailnetStack
from tailnet.rpc.tailnet_client import TailnetClient
from tailnet.rpc.websocket import DialError

T = 10.0  # generous per-step timeout


async def http_get(
    url: str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    def do() -> tuple[int, dict[str, str], bytes]:
        req = urllib.request.Request(url, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=T) as resp:
                return resp.status, dict(resp.headers), resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), exc.read()

    return await asyncio.wait_for(asyncio.to_thread(do), T * 2)


def err(body: bytes) -> dict[str, Any]:
    doc = json.loads(body)
    assert set(doc) == {"message", "detail", "validations"}
    return doc


def auth(token: str) -> dict[str, str]:
    return {"Coder-Session-Token": token}


# --------------------------------------------------------------------------- credentials


async def test_healthz_needs_no_auth(stack: TailnetStack) -> None:
    status, _, body = await http_get(stack.access_url + "/healthz")
    assert (status, body) == (200, b"OK")


@pytest.mark.parametrize(
    "path",
    [
        "/api/v2/debug/health",
        "/api/v2/debug/coordinator",
        "/api/v2/workspaceagents/connection",
        "/api/v2/workspaceagents/00000000-0000-0000-0000-000000000001/connection",
    ],
)
async def test_plain_endpoints_reject_missing_and_bad_tokens(stack: TailnetStack, path: str) -> None:
    status, headers, body = await http_get(stack.access_url + path)
    assert status == 401
    assert headers["Content-Type"] == "application/json"
    assert "authenticated" in err(body)["message"]
    status, _, body = await http_get(stack.access_url + path, auth("nope"))
    assert status == 401
    assert "Invalid" in err(body)["message"]


async def test_all_three_credential_forms_work(stack: TailnetStack) -> None:
    url = stack.access_url + "/api/v2/workspaceagents/connection"
    tok = stack.admin_token
    for headers in (
        {"Coder-Session-Token": tok},
        {"Authorization": f"Bearer {tok}"},
        {"Cookie": f"other=1; coder_session_token={tok}"},
    ):
        status, _, body = await http_get(url, headers)
        assert status == 200, headers
    # a non-Bearer Authorization is not a credential
    status, _, _ = await http_get(url, {"Authorization": f"Basic {tok}"})
    assert status == 401


@pytest.mark.parametrize(
    "path",
    [
        "/api/v2/derp-map",
        "/api/v2/tailnet",
        "/api/v2/workspaceagents/me/rpc",
        "/api/v2/workspaceagents/00000000-0000-0000-0000-000000000001/coordinate",
    ],
)
async def test_websocket_endpoints_reject_bad_tokens(stack: TailnetStack, path: str) -> None:
    for token in (None, "wrong"):
        with pytest.raises(DialError) as info:
            await TailnetClient.connect(stack.ws_url + path, token)
        assert info.value.status == 401
        assert info.value.body["message"]


# --------------------------------------------------------------------------- roles, IDs, versions


async def test_debug_endpoints_are_owner_only(stack: TailnetStack) -> None:
    _, user_token = stack.create_user()
    for path in ("/api/v2/debug/health", "/api/v2/debug/coordinator"):
        status, _, body = await http_get(stack.access_url + path, auth(user_token))
        assert status == 403
        assert err(body)["message"] == "Forbidden."


async def test_connection_info(stack: TailnetStack) -> None:
    uid, user_token = stack.create_user()
    agent = stack.create_agent(owner_id=uid)
    url = f"{stack.access_url}/api/v2/workspaceagents/{agent.agent_id}/connection"
    for tok in (user_token, stack.admin_token):
        status, _, body = await http_get(url, auth(tok))
        assert status == 200
        doc = json.loads(body)
        assert doc["derp_force_websockets"] is False
        assert doc["disable_direct_connections"] is False
        assert doc["hostname_suffix"] == "coder"
        region = doc["derp_map"]["Regions"]["999"]
        assert region["EmbeddedRelay"] is True
        assert region["Nodes"][0]["DERPPort"] == stack.http_port
        assert region["Nodes"][0]["ForceHTTP"] is True
        assert derp_map_from_json(doc["derp_map"]) == stack.derp_maps.current()


async def test_unknown_or_foreign_agent_is_404(stack: TailnetStack) -> None:
    _, user_token = stack.create_user()
    other_owner, _ = stack.create_user()
    foreign = stack.create_agent(owner_id=other_owner)
    unknown = uuid.uuid4()
    for agent_id, tok in (
        (unknown, stack.admin_token),
        (unknown, user_token),
        (foreign.agent_id, user_token),
    ):
        status, _, body = await http_get(
            f"{stack.access_url}/api/v2/workspaceagents/{agent_id}/connection", auth(tok)
        )
        assert status == 404
        assert "not found" in err(body)["message"]
        with pytest.raises(DialError) as info:
            await TailnetClient.connect(
                f"{stack.ws_url}/api/v2/workspaceagents/{agent_id}/coordinate?version=2.0", tok
            )
        assert info.value.status == 404


async def test_invalid_agent_id_is_400(stack: TailnetStack) -> None:
    status, _, body = await http_get(
        stack.access_url + "/api/v2/workspaceagents/not-a-uuid/connection", auth(stack.admin_token)
    )
    assert status == 400
    assert err(body)["validations"][0]["field"] == "workspaceagent"


@pytest.mark.parametrize("version", ["banana", "3.0", "2.99", "1.0", "2"])
async def test_bad_versions_are_400_before_upgrade(stack: TailnetStack, version: str) -> None:
    agent = stack.create_agent()
    for path in (
        f"/api/v2/workspaceagents/{agent.agent_id}/coordinate",
        "/api/v2/tailnet",
    ):
        with pytest.raises(DialError) as info:
            await TailnetClient.connect(f"{stack.ws_url}{path}?version={version}", stack.admin_token)
        assert info.value.status == 400
        assert info.value.validation_fields == ["version"]
    with pytest.raises(DialError) as info:
        await TailnetClient.connect(
            f"{stack.ws_url}/api/v2/workspaceagents/me/rpc?version={version}", agent.token
        )
    assert info.value.status == 400


@pytest.mark.parametrize("token", ["garbage", "a.b.c", "eyJhbGciOiJIUzUxMiIsImtpZCI6IjkifQ.e30.x"])
async def test_invalid_resume_token_is_401_naming_resume_token(
    stack: TailnetStack, token: str
) -> None:
    agent = stack.create_agent()
    for path in (f"/api/v2/workspaceagents/{agent.agent_id}/coordinate", "/api/v2/tailnet"):
        with pytest.raises(DialError) as info:
            await TailnetClient.connect(
                f"{stack.ws_url}{path}?version=2.3&resume_token={token}", stack.admin_token
            )
        assert info.value.status == 401
        assert info.value.validation_fields == ["resume_token"]
        assert "resume_token" in info.value.body["validations"][0]["detail"]  # type: ignore[index]


async def test_role_checks_on_rpc_endpoints(stack: TailnetStack) -> None:
    uid, user_token = stack.create_user()
    agent = stack.create_agent(owner_id=uid)
    # users may not use the agent endpoint; agents may not use client endpoints
    with pytest.raises(DialError) as info:
        await TailnetClient.connect(f"{stack.ws_url}/api/v2/workspaceagents/me/rpc", user_token)
    assert info.value.status == 403
    with pytest.raises(DialError) as info:
        await TailnetClient.connect(f"{stack.ws_url}/api/v2/tailnet", agent.token)
    assert info.value.status == 403
    with pytest.raises(DialError) as info:
        await TailnetClient.connect(
            f"{stack.ws_url}/api/v2/workspaceagents/{agent.agent_id}/coordinate", agent.token
        )
    assert info.value.status == 403
    # good credentials: the upgrade succeeds and reports the peer ID
    for path, tok in (
        ("/api/v2/workspaceagents/me/rpc", agent.token),
        ("/api/v2/tailnet", user_token),
        (f"/api/v2/workspaceagents/{agent.agent_id}/coordinate", user_token),
    ):
        client = await TailnetClient.connect(f"{stack.ws_url}{path}?version=2.3", tok)
        try:
            assert client.peer_id is not None
            assert client.version == "2.3"
            if path.endswith("/me/rpc"):
                assert client.peer_id == str(agent.agent_id)
        finally:
            await client.close()


async def test_websocket_endpoint_without_upgrade_is_426(stack: TailnetStack) -> None:
    status, _, body = await http_get(stack.access_url + "/api/v2/tailnet", auth(stack.admin_token))
    assert status == 426
    assert "WebSocket" in err(body)["message"]


async def test_unknown_route_and_method(stack: TailnetStack) -> None:
    status, _, body = await http_get(stack.access_url + "/api/v2/nope", auth(stack.admin_token))
    assert status == 404
    assert err(body)["message"] == "Route not found."

    def post() -> int:
        req = urllib.request.Request(stack.access_url + "/healthz", data=b"x", method="POST")
        try:
            urllib.request.urlopen(req, timeout=T)
        except urllib.error.HTTPError as exc:
            return exc.code
        return 200

    assert await asyncio.wait_for(asyncio.to_thread(post), T * 2) == 405


async def test_malformed_http_closes_only_that_connection(stack: TailnetStack) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", stack.http_port)
    writer.write(b"GARBAGE GARBAGE\r\n\r\n")
    data = await asyncio.wait_for(reader.read(), T)
    assert data.startswith(b"HTTP/1.1 400")
    writer.close()
    status, _, _ = await http_get(stack.access_url + "/healthz")
    assert status == 200


# --------------------------------------------------------------------------- DERP map WebSocket


async def test_derp_map_websocket_sends_map_and_changes(stack: TailnetStack) -> None:
    src = stack.derp_maps
    async with connect(
        stack.ws_url + "/api/v2/derp-map", additional_headers=auth(stack.admin_token)
    ) as ws:
        first = await asyncio.wait_for(ws.recv(), T)
        assert isinstance(first, bytes)  # binary message with JSON
        doc = json.loads(first)
        assert doc["Regions"]["999"]["RegionID"] == 999
        new = new_derp_map(
            embedded_region("127.0.0.1", stack.http_port, scheme="http"),
            embedded_region("relay.example", 443, region_id=1000, region_code="x"),
        )
        assert hasattr(src, "set")
        src.set(new)
        second = json.loads(await asyncio.wait_for(ws.recv(), T))
        assert set(second["Regions"]) == {"999", "1000"}
        assert second["Regions"]["1000"]["Nodes"][0]["HostName"] == "relay.example"


async def test_derp_map_websocket_closes_1001_on_shutdown() -> None:
    s = TailnetStack(StackConfig(http_addr="127.0.0.1:0", grpc_addr=None, stun_addr=None))
    await s.start()
    try:
        ws = await connect(s.ws_url + "/api/v2/derp-map", additional_headers=auth(s.admin_token))
        await asyncio.wait_for(ws.recv(), T)
    finally:
        await asyncio.wait_for(s.stop(), T)
    await asyncio.wait_for(ws.wait_closed(), T)
    assert ws.close_code == 1001


async def test_derp_map_websocket_rejects_plain_http(stack: TailnetStack) -> None:
    status, _, _ = await http_get(stack.access_url + "/api/v2/derp-map", auth(stack.admin_token))
    assert status == 426


async def test_invalid_websocket_handshake(stack: TailnetStack) -> None:
    # Upgrade: websocket without Sec-WebSocket-Key → rejected by the websockets handshake
    reader, writer = await asyncio.open_connection("127.0.0.1", stack.http_port)
    writer.write(
        b"GET /api/v2/derp-map HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nCoder-Session-Token: " + stack.admin_token.encode() + b"\r\n\r\n"
    )
    data = await asyncio.wait_for(reader.read(), T)
    assert data.startswith(b"HTTP/1.1 4")
    writer.close()


# --------------------------------------------------------------------------- debug


async def test_debug_coordinator_html_and_json(stack: TailnetStack) -> None:
    uid, user_token = stack.create_user()
    agent = stack.create_agent(owner_id=uid)
    ac = await TailnetClient.connect(f"{stack.ws_url}/api/v2/workspaceagents/me/rpc", agent.token)
    cc = await TailnetClient.connect(
        f"{stack.ws_url}/api/v2/workspaceagents/{agent.agent_id}/coordinate", user_token
    )
    try:
        from tailnet.v2 import tailnet_pb2 as pb

        a = ac.coordinate()
        c = cc.coordinate()
        # Coder's client sends a stream's Invoke with its first message
        await a.send(pb.CoordinateRequest(update_self=pb.CoordinateRequest.UpdateSelf(
            node=pb.Node(id=1, key=b"np" + b"\x01" * 32, preferred_derp=999))))
        await c.send(pb.CoordinateRequest(add_tunnel=pb.CoordinateRequest.Tunnel(id=agent.agent_id.bytes)))
        coord = stack.service.coordinator  # type: ignore[union-attr]

        async def tunnel_recorded() -> None:
            while not coord.tunnels():
                await asyncio.sleep(0.01)

        await asyncio.wait_for(tunnel_recorded(), T)
        status, headers, body = await http_get(
            stack.access_url + "/api/v2/debug/coordinator", auth(stack.admin_token)
        )
        assert status == 200 and headers["Content-Type"].startswith("text/html")
        page = body.decode()
        assert "peers: total 2" in page and "tunnels: total 1" in page
        assert str(agent.agent_id) in page
        status, _, body = await http_get(
            stack.access_url + "/api/v2/debug/coordinator",
            {**auth(stack.admin_token), "Accept": "application/json"},
        )
        doc = json.loads(body)
        assert {p["id"] for p in doc["peers"]} == {str(agent.agent_id), cc.peer_id}
        assert doc["tunnels"] == [{"src": cc.peer_id, "dst": str(agent.agent_id)}]
        del a
    finally:
        await cc.close()
        await ac.close()


async def test_debug_ws_echo_requires_auth(stack: TailnetStack) -> None:
    with pytest.raises(InvalidStatus):
        async with connect(stack.ws_url + "/api/v2/debug/ws"):
            pass
    async with connect(
        stack.ws_url + "/api/v2/debug/ws", additional_headers=auth(stack.admin_token)
    ) as ws:
        await ws.send(b"hello")
        assert await asyncio.wait_for(ws.recv(), T) == b"hello"


# --------------------------------------------------------------------------- pipelining


@pytest.mark.parametrize("path", ["/healthz", "/derp/probe"])
async def test_pipelined_requests_from_a_non_reader_stop_being_read(
    stack: TailnetStack, path: str
) -> None:
    """bench/soak.py: one keep-alive connection pipelining requests without ever
    reading the responses grew the server by ~12 MB/s (no token needed). Now the
    next request is read only while the write buffer is below its high-water
    mark: the server stops reading and holds about one mark of replies."""
    from ..rawws import push_until_stalled

    assert stack.http is not None
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", stack.http_port))
    try:
        _, outcome = await asyncio.to_thread(
            push_until_stalled, sock, request, limit=256 << 20, stall=1.0)
        assert outcome == "stalled"
        me = sock.getsockname()
        [conn] = [c for c in stack.http._conns if c.remote == me]  # noqa: SLF001
        t = conn._transport  # noqa: SLF001
        assert t is not None
        bound = t.get_write_buffer_limits()[1] + 64 * 1024

        async def stopped_reading() -> None:
            while t.is_reading():
                assert t.get_write_buffer_size() <= bound
                await asyncio.sleep(0.01)

        await asyncio.wait_for(stopped_reading(), T)
        await asyncio.sleep(0.3)  # it stays stopped, the buffer stays bounded
        assert not t.is_reading() and t.get_write_buffer_size() <= bound
    finally:
        sock.close()


async def test_pipelined_relay_probes_are_all_answered_in_order(stack: TailnetStack) -> None:
    """Many pipelined relay-path requests (answered without a handler task) are
    served over several loop iterations, every one of them, in order."""
    from tailnet.http.server import SYNC_ANSWERS_PER_CALL

    n = 5 * SYNC_ANSWERS_PER_CALL + 3
    reader, writer = await asyncio.open_connection("127.0.0.1", stack.http_port)
    try:
        reqs = b"".join(
            f"GET {'/derp/probe' if i % 2 else '/generate_204'} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
            for i in range(n)
        )
        writer.write(reqs + b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = await asyncio.wait_for(reader.read(), T)  # until the server closes
    finally:
        writer.close()
    statuses = [int(line.split(b" ")[1]) for line in data.split(b"\r\n") if line.startswith(b"HTTP/1.1 ")]
    assert statuses == [200 if i % 2 else 204 for i in range(n)] + [200]
