"""End-to-end demo: an agent and a client coordinate, then talk through DERP, sealed end to end.

Flow (:func:`run_demo`)::

    agent  ── AgentConnection(agent token, node{key, home region}) ──┐
    client ── ClientConnection(user token, agent_id, node) ──────────┤ coordinator
       (over gRPC, or over Coder's transport: WebSocket → yamux → DRPC)
       client: AddTunnel(agent) → NODE(agent), READY_FOR_HANDSHAKE(agent) ┘
       agent:  NODE(client)  (and acks it with ready_for_handshake)
    both learn the other's node key ("np" ‖ 32 bytes) and home DERP region
    both dial the home region's DERP node (from the DERP map the coordinator streams)
    client → agent: seal(client_key, agent_pub, "ping #i …")   via the relay
    agent  → client: seal(agent_key, client_pub, "pong #i …")   via the relay
    client sends one tampered box: the agent's open_sealed fails, it is dropped

Invariants checked: the agent only accepts packets whose DERP source key is the
key the coordinator announced for the client; every payload the relay carries
is a NaCl box (``nonce ‖ tag ‖ ciphertext``), never plaintext; a box with one
flipped bit is rejected by the receiver.
"""

from __future__ import annotations

import asyncio
import ipaddress
import secrets
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import nacl.exceptions

from derp.client import DerpClient
from derp.events import PacketReceived
from derp.keys import PrivateKey, PublicKey, open_sealed, seal
from tailnet.auth import TAILSCALE_SERVICE_PREFIX, addr_from_uuid
from tailnet.client import (
    AgentConnection,
    ClientConnection,
    ConnectionOptions,
    PeerUpdated,
    ReadyForHandshake,
    TailnetConnection,
)
from tailnet.config import StackConfig
from tailnet.health import node_url
from tailnet.stack import TailnetStack
from tailnet.v2 import tailnet_pb2 as pb

__all__ = ["DemoResult", "make_node", "run_demo", "run_embedded_demo", "PLAINTEXT_MARKER"]

#: Every plaintext message starts with this; tests search the relay's traffic for it.
PLAINTEXT_MARKER = b"TAILNET-DEMO-PLAINTEXT"


@dataclass(slots=True)
class DemoResult:
    agent_id: uuid.UUID
    client_peer_id: uuid.UUID
    agent_key: PublicKey
    client_key: PublicKey
    agent_home_region: int
    client_home_region: int
    derp_url: str
    rtts: list[float] = field(default_factory=list)
    plaintexts: list[bytes] = field(default_factory=list)
    sealed_sent: list[bytes] = field(default_factory=list)
    tampered_rejected: bool = False
    ready_for_handshake: bool = False


def make_node(key: PrivateKey, address: ipaddress.IPv6Address, home_region: int) -> pb.Node:
    """A tailnet Node for ``key`` homed at ``home_region`` (Coder encodings)."""
    prefix = f"{address}/128"
    return pb.Node(
        id=secrets.randbelow(2**62) + 1,
        key=b"np" + key.public.raw,
        disco="discokey:" + PrivateKey.generate().public.raw.hex(),
        preferred_derp=home_region,
        derp_latency={f"{home_region}-v4": 0.001},
        addresses=[prefix],
        allowed_ips=[prefix],
    )


def _node_key(node: pb.Node) -> PublicKey:
    if len(node.key) != 34 or not node.key.startswith(b"np"):
        raise ValueError(f"node key must be 'np' + 32 bytes, got {len(node.key)} bytes")
    return PublicKey(node.key[2:])


async def _wait_for(
    conn: TailnetConnection, pred: Callable[[object], bool], timeout: float, what: str
) -> object:
    async def loop() -> object:
        async for ev in conn.events():
            if pred(ev):
                return ev
        raise ConnectionError(f"connection closed while waiting for {what}")

    try:
        return await asyncio.wait_for(loop(), timeout)
    except TimeoutError:
        raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}") from None


async def run_demo(
    *,
    grpc_target: str | None = None,
    access_url: str | None = None,
    agent_id: uuid.UUID,
    agent_token: str,
    client_token: str,
    home_region: int = 999,
    packets: int = 5,
    timeout: float = 10.0,
    derp_url: str | None = None,
    log: Callable[[str], None] = print,
) -> DemoResult:
    """Run the demo against a running stack (see module docstring).

    The peers coordinate over Coder's transport when ``access_url`` is given
    (the stack's ``http(s)://`` URL), else over gRPC at ``grpc_target``.

    ``derp_url`` overrides the URL taken from the DERP map (tests put a
    recording proxy in between). Raises on any failure.
    """
    agent_key, client_key = PrivateKey.generate(), PrivateKey.generate()
    opts = ConnectionOptions(version="2.3")
    agent_node = make_node(agent_key, addr_from_uuid(TAILSCALE_SERVICE_PREFIX, agent_id), home_region)
    client_addr = addr_from_uuid(TAILSCALE_SERVICE_PREFIX, uuid.uuid4())
    client_node = make_node(client_key, client_addr, home_region)

    target = access_url or grpc_target
    if target is None:
        raise ValueError("run_demo needs grpc_target or access_url")
    log(f"coordinating over {'DRPC (Coder transport)' if access_url else 'gRPC'} at {target}")
    agent = AgentConnection(target, agent_token, node=agent_node, options=opts)
    client = ClientConnection(
        target, client_token, agent_id=agent_id, node=client_node,
        options=ConnectionOptions(version="2.3"),
    )
    derp_agent: DerpClient | None = None
    derp_client: DerpClient | None = None
    echo_task: asyncio.Task[None] | None = None
    t0 = time.perf_counter()
    try:
        await agent.start(timeout)
        client_peer = await client.start(timeout)
        log(f"agent  {agent_id} connected to the coordinator, node key {agent_key.public.short()}")
        log(f"client {client_peer} connected, tunnel to the agent requested")

        # Client: the agent's NODE and READY_FOR_HANDSHAKE (in either order: the HA
        # coordinator delivers READY_FOR_HANDSHAKE directly but NODEs after a query);
        # agent: the client's NODE.
        rfh_seen = False

        def agent_node_or_rfh(e: object) -> bool:
            nonlocal rfh_seen
            if isinstance(e, ReadyForHandshake) and e.peer_id == agent_id:
                rfh_seen = True
            return isinstance(e, PeerUpdated) and e.peer_id == agent_id

        ev = await _wait_for(client, agent_node_or_rfh, timeout, "the agent's NODE")
        assert isinstance(ev, PeerUpdated)
        agent_seen = ev.node
        ev2 = await _wait_for(
            agent, lambda e: isinstance(e, PeerUpdated) and e.peer_id == client_peer,
            timeout, "the client's NODE",
        )
        assert isinstance(ev2, PeerUpdated)
        client_seen = ev2.node
        if not rfh_seen:
            await _wait_for(
                client, lambda e: isinstance(e, ReadyForHandshake) and e.peer_id == agent_id,
                timeout, "READY_FOR_HANDSHAKE from the agent",
            )
        learned_agent_key = _node_key(agent_seen)
        learned_client_key = _node_key(client_seen)
        if learned_agent_key != agent_key.public or learned_client_key != client_key.public:
            raise RuntimeError("coordinator delivered a different node key than published")
        log(
            f"coordinated in {1000 * (time.perf_counter() - t0):.1f} ms: "
            f"client learned agent key {learned_agent_key.short()} home region "
            f"{agent_seen.preferred_derp}; agent learned client key "
            f"{learned_client_key.short()} home region {client_seen.preferred_derp}; "
            "READY_FOR_HANDSHAKE received"
        )

        if derp_url is None:
            dm = client.derp_map
            if dm is None:
                dm = await asyncio.wait_for(anext(client.derp_maps()), timeout)
            region = dm.regions.get(agent_seen.preferred_derp)
            if region is None or not region.nodes:
                raise RuntimeError(f"home region {agent_seen.preferred_derp} not in the DERP map")
            derp_url = node_url(region.nodes[0])
        result = DemoResult(
            agent_id, client_peer, learned_agent_key, learned_client_key,
            agent_seen.preferred_derp, client_seen.preferred_derp, derp_url,
            ready_for_handshake=True,
        )

        derp_agent = DerpClient(derp_url, agent_key, connect_timeout=timeout)
        derp_client = DerpClient(derp_url, client_key, connect_timeout=timeout)
        await asyncio.wait_for(asyncio.gather(derp_agent.connect(), derp_client.connect()), timeout)
        await derp_agent.note_preferred(True)
        await derp_client.note_preferred(True)
        log(f"both connected to DERP {derp_url}")

        rejected = asyncio.Event()
        da = derp_agent

        async def agent_echo() -> None:
            while True:
                pkt = await da.recv()
                if not isinstance(pkt, PacketReceived):
                    continue
                if pkt.src != learned_client_key:
                    continue  # only the peer the coordinator told us about
                try:
                    plain = open_sealed(agent_key, pkt.src, pkt.data)
                except nacl.exceptions.CryptoError:
                    rejected.set()
                    continue
                result.plaintexts.append(plain)
                reply = PLAINTEXT_MARKER + b" pong " + plain[len(PLAINTEXT_MARKER) :]
                await da.send(pkt.src, seal(agent_key, pkt.src, reply))

        echo_task = asyncio.ensure_future(agent_echo())
        dc = derp_client
        loop = asyncio.get_running_loop()
        for i in range(packets):
            msg = PLAINTEXT_MARKER + f" ping #{i} {secrets.token_hex(8)}".encode()
            box = seal(client_key, learned_agent_key, msg)
            result.sealed_sent.append(box)
            start = time.perf_counter()
            await dc.send(learned_agent_key, box)
            while True:
                pkt = await asyncio.wait_for(dc.recv(), timeout)
                if isinstance(pkt, PacketReceived) and pkt.src == learned_agent_key:
                    break
            reply = open_sealed(client_key, pkt.src, pkt.data)
            rtt = time.perf_counter() - start
            if reply != PLAINTEXT_MARKER + b" pong " + msg[len(PLAINTEXT_MARKER) :]:
                raise RuntimeError("agent's reply does not match")
            result.rtts.append(rtt)
            log(f"  packet {i}: {len(box)} sealed bytes, round trip {rtt * 1000:.2f} ms")

        tampered = bytearray(seal(client_key, learned_agent_key, PLAINTEXT_MARKER + b" tampered"))
        tampered[-1] ^= 0x01
        await dc.send(learned_agent_key, bytes(tampered))
        await asyncio.wait_for(rejected.wait(), timeout)
        result.tampered_rejected = True
        log("  tampered packet: rejected by the agent (box did not authenticate)")
        if result.rtts:
            rtts = sorted(result.rtts)
            log(
                f"round trips: min {rtts[0] * 1000:.2f} ms, median "
                f"{rtts[len(rtts) // 2] * 1000:.2f} ms, max {rtts[-1] * 1000:.2f} ms; "
                f"total {time.perf_counter() - t0:.2f} s"
            )
        return result
    finally:
        if echo_task is not None:
            echo_task.cancel()
            await asyncio.gather(echo_task, return_exceptions=True)
        closers = [c.close() for c in (derp_agent, derp_client) if c is not None]
        await asyncio.gather(*closers, client.close(), agent.close(), return_exceptions=True)


async def run_embedded_demo(
    *,
    packets: int = 5,
    timeout: float = 10.0,
    transports: tuple[str, ...] = ("grpc", "drpc"),
    log: Callable[[str], None] = print,
) -> list[DemoResult]:
    """Start an in-memory stack on ephemeral loopback ports, run the demo once per
    transport (``"grpc"``, ``"drpc"``: Coder's), stop it; one result per run."""
    stack = TailnetStack(
        StackConfig(
            http_addr="127.0.0.1:0",
            grpc_addr="127.0.0.1:0",
            stun_addr="127.0.0.1:0",
            data_dir=None,
            # The relay admits only node keys the coordinator knows: the demo's peers
            # publish their nodes before they log in to DERP.
            derp_admission="known",
        )
    )
    await stack.start()
    results: list[DemoResult] = []
    try:
        log(f"started an embedded stack: API {stack.access_url}, gRPC {stack.grpc_target}")
        for transport in transports:
            if transport not in ("grpc", "drpc"):
                raise ValueError(f"unknown transport {transport!r}")
            user_id, user_token = stack.create_user(name="demo-user")
            agent = stack.create_agent(owner_id=user_id, name="demo-agent")
            results.append(await run_demo(
                grpc_target=stack.grpc_target if transport == "grpc" else None,
                access_url=stack.access_url if transport == "drpc" else None,
                agent_id=agent.agent_id,
                agent_token=agent.token,
                client_token=user_token,
                packets=packets,
                timeout=timeout,
                log=log,
            ))
        return results
    finally:
        await stack.stop()
