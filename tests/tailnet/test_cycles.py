"""No reference cycles per connection or stream (gRPC transport, real sockets on 127.0.0.1).

A client process (``cycles_workload.py``; its own garbage is not ours) connects
and disconnects many peers in every way a stream can end — graceful
Disconnect, half-close, cancel, malformed request, a node over a cap, refused
by policy, refused token, over the per-principal limit, resumed (replacing a
live connection and re-authorizing its tunnel), evicted as a slow consumer —
and calls the unary and server-streaming RPCs, while this process serves them
with the cyclic GC disabled; afterwards one collection must find no cyclic
garbage of ours (:class:`.cycles.CycleCheck`). grpc.aio's own per-call handler
lookup cycle (~6 objects per call) is the only garbage allowed. The same for
the HTTP API's WebSockets.
"""

from __future__ import annotations

import asyncio
import sys
import uuid
from pathlib import Path

import grpc
import uvloop

from tailnet.config import StackConfig
from tailnet.core import Coordinator
from tailnet.derpmap import StaticDERPMapSource, embedded_region, new_derp_map
from tailnet.identity import Principal, StaticTokenAuthenticator
from tailnet.limits import Limits
from tailnet.resume import ResumeTokenProvider
from tailnet.server.grpc import TailnetGrpcServer
from tailnet.service import TailnetService
from tailnet.stack import TailnetStack
from tailnet.workspaces import InMemoryWorkspaceProvider

from .cycles import CycleCheck, run_workload

WORKLOAD = Path(__file__).with_name("cycles_workload.py")
USER = uuid.UUID("11111111-1111-4111-8111-111111111111")
AGENT = uuid.UUID("aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa")
WS = uuid.UUID("dddddddd-dddd-4ddd-8ddd-dddddddddddd")
TOKENS = {
    "agent": Principal("agent", AGENT, "a"),
    "user": Principal("user", USER, "u"),
    "limited": Principal("user", uuid.UUID(int=7), "l"),
}


async def test_peers_connecting_and_disconnecting_leave_no_cycles() -> None:
    workspaces = InMemoryWorkspaceProvider()
    workspaces.upsert_workspace(USER, WS, "ws")
    workspaces.upsert_agent(WS, AGENT, "main")
    limits = Limits(max_peers_per_principal=2, peer_buffer_responses=4)
    service = TailnetService(
        coordinator=Coordinator(limits=limits),
        authenticator=StaticTokenAuthenticator(TOKENS),
        derp_maps=StaticDERPMapSource(new_derp_map(embedded_region("127.0.0.1", 1, scheme="http"))),
        resume=ResumeTokenProvider(),
        workspaces=workspaces,
        limits=limits,
    )
    server = TailnetGrpcServer(service)
    await server.start("127.0.0.1", 0)
    try:
        keep = asyncio.all_tasks()
        # Warm-up round: first-use caches (grpc's, logging's) are not garbage.
        await run_workload(sys.executable, str(WORKLOAD), "grpc", server.target, "1")
        await server_idle(keep)
        with CycleCheck() as check:
            await run_workload(sys.executable, str(WORKLOAD), "grpc", server.target, "4")
            await server_idle(keep)
        check.assert_clean()
        assert check.total > 0  # grpc.aio's per-call lookup: the check does see garbage
        assert service.principal_streams(TOKENS["user"]) == 0
        assert service.coordinator.peers() == []
    finally:
        await server.stop(0)


#: grpc.aio's tasks that wait for the next incoming call (they never end while serving)
_ACCEPT_LOOPS = ("_request_call", "_request_registered_call", "_serving_loop")


def _is_accept_loop(t: asyncio.Task[object]) -> bool:
    name = getattr(t.get_coro(), "__qualname__", "")
    return any(name.endswith(a) for a in _ACCEPT_LOOPS)


async def server_idle(keep: set[asyncio.Task[object]]) -> None:
    """Wait (bounded) until every server-side call task started since ``keep`` is done."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20.0
    while busy := [t for t in asyncio.all_tasks() if t not in keep and not _is_accept_loop(t)]:
        assert loop.time() < deadline, f"server tasks still running: {busy}"
        await asyncio.wait(busy, timeout=0.5)


async def test_websockets_leave_no_cycles() -> None:
    """API WebSockets (server pings on, or off) ended cleanly or by a dropped TCP
    connection: no cycle through the ping task or the protocol's parser error."""
    stack = TailnetStack(StackConfig(http_addr="127.0.0.1:0", grpc_addr=None, stun_addr=None,
                                     data_dir=None))
    await stack.start()
    try:
        keep = asyncio.all_tasks()
        args = (sys.executable, str(WORKLOAD), "ws", stack.ws_url, stack.admin_token)
        await run_workload(*args, "1")
        await server_idle(keep)
        with CycleCheck() as check:
            await run_workload(*args, "5")
            await server_idle(keep)
        check.assert_clean()
    finally:
        await stack.stop()


async def test_drpc_sessions_leave_no_cycles() -> None:
    """Coder-transport sessions (yamux + DRPC) ended every way leave no cycle of ours."""
    stack = TailnetStack(StackConfig(http_addr="127.0.0.1:0", grpc_addr=None, stun_addr=None,
                                     data_dir=None))
    await stack.start()
    try:
        keep = asyncio.all_tasks()
        args = (sys.executable, str(WORKLOAD), "drpc", stack.ws_url, stack.admin_token)
        await run_workload(*args, "1")
        await server_idle(keep)
        with CycleCheck() as check:
            await run_workload(*args, "3")
            await server_idle(keep)
        check.assert_clean()
        assert stack.service is not None and stack.service.coordinator.peers() == []
    finally:
        await stack.stop()


def test_status_codes_are_grpc_names() -> None:
    """Every Status maps to the grpc.StatusCode of the same name (RESOURCE_EXHAUSTED incl.)."""
    from tailnet.service import Status

    for s in Status:
        assert grpc.StatusCode[s.name].name == s.name


def test_no_cycles_on_uvloop() -> None:
    """The same two checks on uvloop (what ``tailnet serve`` runs)."""
    async def both() -> None:
        assert isinstance(asyncio.get_running_loop(), uvloop.Loop)
        await test_peers_connecting_and_disconnecting_leave_no_cycles()
        await test_websockets_leave_no_cycles()
        await test_drpc_sessions_leave_no_cycles()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(asyncio.wait_for(both(), 120))
