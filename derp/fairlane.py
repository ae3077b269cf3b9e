"""One shared lane per event loop for the leftover work of connections that flood it.

Why: every connection that reads more than it may handle in one callback (a
read full of 6-byte DERP frames, of one-byte WebSocket messages, of pipelined
HTTP requests) handles a budget's worth, pauses reading and continues in a
later loop iteration. If each such connection schedules its own continuation
(``loop.call_soon``), every iteration runs one budget *per flooding
connection*: with four floods of ~2 ms each, every iteration is ≥ 8 ms, and
everything else the loop serves (a node update crossing three or four
iterations between its WebSocket, the RPC handler, the coordinator and the
receiver's writer) waits that long at every hop. The soak benchmark
(``bench/soak.py``) measured exactly that: the healthy pair's fan-out p99 at
61 ms with no single callback above 28 ms.

What: connections hand their continuation to :func:`lane_for(loop).defer
<FairLane.defer>` instead. The lane runs the deferred callbacks in arrival order
(round-robin: a connection that defers again goes to the back), starting at
least one per loop iteration and no further one once :attr:`FairLane.budget`
seconds were spent in this iteration. So however many connections flood, an
iteration holds about one budget of their work (plus the callback that
crossed the line), and each of them still progresses; a well-behaved
connection, whose reads fit its per-callback budget, never enters the lane
and is served every iteration as before.

Invariants:

* a deferred callback runs exactly once, in a later loop iteration than the
  one that deferred it, in FIFO order with the others; the lane never drops
  one (a closed connection's callback must check its own state);
* at most one lane callback (``call_soon``) is pending per loop;
* an exception in a callback is logged and does not stop the lane.

No task and no thread: one ``call_soon`` per iteration while anything waits.

Users: the DERP relay's connections (:mod:`derp.server.conn`, the
control-frame budget and the yield after a read of many frames). The API
WebSocket's parse budget and the HTTP pipelining budget (``tailnet.http``)
still continue with their own ``call_soon``.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
import weakref
from collections.abc import Callable
from typing import Final

__all__ = ["DEFAULT_BUDGET", "FairLane", "feed_slices", "lane_for"]

log = logging.getLogger(__name__)

#: Seconds of deferred work the lane starts per loop iteration (see module docstring).
DEFAULT_BUDGET: Final = 0.002


class FairLane:
    """Deferred continuations of flooding connections, a budget per iteration.

    ``loop``: the event loop whose iterations are shared. ``budget``: seconds
    after which no further callback is started in this iteration. ``clock``:
    a monotonic clock in seconds (tests pass a fake one).
    """

    __slots__ = ("loop", "budget", "clock", "_queue", "_scheduled", "runs", "deferred")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        budget: float = DEFAULT_BUDGET,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.loop = loop
        self.budget = budget
        self.clock = clock
        self._queue: collections.deque[Callable[[], object]] = collections.deque()
        self._scheduled = False
        #: loop iterations in which the lane ran, callbacks ever deferred (for tests/metrics)
        self.runs = 0
        self.deferred = 0

    def __len__(self) -> int:
        """Callbacks waiting for their turn."""
        return len(self._queue)

    def defer(self, fn: Callable[[], object]) -> None:
        """Run ``fn()`` in a later loop iteration, after those already waiting."""
        self._queue.append(fn)
        self.deferred += 1
        if not self._scheduled:
            self._scheduled = True
            self.loop.call_soon(self._run)

    def _run(self) -> None:
        self._scheduled = False
        self.runs += 1
        queue = self._queue
        # Only what waited before this iteration: a callback deferring again
        # (its read still holds more than a budget) waits for the next one.
        n = len(queue)
        clock = self.clock
        deadline = clock() + self.budget
        while n > 0:
            n -= 1
            fn = queue.popleft()
            try:
                fn()
            except Exception:  # a bug in one connection must not stall the others
                log.exception("fair lane: deferred callback %r failed", fn)
            if clock() >= deadline:
                break
        if queue and not self._scheduled:
            self._scheduled = True
            self.loop.call_soon(self._run)


_LANES: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, FairLane] = (
    weakref.WeakKeyDictionary()
)


def lane_for(loop: asyncio.AbstractEventLoop) -> FairLane:
    """The loop's shared lane (created on first use): every server in the
    process (the DERP relay, the coordinator's HTTP API) floods into the same one."""
    lane = _LANES.get(loop)
    if lane is None:
        lane = _LANES[loop] = FairLane(loop)
    return lane


def feed_slices(
    feed: Callable[[bytes], object], data: bytes, off: int, size: int, budget: float
) -> int:
    """Feed ``data[off:]`` to a parser ``size`` bytes at a time until it is all
    fed or ``budget`` seconds went by; the offset reached (``len(data)`` when
    done). A rest of at most ``size`` bytes is fed in one call, whatever the
    budget: the common small read costs one call and no clock reads. The
    caller keeps the rest (reading paused) and continues through the lane."""
    n = len(data)
    if n - off <= size:
        feed(data[off:] if off else data)
        return n
    deadline = time.perf_counter() + budget
    while off < n:
        end = off + size
        feed(data[off:end])
        off = end
        if time.perf_counter() >= deadline:
            break
    return min(off, n)
