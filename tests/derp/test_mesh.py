"""Regional mesh: pure route table, peer parsing, and three real relays on 127.0.0.1."""

from __future__ import annotations

import asyncio
import re
import signal
import socket
import ssl
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from derp.frames import (
    DISCO_MAGIC,
    FrameType,
    PeerGoneReason,
    encode_close_peer,
    encode_forward_packet,
    encode_watch_conns,
)
from derp.keys import PrivateKey
from derp.mesh import Mesh, MeshPeer, RouteTable, parse_mesh_peer, parse_mesh_with
from derp.server import DerpServer, ServerConfig
from derp.stats import UNKNOWN_DEST, UNKNOWN_DEST_ON_FWD
from derp.stunserver import stun_request

from .conftest import UPGRADE_REQUEST, WAIT, Host, HostFactory, RawClient, start_host, wait_until

MESH_KEY = bytes(range(32))
RETRY = 0.1

# --------------------------------------------------------------------------- route table


def test_route_table_basics() -> None:
    fwd: dict[bytes, object] = {}
    t: RouteTable[str] = RouteTable(fwd)
    k = b"k" * 32
    assert t.add(k, "B") is True
    assert t.add(k, "B") is False  # per-connection PeerPresent repeats: a set, not a count
    assert t.add(k, "C") is False
    assert t.route(k) == "B" and fwd[k] == "B"
    assert t.remove(k, "B") is False  # C still announces it
    assert t.route(k) == "C" and fwd[k] == "C"
    assert t.remove(k, "B") is False and t.stale_removals == 1
    assert t.remove(k, "C") is True
    assert k not in t and k not in fwd
    t.check_invariants()


def test_route_table_drop_link_forgets_only_its_routes() -> None:
    t: RouteTable[str] = RouteTable()
    a, b, c = (bytes([i]) * 32 for i in range(3))
    t.add(a, "L1")
    t.add(b, "L1")
    t.add(b, "L2")
    t.add(c, "L2")
    assert sorted(t.drop_link("L1")) == [a]  # b still reachable through L2
    assert t.route(b) == "L2" and t.route(c) == "L2" and a not in t
    assert t.drop_link("L1") == []
    t.check_invariants()


class RouteMachine(RuleBasedStateMachine):
    """Random add/remove/drop_link sequences against a model of ordered link sets."""

    def __init__(self) -> None:
        super().__init__()
        self.t: RouteTable[int] = RouteTable()
        self.model: dict[bytes, list[int]] = {}

    keys = st.sampled_from([bytes([i]) * 32 for i in range(4)])
    links = st.integers(0, 3)

    @rule(k=keys, link=links)
    def add(self, k: bytes, link: int) -> None:
        was = k in self.model
        assert self.t.add(k, link) is (not was)
        lst = self.model.setdefault(k, [])
        if link not in lst:
            lst.append(link)

    @rule(k=keys, link=links)
    def remove(self, k: bytes, link: int) -> None:
        lst = self.model.get(k, [])
        last = lst == [link]
        assert self.t.remove(k, link) is last
        if link in lst:
            lst.remove(link)
        if not lst:
            self.model.pop(k, None)

    @rule(link=links)
    def drop(self, link: int) -> None:
        gone = set(self.t.drop_link(link))
        want = set()
        for k, lst in list(self.model.items()):
            if link in lst:
                lst.remove(link)
                if not lst:
                    want.add(k)
                    del self.model[k]
        assert gone == want

    @invariant()
    def consistent(self) -> None:
        self.t.check_invariants()
        for k, lst in self.model.items():
            assert self.t.route(k) == lst[0]
        assert len(self.t) == len(self.model)


TestRouteMachine = RouteMachine.TestCase


def test_parse_mesh_peer_forms() -> None:
    p = parse_mesh_peer("derp1.example.com")
    assert p == MeshPeer("https", "derp1.example.com", 443, "derp1.example.com")
    assert p.url == "https://derp1.example.com/derp"
    p = parse_mesh_peer("derp2.example.com/10.0.0.2")
    assert (p.host, p.dial_host, p.port) == ("derp2.example.com", "10.0.0.2", 443)
    p = parse_mesh_peer("derp3:8443/10.0.0.3")
    assert (p.host, p.dial_host, p.port, p.host_header) == ("derp3", "10.0.0.3", 8443, "derp3:8443")
    p = parse_mesh_peer("http://127.0.0.1:3340/derp")
    assert (p.scheme, p.host, p.port, p.url) == ("http", "127.0.0.1", 3340, "http://127.0.0.1:3340/derp")
    assert len(parse_mesh_with("a, b,,c")) == 3
    for bad in ("", "ftp://x", "host:99999", "http://"):
        with pytest.raises(ValueError):
            parse_mesh_peer(bad)


def test_mesh_with_needs_mesh_key() -> None:
    with pytest.raises(ValueError):
        ServerConfig(private_key=PrivateKey.generate(), mesh_with=(parse_mesh_peer("a"),))


# --------------------------------------------------------------------------- real relays


@dataclass
class Region:
    """Relays of one region; each a :class:`Host` (one or two workers), and every
    worker dials every relay's URL itself (``derper --workers N`` does that)."""

    servers: list[Host]
    meshes: list[list[Mesh]] = field(default_factory=list)
    clients: list[RawClient] = field(default_factory=list)

    def url(self, i: int) -> str:
        return f"http://127.0.0.1:{self.servers[i].port}/derp"

    async def client(self, i: int, key: PrivateKey | None = None) -> RawClient:
        """A client of relay ``i`` (two workers: on its workers in turn)."""
        host = self.servers[i]
        w = host.next_worker()
        c = await RawClient.open(host.servers[w].port, key)
        self.clients.append(c)
        await c.handshake()
        await host.known(c.pub, w)
        return c

    async def kill(self, i: int) -> None:
        for m in self.meshes[i]:
            await m.stop()
        await self.servers[i].stop()

    async def close(self) -> None:
        """Close every client, then stop every mesh and server (idempotent)."""
        for c in self.clients:
            await c.close()
        for ms in self.meshes:
            for m in ms:
                await m.stop()
        for s in self.servers:
            await s.stop()


async def _start(n: int, workers: int, *, include_self: bool = True) -> Region:
    servers = []
    for _ in range(n):
        config = ServerConfig(private_key=PrivateKey.generate(), mesh_key=MESH_KEY)
        servers.append(await start_host(config, workers))
    region = Region(servers)
    for i, host in enumerate(servers):
        peers = [
            parse_mesh_peer(region.url(j)) for j in range(n) if include_self or j != i
        ]
        region.meshes.append([Mesh(srv, peers, retry_interval=RETRY) for srv in host.servers])
        for m in region.meshes[-1]:
            m.start()
    return region


@pytest.fixture
async def region3(derp_workers: int) -> AsyncIterator[Region]:
    region = await _start(3, derp_workers)
    yield region
    await region.close()


def _knows(host: Host, key: bytes) -> bool:
    """Every worker of ``host`` can route ``key`` (local, sibling or mesh)."""
    return all(key in srv.relay or key in srv.relay.forwarders for srv in host.servers)


def _forgot(host: Host, key: bytes) -> bool:
    """No worker of ``host`` can route ``key``."""
    return not any(key in srv.relay or key in srv.relay.forwarders for srv in host.servers)


async def _wait_routes(region: Region, clients: list[RawClient], alive: list[int]) -> None:
    await wait_until(
        lambda: all(_knows(region.servers[i], c.pub) for i in alive for c in clients)
    )


async def _all_pairs_talk(clients: list[RawClient], tag: bytes) -> None:
    for s in clients:
        for r in clients:
            if r is not s:
                s.send_packet(r.pub, tag + s.pub[:4] + r.pub[:4])
    for r in clients:
        got = set()
        for _ in range(len(clients) - 1):
            src, data = await r.recv_packet()
            assert data == tag + src[:4] + r.pub[:4]
            got.add(src)
        assert got == {s.pub for s in clients if s is not r}


async def test_three_relays_all_pairs_then_one_dies(region3: Region) -> None:
    reg = region3
    # Self-connections are detected (each node lists itself in its peers).
    await wait_until(
        lambda: all(any(link.is_self for link in m.links) for ms in reg.meshes for m in ms)
    )
    # Two clients on each relay (two workers: one on each worker).
    cs = [await reg.client(i % 3) for i in range(6)]
    await _wait_routes(reg, cs, [0, 1, 2])
    await _all_pairs_talk(cs, b"round1:")
    assert all(s.stats.packets_forwarded_out > 0 for s in reg.servers)
    assert all(s.stats.packets_forwarded_in > 0 for s in reg.servers)

    # Relay 2 dies: its clients (cs[2], cs[5]) go with it.
    dead = [cs[2], cs[5]]
    alive = [c for c in cs if c not in dead]
    await reg.kill(2)
    for c in dead:
        await c.expect_closed()
    # Routes to the dead relay's clients are forgotten on the survivors...
    await wait_until(lambda: all(_forgot(reg.servers[i], c.pub) for i in (0, 1) for c in dead))
    # ...and clients that heard from them are told they left (spec §3.4).
    for c in alive:
        f = await c.recv_type(FrameType.PEER_GONE)
        gone = {f.payload[:32]}
        assert f.payload[32] == PeerGoneReason.DISCONNECTED
        f = await c.recv_type(FrameType.PEER_GONE)
        gone.add(f.payload[:32])
        assert gone == {d.pub for d in dead}
    # The others keep talking across the remaining two relays.
    await _all_pairs_talk(alive, b"round2:")
    # Sending to a dead relay's client: unknown_dest drop, and NotHere for disco.
    before = reg.servers[0].stats.drops_by_reason(UNKNOWN_DEST)
    disco = DISCO_MAGIC + bytes(60)
    cs[0].send_packet(cs[2].pub, disco)
    f = await cs[0].recv_type(FrameType.PEER_GONE)
    assert f.payload == cs[2].pub + bytes([PeerGoneReason.NOT_HERE])
    assert reg.servers[0].stats.drops_by_reason(UNKNOWN_DEST) == before + 1


async def test_link_reconnects_and_relearns_routes(derp_workers: int) -> None:
    reg = await _start(2, derp_workers, include_self=False)
    try:
        b_client = await reg.client(1)
        await _wait_routes(reg, [b_client], [0])
        link = reg.meshes[0][0].links[0]
        gen = link.generation
        port = reg.servers[1].port
        await reg.kill(1)
        await wait_until(lambda: _forgot(reg.servers[0], b_client.pub))
        assert not link.connected
        # A new relay on the same address (same key is not needed: links re-login).
        config = ServerConfig(private_key=PrivateKey.generate(), mesh_key=MESH_KEY)
        reg.servers[1] = await start_host(config, derp_workers, port=port)
        b2 = await reg.client(1)
        b3 = await reg.client(1)  # two workers: on the second one
        await wait_until(lambda: link.generation > gen and _knows(reg.servers[0], b2.pub))
        await _wait_routes(reg, [b2, b3], [0])
        a_client = await reg.client(0)
        a_client.send_packet(b2.pub, b"after reconnect")
        assert await b2.recv_packet() == (a_client.pub, b"after reconnect")
        a_client.send_packet(b3.pub, b"after reconnect")
        assert await b3.recv_packet() == (a_client.pub, b"after reconnect")
    finally:
        await reg.close()


async def test_local_client_wins_over_mesh_route(derp_workers: int) -> None:
    reg = await _start(2, derp_workers, include_self=False)
    try:
        key = PrivateKey.generate()
        on_b = await reg.client(1, key)
        await _wait_routes(reg, [on_b], [0])
        on_a = await reg.client(0, key)  # same key, now also local on A
        sender = await reg.client(0)  # two workers: A's other worker
        fwd_before = reg.servers[0].stats.packets_forwarded_out
        sender.send_packet(key.public.raw, b"local please")
        assert await on_a.recv_packet() == (sender.pub, b"local please")
        assert reg.servers[0].stats.packets_forwarded_out == fwd_before
        # When the local one leaves, the mesh route takes over without PeerGone.
        await on_a.close()
        await wait_until(lambda: not reg.servers[0].holds(key.public.raw))
        await reg.servers[0].synced()
        sender.send_packet(key.public.raw, b"via mesh now")
        assert await on_b.recv_packet() == (sender.pub, b"via mesh now")
    finally:
        await reg.close()


# --------------------------------------------------------------------------- privileges


@pytest.fixture
async def mesh_server(make_host: HostFactory) -> Host:
    return await make_host(mesh_key=MESH_KEY)


@pytest.mark.parametrize(
    "frame",
    [
        encode_watch_conns(),
        encode_forward_packet(b"\x01" * 32, b"\x02" * 32, b"x"),
        encode_close_peer(b"\x02" * 32),
    ],
    ids=["WatchConns", "ForwardPacket", "ClosePeer"],
)
@pytest.mark.parametrize("mesh_key", [None, bytes(32), bytes(range(1, 33))])
async def test_wrong_or_missing_mesh_key_is_not_privileged(
    mesh_server: Host, frame: bytes, mesh_key: bytes | None
) -> None:
    bystander = await RawClient.open(mesh_server.next_port())
    await bystander.handshake()
    c = await RawClient.open(mesh_server.next_port())
    info: dict[str, object] = {"version": 2}
    if mesh_key is not None:
        info["meshKey"] = mesh_key.hex()
    await c.handshake(info)
    c.send(frame)
    await c.expect_closed()
    # Only the offender is closed.
    bystander.send_packet(bystander.pub, b"still here")
    assert await bystander.recv_packet() == (bystander.pub, b"still here")
    await c.close()
    await bystander.close()


async def test_forwarded_packets_are_never_reforwarded(derp_workers: int) -> None:
    reg = await _start(2, derp_workers, include_self=False)
    try:
        on_b = await reg.client(1)
        await _wait_routes(reg, [on_b], [0])
        # A mesh peer hands relay A a packet for a key that lives on B: A must not
        # forward it again (one hop only); it is dropped as unknown_dest_on_fwd.
        m = await RawClient.open(reg.servers[0].port)
        reg.clients.append(m)
        await m.handshake({"meshKey": MESH_KEY.hex(), "version": 2})
        fwd_before = reg.servers[0].stats.packets_forwarded_out
        disco = DISCO_MAGIC + bytes(60)
        m.send(encode_forward_packet(b"\x07" * 32, on_b.pub, disco))
        f = await m.recv_type(FrameType.PEER_GONE)  # NotHere back to the mesh peer
        assert f.payload == on_b.pub + bytes([PeerGoneReason.NOT_HERE])
        assert reg.servers[0].stats.drops_by_reason(UNKNOWN_DEST_ON_FWD) == 1
        assert reg.servers[0].stats.packets_forwarded_out == fwd_before
    finally:
        await reg.close()


async def test_close_peer_from_mesh_peer(mesh_server: Host) -> None:
    victim = await RawClient.open(mesh_server.next_port())
    await victim.handshake()
    m = await RawClient.open(mesh_server.next_port())  # two workers: the other one
    await m.handshake({"meshKey": MESH_KEY.hex(), "version": 2})
    await mesh_server.synced()
    m.send(encode_close_peer(victim.pub))
    await victim.expect_closed()
    m.send_packet(m.pub, b"mesh peer unaffected")
    assert await m.recv_packet() == (m.pub, b"mesh peer unaffected")
    await victim.close()
    await m.close()


async def test_server_starts_mesh_from_config(make_host: HostFactory) -> None:
    a = await make_host(mesh_key=MESH_KEY)
    peer = parse_mesh_peer(f"http://127.0.0.1:{a.port}")
    b = DerpServer(
        ServerConfig(
            private_key=PrivateKey.generate(),
            mesh_key=MESH_KEY,
            mesh_with=(peer,),
            mesh_retry_interval=RETRY,
        )
    )
    await b.start("127.0.0.1", 0)
    a.next_worker()  # two workers: c on worker 1, b's link lands on worker 0
    c = await RawClient.open(a.next_port())
    try:
        await c.handshake()
        assert b.mesh is not None
        await wait_until(lambda: c.pub in b.relay.forwarders)
        # b's link appears on a as a mesh client with b's server key.
        assert b.public_key.raw in a.relay
    finally:
        await c.close()
        await b.stop()
    assert b.mesh is None


# --------------------------------------------------------------------------- derper CLI


async def test_derper_cli_mesh_stun_and_admission_flags(tmp_path: Path) -> None:
    """A real ``derper`` process meshes with an in-process relay, answers STUN, and
    rejects clients when the admission URL is down and fail-open is off."""
    psk = tmp_path / "mesh.key"
    psk.write_text(MESH_KEY.hex() + "\n")
    a = DerpServer(ServerConfig(private_key=PrivateKey.generate(), mesh_key=MESH_KEY))
    await a.start("127.0.0.1", 0)
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    dead_port = dead.getsockname()[1]
    dead.close()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "derp", "--dev", "-a", "127.0.0.1:0",
        "--mesh-psk-file", str(psk),
        "--mesh-with", f"http://127.0.0.1:{a.port}",
        "--stun-port", "0",
        "--verify-client-url", f"http://127.0.0.1:{dead_port}/verify",
        "--no-verify-client-url-fail-open",
        "-v",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    try:
        line = (await asyncio.wait_for(proc.stdout.readline(), WAIT)).decode()
        m = re.search(r":(\d+)/derp server key nodekey:([0-9a-f]{64})", line)
        assert m, line
        port, key_hex = int(m.group(1)), m.group(2)
        stun_port = 0
        while not stun_port:
            err = (await asyncio.wait_for(proc.stderr.readline(), WAIT)).decode()
            assert err, "derper exited"
            sm = re.search(r"stun: listening on UDP \S+:(\d+)", err)
            if sm:
                stun_port = int(sm.group(1))
        ip, _, _ = await asyncio.wait_for(stun_request("127.0.0.1", stun_port, 10.0), WAIT)
        assert ip == "127.0.0.1"
        # The derper process dialled relay A as a mesh peer with its own server key.
        await wait_until(lambda: bytes.fromhex(key_hex) in a.relay)
        # Admission URL down + fail-closed: a client is closed without ServerInfo.
        c = await RawClient.open(port)
        c.writer.write(UPGRADE_REQUEST + b"\r\n")
        await c.read_http_head()
        await c.read_server_key()
        c.writer.write(c.client_info_frame())
        assert await asyncio.wait_for(c.reader.read(65536), WAIT) == b""
        await c.close()
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), WAIT) == 0
        await a.stop()


def test_https_links_share_one_default_tls_context() -> None:
    srv = DerpServer(ServerConfig(private_key=PrivateKey.generate(), mesh_key=MESH_KEY))
    mesh = Mesh(srv, parse_mesh_with("derp1.example.com,derp2.example.com"))
    ctx = mesh._client_ssl()
    assert ctx is mesh._client_ssl() and ctx.verify_mode == ssl.CERT_REQUIRED
