"""The WebSocket carrier of Coder's RPC transport (client side; the server side is
:class:`tailnet.http.websocket.ServerWebSocket`, which is a :class:`~tailnet.rpc.session.Pipe`).

As Coder's ``websocket.NetConn`` (coder-transport.md §1): binary messages are one
byte stream; compression is off; a text message ends the session. Go clients
send no WebSocket pings (yamux keepalive is the liveness check), and neither do we.

:func:`dial` performs the HTTP upgrade the way Coder's Go dialer does (token in
the ``Coder-Session-Token`` header, or as the ``coder_session_token`` cookie as
the agent does, no ``Origin``) and maps a refused upgrade to :class:`DialError`
carrying Coder's JSON error (``message``, ``detail``, ``validations``).
"""

from __future__ import annotations

import asyncio
import collections
import json
import ssl as ssl_module
from collections.abc import Mapping, Sequence
from typing import Any, Final
from urllib.parse import urlsplit

import h11
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tailnet import redact as _redact  # noqa: F401 - the client's DEBUG header dump (token)

__all__ = ["DialError", "ClientPipe", "dial", "get_json"]

#: Client write buffer: above it writers wait (``drain``); what a message may hold.
_HIGH_WATER: Final = 1 << 20
_MAX_MESSAGE: Final = 64 << 20


class DialError(Exception):
    """The server refused the WebSocket upgrade (an HTTP status other than 101)."""

    def __init__(self, status: int, message: str, detail: str = "",
                 validations: Sequence[Mapping[str, str]] = ()) -> None:
        text = f"HTTP {status}: {message}" + (f" ({detail})" if detail else "")
        super().__init__(text)
        self.status = status
        self.message = message
        self.detail = detail
        self.validations = list(validations)

    @property
    def validation_fields(self) -> list[str]:
        return [str(v.get("field", "")) for v in self.validations]

    @property
    def body(self) -> dict[str, object]:
        """Coder's JSON error document."""
        return {"message": self.message, "detail": self.detail, "validations": self.validations}

    def field(self, name: str) -> bool:
        """Whether a validation error names the query/field ``name`` (e.g. ``resume_token``)."""
        return any(v.get("field") == name for v in self.validations)


class ClientPipe:
    """A :class:`~tailnet.rpc.session.Pipe` over a ``websockets`` client connection.

    Writes never block: they are queued and sent by one writer task in order;
    :meth:`drain` waits while more than 1 MiB is queued.
    """

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.response_headers: Mapping[str, str] = (
            dict(ws.response.headers.raw_items()) if ws.response is not None else {}
        )
        self._queue: collections.deque[bytes] = collections.deque()
        self._queued = 0
        self._wake = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._closed = False
        self._writer = asyncio.get_running_loop().create_task(self._write_loop())

    async def recv(self) -> bytes | str | None:
        try:
            return await self.ws.recv()
        except ConnectionClosed:
            return None

    def write(self, data: bytes) -> None:
        if self._closed:
            return
        self._queue.append(data)
        self._queued += len(data)
        if self._queued > _HIGH_WATER:
            self._room.clear()
        self._wake.set()

    @property
    def writable(self) -> bool:
        return self._room.is_set()

    async def drain(self) -> None:
        await self._room.wait()

    async def _write_loop(self) -> None:
        q = self._queue
        try:
            while True:
                while q:
                    data = q.popleft()
                    self._queued -= len(data)
                    if self._queued <= _HIGH_WATER // 2:
                        self._room.set()
                    await self.ws.send(data)
                if self._closed:
                    return
                self._wake.clear()
                await self._wake.wait()
        except ConnectionClosed:
            pass
        finally:
            self._closed = True
            q.clear()
            self._queued = 0
            self._room.set()

    async def close(self, code: int = 1000, reason: str = "") -> None:
        if not self._closed:
            self._closed = True
            self._wake.set()
            try:
                await asyncio.wait_for(asyncio.shield(self._writer), 2.0)
            except (TimeoutError, asyncio.CancelledError):
                self._writer.cancel()
        await self.ws.close(code, reason)

    def abort(self) -> None:
        self._closed = True
        self._writer.cancel()
        self._room.set()
        transport = self.ws.transport
        if transport is not None:
            transport.abort()


def _parse_error(status: int, body: bytes) -> DialError:
    try:
        doc: Any = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        doc = None
    if isinstance(doc, dict):
        vals = doc.get("validations") or []
        return DialError(
            status,
            str(doc.get("message", "")),
            str(doc.get("detail", "") or ""),
            [v for v in vals if isinstance(v, dict)],
        )
    return DialError(status, body.decode("utf-8", "replace")[:200])


async def dial(
    url: str,
    token: str | None,
    *,
    cookie: bool = False,
    headers: Sequence[tuple[str, str]] = (),
    ssl: ssl_module.SSLContext | None = None,
    open_timeout: float = 10.0,
) -> ClientPipe:
    """Open the WebSocket at ``url`` (``ws(s)://`` or ``http(s)://``) as Coder's dialer does."""
    if url.startswith("http://"):
        url = "ws://" + url[len("http://"):]
    elif url.startswith("https://"):
        url = "wss://" + url[len("https://"):]
    extra: list[tuple[str, str]] = list(headers)
    if token is None:
        pass
    elif cookie:
        extra.append(("Cookie", f"coder_session_token={token}"))
    else:
        extra.append(("Coder-Session-Token", token))
    kwargs: dict[str, Any] = {}
    if url.startswith("wss://"):
        kwargs["ssl"] = ssl if ssl is not None else ssl_module.create_default_context()
    try:
        ws = await connect(
            url,
            additional_headers=extra,
            compression=None,
            proxy=None,
            open_timeout=open_timeout,
            ping_interval=None,
            max_size=_MAX_MESSAGE,
            max_queue=64,
            user_agent_header="tailnet-core",
            **kwargs,
        )
    except InvalidStatus as exc:
        r = exc.response
        raise _parse_error(r.status_code, bytes(r.body or b"")) from None
    return ClientPipe(ws)


async def get_json(
    url: str,
    token: str | None,
    *,
    ssl: ssl_module.SSLContext | None = None,
    timeout: float = 10.0,
) -> Any:
    """``GET url`` with the session token header; the decoded JSON body.

    For Coder's small JSON endpoints (``/api/v2/workspaceagents/{id}/connection``)
    before dialing. A status other than 200 raises :class:`DialError` with Coder's
    error document.
    """
    parts = urlsplit(url)
    secure = parts.scheme in ("https", "wss")
    host = parts.hostname or "localhost"
    port = parts.port or (443 if secure else 80)
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    headers = [("Host", parts.netloc), ("Accept", "application/json"), ("Connection", "close")]
    if token is not None:
        headers.append(("Coder-Session-Token", token))
    ctx = (ssl or ssl_module.create_default_context()) if secure else None

    async def fetch() -> tuple[int, bytes]:
        reader, writer = await asyncio.open_connection(host, port, ssl=ctx)
        try:
            conn = h11.Connection(h11.CLIENT)
            writer.write(conn.send(h11.Request(method="GET", target=target, headers=headers)))
            writer.write(conn.send(h11.EndOfMessage()))
            status = 0
            body = bytearray()
            while True:
                ev = conn.next_event()
                if ev is h11.NEED_DATA:
                    conn.receive_data(await reader.read(65536))
                    continue
                if isinstance(ev, h11.Response):
                    status = ev.status_code
                elif isinstance(ev, h11.Data):
                    body += ev.data
                    if len(body) > _MAX_MESSAGE:
                        raise DialError(status, "response too large")
                elif isinstance(ev, (h11.EndOfMessage, h11.ConnectionClosed)):
                    return status, bytes(body)
        finally:
            writer.close()

    status, body = await asyncio.wait_for(fetch(), timeout)
    if status != 200:
        raise _parse_error(status, body)
    return json.loads(body.decode("utf-8"))
