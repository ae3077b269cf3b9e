"""``derper --http-port``: the plain-HTTP listener beside a TLS DERP server.

As derper's port-80 handler: ``/generate_204`` (captive-portal check, with the
``X-Tailscale-Challenge`` echo), ``/debug/*`` and ``/metrics`` passed to the DERP
server's debug hook (same allow-list), and every other request redirected
(``302``) to the same path on ``https://<hostname>`` (``:<tls port>`` unless 443).
No DERP is served here. One request per connection (``Connection: close``);
heads must arrive within ``header_timeout``.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from typing import cast

import h11

from .server.http import GENERATE_204_CACHE_CONTROL

__all__ = ["Port80Server"]

_CHALLENGE_RE = re.compile(r"[A-Za-z0-9._:\-]{1,64}")
DebugHook = Callable[[str, object], tuple[int, bytes, str]]


class _Port80Conn(asyncio.Protocol):
    def __init__(self, server: Port80Server) -> None:
        self._server = server
        self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=16 * 1024)
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._remote: object = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self._remote = transport.get_extra_info("peername")
        self._timer = asyncio.get_running_loop().call_later(
            self._server.header_timeout, self._transport.close
        )

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def data_received(self, data: bytes) -> None:
        try:
            self._h11.receive_data(data)
            event = self._h11.next_event()
        except h11.RemoteProtocolError:
            self._reply(400, b"bad request\n", "text/plain; charset=utf-8")
            return
        if isinstance(event, h11.Request):
            self._route(event)

    def _route(self, req: h11.Request) -> None:
        target = req.target.decode("latin-1")
        path = target.split("?", 1)[0]
        head = req.method == b"HEAD"
        if path == "/generate_204":
            extra = [("Cache-Control", GENERATE_204_CACHE_CONTROL)]
            for k, v in req.headers:
                if k == b"x-tailscale-challenge":
                    challenge = v.decode("latin-1").strip()
                    if _CHALLENGE_RE.fullmatch(challenge):
                        extra.append(("X-Tailscale-Response", "response " + challenge))
            self._reply(204, b"", "", extra, head=head)
            return
        if path == "/metrics" or path == "/debug" or path.startswith("/debug/"):
            status, body, ctype = self._server.debug(path, self._remote)
            self._reply(status, body, ctype, head=head)
            return
        self._reply(302, b"", "", [("Location", self._server.https_base + target)], head=head)

    def _reply(
        self,
        status: int,
        body: bytes,
        ctype: str,
        extra: list[tuple[str, str]] | None = None,
        *,
        head: bool = False,
    ) -> None:
        t = self._transport
        if t is None or t.is_closing():
            return
        headers = [("Server", "tailnet-core-derp"), ("Connection", "close")]
        if status != 204:
            headers.append(("Content-Length", str(len(body))))
            if body:
                headers.append(("Content-Type", ctype))
        headers.extend(extra or [])
        try:
            out = self._h11.send(h11.Response(status_code=status, headers=headers)) or b""
            if body and not head and status != 204:
                out += self._h11.send(h11.Data(data=body)) or b""
            out += self._h11.send(h11.EndOfMessage()) or b""
        except h11.LocalProtocolError:
            out = b""
        t.write(out)
        t.close()


class Port80Server:
    """Listens on one TCP port; see the module docstring."""

    def __init__(
        self, *, hostname: str, tls_port: int, debug: DebugHook, header_timeout: float = 10.0
    ) -> None:
        host = f"[{hostname}]" if ":" in hostname else hostname
        self.https_base = f"https://{host}" + ("" if tls_port == 443 else f":{tls_port}")
        self.debug = debug
        self.header_timeout = header_timeout
        self._listener: asyncio.Server | None = None

    @property
    def port(self) -> int:
        if self._listener is None or not self._listener.sockets:
            raise RuntimeError("not started")
        return int(self._listener.sockets[0].getsockname()[1])

    async def start(self, host: str, port: int, *, reuse_port: bool = False) -> None:
        """Listen (``reuse_port``: SO_REUSEPORT, for ``derper --workers N``)."""
        loop = asyncio.get_running_loop()
        self._listener = await loop.create_server(
            lambda: _Port80Conn(self), host or None, port, reuse_address=True,
            reuse_port=reuse_port or None,
        )

    async def stop(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
