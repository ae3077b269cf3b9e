"""STUN over UDP: the relay's responder (``--stun-port``, default 3478) and a client.

Server flow (one ``asyncio.DatagramProtocol``, no tasks)::

    datagram ─► parse_binding_request ─ ok ─► sendto(build_binding_response(src ip, port))
                     └─ StunError ─► ignored, counted ``not_stun``

One response per request, no rate limiting (derper's README says not to),
never raises for remote input. Counters follow derper's expvar set ``stun``:
``requests`` by disposition (``success``, ``not_stun``, ``read_error``,
``write_error``) and ``addr_family`` (``ipv4``/``ipv6``) of answered requests.
With an empty host the server binds ``::`` dual-stack (IPv4 clients appear as
v4-mapped addresses and are answered with family 0x01), falling back to
``0.0.0.0`` where IPv6 is unavailable.

Client: :func:`stun_request` sends Tailscale's 40-byte request, re-sends it a
few times within ``timeout`` (UDP is lossy), and returns the first matching
response as ``(ip, port, rtt)``; works on any asyncio loop.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any, Final, cast

from .stun import (
    StunError,
    build_binding_request,
    build_binding_response,
    new_txid,
    parse_binding_request,
    parse_binding_response,
)

__all__ = [
    "DEFAULT_STUN_PORT",
    "DISPOSITIONS",
    "StunServer",
    "StunStats",
    "stun_request",
]

log = logging.getLogger("derp.stun")

DEFAULT_STUN_PORT: Final = 3478
DISPOSITIONS: Final = ("success", "not_stun", "read_error", "write_error")


class StunStats:
    """Counters of one :class:`StunServer` (event loop thread only)."""

    __slots__ = ("requests", "addr_family")

    def __init__(self) -> None:
        #: disposition → count (``success``/``not_stun``/``read_error``/``write_error``)
        self.requests: dict[str, int] = dict.fromkeys(DISPOSITIONS, 0)
        #: ``ipv4``/``ipv6`` → answered requests
        self.addr_family: dict[str, int] = {"ipv4": 0, "ipv6": 0}

    def snapshot(self) -> dict[str, dict[str, int]]:
        return {"requests": dict(self.requests), "addr_family": dict(self.addr_family)}


class _Responder(asyncio.DatagramProtocol):
    def __init__(self, stats: StunStats) -> None:
        self.stats = stats
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | object, ...]) -> None:
        st = self.stats
        try:
            req = parse_binding_request(data)
            ip, port = str(addr[0]), int(cast(int, addr[1]))
            resp = build_binding_response(req.txid, ip, port)
        except (StunError, ValueError, IndexError):
            st.requests["not_stun"] += 1
            return
        t = self.transport
        if t is None:
            return
        try:
            t.sendto(resp, addr)
        except OSError as exc:
            st.requests["write_error"] += 1
            log.debug("stun: reply to %s failed: %s", addr, exc)
            return
        st.requests["success"] += 1
        st.addr_family["ipv4" if resp[25] == 1 else "ipv6"] += 1

    def error_received(self, exc: Exception) -> None:
        # ICMP errors for earlier replies (e.g. port unreachable): count, keep serving.
        self.stats.requests["read_error"] += 1
        log.debug("stun: socket error: %s", exc)


class StunServer:
    """UDP STUN responder.

    Usage::

        stun = StunServer()
        await stun.start("127.0.0.1", 0)   # "" = all interfaces, dual-stack
        ... stun.port, stun.stats ...
        await stun.stop()
    """

    def __init__(self, stats: StunStats | None = None) -> None:
        #: counters; pass a relay's ``metrics.stun`` to export them with its metrics
        self.stats = stats if stats is not None else StunStats()
        self._transport: asyncio.DatagramTransport | None = None

    @property
    def port(self) -> int:
        if self._transport is None:
            raise RuntimeError("STUN server not started")
        sockname = self._transport.get_extra_info("sockname")
        return int(sockname[1])

    async def start(
        self, host: str = "", port: int = DEFAULT_STUN_PORT, *, reuse_port: bool = False
    ) -> None:
        """Bind the UDP socket; raises ``OSError`` if the port is taken.

        ``reuse_port`` sets SO_REUSEPORT (``derper --workers N``: every worker
        binds the port and the kernel spreads the requests)."""
        if self._transport is not None:
            raise RuntimeError("STUN server already started")
        loop = asyncio.get_running_loop()
        # Resolve off the loop thread: a host name must not block other connections.
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM) if host else []
        sock = _bind(infos, port, reuse_port)
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _Responder(self.stats), sock=sock
        )
        self._transport = transport
        log.info("stun: listening on UDP %s:%d", host or "*", self.port)

    async def stop(self) -> None:
        t, self._transport = self._transport, None
        if t is not None:
            t.close()


def _bind(infos: list[tuple[Any, ...]], port: int, reuse_port: bool = False) -> socket.socket:
    """A non-blocking UDP socket bound to ``infos[0]``, or to ``::``/``0.0.0.0`` if empty."""

    def new(family: int) -> socket.socket:
        s = socket.socket(family, socket.SOCK_DGRAM)
        if reuse_port:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        return s

    if infos:
        family, _, _, _, addr = infos[0]
        sock = new(family)
        try:
            sock.bind(addr)
        except OSError:
            sock.close()
            raise
    else:
        try:
            sock = new(socket.AF_INET6)
        except OSError:
            sock = new(socket.AF_INET)
            try:
                sock.bind(("0.0.0.0", port))
            except OSError:
                sock.close()
                raise
        else:
            try:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                sock.bind(("::", port))
            except OSError:
                sock.close()
                raise
    sock.setblocking(False)
    return sock


class _Asker(asyncio.DatagramProtocol):
    def __init__(self, txid: bytes, done: asyncio.Future[tuple[str, int]]) -> None:
        self.txid = txid
        self.done = done

    def datagram_received(self, data: bytes, addr: tuple[str | object, ...]) -> None:
        try:
            resp = parse_binding_response(data)
        except StunError:
            return
        if resp.txid == self.txid and not self.done.done():
            self.done.set_result((resp.ip, resp.port))

    def error_received(self, exc: Exception) -> None:
        if not self.done.done():
            self.done.set_exception(exc)


async def stun_request(
    host: str, port: int = DEFAULT_STUN_PORT, timeout: float = 3.0, *, attempts: int = 3
) -> tuple[str, int, float]:
    """Ask the STUN server at ``host:port`` for our public address.

    Returns ``(ip, port, rtt_seconds)``; the rtt is measured from the most
    recent (re-)send before the answer arrived. Raises
    ``TimeoutError`` if no valid answer arrives within ``timeout`` and
    ``OSError`` for socket errors (e.g. ICMP port unreachable).
    """
    loop = asyncio.get_running_loop()
    txid = new_txid()
    request = build_binding_request(txid)
    done: asyncio.Future[tuple[str, int]] = loop.create_future()
    transport, _ = await loop.create_datagram_endpoint(
        lambda: _Asker(txid, done), remote_addr=(host, port)
    )
    try:
        interval = timeout / max(1, attempts)
        deadline = loop.time() + timeout
        while True:
            sent_at = loop.time()
            transport.sendto(request)
            wait = min(interval, deadline - sent_at)
            if wait <= 0:
                raise TimeoutError(f"no STUN answer from {host}:{port} in {timeout} s")
            try:
                ip, mapped_port = await asyncio.wait_for(asyncio.shield(done), wait)
            except TimeoutError:
                if loop.time() >= deadline:
                    raise TimeoutError(
                        f"no STUN answer from {host}:{port} in {timeout} s"
                    ) from None
                continue
            return ip, mapped_port, loop.time() - sent_at
    finally:
        transport.close()
        if not done.done():
            done.cancel()
