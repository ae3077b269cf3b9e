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

from tailnet.config import StackConfig
from tailnet.rpc.client import RpcClient
from tailnet.rpc.mux import MethodKind, RpcError, ServerCall
from tailnet.stack import TailnetStack
from tailnet.v2 import tailnet_pb2 as pb

T = 10.0
P = "/coder.agent.v2.Agent/"


@pytest.fixture
async def stack() -> AsyncIterator[TailnetStack]:
    s = TailnetStack(
        StackConfig(http_addr="127.0.0.1:0", grpc_addr=None, stun_addr=None, data_dir=None)
    )
    await s.start()
    try:
        yield s
    finally:
        await s.stop()


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


async def test_send_nowait_writes_at_once_but_never_ahead_of_waiting_output(
    stack: TailnetStack, client: RpcClient
) -> None:
    """send_nowait (the coordinator's direct path) sends without a loop
    iteration when the stream can take it; while earlier output still waits for
    the client's window it declines, so nothing overtakes it."""
    results: list[bool] = []

    async def stream(call: ServerCall, req: pb.Node) -> None:
        results.append(call.send_nowait(pb.Node(id=1)))  # small: written at once
        results.append(call.send_nowait(pb.Node(id=2, key=b"k" * (700 * 1024))))  # > window
        results.append(call.send_nowait(pb.Node(id=3)))  # 2 still waits: declined
        await call.send(pb.Node(id=3))  # the waiting path, after 2
        results.append(call.send_nowait(pb.Node(id=4)))  # all out again: at once

    path = reg(stack, "Nowait", MethodKind.SERVER_STREAM, stream)
    st = client.bidi(path, pb.Node)
    await st.send(pb.Node())
    await st.close_send()
    got = []
    while (m := await asyncio.wait_for(st.recv(), T)) is not None:
        got.append((m.id, len(m.key)))
    assert got == [(1, 0), (2, 700 * 1024), (3, 0), (4, 0)]
    assert results == [True, True, False, True]
    await st.close()
