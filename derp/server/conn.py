"""One DERP client connection on the server: an ``asyncio.Protocol`` (no tasks).

Lifecycle (spec §1.5)::

    HANDSHAKE ── ClientInfo ok ──► OPEN ── error / EOF / stop ──► CLOSED
        │  (deadline: handshake_timeout; first frame must be ClientInfo)
        └── anything else ──► CLOSED (no error frame, reason logged)

:meth:`DerpConnection.start` is called by the HTTP front door (or any other
transport adapter, e.g. :mod:`derp.websocket`) after the upgrade: it writes the
optional HTTP 101 preamble and the ServerKey frame in one write, then feeds the
bytes already read after the request head. On admission the connection is
registered in the :class:`derp.relay.Relay`, ServerInfo is written, and only
then are the frames that followed ClientInfo processed.

Hot path (``data_received`` in OPEN state):

* the read is copied once into a fresh ``bytearray`` (the only payload copy)
  and every complete frame in it is parsed in one loop with
  ``struct.unpack_from``;
* a SendPacket and a RecvPacket have the same layout and length (type ‖
  length ‖ 32-byte key ‖ packet), so a SendPacket is turned into its delivery
  *in place*: one ``pack_into`` writes the RecvPacket type and the source key
  over the destination key. Consecutive SendPackets to one destination form a
  *run* (one ``startswith`` per frame tells the next one has the same
  destination, without a lookup); a run is handed to the destination's batch
  list ``_out`` as one ``memoryview`` slice of the buffer;
* writes (one per destination: its single slice as is, copied only if under
  half its read so a slow receiver's transport never pins a big read for a
  small packet; several segments joined):

  - a destination whose last sender is this one and that has nothing pending
    is written at the end of this read (one-to-one traffic: no added latency
    and no per-iteration callback);
  - otherwise (fan-in: several senders to one receiver) the run is collected in
    ``_out`` and the destination is written once at the end of the loop
    iteration (``_flush_touched``, scheduled with ``call_soon`` when the shared
    ``ConnContext.touched`` list becomes non-empty), so the reads of one
    iteration cost it one write instead of one each. Order per destination is
    the order of ``_out``; a destination with more than :data:`COALESCE_LIMIT`
    bytes collected is written at once (then its transport may pause, and what
    follows goes to the bounded queues), so coalescing never holds more than
    that plus one read per connection;
* the buffer is never written again once slices of it are handed out (a
  partial trailing frame is copied out into ``_pend``, a ``bytearray`` that
  grows until ``_need`` bytes are present: linear, not quadratic, for big
  frames split into many reads).

Backpressure (spec §3.2): a sender is never blocked. A destination whose
transport called ``pause_writing`` gets packets in two bounded deques (data
and disco, ``queue_depth`` each); when full the oldest is dropped
(``queue_head``), after three failed attempts the new one (``queue_tail``).
``resume_writing`` drains the deques in one write. Control frames to a paused
connection (KeepAlive, PeerGone) are small and written anyway; a Pong to a
paused connection is held (capacity one, like derper's pong channel).

Limits and notices (spec §3.9, §3.11, §1.4):

* write timeout: while the transport is paused (``pause_writing``) a timer of
  ``write_timeout`` (mesh peers: ``mesh_write_timeout``) runs; if the socket
  is still blocked when it fires, the client is dropped (``write_timeouts``);
* receive limit: each read is charged to a per-client
  :class:`derp.limits.TokenBucket` (not for mesh peers); when in debt, reading
  pauses until the debt is paid, nothing is dropped (``rate_limit_waits``);
  the limit is advertised in ServerInfo (``TokenBucketBytesPerSecond/Burst``);
* Health: when a key gets a second connection every connection of the key is
  told :data:`DUPLICATE_KEY_HEALTH`; when only one remains it gets an empty
  Health frame (healthy again). Restarting frames come from
  :meth:`derp.server.DerpServer.announce_restart` via :meth:`send_control`.

What the packet path uses of a destination (anything in ``relay.active``):
``_out``, ``_outn``, ``_last_src``, ``_paused``, ``_state``, ``_transport``
(``write`` may get a ``memoryview``; ``is_closing``), ``_take``, ``_flush_out``,
``_push``, ``_send_ctrl``.

Ownership: everything here runs on the event loop thread; ``_out`` and the
shared ``ConnContext.touched`` list are non-empty at most until the end of the
loop iteration (``touched`` is non-empty exactly while a flush is scheduled).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
import struct
import time
from collections import deque
from typing import TYPE_CHECKING, Final, cast

from ..errors import HandshakeError
from ..frames import (
    DISCO_MAGIC,
    HEADER_LEN,
    KEY_LEN,
    MAX_CLIENT_INFO_LEN,
    MAX_PACKET_SIZE,
    FrameType,
    PeerGoneReason,
    PeerPresentFlags,
    encode_health,
    encode_peer_gone,
    encode_peer_present,
    encode_server_info,
)
from ..keys import seal
from ..limits import TokenBucket
from ..stats import (
    DUP_CLIENT,
    GONE_DISCONNECTED,
    KIND_DISCO,
    KIND_OTHER,
    QUEUE_HEAD,
    QUEUE_TAIL,
    UNKNOWN_DEST,
    UNKNOWN_DEST_ON_FWD,
    WRITE_ERROR,
)
from .handshake import MIN_CLIENT_INFO_LEN, ClientInfoData, open_client_info

if TYPE_CHECKING:
    from ..admission import AdmissionGate
    from .context import ConnContext

__all__ = ["DerpConnection", "DUPLICATE_KEY_HEALTH", "MAX_FRAME_LEN", "ip16_port"]

log = logging.getLogger("derp.server")

#: Largest payload accepted from a client after the handshake (ForwardPacket bound).
MAX_FRAME_LEN: Final = MAX_PACKET_SIZE + 2 * KEY_LEN
_MAX_SEND_LEN: Final = MAX_PACKET_SIZE + KEY_LEN
_MAX_FWD_LEN: Final = MAX_PACKET_SIZE + 2 * KEY_LEN

_HDR = struct.Struct(">BI")
_hdr_unpack = _HDR.unpack_from
_hdr_pack = _HDR.pack
#: RecvPacket header ‖ source key, written over a SendPacket's header ‖ destination
#: key (same length: 5 + 32 bytes), which turns the frame into its delivery in place.
_HK = struct.Struct(">BI32s")
_recv_pack = _HK.pack_into
#: frame header and the first 32 payload bytes (a SendPacket's destination) in one call
_hk_unpack = _HK.unpack_from
_HK_LEN: Final = HEADER_LEN + KEY_LEN
_RECV = FrameType.RECV_PACKET.value
_SEND = FrameType.SEND_PACKET.value
_DISCO_MIN = 62

_KEEPALIVE: Final = b"\x06\x00\x00\x00\x00"
_PONG_HDR: Final = b"\x13\x00\x00\x00\x08"

_HANDSHAKE, _OPEN, _CLOSED = 0, 1, 2

# Drop keys, prebuilt so counting a drop allocates nothing.
_D = {
    (r, disco): (r, KIND_DISCO if disco else KIND_OTHER)
    for r in (
        UNKNOWN_DEST,
        UNKNOWN_DEST_ON_FWD,
        GONE_DISCONNECTED,
        QUEUE_HEAD,
        QUEUE_TAIL,
        WRITE_ERROR,
        DUP_CLIENT,
    )
    for disco in (False, True)
}

#: Health text sent to every connection of a key that has duplicates.
DUPLICATE_KEY_HEALTH: Final = "duplicate key in use elsewhere: another connection uses this node key"

_NOT_HERE_RATE = 1.0  # tokens per second
_NOT_HERE_BURST = 3.0

#: Control frames (anything but SendPacket) handled in one ``data_received``;
#: the rest of the read waits for the next loop iteration (reading paused). A
#: 256 KiB read of 6-byte NotePreferred frames is ~43,000 frames: handled in one
#: go it held the event loop (every other connection, the coordinator) for tens
#: of milliseconds, and libuv reads a busy socket up to 32 times per wake-up.
CONTROL_FRAME_BUDGET: Final = 1024
#: After a read that held this many frames, reading pauses until the next loop
#: iteration (one read per iteration for floods of small packets; a read of
#: 1400-byte packets holds ~190).
YIELD_AFTER_FRAMES: Final = 2048


#: Bytes a destination may collect within one loop iteration before they are
#: written at once (then its transport may pause, and further packets go to the
#: bounded queues): what keeps coalescing across reads bounded per connection.
COALESCE_LIMIT: Final = 64 * 1024


def _flush_touched(touched: list[DerpConnection]) -> None:
    """End of a loop iteration: one write per destination that collected frames.

    Scheduled (``call_soon``) when ``touched`` goes from empty to non-empty, so
    ``touched`` is non-empty exactly while a flush is pending; destinations
    appended during the flush are written by this same loop.
    """
    for d in touched:
        d._flush_out()
    del touched[:]


def _count_recv_packets(segments: list[bytes | bytearray | memoryview]) -> int:
    """RecvPacket frames in a destination's pending segments (whole frames each)."""
    count = 0
    for seg in segments:
        pos, n = 0, len(seg)
        while n - pos >= HEADER_LEN:
            ftype, length = _hdr_unpack(seg, pos)
            count += ftype == _RECV
            pos += HEADER_LEN + length
    return count


def ip16_port(addr: object) -> tuple[bytes, int]:
    """The 16-byte IP and port of a socket address (zeros if not an IP address)."""
    if isinstance(addr, tuple) and len(addr) >= 2:
        try:
            ip = ipaddress.ip_address(addr[0])
        except ValueError:
            return bytes(16), 0
        if isinstance(ip, ipaddress.IPv4Address):
            ip = ipaddress.IPv6Address(b"\x00" * 10 + b"\xff\xff" + ip.packed)
        return ip.packed, int(addr[1]) & 0xFFFF
    return bytes(16), 0


class DerpConnection(asyncio.Protocol):
    """Server side of one DERP connection; see the module docstring."""

    __slots__ = (
        "_ctx",
        "_transport",
        "_state",
        "_key",
        "_hs_buf",
        "_hs_timer",
        "_pend",
        "_need",
        "_out",
        "_paused",
        "_q",
        "_dq",
        "_pong",
        "_nh_tokens",
        "_nh_last",
        "_ka_period",
        "_preferred",
        "_connected_at",
        "info",
        "remote_addr",
        "close_reason",
        "_bucket",
        "_rl_timer",
        "_wt_timer",
        "_q_since",
        "_health",
        "_yielding",
        "_noted",
        "_outn",
        "_last_src",
    )

    def __init__(self, ctx: ConnContext[DerpConnection], remote_addr: object = None) -> None:
        self._ctx = ctx
        self._transport: asyncio.Transport | None = None
        self._state = _HANDSHAKE
        self._key = b""
        self._hs_buf: bytearray | None = bytearray()
        self._hs_timer: asyncio.TimerHandle | None = None
        self._pend: bytearray | None = None
        self._need = 0
        self._out: list[bytes | bytearray | memoryview] = []
        self._paused = False
        self._q: deque[bytes] | None = None
        self._dq: deque[bytes] | None = None
        self._pong: bytes | None = None
        self._nh_tokens = _NOT_HERE_BURST
        self._nh_last = 0.0
        self._ka_period = 0.0
        self._preferred = False
        self._connected_at = 0.0
        #: The client's ClientInfo once admitted.
        self.info: ClientInfoData | None = None
        self.remote_addr = remote_addr
        self.close_reason = ""
        #: per-client receive limiter (None: unlimited or mesh peer)
        self._bucket: TokenBucket | None = None
        self._rl_timer: asyncio.TimerHandle | None = None
        #: armed while the transport is paused (write timeout)
        self._wt_timer: asyncio.TimerHandle | None = None
        #: monotonic time the oldest queued packet was queued (0: queues empty)
        self._q_since = 0.0
        #: Health problem last sent to this client ("" = healthy)
        self._health = ""
        #: reading paused until the next loop iteration (CONTROL_FRAME_BUDGET)
        self._yielding = False
        #: the receiver most recently subscribed to PeerGone(our key): skips
        #: repeating the idempotent Relay.note_delivery for every read
        self._noted: DerpConnection | None = None
        #: bytes in ``_out`` (bounded by COALESCE_LIMIT)
        self._outn = 0
        #: the sender whose packets we last received; a run from another one is
        #: collected until the end of the loop iteration (fan-in: coalesced)
        self._last_src: DerpConnection | None = None

    # ------------------------------------------------------------------ properties

    @property
    def key(self) -> bytes:
        """The client's 32-byte public key (empty before admission)."""
        return self._key

    @property
    def is_open(self) -> bool:
        """True once admitted and until closed."""
        return self._state == _OPEN

    @property
    def is_closed(self) -> bool:
        return self._state == _CLOSED

    @property
    def is_mesh(self) -> bool:
        """True if the client presented the configured mesh key."""
        return self.info is not None and self.info.is_mesh

    def _name(self) -> str:
        k = self._key.hex()[:8] if self._key else "?"
        return f"[{k}] {self.remote_addr}"

    # ------------------------------------------------------------------ start / stop

    def start(self, transport: asyncio.Transport, initial_data: bytes, preamble: bytes) -> None:
        """Take over ``transport``: write ``preamble`` + ServerKey, feed ``initial_data``."""
        self._transport = transport
        ctx = self._ctx
        ctx.pending.add(self)
        self._hs_timer = ctx.loop.call_later(ctx.handshake_timeout, self._handshake_timeout)
        transport.set_write_buffer_limits(high=ctx.write_buffer_high)
        self._write(preamble + ctx.server_key_frame)
        if initial_data:
            self.data_received(initial_data)

    def _write(self, data: bytes) -> None:
        t = self._transport
        if t is not None:
            t.write(data)

    def close(self, reason: str, *, protocol_error: bool = False) -> None:
        """Close this connection (idempotent); unregisters it immediately."""
        if self._state == _CLOSED:
            return
        was_open = self._state == _OPEN
        self._state = _CLOSED
        self.close_reason = reason
        ctx = self._ctx
        if self._hs_timer is not None:
            self._hs_timer.cancel()
            self._hs_timer = None
        for h in (self._rl_timer, self._wt_timer):
            if h is not None:
                h.cancel()
        self._rl_timer = self._wt_timer = None
        self._hs_buf = None
        self._pend = None
        self._noted = self._last_src = None  # keep no chain of closed connections alive
        if protocol_error:
            ctx.stats.protocol_errors += 1
            if was_open:
                log.info("derp: closing %s: %s", self._name(), reason)
        if was_open:
            self._leave()
        else:
            ctx.pending.discard(self)
            ctx.stats.handshake_failures += 1
            log.info("derp: rejected %s: %s", self._name(), reason)
        t = self._transport
        if t is not None:
            # A client that stopped reading would keep a flushing close() open forever.
            if self._paused:
                t.abort()
            else:
                t.close()

    def abort(self) -> None:
        """Drop the connection without flushing (used by server stop after a grace period)."""
        self.close("server stopping")
        if self._transport is not None:
            self._transport.abort()

    def _leave(self) -> None:
        ctx = self._ctx
        stats = ctx.stats
        ctx.conns.discard(self)
        stats.current_connections -= 1
        if self._preferred:
            stats.current_home_connections -= 1
        # Queued packets die with the connection.
        for q, disco in ((self._q, False), (self._dq, True)):
            if q:
                stats.drop(_D[GONE_DISCONNECTED, disco], sum(len(f) for f in q) - 37 * len(q), len(q))
                q.clear()
        dep = ctx.relay.unregister(self._key, self)
        if not dep.last and ctx.pause_hook is not None and dep.new_active is not None:
            # the key's packets now go to another connection: its state counts
            ctx.pause_hook(dep.new_active, dep.new_active._paused)
        if not dep.last and self._health:
            left = ctx.relay.connections(self._key)
            if len(left) == 1 and self._key not in ctx.relay.elsewhere:
                left[0].set_health("")
        log.debug(
            "derp: disconnected %s: %s%s",
            self._name(),
            self.close_reason,
            "" if dep.last else " (duplicate remains)",
        )
        if dep.last and (dep.peer_gone or dep.watchers):
            frame = encode_peer_gone(self._key, PeerGoneReason.DISCONNECTED)
            for c in dep.peer_gone:
                if c._state == _OPEN:
                    c._send_ctrl(frame)
                    stats.peer_gone_disconnected_frames += 1
            for w in dep.watchers:
                if w._state == _OPEN:
                    w._send_ctrl(frame)

    def _handshake_timeout(self) -> None:
        self._hs_timer = None
        if self.info is not None:  # ClientInfo was fine; the admission hook is slow
            self.close("handshake timeout: admission still pending")
        else:
            self.close("handshake timeout: no ClientInfo", protocol_error=True)

    # ------------------------------------------------------------------ asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # pragma: no cover
        # Connections are handed over with start(); direct use is supported too.
        if self._transport is None:
            self.start(cast(asyncio.Transport, transport), b"", b"")

    def connection_lost(self, exc: Exception | None) -> None:
        if self._state != _CLOSED:
            self.close(f"connection lost: {exc}" if exc else "client closed the connection")
        self._ctx.conns.discard(self)
        self._ctx.pending.discard(self)
        self._ctx.on_lost(self)

    def eof_received(self) -> bool | None:
        return None  # close the transport

    def pause_writing(self) -> None:
        self._paused = True
        ctx = self._ctx
        if ctx.pause_hook is not None and self._state == _OPEN:
            ctx.pause_hook(self, True)
        timeout = ctx.mesh_write_timeout if self.is_mesh else ctx.write_timeout
        if timeout > 0 and self._wt_timer is None and self._state != _CLOSED:
            self._wt_timer = ctx.loop.call_later(timeout, self._write_timed_out)

    def _write_timed_out(self) -> None:
        """The socket stayed blocked for the whole write timeout: drop the client."""
        self._wt_timer = None
        if self._state == _CLOSED or not self._paused:
            return
        self._ctx.stats.write_timeouts += 1
        self.close("write timeout: client socket blocked")

    def resume_writing(self) -> None:
        self._paused = False
        if self._wt_timer is not None:
            self._wt_timer.cancel()
            self._wt_timer = None
        if self._state != _OPEN:
            return
        if self._ctx.pause_hook is not None:
            self._ctx.pause_hook(self, False)
        parts: list[bytes] = []
        if self._pong is not None:
            parts.append(self._pong)
            self._pong = None
        sent = 0
        nbytes = 0
        for q in (self._dq, self._q):
            if q:
                sent += len(q)
                for f in q:
                    nbytes += len(f) - 37
                parts.extend(q)
                q.clear()
        if parts:
            st = self._ctx.stats
            st.packets_sent += sent
            st.bytes_sent += nbytes
            if sent and self._q_since:
                waited_ms = (time.monotonic() - self._q_since) * 1000.0
                st.average_queue_duration_ms += 0.1 * (waited_ms - st.average_queue_duration_ms)
            self._q_since = 0.0
            self._write(b"".join(parts))

    # ------------------------------------------------------------------ handshake

    def _handshake_data(self, data: bytes) -> None:
        buf = self._hs_buf
        assert buf is not None
        buf += data
        if self.info is not None:  # awaiting admission: keep the bytes for later
            return
        if len(buf) < HEADER_LEN:
            return
        ftype, length = _hdr_unpack(buf, 0)
        if ftype != FrameType.CLIENT_INFO:
            self.close(f"first frame is type 0x{ftype:02x}, not ClientInfo", protocol_error=True)
            return
        if not MIN_CLIENT_INFO_LEN <= length <= MAX_CLIENT_INFO_LEN:
            self.close(f"ClientInfo of {length} bytes (must be 56..256 KiB)", protocol_error=True)
            return
        end = HEADER_LEN + length
        if len(buf) < end:
            return
        payload = bytes(buf[HEADER_LEN:end])
        rest = bytes(buf[end:])
        self._hs_buf = None
        ctx = self._ctx
        try:
            info = open_client_info(ctx.private_key, payload, ctx.mesh_key)
        except HandshakeError as exc:
            self._key = payload[:KEY_LEN]
            self.close(str(exc), protocol_error=True)
            return
        gate = ctx.admission
        if gate is not None and not info.is_mesh:  # mesh peers skip admission
            self._await_admission(gate, info, rest)
            return
        self._admit(info)
        if rest and self._state == _OPEN:
            self.data_received(rest)

    def _await_admission(self, gate: AdmissionGate, info: ClientInfoData, rest: bytes) -> None:
        """Pause reading and ask the admission hook (derp.admission); see admission_done."""
        self.info = info
        self._key = info.key
        self._hs_buf = bytearray(rest)
        t = self._transport
        if t is not None:
            t.pause_reading()
        addr = self.remote_addr
        ip = str(addr[0]) if isinstance(addr, tuple) and addr else ""
        gate.start(info.key, ip, self.admission_done)

    def admission_done(self, allowed: bool, reason: str) -> None:
        """Admission result: admit and replay buffered frames, or close (nothing relayed)."""
        info = self.info
        if self._state != _HANDSHAKE or info is None:
            return
        if not allowed:
            self._ctx.stats.admission_rejected += 1
            self.close(f"admission denied: {reason}")
            return
        rest = bytes(self._hs_buf or b"")
        self._hs_buf = None
        t = self._transport
        if t is not None:
            t.resume_reading()
        self._admit(info)
        if rest and self._state == _OPEN:
            self.data_received(rest)

    def _admit(self, info: ClientInfoData) -> None:
        ctx = self._ctx
        if self._hs_timer is not None:
            self._hs_timer.cancel()
            self._hs_timer = None
        self.info = info
        self._key = info.key
        self._state = _OPEN
        ctx.pending.discard(self)
        ctx.conns.add(self)
        st = ctx.stats
        st.accepts += 1
        st.current_connections += 1
        # ServerInfo first: nothing else may reach this client before it.
        self._write(encode_server_info(seal(ctx.private_key, info.key, ctx.server_info_json)))
        if not info.is_mesh:
            self._bucket = ctx.rate_config.bucket(ctx.loop.time())
        reg = ctx.relay.register(info.key, self)
        if reg.duplicate:
            st.total_dup_client_conns += 1
            if ctx.health_on_duplicate:
                for c in ctx.relay.connections(info.key):
                    c.set_health(DUPLICATE_KEY_HEALTH)
        self._connected_at = time.monotonic()
        jitter = ctx.keepalive_jitter
        self._ka_period = ctx.keepalive_interval + (random.random() * jitter if jitter > 0 else 0.0)
        ctx.schedule_keepalive(self)
        log.debug(
            "derp: connected %s%s%s",
            self._name(),
            " (mesh)" if info.is_mesh else "",
            " (duplicate key)" if reg.duplicate else "",
        )
        if reg.watchers:
            frame = self.peer_present_frame()
            for w in reg.watchers:
                if w is not self and w._state == _OPEN:
                    w._send_ctrl(frame)

    def peer_present_frame(self) -> bytes:
        """PeerPresent (51-byte form) announcing this connection to mesh watchers."""
        info = self.info
        flags = 0
        if info is not None and info.is_mesh:
            flags |= PeerPresentFlags.IS_MESH_PEER
        if info is not None and info.is_prober:
            flags |= PeerPresentFlags.IS_PROBER
        if not flags:
            flags = PeerPresentFlags.IS_REGULAR
        ip, port = ip16_port(self.remote_addr)
        return encode_peer_present(self._key, ip, port, int(flags))

    # ------------------------------------------------------------------ control writes

    def _send_ctrl(self, frame: bytes) -> None:
        """Write a small control frame now, or after this batch's pending packets."""
        if self._state != _OPEN:
            return
        if self._out:
            self._out.append(frame)
        else:
            self._write(frame)

    def send_control(self, frame: bytes) -> None:
        """Write an encoded control frame (Restarting, Health, ...) if admitted."""
        self._send_ctrl(frame)

    def set_health(self, problem: str) -> None:
        """Send a Health frame if ``problem`` differs from what the client last heard."""
        if self._state != _OPEN or problem == self._health:
            return
        self._health = problem
        self._send_ctrl(encode_health(problem))
        self._ctx.stats.health_frames_sent += 1

    def send_keepalive(self) -> None:
        """Write a KeepAlive frame (called by the server's shared sweep)."""
        if self._state == _OPEN:
            self._send_ctrl(_KEEPALIVE)
            self._ctx.stats.keepalives_sent += 1

    # ------------------------------------------------------------------ data path

    def data_received(self, data: bytes) -> None:
        state = self._state
        if state != _OPEN:
            if state == _HANDSHAKE:
                self._handshake_data(data)
            return
        fresh = len(data)
        pend = self._pend
        if pend is None and fresh >= _HK_LEN:
            # Fast path for the commonest read on a lightly loaded relay: exactly
            # one SendPacket, to a writable destination that has nothing pending
            # and last heard from us (so PeerGone subscription, activity and
            # ordering are as the general path would leave them).
            ftype, length, dst = _hk_unpack(data, 0)
            if ftype == _SEND and fresh == HEADER_LEN + length and length <= _MAX_SEND_LEN:
                active_get = self._ctx.relay.active.get
                d = active_get(dst)
                if (
                    d is not None
                    and d is self._noted
                    and d._last_src is self
                    and not d._out
                    and not d._paused
                    and d._state == _OPEN
                    and active_get(self._key) is self
                ):
                    t = d._transport
                    if t is not None and not t.is_closing():
                        buf = bytearray(data)
                        _recv_pack(buf, 0, _RECV, length, self._key)
                        t.write(buf)
                        st = self._ctx.stats
                        plen = length - KEY_LEN
                        st.packets_received += 1
                        st.bytes_received += plen
                        st.packets_sent += 1
                        st.bytes_sent += plen
                        if self._bucket is not None:
                            self._rate_limit(fresh)
                        return
        if pend is not None:
            pend += data
            if len(pend) < self._need:
                if self._bucket is not None:
                    self._rate_limit(fresh)
                return
            buf = pend  # never written to again: segments of it may sit in transports
            self._pend = None
            data = b""
        else:
            buf = bytearray(data)  # the one copy of the payload bytes
        ctx = self._ctx
        key = self._key
        relay = ctx.relay
        active_get = relay.active.get
        if active_get(key) is not self:
            relay.note_activity(key, self)  # a duplicate spoke: it becomes active
        touched = ctx.touched
        local: list[DerpConnection] = []  # destinations written at the end of this read
        n = len(buf)
        mv = memoryview(buf)
        pos = 0
        npk = 0
        nbytes = 0
        nctl = 0
        # The current run: consecutive SendPackets to one writable destination,
        # rewritten in place into RecvPackets, handed over as one slice.
        # ``run_key`` is the run's destination key, b"" (matching no key) without a run
        run_d: DerpConnection | None = None
        run_key = b""
        run_at = 0
        src = data if data else buf  # frames ahead of ``pos`` are the same in both
        while n - pos >= HEADER_LEN:
            if n - pos >= _HK_LEN:  # header and (for a SendPacket) destination at once
                ftype, length, dst = _hk_unpack(src, pos)
            else:
                ftype, length = _hdr_unpack(src, pos)
                dst = b""
            end = pos + HEADER_LEN + length
            if ftype == _SEND:
                if length < KEY_LEN or length > _MAX_SEND_LEN:
                    self.close(f"SendPacket of {length} bytes", protocol_error=True)
                    break
                if end > n:
                    break
                npk += 1
                nbytes += length
                if dst == run_key:  # same destination as the frame before
                    _recv_pack(buf, pos, _RECV, length, key)
                    pos = end
                    continue
                if run_d is not None:  # the destination changed: hand the run over
                    if not run_d._out and run_d._last_src is self:
                        run_d._out.append(mv[run_at:pos])
                        local.append(run_d)
                    else:
                        run_d._last_src = self
                        run_d._take(mv[run_at:pos], pos - run_at, touched)
                    run_d = None
                    run_key = b""
                d = active_get(dst)
                if d is not None and not d._paused:
                    _recv_pack(buf, pos, _RECV, length, key)
                    run_d = d
                    run_key = dst
                    run_at = pos
                    if d is not self._noted:  # PeerGone subscription, once per receiver
                        self._noted = d
                        relay.note_delivery(key, d)
                else:
                    plen = length - KEY_LEN
                    disco = plen >= _DISCO_MIN and buf.startswith(
                        DISCO_MAGIC, pos + HEADER_LEN + KEY_LEN
                    )
                    self._slow_deliver(key, dst, mv[pos + HEADER_LEN + KEY_LEN : end], disco, d)
            else:
                if length > MAX_FRAME_LEN:
                    self.close(f"frame type 0x{ftype:02x} of {length} bytes", protocol_error=True)
                    break
                if end > n:
                    break
                if run_d is not None:  # packets before a control frame go first
                    self._hand_over(run_d, mv[run_at:pos], local)
                    run_d = None
                    run_key = b""
                if data:  # the read's own bytes (immutable; offsets as in buf)
                    self._control(ftype, data, pos + HEADER_LEN, end)
                else:
                    self._control(ftype, bytes(mv[pos:end]), HEADER_LEN, end - pos)
                if self._state != _OPEN:
                    break
                nctl += 1
                if nctl >= CONTROL_FRAME_BUDGET:
                    pos = end
                    break  # the rest waits in _pend for the next iteration
            pos = end
        if run_d is not None:
            if not run_d._out and run_d._last_src is self:
                # the usual read: all of it is one run (handed over without a slice)
                run_d._out.append(buf if run_at == 0 and pos == n else mv[run_at:pos])
                local.append(run_d)
            else:
                run_d._last_src = self
                run_d._take(mv[run_at:pos], pos - run_at, touched)
        st = ctx.stats
        for d in local:  # _flush_out, inlined: its segments are all from this read
            out = d._out
            t = d._transport
            if d._state == _OPEN and t is not None and not t.is_closing():
                if len(out) == 1:
                    seg = out[0]
                    if type(seg) is memoryview and 2 * len(seg) < n:
                        seg = bytes(seg)  # don't pin the whole read for a small part
                    t.write(seg)
                else:
                    t.write(b"".join(out))
            elif d._state == _OPEN:  # transport died under us; connection_lost is pending
                st.drop(_D[WRITE_ERROR, False], 0, _count_recv_packets(out))
            out.clear()
        if npk:
            # Packets relayed directly count as sent here; queued or dropped
            # ones (diverted) are accounted in _slow_deliver / resume_writing.
            nbytes -= KEY_LEN * npk
            st.packets_received += npk
            st.bytes_received += nbytes
            div = ctx.batch_diverted
            if div[0]:
                st.packets_sent += npk - div[0]
                st.bytes_sent += nbytes - div[1]
                div[0] = div[1] = 0
            else:
                st.packets_sent += npk
                st.bytes_sent += nbytes
        if pos < n and self._state == _OPEN:
            rest = bytearray(mv[pos:])
            self._pend = rest
            if len(rest) >= HEADER_LEN:
                self._need = HEADER_LEN + _hdr_unpack(rest, 0)[1]
            else:
                self._need = HEADER_LEN
        if self._bucket is not None and self._state == _OPEN:
            self._rate_limit(fresh)
        if (npk + nctl >= YIELD_AFTER_FRAMES or nctl >= CONTROL_FRAME_BUDGET) and (
            self._state == _OPEN
        ):
            self._yield_reading()

    def _yield_reading(self) -> None:
        """Read nothing more in this loop iteration (a read full of small frames
        was handled, or the control-frame budget left frames in ``_pend``)."""
        t = self._transport
        if self._yielding or t is None:
            return
        self._yielding = True
        t.pause_reading()
        # Not call_soon: with several floods, each would add its budget to every
        # iteration; the shared lane runs about one budget per iteration (derp.fairlane).
        self._ctx.lane.defer(self._end_yield)

    def _end_yield(self) -> None:
        """Next iteration: handle frames left over, then read again (unless the
        receive limit is holding reading, or another budget ran out)."""
        self._yielding = False
        if self._state != _OPEN or self._transport is None:
            return
        pend = self._pend
        if pend is not None and len(pend) >= self._need:
            self.data_received(b"")
            if self._yielding or self._state != _OPEN:
                return
        if self._rl_timer is None:
            self._transport.resume_reading()

    def _rate_limit(self, nbytes: int) -> None:
        """Charge ``nbytes`` read; if over the limit, stop reading until paid (spec §3.9).

        The cost is the bytes read (frame headers included, a few bytes more
        than derper's payload-only count). Reading pauses instead of dropping:
        the kernel buffers fill and TCP slows the sender down.
        """
        bucket = self._bucket
        assert bucket is not None
        loop = self._ctx.loop
        wait = bucket.take(nbytes, loop.time())
        if wait > 0 and self._rl_timer is None and self._transport is not None:
            self._ctx.stats.rate_limit_waits += 1
            self._transport.pause_reading()
            self._rl_timer = loop.call_later(wait, self._rate_resume)

    def _rate_resume(self) -> None:
        self._rl_timer = None
        if self._state == _OPEN and self._transport is not None:
            self._transport.resume_reading()

    def _slow_deliver(
        self,
        src: bytes,
        dst: bytes,
        packet: memoryview,
        disco: bool,
        d: DerpConnection | None,
        forwarded: bool = False,
    ) -> None:
        """Deliver to a paused/unknown destination: queue with drop policy, or drop."""
        ctx = self._ctx
        st = ctx.stats
        plen = len(packet)
        div = ctx.batch_diverted
        if not forwarded:
            div[0] += 1
            div[1] += plen
        if d is None:
            relay = ctx.relay
            fwd = ctx.forward_hook
            route = relay.forwarders.get(dst) if fwd is not None else None
            # One hop: a mesh-forwarded packet may still cross to a sibling
            # worker (a preferred route), never to another mesh peer.
            if route is not None and fwd is not None and (
                not forwarded or ctx.routes.is_preferred(route)
            ):
                fwd(src, dst, packet)
                return
            if dst in relay:
                st.drop(_D[DUP_CLIENT, disco], plen)
                return
            st.drop(_D[UNKNOWN_DEST_ON_FWD if forwarded else UNKNOWN_DEST, disco], plen)
            if disco:
                self._not_here(dst)
            return
        if d._state != _OPEN:
            st.drop(_D[GONE_DISCONNECTED, disco], plen)
            return
        frame = _hdr_pack(_RECV, KEY_LEN + plen) + src + packet.tobytes()
        ctx.relay.note_delivery(src, d)
        if not d._paused:
            # Reached only for forwarded packets to a writable destination; they
            # arrive inside the mesh peer's data_received, so batch like SendPacket.
            d._push(frame)
            st.packets_sent += 1
            st.bytes_sent += plen
            return
        q = d._dq if disco else d._q
        if q is None:
            q = deque()
            if disco:
                d._dq = q
            else:
                d._q = q
        depth = ctx.queue_depth
        if not d._q_since:
            d._q_since = time.monotonic()
        for _ in range(3):
            if len(q) < depth:
                q.append(frame)
                return
            if q:
                old = q.popleft()
                st.drop(_D[QUEUE_HEAD, disco], len(old) - 37)
        st.drop(_D[QUEUE_TAIL, disco], plen)

    def _not_here(self, dst: bytes) -> None:
        """PeerGone(dst, NotHere) to this sender, token bucket 1/s burst 3."""
        now = time.monotonic()
        tokens = min(_NOT_HERE_BURST, self._nh_tokens + (now - self._nh_last) * _NOT_HERE_RATE)
        self._nh_last = now
        if tokens < 1.0:
            self._nh_tokens = tokens
            return
        self._nh_tokens = tokens - 1.0
        self._push(encode_peer_gone(dst, PeerGoneReason.NOT_HERE))
        self._ctx.stats.peer_gone_not_here_frames += 1

    def _push(self, frame: bytes) -> None:
        """Append a frame to this connection's batch (written at the end of the
        loop iteration, or at once past COALESCE_LIMIT)."""
        self._take(frame, len(frame), self._ctx.touched)

    def _hand_over(self, d: DerpConnection, seg: memoryview, local: list[DerpConnection]) -> None:
        """Give ``d`` a run of our packets: written at the end of this read if
        ``d`` has nothing pending and we were its last sender; else collected
        with other senders' runs until the end of the loop iteration."""
        if not d._out and d._last_src is self:
            d._out.append(seg)
            local.append(d)
        else:
            d._last_src = self
            d._take(seg, len(seg), self._ctx.touched)

    def _take(self, seg: bytes | bytearray | memoryview, nbytes: int, touched: list[DerpConnection]) -> None:
        """Append ``seg`` (whole frames) to the batch; schedule or do the flush."""
        out = self._out
        if not out:
            if not touched:
                self._ctx.loop.call_soon(_flush_touched, touched)
            touched.append(self)
        out.append(seg)
        n = self._outn + nbytes
        self._outn = n
        if n > COALESCE_LIMIT:
            self._flush_out()

    def _flush_out(self) -> None:
        """Write the batch in one ``transport.write`` (or count it dropped)."""
        out = self._out
        if not out:
            return
        self._outn = 0
        t = self._transport
        if self._state == _OPEN and t is not None and not t.is_closing():
            if len(out) == 1:
                seg = out[0]
                # A slice of under half its read would pin the whole read in a
                # slow receiver's transport buffer: copy it instead.
                if type(seg) is memoryview and 2 * len(seg) < len(seg.obj):  # type: ignore[arg-type]
                    seg = bytes(seg)
                t.write(seg)
            else:
                t.write(b"".join(out))
        elif self._state == _OPEN:  # transport died under us; connection_lost is pending
            self._ctx.stats.drop(_D[WRITE_ERROR, False], 0, _count_recv_packets(out))
        out.clear()

    def _control(self, ftype: int, data: bytes, start: int, end: int) -> None:
        """Handle one non-SendPacket frame whose payload is ``data[start:end]``."""
        length = end - start
        ctx = self._ctx
        st = ctx.stats
        if ftype == FrameType.PING:
            if not 8 <= length <= 1000:
                self.close(f"Ping of {length} bytes (must be 8..1000)", protocol_error=True)
                return
            st.got_ping += 1
            pong = _PONG_HDR + data[start : start + 8]
            if self._paused:
                if self._pong is None:
                    self._pong = pong
                return
            self._push(pong)
            st.sent_pong += 1
        elif ftype == FrameType.NOTE_PREFERRED:
            if length != 1:
                self.close(f"NotePreferred of {length} bytes (must be 1)", protocol_error=True)
                return
            self._set_preferred(data[start] != 0)
        elif ftype == FrameType.FORWARD_PACKET or ftype == FrameType.WATCH_CONNS or (
            ftype == FrameType.CLOSE_PEER
        ):
            if not self.is_mesh:
                self.close(
                    f"mesh-only frame 0x{ftype:02x} from a client without the mesh key",
                    protocol_error=True,
                )
                return
            self._mesh_frame(ftype, data, start, end)
        else:
            st.unknown_frames += 1  # unknown or unexpected: skip (forward compatible)

    def _set_preferred(self, preferred: bool) -> None:
        if preferred == self._preferred:
            return
        self._preferred = preferred
        st = self._ctx.stats
        st.current_home_connections += 1 if preferred else -1
        if time.monotonic() - self._connected_at > 5.0:
            if preferred:
                st.home_moves_in += 1
            else:
                st.home_moves_out += 1

    # ------------------------------------------------------------------ mesh hooks

    def _mesh_frame(self, ftype: int, data: bytes, start: int, end: int) -> None:
        """Mesh-privileged frames (spec §4): WatchConns, ClosePeer, ForwardPacket."""
        length = end - start
        ctx = self._ctx
        if ftype == FrameType.WATCH_CONNS:
            if length != 0:
                self.close(f"WatchConns of {length} bytes (must be 0)", protocol_error=True)
                return
            relay = ctx.relay
            for k in relay.add_watcher(self):
                conns = relay.connections(k)  # local ones (active may be a stand-in)
                if conns:
                    self._push(conns[-1].peer_present_frame())
            if ctx.sibling_presence is not None:  # keys of sibling workers (derp.workers)
                for frame in ctx.sibling_presence():
                    self._push(frame)
        elif ftype == FrameType.CLOSE_PEER:
            if length != KEY_LEN:
                self.close(f"ClosePeer of {length} bytes (must be 32)", protocol_error=True)
                return
            target = data[start:end]
            conns = ctx.relay.connections(target)
            if ctx.close_elsewhere is not None and target in ctx.relay.elsewhere:
                ctx.close_elsewhere(target)  # sibling workers' connections too
            elif not conns:
                log.info("derp: ClosePeer from %s: [%s] not here", self._name(), target.hex()[:8])
            for c in conns:
                c.close(f"ClosePeer from mesh peer {self._name()}")
        else:  # FORWARD_PACKET
            if not 2 * KEY_LEN <= length <= _MAX_FWD_LEN:
                self.close(f"ForwardPacket of {length} bytes", protocol_error=True)
                return
            src = data[start : start + KEY_LEN]
            dst = data[start + KEY_LEN : start + 2 * KEY_LEN]
            pkt = memoryview(data)[start + 2 * KEY_LEN : end]
            ctx.stats.packets_forwarded_in += 1
            ctx.stats.packets_received += 1
            ctx.stats.bytes_received += len(pkt)
            disco = len(pkt) >= _DISCO_MIN and data.startswith(DISCO_MAGIC, start + 2 * KEY_LEN)
            self._slow_deliver(src, dst, pkt, disco, ctx.relay.active.get(dst), forwarded=True)
