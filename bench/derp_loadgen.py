"""DERP load generator: worker processes driving sender/receiver pairs through a relay.

Used by ``bench/derp_bench.py``; it can target a DERP server (HTTP upgrade + DERP
handshake done here with :mod:`h11`, :mod:`derp.frames` and :mod:`derp.keys`) or the
ceiling relay of ``bench/ceiling_relay.py`` (64-byte hello, no handshake). Both
targets get the same bytes: SendPacket frames of ``5 + 32 + size`` bytes.

Process model (the generator must not be the bottleneck on a 2-core machine)::

    runner ──pipe──> worker 0 (uvloop): pairs 0, 2, 4 ...   each pair = sender conn +
           ──pipe──> worker 1 (uvloop): pairs 1, 3, 5 ...   receiver conn in the same
                                                            process, so deliveries are
                                                            known without ack traffic

Per-worker protocol over the pipe::

    worker -> ("ready", n_connected)            all connections handshaked
    runner -> ("go", t_start, t_m0, t_m1, t_stop)  absolute time.monotonic_ns() values
    worker -> ("result", dict)                  after t_stop plus a drain period
    runner -> ("close",)

Packet payload (``size`` >= 24 bytes), so that every delivery is verified::

    send time int64 BE (monotonic_ns) ‖ seq uint64 BE ‖ pair tag uint32 ‖ crc32 uint32
    ‖ body (size - 24 bytes: pseudo-random, fixed per pair)

``crc32`` covers ``body ‖ first 20 bytes``. The receiver checks, for every data
frame, the source key (the pair's sender; for the ceiling relay, which forwards
SendPacket verbatim, the receiver's own key), the pair tag, the checksum and the
sequence number, and counts ``misdelivered`` (wrong key or tag), ``corrupted``
(checksum), ``duplicated`` (a sequence number already delivered), ``reordered``
(a skipped sequence number that arrived late) and ``gaps`` (sequence numbers
skipped when a later one arrived; a late arrival fills its gap again); ``lost``
is sent minus distinct valid packets received after the drain. All must be zero.
One-way latency uses the send time (same clock). Only
deliveries received in ``[t_m0, t_m1)`` count towards rates and latency; the
runner samples the server's CPU time and RSS at the same instants.

Write modes: ``per_packet`` (the default: every packet is its own
``transport.write``, as Tailscale's client flushes per packet: over TLS one
record per packet, over WebSocket one message per packet) or batched
(``per_packet=False``: one write carries every packet due at that moment; a TLS
record then holds many packets).

Closed loop: each pair keeps at most ``window`` (32) packets in flight; every read
on the receiver refills the pair's window (one write, or one per packet). Open
loop: each pair offers ``rate`` packets/s on a 1 ms tick; when the sender's
transport buffer is over 1 MiB the tick's packets are not sent and are counted
as ``gen_skipped`` (the generator never buffers without bound).

Hot path rules: pre-built frame templates patched with ``struct.pack_into``; the
receiver walks frame headers with ``struct.unpack_from`` and checks payloads
through ``memoryview`` slices without copying them; no per-packet tasks or futures.
"""

from __future__ import annotations

import array
import asyncio
import json
import multiprocessing
import multiprocessing.connection
import os
import random
import resource
import struct
import time
import zlib
from dataclasses import dataclass
from typing import Any, cast

import h11

from derp import frames
from derp.keys import PrivateKey, PublicKey, seal

__all__ = [
    "Target",
    "LoadSpec",
    "WorkerPool",
    "run_load",
    "open_idle_clients",
    "IdleClients",
    "WINDOW",
]

WINDOW = 32
HELLO_LEN = 64
TICK_S = 0.001
GEN_BUFFER_LIMIT = 1 << 20
MISSING_LIMIT = 1 << 16  # skipped sequence numbers remembered per pair (to tell late from dup)
_HDR = struct.Struct(">BI")
_TS = struct.Struct(">q")
_PH = struct.Struct(">qQI")  # send time, seq, pair tag
_CRC = struct.Struct(">I")
_PH_LEN = 20
PAYLOAD_HEADER = 24  # _PH + crc32: the smallest packet size the generator can send
_TS_OFF = frames.HEADER_LEN + frames.KEY_LEN  # timestamp offset inside a frame
_CLIENT_INFO_JSON = json.dumps({"version": 2, "CanAckPings": False}).encode()


@dataclass(frozen=True)
class Target:
    """Where to send: ``kind`` is ``"derp"`` or ``"ceiling"``."""

    kind: str
    host: str
    port: int
    #: receivers connect here instead of ``port`` (derp_scale.py: another worker)
    recv_port: int | None = None


@dataclass(frozen=True)
class LoadSpec:
    """One measured case."""

    pairs: int
    size: int
    mode: str  # "closed" | "open"
    warmup: float = 1.0
    duration: float = 3.0
    rate: float = 100_000.0  # open loop: total offered packets/s over all pairs
    window: int = WINDOW
    drain: float = 1.0
    per_packet: bool = True  # one transport.write per packet (False: one per batch)


def raise_nofile_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# --------------------------------------------------------------------------- connections


class Clock:
    """Measurement window shared by all connections of a worker (ns, monotonic)."""

    __slots__ = ("m0", "m1", "stop", "lat")

    def __init__(self) -> None:
        self.m0 = 1 << 62
        self.m1 = 1 << 62
        self.stop = 1 << 62
        self.lat = array.array("q")


class GenConn(asyncio.Protocol):
    """One generator connection: handshake (DERP or ceiling), then a fast frame walker.

    Until ``ready`` resolves, bytes go through h11 and :class:`frames.FrameDecoder`;
    afterwards :meth:`data_received` walks frame headers in place and reports
    data frames to ``pair.delivered`` (receivers only).
    """

    def __init__(
        self,
        target: Target,
        key: PrivateKey | None,
        raw_key: bytes,
        dst_key: bytes,
        clock: Clock,
    ) -> None:
        self.target = target
        self.key = key
        self.raw_key = raw_key
        self.dst_key = dst_key
        self.clock = clock
        self.transport: asyncio.Transport | None = None
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.pair: Pair | None = None
        self.data_type = frames.FrameType.RECV_PACKET if target.kind == "derp" else 0x04
        self.rest = b""
        self.fast = False
        self.h11: h11.Connection | None = None
        self.dec: frames.FrameDecoder | None = None
        self.got_server_key = False
        self.other_frames = 0
        #: why the connection failed after the handshake (e.g. an oversized WebSocket message)
        self.error = ""

    # -- handshake
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = tr = cast(asyncio.Transport, transport)  # uvloop's: no subclass
        if self.target.kind == "ceiling":
            tr.write(self.raw_key + self.dst_key)
            self.fast = True
            self.ready.set_result(None)
            return
        self.h11 = h11.Connection(h11.CLIENT)
        host = f"{self.target.host}:{self.target.port}"
        req = h11.Request(
            method="GET",
            target="/derp",
            headers=[("Host", host), ("Upgrade", "DERP"), ("Connection", "Upgrade")],
        )
        tr.write((self.h11.send(req) or b"") + (self.h11.send(h11.EndOfMessage()) or b""))

    def _fail(self, why: str) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(why))
        if self.transport is not None:
            self.transport.close()

    def _handshake(self, data: bytes) -> None:
        if self.dec is None:
            assert self.h11 is not None
            self.h11.receive_data(data)
            while True:
                ev = self.h11.next_event()
                if ev is h11.NEED_DATA:
                    return
                if isinstance(ev, h11.InformationalResponse) and ev.status_code == 101:
                    continue
                if self.h11.our_state is h11.SWITCHED_PROTOCOL:
                    break
                if isinstance(ev, (h11.Response, h11.InformationalResponse)):
                    self._fail(f"upgrade refused: HTTP {ev.status_code}")
                    return
                if ev is h11.PAUSED:
                    break
                self._fail(f"unexpected HTTP event {ev!r}")
                return
            if self.h11.our_state is not h11.SWITCHED_PROTOCOL:
                self._fail("server did not switch protocols")
                return
            data = self.h11.trailing_data[0]
            self.dec = frames.FrameDecoder()
        self.dec.feed(data)
        for fr in self.dec:
            if not self.got_server_key:
                sk = frames.parse_frame(fr.type, fr.payload)
                if not isinstance(sk, frames.ServerKey):
                    self._fail(f"first frame is type {fr.type:#x}, not ServerKey")
                    return
                assert self.key is not None and self.transport is not None
                sealed = seal(self.key, PublicKey(sk.key), _CLIENT_INFO_JSON)
                self.transport.write(frames.encode_client_info(self.key.public.raw, sealed))
                self.got_server_key = True
            elif not self.fast:
                if fr.type != frames.FrameType.SERVER_INFO:
                    self._fail(f"expected ServerInfo, got type {fr.type:#x}")
                    return
                self.fast = True
                if not self.ready.done():
                    self.ready.set_result(None)
            else:  # frames that arrived in the same read as ServerInfo
                self._count(fr.type, fr.payload)
        if self.fast and self.dec.buffered == 0:
            self.dec = None
            self.h11 = None

    def _count(self, ftype: int, payload: bytes) -> None:
        if ftype == self.data_type and self.pair is not None:
            self._walk(_HDR.pack(ftype, len(payload)) + payload)
        else:
            self.other_frames += 1

    # -- steady state
    def data_received(self, data: bytes) -> None:
        if not self.fast or self.dec is not None:
            try:
                self._handshake(data)
            except Exception as exc:  # noqa: BLE001 - bench: report and drop the conn
                self._fail(f"handshake error: {exc!r}")
            return
        if self.rest:
            data = self.rest + data
        self._walk(data)

    def _walk(self, data: bytes) -> None:
        """Check and count every complete frame of ``data``; keep the partial tail."""
        n = len(data)
        mv = memoryview(data)
        pos = 0
        cnt = 0
        now = time.monotonic_ns()
        clock = self.clock
        inwin = clock.m0 <= now < clock.m1
        lat = clock.lat if inwin else None
        dtype = self.data_type
        hdr = _HDR.unpack_from
        ph = _PH.unpack_from
        crc_of = _CRC.unpack_from
        crc32 = zlib.crc32
        pair = self.pair
        if pair is None:
            src, tag, expect = b"", -1, 0
        else:
            src = pair.src_key_seen
            tag = pair.tag
            expect = pair.expect
        mis = bad = dup = gaps = late = fresh = 0
        while n - pos >= 5:
            t, ln = hdr(data, pos)
            end = pos + 5 + ln
            if end > n:
                break
            if t == dtype and ln >= frames.KEY_LEN + PAYLOAD_HEADER:
                cnt += 1
                p = pos + _TS_OFF
                sent_ns, seq, got_tag = ph(data, p)
                if got_tag != tag or not data.startswith(src, pos + 5):
                    mis += 1
                elif crc32(mv[p : p + _PH_LEN], crc32(mv[p + PAYLOAD_HEADER : end])) != crc_of(
                    data, p + _PH_LEN
                )[0]:
                    bad += 1
                elif seq >= expect:
                    if seq > expect:
                        gaps += seq - expect
                        if pair is not None:
                            pair.note_gap(expect, seq)
                    expect = seq + 1
                    fresh += 1
                    if lat is not None:
                        lat.append(now - sent_ns)
                elif pair is not None and seq in pair.missing:
                    pair.missing.discard(seq)  # late, not duplicated: it fills its gap
                    late += 1
                    gaps -= 1
                    fresh += 1
                else:
                    dup += 1
            else:
                self.other_frames += 1
            pos = end
        self.rest = data[pos:] if pos < n else b""
        if cnt and pair is not None:
            pair.expect = expect
            if mis or bad or dup or gaps or late:
                pair.misdelivered += mis
                pair.corrupted += bad
                pair.duplicated += dup
                pair.gaps += gaps
                pair.reordered += late
            pair.valid += fresh
            pair.delivered(cnt, inwin)

    def pause_writing(self) -> None:
        pass

    def resume_writing(self) -> None:
        pass

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"connection lost: {exc!r}"))
        elif not self.error and self.clock.stop > time.monotonic_ns():
            self.error = f"connection lost during the run: {exc!r}"
        if not self.closed.done():
            self.closed.set_result(None)


class Pair:
    """A sender connection and a receiver connection, with the pair's counters."""

    __slots__ = (
        "sender",
        "receiver",
        "frame_len",
        "template",
        "max_batch",
        "closed_loop",
        "window",
        "inflight",
        "sent",
        "recv",
        "win_recv",
        "running",
        "last_progress",
        "gen_skipped",
        "stalls",
        "per_packet",
        "tag",
        "seq",
        "body_crc",
        "src_key_seen",
        "expect",
        "valid",
        "misdelivered",
        "corrupted",
        "duplicated",
        "gaps",
        "reordered",
        "missing",
    )

    def __init__(
        self, sender: GenConn, receiver: GenConn, size: int, window: int, per_packet: bool = False
    ) -> None:
        if size < PAYLOAD_HEADER:
            raise ValueError(f"packet size {size} < {PAYLOAD_HEADER} (the verified header)")
        self.sender = sender
        self.receiver = receiver
        self.frame_len = frames.HEADER_LEN + frames.KEY_LEN + size
        self.max_batch = max(window, 256)
        self.per_packet = per_packet
        self.tag = random.getrandbits(32)
        body = random.Random(self.tag).randbytes(size - PAYLOAD_HEADER)
        self.body_crc = zlib.crc32(body)
        one = frames.encode_send_packet(receiver.raw_key, bytes(PAYLOAD_HEADER) + body)
        self.template = bytearray(one * (1 if per_packet else self.max_batch))
        self.seq = 0
        # DERP delivers RecvPacket(src = sender); the ceiling relay forwards the
        # SendPacket verbatim, so the key field is the receiver's own key.
        self.src_key_seen = sender.raw_key if sender.target.kind == "derp" else receiver.raw_key
        self.expect = 0
        self.valid = 0
        self.misdelivered = 0
        self.corrupted = 0
        self.duplicated = 0
        self.gaps = 0
        self.reordered = 0
        #: skipped sequence numbers not seen yet (bounded: a huge gap is not tracked)
        self.missing: set[int] = set()
        self.closed_loop = True
        self.window = window
        self.inflight = 0
        self.sent = 0
        self.recv = 0
        self.win_recv = 0
        self.running = False
        self.last_progress = 0
        self.gen_skipped = 0
        self.stalls = 0
        receiver.pair = self

    def note_gap(self, first: int, stop: int) -> None:
        """Sequence numbers ``first .. stop-1`` were skipped: remember them (bounded)."""
        if len(self.missing) + stop - first <= MISSING_LIMIT:
            self.missing.update(range(first, stop))

    def send(self, k: int) -> None:
        """Write ``k`` packets (``k <= max_batch``), stamped now: one write, or one each."""
        flen = self.frame_len
        tmpl = self.template
        mv = memoryview(tmpl)
        now = time.monotonic_ns()
        pack = _PH.pack_into
        pack_crc = _CRC.pack_into
        crc32 = zlib.crc32
        body_crc = self.body_crc
        tag = self.tag
        seq = self.seq
        tr = self.sender.transport
        assert tr is not None
        if self.per_packet:
            off = _TS_OFF
            for _ in range(k):
                pack(tmpl, off, now, seq, tag)
                pack_crc(tmpl, off + _PH_LEN, crc32(mv[off : off + _PH_LEN], body_crc))
                seq += 1
                tr.write(bytes(tmpl))
        else:
            off = _TS_OFF
            for _ in range(k):
                pack(tmpl, off, now, seq, tag)
                pack_crc(tmpl, off + _PH_LEN, crc32(mv[off : off + _PH_LEN], body_crc))
                seq += 1
                off += flen
            tr.write(bytes(mv[: k * flen]))
        self.seq = seq
        self.sent += k
        self.inflight += k

    def delivered(self, k: int, inwin: bool) -> None:
        self.recv += k
        self.inflight -= k
        if inwin:
            self.win_recv += k
        if self.closed_loop:
            self.last_progress = time.monotonic_ns()
            if self.running:
                want = self.window - self.inflight
                if want > 0:
                    self.send(want)


# --------------------------------------------------------------------------- worker side


async def _connect(
    target: Target, key: PrivateKey | None, raw: bytes, dst: bytes, clock: Clock
) -> GenConn:
    loop = asyncio.get_running_loop()
    _, proto = await loop.create_connection(
        lambda: GenConn(target, key, raw, dst, clock), target.host, target.port
    )
    await asyncio.wait_for(proto.ready, 30)
    return proto


async def _connect_many(
    target: Target, n: int, clock: Clock, dsts: list[bytes] | None = None, concurrency: int = 32
) -> list[GenConn]:
    """Open ``n`` handshaked connections (keys generated here), ``concurrency`` at a time."""
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> GenConn:
        async with sem:
            if target.kind == "derp":
                key: PrivateKey | None = PrivateKey.generate()
                assert key is not None
                raw = key.public.raw
            else:
                key = None
                raw = os.urandom(32)
            dst = dsts[i] if dsts is not None else bytes(32)
            return await _connect(target, key, raw, dst, clock)

    return list(await asyncio.gather(*(one(i) for i in range(n))))


async def _run_pairs(
    pipe: multiprocessing.connection.Connection, target: Target, n_pairs: int, spec: LoadSpec
) -> None:
    clock = Clock()
    # receivers first: the ceiling relay needs a sender's destination key up front
    rtarget = target if target.recv_port is None else Target(target.kind, target.host, target.recv_port)
    receivers = await _connect_many(rtarget, n_pairs, clock)
    senders = await _connect_many(target, n_pairs, clock, dsts=[r.raw_key for r in receivers])
    pairs = [Pair(s, r, spec.size, spec.window, spec.per_packet) for s, r in zip(senders, receivers)]
    for p in pairs:
        p.closed_loop = spec.mode == "closed"
    pipe.send(("ready", 2 * n_pairs))
    msg = pipe.recv()
    assert msg[0] == "go", msg
    _, t_start, m0, m1, t_stop = msg
    clock.m0, clock.m1, clock.stop = m0, m1, t_stop
    cpu: dict[str, float] = {}
    loop = asyncio.get_running_loop()

    def at(t_ns: int) -> float:
        return max(0.0, (t_ns - time.monotonic_ns()) / 1e9)

    loop.call_later(at(m0), lambda: cpu.__setitem__("c0", time.process_time()))
    loop.call_later(at(m1), lambda: cpu.__setitem__("c1", time.process_time()))
    await asyncio.sleep(at(t_start))
    if spec.mode == "closed":
        now = time.monotonic_ns()
        for p in pairs:
            p.running = True
            p.last_progress = now
            p.send(spec.window)
        while time.monotonic_ns() < t_stop:
            await asyncio.sleep(0.05)
            now = time.monotonic_ns()
            for p in pairs:  # recover from a loss instead of stalling the pair forever
                if p.inflight > 0 and now - p.last_progress > 1_000_000_000:
                    p.stalls += 1
                    p.inflight = 0
                    p.last_progress = now
                    p.send(spec.window)
        for p in pairs:
            p.running = False
    else:
        await _open_loop(pairs, spec.rate, t_stop)  # spec.rate is per pair in workers
    # drain: wait until every sent packet arrived or the drain period ends
    deadline = time.monotonic_ns() + int(spec.drain * 1e9)
    while time.monotonic_ns() < deadline and any(p.valid < p.sent for p in pairs):
        await asyncio.sleep(0.02)
    lat = clock.lat
    result: dict[str, Any] = {
        "sent": sum(p.sent for p in pairs),
        "recv": sum(p.recv for p in pairs),
        "valid": sum(p.valid for p in pairs),
        "misdelivered": sum(p.misdelivered for p in pairs),
        "corrupted": sum(p.corrupted for p in pairs),
        "duplicated": sum(p.duplicated for p in pairs),
        "gaps": sum(p.gaps for p in pairs),
        "reordered": sum(p.reordered for p in pairs),
        "errors": [c.error for c in receivers + senders if c.error],
        "win_recv": sum(p.win_recv for p in pairs),
        "gen_skipped": sum(p.gen_skipped for p in pairs),
        "stalls": sum(p.stalls for p in pairs),
        "other_frames": sum(c.other_frames for c in receivers + senders),
        "lat": lat.tobytes(),
        "cpu": cpu.get("c1", time.process_time()) - cpu.get("c0", 0.0),
    }
    pipe.send(("result", result))
    msg = pipe.recv()
    for c in receivers + senders:
        if c.transport is not None:
            c.transport.close()


async def _open_loop(pairs: list[Pair], rate_per_pair: float, t_stop: int) -> None:
    """Offer ``rate_per_pair`` packets/s per pair on a 1 ms tick until ``t_stop``."""
    loop = asyncio.get_running_loop()
    t0 = time.monotonic_ns()
    offered = [0] * len(pairs)
    done = loop.create_future()

    def tick() -> None:
        now = time.monotonic_ns()
        if now >= t_stop:
            done.set_result(None)
            return
        due_total = int((now - t0) * rate_per_pair / 1e9)
        for i, p in enumerate(pairs):
            due = due_total - offered[i]
            if due <= 0:
                continue
            tr = p.sender.transport
            if tr is None or tr.is_closing():
                continue
            offered[i] += due
            if tr.get_write_buffer_size() > GEN_BUFFER_LIMIT:
                p.gen_skipped += due
                continue
            while due > 0:
                k = min(due, p.max_batch)
                p.send(k)
                due -= k
        loop.call_later(TICK_S, tick)

    tick()
    await done


def _pairs_worker(
    pipe: multiprocessing.connection.Connection, target: Target, n_pairs: int, spec: LoadSpec
) -> None:
    import uvloop

    raise_nofile_limit()
    try:
        uvloop.run(_run_pairs(pipe, target, n_pairs, spec))
    except Exception as exc:  # noqa: BLE001 - report to the runner instead of hanging it
        pipe.send(("error", repr(exc)))


# --------------------------------------------------------------------------- runner side


class WorkerPool:
    """Forked worker processes, each with a duplex pipe to the runner."""

    def __init__(self) -> None:
        self.ctx = multiprocessing.get_context("fork")
        self.procs: list[tuple[multiprocessing.process.BaseProcess, Any]] = []

    def start(self, fn: Any, *args: Any) -> None:
        parent, child = self.ctx.Pipe()
        proc = self.ctx.Process(target=fn, args=(child, *args), daemon=True)
        proc.start()
        child.close()
        self.procs.append((proc, parent))

    def recv_all(self, expect: str, timeout: float) -> list[Any]:
        out = []
        for proc, pipe in self.procs:
            if not pipe.poll(timeout):
                raise TimeoutError(f"worker {proc.pid} sent no {expect!r} in {timeout}s")
            msg = pipe.recv()
            if msg[0] != expect:
                raise RuntimeError(f"worker {proc.pid}: {msg}")
            out.append(msg[1])
        return out

    def send_all(self, msg: tuple[Any, ...]) -> None:
        for _, pipe in self.procs:
            pipe.send(msg)

    def close(self) -> None:
        for proc, pipe in self.procs:
            try:
                pipe.send(("close",))
            except OSError:
                pass
        for proc, _ in self.procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        self.procs.clear()


def run_load(
    target: Target,
    spec: LoadSpec,
    workers: int = 2,
    on_window_start: Any = None,
    on_window_end: Any = None,
) -> dict[str, Any]:
    """Run one case and return aggregated results.

    ``on_window_start``/``on_window_end`` are called by the runner at the window
    boundaries (used to sample the server's CPU time and RSS).
    """
    n_workers = max(1, min(workers, spec.pairs))
    split = [spec.pairs // n_workers + (1 if i < spec.pairs % n_workers else 0) for i in range(n_workers)]
    # the per-pair offered rate is the same everywhere: total / pairs
    per_pair_spec = _with_total_pairs(spec)
    pool = WorkerPool()
    try:
        for n in split:
            pool.start(_pairs_worker, target, n, per_pair_spec)
        pool.recv_all("ready", 60)
        now = time.monotonic_ns()
        t_start = now + 200_000_000
        m0 = t_start + int(spec.warmup * 1e9)
        m1 = m0 + int(spec.duration * 1e9)
        t_stop = m1
        pool.send_all(("go", t_start, m0, m1, t_stop))
        _sleep_until(m0)
        start_sample = on_window_start() if on_window_start else None
        _sleep_until(m1)
        end_sample = on_window_end() if on_window_end else None
        results = pool.recv_all("result", spec.drain + 60)
    finally:
        pool.close()
    lat = array.array("q")
    for r in results:
        part = array.array("q")
        part.frombytes(r["lat"])
        lat.extend(part)
    lat_sorted = sorted(lat)
    window_s = spec.duration
    agg: dict[str, Any] = {
        "sent": sum(r["sent"] for r in results),
        "recv": sum(r["recv"] for r in results),
        "valid": sum(r["valid"] for r in results),
        "misdelivered": sum(r["misdelivered"] for r in results),
        "corrupted": sum(r["corrupted"] for r in results),
        "duplicated": sum(r["duplicated"] for r in results),
        "gaps": sum(r["gaps"] for r in results),
        "reordered": sum(r["reordered"] for r in results),
        "errors": [e for r in results for e in r["errors"]],
        "win_recv": sum(r["win_recv"] for r in results),
        "gen_skipped": sum(r["gen_skipped"] for r in results),
        "stalls": sum(r["stalls"] for r in results),
        "other_frames": sum(r["other_frames"] for r in results),
        "gen_cpu_s": sum(r["cpu"] for r in results),
        "window_s": window_s,
        "workers": n_workers,
        "start_sample": start_sample,
        "end_sample": end_sample,
    }
    agg["pps"] = agg["win_recv"] / window_s
    agg["mbps"] = agg["pps"] * spec.size / 1e6
    agg["lost"] = max(0, agg["sent"] - agg["valid"])
    agg["loss"] = agg["lost"] / agg["sent"] if agg["sent"] else 0.0
    agg["bad"] = agg["misdelivered"] + agg["corrupted"] + agg["duplicated"] + agg["reordered"]
    agg["p50_us"] = _pct(lat_sorted, 0.50) / 1e3
    agg["p99_us"] = _pct(lat_sorted, 0.99) / 1e3
    agg["lat_samples"] = len(lat_sorted)
    return agg


def _with_total_pairs(spec: LoadSpec) -> LoadSpec:
    rate_per_pair = spec.rate / max(1, spec.pairs)
    return LoadSpec(
        pairs=spec.pairs,
        size=spec.size,
        mode=spec.mode,
        warmup=spec.warmup,
        duration=spec.duration,
        rate=rate_per_pair,  # inside workers, rate means per pair
        window=spec.window,
        drain=spec.drain,
        per_packet=spec.per_packet,
    )


def _pct(sorted_values: list[int], q: float) -> float:
    if not sorted_values:
        return float("nan")
    i = min(len(sorted_values) - 1, int(q * len(sorted_values)))
    return float(sorted_values[i])


def _sleep_until(t_ns: int) -> None:
    delay = (t_ns - time.monotonic_ns()) / 1e9
    if delay > 0:
        time.sleep(delay)


# --------------------------------------------------------------------------- idle clients


async def _run_idle(pipe: multiprocessing.connection.Connection, target: Target, n: int) -> None:
    clock = Clock()
    conns = await _connect_many(target, n, clock, concurrency=32)
    pipe.send(("ready", len(conns)))
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, pipe.recv)  # keep the loop free for KeepAlives
    for c in conns:
        if c.transport is not None:
            c.transport.close()
    await asyncio.sleep(0)


def _idle_worker(pipe: multiprocessing.connection.Connection, target: Target, n: int) -> None:
    import uvloop

    raise_nofile_limit()
    try:
        uvloop.run(_run_idle(pipe, target, n))
    except Exception as exc:  # noqa: BLE001
        pipe.send(("error", repr(exc)))


class IdleClients:
    """Handshaked idle DERP clients held open by worker processes until :meth:`close`."""

    def __init__(self) -> None:
        self.pools: list[WorkerPool] = []
        self.count = 0

    def add(self, target: Target, n: int, procs: int = 2, timeout: float = 300) -> int:
        pool = WorkerPool()
        self.pools.append(pool)
        split = [n // procs + (1 if i < n % procs else 0) for i in range(procs)]
        for k in split:
            if k:
                pool.start(_idle_worker, target, k)
        got = sum(int(n) for n in pool.recv_all("ready", timeout))
        self.count += got
        return got

    def close(self) -> None:
        for pool in self.pools:
            pool.close()
        self.pools.clear()
        self.count = 0


def open_idle_clients(target: Target, n: int, procs: int = 2) -> IdleClients:
    """Open ``n`` idle handshaked clients across ``procs`` worker processes."""
    idle = IdleClients()
    idle.add(target, n, procs)
    return idle
