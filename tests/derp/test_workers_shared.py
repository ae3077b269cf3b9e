"""derp.workers.shared: the host-wide limits table (golden layout written by hand,
hypothesis against a model, repair of a torn bucket) and SharedLimits across real
processes (the totals are exact under contention)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from derp.limits import TokenBucket
from derp.server import DerpServer
from derp.workers.shared import HEADER, LimitsTable, SharedLimits

from .conftest import WAIT, RawClient, make_config, wait_until


def test_layout_golden_bytes() -> None:
    buf = bytearray(LimitsTable.size(3))
    assert len(buf) == 56 + 3 * 8
    LimitsTable.format(buf, 3, max_connections=5, accept_limit=2.0, accept_burst=4, now=1.5)
    t = LimitsTable(buf)
    t.set_open(1, 7)
    t.set_open(2, -1)
    want = bytes.fromhex(
        "444552504c494d31"  # magic "DERPLIM1"
        + "03000000"  # u32 slots = 3
        + "00000000"  # u32 reserved
        + "0500000000000000"  # i64 max_connections = 5
        + "0000000000000040"  # f64 rate = 2.0
        + "0000000000001040"  # f64 burst = 4.0
        + "0000000000001040"  # f64 tokens = 4.0 (a full bucket)
        + "000000000000f83f"  # f64 last = 1.5
        + "0000000000000000"  # slot 0 = 0
        + "0700000000000000"  # slot 1 = 7
        + "ffffffffffffffff"  # slot 2 = -1 (counts as 0)
    )
    assert bytes(buf) == want
    assert (t.slots, t.max_connections, t.rate, t.burst) == (3, 5, 2.0, 4.0)
    assert t.total_open() == 7 and t.open_count(1) == 7


def test_rejects_what_is_not_a_table() -> None:
    with pytest.raises(ValueError):
        LimitsTable(bytearray(HEADER.size))  # no magic
    buf = bytearray(LimitsTable.size(2))
    LimitsTable.format(buf, 2)
    with pytest.raises(ValueError):
        LimitsTable(buf[:-1])  # truncated
    with pytest.raises(ValueError):
        LimitsTable.format(bytearray(10), 1)
    for bad in ({"accept_limit": 0.0}, {"accept_limit": math.nan}, {"accept_burst": 0}):
        with pytest.raises(ValueError):
            LimitsTable.format(buf, 2, **bad)
    with pytest.raises(IndexError):
        LimitsTable(buf).set_open(2, 1)
    HEADER.pack_into(buf, 0, b"DERPLIM1", 2, 0, 0, -1.0, 1.0, 1.0, 0.0)  # a negative rate
    with pytest.raises(ValueError):
        LimitsTable(buf)


def test_cap_counts_every_worker_and_the_live_count_of_the_caller() -> None:
    buf = bytearray(LimitsTable.size(2))
    LimitsTable.format(buf, 2, max_connections=3)
    t = LimitsTable(buf)
    assert t.admit(0, 0, 0.0) and t.admit(0, 1, 0.0)  # worker 0: 2 sockets
    assert t.open_count(0) == 2
    assert t.admit(1, 0, 0.0)  # worker 1: the third
    assert not t.admit(1, 1, 0.0) and not t.admit(0, 2, 0.0)  # full, on both
    t.set_open(0, 1)  # one of worker 0's closed
    assert t.admit(1, 1, 0.0)
    assert t.total_open() == 3 and t.open_count(1) == 2
    # The caller's live count, not its slot, counts for itself (closes not yet published).
    assert t.admit(1, 0, 0.0) and t.open_count(1) == 1


def test_torn_bucket_is_repaired() -> None:
    buf = bytearray(LimitsTable.size(1))
    LimitsTable.format(buf, 1, accept_limit=1.0, accept_burst=2, now=10.0)
    t = LimitsTable(buf)
    for tokens, last in ((math.nan, 10.0), (-5.0, math.inf), (1e300, 99.0), (1.0, math.nan)):
        HEADER.pack_into(buf, 0, b"DERPLIM1", 1, 0, 0, 1.0, 2.0, tokens, last)
        got_tokens, got_last = t.bucket(20.0)
        assert 0.0 <= got_tokens <= 2.0 and got_last <= 20.0
    HEADER.pack_into(buf, 0, b"DERPLIM1", 1, 0, 0, 1.0, 2.0, 0.0, 1e9)  # "last" in the future
    assert t.admit(0, 0, 20.0) is False  # treated as "now": empty, no credit
    assert t.admit(0, 0, 21.0) is True  # and the bucket refills from there


_op = st.one_of(
    st.tuples(st.just("admit"), st.integers(0, 2), st.integers(0, 6)),
    st.tuples(st.just("publish"), st.integers(0, 2), st.integers(0, 6)),
    st.tuples(st.just("wait"), st.floats(0.0, 3.0), st.just(0)),
)


@settings(max_examples=300, deadline=None)
@given(
    cap=st.integers(0, 8),
    rate=st.sampled_from([math.inf, 0.5, 2.0]),
    burst=st.integers(1, 5),
    ops=st.lists(_op, max_size=60),
)
def test_admit_matches_a_model(
    cap: int, rate: float, burst: int, ops: list[tuple[str, float, int]]
) -> None:
    """Against a plain model: a list of slots and one TokenBucket; plus the bucket's
    own bound (admissions ≤ burst + rate × elapsed)."""
    buf = bytearray(LimitsTable.size(3))
    LimitsTable.format(buf, 3, max_connections=cap, accept_limit=rate, accept_burst=burst, now=0.0)
    t = LimitsTable(buf)
    slots = [0, 0, 0]
    bucket = None if math.isinf(rate) else TokenBucket(rate, burst, 0.0)
    now = 0.0
    admitted = 0
    for kind, a, b in ops:
        if kind == "wait":
            now += a
            continue
        i = int(a)
        if kind == "publish":
            t.set_open(i, b)
            slots[i] = b
            continue
        others = sum(slots) - slots[i]
        want = not (cap and others + b >= cap)
        if want and bucket is not None:
            want = bucket.allow(now)
        got = t.admit(i, b, now)
        assert got == want
        slots[i] = b + 1 if got else b
        admitted += got
        assert [t.open_count(k) for k in range(3)] == slots
        assert t.total_open() == sum(slots)
    if not math.isinf(rate):
        assert admitted <= burst + rate * now + 1e-9


# --------------------------------------------------------------------------- processes

_WORKER = textwrap.dedent(
    """
    import sys
    from derp.workers.shared import SharedLimits
    path, index, tries = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    limits = SharedLimits.open(path, index)
    print("ready", flush=True)
    sys.stdin.read(1)  # the start line: every process begins at once
    mine = 0
    for _ in range(tries):
        if limits.admit(mine):
            mine += 1
    print(mine, flush=True)
    """
)


def _race(path: Path, workers: int, tries: int) -> list[int]:
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, str(path), str(i), str(tries)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for i in range(workers)
    ]
    try:
        for p in procs:
            assert p.stdout is not None and p.stdout.readline() == "ready\n"
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("g")
            p.stdin.close()
        out = []
        for p in procs:
            assert p.stdout is not None
            out.append(int(p.stdout.readline()))
            assert p.wait(WAIT) == 0
        return out
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def test_cap_is_exact_across_processes(tmp_path: Path) -> None:
    path = tmp_path / "limits"
    sup = SharedLimits.create(str(path), 4, max_connections=37)
    try:
        got = _race(path, 4, 300)
        assert sum(got) == 37  # never more, and the cap is reached
        assert sup.total_open() == 37
        sup.reset(2)  # worker 2 exited: its places are free again
        assert sup.total_open() == 37 - got[2]
    finally:
        sup.close()
        sup.close()  # idempotent


def test_accept_bucket_is_exact_across_processes(tmp_path: Path) -> None:
    path = tmp_path / "limits"
    # One token per 1000 s: only the burst can be used during the test.
    sup = SharedLimits.create(str(path), 3, accept_limit=0.001, accept_burst=25)
    try:
        assert sum(_race(path, 3, 200)) == 25
    finally:
        sup.close()


def test_open_resets_own_slot_and_publish_skips_no_ops(tmp_path: Path) -> None:
    path = str(tmp_path / "limits")
    now = [100.0]
    sup = SharedLimits.create(path, 2, max_connections=10, clock=lambda: now[0])
    w0 = SharedLimits.open(path, 0, clock=lambda: now[0])
    try:
        assert w0.admit(4) and sup.table.open_count(0) == 5
        w1 = SharedLimits.open(path, 1)
        w1.table.set_open(1, 3)
        w1.close()
        w1 = SharedLimits.open(path, 1)  # a restarted worker 1: its old sockets are gone
        assert sup.total_open() == 5
        w1.close()
        w0.publish(2)
        assert sup.table.open_count(0) == 2
        sup.table.set_open(0, 9)  # (not how it is used: shows that equal values skip the write)
        w0.publish(2)
        assert sup.table.open_count(0) == 9
        with pytest.raises(RuntimeError):
            sup.admit(0)  # the supervisor's handle has no slot
        with pytest.raises(IndexError):
            SharedLimits.open(path, 2)
        bad = tmp_path / "bad"
        bad.write_bytes(os.urandom(64))
        with pytest.raises(ValueError):
            SharedLimits.open(str(bad), 0)
    finally:
        w0.close()
        sup.close()


# --------------------------------------------------------------------------- listener


async def test_two_servers_share_one_cap_and_publish_closes(tmp_path: Path) -> None:
    """Two DerpServers of one process stand in for two workers (slots 0 and 1)."""
    path = str(tmp_path / "limits")
    sup = SharedLimits.create(path, 2, max_connections=2)
    servers = [
        DerpServer(make_config(host_limits=SharedLimits.open(path, i))) for i in range(2)
    ]
    clients: list[RawClient] = []
    try:
        for srv in servers:
            await srv.start("127.0.0.1", 0)
        a = await RawClient.open(servers[0].port)
        clients.append(a)
        await a.handshake()
        b = await RawClient.open(servers[1].port)
        clients.append(b)
        await b.handshake()
        assert sup.total_open() == 2
        for srv in servers:  # the host is full, whichever server is asked
            c = await RawClient.open(srv.port)
            clients.append(c)
            await c.expect_closed()
        assert [srv.stats.accepts_rejected for srv in servers] == [1, 1]
        await b.close()  # server 1 publishes the freed place ...
        await wait_until(lambda: sup.total_open() == 1)
        c = await RawClient.open(servers[0].port)  # ... and server 0 may use it
        clients.append(c)
        await c.handshake()
        assert sup.table.open_count(0) == 2 and sup.table.open_count(1) == 0
    finally:
        for c in clients:
            await c.close()
        for srv in servers:
            await srv.stop()
        await wait_until(lambda: sup.total_open() == 0)  # every close published
        for srv in servers:
            assert isinstance(srv.config.host_limits, SharedLimits)
            srv.config.host_limits.close()
        sup.close()
