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

Pure: no sockets, no clock.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any, Final

from ..stats import ServerStats
from ..stunserver import StunStats

__all__ = ["STATS_INTERVAL", "decode_stats", "encode_stats", "merge_stats"]

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
