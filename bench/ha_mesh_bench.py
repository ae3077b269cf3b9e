"""HA benchmark (issue 10): the cross-replica paths of two ``tailnet serve`` replicas.

Usage::

    .venv/bin/python bench/ha_mesh_bench.py --runs 3          # full: DERP + coordinator
    .venv/bin/python bench/ha_mesh_bench.py --runs 3 --only derp
    .venv/bin/python bench/ha_mesh_bench.py --dsn postgresql://…   # an existing server

Everything is a real process on this machine, talking over real sockets:

* PostgreSQL: a throw-away cluster (``tests/tailnet/pgserver.py``) with
  PostgreSQL's durability settings at their defaults (``fsync``,
  ``synchronous_commit``, ``full_page_writes`` on), unless ``--dsn``; a fresh
  database per run.
* replicas A and B: ``tailnet serve --postgres-url …`` (uvloop, GC tuned as
  the CLI does), HTTP + embedded relay + gRPC on 127.0.0.1, one data
  directory with the benchmark's tokens minted before they start. Each run
  waits until A's health report shows both mesh links up.
* load generators: this script with ``--role …`` (uvloop), driven over
  stdin/stdout with one JSON object per line.

DERP (client(A) → agent(B)): DERP clients that write **one packet per write**
(``transport.write`` of one SendPacket frame, as Go's DERP client writes each
WireGuard packet), 1400-byte packets stamped with ``time.monotonic_ns()``.
``single``: sender and receiver on A. ``cross``: sender on A, receiver on B
(A forwards over its mesh link to B). Cases: ``closed-8x1400`` (8 pairs, at
most 32 packets in flight per pair) for packets/s, and ``rate-1x1400`` (one
pair paced at ``--latency-rate`` packets/s) for p50/p99 one-way latency. Every
pair first gets one probe packet through (the mesh route exists); loss =
packets sent but not received after a 2 s drain. Relay CPU is A + B.

Coordinator fan-out: ``--peers`` agents coordinate on A and as many clients on
B, all over gRPC (client *i* tunnelled to agent *i*, each client its own user);
agents acknowledge every NODE with ready_for_handshake as real agents do. The
agents send ``--rate`` UpdateSelf/s in total for ``--duration`` s, round robin,
``Node.id`` = a sequence number, ``as_of`` = the send time; latency = the
client's receipt − ``as_of`` (A's write + NOTIFY + B's queries + B's gRPC
send); "lost" counts agents whose last update never reached their client
(coalescing may skip intermediate ones, counted apart).

Machine load: the 1-minute load average before and after each run and the
host's busy cores during each measured window (every process on the machine,
other people's benchmarks included) are printed next to the figures, and for
the fan-out the largest event-loop stall of each replica during the window
(``/api/v2/debug/loop``): a tail that coincides with a long stall of an
otherwise idle loop is CPU starvation, not queueing in the coordinator.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import json
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from derp import frames  # noqa: E402
from derp.client import ClientConnection  # noqa: E402
from derp.events import Connected, PacketReceived  # noqa: E402
from derp.keys import PrivateKey  # noqa: E402
from tailnet.auth import TAILSCALE_SERVICE_PREFIX, addr_from_uuid  # noqa: E402
from tailnet.identity import Principal  # noqa: E402
from tailnet.v2 import tailnet_pb2 as pb  # noqa: E402

_HDR = struct.Struct(">BI")
_TS = struct.Struct(">q")
_TS_OFF = frames.HEADER_LEN + frames.KEY_LEN
_RECV = int(frames.FrameType.RECV_PACKET)
WINDOW = 32
NS = uuid.UUID("0b7c8a51-2f5e-4c4e-9d49-6a3c1f0e7d21")


def agent_id(i: int) -> uuid.UUID:
    return uuid.uuid5(NS, f"agent-{i}")


def user_id(i: int) -> uuid.UUID:
    return uuid.uuid5(NS, f"user-{i}")


def host_cpu() -> float:
    """Busy CPU seconds of the whole machine since boot (/proc/stat)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq = fields[:7]
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def proc_cpu(pid: int) -> float:
    """User + system CPU seconds of process ``pid``."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _quiet_gc() -> None:
    """Load generators only: keep their own GC pauses out of the measured latencies
    (the long-lived connection objects are frozen out of collection)."""
    import gc

    gc.collect()
    gc.freeze()


# =========================================================================== DERP load


class DerpConn(asyncio.Protocol):
    """A DERP client: login through :class:`derp.client.ClientConnection`, then raw
    frames (receiver: walk RecvPacket headers; sender: one write per packet)."""

    def __init__(self, key: PrivateKey, host: str) -> None:
        self.core = ClientConnection(key, host=host, can_ack_pings=False)
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None
        self.raw = False
        self.buf = bytearray()
        self.pair: Pair | None = None  # set on receivers

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._flush_core()

    def _flush_core(self) -> None:
        out = self.core.data_to_send()
        if out and self.transport is not None:
            self.transport.writelines(out)

    def data_received(self, data: bytes) -> None:
        if not self.raw:
            self.core.receive_data(data)
            self._flush_core()
            for ev in self.core.events_received():
                if isinstance(ev, Connected):
                    self.raw = True
                    if not self.ready.done():
                        self.ready.set_result(None)
                elif isinstance(ev, PacketReceived) and self.pair is not None:
                    self.pair.delivered(_TS.unpack_from(ev.data, 0)[0] if len(ev.data) >= 8 else 0)
            return
        buf = self.buf
        buf += data
        off = 0
        n = len(buf)
        pair = self.pair
        while n - off >= 5:
            ftype, length = _HDR.unpack_from(buf, off)
            end = off + 5 + length
            if end > n:
                break
            if ftype == _RECV and pair is not None and length >= 32 + 8:
                pair.delivered(_TS.unpack_from(buf, off + 5 + 32)[0])
            off = end
        del buf[:off]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"lost during login: {exc}"))
        self.transport = None


class Pair:
    """Sender (one write per packet) and receiver of one flow, in this process."""

    def __init__(self, sender: DerpConn, receiver: DerpConn, dst: bytes, size: int) -> None:
        self.sender = sender
        self.receiver = receiver
        receiver.pair = self
        self.frame = bytearray(frames.encode_send_packet(dst, bytes(size)))
        self.sent = self.recv = self.win_recv = self.inflight = 0
        self.closed_loop = False
        self.running = False
        self.probed = asyncio.get_running_loop().create_future()
        self.lat = array.array("q")
        self.m0 = self.m1 = 1 << 62

    def send_one(self, ts: int | None = None) -> None:
        _TS.pack_into(self.frame, _TS_OFF, time.monotonic_ns() if ts is None else ts)
        tr = self.sender.transport
        assert tr is not None
        tr.write(bytes(self.frame))  # one packet per write, as real DERP clients do
        if ts is None:
            self.sent += 1
            self.inflight += 1

    def delivered(self, ts: int) -> None:
        if ts == 0:  # a probe
            if not self.probed.done():
                self.probed.set_result(None)
            return
        now = time.monotonic_ns()
        self.recv += 1
        self.inflight -= 1
        if self.m0 <= now < self.m1:
            self.win_recv += 1
            self.lat.append(now - ts)
        if self.closed_loop and self.running:
            self.send_one()


async def _derp_connect(host: str, port: int, key: PrivateKey) -> DerpConn:
    loop = asyncio.get_running_loop()
    _, proto = await loop.create_connection(
        lambda: DerpConn(key, f"{host}:{port}"), host, port
    )
    await asyncio.wait_for(proto.ready, 30)
    return proto


async def derp_worker(spec: dict[str, Any]) -> None:
    """Role ``derp``: run ``spec["pairs"]`` pairs; protocol: ready → go → result."""
    loop = asyncio.get_running_loop()
    pairs: list[Pair] = []
    for _ in range(spec["pairs"]):
        rk, sk = PrivateKey.generate(), PrivateKey.generate()
        receiver = await _derp_connect("127.0.0.1", spec["receiver_port"], rk)
        sender = await _derp_connect("127.0.0.1", spec["sender_port"], sk)
        pairs.append(Pair(sender, receiver, rk.public.raw, spec["size"]))

    async def probe(p: Pair) -> None:
        while not p.probed.done():
            p.send_one(ts=0)
            await asyncio.wait([p.probed], timeout=0.05)

    await asyncio.wait_for(asyncio.gather(*(probe(p) for p in pairs)), 30)
    _quiet_gc()
    _reply({"ready": len(pairs)})
    go = json.loads(await loop.run_in_executor(None, sys.stdin.readline))
    t_start, m0, m1, t_stop = go["t_start"], go["m0"], go["m1"], go["t_stop"]
    for p in pairs:
        p.m0, p.m1 = m0, m1
    cpu: dict[str, float] = {}

    def at(t_ns: int) -> float:
        return max(0.0, (t_ns - time.monotonic_ns()) / 1e9)

    loop.call_later(at(m0), lambda: cpu.__setitem__("c0", time.process_time()))
    loop.call_later(at(m1), lambda: cpu.__setitem__("c1", time.process_time()))
    await asyncio.sleep(at(t_start))
    if spec["mode"] == "closed":
        for p in pairs:
            p.closed_loop = p.running = True
            for _ in range(spec["window"]):
                p.send_one()
        await asyncio.sleep(at(t_stop))
        for p in pairs:
            p.running = False
    else:
        rate = spec["rate"] / len(pairs)
        t0 = time.monotonic_ns()
        offered = 0
        while (now := time.monotonic_ns()) < t_stop:
            due = int((now - t0) * rate / 1e9) - offered
            for _ in range(max(0, due)):
                for p in pairs:
                    p.send_one()
            offered += max(0, due)
            await asyncio.sleep(0.001)  # pacing tick of the open loop
    deadline = time.monotonic_ns() + 2_000_000_000
    while time.monotonic_ns() < deadline and any(p.recv < p.sent for p in pairs):
        await asyncio.sleep(0.02)
    lat = array.array("q")
    for p in pairs:
        lat.extend(p.lat)
    _reply({
        "sent": sum(p.sent for p in pairs),
        "recv": sum(p.recv for p in pairs),
        "win_recv": sum(p.win_recv for p in pairs),
        "lat_us": [x / 1000 for x in lat],
        "cpu": cpu.get("c1", 0.0) - cpu.get("c0", 0.0),
    })
    for p in pairs:
        for c in (p.sender, p.receiver):
            if c.transport is not None:
                c.transport.close()


# =========================================================================== coordinator load


def _coord_stub(channel: Any) -> Any:
    return channel.stream_stream(
        "/coder.tailnet.v2.Tailnet/Coordinate",
        request_serializer=pb.CoordinateRequest.SerializeToString,
        response_deserializer=pb.CoordinateResponse.FromString,
    )


def _node(idx: int, seq: int, addr: str) -> pb.Node:
    n = pb.Node(id=seq, key=b"np" + idx.to_bytes(32, "big"),
                disco="discokey:" + format(idx, "064x"), preferred_derp=999,
                addresses=[addr], allowed_ips=[addr], endpoints=["192.0.2.1:41641"])
    n.as_of.FromNanoseconds(time.time_ns())
    return n


async def coord_worker(spec: dict[str, Any]) -> None:
    """Role ``agents`` (send updates, ack NODEs) or ``clients`` (measure)."""
    import grpc
    import grpc.aio

    loop = asyncio.get_running_loop()
    kind = spec["kind"]
    n = spec["peers"]
    tokens: list[str] = spec["tokens"]
    channels: list[Any] = []
    calls: list[Any] = [None] * n
    locks = [asyncio.Lock() for _ in range(n)]
    got_first = [False] * n
    first_count = 0
    all_first = asyncio.Event()
    last_seq = [-1] * n
    lat_ms: list[float] = []
    lat_at: list[float] = []  # send time (s into the window) of each latency sample
    measuring = False
    window_start = 0
    eof = grpc.aio.EOF  # type: ignore[attr-defined]

    async def write(i: int, req: pb.CoordinateRequest) -> None:
        async with locks[i]:
            await calls[i].write(req)

    async def reader(i: int) -> None:
        nonlocal first_count
        call = calls[i]
        try:
            while True:
                resp = await call.read()
                if resp is eof:
                    return
                now = time.time_ns()
                acks = []
                for u in resp.peer_updates:
                    if u.kind != pb.CoordinateResponse.PeerUpdate.NODE:
                        continue
                    if not got_first[i]:
                        got_first[i] = True
                        first_count += 1
                        if first_count == n:
                            all_first.set()
                    if kind == "agents":
                        acks.append(pb.CoordinateRequest.ReadyForHandshake(id=u.id))
                    else:
                        last_seq[i] = u.node.id
                        sent = u.node.as_of.ToNanoseconds()
                        if measuring and u.node.id >= 0 and sent >= window_start:
                            lat_ms.append((now - sent) / 1e6)
                            lat_at.append((sent - window_start) / 1e9)
                if acks:
                    await write(i, pb.CoordinateRequest(ready_for_handshake=acks))
        except (grpc.aio.AioRpcError, asyncio.CancelledError):
            return

    sem = asyncio.Semaphore(64)

    async def open_one(i: int) -> None:
        async with sem:
            if i // 50 >= len(channels):  # 50 streams per HTTP/2 connection (< its cap of 100)
                channels.append(grpc.aio.insecure_channel(spec["target"], options=[
                    ("grpc.use_local_subchannel_pool", 1)]))
            md = [("authorization", f"Bearer {tokens[i]}"), ("tailnet-version", "2.3")]
            if kind == "clients":
                md.append(("tailnet-agent-id", str(agent_id(i))))
            call = _coord_stub(channels[i // 50])(None, metadata=md)
            await call.initial_metadata()
            calls[i] = call
            if kind == "clients":
                await write(i, pb.CoordinateRequest(
                    add_tunnel=pb.CoordinateRequest.Tunnel(id=agent_id(i).bytes)))
                addr = f"fd7a:115c:a1e0:c11e::{i:x}/128"
                idx = 1_000_000 + i
            else:
                addr = f"{addr_from_uuid(TAILSCALE_SERVICE_PREFIX, agent_id(i))}/128"
                idx = i
            await write(i, pb.CoordinateRequest(
                update_self=pb.CoordinateRequest.UpdateSelf(node=_node(idx, -1, addr)))
            )
        asyncio.ensure_future(reader(i))

    for i in range(n):  # in order: channel i // 50 exists before stream i opens
        await open_one(i)
    _reply({"connected": n})
    await asyncio.wait_for(all_first.wait(), 600)  # every peer heard its tunnel peer
    _quiet_gc()
    _reply({"ready": n})
    cmd = json.loads(await loop.run_in_executor(None, sys.stdin.readline))
    if kind == "agents":
        rate, duration = cmd["rate"], cmd["duration"]
        total = int(rate * duration)
        t0 = time.perf_counter()
        k = 0
        while k < total:
            due = min(total, int((time.perf_counter() - t0) * rate) + 1)
            while k < due:
                i = k % n
                addr = f"{addr_from_uuid(TAILSCALE_SERVICE_PREFIX, agent_id(i))}/128"
                asyncio.ensure_future(write(i, pb.CoordinateRequest(
                    update_self=pb.CoordinateRequest.UpdateSelf(node=_node(i, k, addr)))))
                k += 1
            await asyncio.sleep(0.005)  # pacing tick of the open loop
        _reply({"sent": total, "elapsed_s": time.perf_counter() - t0})
    else:
        window_start = time.time_ns()
        measuring = True
        _reply({"measuring": True})
        total = json.loads(await loop.run_in_executor(None, sys.stdin.readline))["total"]
        want = {}
        for i in range(n):
            ks = range(i, total, n)
            if len(ks):
                want[i] = ks[-1]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(last_seq[i] != k for i, k in want.items()):
            await asyncio.sleep(0.05)
        lost = sum(1 for i, k in want.items() if last_seq[i] != k)
        _reply({"lat_ms": lat_ms, "lat_at": lat_at, "lost_final": lost,
                "delivered": len(lat_ms)})
    await loop.run_in_executor(None, sys.stdin.readline)  # "quit"
    for c in calls:
        if c is not None:
            c.cancel()
    for ch in channels:
        await ch.close(None)


# =========================================================================== orchestration


def _reply(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


class Child:
    """A ``--role`` process of this script, one JSON object per line both ways."""

    def __init__(self, role: str, spec: dict[str, Any]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--role", role, "--spec", json.dumps(spec)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT,
        )

    def send(self, obj: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(obj) + "\n")
        self.proc.stdin.flush()

    def recv(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"load generator exited ({self.proc.wait()})")
        doc: dict[str, Any] = json.loads(line)
        return doc

    def close(self) -> None:
        try:
            self.send({"quit": True})
        except OSError:
            pass
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class ServeReplica:
    """``tailnet serve`` on PostgreSQL, on ephemeral loopback ports."""

    def __init__(self, name: str, dsn: str, data_dir: Path) -> None:
        self.name = name
        log = open(data_dir / f"{name}.log", "ab")  # noqa: SIM115 - owned by the child
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tailnet", "serve", "--postgres-url", dsn,
             "--http-addr", "127.0.0.1:0", "--grpc-addr", "127.0.0.1:0", "--stun-addr", "off",
             "--data-dir", str(data_dir), "--log-level", "WARNING"],
            stdout=subprocess.PIPE, stderr=log, text=True, cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        log.close()
        self.banner: dict[str, str] = {}
        assert self.proc.stdout is not None
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"replica {name} exited; see {data_dir / (name + '.log')}")
            key, sep, value = line.strip().partition(":")
            if sep:
                self.banner[key.strip()] = value.strip()
            if line.strip().startswith("try:"):
                break
        self.api = self.banner["API"]
        self.port = int(self.api.rsplit(":", 1)[1])
        self.grpc = self.banner["gRPC"]

    def cpu(self) -> float:
        return proc_cpu(self.proc.pid)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def mint_tokens(data_dir: Path, peers: int) -> tuple[str, list[str], list[str]]:
    """Write tokens.json at once (hashes only, as ``tailnet.tokens`` stores them): an
    admin, and per i a user and agent i in that user's workspace."""
    from tailnet.identity import token_hash
    from tailnet.tokens import TokenRecord, new_token

    def record(principal: Principal, **ws: Any) -> tuple[TokenRecord, str]:
        tid, token = new_token()
        return TokenRecord(tid, token_hash(token), principal, time.time(), **ws), token

    admin_rec, admin = record(Principal("control_plane", uuid.UUID(int=1), "admin"))
    records = [admin_rec]
    users, agents = [], []
    for i in range(peers):
        u, ut = record(Principal("user", user_id(i), f"user-{i}"))
        a, at = record(Principal("agent", agent_id(i), "main"),
                       workspace_id=uuid.uuid5(NS, f"ws-{i}"), owner_id=user_id(i),
                       workspace_name=f"ws-{i}")
        records += [u, a]
        users.append(ut)
        agents.append(at)
    path = data_dir / "tokens.json"
    path.write_text(json.dumps({"version": 2, "tokens": [r.to_json() for r in records]}))
    path.chmod(0o600)
    return admin, users, agents


def wait_meshed(a: ServeReplica, token: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        req = urllib.request.Request(a.api + "/api/v2/debug/health?force=true",
                                     headers={"Coder-Session-Token": token})
        with urllib.request.urlopen(req, timeout=30) as resp:
            mesh = json.loads(resp.read())["derp"].get("mesh") or {}
        relays = mesh.get("relays", [])
        if len(relays) == 2 and not mesh.get("warnings") and all(
            r["links"] and all(x["state"] == "up" for x in r["links"]) for r in relays
        ):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"replicas did not mesh: {json.dumps(mesh)[:2000]}")
        time.sleep(0.2)


def loop_stalls(r: ServeReplica, token: str, reset: bool = False) -> float:
    """The replica's largest event-loop stall (ms) since the last reset
    (``/api/v2/debug/loop``): tells a stalled replica from a slow database."""
    req = urllib.request.Request(r.api + "/api/v2/debug/loop" + ("?reset=1" if reset else ""),
                                 headers={"Coder-Session-Token": token})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return float(json.loads(resp.read()).get("max_stall_ms", float("nan")))


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(len(s) * q))]


def derp_case(
    name: str, topology: str, a: ServeReplica, b: ServeReplica, args: argparse.Namespace
) -> dict[str, Any]:
    mode, rest = name.split("-", 1)
    npairs, size = (int(x) for x in rest.split("x"))
    receiver = a if topology == "single" else b
    workers = min(args.workers, npairs)
    kids = []
    for w in range(workers):
        share = npairs // workers + (1 if w < npairs % workers else 0)
        kids.append(Child("derp", {
            "pairs": share, "size": size, "mode": "closed" if mode == "closed" else "rate",
            "window": WINDOW, "rate": args.latency_rate * share / npairs,
            "sender_port": a.port, "receiver_port": receiver.port,
        }))
    try:
        for k in kids:
            k.recv()  # ready (every pair probed through)
        now = time.monotonic_ns()
        t_start = now + 200_000_000
        m0 = t_start + int(args.warmup * 1e9)
        m1 = m0 + int(args.derp_duration * 1e9)
        for k in kids:
            k.send({"t_start": t_start, "m0": m0, "m1": m1, "t_stop": m1})
        time.sleep(max(0.0, (m0 - time.monotonic_ns()) / 1e9))
        c0, h0 = a.cpu() + b.cpu(), host_cpu()
        time.sleep(max(0.0, (m1 - time.monotonic_ns()) / 1e9))
        c1, h1 = a.cpu() + b.cpu(), host_cpu()
        res = [k.recv() for k in kids]
    finally:
        for k in kids:
            k.close()
    window = (m1 - m0) / 1e9
    lat = [x for r in res for x in r["lat_us"]]
    sent = sum(r["sent"] for r in res)
    recv = sum(r["recv"] for r in res)
    win = sum(r["win_recv"] for r in res)
    return {
        "case": name, "topology": topology, "pps": win / window,
        "p50_us": _pct(lat, 0.5), "p99_us": _pct(lat, 0.99),
        "sent": sent, "lost": sent - recv,
        "relay_us_per_pkt": (c1 - c0) / win * 1e6 if win else float("nan"),
        "host_busy_cores": (h1 - h0) / window,
    }


def coord_case(a: ServeReplica, b: ServeReplica, users: list[str], agents: list[str],
               args: argparse.Namespace, admin: str) -> dict[str, Any]:
    n = args.peers
    ag = Child("agents", {"kind": "agents", "peers": n, "tokens": agents, "target": a.grpc})
    cl = None
    try:
        ag.recv()  # connected
        cl = Child("clients", {"kind": "clients", "peers": n, "tokens": users, "target": b.grpc})
        cl.recv()  # connected
        cl.recv()  # ready: every client has its agent's node
        ag.recv()  # ready: every agent has its client's node
        cl.send({"go": True})
        cl.recv()  # measuring
        for r in (a, b):
            loop_stalls(r, admin, reset=True)
        c0, h0 = a.cpu() + b.cpu(), host_cpu()
        t0 = time.monotonic()
        ag.send({"rate": args.rate, "duration": args.duration})
        sent = ag.recv()
        window = time.monotonic() - t0
        c1, h1 = a.cpu() + b.cpu(), host_cpu()
        stalls = [loop_stalls(r, admin) for r in (a, b)]
        cl.send({"total": sent["sent"]})
        res = cl.recv()
    finally:
        ag.close()
        if cl is not None:
            cl.close()
    lat = res["lat_ms"]
    # Where the slowest 1 % happened (seconds into the window): tails from a periodic
    # task cluster, tails from a busy machine spread out.
    slow = sorted(zip(lat, res["lat_at"]), reverse=True)[: max(1, len(lat) // 100)]
    return {
        "slowest_at_s": sorted({round(t, 1) for _, t in slow}),
        "peers_per_replica": n, "rate": args.rate, "sent": sent["sent"],
        "delivered": res["delivered"], "coalesced": sent["sent"] - res["delivered"],
        "lost_final": res["lost_final"], "p50_ms": _pct(lat, 0.5), "p99_ms": _pct(lat, 0.99),
        "max_ms": max(lat) if lat else float("nan"),
        "replicas_cpu_cores": (c1 - c0) / window, "host_busy_cores": (h1 - h0) / window,
        "loop_max_stall_ms": stalls,
    }


async def _fresh_db(server: Any) -> str:
    from tests.tailnet.pgserver import create_database

    return await create_database(server)


def one_run(args: argparse.Namespace, dsn: str) -> dict[str, Any]:
    out: dict[str, Any] = {"load_before": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory(prefix="ha-mesh-bench-") as tmp:
        d = Path(tmp)
        admin, users, agents = mint_tokens(d, args.peers)
        a = ServeReplica("a", dsn, d)
        b = None
        try:
            b = ServeReplica("b", dsn, d)
            wait_meshed(a, admin)
            if args.only in (None, "derp"):
                out["derp"] = [derp_case(case, topo, a, b, args)
                               for case in args.cases for topo in ("single", "cross")]
                for r in out["derp"]:
                    print(f"  {r['topology']:6} {r['case']:14} {r['pps']:>9,.0f} pkt/s  "
                          f"p50 {r['p50_us']:,.0f} µs  p99 {r['p99_us']:,.0f} µs  "
                          f"lost {r['lost']}/{r['sent']}  relays {r['relay_us_per_pkt']:.1f} "
                          f"µs/pkt  host {r['host_busy_cores']:.2f} cores busy", flush=True)
            if args.only in (None, "coord"):
                out["coord"] = coord_case(a, b, users, agents, args, admin)
                print("  coordinator " + json.dumps(
                    {k: round(v, 2) if isinstance(v, float) else v
                     for k, v in out["coord"].items()}), flush=True)
        finally:
            for r in (b, a):
                if r is not None:
                    r.stop()
    out["load_after"] = os.getloadavg()[0]
    return out


def report(runs: list[dict[str, Any]]) -> str:
    lines = []
    if "derp" in runs[0]:
        lines += [
            "| DERP case | topology | packets/s | vs single | p50 µs | p99 µs | lost | "
            "relay CPU µs/pkt | host busy cores |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for i, row in enumerate(runs[0]["derp"]):
            def med(key: str, i: int = i) -> float:
                return statistics.median(r["derp"][i][key] for r in runs)
            j = next(k for k, x in enumerate(runs[0]["derp"])
                     if x["case"] == row["case"] and x["topology"] == "single")
            rel = med("pps") / statistics.median(r["derp"][j]["pps"] for r in runs)
            lost = sum(r["derp"][i]["lost"] for r in runs)
            sent = sum(r["derp"][i]["sent"] for r in runs)
            lines.append(
                f"| {row['case']} | {row['topology']} | {med('pps'):,.0f} | {rel:.2f}× | "
                f"{med('p50_us'):,.0f} | {med('p99_us'):,.0f} | {lost} of {sent:,} | "
                f"{med('relay_us_per_pkt'):.1f} | {med('host_busy_cores'):.2f} |")
    if "coord" in runs[0]:
        def cmed(key: str) -> float:
            return statistics.median(r["coord"][key] for r in runs)
        c = runs[0]["coord"]
        lines += [
            "",
            "| coordinator fan-out | p50 ms | p99 ms | max ms | delivered / sent | lost | "
            "replicas CPU cores | host busy cores |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
            f"| {c['peers_per_replica']:,} agents on A → {c['peers_per_replica']:,} clients on "
            f"B, {c['rate']:,.0f} updates/s | {cmed('p50_ms'):.1f} | {cmed('p99_ms'):.1f} | "
            f"{cmed('max_ms'):.0f} | {sum(r['coord']['delivered'] for r in runs):,} / "
            f"{sum(r['coord']['sent'] for r in runs):,} | "
            f"{sum(r['coord']['lost_final'] for r in runs)} | {cmed('replicas_cpu_cores'):.2f} | "
            f"{cmed('host_busy_cores'):.2f} |",
            "",
            "per run: p50/p99 ms, largest event-loop stall of replica A / B (ms): " + "; ".join(
                f"{r['coord']['p50_ms']:.1f}/{r['coord']['p99_ms']:.1f}, "
                f"{r['coord']['loop_max_stall_ms'][0]:.0f}/{r['coord']['loop_max_stall_ms'][1]:.0f}"
                for r in runs),
        ]
    loads = ", ".join(f"{r['load_before']:.1f}→{r['load_after']:.1f}" for r in runs)
    lines += ["", f"1-min load average per run (before→after): {loads}"]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--role", choices=["derp", "agents", "clients"], help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    ap.add_argument("--dsn", help="existing PostgreSQL (a fresh database is NOT created)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--only", choices=["derp", "coord"])
    ap.add_argument("--cases", nargs="+", default=["closed-8x1400", "rate-1x1400"])
    ap.add_argument("--workers", type=int, default=2, help="DERP load-generator processes")
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--derp-duration", type=float, default=4.0)
    ap.add_argument("--latency-rate", type=float, default=1000.0,
                    help="packets/s of the rate-… cases (all pairs together)")
    ap.add_argument("--peers", type=int, default=2000, help="agents on A (= clients on B)")
    ap.add_argument("--rate", type=float, default=500.0, help="node updates/s (all agents)")
    ap.add_argument("--duration", type=float, default=20.0, help="seconds of updates")
    ap.add_argument("--json", help="write every run's results here")
    args = ap.parse_args()
    if args.role:
        import uvloop

        spec = json.loads(args.spec)
        uvloop.run(derp_worker(spec) if args.role == "derp" else coord_worker(spec))
        return
    server = None
    if args.dsn is None:
        from tests.tailnet.pgserver import PgServer, find_pg_bin

        bindir = find_pg_bin()
        if bindir is None:
            sys.exit("PostgreSQL binaries not found; pass --dsn")
        server = PgServer(bindir, durable=True)  # fsync etc. at their defaults
        server.start()
    runs = []
    t0 = time.monotonic()
    try:
        for n in range(args.runs):
            print(f"run {n + 1}/{args.runs}", flush=True)
            dsn = args.dsn or asyncio.run(_fresh_db(server))
            runs.append(one_run(args, dsn))
    finally:
        if server is not None:
            server.destroy()
    print(f"\nmedians of {args.runs} run(s), {time.monotonic() - t0:.0f} s in total:\n")
    print(report(runs))
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=1))


if __name__ == "__main__":
    main()
