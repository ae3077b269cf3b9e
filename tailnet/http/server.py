"""The HTTP listener: h11 per connection, DERP hand-over, WebSocket upgrades.

Connection flow::

    TCP accept → ApiConnection (h11 server); every request is routed on its own
      request head + end of message
        /derp with a DERP upgrade (Upgrade: DERP, or WebSocket) → the relay's
            front door: the transport's protocol becomes
            derp.server.http.HttpConnection(derp_server); the request head
            (re-serialized by h11) and any bytes read after it are replayed into
            it, so every DERP behaviour (fast start, WebSocket DERP, …) is the
            relay's own. The relay's connection then owns the socket: no extra
            layer on the data path, and no later request reaches the API.
        other /derp, /derp/*, /generate_204 → the relay's answer
            (derp.server.http.front_door_response: probes, 204 challenge, 426,
            404) written here; the connection stays ours, so its next request is
            routed again (the relay's /metrics or /debug/ are never reachable
            through this port)
        anything else → await app.handle(Request) in a task (reading paused):
            Response → written with h11 (keep-alive as h11 allows)
            Upgrade  → websockets handshake (ServerWebSocket.upgrade), then the
                       upgrade's handler runs in a task of its own until the
                       socket closes; the request task ends at once, so the
                       h11 state, the request and this connection object are
                       not kept for the WebSocket's life
            Stream   → the head, then chunks pushed by the producer (server-sent
                       events) until it stops, the peer leaves or falls behind
            HttpError → Coder-style JSON error; other exceptions → 500 JSON
                        "Internal error" (logged, no exception text)

Malformed HTTP → 400 and close (only that connection). Request heads must
arrive within ``header_timeout``; bodies are kept for the handler (≤ 1 MiB).

Pipelined requests are served one at a time, and the next one is read only
while the transport's write buffer is below its high-water mark (a client
that sends requests but never reads the responses stops being read, instead
of growing our write buffer without end; it is dropped at ``header_timeout``);
at most :data:`SYNC_ANSWERS_PER_CALL` relay-path answers are written per
callback.

TLS (``ssl_context``): the listener terminates TLS itself with the relay's TLS
path, :class:`derp.tlsio.TlsProtocol` (memory BIOs, every record of a read in
one delivery, one encryption per connection and loop iteration); the TLS
handshake must also finish within ``header_timeout``. Everything above (the
API, WebSocket upgrades, the DERP hand-over, so also DERP over WSS) runs on
its :class:`~derp.tlsio.TlsTransport` unchanged.

Shutdown (:meth:`HttpApiServer.stop`): stop accepting, close idle HTTP
connections, run every live upgrade's ``on_shutdown`` (WebSockets: close 1001)
and wait up to ``grace`` seconds before cancelling their handlers.
"""

from __future__ import annotations

import asyncio
import http
import logging
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol, cast

import h11

from derp.fairlane import lane_for
from derp.server import DerpServer
from derp.server.http import HttpConnection as DerpFrontDoor
from derp.server.http import front_door_response
from derp.tlsio import TlsProtocol

from .errors import HttpError, error_body
from .request import Request, request_from_h11
from .websocket import CLOSE_GOING_AWAY, ServerWebSocket

__all__ = [
    "Response",
    "Upgrade",
    "Stream",
    "App",
    "HttpApiServer",
    "is_derp_path",
    "MAX_BODY",
    "SYNC_ANSWERS_PER_CALL",
]

log = logging.getLogger(__name__)

MAX_BODY = 1 << 20
#: Pipelined requests answered without a task (relay paths) in one callback
#: before the connection waits for the next loop iteration.
SYNC_ANSWERS_PER_CALL = 32
_SERVER = ("Server", "tailnet-core")


def is_derp_path(path: str) -> bool:
    """Paths served by the embedded DERP relay's own front door."""
    return path == "/derp" or path.startswith("/derp/") or path == "/generate_204"


@dataclass(slots=True)
class Response:
    """A complete HTTP response."""

    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: list[tuple[str, str]] = field(default_factory=list)


@dataclass(slots=True)
class Upgrade:
    """Accept the request as a WebSocket and run ``handler`` on it."""

    handler: Callable[[ServerWebSocket], Awaitable[None]]
    headers: list[tuple[str, str]] = field(default_factory=list)
    ping_interval: float | None = 15.0
    on_shutdown: Callable[[ServerWebSocket], Awaitable[None]] | None = None


@dataclass(slots=True)
class Stream:
    """Answer with a streamed (chunked) body, e.g. server-sent events.

    After the head is written the server calls ``attach(write)`` and keeps the
    connection until ``write`` returns ``False``: the producer passed ``b""``
    (end), the peer went away, or more than :data:`STREAM_BACKLOG` bytes are
    waiting to be sent (a reader that stopped reading). ``attach`` returns the
    function that detaches the producer; it is called exactly once, when the
    stream ends for any reason. The connection is closed afterwards.
    """

    attach: Callable[[Callable[[bytes], bool]], Callable[[], None]]
    content_type: str = "text/event-stream; charset=utf-8"
    headers: list[tuple[str, str]] = field(default_factory=list)


#: unsent bytes above which a streamed response's reader is dropped
STREAM_BACKLOG = 1 << 20


class App(Protocol):
    async def handle(self, req: Request) -> Response | Upgrade | Stream: ...


class _ApiConnection(asyncio.Protocol):
    def __init__(self, server: HttpApiServer) -> None:
        self._server = server
        self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=16 * 1024)
        self._transport: asyncio.Transport | None = None
        self._req: h11.Request | None = None
        self._body = bytearray()
        self._task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._handed_off = False
        self.remote: object = None
        #: the transport's write buffer is above its high-water mark (responses unread)
        self._write_paused = False
        self._continue_scheduled = False

    # asyncio callbacks -------------------------------------------------------

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._continue()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self.remote = transport.get_extra_info("peername")
        self._server._conns.add(self)
        self._arm_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._server._conns.discard(self)
        self._cancel_timer()
        if self._task is not None and not self._handed_off:
            self._task.cancel()

    def data_received(self, data: bytes) -> None:
        if self._handed_off:  # pragma: no cover - protocol swapped before more data
            return
        try:
            self._h11.receive_data(data)
        except h11.RemoteProtocolError:
            self._bad_request()
            return
        if self._task is None:
            self._process()

    def eof_received(self) -> bool | None:
        try:
            self._h11.receive_data(b"")
        except h11.RemoteProtocolError:
            pass
        if self._task is None:
            self._process()
        return None

    # helpers -----------------------------------------------------------------

    def _arm_timer(self) -> None:
        self._cancel_timer()
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self._server.header_timeout, self._on_timeout)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_timeout(self) -> None:
        self._timer = None
        if self._transport is not None and self._task is None:
            if self._write_paused:  # the client reads nothing: a flushing close never ends
                self._transport.abort()
            else:
                self._transport.close()

    def _continue(self) -> None:
        """Read and serve the next requests, unless a handler runs, the socket was
        handed over, or our responses are not being read (``pause_writing``)."""
        self._continue_scheduled = False
        t = self._transport
        if self._task is not None or self._handed_off or self._write_paused:
            return
        if t is None or t.is_closing():
            return
        t.resume_reading()
        self._process()

    @property
    def idle(self) -> bool:
        return self._task is None and not self._handed_off

    def close(self) -> None:
        if self._transport is not None and not self._handed_off:
            self._transport.close()

    def _bad_request(self) -> None:
        if self._h11.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            try:
                self._write(
                    Response(400, error_body("Malformed HTTP request.")), close=True
                )
            except h11.LocalProtocolError:
                pass
        if self._transport is not None:
            self._transport.close()

    def _write(self, resp: Response, *, close: bool = False, head: bool = False) -> None:
        headers = [_SERVER]
        if resp.status >= 200 and resp.status not in (204, 304):
            headers.append(("Content-Length", str(len(resp.body))))
        if resp.body:
            headers.append(("Content-Type", resp.content_type))
        headers.extend(resp.headers)
        if close:
            headers.append(("Connection", "close"))
        try:
            reason = http.HTTPStatus(resp.status).phrase.encode("ascii")
        except ValueError:
            reason = b""
        out = (
            self._h11.send(h11.Response(status_code=resp.status, headers=headers, reason=reason))
            or b""
        )
        if resp.body and not head:
            out += self._h11.send(h11.Data(data=resp.body)) or b""
        out += self._h11.send(h11.EndOfMessage()) or b""
        if self._transport is not None:
            self._transport.write(out)

    # request loop --------------------------------------------------------------

    def _process(self) -> None:
        conn = self._h11
        answered = 0
        while True:
            if self._write_paused or answered >= SYNC_ANSWERS_PER_CALL:
                # Responses are not being read, or many pipelined requests were just
                # answered in this callback: read nothing more for now. resume_writing,
                # or a later loop iteration through the loop's shared lane
                # (derp.fairlane), goes on (a byte and CPU budget).
                if self._transport is not None:
                    self._transport.pause_reading()
                if self._timer is None:
                    self._arm_timer()  # a client that never reads is dropped in time
                if not self._write_paused and not self._continue_scheduled:
                    self._continue_scheduled = True
                    lane_for(asyncio.get_running_loop()).defer(self._continue)
                return
            if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                if self._transport is not None:
                    self._transport.close()
                return
            if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                conn.start_next_cycle()
                self._arm_timer()
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError:
                self._bad_request()
                return
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            if isinstance(event, h11.ConnectionClosed):
                if self._transport is not None:
                    self._transport.close()
                return
            if isinstance(event, h11.Request):
                self._req, self._body = event, bytearray()
                continue
            if isinstance(event, h11.Data):
                self._body += event.data
                if len(self._body) > MAX_BODY:
                    self._write(Response(413, error_body("Request body too large.")), close=True)
                    if self._transport is not None:
                        self._transport.close()
                    return
                continue
            if isinstance(event, h11.EndOfMessage) and self._req is not None:
                req, self._req = self._req, None
                self._cancel_timer()
                path = req.target.split(b"?", 1)[0].decode("latin-1")
                derp = self._server.derp
                if derp is not None and is_derp_path(path):
                    answer = front_door_response(derp, req, self.remote)
                    if answer is None:  # a DERP upgrade: the relay takes the socket
                        self._hand_to_derp(req)
                        return
                    self._write(
                        Response(
                            answer.status, answer.body, answer.content_type, list(answer.headers)
                        ),
                        head=req.method.upper() == b"HEAD",
                    )
                    answered += 1
                    continue  # keep-alive: the next request is routed afresh
                assert self._transport is not None
                self._transport.pause_reading()
                body, self._body = bytes(self._body), bytearray()
                self._task = asyncio.get_running_loop().create_task(self._handle(req, body))
                return

    def _hand_to_derp(self, req: h11.Request) -> None:
        transport = self._transport
        derp = self._server.derp
        assert transport is not None and derp is not None
        try:
            client = h11.Connection(h11.CLIENT)
            head = (client.send(req) or b"") + (client.send(h11.EndOfMessage()) or b"")
        except h11.LocalProtocolError:
            self._write(Response(400, error_body("Malformed DERP request.")), close=True)
            transport.close()
            return
        trailing = bytes(self._h11.trailing_data[0])
        self._handed_off = True
        self._server._conns.discard(self)
        front = DerpFrontDoor(derp)
        transport.set_protocol(front)
        front.connection_made(transport)
        front.data_received(head + trailing)

    async def _handle(self, ev: h11.Request, body: bytes = b"") -> None:
        req = request_from_h11(ev, self.remote, body)
        head = req.method == "HEAD"
        try:
            try:
                result = await self._server.app.handle(req)
            except HttpError as exc:
                result = Response(exc.status, exc.body())
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("http: %s %s failed", req.method, req.path)
                result = Response(500, error_body("Internal error."))
            if isinstance(result, Stream):
                if not head:
                    await self._stream(result)
                    return
                result = Response(200, b"", result.content_type, result.headers)
            if isinstance(result, Upgrade):
                if not req.is_websocket:
                    result = Response(
                        426,
                        error_body(
                            "This endpoint requires a WebSocket upgrade.",
                            "Send Upgrade: websocket.",
                        ),
                        headers=[("Upgrade", "websocket")],
                    )
                else:
                    await self._upgrade(ev, result)
                    return
            self._write(result, head=head)
        finally:
            self._task = None
        self._continue()

    async def _stream(self, st: Stream) -> None:
        """Write the head of ``st``, then its chunks (see :class:`Stream`); close after."""
        transport = self._transport
        assert transport is not None
        headers = [_SERVER, ("Content-Type", st.content_type), ("Cache-Control", "no-store")]
        headers.extend(st.headers)
        # No Content-Length: h11 frames the body with chunked encoding (HTTP/1.1).
        transport.write(
            self._h11.send(h11.Response(status_code=200, headers=headers, reason=b"OK")) or b""
        )
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        conn = self._h11

        def write(chunk: bytes) -> bool:
            t = self._transport
            if (
                t is None
                or t.is_closing()
                or not chunk
                or t.get_write_buffer_size() > STREAM_BACKLOG
            ):
                if not done.done():
                    done.set_result(None)
                return False
            t.write(conn.send(h11.Data(data=chunk)) or b"")
            return True

        detach = st.attach(write)
        try:
            await done
        finally:
            detach()
            transport.close()

    async def _upgrade(self, ev: h11.Request, up: Upgrade) -> None:
        transport = self._transport
        assert transport is not None
        trailing = bytes(self._h11.trailing_data[0])
        self._handed_off = True
        self._server._conns.discard(self)
        ws = ServerWebSocket.upgrade(
            transport,
            ev,
            extra_headers=up.headers,
            trailing=trailing,
            ping_interval=up.ping_interval,
        )
        if ws is None:
            return
        self._server._start_upgrade(ws, up)


class HttpApiServer:
    """Listens on one TCP port; serves ``app`` and (optionally) the DERP relay's paths."""

    def __init__(
        self,
        app: App,
        *,
        derp: DerpServer | None = None,
        header_timeout: float = 10.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.app = app
        self.derp = derp
        self.header_timeout = header_timeout
        self.ssl_context = ssl_context
        self._listener: asyncio.Server | None = None
        self._conns: set[_ApiConnection] = set()
        #: sockets still in the TLS handshake (aborted by stop)
        self._handshaking: set[TlsProtocol] = set()
        self._upgrades: dict[asyncio.Task[None], tuple[ServerWebSocket, Upgrade]] = {}
        self.host = ""

    @property
    def port(self) -> int:
        if self._listener is None or not self._listener.sockets:
            raise RuntimeError("server not started")
        return int(self._listener.sockets[0].getsockname()[1])

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        if self._listener is not None:
            raise RuntimeError("server already started")
        loop = asyncio.get_running_loop()
        self._listener = await loop.create_server(
            self._protocol, host, port, backlog=1024, reuse_address=True
        )
        self.host = host

    @property
    def scheme(self) -> str:
        """``https`` when the listener terminates TLS, else ``http``."""
        return "http" if self.ssl_context is None else "https"

    def _protocol(self) -> asyncio.BaseProtocol:
        ctx = self.ssl_context
        if ctx is None:
            return _ApiConnection(self)
        tls = TlsProtocol(
            ctx,
            lambda: _ApiConnection(self),
            handshake_timeout=self.header_timeout,
            on_handshake=lambda p, _exc: self._handshaking.discard(p),
        )
        self._handshaking.add(tls)
        return tls

    def _start_upgrade(self, ws: ServerWebSocket, up: Upgrade) -> None:
        """Run ``up``'s handler on ``ws`` in a task of its own (registered for stop)."""
        task = asyncio.get_running_loop().create_task(self._run_upgrade(ws, up))
        self._upgrades[task] = (ws, up)
        task.add_done_callback(self._upgrades.pop)

    async def _run_upgrade(self, ws: ServerWebSocket, up: Upgrade) -> None:
        try:
            await up.handler(ws)
        except asyncio.CancelledError:
            ws.abort()
            raise
        except Exception:
            log.exception("websocket handler failed")
            await ws.close(1011, "internal error")
        else:
            if ws.open:
                await ws.close(1000, "")

    async def stop(self, grace: float = 5.0) -> None:
        """Stop listening, close WebSockets with 1001, close idle connections."""
        if self._listener is not None:
            self._listener.close()
        for tls in list(self._handshaking):
            tls.abort()
        self._handshaking.clear()
        for c in list(self._conns):
            if c.idle:
                c.close()

        async def shut(ws: ServerWebSocket, up: Upgrade) -> None:
            if up.on_shutdown is not None:
                await up.on_shutdown(ws)
            else:
                await ws.close(CLOSE_GOING_AWAY, "server shutting down", timeout=grace)

        live = list(self._upgrades.items())
        if live:
            await asyncio.gather(*(shut(ws, up) for _, (ws, up) in live), return_exceptions=True)
            tasks = [t for t, _ in live]
            _done, pending = await asyncio.wait(tasks, timeout=grace)
            for t in pending:
                t.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
        for c in list(self._conns):
            c.close()
        if self._listener is not None:
            try:
                await asyncio.wait_for(self._listener.wait_closed(), grace)
            except TimeoutError:  # pragma: no cover
                pass
            self._listener = None
