"""Prometheus exposition of the DERP server's counters, and the debug-endpoint policy.

The hot path only bumps plain ints on :class:`derp.stats.ServerStats`; this
module turns them into Prometheus metric families *at scrape time* with a
custom ``prometheus_client`` collector (no ``Counter.inc()`` per packet, no
label lookups, no locks on the event loop).

Names follow derper's ``/debug/varz`` (spec §3.12): ``derp_<expvar key>``
with the ``gauge_``/``counter_`` prefix turned into the metric type. Counter
samples carry the standard ``_total`` suffix of the Prometheus text format
(``derp_packets_sent_total``); the family names below are derper's:

==============================================  =======  ===============================
metric                                          type     source
==============================================  =======  ===============================
``derp_current_connections``                    gauge    ``current_connections``
``derp_current_home_connections``               gauge    ``current_home_connections``
``derp_accepts``                                counter  admitted DERP connections
``derp_packets_sent/received``,                 counter  traffic
``derp_bytes_sent/received``
``derp_packets_dropped{reason,kind}``,          counter  drops (every combination, from 0)
``derp_bytes_dropped{reason,kind}``
``derp_average_queue_duration_ms``              gauge    EMA of queued-packet wait
``derp_websocket_accepts``                      counter  WebSocket upgrades
``derp_sclient_write_timeouts``                 counter  clients dropped by write timeout
``derp_rate_limit_waited``                      counter  receive-limit pauses
``derp_accepts_rejected``                       counter  closed by accept limits
``derp_current_mesh_peers``                     gauge    set by the mesh code (see below)
``derp_stun_requests{disposition}``             counter  :class:`StunStats` (STUN server)
``derp_stun_addrfamily{family}``                counter  :class:`StunStats`
``derp_dup_client_conns``                       counter  connections for a key already
                                                         connected (derper's
                                                         ``total_dup_client_conns``)
``derp_<other field>``                          counter  every other ``ServerStats`` number,
                                                / gauge  each with its own help text
``process_*``, ``python_*``                              ``prometheus_client``'s process,
                                                         platform and GC collectors
==============================================  =======  ===============================

Every family has a real help text; a counter's samples carry exactly one
``_total`` suffix (no name already ends in ``_total``).

Other modules publish through :class:`DerpMetrics`: the STUN server
increments ``metrics.stun.requests["success"]`` (keys
:data:`STUN_DISPOSITIONS`) and ``metrics.stun.addr_family["ipv4"]`` (pass
``metrics.stun`` to ``StunServer(stats=...)``); the mesh
code registers ``metrics.gauges["current_mesh_peers"] = lambda: n`` (any
callable returning a number becomes ``derp_<name>``).

Access (spec §2.4): ``/debug/*`` and ``/metrics`` are served only to clients
:class:`DebugAccess` allows: loopback by default, or exactly the configured
networks (a configured list *replaces* the default; add ``127.0.0.1/32``
yourself if you still want local access). Others get 403.
"""

from __future__ import annotations

import html
import ipaddress
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Final

from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from .stats import ServerStats
from .stunserver import DISPOSITIONS as STUN_DISPOSITIONS
from .stunserver import StunStats

__all__ = [
    "DEFAULT_DEBUG_NETWORKS",
    "STUN_DISPOSITIONS",
    "DebugAccess",
    "DerpMetrics",
    "ServerStatsCollector",
    "StunStats",
]

DEFAULT_DEBUG_NETWORKS: Final = ("127.0.0.0/8", "::1/128")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# ServerStats field -> (metric name without "derp_", type, help)
_KNOWN: Final[dict[str, tuple[str, str, str]]] = {
    "accepts": ("accepts", "counter", "DERP connections admitted"),
    "current_connections": ("current_connections", "gauge", "Admitted DERP connections"),
    "current_home_connections": (
        "current_home_connections",
        "gauge",
        "Connections whose client said this is its home (NotePreferred)",
    ),
    "packets_sent": ("packets_sent", "counter", "Packets written to clients"),
    "bytes_sent": ("bytes_sent", "counter", "Packet payload bytes written to clients"),
    "packets_received": ("packets_received", "counter", "Packets received from clients"),
    "bytes_received": ("bytes_received", "counter", "Packet payload bytes received"),
    "packets_forwarded_in": ("packets_forwarded_in", "counter", "ForwardPackets received"),
    "packets_forwarded_out": ("packets_forwarded_out", "counter", "Packets forwarded to mesh"),
    "websocket_accepts": ("websocket_accepts", "counter", "DERP-over-WebSocket upgrades"),
    "write_timeouts": (
        "sclient_write_timeouts",
        "counter",
        "Clients dropped because their socket stayed blocked for the write timeout",
    ),
    "rate_limit_waits": (
        "rate_limit_waited",
        "counter",
        "Times a client's reads were paused by the per-client receive rate limit",
    ),
    "accepts_rejected": (
        "accepts_rejected",
        "counter",
        "Connections closed at accept by the accept-rate limit or max connections",
    ),
    "average_queue_duration_ms": (
        "average_queue_duration_ms",
        "gauge",
        "Moving average of how long queued packets waited before being written (ms)",
    ),
    "total_dup_client_conns": (
        "dup_client_conns",
        "counter",
        "Connections admitted for a node key that already had a connection",
    ),
    "http_requests": ("http_requests", "counter", "Plain HTTP requests answered by the front door"),
    "handshake_failures": (
        "handshake_failures",
        "counter",
        "Connections closed during the DERP handshake (bad ClientInfo, timeout, refused)",
    ),
    "packets_received_disco": (
        "packets_received_disco",
        "counter",
        "Packets received that carry a disco (NAT traversal) message",
    ),
    "got_ping": ("got_ping", "counter", "Ping frames received from clients"),
    "sent_pong": ("sent_pong", "counter", "Pong frames sent to clients"),
    "peer_gone_disconnected_frames": (
        "peer_gone_disconnected_frames",
        "counter",
        "PeerGone(Disconnected) frames sent: a peer a client heard from went away",
    ),
    "peer_gone_not_here_frames": (
        "peer_gone_not_here_frames",
        "counter",
        "PeerGone(NotHere) frames sent: a client sent to a key that is not connected",
    ),
    "unknown_frames": ("unknown_frames", "counter", "Frames of unknown type received (ignored)"),
    "keepalives_sent": ("keepalives_sent", "counter", "KeepAlive frames sent"),
    "protocol_errors": (
        "protocol_errors",
        "counter",
        "Connections closed for a malformed or oversized frame",
    ),
    "home_moves_in": (
        "home_moves_in",
        "counter",
        "Clients that declared this server their home (NotePreferred true)",
    ),
    "home_moves_out": (
        "home_moves_out",
        "counter",
        "Clients that stopped calling this server their home (NotePreferred false)",
    ),
    "admission_rejected": (
        "admission_rejected",
        "counter",
        "Clients refused by admission control (--verify-client-url, known keys)",
    ),
    "health_frames_sent": (
        "health_frames_sent",
        "counter",
        "Health frames sent (problem announcements and clears)",
    ),
    "restarting_frames_sent": (
        "restarting_frames_sent",
        "counter",
        "Restarting frames sent at graceful shutdown",
    ),
}

#: help texts of the gauges other modules register in DerpMetrics.gauges
_GAUGE_HELP: Final[dict[str, str]] = {
    "current_mesh_peers": "Mesh links currently logged in to their peer",
}


def _metric(name: str, kind: str, doc: str) -> Metric:
    return Metric(name, doc, kind)


def _sample(kind: str, name: str) -> str:
    # Prometheus text format: counter samples carry the "_total" suffix.
    return name + "_total" if kind == "counter" else name


class ServerStatsCollector(Collector):
    """Builds metric families from a :class:`ServerStats` (and friends) on each scrape."""

    def __init__(
        self,
        stats: ServerStats,
        stun: StunStats,
        gauges: dict[str, Callable[[], float]],
    ) -> None:
        self._stats = stats
        self._stun = stun
        self._gauges = gauges

    def collect(self) -> Iterator[Metric]:
        stats = self._stats
        for field in stats.__slots__:
            value = getattr(stats, field)
            if isinstance(value, dict):
                if field in ("packets_dropped", "bytes_dropped"):
                    what = "Packets" if field == "packets_dropped" else "Bytes"
                    m = _metric(f"derp_{field}", "counter", f"{what} dropped, by reason and kind")
                    for (reason, kind), n in value.items():
                        m.add_sample(f"derp_{field}_total", {"reason": reason, "kind": kind}, n)
                    yield m
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            known = _KNOWN.get(field)
            if known is not None:
                name, kind, doc = known
            else:
                name = field.removesuffix("_total")
                kind = "gauge" if field.startswith(("current_", "gauge_")) else "counter"
                doc = "DERP server counter " + field.replace("_", " ")
            m = _metric(f"derp_{name}", kind, doc)
            m.add_sample(_sample(kind, f"derp_{name}"), {}, value)
            yield m
        stun = self._stun
        m = _metric("derp_stun_requests", "counter", "STUN datagrams, by disposition")
        for d, n in stun.requests.items():
            m.add_sample("derp_stun_requests_total", {"disposition": d}, n)
        yield m
        m = _metric("derp_stun_addrfamily", "counter", "STUN requests answered, by family")
        for f, n in stun.addr_family.items():
            m.add_sample("derp_stun_addrfamily_total", {"family": f}, n)
        yield m
        for name, fn in sorted(self._gauges.items()):
            try:
                v = float(fn())
            except Exception:  # a broken gauge callback must not break the scrape
                continue
            m = _metric(f"derp_{name}", "gauge", _GAUGE_HELP.get(name, "DERP gauge " + name.replace("_", " ")))
            m.add_sample(f"derp_{name}", {}, v)
            yield m


class DerpMetrics:
    """One server's Prometheus registry: :class:`ServerStats` + STUN + extra gauges,
    plus the process collectors unless ``process=False`` (an embedding process
    that exports its own, e.g. :mod:`tailnet.metrics`, registers :attr:`collector`)."""

    def __init__(self, stats: ServerStats, *, process: bool = True) -> None:
        self.stats = stats
        self.stun = StunStats()
        #: extra gauges: ``derp_<name>`` → callable returning the current value
        self.gauges: dict[str, Callable[[], float]] = {}
        self.registry = CollectorRegistry(auto_describe=False)
        self.collector = ServerStatsCollector(stats, self.stun, self.gauges)
        self.registry.register(self.collector)
        if process:
            ProcessCollector(registry=self.registry)
            PlatformCollector(registry=self.registry)
            GCCollector(registry=self.registry)

    def render(self) -> bytes:
        """The Prometheus text exposition (content type :data:`CONTENT_TYPE`)."""
        return generate_latest(self.registry)

    #: the classic text format every Prometheus version scrapes
    CONTENT_TYPE: Final = CONTENT_TYPE_PLAIN_0_0_4

    def snapshot(self) -> dict[str, object]:
        """JSON-friendly dict for ``/debug/vars``."""
        out = self.stats.snapshot()
        out["stun_requests"] = dict(self.stun.requests)
        for name, fn in self.gauges.items():
            try:
                out[name] = float(fn())
            except Exception:
                continue
        return out


class DebugAccess:
    """Who may see ``/debug/*`` and ``/metrics`` (see module docstring)."""

    __slots__ = ("networks",)

    def __init__(self, networks: Sequence[str] | None = None) -> None:
        nets = DEFAULT_DEBUG_NETWORKS if networks is None else tuple(networks)
        self.networks: tuple[IPNetwork, ...] = tuple(
            ipaddress.ip_network(n.strip(), strict=False) for n in nets if n.strip()
        )

    def allows(self, remote_addr: object) -> bool:
        """True if the peer address (a socket address tuple) is in an allowed network."""
        if not isinstance(remote_addr, tuple) or not remote_addr:
            return False
        try:
            ip = ipaddress.ip_address(str(remote_addr[0]).split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in n for n in self.networks)

    def respond(
        self, metrics: DerpMetrics, path: str, remote_addr: object
    ) -> tuple[int, bytes, str]:
        """``(status, body, content type)`` for a debug request."""
        if not self.allows(remote_addr):
            return 403, b"debug access denied\n", "text/plain; charset=utf-8"
        if path in ("/metrics", "/debug/varz"):
            return 200, metrics.render(), DerpMetrics.CONTENT_TYPE
        if path == "/debug/vars":
            body = json.dumps(metrics.snapshot(), indent=1, sort_keys=True).encode()
            return 200, body + b"\n", "application/json"
        if path in ("/debug", "/debug/"):
            return 200, _index(("/debug/varz", "/debug/vars", "/metrics")), "text/html; charset=utf-8"
        return 404, b"404 page not found\n", "text/plain; charset=utf-8"


def _index(links: Iterable[str]) -> bytes:
    items = "".join(f'<li><a href="{html.escape(p)}">{html.escape(p)}</a></li>' for p in links)
    return f"<!DOCTYPE html><html><body><h1>DERP debug</h1><ul>{items}</ul></body></html>\n".encode()
