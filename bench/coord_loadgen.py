"""Coordinator load generator: one process driving a slice of the benchmark peers.

Started by ``bench/coord_bench.py`` (not meant to be run by hand). Every peer has
**its own connection**, as Coder's clients do:

* ``--transport drpc``: one WebSocket per peer carrying yamux + DRPC, through
  :class:`tailnet.rpc.tailnet_client.TailnetClient` (the library's client).
  Agents dial ``/api/v2/workspaceagents/me/rpc?version=2.6`` with their token as
  the ``coder_session_token`` cookie; clients dial
  ``/api/v2/workspaceagents/{agent_id}/coordinate?version=2.3`` with the owner's
  token in ``Coder-Session-Token``. Each peer opens Coordinate and
  StreamDERPMaps on their own yamux streams.
* ``--transport grpc``: one gRPC channel (own TCP connection) per peer, raw
  method paths; Coordinate (agent: ``authorization: Bearer``; client: plus
  ``tailnet-agent-id``) and StreamDERPMaps on that channel.

Peers (numbering shared with the coordinator process via the tokens file):
agent ``i`` < A has peer ID :func:`agent_id(i) <agent_id>`; client ``j`` < C is
bound to agent ``j % A`` (fan-out ``C / A``). This process owns agents with
``i % nproc == index`` and clients whose agent is owned by the *next* process,
so an update usually crosses processes.

Every NODE a peer receives is verified, not just counted:

* **source**: ``PeerUpdate.id`` is a tunnel peer of the receiver (a client hears
  only its agent; an agent only clients bound to it, identified by the global
  peer number in ``Node.key`` and by the sender's own peer ID, which the
  sender puts in ``Node.disco``);
* **order**: ``Node.id`` is the sender's sequence number; per sender connection
  it must strictly increase (a smaller or equal one is ``out_of_order``; a jump
  counts the skipped numbers as ``gaps``: updates lost);
* **content**: key, disco, addresses, allowed IPs, endpoints (which repeat the
  sequence number) and preferred DERP equal what that sender builds for that
  sequence number.

Agents answer every NODE with ``ready_for_handshake`` (as real agents do) unless
``--no-acks``; a client checks each READY_FOR_HANDSHAKE names its agent. The
first DERP map on StreamDERPMaps must hold the stack's embedded region.

Control protocol: one JSON object per line on stdin, one JSON reply per line on
stdout (everything else goes to stderr)::

    {"cmd": "connect", "kind": "agent"|"client"}  → {"ok", "streams_s", "dial_ms": [...]}
    {"cmd": "ready"}                           → {"ok", "ready_s"}  (all nodes exchanged)
    {"cmd": "probe", "n": N, "gap": S}         → {"dial_ms": [...]}  (idle re-dials)
    {"cmd": "run", "rate": R, "duration": S, "drain": D}
                                               → {"sent", "received", "lat_ms": [...], ...}
    {"cmd": "quit"}                            → {"ok": true}

*dial → first NODE*: from just before the TCP connect to the receipt of the
first NODE about a tunnel peer (a client: its agent's node; measured for every
client during the connect phase, and for ``probe`` re-dials of connected
clients one at a time on an otherwise idle coordinator).

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
import resource
import sys
import time
import uuid
from typing import Any, Final

from tailnet.v2 import tailnet_pb2 as pb

__all__ = ["LoopLag", "agent_id", "agent_addr", "client_addr", "main", "raise_nofile"]

_NODE: Final = pb.CoordinateResponse.PeerUpdate.NODE
_RFH: Final = pb.CoordinateResponse.PeerUpdate.READY_FOR_HANDSHAKE
_LOST: Final = pb.CoordinateResponse.PeerUpdate.LOST
_DISCONNECTED: Final = pb.CoordinateResponse.PeerUpdate.DISCONNECTED
_TS_PREFIX = ipaddress.IPv6Network("fd7a:115c:a1e0::/48")
COORDINATE: Final = "/coder.tailnet.v2.Tailnet/Coordinate"
STREAM_DERP_MAPS: Final = "/coder.tailnet.v2.Tailnet/StreamDERPMaps"
#: Region the stack's default DERP map embeds (StackConfig.derp_region_id).
DERP_REGION: Final = 999


def agent_id(i: int) -> uuid.UUID:
    """Peer ID of benchmark agent ``i`` (shared with the coordinator process)."""
    return uuid.UUID(int=(0xA6E7 << 112) | i)


def agent_addr(aid: uuid.UUID) -> str:
    """The /128 an agent may claim: the Tailscale /48 prefix + the ID's last 10 bytes."""
    raw = _TS_PREFIX.network_address.packed[:6] + aid.bytes[6:]
    return f"{ipaddress.IPv6Address(raw)}/128"


def client_addr(j: int) -> str:
    """Any /128 is allowed for clients; keep them unique."""
    return f"fd7a:115c:a1e0:c11e::{j:x}/128"


def raise_nofile() -> int:
    """Raise RLIMIT_NOFILE's soft limit to the hard limit (one socket per peer)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


class LoopLag:
    """Event-loop lag: a callback every ``interval`` s records how late it ran."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.samples: list[float] = []
        self._loop = asyncio.get_running_loop()
        self._due = self._loop.time() + interval
        self._loop.call_at(self._due, self._tick)

    def _tick(self) -> None:
        now = self._loop.time()
        self.samples.append(now - self._due)
        self._due = now + self.interval
        self._loop.call_at(self._due, self._tick)

    def take(self) -> dict[str, float]:
        """Max and p99 lag (ms) since the last call."""
        xs = sorted(self.samples)
        self.samples = []
        if not xs:
            return {"max_ms": 0.0, "p99_ms": 0.0}
        return {"max_ms": xs[-1] * 1000, "p99_ms": xs[int(0.99 * (len(xs) - 1))] * 1000}


def _key(g: int) -> bytes:
    return b"np" + g.to_bytes(32, "big")


def _g_of_key(key: bytes) -> int:
    if len(key) != 34 or key[:2] != b"np":
        return -1
    return int.from_bytes(key[2:], "big")


class Peer:
    """One benchmark peer (agent or client) and what it has verified so far."""

    __slots__ = (
        "kind", "idx", "g", "token", "agent_idx", "addr", "seq", "peer_id", "disco",
        "conn", "coord", "maps", "busy", "ready", "seen", "expect_peers", "dial_t0",
        "first_node_ms", "channel", "tasks",
    )

    def __init__(self, kind: str, idx: int, g: int, token: str, agent_idx: int) -> None:
        self.kind = kind
        self.idx = idx
        self.g = g  # global peer number: agents 0..A-1, clients A..A+C-1
        self.token = token
        self.agent_idx = agent_idx
        self.addr = agent_addr(agent_id(idx)) if kind == "agent" else client_addr(idx)
        self.seq = 0
        self.peer_id: uuid.UUID | None = None
        self.disco = ""
        self.conn: Any = None  # TailnetClient (drpc) or grpc.aio.Channel
        self.coord: Any = None  # the Coordinate call
        self.maps: Any = None  # the StreamDERPMaps call
        self.busy = False
        self.ready = False
        # sender peer ID bytes → [global peer number, last sequence number]
        self.seen: dict[bytes, list[int]] = {}
        self.expect_peers = 0
        self.dial_t0 = 0.0
        self.first_node_ms = -1.0
        self.channel: Any = None
        self.tasks: list[asyncio.Task[None]] = []

    def set_peer_id(self, text: str) -> None:
        self.peer_id = uuid.UUID(text)
        self.disco = "discokey:" + format(self.g, "032x") + self.peer_id.hex

    def node(self) -> pb.Node:
        self.seq += 1
        s = self.seq
        n = pb.Node(
            id=s,
            key=_key(self.g),
            disco=self.disco,
            preferred_derp=DERP_REGION,
            addresses=[self.addr],
            allowed_ips=[self.addr],
            endpoints=[f"127.0.0.1:{s % 65536}", f"[::1]:{s // 65536 % 65536}"],
        )
        n.as_of.FromNanoseconds(time.time_ns())
        return n

    def update(self) -> pb.CoordinateRequest:
        return pb.CoordinateRequest(update_self=pb.CoordinateRequest.UpdateSelf(node=self.node()))


class Stats:
    __slots__ = (
        "received", "rfh", "errors", "bad_source", "bad_content", "out_of_order", "gaps",
        "lost", "maps_ok", "maps_bad", "send_errors", "stream_ends",
    )

    def __init__(self) -> None:
        for k in self.__slots__:
            setattr(self, k, 0)

    def as_dict(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in self.__slots__}


class LoadGen:
    def __init__(self, args: argparse.Namespace, tokens: dict[str, Any]) -> None:
        self.args = args
        n, k = args.nproc, args.index
        agents: list[str] = tokens["agents"]
        owners: list[str] = tokens["owners"]
        A, C = len(agents), tokens["clients"]
        self.A, self.C = A, C
        self.http = tokens["http"]
        self.grpc_target = tokens["grpc"]
        self.agents = [Peer("agent", i, i, agents[i], i) for i in range(k, A, n)]
        self.clients = [
            Peer("client", j, A + j, owners[j % A], j % A)
            for j in range(C)
            if (j % A + 1) % n == k
        ]
        self.peers = self.agents + self.clients
        # clients bound to each agent: g numbers A + j for j ≡ i (mod A)
        for p in self.agents:
            p.expect_peers = len(range(p.idx, C, A))
        for p in self.clients:
            p.expect_peers = 1
        self.not_ready = len(self.peers)
        self.ready_evt = asyncio.Event()
        self.st = Stats()
        self.measuring = False
        self.window_start_ns = 0
        self.lat: list[float] = []
        self.lag = LoopLag()
        self.grpc_mod: Any = None
        if args.transport == "grpc":
            import grpc.aio

            self.grpc_mod = grpc

    # ------------------------------------------------------------------ verification

    def _on_node(self, p: Peer, u: Any, now: int) -> None:
        st = self.st
        n = u.node
        g = _g_of_key(n.key)
        A = self.A
        # source: a tunnel peer of p
        if p.kind == "client":
            ok_src = g == p.agent_idx and u.id == agent_id(p.agent_idx).bytes
        else:
            ok_src = g >= A and (g - A) % A == p.idx
            if ok_src:
                ok_src = n.disco == "discokey:" + format(g, "032x") + u.id.hex()
        if not ok_src:
            st.bad_source += 1
            return
        # order
        s = n.id
        rec = p.seen.get(u.id)
        if rec is None:
            p.seen[u.id] = [g, s]
        else:
            last = rec[1]
            if s <= last:
                st.out_of_order += 1
                return
            if s > last + 1:
                st.gaps += s - last - 1
            rec[1] = s
        # content
        if g < A:
            addr = agent_addr(agent_id(g))
            if n.disco[:41] != "discokey:" + format(g, "032x") or len(n.disco) != 73:
                st.bad_content += 1
                return
        else:
            addr = client_addr(g - A)
        if (
            n.preferred_derp != DERP_REGION
            or len(n.addresses) != 1 or n.addresses[0] != addr
            or len(n.allowed_ips) != 1 or n.allowed_ips[0] != addr
            or len(n.endpoints) != 2
            or n.endpoints[0] != f"127.0.0.1:{s % 65536}"
            or n.endpoints[1] != f"[::1]:{s // 65536 % 65536}"
        ):
            st.bad_content += 1
            return
        st.received += 1
        if not p.ready:
            if p.first_node_ms < 0:
                p.first_node_ms = (time.perf_counter() - p.dial_t0) * 1000
            if len(p.seen) >= p.expect_peers:
                p.ready = True
                self.not_ready -= 1
                if self.not_ready == 0:
                    self.ready_evt.set()
        if self.measuring:
            sent = n.as_of.seconds * 1_000_000_000 + n.as_of.nanos
            if sent >= self.window_start_ns:
                self.lat.append((now - sent) / 1e6)

    def _on_response(self, p: Peer, resp: pb.CoordinateResponse) -> list[bytes]:
        now = time.time_ns()
        acks: list[bytes] = []
        for u in resp.peer_updates:
            k = u.kind
            if k == _NODE:
                self._on_node(p, u, now)
                if p.kind == "agent":
                    acks.append(u.id)
            elif k == _RFH:
                self.st.rfh += 1
                if p.kind != "client" or u.id != agent_id(p.agent_idx).bytes:
                    self.st.bad_source += 1
            elif k == _LOST or k == _DISCONNECTED:
                self.st.lost += 1
                p.seen.pop(u.id, None)
        if resp.error:
            self.st.errors += 1
            print(f"loadgen: {p.kind} {p.idx}: error {resp.error!r}", file=sys.stderr)
        return acks if self.args.acks else []

    def _on_map(self, m: pb.DERPMap) -> None:
        if DERP_REGION in m.regions and m.regions[DERP_REGION].nodes:
            self.st.maps_ok += 1
        else:
            self.st.maps_bad += 1

    # ------------------------------------------------------------------ transports

    async def _open(self, p: Peer) -> None:
        p.dial_t0 = time.perf_counter()
        p.first_node_ms = -1.0
        p.ready = False
        if self.args.transport == "drpc":
            await self._open_drpc(p)
        else:
            await self._open_grpc(p)

    async def _open_drpc(self, p: Peer) -> None:
        from tailnet.rpc.tailnet_client import TailnetClient

        if p.kind == "agent":
            url = f"{self.http}/api/v2/workspaceagents/me/rpc?version=2.6"
            c = await TailnetClient.connect(url, p.token, cookie=True, open_timeout=120)
        else:
            aid = agent_id(p.agent_idx)
            url = f"{self.http}/api/v2/workspaceagents/{aid}/coordinate?version=2.3"
            c = await TailnetClient.connect(url, p.token, open_timeout=120)
        assert c.peer_id is not None
        p.conn = c
        p.set_peer_id(c.peer_id)
        coord = c.coordinate()
        p.coord = coord
        if p.kind == "client":
            t = pb.CoordinateRequest.Tunnel(id=agent_id(p.agent_idx).bytes)
            await coord.send(pb.CoordinateRequest(add_tunnel=t))
        await coord.send(p.update())
        p.maps = await c.stream_derp_maps()
        loop = asyncio.get_running_loop()
        p.tasks = [
            loop.create_task(self._drpc_reader(p, coord)),
            loop.create_task(self._drpc_maps(p.maps)),
        ]

    async def _drpc_reader(self, p: Peer, coord: Any) -> None:
        try:
            while True:
                resp = await coord.recv()
                if resp is None:
                    break
                acks = self._on_response(p, resp)
                if acks:
                    await self._write(p, pb.CoordinateRequest(ready_for_handshake=[
                        pb.CoordinateRequest.ReadyForHandshake(id=x) for x in acks]))
        except (ConnectionError, asyncio.CancelledError):
            pass
        except Exception as exc:
            print(f"loadgen reader: {exc!r}", file=sys.stderr)
        self.st.stream_ends += 1

    async def _drpc_maps(self, maps: Any) -> None:
        try:
            while True:
                m = await maps.recv()
                if m is None:
                    break
                self._on_map(m)
        except (ConnectionError, asyncio.CancelledError):
            pass
        except Exception as exc:
            print(f"loadgen maps: {exc!r}", file=sys.stderr)

    async def _open_grpc(self, p: Peer) -> None:
        grpc = self.grpc_mod
        ch = grpc.aio.insecure_channel(
            self.grpc_target, options=[("grpc.use_local_subchannel_pool", 1)]
        )
        p.conn = ch
        coordinate = ch.stream_stream(
            COORDINATE,
            request_serializer=pb.CoordinateRequest.SerializeToString,
            response_deserializer=pb.CoordinateResponse.FromString,
        )
        md: list[tuple[str, str]] = [
            ("authorization", f"Bearer {p.token}"), ("tailnet-version", "2.3")
        ]
        if p.kind == "client":
            md.append(("tailnet-agent-id", str(agent_id(p.agent_idx))))
        call = coordinate(None, metadata=md)
        imd = await call.initial_metadata()
        p.set_peer_id(dict(imd)["tailnet-peer-id"])
        p.coord = call
        if p.kind == "client":
            t = pb.CoordinateRequest.Tunnel(id=agent_id(p.agent_idx).bytes)
            await call.write(pb.CoordinateRequest(add_tunnel=t))
        await call.write(p.update())
        maps_rpc = ch.unary_stream(
            STREAM_DERP_MAPS,
            request_serializer=pb.StreamDERPMapsRequest.SerializeToString,
            response_deserializer=pb.DERPMap.FromString,
        )
        p.maps = maps_rpc(pb.StreamDERPMapsRequest(), metadata=md[:2])
        loop = asyncio.get_running_loop()
        p.tasks = [
            loop.create_task(self._grpc_reader(p, call)),
            loop.create_task(self._grpc_maps(p.maps)),
        ]

    async def _grpc_reader(self, p: Peer, call: Any) -> None:
        grpc = self.grpc_mod
        eof = grpc.aio.EOF
        try:
            while True:
                resp = await call.read()
                if resp is eof:
                    break
                acks = self._on_response(p, resp)
                if acks:
                    await self._write(p, pb.CoordinateRequest(ready_for_handshake=[
                        pb.CoordinateRequest.ReadyForHandshake(id=x) for x in acks]))
        except (grpc.aio.AioRpcError, asyncio.CancelledError):
            pass
        except Exception as exc:
            print(f"loadgen reader: {exc!r}", file=sys.stderr)
        self.st.stream_ends += 1

    async def _grpc_maps(self, call: Any) -> None:
        grpc = self.grpc_mod
        try:
            async for m in call:
                self._on_map(m)
        except (grpc.aio.AioRpcError, asyncio.CancelledError):
            pass
        except Exception as exc:
            print(f"loadgen maps: {exc!r}", file=sys.stderr)

    async def _write(self, p: Peer, req: pb.CoordinateRequest) -> None:
        # One write at a time per peer (the rate loop skips busy peers); acks wait.
        while p.busy:
            await asyncio.sleep(0.001)
        p.busy = True
        try:
            if self.args.transport == "drpc":
                await p.coord.send(req)
            else:
                await p.coord.write(req)
        except Exception:
            self.st.send_errors += 1
        finally:
            p.busy = False

    async def _send_update(self, p: Peer) -> None:
        p.busy = True
        try:
            if self.args.transport == "drpc":
                await p.coord.send(p.update())
            else:
                await p.coord.write(p.update())
        except Exception:
            self.st.send_errors += 1
        finally:
            p.busy = False

    async def _close(self, p: Peer) -> None:
        for t in p.tasks:
            t.cancel()
        p.tasks = []
        if p.conn is None:
            return
        conn, p.conn = p.conn, None
        try:
            if self.args.transport == "drpc":
                await conn.close()
            else:
                p.coord.cancel()
                p.maps.cancel()
                await conn.close(None)
        except Exception:
            pass

    # ------------------------------------------------------------------ commands

    async def connect(self, kind: str) -> dict[str, Any]:
        peers = self.agents if kind == "agent" else self.clients
        t0 = time.perf_counter()
        sem = asyncio.Semaphore(self.args.connect_concurrency)
        failed = 0

        async def one(p: Peer) -> None:
            nonlocal failed
            async with sem:
                for attempt in range(3):
                    try:
                        await self._open(p)
                        return
                    except Exception as exc:
                        print(f"loadgen: dial {p.kind} {p.idx} (try {attempt + 1}): {exc!r}",
                              file=sys.stderr)
                        await self._close(p)
                        await asyncio.sleep(0.5)
                failed += 1

        await asyncio.gather(*(one(p) for p in peers))
        return {"ok": failed == 0, "failed": failed, "peers": len(peers),
                "streams_s": time.perf_counter() - t0}

    async def ready(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        if self.not_ready:
            try:
                await asyncio.wait_for(self.ready_evt.wait(), self.args.ready_timeout)
            except TimeoutError:
                return {"ok": False, "not_ready": self.not_ready, **self.st.as_dict()}
        dial = [p.first_node_ms for p in self.clients if p.first_node_ms >= 0]
        # Harness-side only: keep the generator's own GC pauses out of the latency
        # numbers (the long-lived peer objects are frozen out of collection).
        gc.collect()
        gc.freeze()
        return {"ok": True, "wait_s": time.perf_counter() - t0,
                "dial_ms": [round(x, 3) for x in dial], **self.st.as_dict()}

    async def probe(self, n: int, gap: float) -> dict[str, Any]:
        """Re-dial ``n`` connected clients one at a time; dial → first NODE each."""
        out: list[float] = []
        step = max(1, len(self.clients) // max(1, n))
        for p in self.clients[::step][:n]:
            await self._close(p)
            await asyncio.sleep(gap)
            p.seen.clear()
            self.not_ready += 1
            self.ready_evt.clear()
            await self._open(p)
            t_end = time.perf_counter() + 10
            while not p.ready and time.perf_counter() < t_end:
                await asyncio.sleep(0.001)
            out.append(round(p.first_node_ms, 3) if p.ready else float("nan"))
            await asyncio.sleep(gap)
        return {"dial_ms": out}

    async def run(self, rate: float, duration: float, drain: float) -> dict[str, Any]:
        self.lat = []
        st = self.st
        base = st.as_dict()
        self.lag.take()
        self.window_start_ns = time.time_ns()
        self.measuring = True
        senders = self.peers
        n = len(senders)
        sent = skipped = expected = 0
        rr = 0
        loop = asyncio.get_running_loop()
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
                if p.busy or p.coord is None:
                    skipped += 1
                    continue
                sent += 1
                expected += p.expect_peers
                loop.create_task(self._send_update(p))
            await asyncio.sleep(tick)
        # Let in-flight updates land (bounded).
        deadline = time.perf_counter() + drain
        last = -1
        while time.perf_counter() < deadline:
            if st.received == last:
                break
            last = st.received
            await asyncio.sleep(0.25)
        self.measuring = False
        now = st.as_dict()
        out: dict[str, Any] = {k: now[k] - base[k] for k in now}
        out.update(
            sent=sent,
            expected=expected,
            skipped=skipped,
            elapsed_s=time.perf_counter() - t0,
            lat_ms=[round(x, 3) for x in self.lat],
            lag=self.lag.take(),
        )
        return out

    async def quit(self) -> None:
        sem = asyncio.Semaphore(256)

        async def one(p: Peer) -> None:
            async with sem:
                await self._close(p)

        await asyncio.gather(*(one(p) for p in self.peers))


async def _serve(args: argparse.Namespace) -> None:
    with open(args.tokens, encoding="utf-8") as f:
        tokens = json.load(f)
    gen = LoadGen(args, tokens)
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
        reply: dict[str, Any]
        if cmd == "connect":
            reply = await gen.connect(msg["kind"])
        elif cmd == "ready":
            reply = await gen.ready()
        elif cmd == "probe":
            reply = await gen.probe(int(msg["n"]), float(msg.get("gap", 0.02)))
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
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    ap.add_argument("--transport", choices=("drpc", "grpc"), required=True)
    ap.add_argument("--tokens", required=True, help="JSON written by the coordinator process")
    ap.add_argument("--index", type=int, required=True)
    ap.add_argument("--nproc", type=int, required=True)
    ap.add_argument("--connect-concurrency", type=int, default=64)
    ap.add_argument("--ready-timeout", type=float, default=600.0)
    ap.add_argument("--no-acks", dest="acks", action="store_false")
    ap.add_argument("--no-uvloop", dest="uvloop", action="store_false")
    args = ap.parse_args(argv)
    raise_nofile()
    os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")
    if args.uvloop:
        import uvloop

        uvloop.run(_serve(args))
    else:
        asyncio.run(_serve(args))


if __name__ == "__main__":
    main()
