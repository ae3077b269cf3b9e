"""TLS as a thin protocol/transport pair around ``ssl.SSLObject`` and memory BIOs.

Any ``asyncio`` protocol (the HTTP front door, then the DERP connection or the
WebSocket pipe after an upgrade, an HTTP API) runs over TLS by sitting on a
:class:`TlsTransport`; the socket's own protocol is a :class:`TlsProtocol`::

    socket transport ──► TlsProtocol (BufferedProtocol; SSLObject + 2 MemoryBIOs)
         ▲                 │ plaintext of one read, in ONE data_received call
         │                 ▼
         └── one write ◄── TlsTransport ◄── app protocol's write() calls
             per loop      (collected until the end of the loop iteration)
             iteration

Why not the event loop's own TLS (``create_server(ssl=...)``; uvloop's and
CPython's ``SSLProtocol``): it decrypts one record at a time into a fresh
256 KiB ``bytes`` object (``mmap``/``mremap``/``munmap`` per record, seen in
the profile) and encrypts every ``write()`` into its own record and socket
write. With clients that flush per packet (Tailscale's Go client does)
that is several allocations and a syscall per packet. Here the hot path is:

* **read**: the socket reads into one buffer shared by all connections of the
  thread (``get_buffer``/``buffer_updated``); the bytes go into the incoming
  BIO; then *every* complete record is decrypted in one loop, one
  ``SSLObject.read`` per record, each returning that record's plaintext as a
  ``bytes`` of its size, and the app gets all of it in one ``data_received``
  call (that ``bytes`` itself for a single record, one join for several);
* **write**: app writes during one loop iteration are only queued; one
  ``call_soon`` per thread and iteration flushes every dirty connection:
  ``b"".join`` → one ``SSLObject.write`` (OpenSSL cuts full-size 16 KiB
  records) → one socket ``write``. Per connection and iteration, never per
  packet. :meth:`TlsTransport.close` flushes first, so nothing queued is lost.

Lifecycle (states ``HANDSHAKE → OPEN → CLOSING → CLOSED``):

* the handshake runs as bytes arrive; it must finish within
  ``handshake_timeout`` seconds or the socket is aborted. Garbage instead of
  a ClientHello, a protocol-version or certificate failure: the alert OpenSSL
  produced is sent, the socket closed, the reason logged at DEBUG, and the app
  protocol is never created. ``on_handshake(protocol, exc)`` (optional) is
  told either way (``exc`` None on success).
* when it completes, ``app_factory()`` is called and gets
  ``connection_made(TlsTransport)``; application data that arrived with the
  client's Finished is delivered right away (DERP fast start depends on it);
* the peer's ``close_notify`` or a TCP EOF without one is end of stream for
  the app (``eof_received``; a missing ``close_notify`` is logged at DEBUG and
  is not an error: every DERP frame is length-delimited, so truncation
  cannot go unnoticed by the app);
* ``close()`` flushes, sends ``close_notify`` and closes the socket after its
  buffer drained; ``abort()`` drops everything; a TLS error after the
  handshake (bad record MAC, unexpected message) aborts the socket, after
  delivering the records before it, and the app gets ``connection_lost(exc)``
  with that error;
* renegotiation is refused by the context (``OP_NO_RENEGOTIATION``, set by
  :func:`derp.tls.server_ssl_context`; TLS 1.3 has none); TLS 1.3 KeyUpdate
  and post-handshake messages are answered by OpenSSL inside ``read``, and
  whatever it wrote is sent after each read.

Flow control: ``pause_writing``/``resume_writing`` come from the socket
transport (its buffer holds ciphertext, about the plaintext size);
:meth:`TlsTransport.get_write_buffer_size` adds the plaintext still queued in
this iteration. ``pause_reading`` stops reading the socket; the data of the
read in progress was already delivered in one call.

Client side: :func:`open_tls_connection` dials, runs the client handshake and
returns the :class:`TlsTransport` (``derp.client`` uses it for ``https``/``wss``,
so mesh links too).

Ownership: everything runs on the event loop thread. The shared read buffer
and the flush list are per thread (one loop per thread),
and are only used inside one callback (``buffer_updated``, the flush).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import threading
from collections.abc import Callable, Iterable
from typing import Any, Final, cast

__all__ = ["READ_BUFFER_SIZE", "TlsProtocol", "TlsTransport", "open_tls_connection"]

log = logging.getLogger("derp.tls")

#: Bytes read from the socket at once (shared buffer, one per thread).
READ_BUFFER_SIZE: Final = 256 * 1024
_MAX_RECORD: Final = 16 * 1024  # largest plaintext of a TLS record: what one SSL read returns

_HANDSHAKE, _OPEN, _CLOSING, _CLOSED = 0, 1, 2, 3


class _Shared(threading.local):
    """Per-thread buffers and the end-of-iteration flush list."""

    def __init__(self) -> None:
        self.rbuf = memoryview(bytearray(READ_BUFFER_SIZE))
        self.dirty: list[TlsProtocol] = []
        #: the loop a flush is scheduled on (None: none pending)
        self.loop: asyncio.AbstractEventLoop | None = None

    def schedule(self, p: TlsProtocol, loop: asyncio.AbstractEventLoop) -> None:
        if self.loop is not loop:
            # First dirty connection of this iteration. A flush scheduled on another
            # loop of this thread can only belong to a loop that was closed before
            # running it: its connections are gone with it.
            self.dirty = []
            self.loop = loop
            loop.call_soon(self.flush)
        self.dirty.append(p)

    def flush(self) -> None:
        """Encrypt and send what every dirty connection queued (one ``call_soon``)."""
        self.loop = None
        dirty = self.dirty
        if not dirty:
            return
        self.dirty = []
        for p in dirty:
            p._flush()


_shared = _Shared()


class TlsProtocol(asyncio.BufferedProtocol):
    """The socket's protocol: runs TLS over it and an app protocol on top of it.

    ``app_factory`` is called once the handshake completed; its protocol gets a
    :class:`TlsTransport`. Server side by default; pass ``server_side=False``
    and ``server_hostname`` for a client.
    """

    __slots__ = (
        "_ctx",
        "_factory",
        "_server_side",
        "_hostname",
        "_timeout",
        "_on_handshake",
        "_loop",
        "_raw",
        "_in",
        "_out",
        "_ssl",
        "_read",
        "_write",
        "_state",
        "_timer",
        "_app",
        "_tt",
        "_wbuf",
        "_wsize",
        "_eof",
        "_app_paused",
        "_error",
    )

    def __init__(
        self,
        context: ssl.SSLContext,
        app_factory: Callable[[], asyncio.BaseProtocol],
        *,
        server_side: bool = True,
        server_hostname: str | None = None,
        handshake_timeout: float = 10.0,
        on_handshake: Callable[[TlsProtocol, BaseException | None], None] | None = None,
    ) -> None:
        self._ctx = context
        self._factory = app_factory
        self._server_side = server_side
        self._hostname = server_hostname
        self._timeout = handshake_timeout
        self._on_handshake = on_handshake
        self._loop: asyncio.AbstractEventLoop | None = None
        self._raw: asyncio.Transport | None = None
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._ssl: ssl.SSLObject | None = None
        self._read: Any = None
        self._write: Any = None
        self._state = _HANDSHAKE
        self._timer: asyncio.TimerHandle | None = None
        self._app: asyncio.Protocol | None = None
        self._tt: TlsTransport | None = None
        #: plaintext queued by the app in this loop iteration
        self._wbuf: list[bytes] = []
        self._wsize = 0
        self._eof = False
        self._app_paused = False
        #: the TLS error that made us abort (passed to the app's connection_lost)
        self._error: Exception | None = None

    # ------------------------------------------------------------------ properties

    @property
    def ssl_object(self) -> ssl.SSLObject | None:
        """The TLS state (certificates, version, cipher); None before ``connection_made``."""
        return self._ssl

    @property
    def app(self) -> asyncio.Protocol | None:
        """The protocol on top (None until the handshake completed)."""
        return self._app

    @property
    def is_handshaking(self) -> bool:
        return self._state == _HANDSHAKE

    def abort(self) -> None:
        """Drop the connection now (e.g. server stop during the handshake)."""
        self._abort()

    # ------------------------------------------------------------------ socket side

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._raw = cast(asyncio.Transport, transport)
        loop = self._loop = asyncio.get_running_loop()
        sslobj = self._ctx.wrap_bio(
            self._in, self._out, server_side=self._server_side, server_hostname=self._hostname
        )
        self._ssl = sslobj
        # The C object behind SSLObject: read/write without a Python frame per record.
        inner = getattr(sslobj, "_sslobj", sslobj)
        self._read = inner.read
        self._write = inner.write
        if self._timeout > 0:
            self._timer = loop.call_later(self._timeout, self._handshake_timed_out)
        if not self._server_side:
            self._handshake()

    def get_buffer(self, sizehint: int) -> memoryview:
        return _shared.rbuf

    def buffer_updated(self, nbytes: int) -> None:
        state = self._state
        if state >= _CLOSING:
            return  # closing: what the peer still sends is of no use
        self._in.write(_shared.rbuf[:nbytes])
        if state == _HANDSHAKE and not self._handshake():
            return
        self._decrypt()

    def data_received(self, data: bytes) -> None:
        """For transports that do not support buffered protocols."""
        if self._state >= _CLOSING:
            return
        self._in.write(data)
        if self._state == _HANDSHAKE and not self._handshake():
            return
        self._decrypt()

    def eof_received(self) -> bool | None:
        if self._state == _HANDSHAKE:
            log.debug("tls: %s closed during the handshake", self._peer())
            self._handshake_done(ConnectionResetError("closed during the TLS handshake"))
            return False
        if not self._eof:
            log.debug("tls: %s closed without close_notify", self._peer())
        return self._app_eof()

    def connection_lost(self, exc: Exception | None) -> None:
        was = self._state
        self._state = _CLOSED
        self._cancel_timer()
        self._wbuf.clear()
        self._wsize = 0
        if was == _HANDSHAKE:
            self._handshake_done(exc or ConnectionResetError("closed during the TLS handshake"))
            return
        app = self._app
        if app is not None:
            app.connection_lost(exc or self._error)

    def pause_writing(self) -> None:
        app = self._app
        if app is not None and not self._app_paused:
            self._app_paused = True
            app.pause_writing()

    def resume_writing(self) -> None:
        app = self._app
        if app is not None and self._app_paused:
            self._app_paused = False
            app.resume_writing()

    # ------------------------------------------------------------------ handshake

    def _handshake(self) -> bool:
        """One handshake step; True once it completed (and the app is connected)."""
        sslobj = self._ssl
        assert sslobj is not None
        try:
            sslobj.do_handshake()
        except ssl.SSLWantReadError:
            self._send_pending()
            return False
        except (ssl.SSLError, ssl.CertificateError, ValueError) as exc:
            self._send_pending()  # the alert
            log.debug("tls: handshake with %s failed: %s", self._peer(), exc)
            self._state = _CLOSING
            self._handshake_done(exc)
            if self._raw is not None:
                self._raw.close()
            return False
        self._send_pending()
        self._state = _OPEN
        self._cancel_timer()
        self._handshake_done(None)
        if self._state != _OPEN:  # the callback closed us
            return False
        app = cast(asyncio.Protocol, self._factory())
        self._app = app
        self._tt = TlsTransport(self)
        app.connection_made(self._tt)
        return self._state == _OPEN

    def _handshake_timed_out(self) -> None:
        self._timer = None
        if self._state == _HANDSHAKE:
            log.debug("tls: handshake with %s timed out", self._peer())
            self._state = _CLOSED
            self._handshake_done(TimeoutError("TLS handshake timed out"))
            if self._raw is not None:
                self._raw.abort()

    def _handshake_done(self, exc: BaseException | None) -> None:
        cb = self._on_handshake
        if cb is not None:
            self._on_handshake = None
            cb(self, exc)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # ------------------------------------------------------------------ data path

    def _decrypt(self) -> None:
        """Decrypt every complete record in the incoming BIO; one ``data_received``."""
        read = self._read
        incoming = self._in
        parts: list[bytes] = []
        append = parts.append
        err: Exception | None = None
        try:
            # OpenSSL reads a record's header, then exactly its body (no read-ahead):
            # once the BIO is empty every complete record was consumed, and stopping
            # there saves the SSLWantReadError (formatted by _ssl) of a last read.
            # Each read returns one record's plaintext as its own ``bytes`` (sized by
            # _ssl to what OpenSSL returned): the usual single-record read is then
            # delivered without another copy, several are joined once.
            while incoming.pending:
                data = read(_MAX_RECORD)
                if not data:  # close_notify (reported as a 0-byte read)
                    self._eof = True
                    break
                append(data)
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLZeroReturnError:
            self._eof = True  # close_notify
        except (ssl.SSLError, ValueError) as exc:
            err = exc
        if self._out.pending:  # KeyUpdate answers, alerts, session tickets
            self._send_pending()
        app = self._app
        if app is not None and parts:
            app.data_received(parts[0] if len(parts) == 1 else b"".join(parts))
        if err is not None:
            if self._state < _CLOSED:
                log.debug("tls: closing %s: %s", self._peer(), err)
                self._state = _CLOSED
                self._error = err
                if self._raw is not None:
                    self._raw.abort()
            return
        if self._eof and self._state == _OPEN:
            if not self._app_eof():
                self._close()

    def _app_eof(self) -> bool:
        app = self._app
        if app is None or self._state != _OPEN:
            return False
        return bool(app.eof_received())

    def _queue(self, data: bytes) -> None:
        """Queue app plaintext; flushed at the end of this loop iteration."""
        wbuf = self._wbuf
        if not wbuf:
            loop = self._loop
            assert loop is not None
            _shared.schedule(self, loop)
        wbuf.append(data)
        self._wsize += len(data)

    def _flush(self) -> None:
        """Encrypt everything queued with one ``SSLObject.write``; one socket write."""
        wbuf = self._wbuf
        if not wbuf:
            return
        data = wbuf[0] if len(wbuf) == 1 else b"".join(wbuf)
        wbuf.clear()
        self._wsize = 0
        if self._state != _OPEN and self._state != _CLOSING:
            return
        try:
            self._write(data)
        except (ssl.SSLError, ValueError) as exc:
            log.debug("tls: write to %s failed: %s", self._peer(), exc)
            self._state = _CLOSED
            self._error = exc
            if self._raw is not None:
                self._raw.abort()
            return
        raw = self._raw
        if raw is not None and not raw.is_closing():
            raw.write(self._out.read())

    def _send_pending(self) -> None:
        out = self._out
        if out.pending:
            data = out.read()
            raw = self._raw
            if raw is not None and not raw.is_closing():
                raw.write(data)

    def _close(self) -> None:
        """Flush, send close_notify, close the socket once its buffer drained."""
        if self._state >= _CLOSING:
            return
        self._flush()
        self._state = _CLOSING
        sslobj = self._ssl
        if sslobj is not None:
            try:
                sslobj.unwrap()
            except (ssl.SSLError, ValueError):
                pass  # close_notify is written; the peer's is not awaited
        self._send_pending()
        if self._raw is not None:
            self._raw.close()

    def _abort(self) -> None:
        if self._state == _HANDSHAKE:
            self._cancel_timer()
            self._handshake_done(ConnectionAbortedError("aborted during the TLS handshake"))
        self._state = _CLOSED
        self._wbuf.clear()
        self._wsize = 0
        if self._raw is not None:
            self._raw.abort()

    def _peer(self) -> object:
        raw = self._raw
        return raw.get_extra_info("peername") if raw is not None else None


class TlsTransport(asyncio.Transport):
    """What the app protocol above a :class:`TlsProtocol` writes to."""

    __slots__ = ("_p",)

    def __init__(self, proto: TlsProtocol) -> None:
        super().__init__()
        self._p = proto

    def write(self, data: bytes | bytearray | memoryview) -> None:
        p = self._p
        if p._state != _OPEN or not data:
            return
        p._queue(data if type(data) is bytes else bytes(data))

    def writelines(self, list_of_data: Iterable[bytes | bytearray | memoryview]) -> None:
        p = self._p
        if p._state != _OPEN:
            return
        for data in list_of_data:  # joined once, at the flush
            if data:
                p._queue(data if type(data) is bytes else bytes(data))

    def close(self) -> None:
        self._p._close()

    def abort(self) -> None:
        self._p._abort()

    def is_closing(self) -> bool:
        p = self._p
        raw = p._raw
        return p._state != _OPEN or raw is None or raw.is_closing()

    def can_write_eof(self) -> bool:
        return False

    def write_eof(self) -> None:
        raise NotImplementedError("TLS transport: use close()")

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        p = self._p
        old = p._app
        p._app = cast(asyncio.Protocol, protocol)
        if isinstance(old, _Holding) and old.held and p._loop is not None:
            # After the caller's connection_made, which follows set_protocol.
            p._loop.call_soon(old.replay, protocol, self)

    def get_protocol(self) -> asyncio.BaseProtocol:
        app = self._p._app
        assert app is not None
        return app

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        p = self._p
        sslobj = p._ssl
        if name == "ssl_object":
            return sslobj
        if name == "sslcontext":
            return p._ctx
        if name == "peercert":
            return sslobj.getpeercert() if sslobj is not None else default
        if name == "cipher":
            return sslobj.cipher() if sslobj is not None else default
        raw = p._raw
        return raw.get_extra_info(name, default) if raw is not None else default

    def pause_reading(self) -> None:
        raw = self._p._raw
        if raw is not None and not raw.is_closing():
            raw.pause_reading()

    def resume_reading(self) -> None:
        raw = self._p._raw
        if raw is not None and not raw.is_closing():
            raw.resume_reading()

    def is_reading(self) -> bool:
        raw = self._p._raw
        return raw is not None and bool(raw.is_reading())

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        raw = self._p._raw
        if raw is not None:
            raw.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        p = self._p
        raw = p._raw
        return p._wsize + (int(raw.get_write_buffer_size()) if raw is not None else 0)

    def get_write_buffer_limits(self) -> tuple[int, int]:
        raw = self._p._raw
        if raw is None:
            return (0, 0)
        limits = raw.get_write_buffer_limits()
        return (int(limits[0]), int(limits[1]))


class _Holding(asyncio.Protocol):
    """The app of a client connection until its caller attaches the real one.

    Keeps whatever arrives (data, EOF, loss) and replays it into the protocol
    given to :meth:`TlsTransport.set_protocol`.
    """

    def __init__(self) -> None:
        self.held: list[tuple[str, Any]] = []

    def data_received(self, data: bytes) -> None:
        self.held.append(("data", data))

    def eof_received(self) -> bool | None:
        self.held.append(("eof", None))
        return True  # the real protocol decides

    def connection_lost(self, exc: Exception | None) -> None:
        self.held.append(("lost", exc))

    def replay(self, protocol: asyncio.BaseProtocol, transport: TlsTransport) -> None:
        held, self.held = self.held, []
        proto = cast(asyncio.Protocol, protocol)
        for kind, arg in held:
            if kind == "data":
                proto.data_received(arg)
            elif kind == "eof":
                if not proto.eof_received():
                    transport.close()
            else:
                proto.connection_lost(arg)


async def open_tls_connection(
    host: str,
    port: int,
    context: ssl.SSLContext,
    server_hostname: str | None,
) -> TlsTransport:
    """Dial ``host:port``, run the TLS client handshake, return the transport.

    Raises what the handshake raised (e.g. ``ssl.SSLCertVerificationError``);
    bound it with a timeout at the call site. The caller attaches its
    protocol with ``set_protocol`` and calls its ``connection_made``; anything
    received before that is replayed to it.
    """
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    done.add_done_callback(lambda f: f.cancelled() or f.exception())

    def on_handshake(proto: TlsProtocol, exc: BaseException | None) -> None:
        if not done.done():
            if exc is None:
                done.set_result(None)
            else:
                done.set_exception(exc)

    raw, proto = await loop.create_connection(
        lambda: TlsProtocol(
            context,
            _Holding,
            server_side=False,
            server_hostname=server_hostname,
            handshake_timeout=0,
            on_handshake=on_handshake,
        ),
        host,
        port,
    )
    try:
        await done
    except BaseException:
        raw.abort()
        raise
    assert proto._tt is not None
    return proto._tt
