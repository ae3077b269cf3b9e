"""Event-loop stall monitor: how long callbacks waited because the loop was busy.

A timer is scheduled every ``interval`` seconds; the lateness of each firing is
the time the loop spent running something else (a long callback, a GC pass, a
big request being parsed). Everything the loop serves waits that long, so the
largest lateness is the figure an operator (and the soak benchmark) wants.

Cost: one loop callback per ``interval`` (100 ms by default), no task, no thread.
A stall of at least ``warn_after`` seconds is logged once at WARNING.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

__all__ = ["LoopStats", "LoopMonitor"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class LoopStats:
    """Stalls observed since ``since`` (monotonic seconds)."""

    since: float
    samples: int
    max_stall: float
    over_50ms: int
    over_250ms: int


class LoopMonitor:
    """Measures event-loop stalls (see the module docstring); start on the loop to watch."""

    def __init__(self, interval: float = 0.1, warn_after: float = 0.5) -> None:
        if interval <= 0:
            raise ValueError("interval must be positive")
        self.interval = interval
        self.warn_after = warn_after
        self._handle: asyncio.TimerHandle | None = None
        self._due = 0.0
        self._reset_stats(time.monotonic())

    def _reset_stats(self, now: float) -> None:
        self._since = now
        self._samples = 0
        self._max = 0.0
        self._over_50 = 0
        self._over_250 = 0

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        if self._handle is None:
            self._due = loop.time() + self.interval
            self._handle = loop.call_at(self._due, self._tick)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        late = max(0.0, now - self._due)
        self._samples += 1
        if late > self._max:
            self._max = late
        if late >= 0.05:
            self._over_50 += 1
            if late >= 0.25:
                self._over_250 += 1
            if late >= self.warn_after:
                log.warning("event loop blocked for %.0f ms", late * 1000)
        self._due = now + self.interval
        self._handle = loop.call_at(self._due, self._tick)

    def stats(self, *, reset: bool = False) -> LoopStats:
        """The stalls seen so far; ``reset`` starts a new window."""
        out = LoopStats(self._since, self._samples, self._max, self._over_50, self._over_250)
        if reset:
            self._reset_stats(time.monotonic())
        return out
