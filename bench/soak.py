#!/usr/bin/env python3
"""Soak benchmark (issue 9): every attack at once against a live ``tailnet serve``
while a healthy agent and client keep coordinating and relaying.

Not collected by pytest (``bench/`` holds no test files). One command::

    .venv/bin/python bench/soak.py                      # one 60 s run, a table
    .venv/bin/python bench/soak.py --runs 3 --json out.json   # 3 runs, medians, JSON
    .venv/bin/python bench/soak.py --seconds 20 --skip yamux-ping-flood

Processes (everything on 127.0.0.1)::

    orchestrator (this process): starts the server, mints tokens, samples the
    │   server's RSS (/proc/<pid>/status) and its event-loop stalls
    │   (/api/v2/debug/loop?reset=1, once a second), CPU of every process
    ├── tailnet serve  (uvloop, its default GC tuning, a fresh data dir)
    ├── healthy   an AgentConnection + a ClientConnection over Coder's transport,
    │             node updates at --rate/s each way, every update carrying a
    │             sequence number (source, order and content verified); a
    │             DerpClient pair, --derp-rate packets/s each way (one packet per
    │             write, sequence + checksum verified, echoed for the RTT)
    ├── attackers --group api   API WebSockets (ping floods, big and tiny
    │             messages, yamux pings), Coordinate slow consumers, huge requests,
    │             stream limits, stream churn, foreign resume tokens
    └── attackers --group derp  keep-alive probe, slowloris, HTTP pipelining,
                  DERP non-reader + flood, tiny DERP frames (TCP and WebSocket),
                  DERP-over-WebSocket ping flood, nested ClientInfo, malformed frames

``--attacks``/``--skip`` take the names in :data:`ATTACKS`.

Timeline of one run: server up → tokens → healthy pair connected and
verified → ``--warmup`` s → RSS "before", loop monitor reset → attackers run
for ``--seconds`` (each attack bounded in count and time) → ``--settle`` s
with only the healthy pair → RSS "after" → healthy pair stops and reports →
server stopped with SIGTERM; its log is scanned for tracebacks.

Targets (issue 9, 2-core machine): RSS growth <= 64 MB, no event-loop stall
over 50 ms, the healthy pair's fan-out p99 < 50 ms throughout (every 10 s
window), nothing lost, duplicated or misordered for the healthy pair. The
exit status is 1 if the healthy pair lost anything (or could not run), else 0:
the other targets are reported, not enforced.

Child processes talk to the orchestrator with JSON lines on stdout
(``{"ready": ...}``, then the result) and read commands on stdin.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import hashlib
import ipaddress
import json
import os
import platform
import select
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
import grpc.aio  # noqa: E402
import uvloop  # noqa: E402
from google.protobuf.timestamp_pb2 import Timestamp  # noqa: E402

from derp.client import DerpClient  # noqa: E402
from derp.events import PacketReceived, PeerGoneReceived  # noqa: E402
from derp.frames import (  # noqa: E402
    HEADER_LEN,
    FrameType,
    encode_client_info,
    encode_frame,
    encode_header,
    encode_ping,
    encode_send_packet,
)
from derp.keys import PrivateKey, seal  # noqa: E402
from tailnet.auth import TAILSCALE_SERVICE_PREFIX, addr_from_uuid  # noqa: E402
from tailnet.v2 import tailnet_pb2 as pb  # noqa: E402
from tailnet.v2 import tailnet_pb2_grpc as pb_grpc  # noqa: E402

Req = pb.CoordinateRequest
Kind = pb.CoordinateResponse.PeerUpdate

#: Issue 9's targets.
TARGET_RSS_MB = 64.0
TARGET_STALL_MS = 50.0
TARGET_FANOUT_P99_MS = 50.0

VERSION = "2.3"


def pct(values: list[float], q: float) -> float | None:
    """The q-th percentile (nearest rank) of ``values``; ``None`` if empty."""
    if not values:
        return None
    s = sorted(values)
    k = min(len(s) - 1, max(0, int(round(q / 100.0 * len(s) + 0.5)) - 1))
    return s[k]


def rnd(x: float | None, nd: int = 2) -> float | None:
    return None if x is None else round(x, nd)


def emit(doc: dict[str, Any]) -> None:
    """One JSON line to the orchestrator."""
    sys.stdout.write(json.dumps(doc) + "\n")
    sys.stdout.flush()


async def stdin_lines() -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


class LoopLag:
    """This process's own event-loop lag (a 50 ms timer's lateness), so a slow
    healthy pair can be told apart from a slow server."""

    def __init__(self) -> None:
        self.max = 0.0
        self.recent = 0.0
        self._due = 0.0
        self._handle: asyncio.TimerHandle | None = None

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._due = loop.time() + 0.05
        self._handle = loop.call_at(self._due, self._tick)

    def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        late = now - self._due
        self.max = max(self.max, late)
        self.recent = max(self.recent, late)
        self._due = now + 0.05
        self._handle = loop.call_at(self._due, self._tick)

    def take(self) -> float:
        """The largest lag since the last ``take``."""
        out, self.recent = self.recent, 0.0
        return out

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()


# --------------------------------------------------------------------------- nodes


def host_prefix(addr: ipaddress.IPv6Address) -> str:
    return f"{addr}/128"


def seq_node(key: PrivateKey, disco: str, addr: str, seq: int) -> pb.Node:
    """The healthy pair's node number ``seq`` (deterministic but for ``as_of``)."""
    return pb.Node(
        id=seq,
        key=b"np" + key.public.raw,
        disco=disco,
        preferred_derp=999,
        derp_latency={"999-v4": 0.001 + seq * 1e-6},
        addresses=[addr],
        allowed_ips=[addr],
        endpoints=[f"127.0.0.1:{1 + seq % 65000}"],
    )


_BIG: dict[str, pb.Node] = {}


def big_node(addr: str, seq: int) -> pb.Node:
    """A node close to the default caps (64 KiB serialized, 256 endpoints,
    1024 allowed IPs): what a misbehaving peer pushes. ``seq`` makes each differ."""
    tmpl = _BIG.get(addr)
    if tmpl is None:
        tmpl = _BIG[addr] = _big_template(addr)
    node = pb.Node()
    node.CopyFrom(tmpl)
    node.id = seq
    node.as_of.FromNanoseconds(time.time_ns())
    return node


def _big_template(addr: str, target: int = 63_000) -> pb.Node:
    key = PrivateKey.generate()
    base = int(ipaddress.IPv6Address(addr.split("/")[0]))
    node = pb.Node(
        key=b"np" + key.public.raw,
        disco="discokey:" + "ab" * 32,
        preferred_derp=999,
        addresses=[addr],
        endpoints=[f"[{ipaddress.IPv6Address(base ^ (i << 16))}]:{40000 + i}" for i in range(256)],
        derp_latency={f"{r}-v4": 0.01 * r for r in range(1, 201)},
    )
    i = 0
    while node.ByteSize() < target - 64 and i < 1024:  # allowed IPs up to ~63 KB (cap: 64 KiB)
        i += 1
        node.allowed_ips.append(f"{ipaddress.IPv6Address(base ^ i)}/128")
    return node


def huge_rfh_request(entries: int = 200_000) -> Req:
    """One CoordinateRequest with ``entries`` ready_for_handshake entries (~20 B each)."""
    ids = [uuid.uuid4().bytes for _ in range(min(entries, 1000))]
    return Req(ready_for_handshake=[Req.ReadyForHandshake(id=ids[i % len(ids)]) for i in range(entries)])


#: gRPC channels share TCP connections (subchannels) by default; every attacker
#: channel gets its own, as separate clients would have.
OWN_CONNECTION: list[tuple[str, int]] = [("grpc.use_local_subchannel_pool", 1)]


def _stub(channel: grpc.aio.Channel) -> Any:
    return pb_grpc.TailnetStub(channel)  # type: ignore[no-untyped-call]


def grpc_md(token: str, **extra: str) -> list[tuple[str, str]]:
    md = [("authorization", f"Bearer {token}"), ("tailnet-version", VERSION)]
    md += [(k.replace("_", "-"), v) for k, v in extra.items()]
    return md


# --------------------------------------------------------------------------- raw sockets


class Raw:
    """A raw TCP connection for attacks that misbehave (never read, dribble,
    send garbage). Non-blocking socket driven by the event loop's fd callbacks."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.sent = 0

    @classmethod
    async def open(
        cls, port: int, *, rcvbuf: int | None = None, sndbuf: int | None = None,
        timeout: float = 10.0,
    ) -> Raw:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        if sndbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        sock.setblocking(False)
        try:
            await asyncio.wait_for(
                asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port)), timeout)
        except BaseException:
            sock.close()
            raise
        return cls(sock)

    async def _ready(self, write: bool, timeout: float) -> bool:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()

        def ready() -> None:
            if not fut.done():
                fut.set_result(None)

        (loop.add_writer if write else loop.add_reader)(self.fd, ready)
        try:
            await asyncio.wait_for(fut, timeout)
            return True
        except TimeoutError:
            return False
        finally:
            (loop.remove_writer if write else loop.remove_reader)(self.fd)

    async def send_all(self, data: bytes, timeout: float = 10.0) -> str:
        """Send ``data`` completely: "ok", "stalled" (not writable for ``timeout``)
        or "closed" (reset/broken pipe)."""
        view = memoryview(data)
        while view:
            try:
                n = self.sock.send(view)
            except BlockingIOError:
                if not await self._ready(True, timeout):
                    return "stalled"
                continue
            except OSError:
                return "closed"
            self.sent += n
            view = view[n:]
        return "ok"

    async def push(self, data: bytes, *, limit: int, stall: float, until: float) -> tuple[int, str]:
        """Write ``data`` repeatedly (frames stay whole) until ``limit`` bytes,
        a stall of ``stall`` s, the peer closing, or wall time ``until``."""
        chunk = data * max(1, 65536 // len(data))
        view = memoryview(chunk)
        off = 0
        sent = 0
        while sent < limit:
            if time.time() >= until:
                return sent, "time"
            try:
                n = self.sock.send(view[off:])
            except BlockingIOError:
                if not await self._ready(True, min(stall, max(0.01, until - time.time()))):
                    return sent, "stalled" if time.time() < until else "time"
                continue
            except OSError:
                return sent, "closed"
            sent += n
            self.sent += n
            off = (off + n) % len(chunk)
            if off == 0:
                await asyncio.sleep(0)
        return sent, "limit"

    async def recv_some(self, timeout: float) -> bytes | None:
        """Up to 1 MiB; ``b""`` at EOF, ``None`` on timeout; raises on reset."""
        while True:
            try:
                return self.sock.recv(1 << 20)
            except BlockingIOError:
                if not await self._ready(False, timeout):
                    return None

    async def read_until(self, marker: bytes, timeout: float) -> tuple[bytes, bytes]:
        buf = b""
        deadline = time.monotonic() + timeout
        while marker not in buf:
            chunk = await self.recv_some(max(0.01, deadline - time.monotonic()))
            if chunk is None:
                raise TimeoutError(f"no {marker!r} within {timeout} s")
            if not chunk:
                raise ConnectionError(f"closed before {marker!r}: {buf[:200]!r}")
            buf += chunk
        head, _, rest = buf.partition(marker)
        return head, rest

    async def read_exactly(self, n: int, buf: bytes, timeout: float) -> tuple[bytes, bytes]:
        deadline = time.monotonic() + timeout
        while len(buf) < n:
            chunk = await self.recv_some(max(0.01, deadline - time.monotonic()))
            if chunk is None:
                raise TimeoutError("read timed out")
            if not chunk:
                raise ConnectionError("closed")
            buf += chunk
        return buf[:n], buf[n:]

    def peer_closed(self) -> bool:
        """Did the server close or reset (without reading what it sent)?"""
        p = select.poll()
        p.register(self.fd, select.POLLRDHUP | select.POLLHUP | select.POLLERR)
        return bool(p.poll(0))

    async def drain(self, timeout: float, idle: float = 1.0, limit: int = 64 << 20) -> tuple[bytes, str]:
        """Read what is there: (bytes, "eof" | "reset" | "idle" | "limit")."""
        buf = bytearray()
        deadline = time.monotonic() + timeout
        while len(buf) < limit:
            left = deadline - time.monotonic()
            if left <= 0:
                return bytes(buf), "idle"
            try:
                chunk = await self.recv_some(min(idle, left))
            except OSError:
                return bytes(buf), "reset"
            if chunk is None:
                return bytes(buf), "idle"
            if not chunk:
                return bytes(buf), "eof"
            buf += chunk
        return bytes(buf), "limit"

    def close(self, rst: bool = False) -> None:
        if rst:
            with contextlib.suppress(OSError):
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()


# WebSocket (RFC 6455) by hand: client frames masked with an all-zero key (the
# payload bytes stay as they are), server frames parsed only to find the close.

WS_CONT, WS_TEXT, WS_BINARY, WS_CLOSE, WS_PING, WS_PONG = 0, 1, 2, 8, 9, 10


def ws_frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    n = len(payload)
    b0 = (0x80 if fin else 0) | opcode
    if n < 126:
        head = struct.pack("!BB", b0, 0x80 | n)
    elif n < 1 << 16:
        head = struct.pack("!BBH", b0, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", b0, 0x80 | 127, n)
    return head + b"\0\0\0\0" + payload


def ws_parse(data: bytes) -> tuple[list[tuple[int, bytes]], bytes]:
    """Server frames in ``data``: ([(opcode, payload)], unparsed tail)."""
    out: list[tuple[int, bytes]] = []
    i = 0
    n = len(data)
    while i + 2 <= n:
        b0, b1 = data[i], data[i + 1]
        ln = b1 & 0x7F
        j = i + 2
        if ln == 126:
            if j + 2 > n:
                break
            ln = struct.unpack_from("!H", data, j)[0]
            j += 2
        elif ln == 127:
            if j + 8 > n:
                break
            ln = struct.unpack_from("!Q", data, j)[0]
            j += 8
        if b1 & 0x80:
            j += 4
        if j + ln > n:
            break
        out.append((b0 & 0x0F, data[j : j + ln]))
        i = j + ln
    return out, data[i:]


def ws_close_of(frames: list[tuple[int, bytes]]) -> str | None:
    for op, payload in frames:
        if op == WS_CLOSE:
            if len(payload) >= 2:
                code = struct.unpack("!H", payload[:2])[0]
                return f"close {code} {payload[2:].decode('utf-8', 'replace')!r}"
            return "close (no code)"
    return None


async def ws_open(
    port: int, path: str, token: str | None, *, cookie: bool = False,
    rcvbuf: int | None = None, subprotocol: str | None = None,
) -> tuple[Raw, bytes]:
    """Upgrade ``path`` on a raw socket; returns (connection, bytes after the 101)."""
    r = await Raw.open(port, rcvbuf=rcvbuf)
    lines = [
        f"GET {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Upgrade: websocket",
        "Connection: Upgrade", "Sec-WebSocket-Key: c29hay1zb2FrLXNvYWshIQ==",
        "Sec-WebSocket-Version: 13",
    ]
    if token is not None:
        lines.append(f"Cookie: coder_session_token={token}" if cookie
                     else f"Coder-Session-Token: {token}")
    if subprotocol:
        lines.append(f"Sec-WebSocket-Protocol: {subprotocol}")
    await r.send_all(("\r\n".join(lines) + "\r\n\r\n").encode())
    try:
        head, rest = await r.read_until(b"\r\n\r\n", 10.0)
    except BaseException:
        r.close()
        raise
    if not head.startswith(b"HTTP/1.1 101"):
        r.close()
        raise ConnectionError(f"upgrade refused: {head.splitlines()[0]!r}")
    return r, rest


async def http_exchange(r: Raw, request: bytes, timeout: float = 10.0) -> tuple[int, bytes, bytes]:
    """Send one request on ``r``; read one response (Content-Length bodies only)."""
    await r.send_all(request)
    head, rest = await r.read_until(b"\r\n\r\n", timeout)
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        k, _, v = line.partition(b":")
        if k.strip().lower() == b"content-length":
            length = int(v.strip())
    body, rest = await r.read_exactly(length, rest, timeout)
    return status, head, body


# =========================================================================== healthy pair


@dataclass
class Stream:
    """One verified direction (sender → receiver) of sequence-numbered items."""

    name: str
    sent: int = 0
    sent_at: dict[int, tuple[float, float]] = field(default_factory=dict)  # seq -> (perf, wall)
    received: set[int] = field(default_factory=set)
    last: int = 0
    duplicates: int = 0
    misordered: int = 0
    corrupt: int = 0
    wrong_source: int = 0
    samples: list[tuple[float, float]] = field(default_factory=list)  # (wall sent, ms)

    def note_sent(self, seq: int) -> None:
        self.sent += 1
        self.sent_at[seq] = (time.perf_counter(), time.time())

    def note_received(self, seq: int) -> None:
        now = time.perf_counter()
        if seq in self.received:
            self.duplicates += 1
            return
        if seq < self.last:
            self.misordered += 1
        self.last = max(self.last, seq)
        self.received.add(seq)
        at = self.sent_at.get(seq)
        if at is not None:
            self.samples.append((at[1], (now - at[0]) * 1000.0))

    def report(self, t0: float, t1: float) -> dict[str, Any]:
        lost = sorted(set(self.sent_at) - self.received)
        window = [ms for wall, ms in self.samples if t0 <= wall <= t1]
        worst, worst_at = None, None
        step = 10.0
        t = t0
        while t < t1:
            w = [ms for wall, ms in self.samples if t <= wall < min(t + step, t1)]
            p = pct(w, 99)
            if p is not None and (worst is None or p > worst):
                worst, worst_at = p, t - t0
            t += step
        return {
            "sent": self.sent, "received": len(self.received), "lost": len(lost),
            "lost_seqs": lost[:20], "duplicates": self.duplicates, "misordered": self.misordered,
            "corrupt": self.corrupt, "wrong_source": self.wrong_source,
            "window_samples": len(window), "p50_ms": rnd(pct(window, 50), 3),
            "p99_ms": rnd(pct(window, 99), 3), "max_ms": rnd(max(window, default=None), 3),
            "worst_10s_p99_ms": rnd(worst, 3), "worst_10s_at_s": rnd(worst_at, 1),
        }


def _derp_packet(kind: int, seq: int, t_ns: int) -> bytes:
    body = struct.pack(">BIQ", kind, seq, t_ns) + bytes((seq + i) & 0xFF for i in range(240))
    return body + hashlib.blake2b(body, digest_size=8).digest()


def _derp_unpack(data: bytes) -> tuple[int, int, int] | None:
    if len(data) != 13 + 240 + 8:
        return None
    body, digest = data[:-8], data[-8:]
    if hashlib.blake2b(body, digest_size=8).digest() != digest:
        return None
    kind, seq, t_ns = struct.unpack_from(">BIQ", body)
    if body[13:] != bytes((seq + i) & 0xFF for i in range(240)):
        return None
    return kind, seq, t_ns


async def healthy_main(cfg: dict[str, Any]) -> None:
    """The healthy pair (see module docstring); reports when told "stop t0 t1"."""
    from tailnet.client import (
        AgentConnection,
        ClientConnection,
        ConnectionLost,
        ConnectionOptions,
        Event,
        PeerUpdated,
        Reconnected,
    )

    api = cfg["api"]
    agent_id = uuid.UUID(cfg["agent_id"])
    rate, derp_rate = float(cfg["rate"]), float(cfg["derp_rate"])
    lag = LoopLag()
    lag.start()
    errors: list[str] = []
    reconnects = {"agent": 0, "client": 0}

    a_key, c_key = PrivateKey.generate(), PrivateKey.generate()
    a_disco = "discokey:" + PrivateKey.generate().public.raw.hex()
    c_disco = "discokey:" + PrivateKey.generate().public.raw.hex()
    a_addr = host_prefix(addr_from_uuid(TAILSCALE_SERVICE_PREFIX, agent_id))
    c_addr = host_prefix(addr_from_uuid(TAILSCALE_SERVICE_PREFIX, uuid.uuid4()))
    a2c = Stream("agent->client")
    c2a = Stream("client->agent")
    first = {"agent": asyncio.Event(), "client": asyncio.Event()}
    client_peer: list[uuid.UUID] = []

    def check(stream: Stream, ev: PeerUpdated, src: uuid.UUID | None, key: PrivateKey,
              disco: str, addr: str, who: str) -> None:
        if src is not None and ev.peer_id != src:
            stream.wrong_source += 1
            return
        node = pb.Node()
        node.CopyFrom(ev.node)
        node.ClearField("as_of")
        seq = node.id
        if node != seq_node(key, disco, addr, seq):
            stream.corrupt += 1
            return
        if seq == 0:
            first[who].set()
            return
        stream.note_received(seq)

    def on_agent(ev: Event) -> None:
        if isinstance(ev, PeerUpdated):
            check(c2a, ev, client_peer[0] if client_peer else None, c_key, c_disco, c_addr, "agent")
        elif isinstance(ev, (ConnectionLost, Reconnected)):
            reconnects["agent"] += 1
            errors.append(f"agent: {ev}")

    def on_client(ev: Event) -> None:
        if isinstance(ev, PeerUpdated):
            check(a2c, ev, agent_id, a_key, a_disco, a_addr, "client")
        elif isinstance(ev, (ConnectionLost, Reconnected)):
            reconnects["client"] += 1
            errors.append(f"client: {ev}")

    agent = AgentConnection(api, cfg["agent_token"], node=seq_node(a_key, a_disco, a_addr, 0),
                            options=ConnectionOptions(version=VERSION, on_event=on_agent,
                                                      event_buffer=16))
    client = ClientConnection(api, cfg["user_token"], agent_id=agent_id,
                              node=seq_node(c_key, c_disco, c_addr, 0),
                              options=ConnectionOptions(version=VERSION, on_event=on_client,
                                                        event_buffer=16))
    await agent.start(timeout=20)
    pid = await client.start(timeout=20)
    client_peer.append(pid)
    await asyncio.wait_for(asyncio.gather(first["agent"].wait(), first["client"].wait()), 20)

    # DERP pair
    derp_url = cfg["derp_url"]
    da, db = DerpClient(derp_url, PrivateKey.generate()), DerpClient(derp_url, PrivateKey.generate())
    await da.connect()
    await db.connect()
    d_ab, d_ba = Stream("derp a->b"), Stream("derp b->a")
    e_ab, e_ba = Stream("echo b->a"), Stream("echo a->b")  # echoes of a's / b's packets
    rtts: list[tuple[float, float]] = []

    async def derp_reader(me: DerpClient, peer: DerpClient, data_in: Stream, echo_in: Stream) -> None:
        async for ev in me:
            if not isinstance(ev, PacketReceived):
                continue
            if ev.src != peer.public_key:
                data_in.wrong_source += 1
                continue
            got = _derp_unpack(ev.data)
            if got is None:
                data_in.corrupt += 1
                continue
            kind, seq, t_ns = got
            if kind == 1:
                data_in.note_received(seq)
                me.send_nowait(peer.public_key, _derp_packet(2, seq, t_ns))
            else:
                echo_in.note_received(seq)
                rtts.append((t_ns / 1e9, (time.perf_counter_ns() - t_ns) / 1e6))

    stopping = asyncio.Event()

    async def derp_sender(me: DerpClient, peer: DerpClient, out: Stream, echo: Stream) -> None:
        seq = 0
        period = 1.0 / derp_rate
        nxt = time.perf_counter()
        while not stopping.is_set():
            seq += 1
            t_ns = time.perf_counter_ns()
            out.note_sent(seq)
            echo.sent_at[seq] = out.sent_at[seq]
            echo.sent += 1
            await me.send(peer.public_key, _derp_packet(1, seq, t_ns))
            nxt += period
            delay = nxt - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            elif delay < -1.0:
                nxt = time.perf_counter()

    async def node_sender(conn: Any, stream: Stream, key: PrivateKey, disco: str, addr: str) -> None:
        seq = 0
        period = 1.0 / rate
        nxt = time.perf_counter()
        while not stopping.is_set():
            seq += 1
            node = seq_node(key, disco, addr, seq)
            node.as_of.FromNanoseconds(time.time_ns())
            stream.note_sent(seq)
            conn.update_node(node)
            try:
                await conn.flush(timeout=10)
            except (TimeoutError, ConnectionError) as exc:
                errors.append(f"{stream.name}: flush of {seq}: {type(exc).__name__} {exc}")
            nxt += period
            delay = nxt - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            elif delay < -1.0:
                nxt = time.perf_counter()

    rtt_perf_offset = time.time() - time.perf_counter()
    tasks = [
        asyncio.ensure_future(derp_reader(da, db, d_ba, e_ab)),
        asyncio.ensure_future(derp_reader(db, da, d_ab, e_ba)),
        asyncio.ensure_future(derp_sender(da, db, d_ab, e_ab)),
        asyncio.ensure_future(derp_sender(db, da, d_ba, e_ba)),
        asyncio.ensure_future(node_sender(agent, a2c, a_key, a_disco, a_addr)),
        asyncio.ensure_future(node_sender(client, c2a, c_key, c_disco, c_addr)),
    ]
    emit({"ready": True, "client_peer_id": str(pid)})
    reader = await stdin_lines()
    line = (await reader.readline()).decode().split()
    t0, t1 = (float(line[1]), float(line[2])) if len(line) == 3 else (0.0, time.time())
    stopping.set()
    await asyncio.gather(*tasks[2:], return_exceptions=True)
    await asyncio.sleep(2.0)  # let the last items arrive
    for task in tasks[:2]:
        task.cancel()
    await asyncio.gather(*tasks[:2], return_exceptions=True)
    for task in tasks:
        if task.done() and not task.cancelled() and task.exception() is not None:
            errors.append(f"task failed: {task.exception()!r}")
    await client.close()
    await agent.close()
    await da.close()
    await db.close()
    lag.stop()
    rtt_window = [ms for t_s, ms in rtts if t0 <= t_s + rtt_perf_offset <= t1]
    worst = None
    t = t0
    while t < t1:
        w = [ms for t_s, ms in rtts if t <= t_s + rtt_perf_offset < min(t + 10, t1)]
        p = pct(w, 99)
        if p is not None and (worst is None or p > worst):
            worst = p
        t += 10
    fan = [ms for s in (a2c, c2a) for wall, ms in s.samples if t0 <= wall <= t1]
    emit({
        "fanout": {"agent_to_client": a2c.report(t0, t1), "client_to_agent": c2a.report(t0, t1),
                   "p50_ms": rnd(pct(fan, 50), 3), "p99_ms": rnd(pct(fan, 99), 3),
                   "max_ms": rnd(max(fan, default=None), 3)},
        "derp": {"a_to_b": d_ab.report(t0, t1), "b_to_a": d_ba.report(t0, t1),
                 "echo_to_a": e_ab.report(t0, t1), "echo_to_b": e_ba.report(t0, t1),
                 "rtt_p50_ms": rnd(pct(rtt_window, 50), 3), "rtt_p99_ms": rnd(pct(rtt_window, 99), 3),
                 "rtt_max_ms": rnd(max(rtt_window, default=None), 3),
                 "rtt_worst_10s_p99_ms": rnd(worst, 3)},
        "reconnects": reconnects, "errors": errors[:20],
        "node_updates_written": {"agent": agent.node_updates_sent, "client": client.node_updates_sent},
        "loop_lag_max_ms": round(lag.max * 1000, 1),
    })


# =========================================================================== attackers


@dataclass
class Ctx:
    """What every attack gets: the config, the time budget and an event log."""

    cfg: dict[str, Any]
    t0: float
    deadline: float
    events: list[tuple[float, str, str]] = field(default_factory=list)

    def left(self) -> float:
        return self.deadline - time.time()

    def rel(self) -> float:
        return round(time.time() - self.t0, 2)

    def log(self, attack: str, text: str) -> None:
        if len(self.events) < 2000:
            self.events.append((self.rel(), attack, text))

    @property
    def port(self) -> int:
        return int(self.cfg["api"].rsplit(":", 1)[1])

    @property
    def api(self) -> str:
        return str(self.cfg["api"])

    @property
    def ws(self) -> str:
        return "ws" + self.api[len("http"):]


def outcome(attack: str, target: str, did: str, ended: str, ok: bool | None,
            **details: Any) -> dict[str, Any]:
    """One table row: what an attacker did and what it ended with; ``ok`` says
    whether that is the expected (bounded) outcome."""
    return {"attack": attack, "target": target, "did": did, "ended": ended, "ok": ok,
            "details": details}


def summarize(texts: Iterable[str], limit: int = 3) -> str:
    counts: dict[str, int] = {}
    for t in texts:
        counts[t] = counts.get(t, 0) + 1
    items = sorted(counts.items(), key=lambda kv: -kv[1])
    s = "; ".join(f"{n}× {t}" for t, n in items[:limit])
    return s + (f"; +{len(items) - limit} other" if len(items) > limit else "")


# ---------------------------------------------------------------- API WebSockets


async def _ws_nonreader(ctx: Ctx, name: str, path: str, token: str, *, cookie: bool,
                        frame: bytes, stall: float = 2.0) -> dict[str, Any]:
    """Flood ``frame`` on an upgraded socket, never reading until the end."""
    t_open = ctx.rel()
    r, _ = await ws_open(ctx.port, path, token, cookie=cookie, rcvbuf=4096)
    sent, how = await r.push(frame, limit=256 << 20, stall=stall, until=ctx.deadline)
    stalled_at = ctx.rel()
    ctx.log(name, f"{path}: {how} after {sent} bytes")
    closed_at = None
    while ctx.left() > 0:
        if r.peer_closed():
            closed_at = ctx.rel()
            break
        await asyncio.sleep(0.5)
    data, end = await r.drain(timeout=3.0, idle=0.5)
    frames, _ = ws_parse(data)
    pongs = sum(1 for op, _ in frames if op == WS_PONG)
    close = ws_close_of(frames)
    r.close()
    if how == "stalled":
        did = f"{sent / 1e6:.1f} MB of frames until the server stopped reading ({stalled_at - t_open:.1f} s)"
    else:
        did = f"{sent / 1e6:.1f} MB of frames ({how})"
    if closed_at is not None:
        ended = f"closed at {closed_at:.0f} s: {close or end}"
    else:
        ended = f"throttled, still open at the end ({close or 'no close frame'})"
    ok = how in ("stalled", "closed")
    return outcome(name, path, did, ended, ok, bytes_sent=sent, pongs_unread=pongs,
                   read_at_end=len(data), end=end)


async def attack_ws_ping_flood(ctx: Ctx) -> list[dict[str, Any]]:
    """WebSocket pings from clients that never read (user and agent tokens)."""
    c = ctx.cfg
    ping = ws_frame(WS_PING, b"p" * 125)
    jobs = [
        ("/api/v2/derp-map", c["v1_token"], False),
        ("/api/v2/derp-map", c["xw_token"], False),
        (f"/api/v2/tailnet?version={VERSION}", c["v1_token"], False),
        (f"/api/v2/workspaceagents/me/rpc?version={VERSION}", c["xw_token"], True),
    ]
    res = await asyncio.gather(*(
        _ws_nonreader(ctx, "ws-ping-flood", p, t, cookie=ck, frame=ping) for p, t, ck in jobs),
        return_exceptions=True)
    out = []
    for (p, t, _), r in zip(jobs, res):
        who = "agent token" if t == c["xw_token"] else "user token"
        if isinstance(r, BaseException):
            out.append(outcome("ws-ping-flood", f"{p} ({who})", "connect", f"error: {r!r}", False))
        else:
            r["target"] = f"{r['target']} ({who})"
            out.append(r)
    return out


async def attack_ws_big_messages(ctx: Ctx) -> list[dict[str, Any]]:
    """4 MiB messages (the limit) without reading; then one over the limit."""
    c = ctx.cfg
    msg = ws_frame(WS_BINARY, b"m" * (4 << 20))
    rows = []

    async def one(path: str, token: str, cookie: bool, count: int, extra: bytes | None) -> dict[str, Any]:
        r, _ = await ws_open(ctx.port, path, token, cookie=cookie, rcvbuf=4096)
        n = 0
        how = "ok"
        while n < count and ctx.left() > 2:
            how = await r.send_all(msg, timeout=3.0)
            if how != "ok":
                break
            n += 1
            await asyncio.sleep(1.0)
        over = ""
        if extra is not None and how == "ok" and ctx.left() > 2:
            how = await r.send_all(extra, timeout=3.0)
            over = " + 1 message of 4 MiB + 1 byte"
        t_end = time.time() + min(10.0, max(0.0, ctx.left()))
        while time.time() < t_end and not r.peer_closed():
            await asyncio.sleep(0.2)
        closed = r.peer_closed()
        data, end = await r.drain(timeout=3.0, idle=0.5)
        frames, _ = ws_parse(data)
        close = ws_close_of(frames)
        r.close()
        did = f"{n} × 4 MiB messages{over}"
        ended = (f"closed: {close or end}" if closed else f"still open ({how})")
        return outcome("ws-big-messages", path.split("?")[0], did, ended, True, sent=n, how=how)

    over = ws_frame(WS_BINARY, b"o" * ((4 << 20) + 1))
    jobs = [
        one("/api/v2/derp-map", c["v1_token"], False, 8, over),
        one(f"/api/v2/tailnet?version={VERSION}", c["v1_token"], False, 1, None),
    ]
    for r in await asyncio.gather(*jobs, return_exceptions=True):
        rows.append(r if not isinstance(r, BaseException) else
                    outcome("ws-big-messages", "?", "connect", f"error: {r!r}", False))
    # expected: derp-map drains and ignores input, the over-limit message closes 1009;
    # the RPC endpoint gets bytes that are no yamux frame: GoAway + close
    if rows and "1009" not in rows[0]["ended"]:
        rows[0]["ok"] = False
    return rows


async def attack_ws_tiny_messages(ctx: Ctx) -> list[dict[str, Any]]:
    """One-byte binary messages (7 bytes on the wire) as fast as the socket takes
    them for 5 s on /api/v2/derp-map (which drains and ignores input), never
    reading; a new connection every 15 s."""
    c = ctx.cfg
    frame = ws_frame(WS_BINARY, b"t")
    res: list[str] = []
    total = 0
    while ctx.left() > 8 and len(res) < 4:
        t_round = time.time()
        r, _ = await ws_open(ctx.port, "/api/v2/derp-map", c["v1_token"], rcvbuf=4096)
        sent, how = await r.push(frame, limit=1 << 30, stall=2.0, until=min(ctx.deadline, time.time() + 5))
        total += sent
        res.append(f"{sent / 1e6:.0f} MB ({how})")
        ctx.log("ws-tiny-messages", res[-1])
        r.close(rst=True)
        await asyncio.sleep(max(0.0, 15.0 - (time.time() - t_round)))
    return [outcome("ws-tiny-messages", "/api/v2/derp-map (user token)",
                    f"{len(res)} connections × 5 s of one-byte messages ({total / 7e6:.1f} M messages)",
                    summarize(res, 2), None)]


async def attack_yamux_ping_flood(ctx: Ctx) -> list[dict[str, Any]]:
    """One 4 MiB WebSocket message full of yamux pings on /api/v2/tailnet, never
    reading the pongs; again every 10 s on a new connection (each is one
    ``receive_data`` of ~350,000 frames on the server)."""
    c = ctx.cfg
    ping = struct.pack(">BBHII", 0, 2, 1, 0, 7)  # version 0, type Ping, flags SYN, opaque 7
    msg = ws_frame(WS_BINARY, ping * ((4 << 20) // len(ping)))
    n = 0
    ends = []
    while ctx.left() > 5 and n < 6:
        r, _ = await ws_open(ctx.port, f"/api/v2/tailnet?version={VERSION}", c["v1_token"],
                             rcvbuf=4096)
        ctx.log("yamux-ping-flood", f"message {n + 1}")
        how = await r.send_all(msg + msg, timeout=5.0)
        n += 1
        await asyncio.sleep(min(10.0, max(0.0, ctx.left() - 1)))
        ends.append("closed" if r.peer_closed() else f"open ({how})")
        r.close(rst=True)
    return [outcome("yamux-ping-flood", "/api/v2/tailnet (user token)",
                    f"{n} connections × 2 messages of 4 MiB of yamux pings",
                    summarize(ends), None)]


# ---------------------------------------------------------------- Coordinate: slow consumers


class GrpcPeer:
    """A Coordinate stream over gRPC that we may never read."""

    def __init__(self, target: str, token: str, **md: str) -> None:
        self.channel = grpc.aio.insecure_channel(
            target, options=[("grpc.max_receive_message_length", 16 << 20), *OWN_CONNECTION])
        self.call = _stub(self.channel).Coordinate(metadata=grpc_md(token, **md))

    async def peer_id(self, timeout: float = 10.0) -> uuid.UUID | None:
        md = await asyncio.wait_for(self.call.initial_metadata(), timeout)
        raw = dict(md or {}).get("tailnet-peer-id")
        return uuid.UUID(str(raw)) if raw else None

    async def write(self, req: Req, timeout: float) -> str:
        try:
            await asyncio.wait_for(self.call.write(req), timeout)
            return "ok"
        except TimeoutError:
            return "blocked"
        except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError) as exc:
            return f"ended ({type(exc).__name__})"
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            return "ended (cancelled call)"

    async def finish(self, timeout: float) -> tuple[str, str]:
        """Read everything queued for us; (last error text, status). A stream
        the server did not end is reported as "still open"."""
        last_error = ""
        n = 0
        try:
            async with asyncio.timeout(timeout):
                while True:
                    resp = await self.call.read()
                    if resp is grpc.aio.EOF:  # type: ignore[attr-defined]
                        break
                    n += 1
                    if resp.error:
                        last_error = resp.error
            code = await self.call.code()
            status = code.name + (f" {await self.call.details()!r}" if await self.call.details() else "")
        except TimeoutError:
            status = f"still open ({n} responses read)"
        except grpc.aio.AioRpcError as exc:
            status = f"{exc.code().name} {exc.details()!r}"
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            status = f"CANCELLED (after {n} responses)"  # grpc.aio raises this for a cancelled call
        return last_error, status

    async def close(self) -> None:
        self.call.cancel()
        await self.channel.close(None)


class DrpcPeer:
    """A Coordinate stream over Coder's transport that we may never read."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.coord = client.coordinate()

    @classmethod
    async def connect(cls, url: str, token: str, *, cookie: bool = False) -> DrpcPeer:
        from tailnet.rpc.tailnet_client import TailnetClient

        return cls(await TailnetClient.connect(url, token, cookie=cookie))

    @property
    def peer_id(self) -> uuid.UUID | None:
        return uuid.UUID(self.client.peer_id) if self.client.peer_id else None

    async def write(self, req: Req, timeout: float) -> str:
        try:
            await asyncio.wait_for(self.coord.send(req), timeout)
            return "ok"
        except TimeoutError:
            return "blocked"
        except Exception as exc:  # noqa: BLE001 - RpcError / ConnectionError
            return f"ended ({type(exc).__name__})"

    async def finish(self, timeout: float) -> tuple[str, str]:
        last_error = ""
        n = 0
        try:
            async with asyncio.timeout(timeout):
                while True:
                    resp = await self.coord.recv()
                    if resp is None:
                        status = "Close"
                        break
                    n += 1
                    if resp.error:
                        last_error = resp.error
        except TimeoutError:
            status = f"still open ({n} responses read)"
        except Exception as exc:  # noqa: BLE001
            status = f"{type(exc).__name__}: {getattr(exc, 'message', exc)}"
        return last_error, status

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.client.close(), 5)


async def _slow_consumers(ctx: Ctx, transport: str) -> list[dict[str, Any]]:
    """An attacker agent and 3 clients bound to it, all pushing UpdateSelf with
    ~63 KB nodes at up to 20/s. Odd rounds: the clients never read (the agent
    does); even rounds: the agent never reads (the clients do). Every non-reader
    should be evicted as a slow consumer, no reader."""
    c = ctx.cfg
    name = f"slow-consumers-{transport}"
    agent_id = uuid.UUID(c[f"x{transport[0]}_id"])
    agent_token = c[f"x{transport[0]}_token"]
    a_addr = host_prefix(addr_from_uuid(TAILSCALE_SERVICE_PREFIX, agent_id))
    rounds: list[dict[str, Any]] = []
    rnd_no = 0
    while ctx.left() > 14 and rnd_no < 4:
        rnd_no += 1
        slow_agent = rnd_no % 2 == 0
        round_end = time.time() + min(25.0, ctx.left() - 9)
        peers: list[tuple[str, GrpcPeer | DrpcPeer, str]] = []
        if transport == "grpc":
            gp = GrpcPeer(c["grpc"], agent_token)
            await gp.peer_id()
            peers.append(("agent", gp, a_addr))
            for _ in range(3):
                gc_ = GrpcPeer(c["grpc"], c["v1_token"], tailnet_agent_id=str(agent_id))
                await gc_.peer_id()
                peers.append(("client", gc_, host_prefix(addr_from_uuid(TAILSCALE_SERVICE_PREFIX, uuid.uuid4()))))
        else:
            ap = await DrpcPeer.connect(f"{ctx.ws}/api/v2/workspaceagents/me/rpc?version={VERSION}",
                                        agent_token, cookie=True)
            peers.append(("agent", ap, a_addr))
            for _ in range(3):
                cp = await DrpcPeer.connect(
                    f"{ctx.ws}/api/v2/workspaceagents/{agent_id}/coordinate?version={VERSION}",
                    c["v1_token"])
                peers.append(("client", cp, host_prefix(addr_from_uuid(TAILSCALE_SERVICE_PREFIX, uuid.uuid4()))))
        for kind, p, _ in peers:
            if kind == "client":
                await p.write(Req(add_tunnel=Req.Tunnel(id=agent_id.bytes)), 5)
        slow = [(kind == "agent") == slow_agent for kind, _, _ in peers]
        readers = [asyncio.ensure_future(p.finish(3600.0)) for (_, p, _), sl in zip(peers, slow)
                   if not sl]
        pending: list[asyncio.Future[str]] = []

        async def push(p: GrpcPeer | DrpcPeer, addr: str) -> tuple[int, str]:
            n = 0
            while time.time() < round_end and n < 500:
                # Never cancel a blocked write (grpc.aio would cancel the call): leave it.
                w = asyncio.ensure_future(p.write(Req(update_self=Req.UpdateSelf(
                    node=big_node(addr, n + 1))), 3600.0))
                done, _ = await asyncio.wait({w}, timeout=2.0)
                if not done:
                    pending.append(w)
                    return n, "blocked"
                if w.result() != "ok":
                    return n, w.result()
                n += 1
                await asyncio.sleep(0.05)
            return n, "ok"

        pushed = await asyncio.gather(*(push(p, a) for _, p, a in peers))
        ctx.log(name, f"round {rnd_no}: pushed {[x[0] for x in pushed]} ({[x[1] for x in pushed]})")
        await asyncio.sleep(max(0.0, round_end - time.time()))
        ends: list[str] = []
        it = iter(readers)
        for (kind, p, _), sl in zip(peers, slow):
            if sl:
                e, st = await p.finish(5.0)
            else:
                r = next(it)
                done, _ = await asyncio.wait({r}, timeout=0)
                e, st = r.result() if done else ("", "reading, still open")
                r.cancel()
            ends.append(f"{kind} ({'non-reader' if sl else 'reader'}): "
                        + ("EVICTED " if "failed to update tunnel peer mapping" in e else "")
                        + f"{e!r} / {st}")
        for _, p, _ in peers:
            await p.close()
        for w in pending:
            w.cancel()
        await asyncio.gather(*pending, *readers, return_exceptions=True)
        rounds.append({"slow": "agent" if slow_agent else "clients",
                       "pushed": [x[0] for x in pushed], "push_end": [x[1] for x in pushed],
                       "ends": ends})
    ends_all = [e for r in rounds for e in r["ends"]]
    nonreaders = [e for e in ends_all if "(non-reader)" in e]
    evicted = sum(1 for e in nonreaders if "EVICTED" in e)
    readers_evicted = sum(1 for e in ends_all if "(reader)" in e and "EVICTED" in e)
    pushed_all = [n for r in rounds for n in r["pushed"]]
    did = (f"{len(rounds)} rounds × (1 agent + 3 clients), non-readers: the clients, then the agent; "
           f"{sum(pushed_all)} UpdateSelf of ~63 KB (≤ 20/s per peer)")
    ended = (f"{evicted}/{len(nonreaders)} non-readers evicted (slow consumer), "
             f"{readers_evicted} readers evicted")
    return [outcome(name, f"Coordinate over {transport}", did, ended,
                    bool(nonreaders) and evicted == len(nonreaders) and readers_evicted == 0,
                    rounds=rounds)]


async def attack_slow_consumers_grpc(ctx: Ctx) -> list[dict[str, Any]]:
    return await _slow_consumers(ctx, "grpc")


async def attack_slow_consumers_drpc(ctx: Ctx) -> list[dict[str, Any]]:
    return await _slow_consumers(ctx, "drpc")


# ---------------------------------------------------------------- huge request


async def _huge_request(ctx: Ctx, transport: str) -> list[dict[str, Any]]:
    c = ctx.cfg
    name = f"huge-request-{transport}"
    req = huge_rfh_request()
    size = req.ByteSize()
    texts: list[str] = []
    times: list[float] = []
    while ctx.left() > 6 and len(texts) < 12:
        t = time.perf_counter()
        if transport == "grpc":
            gp = GrpcPeer(c["grpc"], c["v2_token"])
            await gp.peer_id()
            p: GrpcPeer | DrpcPeer = gp
        else:
            p = await DrpcPeer.connect(f"{ctx.ws}/api/v2/tailnet?version={VERSION}", c["v2_token"])
        how = await p.write(req, 10.0)
        err, status = await p.finish(10.0)
        times.append(time.perf_counter() - t)
        texts.append(f"{err!r} / {status}" if how == "ok" else f"write {how}; {err!r} / {status}")
        await p.close()
        ctx.log(name, texts[-1][:100])
        await asyncio.sleep(3.0)
    ok = bool(texts) and all("max_ready_for_handshake" in t for t in texts)
    return [outcome(name, f"Coordinate over {transport}",
                    f"{len(texts)} × 1 request of {size / 1e6:.1f} MB "
                    f"(200,000 ready_for_handshake), every 3 s",
                    f"refused in {fmt(rnd(pct(times, 50), 2))} s (p50): " + summarize(texts, 1), ok,
                    refusal_s_p50=rnd(pct(times, 50), 3), refusal_s_max=rnd(max(times, default=None), 3))]


async def attack_huge_request_grpc(ctx: Ctx) -> list[dict[str, Any]]:
    return await _huge_request(ctx, "grpc")


async def attack_huge_request_drpc(ctx: Ctx) -> list[dict[str, Any]]:
    return await _huge_request(ctx, "drpc")


# ---------------------------------------------------------------- stream limits


async def attack_stream_limits_grpc(ctx: Ctx) -> list[dict[str, Any]]:
    """On ONE gRPC connection: 80 Coordinate streams of principal V3, then 64 of
    V4 (metadata per call): per-principal refusals and HTTP/2's stream cap.

    Each stream is classified by what the server sent, not by timing: an
    accepted stream gets its initial metadata with ``tailnet-peer-id``; a
    refused one ends with a status and no peer ID. V3's 80 streams fit in
    HTTP/2's 100 slots, so every one of them must be answered (the deadline
    only bounds a server that never answers: it is reported, with how long the
    answers took, so a slow server is told apart from a wrong one); V4's
    streams beyond the 100 slots never get one and are reported as waiting.
    """
    c = ctx.cfg
    rows = []
    rounds = 0
    summary: list[dict[str, Any]] = []
    while ctx.left() > 20 and rounds < 2:
        rounds += 1
        channel = grpc.aio.insecure_channel(c["grpc"], options=OWN_CONNECTION)
        stub = _stub(channel)
        calls = []
        answered: list[float] = []

        async def open_one(token: str, wait: float, t_open: float) -> str:
            call = stub.Coordinate(metadata=grpc_md(token))
            calls.append(call)
            try:
                md = await asyncio.wait_for(call.initial_metadata(), wait)
            except TimeoutError:
                return f"waiting (no stream slot within {wait:.0f} s)"
            except grpc.aio.AioRpcError as exc:
                answered.append(time.time() - t_open)
                return f"{exc.code().name}: {exc.details()}"
            answered.append(time.time() - t_open)
            if dict(md or {}).get("tailnet-peer-id"):
                return "accepted"
            # no peer ID: a refusal (trailers-only); its status is already here
            code = await asyncio.wait_for(call.code(), 5.0)
            return f"{code.name}: {await call.details()}"

        t3 = time.time()
        # bounded by the attack window, but long enough for a server stalled by the other attacks
        wait3 = max(5.0, min(30.0, ctx.left() - 12))
        res3 = await asyncio.gather(*(open_one(c["v3_token"], wait3, t3) for _ in range(80)))
        slow3 = max(answered, default=0.0)
        answered.clear()
        t4 = time.time()
        # the 28 beyond the 100 slots wait for good; the others get as long as V3's took
        wait4 = min(15.0, max(5.0, 2 * slow3))
        res4 = await asyncio.gather(*(open_one(c["v4_token"], wait4, t4) for _ in range(64)))
        summary.append({"v3": summarize(res3), "v4": summarize(res4),
                        "v3_answered_s_max": round(slow3, 2),
                        "v4_answered_s_max": round(max(answered, default=0.0), 2)})
        ctx.log("stream-limits-grpc", f"round {rounds}: {summary[-1]}")
        await asyncio.sleep(min(8.0, max(0.0, ctx.left() - 10)))
        for call in calls:
            call.cancel()
        await channel.close(None)
        await asyncio.sleep(1.0)
    if summary:
        first = summary[0]
        v3, v4 = first["v3"], first["v4"]
        ok = ("64× accepted" in v3 and "16× RESOURCE_EXHAUSTED" in v3
              and "max_peers_per_principal" in v3 and "waiting" in v4)
        rows.append(outcome(
            "stream-limits-grpc", "Coordinate, one gRPC connection",
            f"{rounds} rounds: 80 streams as user V3 + 64 as user V4 on one channel",
            f"V3: {v3} (all answered within {first['v3_answered_s_max']:.1f} s) | V4: {v4}",
            ok, rounds=summary))
    return rows


async def attack_stream_limits_drpc(ctx: Ctx) -> list[dict[str, Any]]:
    """On ONE WebSocket session: 80 StreamDERPMaps yamux streams (limit 64)."""
    from tailnet.rpc.tailnet_client import TailnetClient

    c = ctx.cfg
    from tailnet.rpc.websocket import DialError

    rounds: list[str] = []
    while ctx.left() > 12 and len(rounds) < 2:
        try:
            client = await TailnetClient.connect(
                f"{ctx.ws}/api/v2/tailnet?version={VERSION}", c["v6_token"])
        except DialError as exc:
            rounds.append(f"dial refused: {exc}")
            await asyncio.sleep(5.0)
            continue

        async def one() -> tuple[str, Any]:
            try:
                st = await client.stream_derp_maps()
                m = await asyncio.wait_for(st.recv(), 5.0)
                return ("accepted" if m is not None else "ended"), st
            except TimeoutError:
                return "no answer in 5 s", None
            except Exception as exc:  # noqa: BLE001
                return f"{type(exc).__name__}: {getattr(exc, 'message', exc)}", None

        res = await asyncio.gather(*(one() for _ in range(80)))
        rounds.append(summarize(r for r, _ in res))
        ctx.log("stream-limits-drpc", rounds[-1])
        await asyncio.sleep(min(8.0, max(0.0, ctx.left() - 8)))
        await client.close()
        await asyncio.sleep(1.0)
    ok = bool(rounds) and rounds[0].startswith("64× accepted")
    return [outcome("stream-limits-drpc", "yamux streams, one /api/v2/tailnet session",
                    f"{len(rounds)} rounds × 80 StreamDERPMaps streams",
                    rounds[0] if rounds else "not run", ok, rounds=rounds)]


# ---------------------------------------------------------------- churn


class Proxy:
    """A TCP relay in front of the server so a client connection can be dropped
    (RST to the server, no FIN, no goodbye) without the client library's help."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.server: asyncio.Server | None = None
        self.pairs: list[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = []

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._conn, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _conn(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            ur, uw = await asyncio.open_connection("127.0.0.1", self.port)
        except OSError:
            w.close()
            return
        pair = (w, uw)
        self.pairs.append(pair)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            with contextlib.suppress(Exception):
                dst.close()

        await asyncio.gather(pipe(r, uw), pipe(ur, w))
        with contextlib.suppress(ValueError):
            self.pairs.remove(pair)

    def drop_all(self) -> int:
        n = 0
        for w, uw in list(self.pairs):
            for x in (uw, w):
                sock = x.get_extra_info("socket")
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                x.transport.abort()
            n += 1
        self.pairs.clear()
        return n

    async def close(self) -> None:
        self.drop_all()
        if self.server is not None:
            self.server.close()


async def _churn(ctx: Ctx, transport: str) -> list[dict[str, Any]]:
    """Connect a client (bound to the attacker's reading agent Xc), tunnel, wait
    for the agent's NODE, then end it: graceful, dropped TCP, or cancelled."""
    c = ctx.cfg
    name = f"churn-{transport}"
    agent_id = uuid.UUID(c["xc_id"])
    grpc_port = int(c["grpc"].rsplit(":", 1)[1])
    proxy = Proxy(grpc_port if transport == "grpc" else ctx.port)
    pport = await proxy.start()
    modes = ("graceful", "dropped", "cancelled")
    done = {m: 0 for m in modes}
    problems: list[str] = []
    i = 0
    addr = host_prefix(addr_from_uuid(TAILSCALE_SERVICE_PREFIX, uuid.uuid4()))
    small = Req(update_self=Req.UpdateSelf(node=pb.Node(
        key=b"np" + bytes(range(32)), preferred_derp=999, addresses=[addr], allowed_ips=[addr])))
    tunnel = Req(add_tunnel=Req.Tunnel(id=agent_id.bytes))
    bye = Req(disconnect=Req.Disconnect())
    while ctx.left() > 3 and i < 600:
        mode = modes[i % 3]
        i += 1
        t_iter = time.time()
        try:
            if transport == "grpc":
                ch = grpc.aio.insecure_channel(f"127.0.0.1:{pport}", options=OWN_CONNECTION)
                call = _stub(ch).Coordinate(
                    metadata=grpc_md(c["v5_token"], tailnet_agent_id=str(agent_id)))
                await call.write(tunnel)
                await call.write(small)
                async with asyncio.timeout(10):
                    while True:
                        resp = await call.read()
                        if resp is grpc.aio.EOF:  # type: ignore[attr-defined]
                            raise ConnectionError("ended before the agent's NODE")
                        if any(u.kind == Kind.NODE and u.id == agent_id.bytes for u in resp.peer_updates):
                            break
                    if mode == "graceful":
                        await call.write(bye)
                        await call.done_writing()
                        while await call.read() is not grpc.aio.EOF:  # type: ignore[attr-defined]
                            pass
                        if await call.code() != grpc.StatusCode.OK:
                            problems.append(f"graceful end: {await call.code()}")
                    elif mode == "dropped":
                        proxy.drop_all()
                    else:
                        call.cancel()
                await ch.close(None)
            else:
                from tailnet.rpc.tailnet_client import TailnetClient

                cl = await TailnetClient.connect(
                    f"ws://127.0.0.1:{pport}/api/v2/workspaceagents/{agent_id}/coordinate"
                    f"?version={VERSION}", c["v5_token"])
                co = cl.coordinate()
                await co.send(tunnel)
                await co.send(small)
                async with asyncio.timeout(10):
                    while True:
                        resp = await co.recv()
                        if resp is None:
                            raise ConnectionError("ended before the agent's NODE")
                        if any(u.kind == Kind.NODE and u.id == agent_id.bytes for u in resp.peer_updates):
                            break
                    if mode == "graceful":
                        await co.send(bye)
                        while await co.recv() is not None:
                            pass
                        await cl.close()
                    elif mode == "dropped":
                        proxy.drop_all()
                        with contextlib.suppress(Exception):
                            await asyncio.wait_for(cl.close(), 2)
                    else:
                        await co.close()
                        await cl.close()
            done[mode] += 1
        except Exception as exc:  # noqa: BLE001
            text = (f"{exc.code().name} {exc.details()!r}" if isinstance(exc, grpc.aio.AioRpcError)
                    else f"{type(exc).__name__}: {exc}")
            problems.append(f"{mode}: {text}"[:160])
            proxy.drop_all()
        # at most ~4 iterations per second
        await asyncio.sleep(max(0.0, 0.25 - (time.time() - t_iter)))
    await proxy.close()
    total = sum(done.values())
    return [outcome(name, f"Coordinate over {transport}",
                    f"{i} connect/tunnel/NODE/end cycles: " + ", ".join(f"{done[m]} {m}" for m in modes),
                    f"{total} completed" + (f"; problems: {summarize(problems, 2)}" if problems else ""),
                    not problems, problems=problems[:10])]


async def attack_churn_grpc(ctx: Ctx) -> list[dict[str, Any]]:
    return await _churn(ctx, "grpc")


async def attack_churn_drpc(ctx: Ctx) -> list[dict[str, Any]]:
    return await _churn(ctx, "drpc")


async def _churn_agent(ctx: Ctx) -> None:
    """The churn target: agent Xc over gRPC, reading and acknowledging everything."""
    c = ctx.cfg
    agent_id = uuid.UUID(c["xc_id"])
    addr = host_prefix(addr_from_uuid(TAILSCALE_SERVICE_PREFIX, agent_id))
    p = GrpcPeer(c["grpc"], c["xc_token"])
    await p.peer_id()
    await p.call.write(Req(update_self=Req.UpdateSelf(node=pb.Node(
        key=b"np" + bytes(range(1, 33)), preferred_derp=999, addresses=[addr], allowed_ips=[addr]))))
    try:
        while True:
            resp = await p.call.read()
            if resp is grpc.aio.EOF:  # type: ignore[attr-defined]
                return
            acks = [Req.ReadyForHandshake(id=u.id) for u in resp.peer_updates if u.kind == Kind.NODE]
            if acks:
                await p.call.write(Req(ready_for_handshake=acks))
    finally:
        await p.close()


# ---------------------------------------------------------------- resume token theft


async def attack_resume_theft(ctx: Ctx) -> list[dict[str, Any]]:
    """V1's resume token presented by V2: gRPC and the HTTP upgrade."""
    from tailnet.rpc.tailnet_client import TailnetClient
    from tailnet.rpc.websocket import DialError

    c = ctx.cfg
    grpc_res: list[str] = []
    http_res: list[str] = []
    while ctx.left() > 4 and len(grpc_res) < 10:
        # gRPC: V1 coordinates, refreshes; V2 presents the token
        owner = GrpcPeer(c["grpc"], c["v1_token"])
        pid = await owner.peer_id()
        stub = _stub(owner.channel)
        tok = (await stub.RefreshResumeToken(
            pb.RefreshResumeTokenRequest(), metadata=grpc_md(c["v1_token"], tailnet_peer_id=str(pid)))).token
        thief = GrpcPeer(c["grpc"], c["v2_token"], tailnet_resume_token=tok)
        try:
            code = await asyncio.wait_for(thief.call.code(), 10)
            grpc_res.append(f"{code.name}: {await thief.call.details()}")
        except TimeoutError:
            grpc_res.append("accepted (!)")
        await thief.close()
        await owner.close()
        # Coder's transport: V1 gets a token over DRPC; V2 dials with it
        cl = await TailnetClient.connect(f"{ctx.ws}/api/v2/tailnet?version={VERSION}", c["v1_token"])
        tok = (await cl.refresh_resume_token()).token
        await cl.close()
        try:
            bad = await TailnetClient.connect(
                f"{ctx.ws}/api/v2/tailnet?version={VERSION}&resume_token={tok}", c["v2_token"])
            http_res.append("101 (!)")
            await bad.close()
        except DialError as exc:
            http_res.append(f"{exc.status} {exc.message} [{','.join(exc.validation_fields)}]")
        await asyncio.sleep(2.0)
    return [
        outcome("resume-theft", "gRPC Coordinate", f"{len(grpc_res)} × V1's token presented by V2",
                summarize(grpc_res), bool(grpc_res) and all(
                    r.startswith("UNAUTHENTICATED") and "different principal" in r for r in grpc_res)),
        outcome("resume-theft", "/api/v2/tailnet upgrade", f"{len(http_res)} × V1's token presented by V2",
                summarize(http_res), bool(http_res) and all(
                    r.startswith("401") and "resume_token" in r for r in http_res)),
    ]


# ---------------------------------------------------------------- HTTP front door


async def attack_keepalive_probe(ctx: Ctx) -> list[dict[str, Any]]:
    """A relay path, then an API path, on one keep-alive connection."""
    c = ctx.cfg
    pairs = [
        ("/derp/probe", "/api/v2/workspaceagents/connection"),
        ("/generate_204", "/healthz"),
    ]
    res: dict[tuple[str, str], list[str]] = {p: [] for p in pairs}
    n = 0
    while ctx.left() > 2 and n < 20:
        for first, second in pairs:
            r = await Raw.open(ctx.port)
            try:
                s1, _, _ = await http_exchange(
                    r, f"GET {first} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
                try:
                    s2, head, body = await http_exchange(
                        r, f"GET {second} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                           f"Coder-Session-Token: {c['v1_token']}\r\n\r\n".encode(), timeout=5.0)
                    server = next((ln.split(b":", 1)[1].strip().decode() for ln in head.split(b"\r\n")
                                   if ln.lower().startswith(b"server:")), "?")
                    res[(first, second)].append(f"{s1} then {s2} (Server: {server})")
                except (ConnectionError, TimeoutError) as exc:
                    res[(first, second)].append(f"{s1} then connection closed ({type(exc).__name__})")
            finally:
                r.close()
        n += 1
        await asyncio.sleep(2.0)
    rows = []
    for (first, second), texts in res.items():
        # Expected: the API answers the second request (200), or the connection
        # closes after the relay's response; never the relay's front door.
        ok = bool(texts) and all((" then 200 " in t and "tailnet-core-derp" not in t)
                                 or "closed" in t for t in texts)
        rows.append(outcome("keepalive-probe", f"{first} then {second}", f"{len(texts)} connections",
                            summarize(texts), ok))
    return rows


async def attack_http_pipeline(ctx: Ctx) -> list[dict[str, Any]]:
    """Pipelined requests on one keep-alive connection, never reading the
    responses, for up to 8 s: relay probes (/derp/probe) and API requests
    (/healthz). The server must stop reading (or close) instead of queueing
    responses nobody reads."""
    rows = []
    for path in ("/derp/probe", "/healthz"):
        req = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
        r = await Raw.open(ctx.port, rcvbuf=4096)
        t_start = time.time()
        sent, how = await r.push(req, limit=512 << 20, stall=2.0, until=min(ctx.deadline, time.time() + 8))
        dt = time.time() - t_start
        ctx.log("http-pipeline", f"{path}: {sent} bytes, {how}")
        closed = r.peer_closed()
        r.close(rst=True)
        ended = (f"{'server stopped reading' if how == 'stalled' else how} after {sent / 1e6:.1f} MB "
                 f"({sent // len(req)} requests, {dt:.1f} s)" + ("; closed" if closed else ""))
        rows.append(outcome("http-pipeline", f"{path} pipelined, never reading",
                            "one keep-alive connection, requests as fast as the socket takes them",
                            ended, how in ("stalled", "closed")))
        await asyncio.sleep(2.0)
    return rows


async def attack_slowloris(ctx: Ctx) -> list[dict[str, Any]]:
    """8 connections dribbling a request head (1 byte/s) and 4 dribbling a DERP
    ClientInfo after the upgrade; each is reopened when the server closes it."""
    lives: dict[str, list[float]] = {"http": [], "derp": []}
    still_open: dict[str, int] = {"http": 0, "derp": 0}

    async def one(kind: str) -> None:
        while ctx.left() > 1:
            r = await Raw.open(ctx.port)
            t_open = time.time()
            if kind == "http":
                await r.send_all(b"GET /derp HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
            else:
                await r.send_all(b"GET /derp HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                 b"Upgrade: DERP\r\nConnection: Upgrade\r\n\r\n")
                _, rest = await r.read_until(b"\r\n\r\n", 10)
                await r.read_exactly(HEADER_LEN + 40, rest, 10)
                await r.send_all(encode_header(FrameType.CLIENT_INFO, 200))
            closed = False
            while ctx.left() > 0:
                if r.peer_closed() or await r.send_all(b"a", timeout=1.0) != "ok":
                    closed = True
                    break
                await asyncio.sleep(1.0)
            if closed:
                lives[kind].append(time.time() - t_open)
            else:
                still_open[kind] += 1
            r.close()

    await asyncio.gather(*([one("http") for _ in range(8)] + [one("derp") for _ in range(4)]),
                         return_exceptions=True)
    rows = []
    for kind, what in (("http", "request head, 1 byte/s (8 at a time)"),
                       ("derp", "DERP ClientInfo after the upgrade, 1 byte/s (4 at a time)")):
        ls = lives[kind]
        ended = (f"{len(ls)} closed by the server after {min(ls):.1f}–{max(ls):.1f} s"
                 if ls else "none closed") + (f"; {still_open[kind]} open at the end (younger)"
                                              if still_open[kind] else "")
        rows.append(outcome(f"slowloris-{kind}", "API port (/derp)", what, ended,
                            bool(ls) and max(ls) < 15, lifetimes=[round(x, 1) for x in ls]))
    return rows


# ---------------------------------------------------------------- DERP


async def derp_raw_login(port: int, key: PrivateKey, *, rcvbuf: int | None = None,
                         info: bytes | None = None, wait_info: bool = True) -> tuple[Raw, bytes]:
    """Upgrade /derp, read ServerKey, send ClientInfo (``info`` as the JSON), and
    (``wait_info``) read ServerInfo. Returns (connection, unread bytes)."""
    r = await Raw.open(port, rcvbuf=rcvbuf)
    await r.send_all(b"GET /derp HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: DERP\r\n"
                     b"Connection: Upgrade\r\n\r\n")
    head, rest = await r.read_until(b"\r\n\r\n", 10)
    if not head.startswith(b"HTTP/1.1 101"):
        r.close()
        raise ConnectionError(f"DERP upgrade refused: {head[:60]!r}")
    frame, rest = await r.read_exactly(HEADER_LEN + 40, rest, 10)
    server_key = frame[HEADER_LEN + 8 :]
    body = info if info is not None else b'{"version":2,"CanAckPings":true}'
    await r.send_all(encode_client_info(key.public.raw, seal(key, server_key, body)))
    if wait_info:
        hdr, rest = await r.read_exactly(HEADER_LEN, rest, 10)
        ftype, n = struct.unpack(">BI", hdr)
        if ftype != FrameType.SERVER_INFO:
            raise ConnectionError(f"expected ServerInfo, got frame type {ftype}")
        _, rest = await r.read_exactly(n, rest, 10)
    return r, rest


async def attack_derp_nonreader(ctx: Ctx) -> list[dict[str, Any]]:
    """A receiver R that never reads; a DerpClient S floods it with 1400-byte
    packets (at most ~20,000/s, until R is dropped or 8 s). R first sends S one
    packet, so S is owed PeerGone(R) when the relay drops R. A new pair every 15 s."""
    rounds: list[str] = []
    sent_total = 0
    dropped = 0
    while ctx.left() > 12 and len(rounds) < 4:
        t_round = time.time()
        rkey = PrivateKey.generate()
        r, _ = await derp_raw_login(ctx.port, rkey, rcvbuf=4096)
        sender = DerpClient(ctx.cfg["derp_url"], PrivateKey.generate())
        await sender.connect()
        gone = asyncio.Event()
        got_hello = asyncio.Event()

        async def watch() -> None:
            with contextlib.suppress(Exception):
                async for ev in sender:
                    if isinstance(ev, PacketReceived) and ev.src.raw == rkey.public.raw:
                        got_hello.set()
                    if isinstance(ev, PeerGoneReceived) and ev.peer.raw == rkey.public.raw:
                        gone.set()

        w = asyncio.ensure_future(watch())
        await r.send_all(encode_send_packet(sender.public_key.raw, b"hello"))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(got_hello.wait(), 5.0)
        pkt = b"x" * 1400
        n = 0
        t_flood = time.time()
        while not gone.is_set() and time.time() - t_flood < 8.0:
            for _ in range(200):
                sender.send_nowait(rkey.public, pkt)
            n += 200
            await sender.drain()
            await asyncio.sleep(0.01)
        sent_total += n
        t_gone = time.time() - t_flood if gone.is_set() else None
        data, end = await r.drain(timeout=5.0, idle=1.0)
        dropped += t_gone is not None and end in ("eof", "reset")
        rounds.append(f"{n} packets; " + (f"PeerGone(R) after {t_gone:.1f} s" if t_gone is not None
                                           else "no PeerGone(R)")
                      + f"; R then read {len(data) / 1e6:.1f} MB and {end}")
        ctx.log("derp-nonreader", rounds[-1])
        w.cancel()
        await sender.close()
        r.close()
        await asyncio.sleep(max(0.0, 15.0 - (time.time() - t_round)))
    return [outcome("derp-nonreader", "embedded relay (/derp)",
                    f"{len(rounds)} rounds, {sent_total} packets of 1400 B at a receiver that never reads",
                    f"receiver dropped in {dropped}/{len(rounds)} rounds: " + summarize(rounds, 2),
                    bool(rounds) and dropped == len(rounds), rounds=rounds)]


async def _derp_ws_login(ctx: Ctx) -> Raw:
    """DERP over WebSocket (subprotocol ``derp``): upgrade, ServerKey, ClientInfo."""
    key = PrivateKey.generate()
    r, rest = await ws_open(ctx.port, "/derp", None, rcvbuf=4096, subprotocol="derp")
    buf = rest
    payload = b""
    while len(payload) < HEADER_LEN + 40:
        frames, buf = ws_parse(buf)
        for op, data in frames:
            if op == WS_BINARY:
                payload += data
        if len(payload) < HEADER_LEN + 40:
            chunk = await r.recv_some(10)
            if not chunk:
                raise ConnectionError("no ServerKey over WebSocket")
            buf += chunk
    server_key = payload[HEADER_LEN + 8 : HEADER_LEN + 40]
    ci = encode_client_info(key.public.raw, seal(key, server_key, b'{"version":2}'))
    await r.send_all(ws_frame(WS_BINARY, ci))
    await asyncio.sleep(0.5)
    return r


async def attack_derp_ws_ping_flood(ctx: Ctx) -> list[dict[str, Any]]:
    """DERP over WebSocket: log in, then flood WebSocket pings and never read."""
    r = await _derp_ws_login(ctx)
    row = await _ws_flood_tail(ctx, r, "derp-ws-ping-flood", ws_frame(WS_PING, b"q" * 125))
    row["target"] = "/derp over WebSocket (logged in)"
    return [row]


async def attack_derp_ws_tiny_frames(ctx: Ctx) -> list[dict[str, Any]]:
    """DERP over WebSocket: log in, then one WebSocket message per byte of a
    stream of NotePreferred frames, for 5 s, never reading; again every 15 s."""
    note = encode_frame(FrameType.NOTE_PREFERRED, b"\x01") + encode_frame(FrameType.NOTE_PREFERRED, b"\x00")
    frames = b"".join(ws_frame(WS_BINARY, note[i : i + 1]) for i in range(len(note)))
    res: list[str] = []
    while ctx.left() > 8 and len(res) < 4:
        t_round = time.time()
        r = await _derp_ws_login(ctx)
        sent, how = await r.push(frames, limit=1 << 30, stall=2.0, until=min(ctx.deadline, time.time() + 5))
        res.append(f"{sent / 1e6:.0f} MB ({how}), then {'closed' if r.peer_closed() else 'open'}")
        ctx.log("derp-ws-tiny-frames", res[-1])
        r.close(rst=True)
        await asyncio.sleep(max(0.0, 15.0 - (time.time() - t_round)))
    return [outcome("derp-ws-tiny-frames", "/derp over WebSocket (logged in)",
                    f"{len(res)} connections × 5 s of one-byte WebSocket messages", summarize(res, 2),
                    None)]


async def _ws_flood_tail(ctx: Ctx, r: Raw, name: str, frame: bytes) -> dict[str, Any]:
    t_open = ctx.rel()
    sent, how = await r.push(frame, limit=256 << 20, stall=2.0, until=ctx.deadline)
    stalled_at = ctx.rel()
    closed_at = None
    while ctx.left() > 0:
        if r.peer_closed():
            closed_at = ctx.rel()
            break
        await asyncio.sleep(0.5)
    data, end = await r.drain(timeout=3.0, idle=0.5)
    frames, _ = ws_parse(data)
    close = ws_close_of(frames)
    r.close()
    did = (f"{sent / 1e6:.1f} MB of pings until the server stopped reading ({stalled_at - t_open:.1f} s)"
           if how == "stalled" else f"{sent / 1e6:.1f} MB of pings ({how})")
    ended = (f"closed at {closed_at:.0f} s: {close or end}" if closed_at is not None
             else f"throttled, still open at the end ({close or 'no close frame'})")
    return outcome(name, "", did, ended, how in ("stalled", "closed"), bytes_sent=sent, end=end)


async def attack_derp_nested_clientinfo(ctx: Ctx) -> list[dict[str, Any]]:
    """ClientInfo whose JSON is 60,000 nested arrays (120 KB, under the 256 KiB cap)."""
    nested = b"[" * 60000 + b"]" * 60000
    res: list[str] = []
    while ctx.left() > 3 and len(res) < 20:
        t = time.time()
        r, _ = await derp_raw_login(ctx.port, PrivateKey.generate(), info=nested, wait_info=False)
        data, end = await r.drain(timeout=10.0, idle=10.0)
        res.append(f"{'closed' if end in ('eof', 'reset') else 'still open'} ({end})")
        ctx.log("derp-nested-clientinfo", f"{res[-1]} after {time.time() - t:.2f} s")
        r.close()
        await asyncio.sleep(2.0)
    return [outcome("derp-nested-clientinfo", "embedded relay (/derp)",
                    f"{len(res)} handshakes with 60,000-deep JSON", summarize(res),
                    bool(res) and all(x.startswith("closed") for x in res))]


async def attack_derp_malformed(ctx: Ctx) -> list[dict[str, Any]]:
    """Bad frames after a good login; an unknown frame type must be skipped."""
    dst = PrivateKey.generate().public.raw
    variants: list[tuple[str, bytes, bool]] = [
        ("SendPacket claiming 2 GiB", encode_header(FrameType.SEND_PACKET, 0x7FFFFFFF), True),
        ("SendPacket shorter than a key", encode_frame(FrameType.SEND_PACKET, b"short"), True),
        ("SendPacket over 64 KiB", encode_header(FrameType.SEND_PACKET, 32 + 65537)
         + dst + b"z" * 65537, True),
        ("ClientInfo after login (skipped, then Ping)", encode_frame(FrameType.CLIENT_INFO, b"\1" * 80)
         + encode_ping(b"12345678"), False),
        ("unknown type 0x7e (skipped, then Ping)", encode_frame(0x7E, b"?" * 100)
         + encode_ping(b"12345678"), False),
    ]
    res: dict[str, list[str]] = {v[0]: [] for v in variants}
    i = 0
    while ctx.left() > 3 and i < 40:
        label, data, should_close = variants[i % len(variants)]
        i += 1
        r, rest = await derp_raw_login(ctx.port, PrivateKey.generate())
        t = time.time()
        await r.send_all(data)
        if should_close:
            got, end = await r.drain(timeout=5.0, idle=5.0)
            res[label].append(f"closed in {1000 * (time.time() - t):.0f} ms" if end in ("eof", "reset")
                              else f"still open ({end})")
        else:
            got, end = await r.drain(timeout=2.0, idle=0.5)
            buf = rest + got
            pong = False
            while len(buf) >= HEADER_LEN:
                ftype, n = struct.unpack(">BI", buf[:HEADER_LEN])
                if ftype == FrameType.PONG and buf[HEADER_LEN : HEADER_LEN + n] == b"12345678":
                    pong = True
                buf = buf[HEADER_LEN + n :]
            res[label].append("answered the Ping" if pong else f"no Pong ({end})")
        r.close()
        await asyncio.sleep(1.0)
    rows = []
    for label, _, should_close in variants:
        texts = res[label]
        ok = bool(texts) and all(t.startswith("closed") if should_close else t == "answered the Ping"
                                 for t in texts)
        rows.append(outcome("derp-malformed", label, f"{len(texts)} connections", summarize(texts), ok))
    return rows


async def attack_derp_tiny_frames(ctx: Ctx) -> list[dict[str, Any]]:
    """After login, NotePreferred frames (6 bytes each) as fast as the socket
    takes them for 5 s, never reading; a new connection every 15 s. Each read
    the relay makes holds tens of thousands of frames."""
    frame = encode_frame(FrameType.NOTE_PREFERRED, b"\x01") + encode_frame(FrameType.NOTE_PREFERRED, b"\x00")
    res: list[str] = []
    total = 0
    while ctx.left() > 8 and len(res) < 4:
        t_round = time.time()
        r, _ = await derp_raw_login(ctx.port, PrivateKey.generate(), rcvbuf=4096)
        sent, how = await r.push(frame, limit=1 << 30, stall=2.0, until=min(ctx.deadline, time.time() + 5))
        total += sent
        res.append(f"{sent / 1e6:.0f} MB ({how}), then {'closed' if r.peer_closed() else 'open'}")
        ctx.log("derp-tiny-frames", res[-1])
        r.close(rst=True)
        await asyncio.sleep(max(0.0, 15.0 - (time.time() - t_round)))
    return [outcome("derp-tiny-frames", "embedded relay (/derp)",
                    f"{len(res)} connections × 5 s of NotePreferred frames ({total / 6e6:.1f} M frames)",
                    summarize(res, 2), None)]


# ---------------------------------------------------------------- runner

ATTACKS: dict[str, tuple[str, Callable[[Ctx], Awaitable[list[dict[str, Any]]]]]] = {
    "ws-ping-flood": ("api", attack_ws_ping_flood),
    "ws-big-messages": ("api", attack_ws_big_messages),
    "ws-tiny-messages": ("api", attack_ws_tiny_messages),
    "yamux-ping-flood": ("api", attack_yamux_ping_flood),
    "slow-consumers-grpc": ("api", attack_slow_consumers_grpc),
    "slow-consumers-drpc": ("api", attack_slow_consumers_drpc),
    "huge-request-grpc": ("api", attack_huge_request_grpc),
    "huge-request-drpc": ("api", attack_huge_request_drpc),
    "stream-limits-grpc": ("api", attack_stream_limits_grpc),
    "stream-limits-drpc": ("api", attack_stream_limits_drpc),
    "churn-grpc": ("api", attack_churn_grpc),
    "churn-drpc": ("api", attack_churn_drpc),
    "resume-theft": ("api", attack_resume_theft),
    "keepalive-probe": ("derp", attack_keepalive_probe),
    "slowloris": ("derp", attack_slowloris),
    "http-pipeline": ("derp", attack_http_pipeline),
    "derp-nonreader": ("derp", attack_derp_nonreader),
    "derp-ws-ping-flood": ("derp", attack_derp_ws_ping_flood),
    "derp-ws-tiny-frames": ("derp", attack_derp_ws_tiny_frames),
    "derp-nested-clientinfo": ("derp", attack_derp_nested_clientinfo),
    "derp-malformed": ("derp", attack_derp_malformed),
    "derp-tiny-frames": ("derp", attack_derp_tiny_frames),
}


async def attackers_main(cfg: dict[str, Any]) -> None:
    """Run this group's attacks at once until ``cfg['deadline']``; print the rows."""
    ctx = Ctx(cfg, float(cfg["t0"]), float(cfg["deadline"]))
    names = [n for n in cfg["attacks"] if ATTACKS[n][0] == cfg["group"]]
    helper = (asyncio.ensure_future(_churn_agent(ctx))
              if any(n.startswith("churn") for n in names) else None)
    if helper is not None:
        await asyncio.sleep(1.0)
    emit({"ready": True})
    await asyncio.sleep(max(0.0, ctx.t0 - time.time()))

    async def run(name: str) -> list[dict[str, Any]]:
        try:
            # every attack ends by itself before the deadline; this is a backstop
            return await asyncio.wait_for(ATTACKS[name][1](ctx), ctx.left() + 30)
        except Exception as exc:  # noqa: BLE001 - report, never crash the group
            return [outcome(name, "?", "crashed", f"{type(exc).__name__}: {exc}"[:200], False)]

    results = await asyncio.gather(*(run(n) for n in names))
    if helper is not None:
        helper.cancel()
        await asyncio.gather(helper, return_exceptions=True)
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    emit({"rows": [row for rows in results for row in rows], "events": ctx.events,
          "cpu_s": ru.ru_utime + ru.ru_stime})


# =========================================================================== orchestrator

CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_cpu(pid: int) -> float:
    """User + system CPU seconds of ``pid`` (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine."""
    vals = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = vals[3] + vals[4]
    total = sum(vals[:8])
    return (total - idle) / CLK_TCK, total / CLK_TCK


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def rss_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) in MB (10^6 bytes)."""
    rss = hwm = 0.0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) * 1024 / 1e6
        elif line.startswith("VmHWM:"):
            hwm = int(line.split()[1]) * 1024 / 1e6
    return rss, hwm


class Child:
    """A child process speaking JSON lines (this script with ``--role``)."""

    def __init__(self, proc: asyncio.subprocess.Process, name: str, log: Path) -> None:
        self.proc = proc
        self.name = name
        self.log = log

    @classmethod
    async def start(cls, name: str, role: str, cfg: dict[str, Any], tmp: Path) -> Child:
        path = tmp / f"{name}.json"
        path.write_text(json.dumps(cfg))
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(Path(__file__).resolve()), "--role", role, "--config", str(path),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=open(tmp / f"{name}.log", "wb"),  # noqa: SIM115 - closed with the process
            cwd=ROOT,
        )
        return cls(proc, name, tmp / f"{name}.log")

    async def line(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        while True:
            raw = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
            if not raw:
                tail = self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""
                raise RuntimeError(f"{self.name} exited (code {await self.proc.wait()}):\n{tail}")
            try:
                doc = json.loads(raw)
            except ValueError:
                continue  # stray print from a library
            if isinstance(doc, dict):
                return doc

    def send(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text.encode() + b"\n")

    async def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
        await self.proc.wait()


async def start_server(tmp: Path) -> tuple[asyncio.subprocess.Process, dict[str, str]]:
    exe = Path(sys.executable).parent / "tailnet"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "tailnet"]
    proc = await asyncio.create_subprocess_exec(
        *cmd, "serve", "--http-addr", "127.0.0.1:0", "--grpc-addr", "127.0.0.1:0",
        "--stun-addr", "127.0.0.1:0", "--data-dir", str(tmp / "data"), "--log-level", "INFO",
        stdout=asyncio.subprocess.PIPE, stderr=open(tmp / "server.log", "wb"),  # noqa: SIM115
        cwd=ROOT,
    )
    assert proc.stdout is not None
    banner: dict[str, str] = {}
    while True:
        line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
        if not line:
            raise RuntimeError(f"tailnet serve exited before its banner; see {tmp / 'server.log'}")
        key, sep, value = line.strip().partition(":")
        if sep:
            banner[key.strip()] = value.strip()
        if line.strip().startswith("try:"):
            return proc, banner


def mint_tokens(data_dir: Path) -> dict[str, str]:
    """Users and agents for the run, minted into the server's data dir exactly as
    ``tailnet token create --data-dir`` does (the running server reloads them)."""
    from tailnet.config import StackConfig
    from tailnet.stack import TailnetStack

    st = TailnetStack(StackConfig(data_dir=data_dir))
    st.prepare_data_dir()
    out: dict[str, str] = {}
    uid, out["user_token"] = st.create_user(name="healthy-user")
    a = st.create_agent(uid, name="healthy-agent")
    out["agent_id"], out["agent_token"] = str(a.agent_id), a.token
    v1, out["v1_token"] = st.create_user(name="attacker-v1")
    for k in ("xg", "xd", "xw"):  # agents of V1: gRPC / DRPC slow consumers, WebSocket floods
        x = st.create_agent(v1, name=f"attacker-{k}")
        out[f"{k}_id"], out[f"{k}_token"] = str(x.agent_id), x.token
    for k in ("v2", "v3", "v4", "v6"):
        _, out[f"{k}_token"] = st.create_user(name=f"attacker-{k}")
    v5, out["v5_token"] = st.create_user(name="attacker-v5")
    xc = st.create_agent(v5, name="attacker-xc")  # the churn target (reads everything)
    out["xc_id"], out["xc_token"] = str(xc.agent_id), xc.token
    return out


def fd_count(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


def http_get_json(url: str, token: str) -> Any:
    req = urllib.request.Request(url, headers={"Coder-Session-Token": token,
                                               "Accept": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def scan_log(path: Path) -> dict[str, Any]:
    """Counts of the server log's WARNING/ERROR lines and tracebacks, top messages."""
    text = path.read_text(errors="replace") if path.exists() else ""
    lines = text.splitlines()
    levels = {"WARNING": 0, "ERROR": 0, "CRITICAL": 0}
    msgs: dict[str, int] = {}
    for ln in lines:
        parts = ln.split(" ", 4)
        if len(parts) >= 5 and parts[2] in levels:
            levels[parts[2]] += 1
            m = parts[4][:110]
            key = f"{parts[2]} {parts[3]} {m}"
            msgs[key] = msgs.get(key, 0) + 1
    tracebacks = sum(1 for ln in lines if ln.startswith("Traceback"))
    excs: dict[str, int] = {}
    for i, ln in enumerate(lines):
        if ln.startswith("Traceback"):
            j = i + 1
            while j < len(lines) and (lines[j].startswith(" ") or lines[j].startswith("Traceback")):
                j += 1
            if j < len(lines):
                excs[lines[j][:110]] = excs.get(lines[j][:110], 0) + 1
    return {
        "lines": len(lines), "warnings": levels["WARNING"],
        "errors": levels["ERROR"] + levels["CRITICAL"], "tracebacks": tracebacks,
        "top": sorted(msgs.items(), key=lambda kv: -kv[1])[:8],
        "exceptions": sorted(excs.items(), key=lambda kv: -kv[1])[:5],
    }


async def run_once(args: argparse.Namespace, run_no: int) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="soak-"))
    load_start = loadavg()
    server, banner = await start_server(tmp)
    spid = server.pid
    children: list[Child] = []
    try:
        api = banner["API"]
        admin = banner["admin token"]
        derp_url = banner["DERP relay"].split()[0]
        tokens = await asyncio.to_thread(mint_tokens, tmp / "data")
        base = {"api": api, "grpc": banner["gRPC"], "derp_url": derp_url, **tokens}
        healthy = await Child.start("healthy", "healthy",
                                    {**base, "rate": args.rate, "derp_rate": args.derp_rate}, tmp)
        children.append(healthy)
        ready = await healthy.line(60)
        if not ready.get("ready"):
            raise RuntimeError(f"healthy pair not ready: {ready}")
        await asyncio.sleep(args.warmup)

        attacks = [n for n in ATTACKS if (not args.attacks or n in args.attacks)
                   and n not in (args.skip or [])]
        groups = sorted({ATTACKS[n][0] for n in attacks})
        t0 = time.time() + 3.0  # attackers connect their helpers first, then start together
        deadline = t0 + args.seconds
        att: list[Child] = []
        for g in groups:
            ch = await Child.start(f"attack-{g}", "attack",
                                   {**base, "group": g, "attacks": attacks, "t0": t0,
                                    "deadline": deadline}, tmp)
            children.append(ch)
            att.append(ch)
        for ch in att:
            await ch.line(60)
        await asyncio.sleep(max(0.0, t0 - time.time()))

        # measured window starts: RSS before, loop monitor reset, CPU counters
        rss_before, _ = rss_mb(spid)
        fds_before = fd_count(spid)
        await asyncio.to_thread(http_get_json, f"{api}/api/v2/debug/loop?reset=1", admin)
        cpu0 = {"server": proc_cpu(spid), "healthy": proc_cpu(healthy.proc.pid),
                "attackers": sum(proc_cpu(c.proc.pid) for c in att)}
        m0 = machine_cpu()
        rss_max = rss_before
        rss_series: list[tuple[float, float]] = []
        # per second: (t, server's max stall ms, server CPU ms, this process's own loop lag ms)
        loop_series: list[tuple[float, float, float, float]] = []
        control = LoopLag()
        control.start()
        cpu_prev = proc_cpu(spid)
        loop_total = {"samples": 0, "over_50": 0, "over_250": 0, "max": 0.0}
        results: list[dict[str, Any]] = []
        pending = [asyncio.ensure_future(c.line(args.seconds + 120)) for c in att]
        next_loop = time.time() + 1.0
        while True:
            now = time.time()
            rss, _ = rss_mb(spid)
            rss_max = max(rss_max, rss)
            if not rss_series or now - t0 - rss_series[-1][0] >= 1.0:
                rss_series.append((round(now - t0, 1), round(rss, 1)))
            if now >= next_loop:
                st = await asyncio.to_thread(http_get_json, f"{api}/api/v2/debug/loop?reset=1", admin)
                cpu_now = proc_cpu(spid)
                loop_series.append((round(now - t0, 1), st["max_stall_ms"],
                                    round((cpu_now - cpu_prev) * 1000), round(control.take() * 1000, 1)))
                cpu_prev = cpu_now
                loop_total["samples"] += st["samples"]
                loop_total["over_50"] += st["stalls_over_50ms"]
                loop_total["over_250"] += st["stalls_over_250ms"]
                loop_total["max"] = max(loop_total["max"], st["max_stall_ms"])
                next_loop = now + 1.0
            if all(p.done() for p in pending):
                break
            await asyncio.sleep(0.25)
        t_attack_end = time.time()
        control.stop()
        for p in pending:
            results.append(p.result())
        st = await asyncio.to_thread(http_get_json, f"{api}/api/v2/debug/loop?reset=1", admin)
        loop_total["max"] = max(loop_total["max"], st["max_stall_ms"])
        loop_total["over_50"] += st["stalls_over_50ms"]
        loop_total["over_250"] += st["stalls_over_250ms"]
        cpu1 = {"server": proc_cpu(spid), "healthy": proc_cpu(healthy.proc.pid),
                "attackers": sum(float(d.get("cpu_s", 0.0)) for d in results)}
        m1 = machine_cpu()
        # settle: attackers are gone, the healthy pair keeps working
        t_settle = time.time() + args.settle
        while time.time() < t_settle:
            rss, _ = rss_mb(spid)
            rss_max = max(rss_max, rss)
            await asyncio.sleep(0.25)
        rss_after, hwm = rss_mb(spid)
        fds_after = fd_count(spid)
        coord = await asyncio.to_thread(http_get_json, f"{api}/api/v2/debug/coordinator", admin)
        t1 = time.time()
        healthy.send(f"stop {t0} {t1}")
        h = await healthy.line(60)
        load_end = loadavg()
    finally:
        for c in children:
            await c.kill()
        if server.returncode is None:
            server.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(server.wait(), 30)
            except TimeoutError:
                server.kill()
                await server.wait()
    log = scan_log(tmp / "server.log")
    wall = t_attack_end - t0
    busy = m1[0] - m0[0]
    cpu = {k: round(100 * (cpu1[k] - cpu0[k]) / wall, 1) for k in cpu0}
    cpu["other"] = round(max(0.0, 100 * busy / wall - sum(cpu.values())), 1)
    rows = [r for doc in results for r in doc.get("rows", [])]
    # What the attackers cannot see: did anything they sent make the server log
    # an error (a traceback is a bug: bad input must end with a logged reason)?
    exc_text = "; ".join(f"{n}× {m}" for m, n in log["exceptions"][:2])
    rows.append(outcome(
        "server-log", "tailnet serve stderr", "all of the above",
        f"{log['errors']} ERROR lines, {log['tracebacks']} tracebacks"
        + (f" ({exc_text})" if exc_text else ""), log["errors"] == 0 and log["tracebacks"] == 0))
    events = sorted(e for doc in results for e in doc.get("events", []))
    fan = h["fanout"]
    derp = h["derp"]
    lost = sum(fan[d]["lost"] + fan[d]["duplicates"] + fan[d]["misordered"] + fan[d]["corrupt"]
               + fan[d]["wrong_source"] for d in ("agent_to_client", "client_to_agent"))
    lost += sum(derp[d]["lost"] + derp[d]["duplicates"] + derp[d]["misordered"] + derp[d]["corrupt"]
                + derp[d]["wrong_source"] for d in ("a_to_b", "b_to_a", "echo_to_a", "echo_to_b"))
    lost += sum(h["reconnects"].values())
    worst_fan = max((fan[d]["worst_10s_p99_ms"] or 0.0) for d in ("agent_to_client", "client_to_agent"))
    doc = {
        "run": run_no,
        "seconds": args.seconds,
        "attacks": attacks,
        "server": {
            "pid": spid,
            "rss_before_mb": round(rss_before, 1), "rss_max_mb": round(rss_max, 1),
            "rss_after_mb": round(rss_after, 1), "vm_hwm_mb": round(hwm, 1),
            "growth_max_mb": round(rss_max - rss_before, 1),
            "growth_after_mb": round(rss_after - rss_before, 1),
            "rss_series": rss_series,
            "fds_before": fds_before, "fds_after": fds_after,
            # only the healthy pair should be left: 2 peers, 1 tunnel
            "coordinator_after": {"peers": len(coord["peers"]), "tunnels": len(coord["tunnels"]),
                                  "names": sorted(p["name"] for p in coord["peers"])},
        },
        "loop": {"max_stall_ms": round(loop_total["max"], 1),
                 "stalls_over_50ms": loop_total["over_50"], "stalls_over_250ms": loop_total["over_250"],
                 "samples": loop_total["samples"],
                 "control_lag_max_ms": round(max((x[3] for x in loop_series), default=0.0), 1),
                 "worst_seconds": sorted(loop_series, key=lambda x: -x[1])[:8],
                 "timeline": loop_series},
        "healthy": h,
        "healthy_bad_items": lost,
        "attackers": rows,
        "events": events[:400],
        "server_log": log,
        "conditions": {
            "loadavg_before": load_start, "loadavg_after": load_end,
            "cpu_pct_during_attacks": cpu,
            "cpus": os.cpu_count(),
        },
        "verdict": {
            "rss_growth_le_64mb": rss_max - rss_before <= TARGET_RSS_MB,
            "no_stall_over_50ms": loop_total["max"] <= TARGET_STALL_MS,
            "fanout_p99_lt_50ms_every_10s": worst_fan < TARGET_FANOUT_P99_MS,
            "nothing_lost": lost == 0,
        },
        "tmp": str(tmp),
    }
    if not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    return doc


def static_conditions() -> dict[str, Any]:
    import google.protobuf
    import websockets

    from tailnet.tuning import DEFAULT_GC_THRESHOLDS

    return {
        "python": platform.python_version(), "uvloop": getattr(uvloop, "__version__", "?"),
        "grpcio": grpc.__version__, "protobuf": google.protobuf.__version__,
        "websockets": getattr(websockets, "__version__", "?"), "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "server_gc": (f"tailnet serve default: gc.freeze() after startup, thresholds "
                      f"{','.join(map(str, DEFAULT_GC_THRESHOLDS))}"),
        "server_loop": "uvloop (tailnet serve)",
    }


def fmt(x: Any, unit: str = "") -> str:
    return "—" if x is None else f"{x}{unit}"


def render(runs: list[dict[str, Any]], cond: dict[str, Any]) -> str:
    out: list[str] = []
    med = medians(runs)
    out.append(f"## Soak: {len(runs)} run(s) × {runs[0]['seconds']} s of attacks\n")
    out.append("| metric | " + " | ".join(f"run {r['run']}" for r in runs)
               + (" | median" if len(runs) > 1 else "") + " | target |")
    out.append("|---|" + "---:|" * len(runs) + ("---:|" if len(runs) > 1 else "") + "---|")
    for label, key, target in METRICS:
        vals = [key(r) for r in runs]
        cells = [fmt(v) for v in vals]
        if len(runs) > 1:
            cells.append(fmt(med.get(label)))
        out.append(f"| {label} | " + " | ".join(cells) + f" | {target} |")
    out.append("")
    last = runs[-1]
    out.append(f"Attackers (run {last['run']}): what each did and what it ended with "
               "(✔ expected bounded outcome, ✘ not, · informational)\n")
    out.append("| attack | target | did | ended with | |")
    out.append("|---|---|---|---|---|")
    for r in last["attackers"]:
        mark = "·" if r["ok"] is None else ("✔" if r["ok"] else "✘")
        out.append(f"| {r['attack']} | {r['target']} | {r['did']} | {r['ended']} | {mark} |")
    if len(runs) > 1:
        bad: dict[str, list[int]] = {}
        for run in runs:
            for r in run["attackers"]:
                if r["ok"] is False:
                    bad.setdefault(f"{r['attack']} / {r['target']}", []).append(run["run"])
        if bad:
            out.append("\nNot as expected in: " + "; ".join(f"{k} (runs {v})" for k, v in bad.items()))
    out.append("")
    for r in runs:
        ws = ", ".join(f"{t:.0f} s: {stall:.0f} ms (server CPU {cpu:.0f} ms, control {lag:.0f} ms)"
                       for t, stall, cpu, lag in r["loop"]["worst_seconds"][:4])
        out.append(f"Run {r['run']} worst seconds (server stall; server CPU used in that second; "
                   f"this process's own loop lag): {ws}")
    out.append("")
    log = last["server_log"]
    out.append(f"Server log (run {last['run']}): {log['lines']} lines, {log['warnings']} warnings, "
               f"{log['errors']} errors, {log['tracebacks']} tracebacks")
    for msg, n in log["top"]:
        out.append(f"  {n:5d}× {msg}")
    for msg, n in log["exceptions"]:
        out.append(f"  {n:5d}× traceback ending in: {msg}")
    out.append("\nConditions: " + ", ".join(f"{k} {v}" for k, v in cond.items()))
    for r in runs:
        c = r["conditions"]
        out.append(f"  run {r['run']}: loadavg before {c['loadavg_before']} after {c['loadavg_after']}; "
                   f"CPU % of one core during the attacks: {c['cpu_pct_during_attacks']}")
    return "\n".join(out)


METRICS: list[tuple[str, Callable[[dict[str, Any]], Any], str]] = [
    ("server RSS before, MB", lambda r: r["server"]["rss_before_mb"], ""),
    ("server RSS max, MB", lambda r: r["server"]["rss_max_mb"], ""),
    ("server RSS after, MB", lambda r: r["server"]["rss_after_mb"], ""),
    ("RSS growth (max − before), MB", lambda r: r["server"]["growth_max_mb"], "≤ 64"),
    ("RSS growth (after − before), MB", lambda r: r["server"]["growth_after_mb"], ""),
    ("server fds before / after", lambda r: f"{r['server']['fds_before']} / {r['server']['fds_after']}", ""),
    ("coordinator after: peers / tunnels", lambda r: "{} / {}".format(
        r["server"]["coordinator_after"]["peers"], r["server"]["coordinator_after"]["tunnels"]), "2 / 1"),
    ("max event-loop stall, ms", lambda r: r["loop"]["max_stall_ms"], "≤ 50"),
    ("stalls ≥ 50 ms / ≥ 250 ms", lambda r: f"{r['loop']['stalls_over_50ms']} / {r['loop']['stalls_over_250ms']}", "0"),
    ("fan-out p50, ms", lambda r: r["healthy"]["fanout"]["p50_ms"], ""),
    ("fan-out p99, ms", lambda r: r["healthy"]["fanout"]["p99_ms"], "< 50"),
    ("fan-out worst 10 s p99, ms", lambda r: max(
        r["healthy"]["fanout"][d]["worst_10s_p99_ms"] or 0 for d in ("agent_to_client", "client_to_agent")), "< 50"),
    ("fan-out max, ms", lambda r: r["healthy"]["fanout"]["max_ms"], ""),
    ("node updates delivered / sent", lambda r: "{} / {}".format(
        sum(r["healthy"]["fanout"][d]["received"] for d in ("agent_to_client", "client_to_agent")),
        sum(r["healthy"]["fanout"][d]["sent"] for d in ("agent_to_client", "client_to_agent"))), "all"),
    ("DERP RTT p50, ms", lambda r: r["healthy"]["derp"]["rtt_p50_ms"], ""),
    ("DERP RTT p99, ms", lambda r: r["healthy"]["derp"]["rtt_p99_ms"], ""),
    ("DERP RTT worst 10 s p99, ms", lambda r: r["healthy"]["derp"]["rtt_worst_10s_p99_ms"], ""),
    ("DERP packets delivered / sent", lambda r: "{} / {}".format(
        sum(r["healthy"]["derp"][d]["received"] for d in ("a_to_b", "b_to_a")),
        sum(r["healthy"]["derp"][d]["sent"] for d in ("a_to_b", "b_to_a"))), "all"),
    ("healthy pair: lost + dup + misordered + corrupt + reconnects", lambda r: r["healthy_bad_items"], "0"),
    ("healthy process loop lag max, ms", lambda r: r["healthy"]["loop_lag_max_ms"], ""),
    ("attackers as expected", lambda r: "{}/{}".format(
        sum(1 for a in r["attackers"] if a["ok"]), sum(1 for a in r["attackers"] if a["ok"] is not None)), "all"),
    ("server CPU during attacks, % of a core", lambda r: r["conditions"]["cpu_pct_during_attacks"]["server"], ""),
    ("other processes' CPU, % of a core", lambda r: r["conditions"]["cpu_pct_during_attacks"]["other"], ""),
]


def medians(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for label, key, _ in METRICS:
        vals = [key(r) for r in runs]
        nums = [v for v in vals if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if len(nums) == len(vals) and nums:
            out[label] = round(statistics.median(nums), 2)
    return out


async def orchestrate(args: argparse.Namespace) -> int:
    cond = static_conditions()
    runs = []
    for i in range(1, args.runs + 1):
        if args.quiet is not None:
            t_wait = time.time()
            while loadavg()[0] > args.quiet and time.time() - t_wait < args.quiet_wait:
                await asyncio.sleep(5.0)
        print(f"soak run {i}/{args.runs}: {args.seconds} s of attacks, loadavg {loadavg()}",
              file=sys.stderr, flush=True)
        runs.append(await run_once(args, i))
        if i < args.runs:
            await asyncio.sleep(args.pause)
    print(render(runs, cond))
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"conditions": cond, "medians": medians(runs), "runs": runs}, indent=1))
    return 1 if any(r["healthy_bad_items"] for r in runs) else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=60.0, help="attack window (default 60)")
    p.add_argument("--runs", type=int, default=1, help="runs, each on a fresh server (default 1)")
    p.add_argument("--warmup", type=float, default=5.0, help="healthy pair alone before (5 s)")
    p.add_argument("--settle", type=float, default=5.0, help="healthy pair alone after (5 s)")
    p.add_argument("--pause", type=float, default=5.0, help="between runs (5 s)")
    p.add_argument("--rate", type=float, default=20.0, help="node updates/s each way (20)")
    p.add_argument("--derp-rate", type=float, default=200.0, help="DERP packets/s each way (200)")
    p.add_argument("--attacks", nargs="*", choices=sorted(ATTACKS), help="only these attacks")
    p.add_argument("--skip", nargs="*", choices=sorted(ATTACKS), help="all but these attacks")
    p.add_argument("--quiet", type=float, metavar="LOAD",
                   help="before each run, wait until the 1-minute load average is <= LOAD ...")
    p.add_argument("--quiet-wait", type=float, default=600.0, metavar="S",
                   help="... but at most S seconds (600)")
    p.add_argument("--json", metavar="FILE", help="also write every figure as JSON")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs, data dir)")
    p.add_argument("--role", choices=["healthy", "attack"], help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.role is not None:
        cfg = json.loads(Path(args.config).read_text())
        coro = healthy_main(cfg) if args.role == "healthy" else attackers_main(cfg)
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(coro)
        return 0
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(orchestrate(args))


if __name__ == "__main__":
    sys.exit(main())
