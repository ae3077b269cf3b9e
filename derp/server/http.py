"""HTTP front door of the DERP port: request routing with h11, then hand-over.

Every accepted TCP connection starts here. The request head is parsed with
``h11``; the route decides what happens (spec §2.1, §2.4):

=========================  ==============================================================
``/derp`` Upgrade DERP     hand the transport to :meth:`DerpAcceptor.accept` with the
(or websocket, no          bytes already read after the head; that writes the 101 (unless
``derp`` subprotocol)      ``Derp-Fast-Start: 1``) and the ServerKey frame
``/derp`` websocket+derp   RFC 6455 handshake, then DERP over binary messages
                           (:func:`derp.websocket.accept_websocket`)
``/derp`` other            426 ``DERP requires connection upgrade``
``/derp/probe``,           GET/HEAD → 200 empty, ``Access-Control-Allow-Origin: *``;
``/derp/latency-check``    other methods → 405 ``bogus probe method``
``/generate_204``          204 + Cache-Control; echoes a valid ``X-Tailscale-Challenge``
``/``                      small HTML status page
``/robots.txt``            ``User-agent: *`` / ``Disallow: /``
``/metrics``,              the server's ``debug_response(path, remote_addr)`` hook
``/debug/*``               (Prometheus text, loopback/allow-listed clients only); 404
                           if the acceptor has none
``/dashboard``,            the server's ``dashboard_response(path, remote_addr)`` hook
``/dashboard/*``           (:mod:`derp.dashboard`): a page, or a server-sent event
                           stream that keeps the connection until the client leaves
anything else              404
=========================  ==============================================================

Non-upgrade requests are answered with keep-alive as h11 allows. Malformed
HTTP gets a 400 (when possible) and the connection is closed. Headers must
arrive within the server's handshake timeout.

The only coupling to DERP is the :class:`DerpAcceptor` protocol, so a bigger
HTTP application can mount the same ``accept`` on its own port. Such an
application decides per request: :func:`front_door_response` gives the answer
to every non-upgrade request without touching the connection (the host writes
it and keeps serving its own routes on that connection), and only a request
for which it returns ``None`` — a DERP upgrade of ``/derp`` — is handed over
with its transport to an :class:`HttpConnection`, which then owns the socket.
"""

from __future__ import annotations

import asyncio
import html
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, cast

import h11

from ..keys import PublicKey

__all__ = [
    "DerpAcceptor",
    "FrontDoorResponse",
    "HttpConnection",
    "front_door_response",
    "derp_upgrade_response",
    "is_derp_upgrade",
    "wants_derp_websocket",
    "GENERATE_204_CACHE_CONTROL",
]

log = logging.getLogger("derp.server")

GENERATE_204_CACHE_CONTROL = "no-cache, no-store, must-revalidate, no-transform, max-age=0"
_CHALLENGE_RE = re.compile(r"[A-Za-z0-9._:\-]{1,64}")
_SERVER_HEADER = ("Server", "tailnet-core-derp")
#: Pipelined requests answered in one callback before the connection waits for
#: the next loop iteration (a read of 256 KiB holds thousands of probes).
ANSWERS_PER_CALL = 32
#: an event-stream reader with more than this much unsent is dropped
_STREAM_BACKLOG = 1 << 20


class DerpAcceptor(Protocol):
    """What the front door needs from the DERP server."""

    @property
    def public_key(self) -> PublicKey: ...

    @property
    def client_count(self) -> int: ...

    @property
    def handshake_timeout(self) -> float: ...

    def accept(
        self,
        transport: asyncio.Transport,
        *,
        fast_start: bool = False,
        initial_data: bytes = b"",
        remote_addr: object = None,
    ) -> object: ...

    def _http_opened(self, conn: HttpConnection) -> None: ...

    def _http_closed(self, conn: HttpConnection, upgraded: bool) -> None: ...


def derp_upgrade_response(public_key: PublicKey) -> bytes:
    """The exact 101 response derper writes before the ServerKey frame (spec §2.1)."""
    return (
        b"HTTP/1.1 101 Switching Protocols\r\n"
        b"Upgrade: DERP\r\n"
        b"Connection: Upgrade\r\n"
        b"Derp-Version: 2\r\n"
        b"Derp-Public-Key: " + public_key.raw.hex().encode("ascii") + b"\r\n\r\n"
    )


def _header(req: h11.Request, name: bytes) -> str:
    for k, v in req.headers:
        if k == name:  # h11 lowercases header names
            return v.decode("latin-1").strip()
    return ""


def wants_derp_websocket(req: h11.Request) -> bool:
    """``Upgrade: websocket`` with ``derp`` among the offered subprotocols."""
    if _header(req, b"upgrade").lower() != "websocket":
        return False
    for k, v in req.headers:
        if k == b"sec-websocket-protocol":
            offered = [p.strip() for p in v.decode("latin-1").split(",")]
            if "derp" in offered:
                return True
    return False


def is_derp_upgrade(req: h11.Request) -> bool:
    """``Upgrade: DERP``, or legacy ``Upgrade: websocket`` speaking raw DERP."""
    return _header(req, b"upgrade").lower() in ("derp", "websocket")


@dataclass(frozen=True, slots=True)
class FrontDoorResponse:
    """A complete answer of the front door (HEAD: the caller omits the body)."""

    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = ()


_NOT_FOUND = FrontDoorResponse(404, b"404 page not found\n")


def front_door_response(
    server: DerpAcceptor, req: h11.Request, remote_addr: object = None
) -> FrontDoorResponse | None:
    """The front door's answer to ``req`` (routing table in the module docstring).

    ``None`` means a DERP upgrade of ``/derp`` (``Upgrade: DERP``, WebSocket):
    that needs the transport, see :class:`HttpConnection`. Counts the request
    in the server's ``stats.http_requests`` unless it returns ``None``. No I/O.
    """
    method = req.method.decode("latin-1").upper()
    path = req.target.decode("latin-1").split("?", 1)[0]
    if path == "/derp" and (wants_derp_websocket(req) or is_derp_upgrade(req)):
        return None
    stats = getattr(server, "stats", None)
    if stats is not None:
        stats.http_requests += 1
    if path in ("/derp/probe", "/derp/latency-check"):
        if method in ("GET", "HEAD"):
            return FrontDoorResponse(200, headers=(("Access-Control-Allow-Origin", "*"),))
        return FrontDoorResponse(405, b"bogus probe method\n")
    if path == "/derp":
        return FrontDoorResponse(426, b"DERP requires connection upgrade\n")
    if path == "/generate_204":
        extra = [("Cache-Control", GENERATE_204_CACHE_CONTROL)]
        challenge = _header(req, b"x-tailscale-challenge")
        if challenge and _CHALLENGE_RE.fullmatch(challenge):
            extra.append(("X-Tailscale-Response", "response " + challenge))
        return FrontDoorResponse(204, headers=tuple(extra))
    if path == "/metrics" or path == "/debug" or path.startswith("/debug/"):
        hook = getattr(server, "debug_response", None)
        if hook is None:
            return _NOT_FOUND
        status, body, ctype = hook(path, remote_addr)
        return FrontDoorResponse(status, body, ctype)
    if path == "/robots.txt":
        return FrontDoorResponse(200, b"User-agent: *\nDisallow: /")
    if path == "/":
        page = _home_page(server).encode("utf-8")
        return FrontDoorResponse(200, page, "text/html; charset=utf-8")
    return _NOT_FOUND


def _home_page(server: DerpAcceptor) -> str:
    key = html.escape(server.public_key.text())
    return (
        "<!DOCTYPE html>\n<html><head><title>DERP</title></head><body>\n"
        "<h1>DERP</h1>\n"
        "<p>This is a <a href=\"https://tailscale.com/kb/1232/derp-servers\">DERP</a>"
        " relay server (tailnet-core).</p>\n"
        f"<p>Server key: <code>{key}</code></p>\n"
        f"<p>Connected clients: {server.client_count}</p>\n"
        "</body></html>\n"
    )


class HttpConnection(asyncio.Protocol):
    """Serves HTTP on one accepted connection until it is upgraded or closed."""

    __slots__ = (
        "__weakref__",  # AcceptGate.pending
        "_server",
        "_h11",
        "_transport",
        "_timer",
        "_upgraded",
        "remote_addr",
        "_detach",
        "_write_paused",
        "_continue_scheduled",
    )

    def __init__(self, server: DerpAcceptor) -> None:
        self._server = server
        self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=16 * 1024)
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._upgraded = False
        self.remote_addr: object = None
        #: set while this connection streams dashboard events (derp.dashboard)
        self._detach: Callable[[], None] | None = None
        #: the transport's write buffer is above its high-water mark (answers unread)
        self._write_paused = False
        self._continue_scheduled = False

    # ------------------------------------------------------------------ asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop transports implement the interface without subclassing it.
        self._transport = cast(asyncio.Transport, transport)
        self.remote_addr = transport.get_extra_info("peername")
        self._server._http_opened(self)
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self._server.handshake_timeout, self._on_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        self._end_stream()
        if not self._upgraded:
            self._server._http_closed(self, False)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._continue()

    def _continue(self) -> None:
        """Read and answer the next pipelined requests (see :meth:`_process`)."""
        self._continue_scheduled = False
        t = self._transport
        if self._upgraded or self._detach is not None or self._write_paused:
            return
        if t is None or t.is_closing():
            return
        t.resume_reading()
        try:
            self._process()
        except h11.RemoteProtocolError as exc:
            log.debug("derp http: bad request from %s: %s", self.remote_addr, exc)
            self._error_and_close(exc.error_status_hint, "bad request")

    def data_received(self, data: bytes) -> None:
        if self._upgraded:  # pragma: no cover - protocol is swapped before more data
            return
        if self._detach is not None:
            return  # an event stream: the client has nothing more to say
        try:
            self._h11.receive_data(data)
            self._process()
        except h11.RemoteProtocolError as exc:
            log.debug("derp http: bad request from %s: %s", self.remote_addr, exc)
            self._error_and_close(exc.error_status_hint, "bad request")

    def eof_received(self) -> bool | None:
        try:
            self._h11.receive_data(b"")
        except h11.RemoteProtocolError:
            pass
        return None

    # ------------------------------------------------------------------ helpers

    def close(self) -> None:
        """Close the connection (server stop)."""
        self._cancel_timer()
        if self._transport is not None and not self._upgraded:
            self._transport.close()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_timeout(self) -> None:
        self._timer = None
        log.debug("derp http: %s sent no complete request in time", self.remote_addr)
        if self._transport is not None:
            if self._write_paused:  # the client reads nothing: a flushing close never ends
                self._transport.abort()
            else:
                self._transport.close()

    def _error_and_close(self, status: int, text: str) -> None:
        if self._h11.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            try:
                self._respond(status, text + "\n", head=False, extra=[("Connection", "close")])
            except h11.LocalProtocolError:
                pass
        if self._transport is not None:
            self._transport.close()

    def _send(self, event: h11.Event) -> None:
        data = self._h11.send(event)
        if data and self._transport is not None:
            self._transport.write(data)

    def _respond(
        self,
        status: int,
        body: str | bytes = b"",
        *,
        head: bool,
        content_type: str = "text/plain; charset=utf-8",
        extra: list[tuple[str, str]] | None = None,
    ) -> None:
        raw = body.encode("utf-8") if isinstance(body, str) else body
        headers = [_SERVER_HEADER]
        if status != 204 and status >= 200:
            headers.append(("Content-Length", str(len(raw))))
            if raw:
                headers.append(("Content-Type", content_type))
        if extra:
            headers.extend(extra)
        self._send(h11.Response(status_code=status, headers=headers))
        if raw and not head and status != 204:
            self._send(h11.Data(data=raw))
        self._send(h11.EndOfMessage())

    # ------------------------------------------------------------------ request loop

    def _process(self) -> None:
        """Answer the complete requests received, one after the other. The next
        one waits (reading paused) while our answers are not being read
        (``pause_writing``) or once :data:`ANSWERS_PER_CALL` were written in this
        callback: a client pipelining requests it never reads the answers to
        cannot grow our write buffer or hold the event loop."""
        conn = self._h11
        answered = 0
        while True:
            if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                if self._transport is not None:
                    self._transport.close()
                return
            if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                if self._write_paused or answered >= ANSWERS_PER_CALL:
                    if self._transport is not None:
                        self._transport.pause_reading()
                    if not self._write_paused and not self._continue_scheduled:
                        self._continue_scheduled = True
                        asyncio.get_running_loop().call_soon(self._continue)
                    return
                conn.start_next_cycle()
            event = conn.next_event()
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            if isinstance(event, h11.ConnectionClosed):
                if self._transport is not None:
                    self._transport.close()
                return
            if not isinstance(event, h11.Request):
                continue  # Data / EndOfMessage of a request body we ignore
            req = event
            # Wait for the end of the request (GETs have no body) before acting.
            while True:
                nxt = conn.next_event()
                if nxt is h11.NEED_DATA:
                    # Body still arriving: only plausible for odd requests; answer now.
                    break
                if isinstance(nxt, h11.EndOfMessage) or nxt is h11.PAUSED:
                    break
            if self._route(req):
                return  # upgraded: the transport belongs to the DERP server now
            answered += 1

    def _route(self, req: h11.Request) -> bool:
        """Answer ``req``; return True if the transport was handed over."""
        path = req.target.decode("latin-1").split("?", 1)[0]
        if path == "/dashboard" or path.startswith("/dashboard/"):
            stats = getattr(self._server, "stats", None)
            if stats is not None:
                stats.http_requests += 1
            self._dashboard(path, req.method.upper() == b"HEAD")
            return False
        answer = front_door_response(self._server, req, self.remote_addr)
        if answer is None:  # a DERP upgrade of /derp
            stats = getattr(self._server, "stats", None)
            if stats is not None:
                stats.http_requests += 1
            if wants_derp_websocket(req):
                return self._websocket_upgrade(req)
            self._take_over(fast_start=_header(req, b"derp-fast-start") == "1")
            return True
        self._respond(
            answer.status,
            answer.body,
            head=req.method.upper() == b"HEAD",
            content_type=answer.content_type,
            extra=list(answer.headers),
        )
        return False

    def _websocket_upgrade(self, req: h11.Request) -> bool:
        """DERP over WebSocket (subprotocol ``derp``): handed to :mod:`derp.websocket`."""
        from ..websocket import accept_websocket

        transport = self._transport
        assert transport is not None
        leftover, _closed = self._h11.trailing_data
        self._upgraded = True
        self._cancel_timer()
        self._server._http_closed(self, True)
        return accept_websocket(
            self._server,
            transport,
            req,
            bytes(leftover),
            self.remote_addr,
            getattr(self._server, "stats", None),
        )

    def _dashboard(self, path: str, head: bool) -> None:
        """``/dashboard…`` via the server's ``dashboard_response`` hook (derp.dashboard)."""
        hook = getattr(self._server, "dashboard_response", None)
        if hook is None:
            self._respond(404, "404 page not found\n", head=head)
            return
        answer = hook(path, self.remote_addr)
        if isinstance(answer, tuple):
            status, body, ctype, extra = answer
            self._respond(status, body, head=head, content_type=ctype, extra=extra)
            return
        # A server-sent event stream: chunked body, no handshake deadline, kept
        # until the client goes away or falls behind (then the connection closes).
        self._cancel_timer()
        self._send(
            h11.Response(
                status_code=200,
                headers=[
                    _SERVER_HEADER,
                    ("Content-Type", "text/event-stream; charset=utf-8"),
                    ("Cache-Control", "no-store"),
                    ("X-Accel-Buffering", "no"),
                ],
            )
        )
        if head:
            self._send(h11.EndOfMessage())
            return
        self._detach = answer.attach(self._stream_write)

    def _stream_write(self, chunk: bytes) -> bool:
        t = self._transport
        if t is None or t.is_closing():
            return False
        if not chunk or t.get_write_buffer_size() > _STREAM_BACKLOG:
            t.close()  # feed closed, or a reader that stopped reading
            return False
        self._send(h11.Data(data=chunk))
        return True

    def _end_stream(self) -> None:
        detach, self._detach = self._detach, None
        if detach is not None:
            detach()

    def _take_over(self, *, fast_start: bool) -> None:
        transport = self._transport
        assert transport is not None
        leftover, _closed = self._h11.trailing_data
        self._upgraded = True
        self._cancel_timer()
        self._server._http_closed(self, True)
        self._server.accept(
            transport,
            fast_start=fast_start,
            initial_data=bytes(leftover),
            remote_addr=self.remote_addr,
        )
