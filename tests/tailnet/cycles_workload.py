"""Client workloads for ``test_cycles.py``, run in their own process (their garbage is not ours).

``python cycles_workload.py grpc HOST:PORT ROUNDS`` connects and disconnects
peers in every way a Coordinate stream can end, and calls the other RPCs,
against a server set up by the test (tokens ``agent``, ``user``, ``limited``;
the user may reach agent ``AGENT``; ``max_peers_per_principal`` = 2; a small
peer buffer).

``python cycles_workload.py drpc BASE_WS_URL TOKEN ROUNDS`` runs Coder-transport
sessions (yamux + DRPC) on ``/api/v2/tailnet``: Coordinate ended by Disconnect, by
the client's Close, by a dropped TCP connection and by an unparsable request;
StreamDERPMaps, RefreshResumeToken, PostTelemetry, an unknown method, a stream
over the per-session limit, and a yamux protocol error.

``python cycles_workload.py ws BASE_WS_URL TOKEN ROUNDS`` opens WebSockets on
the DERP-map endpoint (server pings on) and the echo endpoint, ending them with
a closing handshake or by dropping TCP.

Exits 0 after printing ``ok``; any failed expectation raises (exit 1).
"""

from __future__ import annotations

import asyncio
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
import grpc.aio

from tailnet.v2 import tailnet_pb2 as pb
from tailnet.v2 import tailnet_pb2_grpc as pb_grpc

T = 20.0
Req = pb.CoordinateRequest
Kind = pb.CoordinateResponse.PeerUpdate
SC = grpc.StatusCode
USER = uuid.UUID("11111111-1111-4111-8111-111111111111")
AGENT = uuid.UUID("aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa")
HOWS = ("disconnect", "half_close", "cancel", "malformed", "denied", "resume", "slow", "big")


def md(token: str, **extra: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) + tuple(
        (k.replace("_", "-"), v) for k, v in extra.items()
    )


def node(derp: int, endpoints: int = 0) -> Req:
    return Req(update_self=Req.UpdateSelf(node=pb.Node(
        id=1, preferred_derp=derp, endpoints=[f"[2001:db8::{i:x}]:41641" for i in range(endpoints)]
    )))


class Stream:
    def __init__(self, stub: pb_grpc.TailnetStub, metadata: tuple[tuple[str, str], ...]) -> None:
        self.q: asyncio.Queue[Req | None] = asyncio.Queue()
        self.call = stub.Coordinate(self._reqs(), metadata=metadata)
        self.it = self.call.__aiter__()

    async def _reqs(self) -> AsyncIterator[Req]:
        while (r := await self.q.get()) is not None:
            yield r

    async def peer_id(self) -> uuid.UUID:
        got = dict(await asyncio.wait_for(self.call.initial_metadata(), T))
        return uuid.UUID(str(got["tailnet-peer-id"]))

    async def expect(self, kind: int, about: uuid.UUID, reason: str = "") -> None:
        while True:
            resp = await asyncio.wait_for(anext(self.it), T)
            assert isinstance(resp, pb.CoordinateResponse)
            for u in resp.peer_updates:
                if u.kind == kind and u.id == about.bytes and reason in u.reason:
                    return

    async def finish(self) -> tuple[SC, list[str]]:
        errors: list[str] = []
        try:
            while True:
                resp = await asyncio.wait_for(anext(self.it), T)
                assert isinstance(resp, pb.CoordinateResponse)
                if resp.error:
                    errors.append(resp.error)
        except StopAsyncIteration:
            return await self.call.code(), errors
        except grpc.aio.AioRpcError as exc:
            return exc.code(), errors


async def refused(call: Callable[[], Awaitable[object]], code: SC) -> None:
    try:
        await asyncio.wait_for(call(), T)
    except grpc.aio.AioRpcError as exc:
        assert exc.code() == code, (exc.code(), code)
    else:
        raise AssertionError(f"expected {code}")


async def ws_main(base: str, token: str, rounds: int) -> None:
    from websockets.asyncio.client import connect

    headers = {"Coder-Session-Token": token}
    for _ in range(rounds):
        for path, clean in (("/api/v2/derp-map", True), ("/api/v2/derp-map", False),
                            ("/api/v2/debug/ws", True), ("/api/v2/debug/ws", False)):
            ws = await asyncio.wait_for(connect(base + path, additional_headers=headers), T)
            if path.endswith("derp-map"):
                assert b"Regions" in await asyncio.wait_for(ws.recv(decode=False), T)
            else:
                await ws.send(b"hello")
                assert await asyncio.wait_for(ws.recv(decode=False), T) == b"hello"
            if clean:
                await asyncio.wait_for(ws.close(), T)
            else:
                ws.transport.abort()  # TCP gone without a close frame
                await asyncio.wait_for(ws.wait_closed(), T)
    print("ok", flush=True)


async def drpc_main(base: str, token: str, rounds: int) -> None:
    from tailnet.rpc.mux import RpcError
    from tailnet.rpc.tailnet_client import METHOD_COORDINATE, TailnetClient

    url = base + "/api/v2/tailnet?version=2.3"
    upd = Req(update_self=Req.UpdateSelf(node=pb.Node(id=1, key=b"np" + b"\x01" * 32,
                                                      preferred_derp=999)))
    for _ in range(rounds):
        for how in ("disconnect", "close", "drop", "garbage"):
            c = await asyncio.wait_for(TailnetClient.connect(url, token), T)
            maps = await c.stream_derp_maps()
            assert await asyncio.wait_for(maps.recv(), T) is not None
            await asyncio.wait_for(c.refresh_resume_token(), T)
            await c.post_telemetry(pb.TelemetryRequest())
            try:
                await c.rpc.unary("/coder.tailnet.v2.Tailnet/Nope", pb.TelemetryRequest(),
                                  pb.TelemetryResponse)
            except RpcError:
                pass
            coord = c.coordinate()
            await coord.send(upd)
            if how == "disconnect":
                await coord.send(Req(disconnect=Req.Disconnect()))
                while await asyncio.wait_for(coord.recv(), T) is not None:
                    pass
                await c.close()
            elif how == "close":
                await coord.close()
                await c.close()
            elif how == "drop":
                c.rpc.pipe.abort()
                await asyncio.wait_for(c.rpc.wait_closed(), T)
            else:
                st = c.rpc.bidi(METHOD_COORDINATE, pb.CoordinateResponse)
                st._drpc.send_message(b"\xff\xff")
                await st._write()
                try:
                    await asyncio.wait_for(st.recv(), T)
                except RpcError:
                    pass
                await c.close()
    # a yamux protocol error (version byte 1) ends the whole session
    from websockets.asyncio.client import connect

    ws = await asyncio.wait_for(connect(url, additional_headers={"Coder-Session-Token": token},
                                        compression=None, proxy=None), T)
    await ws.send(bytes.fromhex("010000000000000100000000"))
    try:
        while True:
            await asyncio.wait_for(ws.recv(), T)
    except Exception:
        pass
    print("ok", flush=True)


async def main(target: str, rounds: int) -> None:
    # No BDP probing: HTTP/2 windows stay small, so a client that does not read
    # blocks the server's writes quickly (the "slow" case).
    async with grpc.aio.insecure_channel(target, options=[("grpc.http2.bdp_probe", 0)]) as ch:
        stub = pb_grpc.TailnetStub(ch)
        agent = Stream(stub, md("agent"))
        await agent.peer_id()
        agent.q.put_nowait(node(999))

        async def client(how: str) -> None:
            s = Stream(stub, md("user", tailnet_agent_id=str(AGENT)))
            pid = await s.peer_id()
            s.q.put_nowait(Req(add_tunnel=Req.Tunnel(id=AGENT.bytes)))
            s.q.put_nowait(node(999))
            await s.expect(Kind.NODE, AGENT, "add tunnel")
            await agent.expect(Kind.NODE, pid)
            want = SC.OK
            if how == "disconnect":
                s.q.put_nowait(Req(disconnect=Req.Disconnect()))
            elif how == "half_close":
                s.q.put_nowait(None)
            elif how == "cancel":
                s.call.cancel()
                await agent.expect(Kind.LOST, pid)
                return
            elif how == "malformed":
                s.q.put_nowait(Req(remove_tunnel=Req.Tunnel(id=b"short")))
                want = SC.INVALID_ARGUMENT
            elif how == "big":
                s.q.put_nowait(node(1, endpoints=300))  # over max_endpoints
                want = SC.INVALID_ARGUMENT
            elif how == "denied":
                s.q.put_nowait(Req(add_tunnel=Req.Tunnel(id=uuid.uuid4().bytes)))
                want = SC.PERMISSION_DENIED
            elif how == "resume":
                token = (await stub.RefreshResumeToken(
                    pb.RefreshResumeTokenRequest(), metadata=md("user", tailnet_peer_id=str(pid))
                )).token
                again = Stream(stub, md("user", tailnet_agent_id=str(AGENT),
                                       tailnet_resume_token=token))
                assert await again.peer_id() == pid  # replaces `s`, re-authorizes its tunnel
                assert await s.finish() == (SC.OK, ["peer ID overwritten by new connection"])
                again.q.put_nowait(None)
                assert (await again.finish())[0] == SC.OK
                await agent.expect(Kind.LOST, pid)
                return
            elif how == "slow":
                # `s` reads nothing while the agent's updates (~9 KB each) fill the
                # HTTP/2 window and then its small buffer: it is evicted.
                i = 0
                evicted = asyncio.ensure_future(agent.expect(Kind.DISCONNECTED, pid, "failed"))
                while not evicted.done():
                    i += 1
                    agent.q.put_nowait(node(1 + i % 500, endpoints=250))
                    await asyncio.wait({evicted}, timeout=0.01 if i % 8 == 0 else 0)
                    assert i < 5000, "never evicted"
                await evicted
                code, errors = await s.finish()
                assert code == SC.OK and errors[-1:] == ["failed to update tunnel peer mapping"]
                agent.q.put_nowait(node(999))
                return
            code, _ = await s.finish()
            assert code == want, (how, code)
            await agent.expect(Kind.LOST if how != "disconnect" else Kind.DISCONNECTED, pid)

        async def over_limit() -> None:
            held = [Stream(stub, md("limited")) for _ in range(2)]
            for h in held:
                await h.peer_id()
            third = Stream(stub, md("limited"))
            assert (await third.finish())[0] == SC.RESOURCE_EXHAUSTED
            for h in held:
                h.q.put_nowait(None)
                assert (await h.finish())[0] == SC.OK

        async def other_rpcs() -> None:
            maps = stub.StreamDERPMaps(pb.StreamDERPMapsRequest(), metadata=md("user"))
            assert isinstance(await asyncio.wait_for(maps.read(), T), pb.DERPMap)
            maps.cancel()
            updates = stub.WorkspaceUpdates(
                pb.WorkspaceUpdatesRequest(workspace_owner_id=USER.bytes), metadata=md("user"))
            await asyncio.wait_for(updates.read(), T)
            updates.cancel()
            await stub.PostTelemetry(pb.TelemetryRequest(), metadata=md("user"))
            await refused(lambda: stub.PostTelemetry(pb.TelemetryRequest(), metadata=md("nope")),
                          SC.UNAUTHENTICATED)
            await refused(lambda: stub.RefreshResumeToken(pb.RefreshResumeTokenRequest(),
                                                          metadata=md("user")),
                          SC.FAILED_PRECONDITION)
            await refused(lambda: stub.WorkspaceUpdates(
                pb.WorkspaceUpdatesRequest(workspace_owner_id=b"x"), metadata=md("user")).read(),
                SC.INVALID_ARGUMENT)
            assert (await Stream(stub, md("nope")).finish())[0] == SC.UNAUTHENTICATED

        for r in range(rounds):
            for how in HOWS:
                await client(how)
            await over_limit()
            await other_rpcs()
        agent.q.put_nowait(Req(disconnect=Req.Disconnect()))
        assert (await agent.finish())[0] == SC.OK
    print("ok", flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "ws":
        asyncio.run(ws_main(sys.argv[2], sys.argv[3], int(sys.argv[4])))
    elif sys.argv[1] == "drpc":
        asyncio.run(drpc_main(sys.argv[2], sys.argv[3], int(sys.argv[4])))
    else:
        asyncio.run(main(sys.argv[2], int(sys.argv[3])))
