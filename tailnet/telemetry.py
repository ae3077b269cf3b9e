"""Client network telemetry (``PostTelemetry``): validation, counting, recent events.

Telemetry is best effort: a ``TelemetryRequest`` is validated as a whole (so a
malformed request is refused with a clear message and nothing is recorded),
then every event is counted and appended to a bounded ring buffer of recent
events (oldest dropped first). Counters are also exported to Prometheus when a
registry is given.

Validation rules (per event): ``id`` is empty or a 16-byte UUID; ``status``,
``client_type`` are known enum values; ``home_derp`` is not negative. The
number of events per request is capped (:data:`MAX_EVENTS_PER_REQUEST`).
"""

from __future__ import annotations

import collections
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter

from tailnet.v2 import tailnet_pb2 as pb

__all__ = ["MAX_EVENTS_PER_REQUEST", "InvalidTelemetry", "TelemetryBuffer", "validate_telemetry"]

MAX_EVENTS_PER_REQUEST = 1024


class InvalidTelemetry(ValueError):
    """A telemetry request was refused; ``str()`` is the client-facing text."""


_STATUSES = frozenset(pb.TelemetryEvent.Status.values())
_CLIENT_TYPES = frozenset(pb.TelemetryEvent.ClientType.values())


def validate_telemetry(req: pb.TelemetryRequest) -> None:
    """Raise :class:`InvalidTelemetry` if any event in ``req`` is malformed."""
    if len(req.events) > MAX_EVENTS_PER_REQUEST:
        raise InvalidTelemetry(
            f"too many telemetry events: {len(req.events)} > {MAX_EVENTS_PER_REQUEST}"
        )
    for i, ev in enumerate(req.events):
        if ev.id and len(ev.id) != 16:
            raise InvalidTelemetry(f"events[{i}].id: expected 16 bytes, got {len(ev.id)}")
        if ev.status not in _STATUSES:
            raise InvalidTelemetry(f"events[{i}].status: unknown value {ev.status}")
        if ev.client_type not in _CLIENT_TYPES:
            raise InvalidTelemetry(f"events[{i}].client_type: unknown value {ev.client_type}")
        if ev.home_derp < 0:
            raise InvalidTelemetry(f"events[{i}].home_derp: negative region id {ev.home_derp}")


class TelemetryBuffer:
    """Bounded buffer of recent telemetry events plus counters.

    ``requests``/``events``/``rejected`` count accepted requests, accepted
    events and refused requests.
    """

    def __init__(self, maxlen: int = 1000, *, registry: CollectorRegistry | None = None) -> None:
        if maxlen <= 0:
            raise ValueError("maxlen must be positive")
        self._recent: collections.deque[pb.TelemetryEvent] = collections.deque(maxlen=maxlen)
        self.requests = 0
        self.events = 0
        self.rejected = 0
        self._prom_events: Counter | None = None
        self._prom_rejected: Counter | None = None
        if registry is not None:
            self._prom_events = Counter(
                "tailnet_telemetry_events", "Telemetry events accepted", registry=registry
            )
            self._prom_rejected = Counter(
                "tailnet_telemetry_rejected_requests",
                "Telemetry requests refused as malformed",
                registry=registry,
            )

    def record(self, req: pb.TelemetryRequest) -> int:
        """Validate and store ``req``; return the number of events accepted.

        Raises :class:`InvalidTelemetry` (nothing recorded) on malformed input.
        """
        try:
            validate_telemetry(req)
        except InvalidTelemetry:
            self.rejected += 1
            if self._prom_rejected is not None:
                self._prom_rejected.inc()
            raise
        self._extend(req.events)
        self.requests += 1
        return len(req.events)

    def _extend(self, events: Iterable[pb.TelemetryEvent]) -> None:
        n = 0
        for ev in events:
            copy = pb.TelemetryEvent()
            copy.CopyFrom(ev)
            self._recent.append(copy)
            n += 1
        self.events += n
        if self._prom_events is not None and n:
            self._prom_events.inc(n)

    def recent(self) -> list[pb.TelemetryEvent]:
        """The retained events, oldest first."""
        return list(self._recent)
