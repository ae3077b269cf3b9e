"""tailnet.tuning: threshold parsing and the effect of tune_gc/refreeze on the GC."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from tailnet.tuning import DEFAULT_GC_THRESHOLDS, parse_thresholds, refreeze, tune_gc


@pytest.fixture
def restore_gc() -> Iterator[None]:
    saved = gc.get_threshold()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*saved)


def test_parse_thresholds() -> None:
    assert parse_thresholds("50000, 50,1000") == (50_000, 50, 1000)
    for bad in ("1,2", "1,2,3,4", "a,b,c", "-1,2,3", ""):
        with pytest.raises(ValueError, match="three integers"):
            parse_thresholds(bad)


def test_tune_gc_sets_thresholds_and_freezes(restore_gc: None) -> None:
    tune_gc()
    assert gc.get_threshold() == DEFAULT_GC_THRESHOLDS
    assert gc.get_freeze_count() > 0


def test_tune_gc_without_freeze(restore_gc: None) -> None:
    gc.unfreeze()
    tune_gc((1000, 20, 30), freeze=False)
    assert gc.get_threshold() == (1000, 20, 30)
    assert gc.get_freeze_count() == 0


def test_refreeze_collects_cycles_first(restore_gc: None) -> None:
    class Node:
        ref: object = None

    a, b = Node(), Node()
    a.ref, b.ref = b, a
    alive = weakref.ref(a)
    del a, b  # an unreachable cycle: must be collected, not frozen
    gc.unfreeze()
    frozen = refreeze()
    assert frozen == gc.get_freeze_count() > 0
    assert alive() is None


_MALLOC_PROBE = r"""
import sys
from tailnet.tuning import tune_malloc

def rss_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")

tuned = sys.argv[1] == "tuned" and tune_malloc()
warm = bytearray(4 << 20)
del warm  # glibc raises its mmap threshold when such a block is freed
before = rss_mb()
blocks, pins = [], []
for _ in range(16):
    b = bytearray(4 << 20)
    b[::4096] = b"x" * len(b[::4096])  # touch every page
    blocks.append(b)
    pins.append(bytearray(64))  # small and long-lived, after each block on the heap
del blocks
print(tuned, round(rss_mb() - before))
"""


def _malloc_probe(mode: str) -> tuple[bool, int]:
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run(
        [sys.executable, "-c", _MALLOC_PROBE, mode], capture_output=True, text=True, check=True,
        timeout=60, env=env,
    ).stdout.split()
    return out[0] == "True", int(out[1])


def test_tune_malloc_returns_freed_large_blocks_to_the_system() -> None:
    """bench/soak.py: after 4 MiB requests the server kept tens of MB it had
    freed (glibc's adaptive mmap threshold). Pinned, 64 MB of 4 MiB blocks,
    freed while small objects allocated after them live on, leave RSS."""
    import platform
    from pathlib import Path

    if platform.libc_ver()[0] != "glibc" or not Path("/proc/self/status").exists():
        pytest.skip("glibc on Linux only")
    tuned, held = _malloc_probe("tuned")
    assert tuned
    assert held < 16  # MB still resident of the 64 MB freed
    _, held_default = _malloc_probe("default")
    assert held_default > 48  # the default keeps them: the probe does show the effect
