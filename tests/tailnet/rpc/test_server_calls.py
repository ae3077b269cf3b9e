"""How the DRPC server adapter starts and ends calls (handlers registered on the agent mux).

Covers the handler endings written by the adapter's done-callback: unary
success (also when the response exceeds the yamux window), handler failures,
request parse errors, a request that arrives after the Invoke, and a
server-streaming call invoked with a bare CloseSend.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from tailnet.rpc.client import RpcClient
from tailnet.rpc.mux import MethodKind, RpcError, ServerCall
from tailnet.stack import TailnetStack
from tailnet.v2 import tailnet_pb2 as pb

T = 10.0
P = "/coder.agent.v2.Agent/"


@pytest.fixture
async def client(stack: TailnetStack) -> AsyncIterator[RpcClient]:
    agent = stack.create_agent()
    c = await RpcClient.connect(
        f"{stack.ws_url}/api/v2/workspaceagents/me/rpc?version=2.6", agent.token, cookie=True)
    try:
        yield c
    finally:
        await c.close()


def reg(stack: TailnetStack, name: str, kind: MethodKind, handler: object) -> str:
    assert stack.api is not None
    stack.api.agent_mux.register(P + name, kind, pb.Node, handler)  # type: ignore[arg-type]
    return P + name


async def test_unary_success_larger_than_the_window(
    stack: TailnetStack, client: RpcClient
) -> None:
    async def big(call: ServerCall, req: pb.Node) -> pb.Node:
        return pb.Node(id=req.id, key=b"k" * (700 * 1024))

    path = reg(stack, "Big", MethodKind.UNARY, big)
    resp = await asyncio.wait_for(client.unary(path, pb.Node(id=7), pb.Node), T)
    assert resp.id == 7 and len(resp.key) == 700 * 1024
    # the stream and connection are fine afterwards
    resp = await asyncio.wait_for(client.unary(path, pb.Node(id=8), pb.Node), T)
    assert resp.id == 8


async def test_unary_handler_failures_are_internal_error(
    stack: TailnetStack, client: RpcClient
) -> None:
    async def boom(call: ServerCall, req: pb.Node) -> pb.Node:
        raise ValueError("secret detail")

    async def wrong(call: ServerCall, req: pb.Node) -> object:
        return "not a message"

    async def nope(call: ServerCall, req: pb.Node) -> pb.Node:
        raise RpcError(12, "Unimplemented")

    for name, handler, code, text in (
        ("Boom", boom, 0, "internal error"),
        ("Wrong", wrong, 0, "internal error"),
        ("Nope", nope, 12, "Unimplemented"),
    ):
        path = reg(stack, name, MethodKind.UNARY, handler)
        with pytest.raises(RpcError) as info:
            await asyncio.wait_for(client.unary(path, pb.Node(), pb.Node), T)
        assert (info.value.code, info.value.message) == (code, text)
    assert not client.closed


async def test_unparsable_unary_request_is_error_and_handler_never_runs(
    stack: TailnetStack, client: RpcClient
) -> None:
    ran: list[object] = []

    async def h(call: ServerCall, req: pb.Node) -> pb.Node:
        ran.append(req)
        return req

    path = reg(stack, "Parse", MethodKind.UNARY, h)
    st = client.bidi(path, pb.Node)
    st._drpc.send_message(b"\xff\xff\xff")
    st._drpc.send_close_send()
    await st._write()
    with pytest.raises(RpcError) as info:
        await asyncio.wait_for(st.recv(), T)
    assert info.value.code == 0 and "invalid Node" in info.value.message
    await st.close()
    assert ran == []


async def test_unary_request_after_the_invoke_and_bare_close_send(
    stack: TailnetStack, client: RpcClient
) -> None:
    async def echo(call: ServerCall, req: pb.Node) -> pb.Node:
        return pb.Node(id=req.id + 1)

    path = reg(stack, "Echo", MethodKind.UNARY, echo)
    st = client.bidi(path, pb.Node)
    await st._write()  # the Invoke alone
    await asyncio.sleep(0.05)
    await st.send(pb.Node(id=41))  # the Message in a later frame
    await st.close_send()
    resp = await asyncio.wait_for(st.recv(), T)
    assert resp is not None and resp.id == 42
    assert await asyncio.wait_for(st.recv(), T) is None  # then CloseSend
    await st.close()

    got: list[pb.Node] = []

    async def stream(call: ServerCall, req: pb.Node) -> None:
        got.append(req)
        await call.send(pb.Node(id=1))
        raise RuntimeError("after one message")

    spath = reg(stack, "Stream", MethodKind.SERVER_STREAM, stream)
    st = client.bidi(spath, pb.Node)
    await st.close_send()  # Invoke + CloseSend, no Message: an empty request
    first = await asyncio.wait_for(st.recv(), T)
    assert first is not None and first.id == 1 and got == [pb.Node()]
    with pytest.raises(RpcError) as info:
        await asyncio.wait_for(st.recv(), T)
    assert (info.value.code, info.value.message) == (0, "internal error")
    await st.close()


async def test_client_cancel_cancels_the_handler(
    stack: TailnetStack, client: RpcClient
) -> None:
    started = asyncio.Event()
    cancelled = asyncio.Event()

    async def slow(call: ServerCall, req: pb.Node) -> None:
        started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    path = reg(stack, "Slow", MethodKind.SERVER_STREAM, slow)
    st = client.bidi(path, pb.Node)
    await st.send(pb.Node())
    await st.close_send()
    await asyncio.wait_for(started.wait(), T)
    await st.close()  # Close + FIN
    await asyncio.wait_for(cancelled.wait(), T)


async def test_a_held_call_stays_open_without_its_handler_and_ends_by_finish(
    stack: TailnetStack, client: RpcClient
) -> None:
    """hold(): the handler returns, the call stays open; messages sent later
    arrive; finish() ends it (CloseSend here: not registered end_with_close)."""
    held: asyncio.Queue[ServerCall] = asyncio.Queue()

    async def h(call: ServerCall, req: pb.Node) -> None:
        await call.send(pb.Node(id=req.id))
        call.hold()
        await held.put(call)

    path = reg(stack, "Held", MethodKind.SERVER_STREAM, h)
    st = await client.server_stream(path, pb.Node(id=5), pb.Node)
    first = await asyncio.wait_for(st.recv(), T)
    assert first is not None and first.id == 5
    call = await asyncio.wait_for(held.get(), T)
    assert not call.ended
    await call.send(pb.Node(id=6))  # from outside any handler
    later = await asyncio.wait_for(st.recv(), T)
    assert later is not None and later.id == 6
    call.finish()
    assert call.ended
    assert await asyncio.wait_for(st.recv(), T) is None
    call.finish()  # idempotent
    await st.close()


async def test_a_held_call_ended_by_the_peer_tells_its_listener(
    stack: TailnetStack, client: RpcClient
) -> None:
    held: asyncio.Queue[ServerCall] = asyncio.Queue()
    ended = asyncio.Event()

    async def h(call: ServerCall, req: pb.Node) -> None:
        call.hold()

        def on_input() -> None:
            if call.ended:
                ended.set()

        call.listen(on_input)
        await held.put(call)

    path = reg(stack, "HeldPeerEnd", MethodKind.SERVER_STREAM, h)
    st = await client.server_stream(path, pb.Node(), pb.Node)
    call = await asyncio.wait_for(held.get(), T)
    await st.close()  # Close + FIN
    await asyncio.wait_for(ended.wait(), T)
    assert call.ended
    with pytest.raises(ConnectionError):
        await call.send(pb.Node())
    call.finish(RuntimeError("too late"))  # no-op once ended


async def test_hold_is_for_streaming_calls_only(stack: TailnetStack, client: RpcClient) -> None:
    async def h(call: ServerCall, req: pb.Node) -> pb.Node:
        call.hold()
        return req

    path = reg(stack, "HoldUnary", MethodKind.UNARY, h)
    with pytest.raises(RpcError) as info:
        await asyncio.wait_for(client.unary(path, pb.Node(), pb.Node), T)
    assert (info.value.code, info.value.message) == (0, "internal error")


async def test_stream_derp_maps_held_pushes_changes_and_ends_with_the_service(
    stack: TailnetStack, client: RpcClient
) -> None:
    """StreamDERPMaps runs held (no task between changes): an equal map is not
    sent, a changed one is; closing the stream unregisters its waiter; the
    service closing ends the others with Close."""
    from tailnet.derpmap import StaticDERPMapSource, embedded_region, new_derp_map
    from tailnet.rpc.tailnet_client import METHOD_STREAM_DERP_MAPS

    src = stack.derp_maps
    assert isinstance(src, StaticDERPMapSource)
    svc = stack.service
    assert svc is not None
    a = await client.server_stream(METHOD_STREAM_DERP_MAPS, pb.StreamDERPMapsRequest(), pb.DERPMap)
    b = await client.server_stream(METHOD_STREAM_DERP_MAPS, pb.StreamDERPMapsRequest(), pb.DERPMap)
    first_a = await asyncio.wait_for(a.recv(), T)
    first_b = await asyncio.wait_for(b.recv(), T)
    assert first_a is not None and first_a == first_b and first_a.HasField("home_params")
    src.set(src.current())  # equal: nothing is sent
    changed = new_derp_map(*src.current().regions.values(),
                           embedded_region("127.0.0.1", 3341, region_id=1000, scheme="http"))
    src.set(changed)
    second = await asyncio.wait_for(a.recv(), T)
    assert second is not None and 1000 in second.regions
    second_b = await asyncio.wait_for(b.recv(), T)
    assert second_b == second
    await a.close()

    async def waiters_left() -> None:
        while len(svc._close_waiters) != 1:
            await asyncio.sleep(0.01)

    await asyncio.wait_for(waiters_left(), T)  # only b's
    svc.close()
    assert await asyncio.wait_for(b.recv(), T) is None  # ended (Close)
    assert not svc._close_waiters
