"""Coordinator load generator: one process driving a slice of the benchmark peers.

Started by ``bench/coord_bench.py`` (not meant to be run by hand). It talks to
the coordinator over real gRPC on 127.0.0.1 with the *raw* generated method
paths (``grpc.aio`` multicallables), not :mod:`tailnet.client`: the full
library keeps a peer table, event buffer and three RPCs per peer, which is too
heavy to run 10,000 peers on one shared core next to the coordinator.

Peers (same numbering as the coordinator process, see ``coord_bench.py``):

* agent ``i``: token ``agent-<i>``, peer ID :func:`agent_id(i) <agent_id>`,
  node address = Tailscale-prefix /128 derived from the ID (AgentPolicy);
  acknowledges every NODE with ``ready_for_handshake`` (like real agents) unless
  ``--no-acks``.
* client ``j``: token ``client-<j>``, metadata ``tailnet-agent-id`` = agent
  ``j % A`` (ClientPolicy); sends AddTunnel(agent) and UpdateSelf.

This process owns peers ``k`` with ``k % nproc == index`` of each kind, so a
client and its agent usually live in different processes.

Control protocol: one JSON object per line on stdin, one JSON reply per line on
stdout (everything else goes to stderr)::

    {"cmd": "connect"}                 → {"ok": true, "streams_s": .., "ready_s": ..}
    {"cmd": "run", "rate": R, "duration": S, "drain": D}
                                       → {"sent": n, "received": m, "lat_ms": [...], ...}
    {"cmd": "quit"}                    → {"ok": true}

Latency: every UpdateSelf carries its send time (``time.time_ns()``) in
``Node.as_of``; the receiver subtracts it from its own ``time.time_ns()`` (same
host clock). Only updates sent during the ``run`` window are measured.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import ipaddress
import json
import os
import sys
import time
import uuid
from typing import Any, Final

import grpc
import grpc.aio

from tailnet.v2 import tailnet_pb2 as pb

__all__ = ["agent_id", "client_user_id", "agent_addr", "main"]

_NODE: Final = pb.CoordinateResponse.PeerUpdate.NODE
_RFH: Final = pb.CoordinateResponse.PeerUpdate.READY_FOR_HANDSHAKE
_EOF: Final[object] = grpc.aio.EOF  # type: ignore[attr-defined]
_TS_PREFIX = ipaddress.IPv6Network("fd7a:115c:a1e0::/48")


def agent_id(i: int) -> uuid.UUID:
    """Peer ID of benchmark agent ``i`` (shared with the coordinator process)."""
    return uuid.UUID(int=(0xA6E7 << 112) | i)


def client_user_id(j: int) -> uuid.UUID:
    """User ID behind benchmark client ``j``'s token."""
    return uuid.UUID(int=(0xC11E << 112) | j)


def agent_addr(aid: uuid.UUID) -> str:
    """The /128 an agent may claim: the Tailscale /48 prefix + the ID's last 10 bytes."""
    raw = _TS_PREFIX.network_address.packed[:6] + aid.bytes[6:]
    return f"{ipaddress.IPv6Address(raw)}/128"


class Peer:
    __slots__ = ("kind", "idx", "token", "agent_idx", "call", "lock", "ready", "seq", "addr")

    def __init__(self, kind: str, idx: int, agents: int) -> None:
        self.kind = kind
        self.idx = idx
        self.token = f"{kind}-{idx}"
        self.agent_idx = idx % agents if kind == "client" else idx
        self.call: Any = None
        self.lock = asyncio.Lock()
        self.ready = False
        self.seq = 0
        if kind == "agent":
            self.addr = agent_addr(agent_id(idx))
        else:
            # Any /128 is allowed for clients; keep them unique.
            self.addr = f"fd7a:115c:a1e0:c11e::{idx:x}/128"

    def node(self) -> pb.Node:
        self.seq += 1
        n = pb.Node(
            id=self.idx,
            key=b"np" + self.idx.to_bytes(32, "big"),
            disco="discokey:" + format(self.idx, "064x"),
            preferred_derp=999,
            addresses=[self.addr],
            allowed_ips=[self.addr],
            endpoints=[f"127.0.0.1:{self.seq & 0xFFFF}"],
        )
        n.as_of.FromNanoseconds(time.time_ns())
        return n


class LoadGen:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        n, k = args.nproc, args.index
        self.peers = [Peer("agent", i, args.agents) for i in range(k, args.agents, n)]
        self.peers += [Peer("client", j, args.agents) for j in range(k, args.clients, n)]
        # Expected NODE receipts before "ready": each agent hears from its clients,
        # each client from its agent.
        self.expect_ready = 0
        for p in self.peers:
            if p.kind == "client" or p.idx < args.clients:
                self.expect_ready += 1
        self.ready_count = 0
        self.ready_evt = asyncio.Event()
        self.channels: list[grpc.aio.Channel] = []
        self.measuring = False
        self.window_start_ns = 0
        self.lat: list[float] = []
        self.received = 0
        self.rfh = 0
        self.errors = 0
        self.send_errors = 0

    def _channel(self, i: int) -> grpc.aio.Channel:
        per: int = self.args.streams_per_channel
        while len(self.channels) <= i // per:
            ch: grpc.aio.Channel = grpc.aio.insecure_channel(
                    self.args.target,
                    options=[
                        ("grpc.use_local_subchannel_pool", 1),
                        ("grpc.max_concurrent_streams", 1 << 20),
                    ],
            )
            self.channels.append(ch)
        return self.channels[i // per]

    async def _open(self, i: int, p: Peer, sem: asyncio.Semaphore) -> None:
        async with sem:
            ch = self._channel(i)
            coordinate = ch.stream_stream(
                "/coder.tailnet.v2.Tailnet/Coordinate",
                request_serializer=pb.CoordinateRequest.SerializeToString,
                response_deserializer=pb.CoordinateResponse.FromString,
            )
            md: list[tuple[str, str]] = [("authorization", f"Bearer {p.token}")]
            if p.kind == "client":
                md.append(("tailnet-agent-id", str(agent_id(p.agent_idx))))
            call = coordinate(None, metadata=md)
            await call.initial_metadata()
            p.call = call
            if p.kind == "client":
                t = pb.CoordinateRequest.Tunnel(id=agent_id(p.agent_idx).bytes)
                await call.write(pb.CoordinateRequest(add_tunnel=t))
            await call.write(
                pb.CoordinateRequest(update_self=pb.CoordinateRequest.UpdateSelf(node=p.node()))
            )
        asyncio.ensure_future(self._reader(p))

    async def _reader(self, p: Peer) -> None:
        call = p.call
        acks = self.args.acks and p.kind == "agent"
        try:
            while True:
                resp = await call.read()
                if resp is _EOF:
                    break
                now = time.time_ns()
                ids: list[bytes] = []
                for u in resp.peer_updates:
                    if u.kind == _NODE:
                        self.received += 1
                        if not p.ready:
                            p.ready = True
                            self.ready_count += 1
                            if self.ready_count >= self.expect_ready:
                                self.ready_evt.set()
                        if self.measuring:
                            sent = u.node.as_of.ToNanoseconds()
                            if sent >= self.window_start_ns:
                                self.lat.append((now - sent) / 1e6)
                        if acks:
                            ids.append(u.id)
                    elif u.kind == _RFH:
                        self.rfh += 1
                if resp.error:
                    self.errors += 1
                if ids:
                    await self._write(
                        p,
                        pb.CoordinateRequest(
                            ready_for_handshake=[
                                pb.CoordinateRequest.ReadyForHandshake(id=x) for x in ids
                            ]
                        ),
                    )
        except (grpc.aio.AioRpcError, asyncio.CancelledError):
            pass
        except Exception as exc:  # keep the generator alive, but say so
            print(f"loadgen reader: {exc!r}", file=sys.stderr)

    async def _write(self, p: Peer, req: pb.CoordinateRequest) -> None:
        # One write at a time per stream (the rate loop skips busy peers).
        async with p.lock:
            try:
                await p.call.write(req)
            except Exception:
                self.send_errors += 1

    async def connect(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        sem = asyncio.Semaphore(self.args.connect_concurrency)
        await asyncio.gather(*(self._open(i, p, sem) for i, p in enumerate(self.peers)))
        t_streams = time.perf_counter() - t0
        if self.expect_ready:
            await asyncio.wait_for(self.ready_evt.wait(), 600)
        # Harness-side only: keep the generator's own GC pauses out of the latency
        # numbers (the long-lived peer objects are frozen out of collection).
        gc.collect()
        gc.freeze()
        return {
            "ok": True,
            "peers": len(self.peers),
            "streams_s": t_streams,
            "ready_s": time.perf_counter() - t0,
        }

    async def run(self, rate: float, duration: float, drain: float) -> dict[str, Any]:
        self.lat = []
        recv0, rfh0, err0 = self.received, self.rfh, self.errors
        self.window_start_ns = time.time_ns()
        self.measuring = True
        senders = self.peers
        n = len(senders)
        sent = skipped = 0
        rr = 0
        t0 = time.perf_counter()
        tick = 0.005
        while True:
            elapsed = time.perf_counter() - t0
            if elapsed >= duration:
                break
            due = int(elapsed * rate) - sent - skipped
            for _ in range(max(0, due)):
                p = senders[rr % n]
                rr += 1
                if p.lock.locked() or p.call is None:
                    skipped += 1
                    continue
                sent += 1
                asyncio.ensure_future(
                    self._write(
                        p,
                        pb.CoordinateRequest(
                            update_self=pb.CoordinateRequest.UpdateSelf(node=p.node())
                        ),
                    )
                )
            await asyncio.sleep(tick)
        # Let in-flight updates land (bounded).
        deadline = time.perf_counter() + drain
        last = -1
        while time.perf_counter() < deadline:
            if self.received == last:
                break
            last = self.received
            await asyncio.sleep(0.25)
        self.measuring = False
        return {
            "sent": sent,
            "skipped": skipped,
            "received": self.received - recv0,
            "measured": len(self.lat),
            "rfh": self.rfh - rfh0,
            "errors": self.errors - err0,
            "send_errors": self.send_errors,
            "elapsed_s": time.perf_counter() - t0,
            "lat_ms": [round(x, 3) for x in self.lat],
        }

    async def quit(self) -> None:
        for p in self.peers:
            if p.call is not None:
                p.call.cancel()
        for ch in self.channels:
            await ch.close(None)


async def _serve(args: argparse.Namespace) -> None:
    gen = LoadGen(args)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    out = sys.stdout
    while True:
        line = await reader.readline()
        if not line:
            break
        msg = json.loads(line)
        cmd = msg.get("cmd")
        if cmd == "connect":
            reply = await gen.connect()
        elif cmd == "run":
            reply = await gen.run(
                float(msg["rate"]), float(msg["duration"]), float(msg.get("drain", 2.0))
            )
        elif cmd == "quit":
            await gen.quit()
            out.write(json.dumps({"ok": True}) + "\n")
            out.flush()
            break
        else:
            reply = {"ok": False, "error": f"unknown command {cmd!r}"}
        out.write(json.dumps(reply) + "\n")
        out.flush()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--target", required=True)
    ap.add_argument("--agents", type=int, required=True)
    ap.add_argument("--clients", type=int, required=True)
    ap.add_argument("--index", type=int, required=True)
    ap.add_argument("--nproc", type=int, required=True)
    ap.add_argument("--streams-per-channel", type=int, default=200)
    ap.add_argument("--connect-concurrency", type=int, default=256)
    ap.add_argument("--no-acks", dest="acks", action="store_false")
    ap.add_argument("--no-uvloop", dest="uvloop", action="store_false")
    args = ap.parse_args(argv)
    os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")
    if args.uvloop:
        import uvloop

        uvloop.run(_serve(args))
    else:
        asyncio.run(_serve(args))


if __name__ == "__main__":
    main()
