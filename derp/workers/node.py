"""One worker of ``derper --workers N``: its links to the sibling workers (asyncio).

Every worker is a full :class:`~derp.server.DerpServer` on the shared port
(``SO_REUSEPORT``: the kernel picks the worker of each new connection).
:class:`WorkerNode` attaches to it as a :class:`derp.peers.PeerRelays` (like
the DERP mesh) and joins the siblings through Unix-domain sockets::

    worker i listens on  <dir>/w<i>.sock ;  worker i dials every j < i
    both ends send HELLO, then the full state (PRESENT for every local key),
    then stream PRESENT / GONE / ACTIVE / FRAMES / PACKET / PAUSE / RESUME / STATS
    (derp.workers.link)

Presence and routing (the server's shared :class:`~derp.peers.RouteTable`;
sibling links are *preferred*, so they win over mesh routes):

* a local registration → PRESENT(key) to every sibling (+ ACTIVE(key) if a
  sibling also holds the key: the new connection is the most recent one);
* the last local connection of a key leaving → GONE(key);
* PRESENT(key) from sibling j → route key via j; ``relay.elsewhere[key]``
  counts the siblings holding key;
* GONE(key) from j, or link j breaking (worker died) → the route goes; a key
  left with no route and no local connection owes PeerGone(Disconnected) to
  every local client that received packets from it
  (:meth:`~derp.server.context.ConnContext.unreachable`, as for the mesh).

Behaviours across workers:

* relaying: ``relay.active[key]`` for a key received on sibling j is a
  :class:`_StandIn`, so the sender's packet path treats it like a local
  connection: what it "writes" there (RecvPacket frames, rewritten in place)
  is staged on the link, and when the link writes, everything staged for that
  key becomes one FRAMES link frame carrying the source key, all of it in one
  ``writev``. Worker j appends the frames unchanged to its client's write
  batch (one write per client per link read) and subscribes the client to
  PeerGone for the source. Destinations that are paused or gone take the
  per-packet path (queues and drop rules as for any forwarded packet).
  ``forward`` (PACKET frames) serves the rest: a route in use without a
  stand-in yet;
* when a link writes (:meth:`_Link._flush`): at the end of the loop iteration
  if it has been idle for ``hold`` (default :data:`LINK_HOLD`, 1 ms;
  ``--worker-link-hold``), so light traffic gets no added latency; a link that
  wrote less than ``hold`` ago is busy and holds relayed packets until
  ``hold`` has passed since that write, so under load one write and one
  wake-up of the sibling carry many packets (at most ``hold`` of added latency
  for a crossing packet). Presence and control frames, and
  :data:`LINK_HOLD_BYTES` of staged packets, are written at once (staged
  packets first: order on a link is always kept);
* NotHere: a worker knows every key of the host, so an unknown key is unknown
  everywhere (up to the link latency);
* duplicate keys: the most recently active connection wins wherever it is. A
  worker whose connection of key registers or speaks while a sibling was
  active sends ACTIVE(key); the others :meth:`~derp.relay.Relay.step_aside`
  (their ``active[key]`` becomes the stand-in for that sibling) until one of
  their own connections of key speaks again. Connections registered on two
  workers before either heard of the other (no ACTIVE either way): on the
  sibling's PRESENT the lower worker index wins, until one speaks. Two ACTIVE
  crossing on a link are ordered by their Lamport stamps (``derp.workers.link``):
  both ends keep the later claim, so exactly one worker receives. Health
  frames tell every connection of a key split across workers it has a
  duplicate, and the last one left that it is healthy again;
* mesh: every worker dials the ``--mesh-with`` peers itself; a WatchConns
  answer includes the siblings' keys (``ConnContext.sibling_presence``) and
  watchers hear PeerPresent/PeerGone when a key appears on / leaves the whole
  host; a ForwardPacket from a mesh peer may cross to a sibling (one hop);
* metrics: every :data:`~derp.workers.stats.STATS_INTERVAL` each worker sends
  its counters to every sibling; ``/metrics`` and ``/debug/`` on any worker
  show the totals, and ``/metrics`` a few ``derp_worker_*{worker="i"}``
  families besides (:mod:`derp.workers.stats`); ``/dashboard`` shows the same
  totals and one line per worker (``DerpServer.workers_view``).

Backpressure, so one stalled or flooded client costs the others nothing:

* a client whose socket is full (``pause_writing``) makes its worker send
  PAUSE(key) to every sibling, RESUME(key) when it drains; meanwhile the
  sibling's stand-in is paused, so packets for it queue there under the
  connection code's own rules (``queue_depth``, oldest dropped) instead of
  crossing the link to be dropped on arrival. Packets already on the way are
  queued on arrival; the sibling had counted them as sent, so they are
  subtracted from the host totals (``recounted``);
* a link with more than :data:`LINK_HIGH` unsent (its transport's
  ``pause_writing``) is congested: the stand-ins that staged more than
  :data:`LINK_SHARE` of it queue the same way until it is down to a quarter;
  light traffic behind the same link goes on;
* a link whose staged and pending bytes plus socket buffer exceed
  :data:`MAX_LINK_BUFFER` refuses packets (counted as ``write_error`` drops);
  presence frames are always queued (small, and losing one would leave a stale
  route). A staged slice of a read over :data:`PIN_LIMIT` is copied, so held
  packets never pin large reads; packets staged on a link that breaks are
  dropped and counted.

Invariants: ``relay.elsewhere[k]`` equals the number of up links whose sibling
announced ``k``; a key appears in ``routes`` via link j iff j announced it and
has not said GONE; nothing here blocks the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import struct
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Final, cast

from ..frames import (
    HEADER_LEN,
    FrameType,
    PeerGoneReason,
    encode_peer_gone,
    encode_peer_present,
    looks_like_disco,
)
from ..server.app import DerpServer
from ..server.conn import DUPLICATE_KEY_HEALTH, DerpConnection, _count_recv_packets
from ..metrics import DerpMetrics
from ..stats import (
    GONE_DISCONNECTED,
    KIND_DISCO,
    KIND_OTHER,
    UNKNOWN_DEST_ON_FWD,
    WRITE_ERROR,
    ServerStats,
)
from .link import (
    MAX_FRAMES_LEN,
    Active,
    ClosePeer,
    Frames,
    Gone,
    Hello,
    LinkDecoder,
    LinkEncoder,
    LinkError,
    Packet,
    Pause,
    Present,
    Resume,
    Stats,
)
from .stats import STATS_INTERVAL, WorkerCollector, decode_stats, encode_stats, merge_stats

__all__ = ["MAX_LINK_BUFFER", "WorkerNode", "WorkerSpec", "socket_path"]

log = logging.getLogger("derp.workers")

_RECV_HDR: Final = struct.Struct(">BI")
_RECV: Final = FrameType.RECV_PACKET.value
_OPEN: Final = 1  # DerpConnection's open state (derp.server.conn)

#: A link holding this many unsent bytes refuses further packets (drops).
MAX_LINK_BUFFER: Final = 8 << 20
#: Default longest time a busy link holds relayed packets to batch them (seconds).
LINK_HOLD: Final = 0.001
#: A link writes at once when this many packet bytes are waiting, held or not.
LINK_HOLD_BYTES: Final = 64 << 10
#: A link whose socket buffer holds this much unsent data is congested: the
#: stand-ins that sent more than LINK_SHARE of it queue (as a paused client
#: would) until the buffer is down to a quarter, so one client's flood does not
#: crowd out the others behind the same link.
LINK_HIGH: Final = 1 << 20
LINK_SHARE: Final = 256 << 10
#: A staged slice of a read larger than this (and under half of it) is copied,
#: so held slices pin at most this much each.
PIN_LIMIT: Final = 16 << 10
_DIAL_RETRY: Final = 0.05
#: ACTIVE stamps are u64 on the wire; the clock stops there.
_MAX_STAMP: Final = (1 << 64) - 1


def socket_path(sock_dir: str, index: int) -> str:
    """The Unix socket worker ``index`` listens on."""
    return os.path.join(sock_dir, f"w{index}.sock")


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """Who this worker is: its index among ``count`` workers and the socket directory."""

    index: int
    count: int
    sock_dir: str
    #: longest hold of relayed packets on a busy link, seconds (0: never hold)
    hold: float = LINK_HOLD


class _Link(asyncio.Protocol):
    """One Unix-socket link to a sibling worker (a :class:`derp.peers.Forwarder`)."""

    def __init__(self, node: WorkerNode, dialled_index: int | None) -> None:
        self.node = node
        self.loop = node.loop
        self.index: int | None = dialled_index
        self.enc = LinkEncoder()
        self.dec = LinkDecoder()
        self.transport: asyncio.Transport | None = None
        self.up = False
        self.closed: asyncio.Future[None] = self.loop.create_future()
        self._flush_pending = False
        #: the next flush writes even if the link is holding (a control frame waits)
        self._urgent = False
        self._hold_ns = int(node.spec.hold * 1e9)
        self._hold_timer: asyncio.TimerHandle | None = None
        self._last_write = 0
        #: stand-ins holding RecvPacket frames for this link, and their bytes
        self.staged: list[_StandIn] = []
        self.staged_bytes = 0
        #: the socket buffer is over LINK_HIGH (asyncio's pause_writing)
        self.congested = False
        #: counts the times the link's buffer was found empty at a write: a
        #: stand-in's bytes "in the backlog" are those since that epoch
        self.epoch = 0
        #: keys the sibling announced → their 51-byte PeerPresent payload
        self.keys: dict[bytes, bytes] = {}
        self.packets_out = 0

    def __repr__(self) -> str:
        return f"_Link(w{self.index})"

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=LINK_HIGH, low=LINK_HIGH // 4)
        spec = self.node.spec
        self.enc.hello(spec.index, spec.count, os.getpid())
        self._write()

    def data_received(self, data: bytes) -> None:
        try:
            self.dec.receive_data(data)
        except LinkError as exc:
            log.warning("workers: link to w%s: %s; closing it", self.index, exc)
            self.abort()
            return
        self.node._link_events(self, self.dec.events_received())

    def eof_received(self) -> bool | None:
        return False

    def pause_writing(self) -> None:
        """The link is congested: its heavy senders queue (see LINK_HIGH)."""
        self.congested = True
        for si in self.node.stand_ins.values():
            if si.link is self and si.share() > LINK_SHARE:
                si.set_local_pause(True)

    def resume_writing(self) -> None:
        self.congested = False
        self.epoch += 1
        for si in list(self.node.stand_ins.values()):
            if si.link is self and si._lpaused:
                si.set_local_pause(False)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self._hold_timer is not None:
            self._hold_timer.cancel()
            self._hold_timer = None
        self._drop_staged()
        self.node._link_lost(self)
        if not self.closed.done():
            self.closed.set_result(None)

    # Forwarder

    def forward(self, src: bytes, dst: bytes, packet: memoryview) -> bool:
        """Queue a packet for the sibling; false (dropped) if the link is backed up."""
        t = self.transport
        if t is None or not self.up:
            return False
        if self.backed_up(t):
            return False
        if self.staged:
            self._drain_staged()  # frames staged for dst before this packet go first
        self.enc.packet(src, dst, packet)
        self.packets_out += 1
        self.schedule_flush()
        return True

    # writing

    def backed_up(self, t: asyncio.Transport) -> bool:
        """Whether the link holds more than MAX_LINK_BUFFER unsent bytes."""
        return self.enc.pending_bytes + self.staged_bytes + t.get_write_buffer_size() > MAX_LINK_BUFFER

    def urge(self) -> None:
        """What is staged goes out at the end of this iteration (no hold)."""
        self._urgent = True
        self.schedule_flush()

    def control(self) -> LinkEncoder:
        """The encoder, for a presence/control frame: staged packet frames are
        queued first (order kept) and this iteration's flush writes at once."""
        if self.staged:
            self._drain_staged()
        self.urge()
        return self.enc

    def stage(self, si: _StandIn) -> None:
        """``si`` holds frames for this link (called once per stand-in per batch)."""
        self.staged.append(si)
        if self._hold_timer is None or self.staged_bytes >= LINK_HOLD_BYTES:
            self.schedule_flush()

    def schedule_flush(self) -> None:
        if not self._flush_pending and self.transport is not None:
            self._flush_pending = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        """End of a loop iteration: write what is queued, or hold it.

        A link that wrote less than ``hold`` ago is busy: its relayed packets
        wait (a timer, at most ``hold``) so one write carries many of them and
        the sibling wakes once for all. A link idle for longer writes at once,
        so light traffic gets no added latency. Control frames
        (:meth:`control`) and LINK_HOLD_BYTES of packets always write at once.
        """
        self._flush_pending = False
        if self._hold_timer is not None:
            if not self._urgent and self.staged_bytes + self.enc.pending_bytes < LINK_HOLD_BYTES:
                return  # the timer writes
        elif not self._urgent and self._hold_ns and self.staged_bytes + self.enc.pending_bytes < LINK_HOLD_BYTES:
            if time.monotonic_ns() - self._last_write < self._hold_ns:
                self._hold_timer = self.loop.call_later(self._hold_ns / 1e9, self._held)
                return
        self._write()

    def _held(self) -> None:
        self._hold_timer = None
        self._write()

    def _write(self) -> None:
        """One ``writelines`` of everything queued (no join: the transport writes
        the buffers with one ``writev``)."""
        if self._hold_timer is not None:
            self._hold_timer.cancel()
            self._hold_timer = None
        self._urgent = False
        t = self.transport
        if t is not None and not t.get_write_buffer_size():
            self.epoch += 1  # no backlog: every stand-in's share starts with this write
        if self.staged:
            self._drain_staged()
        chunks = self.enc.chunks_to_send()
        if chunks and t is not None and not t.is_closing():
            t.writelines(chunks)
            self._last_write = time.monotonic_ns()

    def _drain_staged(self) -> None:
        """Queue every staged stand-in's frames as FRAMES link frames."""
        enc = self.enc
        for si in self.staged:
            self.packets_out += si.emit(enc)
        self.staged.clear()
        self.staged_bytes = 0

    def _drop_staged(self) -> None:
        """The link is gone: staged packets are dropped (counted)."""
        st = self.node.ctx.stats
        for si in self.staged:
            nbytes, count = si.discard()
            if count:
                st.drop((WRITE_ERROR, KIND_OTHER), nbytes, count)
        self.staged.clear()
        self.staged_bytes = 0

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class _StandIn:
    """In ``relay.active`` for a key whose receiving connection is on a sibling.

    It has what the packet path of :class:`DerpConnection` uses of a destination
    (``_out``, ``_outn``, ``_last_src``, ``_paused``, ``_state``, ``_transport``,
    ``_take``, ``_flush_out``, ``_push``, ``_send_ctrl``: see derp.server.conn), so a packet
    for a sibling's key costs what a local one does. What the packet path
    "writes" here is staged on the link (``_held``) until the link writes: then
    everything held for the key becomes one FRAMES link frame (several past
    MAX_FRAMES_LEN). Never paused: a backed-up link drops (``write_error``)
    instead. PeerGone owed to it is dropped (the sibling's own relay tells its
    clients).
    """

    __slots__ = ("key", "link", "node", "_out", "_outn", "_last_src", "_paused", "_state",
                 "_transport", "_held", "_heldn", "_hsrc", "_q", "_dq", "_q_since",
                 "_rpaused", "_lpaused", "_recent", "_epoch")

    def __init__(self, node: WorkerNode, key: bytes, link: _Link) -> None:
        self.node = node
        self.key = key
        self.link = link
        self._out: list[bytes | bytearray | memoryview] = []
        self._outn = 0
        self._last_src: object | None = None
        self._paused = False
        self._state = _OPEN
        self._transport = self
        #: whole RecvPacket frames staged on ``link`` (none unless in ``link.staged``)
        self._held: list[bytes | bytearray | memoryview] = []
        self._heldn = 0
        #: the key every held frame comes from; b"" if several or unknown
        self._hsrc = b""
        #: while the sibling's connection is paused (PAUSE), packets queue here
        #: under the connection code's own rules (DerpConnection._slow_deliver)
        self._q: deque[bytes] | None = None
        self._dq: deque[bytes] | None = None
        self._q_since = 0.0
        #: paused by the sibling (PAUSE), or here (its share of a congested link);
        #: ``_paused`` is either
        self._rpaused = False
        self._lpaused = False
        #: bytes written to the link in its epoch ``_epoch`` (see _Link.epoch);
        #: with what is held, this stand-in's share of the link's backlog
        self._recent = 0
        self._epoch = -1

    def __repr__(self) -> str:
        return f"_StandIn({self.key.hex()[:8]} via w{self.link.index})"

    @property
    def is_open(self) -> bool:
        return True

    @property
    def is_mesh(self) -> bool:
        return False

    # the transport side (called by the packet path's flush)

    def is_closing(self) -> bool:
        return self.link.transport is None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Stage whole RecvPacket frames from ``_last_src`` on the link (as the
        packet path calls it: ``_last_src`` is the connection whose read the
        frames come from)."""
        if not data:
            # Nothing, as for an asyncio transport: the packet path writes an empty
            # batch when a run's _take already flushed it (COALESCE_LIMIT), and an
            # empty FRAMES is a link protocol error (the sibling would drop the link).
            return
        last = self._last_src
        src = cast(DerpConnection, last)._key if last is not None else b""
        held = self._held
        link = self.link
        if held and link.staged_bytes < LINK_HOLD_BYTES:
            # Fast path: this batch already passed the checks of _stage and is
            # far below every bound; add to it.
            n = len(data)
            if type(data) is memoryview and 2 * n < len(data.obj) > PIN_LIMIT:  # type: ignore[arg-type]
                data = bytes(data)
            held.append(data)
            self._heldn += n
            link.staged_bytes += n
            if link.congested and self.share() > LINK_SHARE:
                self.set_local_pause(True)  # what follows queues here
            if src != self._hsrc:
                self._hsrc = b""
            return
        self._stage(data, src)

    def _stage(self, data: bytes | bytearray | memoryview, src: bytes) -> None:
        """Stage whole RecvPacket frames, all from ``src`` (b"": unknown) on the
        link, or drop them if it is down or backed up."""
        n = len(data)
        if not n:
            return
        link = self.link
        t = link.transport
        if t is None or not link.up or link.backed_up(t):
            self.node.ctx.stats.drop((WRITE_ERROR, KIND_OTHER), n, _count_recv_packets([data]))
            return
        if type(data) is memoryview and 2 * n < len(data.obj) > PIN_LIMIT:  # type: ignore[arg-type]
            data = bytes(data)  # a held slice must not pin a large read
        held = self._held
        if not held:
            self._hsrc = src
            link.stage(self)
        elif src != self._hsrc:
            self._hsrc = b""
        held.append(data)
        self._heldn += n
        link.staged_bytes += n
        if link.congested and self.share() > LINK_SHARE:
            self.set_local_pause(True)  # what follows queues here
        if link.staged_bytes >= LINK_HOLD_BYTES and link._hold_timer is not None:
            link.schedule_flush()

    def share(self) -> int:
        """Bytes of this stand-in in the link's backlog: written in the link's
        current epoch, plus held."""
        recent = self._recent if self._epoch == self.link.epoch else 0
        return recent + self._heldn

    def emit(self, enc: LinkEncoder) -> int:
        """Queue the held frames as FRAMES link frames; how many."""
        epoch = self.link.epoch
        if self._epoch != epoch:
            self._epoch = epoch
            self._recent = 0
        self._recent += self._heldn
        held = self._held
        key = self.key
        src = self._hsrc
        if self._heldn <= MAX_FRAMES_LEN:  # the usual case: one FRAMES
            enc.frames_parts(key, held, self._heldn, src)
            self._held = []
            self._heldn = 0
            return 1
        frames = 0
        group: list[bytes | bytearray | memoryview] = []
        size = 0
        for seg in held:
            n = len(seg)
            if group and size + n > MAX_FRAMES_LEN:
                enc.frames_parts(key, group, size, src)
                frames += 1
                group, size = [], 0
            if n > MAX_FRAMES_LEN:  # split at frame boundaries (a huge mesh-forwarded batch)
                pos = 0
                while pos < n:
                    end = pos
                    while end < n and end - pos < MAX_FRAMES_LEN // 2:
                        end += 5 + _RECV_HDR.unpack_from(seg, end)[1]
                    enc.frames(key, seg[pos:end], src)
                    frames += 1
                    pos = end
                continue
            group.append(seg)
            size += n
        if group:
            enc.frames_parts(key, group, size, src)
            frames += 1
        self._held = []
        self._heldn = 0
        return frames

    def discard(self) -> tuple[int, int]:
        """Forget the held frames; their bytes and packet count."""
        held = self._held
        out = (self._heldn, _count_recv_packets(held))
        self._held = []
        self._heldn = 0
        return out

    # what the connection code calls on a receiver

    def _push(self, frame: bytes) -> None:
        if self._out:  # behind what is already waiting in _out (order kept)
            self._out.append(frame)
        else:
            self._stage(frame, b"")  # a forwarded packet: its source is in the frame only

    def _take(
        self, seg: bytes | bytearray | memoryview, nbytes: int, touched: list[DerpConnection]
    ) -> None:
        """As :meth:`DerpConnection._take` (the caller set ``_last_src``), but
        staged on the link at once: the link's batch is the coalescing. If the
        packet path put frames in ``_out`` during this read (they are written
        at its end), ``seg`` goes behind them, so order is kept."""
        if self._out:
            self._out.append(seg)
        else:
            self.write(seg)

    def _flush_out(self) -> None:
        """Stage what was appended to ``_out`` directly (see :meth:`write`)."""
        out = self._out
        if not out:
            return
        self._outn = 0
        self._stage(out[0] if len(out) == 1 else b"".join(out), b"")
        out.clear()

    def _send_ctrl(self, frame: bytes) -> None:
        pass

    def send_control(self, frame: bytes) -> None:
        pass

    # the sibling's connection is paused (PAUSE / RESUME)

    def pause(self) -> None:
        """The sibling's connection is paused: queue packets here (bounded, head
        drop) until :meth:`resume`."""
        self._rpaused = self._paused = True

    def set_local_pause(self, on: bool) -> None:
        """This stand-in's share of a congested link: queue (on) or go on (off)."""
        self._lpaused = on
        if on:
            self._paused = True
        elif not self._rpaused:
            self._drain()

    def resume(self) -> None:
        """The sibling's connection takes writes again."""
        self._rpaused = False
        if not self._lpaused:
            self._drain()

    def _drain(self) -> None:
        """Stage what queued while paused (disco first, as a connection drains)."""
        if not self._paused:
            return
        self._paused = False
        parts: list[bytes] = []
        sent = nbytes = 0
        for q in (self._dq, self._q):
            if q:
                sent += len(q)
                nbytes += sum(len(f) for f in q) - 37 * len(q)
                parts.extend(q)
                q.clear()
        if parts:
            st = self.node.ctx.stats
            st.packets_sent += sent
            st.bytes_sent += nbytes
            if self._q_since:
                waited_ms = (time.monotonic() - self._q_since) * 1000.0
                st.average_queue_duration_ms += 0.1 * (waited_ms - st.average_queue_duration_ms)
            self._stage(b"".join(parts), b"")
            # The receiver has room again and packets keep queueing behind
            # these: they go out this iteration, not after the link's hold.
            self.link.urge()
        self._q_since = 0.0

    def discard_queues(self) -> None:
        """The key left the sibling: what queued here is dropped (counted)."""
        st = self.node.ctx.stats
        for q, kind in ((self._q, KIND_OTHER), (self._dq, KIND_DISCO)):
            if q:
                st.drop((GONE_DISCONNECTED, kind), sum(len(f) for f in q) - 37 * len(q), len(q))
                q.clear()
        self._paused = self._rpaused = self._lpaused = False
        self._q_since = 0.0

    def set_health(self, problem: str) -> None:
        pass


class WorkerNode:
    """The sibling links of one worker process (see the module docstring).

    Usage (the ``derper`` worker does this)::

        node = WorkerNode(server, WorkerSpec(index, count, sock_dir))
        await node.start()          # listen, dial every lower-index sibling
        await node.wait_linked()    # links to every lower-index sibling are up
        ...
        await node.stop()
    """

    def __init__(self, server: DerpServer, spec: WorkerSpec) -> None:
        self.server = server
        self.spec = spec
        self.loop = asyncio.get_running_loop()
        self.ctx = server.context
        #: sibling index → its live link (after HELLO)
        self.links: dict[int, _Link] = {}
        self._all: set[_Link] = set()
        self._unix: asyncio.AbstractServer | None = None
        self._dialers: list[asyncio.Task[None]] = []
        self._stats_timer: asyncio.TimerHandle | None = None
        self._sibling_stats: dict[int, dict[str, Any]] = {}
        self._linked = asyncio.Event()
        self._stopping = False
        self._total = ServerStats()
        self._total_metrics = DerpMetrics(self._total, process=True)
        self._total_metrics.gauges["workers"] = lambda: float(self.spec.count)
        self._total_metrics.gauges["workers_linked"] = lambda: float(len(self.links) + 1)
        #: key → stand-in in relay.active for a key received on a sibling
        self.stand_ins: dict[bytes, _StandIn] = {}
        #: Lamport clock of ACTIVE claims (derp.workers.link), and per local key
        #: the winning claim so far as (stamp, worker index)
        self._clock = 0
        self._claims: dict[bytes, tuple[int, int]] = {}
        #: local keys the siblings were told (PAUSE) to hold packets for
        self._paused_sent: set[bytes] = set()
        #: [packets, bytes] that a sibling counted as sent but that reached a
        #: paused or departed connection here (queued or dropped and counted
        #: again here); subtracted from the host totals
        self.recounted = [0, 0]
        self._total_metrics.registry.register(WorkerCollector(self._worker_docs))

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Install the hooks, listen on this worker's socket, dial lower siblings."""
        ctx = self.ctx
        ctx.forward_hook = ctx.forward_via_routes
        ctx.relay.observer = self
        ctx.sibling_presence = self._presence_frames
        ctx.close_elsewhere = self._close_elsewhere
        ctx.pause_hook = self._pause_changed
        self.server.metrics_view = self.total_metrics
        self.server.workers_view = self._worker_docs
        path = socket_path(self.spec.sock_dir, self.spec.index)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        self._unix = await self.loop.create_unix_server(lambda: self._track(_Link(self, None)), path)
        for j in range(self.spec.index):
            self._dialers.append(self.loop.create_task(self._dial(j), name=f"derp-worker-dial w{j}"))
        self._check_linked()
        self._stats_timer = self.loop.call_later(STATS_INTERVAL, self._send_stats)

    async def wait_linked(self) -> None:
        """Return once the links to every lower-index sibling are up."""
        await self._linked.wait()

    async def stop(self) -> None:
        """Close every link and stop dialling."""
        self._stopping = True
        if self._stats_timer is not None:
            self._stats_timer.cancel()
            self._stats_timer = None
        for t in self._dialers:
            t.cancel()
        for t in self._dialers:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        if self._unix is not None:
            self._unix.close()
        for link in list(self._all):
            link.abort()
        if self.ctx.relay.observer is self:
            self.ctx.relay.observer = None

    def _track(self, link: _Link) -> _Link:
        self._all.add(link)
        return link

    async def _dial(self, j: int) -> None:
        """Keep a link to sibling ``j`` up (redial while it restarts)."""
        path = socket_path(self.spec.sock_dir, j)
        while not self._stopping:
            link = self._track(_Link(self, j))
            try:
                await self.loop.create_unix_connection(lambda: link, path)
            except OSError:
                self._all.discard(link)
                await asyncio.sleep(_DIAL_RETRY)
                continue
            await link.closed
            await asyncio.sleep(_DIAL_RETRY)

    def _check_linked(self) -> None:
        if all(j in self.links for j in range(self.spec.index)):
            self._linked.set()

    # ------------------------------------------------------------------ RelayObserver

    def registered(self, key: bytes, conn: object) -> None:
        c = cast(DerpConnection, conn)
        payload = c.peer_present_frame()[HEADER_LEN:]
        stamp = self._claim(key) if key in self.ctx.relay.elsewhere else 0
        for link in self.links.values():
            enc = link.control()
            enc.present_raw(payload)
            if stamp:
                enc.active(key, stamp)
        if key in self._paused_sent:  # the new connection takes the key's packets
            self._pause_changed(c, c._paused)

    def departed(self, key: bytes) -> None:
        self._paused_sent.discard(key)
        self._claims.pop(key, None)
        for link in self.links.values():
            link.control().gone(key)
        self._sync(key)

    def reactivated(self, key: bytes, conn: object) -> None:
        self._pause_changed(cast(DerpConnection, conn), cast(DerpConnection, conn)._paused)
        if key not in self.ctx.relay.elsewhere:
            return
        stamp = self._claim(key)
        for link in self.links.values():
            link.control().active(key, stamp)

    def _claim(self, key: bytes) -> int:
        """Stamp a new ACTIVE claim for ``key``: later than every claim heard."""
        self._clock = stamp = min(self._clock + 1, _MAX_STAMP)
        self._claims[key] = (stamp, self.spec.index)
        return stamp

    def _pause_changed(self, conn: DerpConnection, paused: bool) -> None:
        """A connection stopped or started taking writes: if it is the one its
        key's packets go to here, the siblings hold packets for it meanwhile
        (PAUSE) and send them on RESUME, so a stalled client's traffic does not
        fill the link that every other client of this worker shares."""
        key = conn.key
        if self.ctx.relay.active.get(key) is not conn:
            return
        sent = self._paused_sent
        if paused == (key in sent):
            return
        if paused:
            sent.add(key)
        else:
            sent.discard(key)
        for link in self.links.values():
            enc = link.control()
            if paused:
                enc.pause(key)
            else:
                enc.resume(key)

    # ------------------------------------------------------------------ link events

    def _link_events(self, link: _Link, events: list[Any]) -> None:
        ctx = self.ctx
        relay = ctx.relay
        active_get = relay.active.get
        st = ctx.stats
        deliver = DerpConnection._slow_deliver
        touched = ctx.touched
        stand_ins = relay.stand_ins
        last_src = b""
        last_d: DerpConnection | None = None
        hk_len = -1
        hk = b""
        npk = nbytes = 0
        for ev in events:
            kind = type(ev)
            if kind is Packet:
                src, dst, pkt = ev
                d = active_get(dst)
                if d is not None and not d._paused and d._state == _OPEN:
                    # Fast path, as in DerpConnection.data_received: header ‖ src
                    # reused for equal sizes, the payload view appended uncopied.
                    plen = len(pkt)
                    out = d._out
                    if not out:
                        touched.append(d)
                    if plen != hk_len or src != last_src:
                        hk_len = plen
                        hk = _RECV_HDR.pack(_RECV, 32 + plen) + src
                    out.append(hk)
                    out.append(pkt)
                    if d is not last_d or src != last_src:
                        last_d = d
                        last_src = src
                        relay.note_delivery(src, d)
                    npk += 1
                    nbytes += plen
                    continue
                if d is None:
                    conns = relay.connections(dst)
                    d = conns[-1] if conns else None
                disco = looks_like_disco(pkt)
                if d is None:
                    st.drop((UNKNOWN_DEST_ON_FWD, KIND_DISCO if disco else KIND_OTHER), len(pkt))
                    continue
                deliver(d, src, dst, cast(memoryview, pkt), disco, d, forwarded=True)
            elif kind is Present:
                self._present(link, ev)
            elif kind is Gone:
                self._gone(link, ev.key)
            elif kind is Frames:
                dst, blob, src = ev
                d = active_get(dst)
                if d is None or d in stand_ins:  # one hop: deliver to a local connection
                    conns = relay.connections(dst)
                    d = conns[-1] if conns else None
                if d is None or d._paused or d._state != _OPEN:
                    self._frames_slow(d, blob, src)
                    continue
                out = d._out
                if not out:
                    touched.append(d)
                out.append(blob)
                if src:
                    if d is not last_d or src != last_src:
                        last_d, last_src = d, src
                        relay.note_delivery(src, d)
                else:
                    self._note_sources(d, blob)
            elif kind is Active:
                key = ev.key
                if ev.stamp > self._clock:
                    self._clock = min(ev.stamp, _MAX_STAMP)
                if key in relay and key in link.keys:
                    # Two claims that crossed: both ends keep the higher one.
                    claim = (ev.stamp, link.index if link.index is not None else -1)
                    held = self._claims.get(key)
                    if held is None or claim > held:
                        self._claims[key] = claim
                        ctx.routes.promote(key, link)
                        relay.step_aside(key, cast(DerpConnection, self._stand_in(key, link)))
            elif kind is Stats:
                if link.index is not None:
                    try:
                        self._sibling_stats[link.index] = decode_stats(ev.data)
                    except ValueError:
                        log.warning("workers: bad STATS from w%s", link.index)
            elif kind is ClosePeer:
                for c in relay.connections(ev.key):
                    c.close("ClosePeer from a mesh peer (via a sibling worker)")
            elif kind is Pause or kind is Resume:
                si = self.stand_ins.get(ev.key)
                if si is not None and si.link is link:
                    if kind is Pause:
                        si.pause()
                    else:
                        si.resume()
            elif kind is Hello:
                self._hello(link, ev)
        if npk:
            st.packets_sent += npk
            st.bytes_sent += nbytes
        self._flush_touched()

    def _stand_in(self, key: bytes, link: _Link) -> _StandIn:
        si = self.stand_ins.get(key)
        if si is None:
            si = self.stand_ins[key] = _StandIn(self, key, link)
            self.ctx.relay.stand_ins.add(cast(DerpConnection, si))
        elif si.link is not link:
            si.link = link
            si._lpaused = False  # its pauses were the old link's and the old holder's
            si.resume()
        return si

    def _sync(self, key: bytes) -> None:
        """Point ``relay.active[key]`` at a stand-in for the sibling route in use, or
        retire the stand-in when ``key`` has no sibling route (or is local)."""
        ctx = self.ctx
        relay = ctx.relay
        link = ctx.routes.route(key)
        if isinstance(link, _Link) and link.up:
            si = self._stand_in(key, link)
            relay.route_remote(key, cast(DerpConnection, si))
            return
        old = self.stand_ins.pop(key, None)
        if old is not None:
            old.discard_queues()
            if key not in relay:
                relay.route_remote(key, None)
            relay.stand_ins.discard(cast(DerpConnection, old))

    def _frames_slow(self, d: DerpConnection | None, blob: bytes | memoryview, src: bytes) -> None:
        """FRAMES for a destination that is gone or paused (before the sibling
        heard of the pause): per packet, through the connection's queues and
        drop rules (as a forwarded packet). The sibling counted these packets as
        sent and this worker counts them again (sent from the queue, or
        dropped), so they also go to ``recounted``, which the host totals
        subtract."""
        st = self.ctx.stats
        data = bytes(blob)
        rc = self.recounted
        for pos, length in _frame_spans(data):
            rc[0] += 1
            rc[1] += length - 32
            s, pkt = data[pos + 5 : pos + 5 + 32], memoryview(data)[pos + 37 : pos + 5 + length]
            disco = looks_like_disco(pkt)
            if d is None:
                st.drop((UNKNOWN_DEST_ON_FWD, KIND_DISCO if disco else KIND_OTHER), len(pkt))
                continue
            DerpConnection._slow_deliver(d, s, d.key, pkt, disco, d, forwarded=True)

    def _note_sources(self, d: DerpConnection, blob: bytes | memoryview) -> None:
        data = bytes(blob)
        relay = self.ctx.relay
        for pos, _ in _frame_spans(data):
            relay.note_delivery(data[pos + 5 : pos + 37], d)

    def _flush_touched(self) -> None:
        """One write per destination touched by this batch of link events."""
        touched = self.ctx.touched
        if not touched:
            return
        # DerpConnection._flush_out: one write, the batch's byte count reset, a
        # closing transport's packets counted dropped (a flush the connection
        # code scheduled for this list then finds it empty)
        for d in touched:
            d._flush_out()
        del touched[:]

    def _hello(self, link: _Link, hello: Hello) -> None:
        if link.index is not None and link.index != hello.index:
            log.warning("workers: dialled w%d but w%d answered", link.index, hello.index)
            link.abort()
            return
        if hello.count != self.spec.count or hello.index == self.spec.index:
            log.warning("workers: sibling w%d of %d does not fit (we are w%d of %d)",
                        hello.index, hello.count, self.spec.index, self.spec.count)
            link.abort()
            return
        old = self.links.get(hello.index)
        if old is not None and old is not link:
            old.abort()  # a restarted sibling; the old link's loss is handled first
            self._link_lost(old)
        link.index = hello.index
        link.up = True
        self.links[hello.index] = link
        self.ctx.routes.prefer(link)
        # Full state: every local key (its most recent connection's address/flags).
        relay = self.ctx.relay
        enc = link.control()
        for key in list(relay.keys()):
            conns = relay.connections(key)
            if conns:
                enc.present_raw(conns[-1].peer_present_frame()[HEADER_LEN:])
        for key in self._paused_sent:
            enc.pause(key)
        enc.stats(self._stats_payload())
        log.info("workers: w%d linked to w%d (pid %d)", self.spec.index, hello.index, hello.pid)
        self._check_linked()

    def _present(self, link: _Link, ev: Present) -> None:
        key = ev.key
        if not link.up:
            return
        relay = self.ctx.relay
        first = key not in link.keys
        link.keys[key] = ev.payload
        if not first:
            return
        was_on_host = key in relay or key in relay.elsewhere
        relay.elsewhere[key] = relay.elsewhere.get(key, 0) + 1
        self.ctx.routes.add(key, link)
        self._sync(key)
        if key in relay and link.index is not None:
            # A connection of key registered here and one on the sibling, each
            # before hearing of the other (or a link came up): no ACTIVE follows
            # either PRESENT, so without a rule each worker would keep its own
            # connection as the receiver for good. The lowest index wins until one
            # speaks; when the sibling knew of ours, its ACTIVE comes next anyway.
            cur = relay.active.get(key)
            mine = cur.link.index if isinstance(cur, _StandIn) else self.spec.index
            if mine is not None and link.index < mine:
                self.ctx.routes.promote(key, link)
                relay.step_aside(key, cast(DerpConnection, self._stand_in(key, link)))
        if key in relay and self.ctx.health_on_duplicate:
            for c in relay.connections(key):
                c.set_health(DUPLICATE_KEY_HEALTH)
        if not was_on_host and relay.watchers:
            frame = encode_peer_present(key, ev.ip, ev.port, ev.flags)
            for w in relay.watchers:
                if w.is_open:
                    w._send_ctrl(frame)

    def _gone(self, link: _Link, key: bytes) -> None:
        if link.keys.pop(key, None) is None:
            return
        self._forget(link, [key])

    def _forget(self, link: _Link, keys: Iterable[bytes]) -> None:
        """``link``'s sibling no longer holds ``keys`` (GONE, or the link broke)."""
        ctx = self.ctx
        relay = ctx.relay
        routes = ctx.routes
        lost: list[bytes] = []
        for key in keys:
            n = relay.elsewhere.get(key, 0) - 1
            if n > 0:
                relay.elsewhere[key] = n
            else:
                relay.elsewhere.pop(key, None)
            if routes.remove(key, link):
                lost.append(key)
            if key in relay:
                relay.take_back(key)  # the sibling it stepped aside for may be gone
            self._sync(key)
            if key in relay:
                if key not in relay.elsewhere:
                    conns = relay.connections(key)
                    if len(conns) == 1:
                        conns[0].set_health("")
            elif key not in relay.elsewhere and relay.watchers:
                frame = encode_peer_gone(key, PeerGoneReason.DISCONNECTED)
                for w in relay.watchers:
                    if w.is_open:
                        w._send_ctrl(frame)
        if lost:
            ctx.unreachable(lost)

    def _link_lost(self, link: _Link) -> None:
        self._all.discard(link)
        if not link.up:
            return
        link.up = False
        if link.index is not None and self.links.get(link.index) is link:
            del self.links[link.index]
            self._sibling_stats.pop(link.index, None)
        keys = list(link.keys)
        link.keys.clear()
        # A sibling that comes back starts its clock at 0: no claim of ours
        # from before may outrank its new ones.
        self._claims.clear()
        self._forget(link, keys)
        self.ctx.routes.drop_link(link)
        self.ctx.routes.forget_preference(link)
        if not self._stopping:
            log.info("workers: w%d lost its link to w%s (%d keys gone)",
                     self.spec.index, link.index, len(keys))
        self._flush_touched()

    def _close_elsewhere(self, key: bytes) -> None:
        """A mesh peer's ClosePeer(key): siblings holding key close their connections."""
        for link in self.links.values():
            if key in link.keys:
                link.control().close_peer(key)

    # ------------------------------------------------------------------ presence for WatchConns

    def _presence_frames(self) -> list[bytes]:
        """PeerPresent frames for keys only siblings hold (one per key)."""
        relay = self.ctx.relay
        seen: set[bytes] = set()
        out: list[bytes] = []
        for link in self.links.values():
            for key, payload in link.keys.items():
                if key not in relay and key not in seen:
                    seen.add(key)
                    out.append(_peer_present(payload))
        return out

    # ------------------------------------------------------------------ stats

    def _stats_payload(self) -> bytes:
        srv = self.server
        extra = {
            "link_batches_out": float(sum(lk.packets_out for lk in self.links.values())),
            "recounted_packets": float(self.recounted[0]),
            "recounted_bytes": float(self.recounted[1]),
        }
        return encode_stats(self.spec.index, srv.stats, srv.metrics.stun, extra)

    def _worker_docs(self) -> list[dict[str, Any]]:
        """Every worker's latest snapshot, this one's live (for WorkerCollector)."""
        mine = decode_stats(self._stats_payload())
        return [mine, *(self._sibling_stats[i] for i in sorted(self._sibling_stats))]

    def _send_stats(self) -> None:
        self._stats_timer = self.loop.call_later(STATS_INTERVAL, self._send_stats)
        if not self.links:
            return
        payload = self._stats_payload()
        for link in self.links.values():
            link.control().stats(payload)

    def total_metrics(self) -> DerpMetrics:
        """Prometheus view of the totals over every worker (refreshed per call)."""
        srv = self.server
        others = list(self._sibling_stats.values())
        merge_stats(self._total, self._total_metrics.stun, srv.stats, srv.metrics.stun, others)
        # packets two workers both counted as sent (see _frames_slow)
        total = self._total
        for rp, rb in [self.recounted, *((_extra(d, "recounted_packets"), _extra(d, "recounted_bytes"))
                                         for d in others)]:
            total.packets_sent -= int(rp)
            total.bytes_sent -= int(rb)
        gauges = srv.metrics.gauges
        for name, fn in gauges.items():
            if name not in self._total_metrics.gauges:
                self._total_metrics.gauges[name] = fn
        return self._total_metrics


def _extra(doc: dict[str, Any], name: str) -> float:
    """A number from a sibling's STATS ``extra`` (0 if missing or malformed)."""
    extra = doc.get("extra")
    v = extra.get(name) if isinstance(extra, dict) else None
    return float(v) if isinstance(v, (int, float)) else 0.0


def _frame_spans(data: bytes) -> Iterator[tuple[int, int]]:
    """(offset, length) of each RecvPacket frame in a FRAMES blob; stops (with a
    warning) at a frame that does not fit (see the trust note in derp.workers.link)."""
    pos, n = 0, len(data)
    while n - pos >= HEADER_LEN + 32:
        ftype, length = _RECV_HDR.unpack_from(data, pos)
        if ftype != _RECV or length < 32 or pos + HEADER_LEN + length > n:
            break
        yield pos, length
        pos += HEADER_LEN + length
    if pos != n:
        log.warning("workers: a FRAMES blob from a sibling is malformed at byte %d of %d", pos, n)


def _peer_present(payload: bytes) -> bytes:
    """A PeerPresent frame (51-byte form) from a PRESENT payload."""
    ev = Present(payload[:32], payload[32:48], int.from_bytes(payload[48:50], "big"), payload[50])
    return encode_peer_present(ev.key, ev.ip, ev.port, ev.flags)
