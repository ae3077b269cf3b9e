"""A refused Coordinate stream is reported as refused, with the server's status (never
"connected"), over gRPC and over Coder's transport."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tailnet.client import AgentConnection, ClientConnection, Connected, ConnectionOptions
from tailnet.config import StackConfig
from tailnet.stack import TailnetStack

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def small_stack() -> AsyncIterator[TailnetStack]:
    s = TailnetStack(
        StackConfig(
            http_addr="127.0.0.1:0", grpc_addr="127.0.0.1:0", stun_addr=None, data_dir=None,
            max_peers_per_principal=1,
        )
    )
    await s.start()
    try:
        yield s
    finally:
        await s.stop(grace=1.0)


def _targets(stack: TailnetStack) -> list[str]:
    assert stack.grpc_target is not None
    return [stack.grpc_target, stack.access_url]


async def test_principal_limit_refusal_is_not_connected(small_stack: TailnetStack) -> None:
    creds = small_stack.create_agent()
    for target in _targets(small_stack):
        first = AgentConnection(target, creds.token, options=ConnectionOptions(version="2.3"))
        await first.start(10)
        events: list[object] = []
        second = AgentConnection(
            target, creds.token,
            options=ConnectionOptions(version="2.3", on_event=events.append),
        )
        try:
            with pytest.raises(TimeoutError) as info:
                await second.start(1.5)
            assert "RESOURCE_EXHAUSTED" in str(info.value), (target, info.value)
            assert "max_peers_per_principal" in str(info.value)
            assert not second.connected
            assert not any(isinstance(e, Connected) for e in events)
            assert second.last_refusal is not None
        finally:
            await second.close()
            await first.close()


async def test_closed_coordinator_refusal_has_the_status(small_stack: TailnetStack) -> None:
    creds = small_stack.create_agent()
    assert small_stack.service is not None
    small_stack.service.coordinator.close()  # refuses every new peer from now on
    for target in _targets(small_stack):
        events: list[object] = []
        client = ClientConnection(
            target, small_stack.admin_token, agent_id=creds.agent_id,
            options=ConnectionOptions(version="2.3", on_event=events.append),
        )
        try:
            with pytest.raises(TimeoutError) as info:
                await client.start(1.5)
            assert "UNAVAILABLE" in str(info.value), (target, info.value)
            assert not client.connected
            assert not any(isinstance(e, Connected) for e in events)
        finally:
            await client.close()
