"""A pure timer wheel: many cheap deadlines driven by one periodic sweep.

The DERP server keeps one KeepAlive deadline per connection. Instead of one
task or timer handle per connection, deadlines go into integer slots of width
``resolution`` seconds; a single loop timer calls :meth:`TimerWheel.pop_due`
every ``resolution`` seconds. No clock is read here: callers pass ``now``.

Invariants: an item scheduled for ``when`` is returned by the first
``pop_due(now)`` call with ``now >= when`` rounded *up* to the slot boundary,
so items never fire early by more than zero and late by at most one slot
(plus the caller's timer lag). Items are returned once per schedule call;
cancelling is the caller's business (skip stale items when popped).
"""

from __future__ import annotations

import math
from typing import Generic, TypeVar

__all__ = ["TimerWheel"]

T = TypeVar("T")


class TimerWheel(Generic[T]):
    """Slots of ``resolution`` seconds holding items due in that slot."""

    __slots__ = ("resolution", "_slots", "_cursor")

    def __init__(self, resolution: float, now: float) -> None:
        if resolution <= 0:
            raise ValueError("resolution must be positive")
        self.resolution = resolution
        self._slots: dict[int, list[T]] = {}
        self._cursor = math.floor(now / resolution)  # next slot not yet popped

    def __len__(self) -> int:
        return sum(len(v) for v in self._slots.values())

    def schedule(self, item: T, when: float) -> None:
        """Return ``item`` from the first :meth:`pop_due` at or after ``when``."""
        slot = max(math.ceil(when / self.resolution), self._cursor)
        bucket = self._slots.get(slot)
        if bucket is None:
            self._slots[slot] = [item]
        else:
            bucket.append(item)

    def pop_due(self, now: float) -> list[T]:
        """Remove and return every item whose slot ends at or before ``now``."""
        current = math.floor(now / self.resolution)
        out: list[T] = []
        if current < self._cursor:
            return out
        slots = self._slots
        if current - self._cursor > len(slots):
            # Long stall: walk the (few) occupied slots instead of the range.
            for s in sorted(k for k in slots if k <= current):
                out.extend(slots.pop(s))
        else:
            for s in range(self._cursor, current + 1):
                bucket = slots.pop(s, None)
                if bucket:
                    out.extend(bucket)
        self._cursor = current + 1
        return out
