"""Prometheus metrics of the stack: coordinator, relay, process.

Like :mod:`derp.metrics`, nothing is a ``prometheus_client`` metric object on
the hot path: the service and the coordinators bump plain ints (and
:class:`Histogram` buckets), and :class:`CoordinatorCollector` turns them into
metric families at scrape time.

=====================================================  =========  ============================
metric                                                 type       source
=====================================================  =========  ============================
``tailnet_coordinator_peers{kind}``                    gauge      open Coordinate streams by
                                                                  principal kind (agent, user,
                                                                  control_plane)
``tailnet_coordinator_tunnels``                        gauge      tunnels of local peers
``tailnet_coordinator_requests_received_total``        counter    CoordinateRequests handled
``tailnet_coordinator_node_updates_received_total``    counter    ... of them with UpdateSelf
``tailnet_coordinator_peer_updates_sent_total``        counter    PeerUpdates queued to peers
``tailnet_coordinator_peer_updates_suppressed_total``  counter    identical NODEs not re-sent
``tailnet_coordinator_fanout_seconds``                 histogram  one request's handling incl.
                                                                  fan-out to every recipient
``tailnet_coordinator_slow_consumer_evictions_total``  counter    peers evicted (buffer full)
``tailnet_coordinator_overwrites_total``               counter    connections replaced by a
                                                                  newer one of the same peer
``tailnet_coordinator_streams_refused_total{reason}``  counter    Coordinate streams refused
``tailnet_coordinator_healthy``                        gauge      1 = accepting peers
``tailnet_resume_tokens_issued_total``                 counter
``tailnet_resume_tokens_refused_total``                counter    invalid resume tokens
``tailnet_authentication_failures_total``              counter    unknown/missing tokens
``tailnet_authorization_denials_total{stage}``         counter    ``connect`` (agent not
                                                                  reachable) or ``request``
``tailnet_pg_heartbeats_total{result}``                counter    HA: heartbeat writes
``tailnet_pg_notification_lag_seconds``                histogram  HA: own heartbeat NOTIFY
                                                                  statement → LISTEN arrival
``tailnet_pg_live_replicas``                           gauge      HA: replicas alive
``tailnet_pg_write_failures_total``,                   counter    HA: failed batch writes,
``tailnet_pg_resyncs_total``                                      full resynchronisations
=====================================================  =========  ============================

:func:`stack_registry` adds the relay's families (:class:`derp.metrics.ServerStatsCollector`)
and the process collectors of ``prometheus_client`` (``process_*``, ``python_*``).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence
from typing import Any, Final

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

__all__ = [
    "LATENCY_BUCKETS",
    "Histogram",
    "ServiceStats",
    "CoordinatorCollector",
    "stack_registry",
]

#: seconds; fine at the low end (fan-out is usually well under a millisecond)
LATENCY_BUCKETS: Final[tuple[float, ...]] = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
)


class Histogram:
    """Cumulative-on-export histogram: ``observe`` is one bisect and two adds."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float] = LATENCY_BUCKETS) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # last: +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def family(self, name: str, doc: str) -> HistogramMetricFamily:
        buckets: list[tuple[str, float]] = []
        acc = 0
        for bound, n in zip(self.bounds, self.counts):
            acc += n
            buckets.append((repr(bound), acc))
        acc += self.counts[-1]
        buckets.append(("+Inf", acc))
        return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=self.sum)


class ServiceStats:
    """Counters :class:`tailnet.service.TailnetService` keeps (event loop thread only)."""

    __slots__ = (
        "requests_received",
        "node_updates_received",
        "fanout",
        "resume_issued",
        "resume_refused",
        "auth_failures",
        "denied_connect",
        "denied_request",
        "streams_refused",
    )

    def __init__(self) -> None:
        self.requests_received = 0
        self.node_updates_received = 0
        self.fanout = Histogram()
        self.resume_issued = 0
        self.resume_refused = 0
        self.auth_failures = 0
        self.denied_connect = 0
        self.denied_request = 0
        #: refused Coordinate streams by reason (limit, closed, unhealthy)
        self.streams_refused: dict[str, int] = {"limit": 0, "closed": 0}


def _counter(name: str, doc: str, value: float) -> Metric:
    m = CounterMetricFamily(name, doc)
    m.add_metric([], value)
    return m


def _gauge(name: str, doc: str, value: float) -> Metric:
    m = GaugeMetricFamily(name, doc)
    m.add_metric([], value)
    return m


class CoordinatorCollector(Collector):
    """Coordinator families from a :class:`~tailnet.service.TailnetService` (see module doc)."""

    def __init__(self, service: Any) -> None:
        self._service = service

    def collect(self) -> Iterator[Metric]:
        svc = self._service
        st: ServiceStats = svc.stats
        coord = svc.coordinator
        kinds = svc.peers_by_kind()
        g = GaugeMetricFamily(
            "tailnet_coordinator_peers",
            "Open Coordinate streams on this process, by principal kind",
            labels=["kind"],
        )
        for kind in ("agent", "user", "control_plane"):
            g.add_metric([kind], kinds.get(kind, 0))
        yield g
        cs = coord.stats() if hasattr(coord, "stats") else None
        if cs is not None:
            yield _gauge("tailnet_coordinator_tunnels", "Tunnels whose source is a peer of this process", cs.tunnels)
            yield _counter(
                "tailnet_coordinator_peer_updates",
                "Peer updates (NODE, DISCONNECTED, LOST, READY_FOR_HANDSHAKE) queued to peers",
                cs.updates_sent,
            )
            yield _counter(
                "tailnet_coordinator_peer_updates_suppressed",
                "NODE updates not sent because the recipient already had that node",
                cs.updates_suppressed,
            )
            yield _counter(
                "tailnet_coordinator_slow_consumer_evictions",
                "Peers disconnected because their response buffer was full (slow consumers)",
                cs.evictions,
            )
            yield _counter(
                "tailnet_coordinator_overwrites",
                "Connections replaced by a newer connection with the same peer ID",
                cs.overwrites,
            )
        yield _counter(
            "tailnet_coordinator_requests_received",
            "CoordinateRequests received from peers and handled",
            st.requests_received,
        )
        yield _counter(
            "tailnet_coordinator_node_updates_received",
            "CoordinateRequests carrying UpdateSelf (a peer's new node)",
            st.node_updates_received,
        )
        yield st.fanout.family(
            "tailnet_coordinator_fanout_seconds",
            "Time to handle one CoordinateRequest, including queueing its updates to every recipient",
        )
        c = CounterMetricFamily(
            "tailnet_coordinator_streams_refused",
            "Coordinate streams refused: limit = max_peers_per_principal, "
            "closed = coordinator closed or unhealthy",
            labels=["reason"],
        )
        for reason, n in st.streams_refused.items():
            c.add_metric([reason], n)
        yield c
        healthy = getattr(coord, "healthy", True) and not coord.closed
        yield _gauge(
            "tailnet_coordinator_healthy",
            "1 while the coordinator accepts peers, 0 while it refuses them",
            1.0 if healthy else 0.0,
        )
        yield _counter("tailnet_resume_tokens_issued", "Resume tokens issued", st.resume_issued)
        yield _counter(
            "tailnet_resume_tokens_refused",
            "Resume tokens presented that were invalid, expired or another principal's",
            st.resume_refused,
        )
        yield _counter(
            "tailnet_authentication_failures",
            "Calls refused for a missing or unknown session token",
            st.auth_failures,
        )
        c = CounterMetricFamily(
            "tailnet_authorization_denials",
            "Authorization denials: connect = a client may not reach the agent it named, "
            "request = a CoordinateRequest its policy does not allow",
            labels=["stage"],
        )
        c.add_metric(["connect"], st.denied_connect)
        c.add_metric(["request"], st.denied_request)
        yield c
        yield from _pg_families(coord)


def _pg_families(coord: Any) -> Iterator[Metric]:
    hb = getattr(coord, "heartbeats", None)
    if hb is None:
        return
    m = CounterMetricFamily(
        "tailnet_pg_heartbeats",
        "HA heartbeat writes of this replica to PostgreSQL, by result",
        labels=["result"],
    )
    m.add_metric(["ok"], hb[0])
    m.add_metric(["failed"], hb[1])
    yield m
    lag = getattr(coord, "notification_lag", None)
    if isinstance(lag, Histogram):
        yield lag.family(
            "tailnet_pg_notification_lag_seconds",
            "Time from this replica's heartbeat statement to its own NOTIFY arriving on "
            "its LISTEN connection",
        )
    yield _gauge(
        "tailnet_pg_live_replicas",
        "Coordinator replicas with a recent heartbeat, as last seen by this replica",
        float(coord.live_replicas()),
    )
    yield _counter(
        "tailnet_pg_write_failures", "Failed batch writes (retried)", float(coord.write_failures)
    )
    yield _counter(
        "tailnet_pg_resyncs",
        "Full resynchronisations of every local connection from the tables",
        float(coord.resyncs),
    )


def stack_registry(service: Any, relay_collector: Collector | None) -> CollectorRegistry:
    """One registry: coordinator, relay (if given) and process metrics."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(CoordinatorCollector(service))
    if relay_collector is not None:
        reg.register(relay_collector)
    ProcessCollector(registry=reg)
    PlatformCollector(registry=reg)
    GCCollector(registry=reg)
    return reg


def render(registry: CollectorRegistry) -> bytes:
    """The text exposition of ``registry``."""
    from prometheus_client import generate_latest

    return generate_latest(registry)

