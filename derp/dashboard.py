"""Live relay dashboard: counters sampled once per tick, pushed as server-sent events.

Nothing here runs per packet. The relay's hot path already keeps plain-int
counters (:class:`derp.stats.ServerStats`) and the kernel keeps per-socket byte
counters (``TCP_INFO``: ``tcpi_bytes_acked`` / ``tcpi_bytes_received``); a
:class:`RelaySampler` reads both once per tick and turns differences into rates.
Sampling only happens while at least one dashboard is subscribed.

Data flow::

    EventFeed ── loop.call_later(interval) ──► build() ─► one SSE event (bytes)
        │                                                 │ shared by every subscriber
        └─ subscribers: callbacks(bytes) -> bool ◄────────┘ False = unsubscribe

    RelaySampler.sample() ─► {"relay": {...}, "point": {...}}   (JSON-friendly dicts)

With ``derper --workers N`` the worker that answers shows host totals: the
counters come from the server's ``metrics_view`` (the same merged
:class:`ServerStats` that ``/metrics`` renders, :mod:`derp.workers.stats`), and
``relay.workers`` lists every worker's own counters from ``workers_view`` (its
siblings' last STATS snapshots, at most :data:`derp.workers.stats.STATS_INTERVAL`
old). The connection table lists the answering worker's connections only
(``relay.worker`` says which); socket byte rates are per process.

Wire format (``text/event-stream``): a new subscriber first gets ``retry`` and
one ``history`` event (the last :data:`HISTORY_POINTS` rate points), then a
``snapshot`` event per tick; every ``data:`` line is one JSON document.

The page and its assets (``derp/static/dashboard.{js,css}``, hand-written, no
third-party code) are served from the package; the page's Content-Security-Policy
allows nothing but this origin, so nothing is fetched from elsewhere at run time.
The same page renders the relay-only snapshot of ``derper`` and the full one of
``tailnet serve`` (extra sections appear when the snapshot carries them).

:class:`RelayDashboard` serves ``derper``'s variant under ``/dashboard`` to the
networks :class:`derp.metrics.DebugAccess` allows (loopback unless
``--debug-allow``), like ``/debug/``.
"""

from __future__ import annotations

import asyncio
import ctypes
import heapq
import html
import json
import logging
import socket
import struct
import time
from collections import deque
from collections.abc import Callable, Mapping
from importlib import resources
from typing import TYPE_CHECKING, Any, Final, Protocol

from .stats import DROP_REASONS, ServerStats
from .stunserver import StunStats

if TYPE_CHECKING:
    from .metrics import DebugAccess


class _RelayView(Protocol):
    """What the dashboard reads of a :class:`derp.server.DerpServer` (no import:
    the server imports this module)."""

    @property
    def stats(self) -> ServerStats: ...

    @property
    def mesh(self) -> Any: ...

    @property
    def public_key(self) -> Any: ...

    @property
    def config(self) -> Any: ...

    @property
    def client_count(self) -> int: ...

    @property
    def connections(self) -> Any: ...

    @property
    def metrics(self) -> Any: ...

__all__ = [
    "CSP",
    "EVENT_STREAM",
    "HISTORY_POINTS",
    "MAX_CONN_ROWS",
    "MAX_SAMPLED_CONNS",
    "EventFeed",
    "RelayDashboard",
    "RelaySampler",
    "SseStart",
    "dashboard_page",
    "format_event",
    "static_asset",
    "tcp_byte_counters",
]

log = logging.getLogger("derp.dashboard")

#: Content type of the live feed.
EVENT_STREAM: Final = "text/event-stream; charset=utf-8"
#: Rate points kept for charts (one per tick: two minutes at 1 s).
HISTORY_POINTS: Final = 120
#: Connections whose socket counters are read per tick, round robin: with more
#: connections each one's rate is refreshed every few ticks (top talkers stay
#: approximate, the cost per tick stays bounded).
MAX_SAMPLED_CONNS: Final = 256
#: Connection rows per snapshot (the busiest first); ``conns_total`` counts them all.
MAX_CONN_ROWS: Final = 200
#: The dashboard's Content-Security-Policy: this origin only, no inline code.
CSP: Final = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)

_TCP_INFO_LEN: Final = 256
#: offsets of tcpi_bytes_acked, tcpi_bytes_received in Linux's struct tcp_info
_TCP_BYTES: Final = struct.Struct("=QQ")
_TCP_BYTES_AT: Final = 120
_STATIC: Final = {
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
    "icon.svg": "image/svg+xml",
}


def _libc_getsockopt() -> Callable[[int], bytes | None] | None:
    """``getsockopt(fd, IPPROTO_TCP, TCP_INFO)`` straight from libc (one C call; the
    socket objects asyncio/uvloop hand out build a Python socket per call)."""
    if not hasattr(socket, "TCP_INFO"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.getsockopt
    except (OSError, AttributeError):  # pragma: no cover - not a libc platform
        return None
    buf = ctypes.create_string_buffer(_TCP_INFO_LEN)
    size = ctypes.c_uint32()
    level, opt = socket.IPPROTO_TCP, socket.TCP_INFO

    def get(fd: int) -> bytes | None:
        size.value = _TCP_INFO_LEN
        if fn(fd, level, opt, buf, ctypes.byref(size)) != 0:
            return None
        return buf.raw[: size.value]

    return get


_getsockopt = _libc_getsockopt()


def tcp_byte_counters(transport: object) -> tuple[int, int] | None:
    """``(bytes sent and acked, bytes received)`` of a transport's TCP socket, or ``None``.

    Linux ``TCP_INFO`` counters (kernel ≥ 4.1/4.6); ``None`` where the socket or
    the option is not available (other platforms, non-TCP transports).
    """
    get = getattr(transport, "get_extra_info", None)
    if get is None or not hasattr(socket, "TCP_INFO"):
        return None
    sock = get("socket")
    if sock is None:
        return None
    try:
        if _getsockopt is not None:
            raw = _getsockopt(sock.fileno())
        else:
            raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LEN)
    except (OSError, ValueError, AttributeError):
        return None
    if raw is None or len(raw) < _TCP_BYTES_AT + _TCP_BYTES.size:
        return None
    sent, received = _TCP_BYTES.unpack_from(raw, _TCP_BYTES_AT)
    return int(sent), int(received)


def format_event(event: str, data: object) -> bytes:
    """One server-sent event with a JSON ``data`` line."""
    body = json.dumps(data, separators=(",", ":"))
    return f"event: {event}\ndata: {body}\n\n".encode()


def static_asset(name: str) -> tuple[bytes, str] | None:
    """``(body, content type)`` of a dashboard asset in ``derp/static``, or ``None``."""
    ctype = _STATIC.get(name)
    if ctype is None:
        return None
    return resources.files("derp").joinpath("static", name).read_bytes(), ctype


def dashboard_page(title: str, *, events_url: str, static_prefix: str, logout_url: str = "") -> bytes:
    """The dashboard HTML shell; ``dashboard.js`` fills it from the event stream."""
    t = html.escape(title)
    logout = (
        f'<form method="post" action="{html.escape(logout_url)}" class="logout">'
        '<button type="submit" id="logout">Log out</button></form>'
        if logout_url
        else ""
    )
    p = html.escape(static_prefix)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{t}</title>
<link rel="icon" href="{p}/icon.svg" type="image/svg+xml">
<link rel="stylesheet" href="{p}/dashboard.css">
<script src="{p}/dashboard.js" defer></script>
</head>
<body data-events="{html.escape(events_url)}">
<header><h1>{t}</h1><span id="status" class="status">connecting…</span>{logout}</header>
<main id="app"><p class="muted">Waiting for the first update…</p></main>
<noscript>This dashboard needs JavaScript; the raw feed is at {html.escape(events_url)}.</noscript>
</body></html>
""".encode()


class EventFeed:
    """Calls ``build()`` once per ``interval`` while anyone listens; fans the bytes out.

    ``subscribe(callback)`` returns an unsubscribe function; a callback returning
    ``False`` is dropped. ``build`` runs on the event loop thread (via
    ``loop.call_later``: no task), once per tick whatever the number of
    subscribers; a failing ``build`` is retried on the next tick.
    """

    def __init__(
        self, build: Callable[[], bytes], *, interval: float = 1.0, on_idle: Callable[[], None] | None = None
    ) -> None:
        self._build = build
        self.interval = interval
        self._subs: dict[int, Callable[[bytes], bool]] = {}
        self._next_id = 0
        self._timer: asyncio.TimerHandle | None = None
        self._on_idle = on_idle
        self.ticks = 0

    @property
    def subscribers(self) -> int:
        return len(self._subs)

    def subscribe(self, callback: Callable[[bytes], bool]) -> Callable[[], None]:
        sid = self._next_id
        self._next_id += 1
        self._subs[sid] = callback
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.interval, self._tick)

        def unsubscribe() -> None:
            self._subs.pop(sid, None)
            self._maybe_idle()

        return unsubscribe

    def close(self) -> None:
        """Stop ticking and forget every subscriber (their streams end)."""
        subs, self._subs = self._subs, {}
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for cb in subs.values():
            try:
                cb(b"")
            except Exception:  # noqa: BLE001 - a closing subscriber must not stop the others
                pass

    def _maybe_idle(self) -> None:
        if not self._subs and self._timer is not None:
            self._timer.cancel()
            self._timer = None
            if self._on_idle is not None:
                self._on_idle()

    def _tick(self) -> None:
        self._timer = asyncio.get_running_loop().call_later(self.interval, self._tick)
        self.ticks += 1
        try:
            event = self._build()
        except Exception:  # noqa: BLE001 - logged; try again next tick
            log.exception("dashboard snapshot failed")
            return
        for sid, cb in list(self._subs.items()):
            try:
                keep = cb(event)
            except Exception:  # noqa: BLE001 - a broken subscriber only removes itself
                keep = False
            if not keep:
                self._subs.pop(sid, None)
        self._maybe_idle()


def _rate(cur: float, prev: float, dt: float) -> float:
    return max(0.0, (cur - prev) / dt) if dt > 0 else 0.0


class RelaySampler:
    """Turns a :class:`DerpServer`'s counters into a JSON-friendly snapshot with rates.

    Reads :class:`ServerStats` totals, the STUN counters, mesh links and, for up
    to :data:`MAX_SAMPLED_CONNS` admitted connections, the kernel's TCP byte
    counters. ``key_names`` (node key → label) names connections in the
    snapshot. Keeps the last :data:`HISTORY_POINTS` rate points.
    """

    def __init__(
        self,
        server: _RelayView,
        *,
        stun: StunStats | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.server = server
        self.stun = stun
        self._clock = clock
        self._wall = wall
        self.history: deque[dict[str, Any]] = deque(maxlen=HISTORY_POINTS)
        self._prev_t: float | None = None
        self._prev: dict[str, float] = {}
        self._prev_drops: dict[str, int] = {}
        #: id(conn) → (conn, sampled at, tx, rx, tx rate, rx rate)
        self._seen: dict[int, tuple[Any, float, int, int, float | None, float | None]] = {}
        self._cursor = 0

    def reset(self) -> None:
        """Forget the previous sample (the next one has no rates) and the history."""
        self._prev_t = None
        self.history.clear()
        self._seen.clear()

    def sample(self, key_names: Mapping[bytes, str] | None = None) -> dict[str, Any]:
        """One snapshot: ``{"relay": {...}, "point": {...}}``."""
        now = self._clock()
        wall = self._wall()
        srv = self.server
        view = getattr(srv, "metrics_view", None)
        stun = self.stun
        if view is None:
            st: ServerStats = srv.stats
        else:  # derp.workers: host totals, as /metrics shows them
            merged = view()
            st = merged.stats
            if stun is not None:
                stun = merged.stun
        drops: dict[str, int] = dict.fromkeys(DROP_REASONS, 0)
        for (reason, _kind), n in st.packets_dropped.items():
            drops[reason] = drops.get(reason, 0) + n
        stun_total = sum(stun.requests.values()) if stun is not None else 0
        totals = {
            "packets_in": st.packets_received,
            "packets_out": st.packets_sent,
            "bytes_in": st.bytes_received,
            "bytes_out": st.bytes_sent,
            "drops": sum(drops.values()),
            "forwarded_out": st.packets_forwarded_out,
            "forwarded_in": st.packets_forwarded_in,
            "stun": stun_total,
        }
        first = self._prev_t is None
        dt = 0.0 if self._prev_t is None else now - self._prev_t
        rates = {k: (0.0 if first else _rate(v, self._prev.get(k, v), dt)) for k, v in totals.items()}
        drop_rates = {
            r: (0.0 if first else _rate(n, self._prev_drops.get(r, n), dt)) for r, n in drops.items()
        }
        self._prev_t, self._prev, self._prev_drops = now, dict(totals), drops
        conns = self._connections(now, wall, key_names or {})
        point = {
            "t": wall,
            "packets_in": rates["packets_in"],
            "packets_out": rates["packets_out"],
            "bytes_in": rates["bytes_in"],
            "bytes_out": rates["bytes_out"],
            "drops": {r: v for r, v in drop_rates.items()},
        }
        if not first:
            self.history.append(point)
        mesh = srv.mesh
        links = mesh.links if mesh is not None else []
        relay: dict[str, Any] = {
            "key": str(srv.public_key),
            "hostname": srv.config.hostname,
            "connections": st.current_connections,
            "home_connections": st.current_home_connections,
            "accepts": st.accepts,
            "totals": totals,
            "rates": rates,
            "drops": {r: {"total": drops[r], "rate": drop_rates[r]} for r in drops},
            "conns": conns,
            "conns_total": srv.client_count,
            "mesh": [
                {
                    "url": link.peer.url,
                    "connected": bool(link.connected),
                    "self": bool(link.is_self),
                    "routes": len(mesh.routes.keys_via(link)) if mesh is not None else 0,
                }
                for link in links
            ],
            "stun": {
                "enabled": stun is not None,
                "requests": dict(stun.requests) if stun is not None else {},
                "rate": rates["stun"],
            },
        }
        workers = getattr(srv, "workers_view", None)
        if workers is not None:
            docs = workers()
            relay["worker"] = docs[0].get("worker") if docs else None
            relay["workers"] = [_worker_row(d) for d in docs]
        return {"relay": relay, "point": point}

    def _connections(
        self, now: float, wall: float, names: Mapping[bytes, str]
    ) -> list[dict[str, Any]]:
        """The :data:`MAX_CONN_ROWS` busiest connections (by socket byte rate) as rows.

        Up to :data:`MAX_SAMPLED_CONNS` connections (round robin) have their kernel
        counters read per tick; each keeps its last sample and rates. Rows (dicts,
        key text, addresses) are built for the rows shown only.
        """
        conns = list(self.server.connections)
        n = len(conns)
        seen = self._seen
        if n:
            start = self._cursor % n
            batch = conns[start : start + MAX_SAMPLED_CONNS]
            if start + MAX_SAMPLED_CONNS > n:
                batch += conns[: min(start, start + MAX_SAMPLED_CONNS - n)]
            self._cursor = start + len(batch)
            for c in batch:
                counters = tcp_byte_counters(getattr(c, "_transport", None))
                if counters is None:
                    continue
                cid = id(c)
                before = seen.get(cid)
                tx_rate = rx_rate = None
                if before is not None and before[0] is c and now > before[1]:
                    span = now - before[1]
                    tx_rate = _rate(counters[0], before[2], span)
                    rx_rate = _rate(counters[1], before[3], span)
                seen[cid] = (c, now, counters[0], counters[1], tx_rate, rx_rate)
        if len(seen) > n:  # forget departed connections
            live = {id(c) for c in conns}
            for cid in [k for k in seen if k not in live]:
                del seen[cid]

        def busy(c: Any) -> float:
            e = seen.get(id(c))
            return (e[4] or 0.0) + (e[5] or 0.0) if e is not None and e[0] is c else -1.0

        rows: list[dict[str, Any]] = []
        for c in heapq.nlargest(MAX_CONN_ROWS, conns, key=busy):
            info = c.info
            key = c.key
            since = getattr(c, "_connected_at", 0.0)
            e = seen.get(id(c))
            if e is not None and e[0] is not c:
                e = None
            rows.append(
                {
                    "key": "nodekey:" + key.hex(),
                    "name": names.get(key, ""),
                    "remote": _addr_text(c.remote_addr),
                    "since": wall - (now - since) if since else None,
                    "home": bool(getattr(c, "_preferred", False)),
                    "mesh": bool(info is not None and info.is_mesh),
                    "prober": bool(info is not None and info.is_prober),
                    "tx": e[2] if e is not None else None,
                    "rx": e[3] if e is not None else None,
                    "tx_rate": e[4] if e is not None else None,
                    "rx_rate": e[5] if e is not None else None,
                }
            )
        return rows


def _worker_row(doc: Mapping[str, Any]) -> dict[str, Any]:
    """One worker's line from its STATS snapshot (:func:`derp.workers.stats.encode_stats`)."""
    st = doc.get("stats")
    st = st if isinstance(st, Mapping) else {}

    def n(name: str) -> int:
        v = st.get(name)
        return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else 0

    return {
        "worker": doc.get("worker"),
        "connections": n("current_connections"),
        "home_connections": n("current_home_connections"),
        "accepts": n("accepts"),
        "accepts_rejected": n("accepts_rejected"),
        "packets_in": n("packets_received"),
        "packets_out": n("packets_sent"),
    }


def _addr_text(addr: object) -> str:
    if isinstance(addr, tuple) and len(addr) >= 2:
        host = str(addr[0])
        return f"[{host}]:{addr[1]}" if ":" in host else f"{host}:{addr[1]}"
    return "" if addr is None else str(addr)


class SseStart:
    """A handler's answer "start an event stream": the HTTP front door sends the
    head, then calls ``attach(write)``; ``write(chunk)`` returns ``False`` once the
    connection is gone or backed up; ``attach`` returns the detach function."""

    __slots__ = ("attach",)

    def __init__(self, attach: Callable[[Callable[[bytes], bool]], Callable[[], None]]) -> None:
        self.attach = attach


class RelayDashboard:
    """``derper``'s ``/dashboard`` (relay only), for the networks ``access`` allows."""

    def __init__(self, server: _RelayView, access: DebugAccess, *, interval: float = 1.0) -> None:
        self.server = server
        self.access = access
        self.sampler = RelaySampler(server, stun=server.metrics.stun)
        self.started = time.time()
        self.feed = EventFeed(self._build, interval=interval, on_idle=self._idle)
        self._last: bytes | None = None

    def _idle(self) -> None:
        self.sampler.reset()
        self._last = None

    def snapshot(self) -> dict[str, Any]:
        snap = self.sampler.sample()
        snap.update(
            {
                "v": 1,
                "title": f"DERP relay {self.server.config.hostname}",
                "now": time.time(),
                "uptime": time.time() - self.started,
                "health": {
                    "severity": "ok",
                    "healthy": True,
                    "sections": {"relay": {"severity": "ok", "error": None}},
                },
            }
        )
        return snap

    def _build(self) -> bytes:
        self._last = format_event("snapshot", self.snapshot())
        return self._last

    def history_event(self) -> bytes:
        return format_event("history", {"points": list(self.sampler.history)})

    def respond(self, path: str, remote_addr: object) -> tuple[int, bytes, str, list[tuple[str, str]]] | SseStart:
        """Answer a ``/dashboard…`` request (see the module docstring)."""
        if path.startswith("/dashboard/static/"):
            asset = static_asset(path[len("/dashboard/static/") :])
            if asset is None:
                return 404, b"404 page not found\n", "text/plain; charset=utf-8", []
            return 200, asset[0], asset[1], [("Cache-Control", "no-cache")]
        if not self.access.allows(remote_addr):
            return 403, b"dashboard access denied\n", "text/plain; charset=utf-8", []
        if path in ("/dashboard", "/dashboard/"):
            page = dashboard_page(
                f"DERP relay {self.server.config.hostname}",
                events_url="/dashboard/events",
                static_prefix="/dashboard/static",
            )
            return 200, page, "text/html; charset=utf-8", [("Content-Security-Policy", CSP)]
        if path == "/dashboard/snapshot":
            body = json.dumps(self.snapshot()).encode()
            return 200, body, "application/json", [("Cache-Control", "no-store")]
        if path == "/dashboard/events":
            return SseStart(self._attach)
        return 404, b"404 page not found\n", "text/plain; charset=utf-8", []

    def _attach(self, write: Callable[[bytes], bool]) -> Callable[[], None]:
        first = self._last if self._last is not None else self._build()
        write(b"retry: 2000\n\n" + self.history_event() + first)
        return self.feed.subscribe(write)

