"""Host-wide accept limits for ``derper --workers N``: one small file shared by every worker.

``--max-connections`` and ``--accept-connection-limit``/``-burst`` are totals for
the host, whichever worker the kernel (SO_REUSEPORT) hands a new socket to. The
supervisor creates the file ``<sock_dir>/limits`` before it starts the workers
(:meth:`SharedLimits.create`); every worker maps it (:meth:`SharedLimits.open`)
and its listener (:class:`derp.server.listener.AcceptGate`) asks
:meth:`SharedLimits.admit` about every accepted socket.

Layout (little-endian, every field 8-byte aligned, :class:`LimitsTable`)::

    offset  size  field
         0     8  magic  b"DERPLIM1"
         8     4  u32    slots (the number of workers, N)
        12     4  u32    reserved (0)
        16     8  i64    max_connections (0: no cap)
        24     8  f64    accept rate, connections/s (inf: no limit)
        32     8  f64    accept burst
        40     8  f64    bucket tokens
        48     8  f64    bucket last refill (CLOCK_MONOTONIC seconds)
        56   8×N  i64    open sockets of worker i (slot i)

Flow and invariants:

* Slot ``i`` is written only by worker ``i`` (and zeroed by the supervisor
  when worker ``i`` has exited, and by worker ``i`` itself when it starts: a
  restarted worker's old sockets died with the old process). It holds that
  worker's open sockets (:attr:`derp.server.DerpServer.open_connections`:
  HTTP, TLS handshakes and DERP connections).
* One admission, under an exclusive ``flock`` on the file: write this
  worker's live count into its slot, sum all slots, refuse at
  ``max_connections``; else take one token from the shared bucket
  (:class:`derp.limits.TokenBucket` rules, time read *inside* the lock, so
  ``last`` never goes backwards); on success write the count **plus one** (the
  socket being admitted) before the lock is released. Check and reservation
  are one atomic step, so two workers accepting at the same instant never both
  take the last place: the cap and the bucket are exact host totals, with no
  overshoot.
* What remains is on the safe side only: a worker publishes a socket that
  closed at the end of that event-loop iteration (coalesced), so a sibling may
  refuse a connection during that instant although a place was just freed;
  and a worker that died counts its old sockets until the supervisor notices
  its exit (``waitpid``, at once) and zeroes its slot.
* A crash cannot leave the lock held (the kernel drops a dead process's
  ``flock``). A bucket torn by a crash in the middle of a write is repaired on
  the next read (tokens clamped to ``[0, burst]``, a non-finite or future
  ``last`` reset to now); slots below zero count as zero.

:class:`LimitsTable` is the pure part (any writable buffer, time passed in);
:class:`SharedLimits` adds the file, ``mmap``, the lock and the clock.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import mmap
import os
import struct
import time
from collections.abc import Callable, Iterator
from typing import Final

from ..limits import TokenBucket

__all__ = ["HEADER", "MAGIC", "LimitsTable", "SharedLimits"]

#: First 8 bytes of the file (the trailing digit is the layout version).
MAGIC: Final = b"DERPLIM1"

#: magic, slots, reserved, max_connections, rate, burst, tokens, last
HEADER: Final = struct.Struct("<8sIIqdddd")
_SLOT: Final = struct.Struct("<q")
_BUCKET: Final = struct.Struct("<dd")
_BUCKET_AT: Final = 40
assert HEADER.size == 56 and _BUCKET_AT + _BUCKET.size == HEADER.size


class LimitsTable:
    """The shared counters in a writable buffer (see the module docstring).

    No locking here: the caller holds the file lock around :meth:`admit` and
    :meth:`set_open` (:class:`SharedLimits` does). Raises ``ValueError`` for a
    buffer that is not a formatted table.
    """

    __slots__ = ("buf", "slots", "max_connections", "rate", "burst")

    def __init__(self, buf: memoryview | bytearray | mmap.mmap) -> None:
        with memoryview(buf) as view:  # released again if the check fails
            if len(view) < HEADER.size:
                raise ValueError("limits table too short")
            magic, slots, _r, cap, rate, burst, _t, _l = HEADER.unpack_from(view, 0)
            if magic != MAGIC:
                raise ValueError("not a derper limits table")
            if slots < 1 or len(view) < self.size(slots):
                raise ValueError("limits table truncated")
            if cap < 0 or not rate > 0 or not burst >= 1:  # NaN fails too
                raise ValueError("limits table has invalid limits")
        self.buf = memoryview(buf)
        self.slots: int = slots
        self.max_connections: int = cap
        self.rate: float = rate
        self.burst: float = burst

    @staticmethod
    def size(slots: int) -> int:
        """Bytes a table with ``slots`` workers takes."""
        return HEADER.size + slots * _SLOT.size

    @staticmethod
    def format(
        buf: memoryview | bytearray | mmap.mmap,
        slots: int,
        *,
        max_connections: int = 0,
        accept_limit: float = math.inf,
        accept_burst: int = 2**31 - 1,
        now: float = 0.0,
    ) -> None:
        """Write an empty table (every slot 0, a full bucket at ``now``) into ``buf``."""
        if slots < 1 or max_connections < 0:
            raise ValueError("slots must be >= 1 and max_connections >= 0")
        if not accept_limit > 0 or accept_burst < 1:  # NaN too
            raise ValueError("accept limit must be > 0 and burst >= 1")
        size = LimitsTable.size(slots)
        with memoryview(buf) as view:
            if len(view) < size:
                raise ValueError("buffer too small for the limits table")
            burst = float(accept_burst)
            HEADER.pack_into(
                view, 0, MAGIC, slots, 0, max_connections, accept_limit, burst, burst, now
            )
            view[HEADER.size : size] = bytes(size - HEADER.size)

    def release(self) -> None:
        """Drop the view of the buffer (an ``mmap`` can only close without views)."""
        self.buf.release()

    @property
    def rate_limited(self) -> bool:
        """True if the accept rate is limited (a finite rate)."""
        return math.isfinite(self.rate)

    def open_count(self, index: int) -> int:
        """Worker ``index``'s published open sockets."""
        return int(_SLOT.unpack_from(self.buf, self._at(index))[0])

    def set_open(self, index: int, count: int) -> None:
        """Publish worker ``index``'s open sockets."""
        _SLOT.pack_into(self.buf, self._at(index), count)

    def total_open(self) -> int:
        """Open sockets of the host (every slot, negatives as 0)."""
        slots = self.buf[HEADER.size : self.size(self.slots)]
        return sum(max(0, c) for (c,) in _SLOT.iter_unpack(slots))

    def bucket(self, now: float) -> tuple[float, float]:
        """``(tokens, last)`` as stored, repaired if torn (see the module docstring)."""
        tokens, last = _BUCKET.unpack_from(self.buf, _BUCKET_AT)
        if not 0.0 <= tokens <= self.burst:  # NaN fails both comparisons
            tokens = self.burst if math.isnan(tokens) or tokens > self.burst else 0.0
        if not last <= now or not math.isfinite(last):
            last = now
        return tokens, last

    def admit(self, index: int, open_here: int, now: float) -> bool:
        """Decide one socket accepted by worker ``index``, which has ``open_here``
        open sockets besides it. Its slot is set to ``open_here`` first (fresher
        than a publication still due), then to ``open_here + 1`` on success."""
        self.set_open(index, open_here)
        cap = self.max_connections
        if cap and self.total_open() >= cap:
            return False
        if self.rate_limited:
            tokens, last = self.bucket(now)
            b = TokenBucket(self.rate, self.burst, last)
            b.tokens = tokens
            ok = b.allow(now)
            _BUCKET.pack_into(self.buf, _BUCKET_AT, b.tokens, b.last)
            if not ok:
                return False
        self.set_open(index, open_here + 1)
        return True

    def _at(self, index: int) -> int:
        if not 0 <= index < self.slots:
            raise IndexError(f"worker slot {index} out of range (0..{self.slots - 1})")
        return HEADER.size + index * _SLOT.size


class SharedLimits:
    """A :class:`LimitsTable` in a file mapped by every worker, changed under ``flock``.

    ``index`` is this process's slot (``None`` in the supervisor, which only
    creates the file and zeroes the slots of exited workers). ``clock`` must be
    the same for every process of the host (``time.monotonic``: the system-wide
    CLOCK_MONOTONIC).
    """

    def __init__(
        self,
        fd: int,
        index: int | None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Map the table in the open file ``fd`` (which this object then owns)."""
        self._map = mmap.mmap(fd, 0)
        try:
            self.table = LimitsTable(self._map)
        except ValueError:
            self._map.close()
            raise
        if index is not None and not 0 <= index < self.table.slots:
            self.table.release()
            self._map.close()
            raise IndexError(f"worker slot {index} out of range (0..{self.table.slots - 1})")
        self._fd = fd
        self.index = index
        self._clock = clock
        #: the value last written into our slot (skips writes that change nothing)
        self._mine = -1

    @classmethod
    def create(
        cls,
        path: str,
        slots: int,
        *,
        max_connections: int = 0,
        accept_limit: float = math.inf,
        accept_burst: int = 2**31 - 1,
        clock: Callable[[], float] = time.monotonic,
    ) -> SharedLimits:
        """Create (or overwrite) ``path`` with an empty table; the supervisor's handle."""
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(fd, LimitsTable.size(slots))
            with mmap.mmap(fd, 0) as m:
                LimitsTable.format(
                    m,
                    slots,
                    max_connections=max_connections,
                    accept_limit=accept_limit,
                    accept_burst=accept_burst,
                    now=clock(),
                )
            return cls(fd, None, clock=clock)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def open(
        cls, path: str, index: int, *, clock: Callable[[], float] = time.monotonic
    ) -> SharedLimits:
        """Map the supervisor's file as worker ``index``; its slot starts at 0."""
        fd = os.open(path, os.O_RDWR)
        try:
            self = cls(fd, index, clock=clock)
        except BaseException:
            os.close(fd)
            raise
        self.publish(0)
        return self

    @contextlib.contextmanager
    def _locked(self) -> Iterator[LimitsTable]:
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            yield self.table
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def admit(self, open_here: int) -> bool:
        """Decide one socket this worker accepted (``open_here``: its other open
        sockets); True reserves the place (see :meth:`LimitsTable.admit`)."""
        index = self._index()
        with self._locked() as t:
            ok = t.admit(index, open_here, self._clock())
        self._mine = open_here + 1 if ok else open_here
        return ok

    def publish(self, open_here: int) -> None:
        """This worker now has ``open_here`` open sockets."""
        if open_here == self._mine:
            return
        index = self._index()
        with self._locked() as t:
            t.set_open(index, open_here)
        self._mine = open_here

    def reset(self, index: int) -> None:
        """Zero worker ``index``'s slot (the supervisor, once that worker exited)."""
        with self._locked() as t:
            t.set_open(index, 0)
        if index == self.index:
            self._mine = 0

    def total_open(self) -> int:
        """Open sockets of the host as published (under the lock)."""
        with self._locked() as t:
            return t.total_open()

    def close(self) -> None:
        """Unmap and close the file (idempotent; the other processes keep their mapping)."""
        if self._fd < 0:
            return
        self.table.release()
        self._map.close()
        os.close(self._fd)
        self._fd = -1

    def _index(self) -> int:
        if self.index is None:
            raise RuntimeError("the supervisor's handle has no slot of its own")
        return self.index
