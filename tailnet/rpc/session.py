"""asyncio adapter for the sans-I/O yamux core: one session over a message pipe.

A :class:`Pipe` is a WebSocket seen as Coder's ``websocket.NetConn`` sees it:
binary messages are one byte stream (boundaries mean nothing). The session
feeds every received message to :class:`tailnet.rpc.yamux.Session`, turns its
events into calls on :class:`YamuxStream` objects, and writes whatever the core
produced back to the pipe (one message per flush, cut at
:data:`MAX_WRITE_MESSAGE`).

Flow::

    pipe.recv() ──► Session.receive_data ──► events ──► YamuxStream.on_data / on_end
                                                └──► on_stream(new stream)  (acceptor)
    YamuxStream.write(b) ──► Session.send_data ──► flush ──► pipe.write(message)

Invariants and policy:

* **Backpressure, both ways.** A stream's writer waits while the peer's window
  for that stream is exhausted (``pending_bytes``) and while the pipe's write
  buffer is above its high-water mark. Reading pauses while the pipe's write
  buffer is full, so nothing the peer provokes (ping replies, window updates,
  RSTs) piles up for a peer that does not read. Received bytes are returned to
  the peer's window (``consumed``) only when the stream's consumer says so, so a
  slow consumer stalls only its own stream.
* **CPU budget.** A received message (up to 4 MiB: e.g. a flood of 12-byte
  pings) is fed to the core :data:`FEED_SLICE` bytes at a time; each slice's
  events are dispatched and its replies flushed before the next. Once
  :data:`FEED_BUDGET` seconds were spent on one message the reader yields to
  the event loop and goes on in the next iteration, so one connection never
  stalls every other for more than a few ms. Between slices the reader also
  waits while the pipe's write buffer is full, so the replies a message
  provokes pile up by at most one slice's worth past the high-water mark.
* **Keepalive** (yamux's, both roles, as Coder's DefaultConfig): a ping every
  ``keepalive_interval`` (30 s); no reply within ``keepalive_timeout`` (10 s) ends
  the session (the unanswered ping is cancelled in the core). Timers are loop
  callbacks, not tasks (cheap per connection).
* The session ends on a fatal yamux error (GoAway sent, reason logged), on the
  peer's GoAway with an error code, when the pipe closes (a bare EOF is a
  normal end: Go's NetConn often drops TCP without a close frame), or on
  :meth:`YamuxConnection.close`. Every stream then hears ``on_end``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Final, Protocol

from . import yamux

__all__ = [
    "FEED_BUDGET",
    "FEED_SLICE",
    "MAX_WRITE_MESSAGE",
    "Pipe",
    "YamuxStream",
    "YamuxConnection",
]

log = logging.getLogger(__name__)

#: Largest WebSocket message written (Go's NetConn reads any size; older
#: nhooyr-era peers accepted at most 4 MiB, Python ``websockets`` 1 MiB by default).
MAX_WRITE_MESSAGE: Final = 256 * 1024

#: Bytes of a received message fed to the core at a time, and the time spent on
#: one message after which the reader yields to the loop (module docstring: CPU
#: budget).
FEED_SLICE: Final = 4 * 1024
FEED_BUDGET: Final = 0.002

#: WebSocket close codes used here.
CLOSE_NORMAL: Final = 1000
CLOSE_PROTOCOL_ERROR: Final = 1002


class Pipe(Protocol):
    """A message pipe carrying a byte stream (a WebSocket)."""

    async def recv(self) -> bytes | str | None:
        """The next message; ``None`` once the pipe is closed."""
        ...

    def write(self, data: bytes) -> None:
        """Queue one binary message without blocking (dropped once closed)."""
        ...

    async def drain(self) -> None:
        """Return once the write buffer is below its high-water mark (or closed)."""
        ...

    @property
    def writable(self) -> bool:
        """False while the write buffer is above its high-water mark."""
        ...

    async def close(self, code: int = CLOSE_NORMAL, reason: str = "") -> None: ...

    def abort(self) -> None: ...


def _noop_data(_data: bytes) -> None:
    return None


def _noop() -> None:
    return None


class YamuxStream:
    """One yamux stream as its consumer sees it.

    The consumer sets :attr:`on_data` (called with each payload chunk, in order)
    and :attr:`on_end` (called once: peer FIN, RST, or session end; check
    :attr:`reset` / :attr:`remote_closed`). It must call :meth:`consumed` for
    every byte it has finished with, or the peer's window stays closed.
    """

    __slots__ = (
        "conn",
        "id",
        "on_data",
        "on_end",
        "remote_closed",
        "reset",
        "local_closed",
        "gone",
        "_window",
    )

    def __init__(self, conn: YamuxConnection, stream_id: int) -> None:
        self.conn = conn
        self.id = stream_id
        self.on_data: Callable[[bytes], None] = _noop_data
        self.on_end: Callable[[], None] = _noop
        self.remote_closed = False
        self.reset = False
        self.local_closed = False
        self.gone = False
        self._window: asyncio.Future[None] | None = None

    async def write(self, data: bytes) -> None:
        """Send ``data`` (any size; framed as the peer's window allows) and wait
        until it is all framed and the pipe has room. ``ConnectionError`` if the
        stream can no longer send."""
        conn = self.conn
        if self.gone or self.local_closed or self.reset:
            raise ConnectionError("yamux stream closed")
        sess = conn.session
        try:
            sess.send_data(self.id, data)
        except yamux.YamuxError as exc:
            raise ConnectionError(str(exc)) from None
        conn.flush()
        await self.drain()

    @property
    def sendable(self) -> bool:
        """Everything written so far is framed (the peer's window took it) and the
        pipe is below its high-water mark: a write now would not wait."""
        conn = self.conn
        return conn.session.pending_bytes(self.id) == 0 and conn.pipe.writable

    async def drain(self) -> None:
        """Wait until :attr:`sendable` (``ConnectionError`` if the stream ends first)."""
        conn = self.conn
        sess = conn.session
        while sess.pending_bytes(self.id) > 0:
            if self.gone or self.reset:
                raise ConnectionError("yamux stream closed")
            fut = self._window
            if fut is None or fut.done():
                fut = self._window = asyncio.get_running_loop().create_future()
            await fut
        if not conn.pipe.writable:
            await conn.pipe.drain()

    def write_nowait(self, data: bytes) -> None:
        """Queue ``data`` without waiting (small control packets); dropped once gone."""
        if self.gone or self.local_closed or self.reset:
            return
        try:
            self.conn.session.send_data(self.id, data)
        except yamux.YamuxError:
            return
        self.conn.flush()

    def consumed(self, n: int) -> None:
        """Return ``n`` received bytes to the peer's window."""
        if n > 0 and not self.gone:
            self.conn.session.consumed(self.id, n)
            self.conn.flush()

    def close(self) -> None:
        """Half-close (FIN after any pending data); idempotent."""
        if self.local_closed or self.gone or self.reset:
            return
        self.local_closed = True
        try:
            self.conn.session.close_stream(self.id)
        except yamux.YamuxError:
            return
        self.conn.flush()

    def abort(self) -> None:
        """Reset the stream (RST)."""
        if self.gone:
            return
        self.reset = True
        try:
            self.conn.session.reset_stream(self.id)
        except yamux.YamuxError:
            pass
        self.conn.flush()
        self.conn._forget(self)

    def _wake(self) -> None:
        fut = self._window
        if fut is not None and not fut.done():
            fut.set_result(None)


class YamuxConnection:
    """A yamux session over a :class:`Pipe` (see the module docstring).

    ``on_stream`` is called with every stream the peer opens (after it was
    accepted, i.e. ACKed); if it is ``None`` incoming streams are reset.
    :meth:`run` is the reader loop; it returns when the session is over.

    One per WebSocket, so kept lean (``__slots__``; the close future is created
    only when someone waits for it; one keepalive timer handle at a time).
    """

    __slots__ = (
        "pipe",
        "session",
        "on_stream",
        "name",
        "streams",
        "closed",
        "close_reason",
        "_ka_interval",
        "_ka_timeout",
        "_ka_handle",
        "_ka_deadline",
        "_ka_opaque",
        "_pings",
        "_done",
    )

    def __init__(
        self,
        pipe: Pipe,
        *,
        client: bool,
        on_stream: Callable[[YamuxStream], None] | None = None,
        max_streams: int = 1024,
        accept_backlog: int = 256,
        keepalive_interval: float | None = 30.0,
        keepalive_timeout: float = 10.0,
        name: str = "yamux",
    ) -> None:
        self.pipe = pipe
        self.session = yamux.Session(
            client=client, accept_backlog=accept_backlog, max_streams=max_streams
        )
        self.on_stream = on_stream
        self.name = name
        self.streams: dict[int, YamuxStream] = {}
        self.closed = False
        self.close_reason = ""
        self._ka_interval = keepalive_interval
        self._ka_timeout = keepalive_timeout
        self._ka_handle: asyncio.TimerHandle | None = None
        self._ka_deadline: asyncio.TimerHandle | None = None
        self._ka_opaque: int | None = None
        self._pings: dict[int, asyncio.Future[float]] | None = None
        self._done: asyncio.Future[None] | None = None

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        """Read the pipe until the session ends; then end every stream."""
        pipe = self.pipe
        sess = self.session
        self._arm_keepalive()
        try:
            while not self.closed:
                if not pipe.writable:
                    await pipe.drain()  # pause reading while our writes are stuck
                msg = await pipe.recv()
                if msg is None:
                    if not self.closed:
                        sess.receive_eof()
                        self._dispatch()
                    break
                if isinstance(msg, str):
                    self._end("text message on a binary stream")
                    await pipe.close(1003, "binary messages only")
                    break
                if not msg:
                    continue
                if len(msg) <= FEED_SLICE:
                    sess.receive_data(msg)
                    self._dispatch()
                    self.flush()
                else:
                    await self._feed(msg)
        finally:
            self._end(self.close_reason or "connection closed")
        await pipe.close(CLOSE_NORMAL, "")

    async def _feed(self, msg: bytes) -> None:
        """Feed a large message slice by slice (module docstring: CPU budget)."""
        pipe = self.pipe
        sess = self.session
        n = len(msg)
        off = 0
        deadline = time.perf_counter() + FEED_BUDGET
        while off < n and not self.closed:
            end = off + FEED_SLICE
            sess.receive_data(msg[off:end])
            off = end
            self._dispatch()
            self.flush()
            if off >= n or self.closed:
                break
            if not pipe.writable:
                await pipe.drain()
                deadline = time.perf_counter() + FEED_BUDGET
            elif time.perf_counter() >= deadline:
                await asyncio.sleep(0)
                deadline = time.perf_counter() + FEED_BUDGET

    async def close(self, code: int = CLOSE_NORMAL, reason: str = "") -> None:
        """End the session and close the pipe (streams hear ``on_end``)."""
        self._end(reason or "closed locally")
        await self.pipe.close(code, reason)

    async def wait_closed(self) -> None:
        if self.closed:
            return
        if self._done is None:
            self._done = asyncio.get_running_loop().create_future()
        await asyncio.shield(self._done)

    def go_away(self) -> None:
        """Tell the peer we accept no new streams (GoAway normal)."""
        if not self.closed:
            self.session.go_away(yamux.GoAwayCode.NORMAL)
            self.flush()

    def open_stream(self) -> YamuxStream:
        """Open a stream (SYN is written at once; data may follow before the ACK)."""
        if self.closed:
            raise ConnectionError(f"{self.name} session is closed")
        try:
            sid = self.session.open_stream()
        except yamux.YamuxError as exc:
            raise ConnectionError(str(exc)) from None
        st = YamuxStream(self, sid)
        self.streams[sid] = st
        self.flush()
        return st

    async def ping(self, timeout: float = 10.0) -> float:
        """Send a yamux ping; return the round-trip time in seconds."""
        if self.closed:
            raise ConnectionError(f"{self.name} session is closed")
        loop = asyncio.get_running_loop()
        opaque = self.session.ping()
        fut: asyncio.Future[float] = loop.create_future()
        if self._pings is None:
            self._pings = {}
        pings = self._pings
        pings[opaque] = fut
        t0 = time.perf_counter()
        self.flush()
        try:
            await asyncio.wait_for(fut, timeout)
        finally:
            pings.pop(opaque, None)
            self.session.cancel_ping(opaque)  # a late reply is then ignored
        return time.perf_counter() - t0

    # ------------------------------------------------------------------ internals

    def flush(self) -> None:
        """Write whatever the core produced, as messages of at most MAX_WRITE_MESSAGE."""
        data = self.session.data_to_send()
        if not data:
            return
        write = self.pipe.write
        n = len(data)
        if n <= MAX_WRITE_MESSAGE:
            write(data)
            return
        view = memoryview(data)
        for i in range(0, n, MAX_WRITE_MESSAGE):
            write(bytes(view[i : i + MAX_WRITE_MESSAGE]))

    def _forget(self, st: YamuxStream) -> None:
        """Drop ``st``; its consumer's callbacks are released (they usually form a
        cycle with the consumer, which must not outlive the stream as garbage)."""
        if not st.gone:
            st.gone = True
            self.streams.pop(st.id, None)
            st._wake()
        st.on_data = _noop_data
        st.on_end = _noop

    def _dispatch(self) -> None:
        streams = self.streams
        for ev in self.session.events_received():
            if isinstance(ev, yamux.DataReceived):
                st = streams.get(ev.stream_id)
                if st is not None:
                    st.on_data(ev.data)
                else:  # not ours any more: give the window back
                    self.session.consumed(ev.stream_id, len(ev.data))
            elif isinstance(ev, yamux.WindowOpened):
                st = streams.get(ev.stream_id)
                if st is not None:
                    st._wake()
            elif isinstance(ev, yamux.StreamOpened):
                self._incoming(ev.stream_id)
            elif isinstance(ev, yamux.StreamEnded):
                st = streams.get(ev.stream_id)
                if st is not None and not st.remote_closed:
                    st.remote_closed = True
                    st._wake()
                    st.on_end()
            elif isinstance(ev, yamux.StreamReset):
                st = streams.get(ev.stream_id)
                if st is not None:
                    st.reset = True
                    on_end = st.on_end
                    self._forget(st)
                    on_end()
            elif isinstance(ev, yamux.StreamClosed):
                st = streams.get(ev.stream_id)
                if st is not None:
                    self._forget(st)
            elif isinstance(ev, yamux.PingAcked):
                self._ping_acked(ev.opaque)
            elif isinstance(ev, yamux.ConnectionTerminated):
                reason = ev.reason
                if not ev.remote and ev.code:
                    log.info("%s: protocol error from peer: %s", self.name, reason)
                self._end(reason)
            # StreamAccepted, PingReceived, GoAwayReceived(0): nothing to do

    def _incoming(self, sid: int) -> None:
        if self.on_stream is None or self.closed:
            self.session.reset_stream(sid)
            return
        self.session.accept_stream(sid)
        st = YamuxStream(self, sid)
        self.streams[sid] = st
        self.on_stream(st)

    def _end(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        self.close_reason = reason
        for h in (self._ka_handle, self._ka_deadline):
            if h is not None:
                h.cancel()
        self._ka_handle = self._ka_deadline = None
        if not self.session.terminated:
            try:
                self.flush()
            except Exception:  # pragma: no cover - pipe already broken
                pass
        for fut in (self._pings or {}).values():
            if not fut.done():
                fut.set_exception(ConnectionError(f"{self.name} session closed: {reason}"))
        streams = list(self.streams.values())
        self.streams.clear()
        self.on_stream = None  # usually a bound method of our owner: no cycle left behind
        for st in streams:
            st.gone = True
            st._wake()
            on_end = st.on_end
            st.on_data = _noop_data
            st.on_end = _noop
            on_end()
        done = self._done
        if done is not None and not done.done():
            done.set_result(None)

    # keepalive (loop callbacks; no task per connection)

    def _arm_keepalive(self) -> None:
        if self._ka_interval and not self.closed:
            loop = asyncio.get_running_loop()
            self._ka_handle = loop.call_later(self._ka_interval, self._keepalive)

    def _keepalive(self) -> None:
        self._ka_handle = None
        if self.closed:
            return
        self._ka_opaque = self.session.ping()
        self.flush()
        loop = asyncio.get_running_loop()
        self._ka_deadline = loop.call_later(self._ka_timeout, self._keepalive_failed)

    def _keepalive_failed(self) -> None:
        self._ka_deadline = None
        if self.closed:
            return
        log.info("%s: keepalive ping unanswered for %.0f s, closing", self.name, self._ka_timeout)
        opaque, self._ka_opaque = self._ka_opaque, None
        if opaque is not None:
            self.session.cancel_ping(opaque)
        self._end("keepalive timeout")
        self.pipe.abort()

    def _ping_acked(self, opaque: int) -> None:
        if opaque == self._ka_opaque:
            self._ka_opaque = None
            if self._ka_deadline is not None:
                self._ka_deadline.cancel()
                self._ka_deadline = None
            self._arm_keepalive()
            return
        fut = self._pings.get(opaque) if self._pings is not None else None
        if fut is not None and not fut.done():
            fut.set_result(0.0)
