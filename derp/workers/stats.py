"""Counters across worker processes: one worker's snapshot, and totals over all.

Each worker sends :func:`encode_stats` of its own :class:`~derp.stats.ServerStats`
and STUN counters to its siblings (STATS link frames, every
:data:`STATS_INTERVAL` seconds); whichever worker answers ``/metrics`` or
``/debug/`` sums its live counters and its siblings' last snapshots with
:func:`merge_stats` into one :class:`ServerStats` (so every family keeps its
name, and numbers are totals over the host). Gauges sum too (current
connections); ``average_queue_duration_ms`` is the maximum over workers.
A worker that died drops out of the totals until its replacement reports
(counters then restart from that worker's new values, as after any restart).

Next to the totals, :class:`WorkerCollector` adds a few families with a
``worker`` label (``derp_worker_current_connections``,
``derp_worker_packets_received``/``_sent``, ``derp_worker_link_batches_out``),
so an uneven SO_REUSEPORT spread or a restarted worker shows.

Pure: no sockets, no clock.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Final

from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from ..stats import ServerStats
from ..stunserver import StunStats

__all__ = ["STATS_INTERVAL", "WorkerCollector", "decode_stats", "encode_stats", "merge_stats"]

#: Seconds between STATS frames a worker sends to each sibling.
STATS_INTERVAL: Final = 0.5

_MAX_FIELDS: Final = 512


def encode_stats(index: int, stats: ServerStats, stun: StunStats, extra: dict[str, float]) -> bytes:
    """One worker's counters as compact JSON (drop keys as ``"reason/kind"``)."""
    doc: dict[str, Any] = {
        "worker": index,
        "stats": stats.snapshot(),
        "stun": stun.snapshot(),
        "extra": extra,
    }
    return json.dumps(doc, separators=(",", ":")).encode()


def decode_stats(data: bytes) -> dict[str, Any]:
    """Parse a STATS payload; ``ValueError`` if it is not the expected shape."""
    doc = json.loads(data)
    if not isinstance(doc, dict) or not isinstance(doc.get("stats"), dict):
        raise ValueError("STATS payload is not a stats object")
    if len(doc["stats"]) > _MAX_FIELDS:
        raise ValueError("STATS payload has too many fields")
    return doc


def merge_stats(
    total: ServerStats,
    total_stun: StunStats,
    local: ServerStats,
    local_stun: StunStats,
    others: Iterable[dict[str, Any]],
) -> None:
    """Overwrite ``total``/``total_stun`` with ``local`` plus every sibling snapshot."""
    docs = [{"stats": local.snapshot(), "stun": local_stun.snapshot()}, *others]
    for name in ServerStats.__slots__:
        cur = getattr(total, name)
        if isinstance(cur, dict):
            acc: dict[Any, int] = dict.fromkeys(cur, 0)
            for doc in docs:
                part = doc["stats"].get(name)
                if not isinstance(part, dict):
                    continue
                for k, v in part.items():
                    r, _, kind = str(k).partition("/")
                    if (r, kind) in acc and isinstance(v, int):
                        acc[(r, kind)] += v
            cur.update(acc)
        elif name == "average_queue_duration_ms":
            setattr(total, name, max(_num(d["stats"].get(name)) for d in docs))
        else:
            s = sum(_num(d["stats"].get(name)) for d in docs)
            setattr(total, name, type(cur)(s))
    for field in ("requests", "addr_family"):
        out: dict[str, int] = getattr(total_stun, field)
        for k in out:
            out[k] = 0
        for doc in docs:
            part = doc.get("stun", {}).get(field, {})
            if isinstance(part, dict):
                for k, v in part.items():
                    if k in out and isinstance(v, int):
                        out[k] += v


def _num(v: object) -> float:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else 0.0


_PER_WORKER: Final = (
    ("current_connections", "gauge", "Admitted DERP connections, by worker process"),
    ("packets_received", "counter", "Packets received from clients, by worker process"),
    ("packets_sent", "counter", "Packets delivered to clients, by worker process"),
)


class WorkerCollector(Collector):
    """Per-worker families (``worker`` label) from the snapshots ``docs()`` returns
    (each as :func:`encode_stats` builds them, the local worker's included)."""

    def __init__(self, docs: Callable[[], list[dict[str, Any]]]) -> None:
        self._docs = docs

    def collect(self) -> Iterator[Metric]:
        docs = self._docs()
        for field, kind, doc in _PER_WORKER:
            m = Metric(f"derp_worker_{field}", doc, kind)
            sample = f"derp_worker_{field}" + ("_total" if kind == "counter" else "")
            for d in docs:
                m.add_sample(sample, {"worker": str(d.get("worker"))}, _num(d["stats"].get(field)))
            yield m
        m = Metric(
            "derp_worker_link_batches_out",
            "Packet batches (FRAMES/PACKET link frames) sent to sibling workers, by worker",
            "counter",
        )
        for d in docs:
            extra = d.get("extra")
            n = _num(extra.get("link_batches_out")) if isinstance(extra, dict) else 0.0
            m.add_sample("derp_worker_link_batches_out_total", {"worker": str(d.get("worker"))}, n)
        yield m
