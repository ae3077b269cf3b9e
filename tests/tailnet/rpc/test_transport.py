"""Coder's transport on the stack's WebSocket endpoints, over real sockets on 127.0.0.1.

Two kinds of client: a raw WebSocket client that writes the exact bytes a Go
client writes (hand-written hex from coder-transport.md §5, header and body of
each yamux frame as separate messages, as Go's yamux does), and our own
:class:`~tailnet.rpc.tailnet_client.TailnetClient`.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from tailnet.rpc.client import RpcClient
from tailnet.rpc.mux import MethodKind, RpcError, ServerCall
from tailnet.rpc.tailnet_client import TailnetClient
from tailnet.rpc.websocket import DialError
from tailnet.stack import TailnetStack
from tailnet.v2 import tailnet_pb2 as pb

T = 10.0
PU = pb.CoordinateResponse.PeerUpdate


def h(text: str) -> bytes:
    return bytes.fromhex(text.replace(" ", ""))


class RawYamux:
    """A WebSocket client that speaks yamux by hand (bytes in the test, not our encoder)."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.buf = bytearray()

    @classmethod
    async def open(cls, url: str, token: str) -> RawYamux:
        ws = await asyncio.wait_for(
            connect(url, additional_headers={"Coder-Session-Token": token}, compression=None,
                    proxy=None, ping_interval=None, max_size=None),
            T,
        )
        return cls(ws)

    async def send(self, *messages: str) -> None:
        for m in messages:
            await self.ws.send(h(m))

    async def frame(self) -> tuple[bytes, bytes]:
        """The next yamux frame: (12-byte header, body)."""
        while True:
            if len(self.buf) >= 12:
                typ = self.buf[1]
                n = int.from_bytes(self.buf[8:12], "big")
                blen = n if typ == 0 else 0
                if len(self.buf) >= 12 + blen:
                    hdr = bytes(self.buf[:12])
                    body = bytes(self.buf[12 : 12 + blen])
                    del self.buf[: 12 + blen]
                    return hdr, body
            msg = await asyncio.wait_for(self.ws.recv(), T)
            assert isinstance(msg, bytes)
            self.buf += msg

    async def data(self, sid: int) -> bytes:
        """Payload of the next Data frame for ``sid`` (skipping control frames)."""
        while True:
            hdr, body = await self.frame()
            if hdr[1] == 0 and int.from_bytes(hdr[4:8], "big") == sid:
                return body

    async def closed(self) -> None:
        with pytest.raises(ConnectionClosed):
            while True:
                await asyncio.wait_for(self.ws.recv(), T)


SDM = "2f636f6465722e7461696c6e65742e76322e5461696c6e65742f53747265616d444552504d617073"


async def test_go_stream_derp_maps_bytes(stack: TailnetStack) -> None:
    """§5.2 exactly as Go sends it: SYN · Data hdr · Invoke+Message · Data hdr · CloseSend."""
    raw = await RawYamux.open(f"{stack.ws_url}/api/v2/tailnet?version=2.0", stack.admin_token)
    await raw.send(
        "00 01 00 01 00000001 00000000",
        "00 00 00 00 00000001 00000030",
        "03 01 01 28" + SDM + "05 01 02 00",
        "00 00 00 00 00000001 00000004",
        "0d 01 03 00",
    )
    hdr, _ = await raw.frame()
    assert hdr == h("00 01 00 02 00000001 00000000")  # ACK (WindowUpdate|ACK, delta 0)
    body = await raw.data(1)
    assert body[:3] == h("05 01 01")  # Message, stream 1, message 1, done
    n, pos = 0, 3
    shift = 0
    while True:  # varint length
        b = body[pos]
        n |= (b & 0x7F) << shift
        pos += 1
        shift += 7
        if b < 0x80:
            break
    m = pb.DERPMap.FromString(body[pos : pos + n])
    assert 999 in m.regions and len(body) == pos + n
    # client stop: Close (m4) in its own Data frame, then FIN; the server FINs back
    await raw.send("00 00 00 00 00000001 00000004", "0b 01 04 00",
                   "00 01 00 04 00000001 00000000")
    while True:
        hdr, _ = await raw.frame()
        if hdr[1] == 1 and hdr[2:4] == h("0004"):
            break
    await raw.ws.close()


async def test_unknown_method_and_post_telemetry_endings(stack: TailnetStack) -> None:
    raw = await RawYamux.open(f"{stack.ws_url}/api/v2/tailnet?version=2.3", stack.admin_token)
    nope = b'/coder.tailnet.v2.Tailnet/Nope'.hex()
    inv = f"03 01 01 {len(nope) // 2:02x}" + nope
    await raw.send("00 01 00 01 00000001 00000000",
                   f"00 00 00 00 00000001 {len(h(inv)):08x}", inv)
    body = await raw.data(1)
    text = b'protocol error: unknown rpc: "/coder.tailnet.v2.Tailnet/Nope"'
    assert body == h("07 01 01 45 0000000000000000") + text  # §5.3
    # PostTelemetry: Invoke + empty Message + CloseSend in one write (Go's unary Invoke)
    path = b"/coder.tailnet.v2.Tailnet/PostTelemetry".hex()
    req = "03 01 01 27" + path + "05 01 02 00" + "0d 01 03 00"
    await raw.send("00 01 00 01 00000003 00000000",
                   f"00 00 00 00 00000003 {len(h(req)):08x}", req)
    got = b""
    while len(got) < 8:
        got += await raw.data(3)
    assert got == h("05 01 01 00" "0d 01 02 00")  # §5.4: empty Message, then CloseSend
    # ping with opaque 0xdeadbeef is echoed (§5.1)
    await raw.send("00 02 00 01 00000000 deadbeef")
    while True:
        hdr, _ = await raw.frame()
        if hdr[1] == 2:
            assert hdr == h("00 02 00 02 00000000 deadbeef")
            break
    await raw.ws.close()


@pytest.mark.parametrize(
    "bad",
    [
        "01 00 00 00 00000001 00000000",  # version 1
        "00 07 00 00 00000000 00000000",  # unknown type
    ],
)
async def test_malformed_yamux_header_goaway_and_close_only_that_connection(
    stack: TailnetStack, bad: str
) -> None:
    other = await TailnetClient.connect(f"{stack.ws_url}/api/v2/tailnet", stack.admin_token)
    raw = await RawYamux.open(f"{stack.ws_url}/api/v2/tailnet", stack.admin_token)
    await raw.send(bad)
    hdr, _ = await raw.frame()
    assert hdr == h("00 03 00 00 00000000 00000001")  # GoAway protocol error
    await raw.closed()
    maps = await other.stream_derp_maps()
    assert (await asyncio.wait_for(maps.recv(), T)) is not None
    await other.close()


async def test_window_violation_is_goaway_protocol_error(stack: TailnetStack) -> None:
    raw = await RawYamux.open(f"{stack.ws_url}/api/v2/tailnet", stack.admin_token)
    await raw.send("00 01 00 01 00000001 00000000")
    await raw.frame()  # ACK
    await raw.ws.send(h("00 00 00 00 00000001 00040001") + b"\x00" * (256 * 1024 + 1))
    while True:
        hdr, _ = await raw.frame()
        if hdr[1] == 3:
            assert hdr == h("00 03 00 00 00000000 00000001")
            break
    await raw.closed()


async def test_bad_drpc_packet_ends_only_its_stream(stack: TailnetStack) -> None:
    c = await TailnetClient.connect(f"{stack.ws_url}/api/v2/tailnet", stack.admin_token)
    maps = await c.stream_derp_maps()
    assert await asyncio.wait_for(maps.recv(), T) is not None
    # a second stream whose first packet has kind 0x20 without the control bit
    ys = c.rpc.yamux.open_stream()
    ended = asyncio.Event()
    ys.on_end = ended.set
    ys.write_nowait(h("41 01 01 00"))
    await asyncio.wait_for(ended.wait(), T)
    # the connection and the other stream are still fine
    tok = await asyncio.wait_for(c.refresh_resume_token(), T)
    assert tok.token
    assert not c.rpc.closed
    await c.close()


async def test_client_server_all_rpcs_and_resume(stack: TailnetStack) -> None:
    uid, user_token = stack.create_user()
    agent = stack.create_agent(owner_id=uid)
    ac = await TailnetClient.connect(
        f"{stack.ws_url}/api/v2/workspaceagents/me/rpc?version=2.6", agent.token, cookie=True)
    url = f"{stack.ws_url}/api/v2/workspaceagents/{agent.agent_id}/coordinate?version=2.3"
    cc = await TailnetClient.connect(url, user_token)
    try:
        assert ac.peer_id == str(agent.agent_id)
        # RefreshResumeToken before Coordinate was ever invoked (Coder's client may do that)
        tok = await asyncio.wait_for(cc.refresh_resume_token(), T)
        assert tok.token and tok.refresh_in.seconds > 0
        a = ac.coordinate()
        c = cc.coordinate()
        await a.send(pb.CoordinateRequest(update_self=pb.CoordinateRequest.UpdateSelf(
            node=pb.Node(id=1, key=b"np" + b"\x01" * 32, preferred_derp=999))))
        await c.send(pb.CoordinateRequest(
            add_tunnel=pb.CoordinateRequest.Tunnel(id=agent.agent_id.bytes)))
        await c.send(pb.CoordinateRequest(update_self=pb.CoordinateRequest.UpdateSelf(
            node=pb.Node(id=2, key=b"np" + b"\x02" * 32, preferred_derp=999))))

        async def node_about(s: object, peer: bytes) -> PU:
            while True:
                resp = await s.recv()  # type: ignore[attr-defined]
                assert resp is not None
                for u in resp.peer_updates:
                    if u.id == peer and u.kind == PU.NODE:
                        return u

        assert (await asyncio.wait_for(node_about(c, agent.agent_id.bytes), T)).node.id == 1
        assert cc.peer_id is not None
        client_peer = uuid.UUID(cc.peer_id)
        assert (await asyncio.wait_for(node_about(a, client_peer.bytes), T)).node.id == 2
        # agent endpoint: resume tokens and workspace updates are not served there
        with pytest.raises(RpcError) as info:
            await ac.refresh_resume_token()
        assert info.value.code == 12
        ws = await ac.workspace_updates(uid)
        with pytest.raises(RpcError) as info:
            await asyncio.wait_for(ws.recv(), T)
        assert info.value.code == 12
        # telemetry and workspace updates on the client endpoint
        assert await cc.post_telemetry(pb.TelemetryRequest()) == pb.TelemetryResponse()
        upd = await cc.workspace_updates(uid)
        first = await asyncio.wait_for(upd.recv(), T)
        assert first is not None and len(first.upserted_workspaces) == 1
        await upd.close()
        # graceful end: Disconnect, then the server closes the stream (recv -> None)
        await c.send(pb.CoordinateRequest(disconnect=pb.CoordinateRequest.Disconnect()))
        while (await asyncio.wait_for(c.recv(), T)) is not None:
            pass

        async def disconnected() -> None:
            while True:
                resp = await a.recv()
                assert resp is not None
                if any(u.kind == PU.DISCONNECTED for u in resp.peer_updates):
                    return

        await asyncio.wait_for(disconnected(), T)
        await cc.close()
        # redial with the resume token: same peer ID
        cc = await TailnetClient.connect(url + f"&resume_token={tok.token}", user_token)
        assert cc.peer_id == str(client_peer)
    finally:
        await cc.close()
        await ac.close()


async def test_versions_on_agent_endpoint(stack: TailnetStack) -> None:
    agent = stack.create_agent()
    for v in ("2.0", "2.3", "2.6"):
        c = await TailnetClient.connect(
            f"{stack.ws_url}/api/v2/workspaceagents/me/rpc?version={v}", agent.token, cookie=True)
        await c.close()
    with pytest.raises(DialError) as info:
        await TailnetClient.connect(
            f"{stack.ws_url}/api/v2/workspaceagents/me/rpc?version=2.7", agent.token)
    assert info.value.status == 400 and info.value.validation_fields == ["version"]
    with pytest.raises(DialError) as info:
        await TailnetClient.connect(f"{stack.ws_url}/api/v2/tailnet?version=2.4",
                                    stack.admin_token)
    assert info.value.status == 400


async def test_embedder_registers_more_methods_on_agent_endpoint(stack: TailnetStack) -> None:
    seen: list[object] = []

    async def get_thing(call: ServerCall, req: pb.TelemetryRequest) -> pb.TelemetryResponse:
        seen.append(call.context.ident.peer_id)
        return pb.TelemetryResponse()

    path = "/coder.agent.v2.Agent/GetThing"
    stack.api.agent_mux.register(path, MethodKind.UNARY, pb.TelemetryRequest, get_thing)
    agent = stack.create_agent()
    c = await RpcClient.connect(
        f"{stack.ws_url}/api/v2/workspaceagents/me/rpc?version=2.6", agent.token, cookie=True)
    try:
        resp = await c.unary(path, pb.TelemetryRequest(), pb.TelemetryResponse)
        assert resp == pb.TelemetryResponse() and seen == [agent.agent_id]
    finally:
        await c.close()
    # the client endpoints do not serve it: Go's unknown-rpc error, code 0
    c = await RpcClient.connect(f"{stack.ws_url}/api/v2/tailnet", stack.admin_token)
    try:
        with pytest.raises(RpcError) as info:
            await c.unary(path, pb.TelemetryRequest(), pb.TelemetryResponse)
        assert info.value.code == 0 and info.value.message == f'protocol error: unknown rpc: "{path}"'
    finally:
        await c.close()


async def test_unparsable_coordinate_request_ends_that_stream_with_error(
    stack: TailnetStack,
) -> None:
    c = await RpcClient.connect(f"{stack.ws_url}/api/v2/tailnet", stack.admin_token)
    try:
        st = c.bidi("/coder.tailnet.v2.Tailnet/Coordinate", pb.CoordinateResponse)
        st._drpc.send_message(b"\xff\xff\xff")
        await st._write()
        with pytest.raises(RpcError) as info:
            await asyncio.wait_for(st.recv(), T)
        assert "invalid CoordinateRequest" in info.value.message
        tok = await c.unary("/coder.tailnet.v2.Tailnet/RefreshResumeToken",
                            pb.RefreshResumeTokenRequest(), pb.RefreshResumeTokenResponse)
        assert tok.token
    finally:
        await c.close()


async def test_streams_per_connection_are_bounded(stack: TailnetStack) -> None:
    stack.api.options.max_rpc_streams = 3
    c = await TailnetClient.connect(f"{stack.ws_url}/api/v2/tailnet", stack.admin_token)
    try:
        streams = [await c.stream_derp_maps() for _ in range(3)]
        for s in streams:
            assert await asyncio.wait_for(s.recv(), T) is not None
        extra = await c.stream_derp_maps()
        with pytest.raises(ConnectionError):
            await asyncio.wait_for(extra.recv(), T)
        assert not c.rpc.closed
    finally:
        await c.close()


async def test_shutdown_closes_coordinate_with_error_then_close(stack: TailnetStack) -> None:
    c = await TailnetClient.connect(f"{stack.ws_url}/api/v2/tailnet", stack.admin_token)
    st = c.coordinate()
    await st.send(pb.CoordinateRequest(update_self=pb.CoordinateRequest.UpdateSelf(
        node=pb.Node(id=1, key=b"np" + b"\x01" * 32, preferred_derp=999))))

    async def joined() -> None:  # the coordinator has our peer
        while not stack.service._streams:  # type: ignore[union-attr]
            await asyncio.sleep(0.01)

    await asyncio.wait_for(joined(), T)
    stop = asyncio.ensure_future(stack.stop())
    errors: list[str] = []
    while True:
        resp = await asyncio.wait_for(st.recv(), T)
        if resp is None:
            break
        if resp.error:
            errors.append(resp.error)
    assert errors == ["coordinator closed"]
    await asyncio.wait_for(stop, T)
    await c.close()


@pytest.mark.parametrize("cut", ["byte", "seeded"])
async def test_go_bytes_split_across_arbitrary_messages(stack: TailnetStack, cut: str) -> None:
    """Message boundaries mean nothing: §5.2 + a PostTelemetry, cut anywhere."""
    import random

    path = b"/coder.tailnet.v2.Tailnet/PostTelemetry".hex()
    req = "03 01 01 27" + path + "05 01 02 00" + "0d 01 03 00"
    stream = h(
        "00 01 00 01 00000001 00000000"
        "00 00 00 00 00000001 00000030" "03 01 01 28" + SDM + "05 01 02 00"
        "00 00 00 00 00000001 00000004" "0d 01 03 00"
        "00 01 00 01 00000003 00000000"
        f"00 00 00 00 00000003 {len(h(req)):08x}" + req
    )
    rng = random.Random(7)
    pieces: list[bytes] = []
    i = 0
    while i < len(stream):
        n = 1 if cut == "byte" else rng.randint(1, 40)
        pieces.append(stream[i : i + n])
        i += n
    raw = await RawYamux.open(f"{stack.ws_url}/api/v2/tailnet?version=2.3", stack.admin_token)
    for p in pieces:
        await raw.ws.send(p)
    got: dict[int, bytes] = {1: b"", 3: b""}
    while len(got[3]) < 8 or not got[1]:
        hdr, body = await raw.frame()
        if hdr[1] == 0:
            got[int.from_bytes(hdr[4:8], "big")] += body
    assert got[1][:3] == h("05 01 01")
    assert got[3] == h("05 01 01 00" "0d 01 02 00")
    await raw.ws.close()


async def test_slow_reader_stalls_only_its_own_stream(stack: TailnetStack) -> None:
    """A handler that never reads: the client's writes stop at the 256 KiB window,
    while another stream on the same connection keeps working (and so do others)."""
    started = asyncio.Event()

    async def never_reads(call: ServerCall) -> None:
        started.set()
        await asyncio.Event().wait()  # until cancelled

    path = "/test.Sink/NeverReads"
    stack.api.client_mux.register(path, MethodKind.BIDI, pb.TelemetryRequest, never_reads)
    c = await RpcClient.connect(f"{stack.ws_url}/api/v2/tailnet", stack.admin_token)
    try:
        st = c.bidi(path, pb.TelemetryResponse)
        chunk = pb.TelemetryRequest(events=[pb.TelemetryEvent(id=b"\x01" * 16)] * 2000)
        size = chunk.ByteSize()

        async def flood() -> int:
            sent = 0
            while True:
                await st.send(chunk)
                sent += size

        pusher = asyncio.ensure_future(flood())
        await asyncio.wait_for(started.wait(), T)
        # the window fills and the writer blocks; meanwhile another stream works
        for _ in range(3):
            tok = await asyncio.wait_for(
                c.unary("/coder.tailnet.v2.Tailnet/RefreshResumeToken",
                        pb.RefreshResumeTokenRequest(), pb.RefreshResumeTokenResponse), T)
            assert tok.token
        assert not pusher.done()
        ys = st._ys
        assert c.yamux.session.send_window(ys.id) == 0 or c.yamux.session.pending_bytes(ys.id) > 0
        pusher.cancel()
        await asyncio.gather(pusher, return_exceptions=True)
        await st.close()
    finally:
        await c.close()


async def test_client_that_never_reads_a_stream_does_not_block_the_server(
    stack: TailnetStack,
) -> None:
    """A server-streaming handler blocked on a client that never reads its stream:
    the client's other streams keep working and so does every other connection."""
    release = asyncio.Event()
    blocked = asyncio.Event()

    async def firehose(call: ServerCall, req: pb.TelemetryRequest) -> None:
        big = pb.TelemetryResponse()
        msg = pb.TelemetryRequest(events=[pb.TelemetryEvent(id=b"\x02" * 16)] * 4000)
        for _ in range(100):  # ~8 MB: far beyond one 256 KiB window
            send = asyncio.ensure_future(call.send(msg))
            done, _ = await asyncio.wait({send}, timeout=0.5)
            if not done:
                blocked.set()
                await send
        del big
        await release.wait()

    path = "/test.Source/Firehose"
    stack.api.client_mux.register(path, MethodKind.SERVER_STREAM, pb.TelemetryRequest, firehose)
    c = await RpcClient.connect(f"{stack.ws_url}/api/v2/tailnet", stack.admin_token)
    other = await TailnetClient.connect(f"{stack.ws_url}/api/v2/tailnet", stack.admin_token)
    try:
        st = await c.server_stream(path, pb.TelemetryRequest(), pb.TelemetryRequest)
        await asyncio.wait_for(blocked.wait(), T)  # the server waits on our window
        tok = await asyncio.wait_for(
            c.unary("/coder.tailnet.v2.Tailnet/RefreshResumeToken",
                    pb.RefreshResumeTokenRequest(), pb.RefreshResumeTokenResponse), T)
        assert tok.token
        maps = await other.stream_derp_maps()
        assert await asyncio.wait_for(maps.recv(), T) is not None
        await st.close()
    finally:
        release.set()
        await other.close()
        await c.close()


async def test_message_over_4mib_ends_its_stream_only(stack: TailnetStack) -> None:
    c = await RpcClient.connect(f"{stack.ws_url}/api/v2/tailnet", stack.admin_token)
    try:
        st = c.bidi("/coder.tailnet.v2.Tailnet/Coordinate", pb.CoordinateResponse)
        st._drpc.send_message(b"\x00" * (4 * 1024 * 1024 + 1))
        writer = asyncio.ensure_future(st._write())
        with pytest.raises((RpcError, ConnectionError)) as info:
            await asyncio.wait_for(st.recv(), T)
        if isinstance(info.value, RpcError):
            assert "overflow" in info.value.message
        writer.cancel()
        await asyncio.gather(writer, return_exceptions=True)
        tok = await asyncio.wait_for(
            c.unary("/coder.tailnet.v2.Tailnet/RefreshResumeToken",
                    pb.RefreshResumeTokenRequest(), pb.RefreshResumeTokenResponse), T)
        assert tok.token and not c.closed
    finally:
        await c.close()
