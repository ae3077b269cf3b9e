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
