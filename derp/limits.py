"""Pure rate-limiting primitives for the DERP server (spec §3.9, §3.11). No I/O.

Time is always injected (``now`` in seconds from any monotonic clock, e.g.
``loop.time()``), so every rule here is tested without sleeping.

* :class:`TokenBucket` — classic bucket of ``burst`` tokens refilled at
  ``rate`` tokens/s. :meth:`TokenBucket.take` *always* consumes and may leave
  the bucket in debt; it returns how long the caller must wait until the debt
  is paid. That is the per-client receive limiter: the server charges each
  chunk it read and pauses reading for the returned time (derper's reader
  waits, it never drops; the paused socket fills the TCP window and slows the
  sender down). :meth:`TokenBucket.allow` consumes only if enough tokens are
  there (all-or-nothing), which is what the accept limiter needs.
* :class:`AcceptLimiter` — derper's ``-accept-connection-limit`` /
  ``-accept-connection-burst``: connections over the limit are accepted and
  closed at once (a cheap signal, no kernel backlog build-up).
* :class:`HostLimits` — what the listener needs of limits shared with other
  processes (``derper --workers N``: :class:`derp.workers.shared.SharedLimits`,
  the connection cap and the accept bucket as host totals).
* :class:`RateConfig` — derper's ``-rate-config`` JSON
  ``{"PerClientRateLimitBytesPerSec": N, "PerClientRateBurstBytes": M}``. A
  zero rate disables the limit; the burst is raised to at least one maximal
  frame (``64 KiB + 32``), else a maximal packet could never be read. Mesh
  peers are exempt (the server decides that, not this module).

Invariants: ``tokens <= burst`` at all times; tokens never grow while time
stands still; a bucket with ``rate == inf`` never limits.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Final, Protocol

from .frames import KEY_LEN, MAX_PACKET_SIZE

__all__ = [
    "AcceptLimiter",
    "HostLimits",
    "MIN_CLIENT_BURST",
    "RateConfig",
    "TokenBucket",
]

#: Smallest useful per-client burst: one maximal SendPacket payload.
MIN_CLIENT_BURST: Final = MAX_PACKET_SIZE + KEY_LEN


class TokenBucket:
    """A token bucket with injected time; see the module docstring."""

    __slots__ = ("rate", "burst", "tokens", "last")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        if rate <= 0 or burst <= 0 or math.isnan(rate) or math.isnan(burst):
            raise ValueError("token bucket rate and burst must be positive")
        self.rate = float(rate)
        self.burst = float(burst)
        self.tokens = float(burst)
        self.last = now

    def _refill(self, now: float) -> None:
        if now > self.last:
            if math.isinf(self.rate):
                self.tokens = self.burst
            else:
                self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
            self.last = now

    def take(self, n: float, now: float) -> float:
        """Consume ``n`` tokens (possibly into debt); return seconds to wait (0.0 if none)."""
        self._refill(now)
        self.tokens -= n
        if self.tokens >= 0 or math.isinf(self.rate):
            if self.tokens < 0:
                self.tokens = 0.0
            return 0.0
        return -self.tokens / self.rate

    def allow(self, now: float, n: float = 1.0) -> bool:
        """Consume ``n`` tokens if available; otherwise consume nothing and return False."""
        self._refill(now)
        if self.tokens >= n:
            self.tokens -= n
            return True
        return False


class AcceptLimiter:
    """Accept-rate limit with burst (``limit`` connections/s; ``inf`` = unlimited).

    ``accepted``/``rejected`` count decisions (exported as derper's
    ``tls_listener`` counters).
    """

    __slots__ = ("_bucket", "accepted", "rejected")

    def __init__(self, limit: float = math.inf, burst: int = 2**31 - 1, now: float = 0.0) -> None:
        if burst < 1:
            raise ValueError("accept burst must be >= 1")
        self._bucket = None if math.isinf(limit) else TokenBucket(limit, burst, now)
        self.accepted = 0
        self.rejected = 0

    @property
    def enabled(self) -> bool:
        return self._bucket is not None

    def allow(self, now: float) -> bool:
        """Decide one incoming connection."""
        if self._bucket is None or self._bucket.allow(now):
            self.accepted += 1
            return True
        self.rejected += 1
        return False


class HostLimits(Protocol):
    """``max_connections`` and the accept limit kept for several processes at once.

    The listener calls :meth:`admit` for every accepted socket instead of its
    own cap and :class:`AcceptLimiter`, and :meth:`publish` when its count of
    open sockets went down (sockets it admitted are counted by :meth:`admit`).
    """

    def admit(self, open_here: int) -> bool:
        """Decide one socket, given this process's ``open_here`` other open sockets;
        True also counts it (this process then has ``open_here + 1``)."""
        ...

    def publish(self, open_here: int) -> None:
        """This process now has ``open_here`` open sockets."""
        ...


@dataclass(frozen=True, slots=True)
class RateConfig:
    """Per-client receive limit; ``bytes_per_sec == 0`` disables it."""

    bytes_per_sec: int = 0
    burst_bytes: int = 0

    def __post_init__(self) -> None:
        if self.bytes_per_sec < 0 or self.burst_bytes < 0:
            raise ValueError("rate limit and burst must be >= 0")

    @property
    def enabled(self) -> bool:
        return self.bytes_per_sec > 0

    @property
    def effective_burst(self) -> int:
        """The burst actually used: at least :data:`MIN_CLIENT_BURST`."""
        return max(self.burst_bytes, MIN_CLIENT_BURST)

    def bucket(self, now: float) -> TokenBucket | None:
        """A fresh bucket for one connection, or ``None`` when disabled."""
        if not self.enabled:
            return None
        return TokenBucket(self.bytes_per_sec, self.effective_burst, now)

    def server_info_fields(self) -> dict[str, int]:
        """ServerInfo JSON fields advertising the limit (empty when disabled)."""
        if not self.enabled:
            return {}
        return {
            "TokenBucketBytesPerSecond": self.bytes_per_sec,
            "TokenBucketBytesBurst": self.effective_burst,
        }

    @classmethod
    def from_json(cls, text: str | bytes) -> RateConfig:
        """Parse derper's ``-rate-config`` JSON (keys case-insensitive, like Go)."""
        try:
            doc: Any = json.loads(text)
        except ValueError as exc:
            raise ValueError(f"rate config is not JSON: {exc}") from None
        if not isinstance(doc, dict):
            raise ValueError("rate config must be a JSON object")
        fields = {str(k).lower(): v for k, v in doc.items()}
        rate = fields.get("perclientratelimitbytespersec", 0)
        burst = fields.get("perclientrateburstbytes", 0)
        for name, v in (("PerClientRateLimitBytesPerSec", rate), ("PerClientRateBurstBytes", burst)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"rate config {name} must be a non-negative integer")
        return cls(int(rate), int(burst))
