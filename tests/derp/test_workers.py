"""``derper --workers 2``: real processes and sockets on 127.0.0.1.

Reaching one particular worker: SO_REUSEPORT's hash cannot be steered, so the
test-only flag ``--worker-test-ports`` makes every worker also listen on a port
of its own (no SO_REUSEPORT) and the supervisor prints ``derper: worker I test
port P``. Synchronisation is on observable events only: a mesh watcher
(WatchConns, with the mesh key) on a worker hears PeerPresent for a key once
that worker knows it, which is also a barrier for everything a sibling sent
before (each link is one ordered stream).
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import re
import signal
import socket
import struct
import sys
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from derp.frames import (
    FrameType,
    encode_close_peer,
    PeerGoneReason,
    PeerPresentFlags,
    encode_note_preferred,
    encode_ping,
    encode_send_packet,
    encode_watch_conns,
)
from derp.keys import PrivateKey
from derp.mesh import parse_mesh_peer
from derp.server import DerpServer, ServerConfig
from derp.server.conn import DUPLICATE_KEY_HEALTH
from derp.stunserver import stun_request

from .conftest import WAIT, RawClient, closed_at_once, wait_until

pytestmark = pytest.mark.skipif(not hasattr(socket, "SO_REUSEPORT"), reason="needs SO_REUSEPORT")

MESH = bytes(range(32))
V4_LOOPBACK = bytes(10) + b"\xff\xff" + bytes([127, 0, 0, 1])
DISCO = bytes.fromhex("5453f09f92ac") + bytes(56)  # disco magic + 56 bytes


class Host:
    """A ``derper --workers 2 --worker-test-ports`` process and what it printed."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.port = 0
        self.pids: list[int] = []
        self.test_ports: dict[int, int] = {}
        self.stderr = bytearray()
        self._err_task: asyncio.Task[None] | None = None
        self._err_event = asyncio.Event()

    async def started(self, workers: int) -> None:
        assert self.proc.stdout is not None
        while len(self.test_ports) < workers:
            line = (await asyncio.wait_for(self.proc.stdout.readline(), WAIT)).decode()
            assert line, f"derper exited: {bytes(self.stderr).decode(errors='replace')}"
            if m := re.search(r"listening on http://[^:]+:(\d+)/derp", line):
                self.port = int(m.group(1))
            elif m := re.search(r"(\d+) workers \(pids ([\d ]+)\)", line):
                self.pids = [int(p) for p in m.group(2).split()]
            elif m := re.search(r"worker (\d+) test port (\d+)", line):
                self.test_ports[int(m.group(1))] = int(m.group(2))
        self._err_task = asyncio.get_running_loop().create_task(self._read_err())

    async def _read_err(self) -> None:
        assert self.proc.stderr is not None
        while chunk := await self.proc.stderr.read(65536):
            self.stderr += chunk
            self._err_event.set()

    async def wait_stderr(self, pattern: bytes) -> re.Match[bytes]:
        async def scan() -> re.Match[bytes]:
            while not (m := re.search(pattern, bytes(self.stderr))):
                self._err_event.clear()
                await self._err_event.wait()
            return m

        return await asyncio.wait_for(scan(), WAIT)

    async def client(self, worker: int, key: PrivateKey | None = None) -> RawClient:
        c = await RawClient.open(self.test_ports[worker], key)
        await c.handshake()
        return c

    async def watcher(self, worker: int) -> RawClient:
        """A mesh client (mesh key) on ``worker`` that sent WatchConns."""
        c = await RawClient.open(self.test_ports[worker])
        await c.handshake({"meshKey": MESH.hex(), "version": 2})
        c.send(encode_watch_conns())
        return c

    def metrics(self, worker: int) -> str:
        url = f"http://127.0.0.1:{self.test_ports[worker]}/metrics"
        with urllib.request.urlopen(url, timeout=WAIT) as r:
            return str(r.read().decode())

    async def stop(self) -> int:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(self.proc.wait(), WAIT)


async def start_host(tmp_path: Path, *extra: str, workers: int = 2) -> Host:
    psk = tmp_path / "mesh.key"
    psk.write_text(MESH.hex())
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "derp", "--dev", "-a", "127.0.0.1:0", "--stun-port", "0",
        "--workers", str(workers), "--worker-test-ports", "--mesh-psk-file", str(psk),
        "--stats-interval", "0", *extra,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    host = Host(proc)
    await host.started(workers)
    return host


@pytest.fixture
async def hosts() -> AsyncIterator[list[Host]]:
    started: list[Host] = []
    yield started
    for h in started:
        if h.proc.returncode is None:
            h.proc.send_signal(signal.SIGKILL)  # the workers die with it (PDEATHSIG)
            await asyncio.wait_for(h.proc.wait(), WAIT)
        for pid in h.pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if h._err_task is not None:
            h._err_task.cancel()


async def present(watcher: RawClient, key: bytes) -> bytes:
    """Read the watcher's frames until PeerPresent(key); return its payload."""
    while True:
        f = await watcher.recv_type(FrameType.PEER_PRESENT)
        if f.payload[:32] == key:
            return f.payload


async def test_cross_worker_frames_exact_bytes(
    tmp_path: Path, hosts: list[Host], clients: list[RawClient]
) -> None:
    h = await start_host(tmp_path)
    hosts.append(h)
    m0, m1 = await h.watcher(0), await h.watcher(1)
    a = await h.client(0)
    b = await h.client(1)
    clients += [m0, m1, a, b]
    # PeerPresent for a key of the sibling: 51-byte form, its address, flags.
    p = await present(m0, b.pub)
    assert p[32:48] == V4_LOOPBACK and p[50] == PeerPresentFlags.IS_REGULAR
    assert struct.unpack(">H", p[48:50])[0] > 0
    await present(m1, a.pub)
    # RecvPacket across workers, both ways, exact frames.
    a.send_packet(b.pub, b"a to b")
    f = await b.recv_frame()
    assert (f.type, f.payload) == (FrameType.RECV_PACKET, a.pub + b"a to b")
    b.send(encode_send_packet(a.pub, b"") + encode_send_packet(a.pub, bytes(range(256)) * 4))
    assert await a.recv_packet() == (b.pub, b"")
    assert await a.recv_packet() == (b.pub, bytes(range(256)) * 4)
    # Ping/Pong and NotePreferred stay local; the pong is exact.
    b.send(encode_note_preferred(True) + encode_ping(b"12345678"))
    f = await b.recv_type(FrameType.PONG)
    assert f.payload == b"12345678"
    # Totals (b is home on worker 1): one /metrics answer per worker, both with host-wide numbers.
    async def totals() -> None:
        while True:
            t0, t1 = h.metrics(0), h.metrics(1)
            want = "derp_current_home_connections 1.0"
            if want in t0 and want in t1 and "derp_workers 2.0" in t0:
                return
            await asyncio.sleep(0.1)  # stats travel every 0.5 s; poll with a bound

    await asyncio.wait_for(totals(), WAIT)
    # NotHere for a key no worker has.
    unknown = PrivateKey.generate().public.raw
    a.send_packet(unknown, DISCO)
    f = await a.recv_type(FrameType.PEER_GONE)
    assert f.payload == unknown + bytes([PeerGoneReason.NOT_HERE])
    # b leaves: a (which heard from b) gets PeerGone(Disconnected); so do the watchers.
    await b.close()
    f = await a.recv_type(FrameType.PEER_GONE)
    assert f.payload == b.pub + bytes([PeerGoneReason.DISCONNECTED])
    f = await m0.recv_type(FrameType.PEER_GONE)
    assert f.payload[:32] == b.pub
    assert await h.stop() == 0


async def test_duplicate_key_split_across_workers(
    tmp_path: Path, hosts: list[Host], clients: list[RawClient]
) -> None:
    h = await start_host(tmp_path)
    hosts.append(h)
    m0 = await h.watcher(0)
    key = PrivateKey.generate()
    k0 = await h.client(0, key)
    c = await h.client(0)
    clients += [m0, k0, c]
    k1 = await h.client(1, key)  # newest connection of the key: active
    clients.append(k1)
    health = (await k0.recv_type(FrameType.HEALTH)).payload
    assert health == DUPLICATE_KEY_HEALTH.encode()
    assert (await k1.recv_type(FrameType.HEALTH)).payload == DUPLICATE_KEY_HEALTH.encode()
    c.send_packet(key.public.raw, b"one")
    assert await k1.recv_packet() == (c.pub, b"one")
    # k0 speaks: it is the most recently active, here on worker 0.
    k0.send(encode_ping(b"k0k0k0k0"))
    await k0.recv_type(FrameType.PONG)
    c.send_packet(key.public.raw, b"two")
    assert await k0.recv_packet() == (c.pub, b"two")
    # k1 speaks on worker 1; a fresh client on worker 1 seen by worker 0's watcher
    # is the barrier: worker 0 has handled everything worker 1 sent before.
    k1.send(encode_ping(b"k1k1k1k1"))
    await k1.recv_type(FrameType.PONG)
    probe = await h.client(1)
    clients.append(probe)
    await present(m0, probe.pub)
    c.send_packet(key.public.raw, b"three")
    assert await k1.recv_packet() == (c.pub, b"three")
    # k1 leaves: k0 is the only one left (healthy again) and receives.
    await k1.close()
    assert (await k0.recv_type(FrameType.HEALTH)).payload == b""
    c.send_packet(key.public.raw, b"four")
    assert await k0.recv_packet() == (c.pub, b"four")


@pytest.mark.parametrize("victim", [1, 0], ids=["kill-w1", "kill-w0-the-port-owner"])
async def test_worker_killed_mid_traffic_is_restarted(
    tmp_path: Path, hosts: list[Host], clients: list[RawClient], victim: int
) -> None:
    h = await start_host(tmp_path)
    hosts.append(h)
    alive = 1 - victim
    m = await h.watcher(alive)
    a, c = await h.client(alive), await h.client(alive)
    b = await h.client(victim)
    clients += [m, a, b, c]
    await present(m, b.pub)
    b.send_packet(a.pub, b"before")
    assert await a.recv_packet() == (b.pub, b"before")
    for i in range(50):  # traffic in flight when the worker dies
        a.send_packet(b.pub, b"x%d" % i)
    os.kill(h.pids[victim], signal.SIGKILL)
    f = await a.recv_type(FrameType.PEER_GONE)
    assert f.payload == b.pub + bytes([PeerGoneReason.DISCONNECTED])
    await b.expect_closed()
    # The other worker kept relaying meanwhile.
    c.send_packet(a.pub, b"still here")
    assert await a.recv_packet() == (c.pub, b"still here")
    found = await h.wait_stderr(rb"worker %d restarted \(pid (\d+)\)" % victim)
    assert int(found.group(1)) != h.pids[victim]
    h.pids.append(int(found.group(1)))
    # b reconnects on the shared port (any worker) and relays again.
    b2 = await RawClient.open(h.port, b.key)
    await b2.handshake()
    clients.append(b2)
    await present(m, b.pub)
    a.send_packet(b.pub, b"after")
    assert await b2.recv_packet() == (a.pub, b"after")
    assert await h.stop() == 0


async def admitted_client(port: int) -> RawClient:
    """A DERP client on ``port`` once the server admits one (a sibling publishes a
    freed place at the end of its event-loop iteration); bounded."""

    async def attempt() -> RawClient:
        while True:
            c = await RawClient.open(port)
            try:
                await c.handshake()
                return c
            except (asyncio.IncompleteReadError, ConnectionError):
                await c.close()
            await asyncio.sleep(0.02)  # retry with a bound (WAIT)

    return await asyncio.wait_for(attempt(), WAIT)


async def test_max_connections_is_a_host_total(
    tmp_path: Path, hosts: list[Host], clients: list[RawClient]
) -> None:
    h = await start_host(tmp_path, "--max-connections", "4")
    hosts.append(h)
    for _ in range(4):  # every place of the host, all on worker 0
        clients.append(await h.client(0))
    assert await closed_at_once(h.test_ports[1])  # worker 1 is empty, but the host is full
    for _ in range(4):  # and whichever worker the kernel picks
        assert await closed_at_once(h.port)
    await clients.pop(0).close()  # a place frees on worker 0 ...
    clients.append(await admitted_client(h.test_ports[1]))  # ... and worker 1 may take it
    assert await closed_at_once(h.test_ports[0])  # full again
    await clients.pop(0).close()  # 2 left on worker 0, 1 on worker 1: room for /metrics

    async def totals() -> str:
        while True:
            try:
                t = h.metrics(0)
            except (OSError, http.client.HTTPException):
                t = ""  # this close not yet seen: refused at accept
            if "derp_current_connections 3.0" in t and 'worker="1"} 1.0' in t:
                return t
            await asyncio.sleep(0.1)  # stats travel every 0.5 s; poll with a bound

    text = await asyncio.wait_for(totals(), WAIT)
    assert "derp_accepts_total 5.0" in text  # DERP connections admitted on the host
    m = re.search(r"derp_accepts_rejected_total (\d+)", text)
    assert m is not None and int(m.group(1)) >= 6  # 1 + 4 + 1 above (+ retries)
    assert 'derp_worker_current_connections{worker="0"} 2.0' in text
    assert 'derp_worker_current_connections{worker="1"} 1.0' in text


async def test_accept_rate_is_a_host_total(
    tmp_path: Path, hosts: list[Host], clients: list[RawClient]
) -> None:
    # A burst of 3 for the host; one more token every 1000 s (none during the test).
    h = await start_host(
        tmp_path, "--accept-connection-limit", "0.001", "--accept-connection-burst", "3"
    )
    hosts.append(h)
    clients.append(await h.client(0))
    clients.append(await h.client(1))
    clients.append(await h.client(0))
    for port in (h.test_ports[1], h.test_ports[0], h.port, h.port):
        assert await closed_at_once(port)
    # Closing a connection gives back no token (a rate, not a cap).
    await clients.pop().close()
    assert await closed_at_once(h.test_ports[1])


async def test_dashboard_shows_host_totals_and_a_line_per_worker(
    tmp_path: Path, hosts: list[Host], clients: list[RawClient]
) -> None:
    h = await start_host(tmp_path)
    hosts.append(h)
    m0 = await h.watcher(0)
    a, b = await h.client(0), await h.client(1)
    clients += [m0, a, b]
    await present(m0, b.pub)  # worker 0 knows b
    a.send_packet(b.pub, b"across")
    assert await b.recv_packet() == (a.pub, b"across")

    def snapshot(worker: int) -> dict[str, Any]:
        url = f"http://127.0.0.1:{h.test_ports[worker]}/dashboard/snapshot"
        with urllib.request.urlopen(url, timeout=WAIT) as r:
            doc = json.loads(r.read())
        assert isinstance(doc, dict)
        return doc

    async def settled(worker: int) -> dict[str, Any]:
        while True:
            relay = snapshot(worker)["relay"]
            lines = {w["worker"]: w for w in relay.get("workers", [])}
            if (  # a and the watcher on worker 0, b on worker 1
                relay["connections"] == 3
                and relay["totals"]["packets_out"] == 1
                and [lines[i]["connections"] for i in sorted(lines)] == [2, 1]
            ):
                return dict(relay)
            await asyncio.sleep(0.1)  # stats travel every 0.5 s; poll with a bound

    for w in (0, 1):
        relay = await asyncio.wait_for(settled(w), WAIT)
        assert relay["worker"] == w
        assert relay["totals"]["packets_in"] == 1 and relay["accepts"] == 3
        lines = {x["worker"]: x for x in relay["workers"]}
        assert (lines[0]["packets_in"], lines[1]["packets_in"]) == (1, 0)  # from a, on worker 0
        for field in ("packets_in", "packets_out", "accepts"):  # the lines add up to the totals
            total = relay["accepts"] if field == "accepts" else relay["totals"][field]
            assert sum(x[field] for x in lines.values()) == total
        # The connection table lists the answering worker's own connections.
        mine = {m0.pub, a.pub} if w == 0 else {b.pub}
        assert {c["key"] for c in relay["conns"]} == {"nodekey:" + k.hex() for k in mine}


async def test_sigterm_sends_restarting_to_clients_of_every_worker(
    tmp_path: Path, hosts: list[Host], clients: list[RawClient]
) -> None:
    h = await start_host(tmp_path)
    hosts.append(h)
    a, b = await h.client(0), await h.client(1)
    clients += [a, b]
    h.proc.send_signal(signal.SIGTERM)
    want = struct.pack(">II", 1000, 30000)  # --restart-reconnect-in 1s, --restart-try-for 30s
    for c in (a, b):
        f = await c.recv_type(FrameType.RESTARTING)
        assert f.payload == want
        await c.expect_closed()
    assert await asyncio.wait_for(h.proc.wait(), WAIT) == 0


async def test_remote_mesh_peer_sees_every_worker_and_close_peer_reaches_siblings(
    tmp_path: Path, hosts: list[Host], clients: list[RawClient]
) -> None:
    h = await start_host(tmp_path)
    hosts.append(h)
    a, b = await h.client(0), await h.client(1)
    clients += [a, b]
    # A relay of the region meshes with the host: its one link lands on one worker,
    # whose WatchConns answer and stream carry both workers' keys.
    remote = DerpServer(ServerConfig(
        private_key=PrivateKey.generate(),
        mesh_key=MESH,
        mesh_with=(parse_mesh_peer(f"http://127.0.0.1:{h.port}"),),
    ))
    await remote.start("127.0.0.1", 0)
    try:
        mesh = remote.mesh
        assert mesh is not None
        await wait_until(lambda: a.pub in mesh.routes and b.pub in mesh.routes)
        x = await RawClient.open(remote.port)
        clients.append(x)
        await x.handshake()
        x.send_packet(a.pub, b"to w0")
        x.send_packet(b.pub, b"to w1")
        assert await a.recv_packet() == (x.pub, b"to w0")
        assert await b.recv_packet() == (x.pub, b"to w1")
        # ClosePeer from a mesh client on worker 0 closes b on worker 1.
        m0 = await h.watcher(0)
        clients.append(m0)
        await present(m0, b.pub)
        m0.send(encode_close_peer(b.pub))
        await b.expect_closed()
        await wait_until(lambda: b.pub not in mesh.routes)
    finally:
        await remote.stop()


async def test_stun_on_every_worker_counted_in_totals(tmp_path: Path, hosts: list[Host]) -> None:
    h = await start_host(tmp_path)
    hosts.append(h)
    m = await h.wait_stderr(rb"w1 \S+ \S+ INFO derp.stun: stun: listening on UDP 127.0.0.1:(\d+)")
    port = int(m.group(1))
    assert re.search(rf"w0 .*stun: listening on UDP 127.0.0.1:{port}".encode(), bytes(h.stderr))
    n = 20  # from 20 source ports: the kernel spreads them over both workers' sockets
    for _ in range(n):
        assert await asyncio.wait_for(stun_request("127.0.0.1", port, timeout=WAIT), WAIT)

    async def totals() -> None:
        want = f'derp_stun_requests_total{{disposition="success"}} {float(n)}'
        while want not in h.metrics(0):
            await asyncio.sleep(0.1)  # stats travel every 0.5 s; poll with a bound

    await asyncio.wait_for(totals(), WAIT)


async def test_admission_and_rate_limit_on_every_worker(
    tmp_path: Path, hosts: list[Host], clients: list[RawClient]
) -> None:
    from .test_admission import Controller, _attempt, _expect_admitted, _expect_rejected

    ctl = Controller()
    await ctl.start()
    try:
        ctl.status, ctl.body = 200, b'{"Allow":false}'
        allowed = PrivateKey.generate()
        ctl.always.add(str(allowed.public))
        h = await start_host(tmp_path, "--verify-client-url", ctl.url, "--per-client-rate-limit", "100000")
        hosts.append(h)
        for w in (0, 1):
            ok = await _attempt(h.test_ports[w], allowed)
            clients.append(ok)
            await _expect_admitted(ok)
            assert ok.server_info is not None
            assert ok.server_info.get("TokenBucketBytesPerSecond") == 100000
            denied = await _attempt(h.test_ports[w])
            clients.append(denied)
            await _expect_rejected(denied)
        assert len(ctl.requests) == 4  # each worker asked the controller itself
    finally:
        await ctl.stop()
