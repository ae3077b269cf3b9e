"""The embedded relay admits only node keys the coordinator knows (``derp_admission``)."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from derp.client import DerpClient
from derp.errors import DerpError
from derp.keys import PrivateKey, PublicKey
from tailnet.admission import KnownNodeKeys
from tailnet.client import AgentConnection
from tailnet.config import ConfigError, StackConfig
from tailnet.stack import TailnetStack
from tailnet.v2 import tailnet_pb2 as pb

TIMEOUT = 10.0


def test_coordinator_indexes_node_keys_of_connected_peers() -> None:
    """``knows_node_key`` follows node updates, overwrites and removals."""
    from tailnet.core import Coordinator

    class Sink:
        def send(self, resp: pb.CoordinateResponse) -> bool:
            return True

        def close(self, error: str | None = None) -> None:
            pass

    coord = Coordinator()
    k1, k2 = b"np" + bytes(range(32)), b"np" + bytes(range(1, 33))
    a, s1, s2 = uuid.uuid4(), Sink(), Sink()
    coord.connect(a, "a", s1)
    assert not coord.knows_node_key(k1)
    coord.handle(a, s1, pb.CoordinateRequest(update_self=pb.CoordinateRequest.UpdateSelf(node=pb.Node(key=k1))))
    assert coord.knows_node_key(k1) and KnownNodeKeys(coord.knows_node_key)(PublicKey(k1[2:]))
    coord.handle(a, s1, pb.CoordinateRequest(update_self=pb.CoordinateRequest.UpdateSelf(node=pb.Node(key=k2))))
    assert not coord.knows_node_key(k1) and coord.knows_node_key(k2)
    coord.connect(a, "a", s2)  # overwrite: the new connection has no node yet
    assert not coord.knows_node_key(k2)
    coord.handle(a, s2, pb.CoordinateRequest(update_self=pb.CoordinateRequest.UpdateSelf(node=pb.Node(key=k2))))
    coord.lost(a, s2)
    assert not coord.knows_node_key(k2)


def test_known_admission_config() -> None:
    # HA keeps every replica's node keys (tests/tailnet/pg/test_replica_mesh.py)
    StackConfig(derp_admission="known", postgres_url="postgresql://x/y")
    with pytest.raises(ConfigError, match="derp_admission"):
        StackConfig(derp_admission="some")


async def test_relay_admits_only_keys_the_coordinator_knows() -> None:
    stack = TailnetStack(
        StackConfig(
            http_addr="127.0.0.1:0",
            grpc_addr="127.0.0.1:0",
            stun_addr=None,
            data_dir=None,
            derp_admission="known",
        )
    )
    await stack.start()
    try:
        agent_key = PrivateKey.generate()
        creds = stack.create_agent(name="a")
        assert stack.grpc_target is not None
        # Unknown key: closed during login, nothing relayed.
        stranger = DerpClient(stack.derp_url, agent_key, connect_timeout=TIMEOUT)
        with pytest.raises((DerpError, OSError, EOFError)):
            await asyncio.wait_for(stranger.connect(), TIMEOUT)
        await stranger.close()
        rejected = stack.derp_server.stats.admission_rejected if stack.derp_server else 0
        assert rejected >= 1

        # Once the agent has published a node with that key, the same key gets in.
        agent_id = creds.agent_id
        node = pb.Node(
            id=1,
            key=b"np" + agent_key.public.raw,
            preferred_derp=999,
            addresses=[],
        )
        conn = AgentConnection(stack.grpc_target, creds.token, node=node)
        await asyncio.wait_for(conn.start(), TIMEOUT)
        try:
            await asyncio.wait_for(conn.flush(TIMEOUT), TIMEOUT)

            async def known() -> bool:
                coord = stack.service.coordinator if stack.service else None
                while coord is None or coord.node_of(agent_id) is None:  # type: ignore[attr-defined]
                    await asyncio.sleep(0.01)
                return True

            await asyncio.wait_for(known(), TIMEOUT)
            member = DerpClient(stack.derp_url, agent_key, connect_timeout=TIMEOUT)
            await asyncio.wait_for(member.connect(), TIMEOUT)
            assert member.server_key == PublicKey(stack.derp_server.public_key.raw)  # type: ignore[union-attr]
            await member.close()
        finally:
            await conn.close()

        # The stack's own health probes carry the per-process mesh key and pass.
        report = await asyncio.wait_for(stack.health.report(force=True), 30) if stack.health else {}
        region = report["derp"]["regions"]["999"]
        assert region["healthy"] is True, region
    finally:
        await stack.stop()
