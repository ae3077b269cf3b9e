"""Process-wide garbage-collector tuning for coordinator server processes.

Why: a coordinator keeps a large, long-lived heap (per connected peer: gRPC
call objects, the stream's tasks and queue, the coordinator's peer record).
With CPython's default thresholds ``(700, 10, 10)`` the cyclic collector
rescans that heap ever more often as peers connect; with 10,000 peers a full
collection stalls the event loop for 0.1–0.8 s and every update in flight waits
(``bench/COORD.md``). The coordinator's steady state creates no cyclic garbage
(gRPC's per-call method lookup leaves about 6 cyclic objects per new stream), so
collections are almost pure overhead.

:func:`tune_gc` (called by ``tailnet serve`` and the benchmark's coordinator,
never by the library itself — an embedding host owns its process's GC):

1. ``gc.collect()`` then ``gc.freeze()``: everything alive at startup (modules,
   classes, protobuf descriptors) moves to the permanent generation and is
   never scanned again;
2. ``gc.set_threshold(*thresholds)``: a large young generation (default
   50,000 allocations) so short-lived objects die before a pass, and a
   gen-2 threshold high enough that full collections happen only rarely.
   Acyclic garbage is still freed at once by reference counting; cyclic
   garbage is still collected by the young passes.

:func:`refreeze` may be called at a quiet moment after a large connection
burst: one full collection (a single pause), then every survivor is frozen so
later passes never rescan the connected peers. Objects frozen this way are
still freed by reference counting when they die; only cycles among them are
left uncollected, which is why the full collection runs first.

:func:`tune_malloc` (also called by ``tailnet serve``): glibc's malloc serves
blocks of at least ``M_MMAP_THRESHOLD`` (128 KiB) with their own ``mmap`` and
unmaps them when freed, but raises that threshold (up to 32 MiB) each time
such a block is freed. After one 4 MiB request (a big WebSocket message, a
CoordinateRequest refused for its size, gRPC's receive buffers, a ~63 KB node
fanned out to many peers) every later one is carved from the heap instead,
where freed memory is rarely returned to the system. The soak benchmark
measured it (``bench/soak.py --attacks huge-request-grpc huge-request-drpc
slow-consumers-grpc slow-consumers-drpc ws-big-messages``, 25 s): RSS +49 MB
at the peak and +40–46 MB still held 5 s after the attackers left; with the
threshold pinned at 128 KiB +33 MB and +20–22 MB. Pinning it (any ``mallopt``
of it disables the adjustment) costs one ``mmap``/``munmap`` pair per large
block.
"""

from __future__ import annotations

import ctypes
import gc
from typing import Final

__all__ = [
    "DEFAULT_GC_THRESHOLDS",
    "MMAP_THRESHOLD",
    "parse_thresholds",
    "refreeze",
    "tune_gc",
    "tune_malloc",
]

#: (gen0, gen1, gen2) thresholds used by :func:`tune_gc` by default.
DEFAULT_GC_THRESHOLDS: Final = (50_000, 50, 1000)


#: Bytes from which glibc's malloc maps a block on its own (see :func:`tune_malloc`).
MMAP_THRESHOLD: Final = 128 * 1024
_M_MMAP_THRESHOLD: Final = -3  # <malloc.h>


def parse_thresholds(text: str) -> tuple[int, int, int]:
    """Parse ``"G0,G1,G2"`` (non-negative integers) for a command-line flag."""
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        raise ValueError(f"GC thresholds must be three integers G0,G1,G2, got {text!r}")
    g0, g1, g2 = (int(p) for p in parts)
    return g0, g1, g2


def tune_gc(
    thresholds: tuple[int, int, int] = DEFAULT_GC_THRESHOLDS, *, freeze: bool = True
) -> None:
    """Tune the cyclic GC for a long-running server (see module docstring).

    Call once after startup imports, before serving. ``freeze=False`` keeps
    the startup heap in the collected generations.
    """
    if freeze:
        gc.collect()
        gc.freeze()
    gc.set_threshold(*thresholds)


def refreeze() -> int:
    """Full collection, then freeze every survivor; returns the frozen object count."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def tune_malloc(mmap_threshold: int = MMAP_THRESHOLD) -> bool:
    """Pin glibc's ``M_MMAP_THRESHOLD`` (see module docstring) so large blocks
    are always returned to the system when freed.

    Returns False (and changes nothing) where the C library is not glibc or
    refuses the setting. Process-wide: call once, from a server's entry point.
    """
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
        # only glibc has this symbol; musl and macOS have no mallopt tuning
        libc.gnu_get_libc_version  # noqa: B018
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold))
