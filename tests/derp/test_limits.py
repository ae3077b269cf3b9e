"""Limits (spec §3.9, §3.11): pure token buckets, then accept limits, connection cap,
per-client receive limit and write timeout against the real server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import math
import os
import socket
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from derp.client import DerpClient
from derp.frames import FrameType, encode_send_packet
from derp.keys import PrivateKey
from derp.limits import MIN_CLIENT_BURST, AcceptLimiter, RateConfig, TokenBucket
from derp.prodflags import parse_duration, server_options
from derp.server import DerpServer

from .conftest import WAIT, ClientFactory, HostFactory, closed_at_once, make_config, wait_until

# --------------------------------------------------------------------------- pure


def test_token_bucket_take_returns_wait_for_debt() -> None:
    b = TokenBucket(100.0, 50.0, now=0.0)
    assert b.take(50, 0.0) == 0.0
    assert b.take(25, 0.0) == pytest.approx(0.25)  # 25 tokens of debt at 100/s
    assert b.take(0, 0.25) == 0.0  # paid off
    assert b.allow(0.25, 1) is False
    assert b.allow(0.26, 1) is True


def test_accept_limiter_burst_then_rate() -> None:
    lim = AcceptLimiter(2.0, 3, now=0.0)
    assert [lim.allow(0.0) for _ in range(4)] == [True, True, True, False]
    assert lim.allow(0.5) is True  # one token after 0.5 s at 2/s
    assert lim.allow(0.5) is False
    assert (lim.accepted, lim.rejected) == (4, 2)
    unlimited = AcceptLimiter()
    assert not unlimited.enabled and all(unlimited.allow(0.0) for _ in range(1000))


@given(
    rate=st.floats(1.0, 1e6),
    burst=st.floats(1.0, 1e6),
    steps=st.lists(st.tuples(st.floats(0.0, 2.0), st.floats(0.0, 1e5)), max_size=40),
)
def test_token_bucket_never_exceeds_rate_plus_burst(
    rate: float, burst: float, steps: list[tuple[float, float]]
) -> None:
    b = TokenBucket(rate, burst, now=0.0)
    now = 0.0
    granted = 0.0
    for dt, n in steps:
        now += dt
        if b.allow(now, n):
            granted += n
        assert b.tokens <= burst + 1e-6
    assert granted <= burst + rate * now + 1e-6 * max(1.0, granted)


@given(st.lists(st.tuples(st.floats(0.0, 1.0), st.integers(0, 100_000)), max_size=40))
def test_take_wait_pays_the_debt(steps: list[tuple[float, int]]) -> None:
    b = TokenBucket(10_000.0, MIN_CLIENT_BURST, now=0.0)
    now = 0.0
    for dt, n in steps:
        now += dt
        wait = b.take(n, now)
        assert wait >= 0.0
        now += wait
        assert b.take(0, now) < 1e-9  # after waiting, no debt is left (float rounding aside)


def test_rate_config_json() -> None:
    rc = RateConfig.from_json('{"PerClientRateLimitBytesPerSec": 1000, "perclientrateburstbytes": 5}')
    assert rc.enabled and rc.bytes_per_sec == 1000
    assert rc.effective_burst == MIN_CLIENT_BURST == 65568
    assert rc.server_info_fields() == {
        "TokenBucketBytesPerSecond": 1000,
        "TokenBucketBytesBurst": 65568,
    }
    assert RateConfig.from_json("{}").server_info_fields() == {}
    for bad in ("[]", "nope", '{"PerClientRateLimitBytesPerSec": -1}', '{"PerClientRateBurstBytes": "x"}'):
        with pytest.raises(ValueError):
            RateConfig.from_json(bad)


def test_token_bucket_rejects_bad_parameters() -> None:
    for rate, burst in ((0, 1), (1, 0), (math.nan, 1)):
        with pytest.raises(ValueError):
            TokenBucket(rate, burst, 0.0)


# --------------------------------------------------------------------------- server


async def test_accept_rate_limit_closes_overflow_immediately(
    make_host: HostFactory, connect: ClientFactory
) -> None:
    # Two workers: a burst of 1 each (derper --workers splits the host-wide limits).
    h = await make_host(accept_limit=0.001, accept_burst=2)
    cs = [await connect(host=h) for _ in range(2)]
    assert await closed_at_once(h.next_port())
    assert h.stats.accepts_rejected == 1
    # The admitted clients are unaffected.
    cs[0].send_packet(cs[1].pub, b"after overflow")
    assert (await cs[1].recv_packet())[1] == b"after overflow"


async def test_max_connections(make_host: HostFactory, connect: ClientFactory) -> None:
    h = await make_host(max_connections=2)  # two workers: 1 each
    a = await connect(host=h)
    b = await connect(host=h)
    assert await closed_at_once(h.next_port())  # worker 0 again: full
    assert h.stats.accepts_rejected == 1
    await b.close()
    await wait_until(lambda: h.open_connections == 1)
    c = await connect(host=h)  # room again (two workers: where b was)
    assert c.server_info is not None
    a.send_packet(c.pub, b"to c")
    assert await c.recv_packet() == (a.pub, b"to c")


async def test_max_connections_exact_under_an_accept_burst() -> None:
    """Sockets accepted in one loop iteration count before their ``connection_made``
    (asyncio calls the factory for a whole batch first): no overshoot."""
    srv = DerpServer(make_config(max_connections=3))
    await srv.start("127.0.0.1", 0)
    socks: list[socket.socket] = []
    try:
        for _ in range(20):  # connect all at once, without awaiting in between
            s = socket.socket()
            s.setblocking(False)
            try:
                s.connect(("127.0.0.1", srv.port))
            except BlockingIOError:
                pass
            socks.append(s)
        await wait_until(lambda: srv.stats.accepts_rejected + srv.open_connections == 20)
        assert (srv.open_connections, srv.stats.accepts_rejected) == (3, 17)
    finally:
        for s in socks:
            s.close()
        await srv.stop()


async def test_receive_limit_advertised_and_pauses_reading_without_loss(
    make_host: HostFactory, connect: ClientFactory
) -> None:
    mesh_key = os.urandom(32)
    rate = RateConfig(bytes_per_sec=400_000, burst_bytes=0)
    h = await make_host(rate_config=rate, mesh_key=mesh_key)
    sender = await connect(host=h)
    assert sender.server_info == {
        "version": 2,
        "TokenBucketBytesPerSecond": 400_000,
        "TokenBucketBytesBurst": MIN_CLIENT_BURST,
    }
    receiver = await connect(host=h)
    mesh = await connect(info={"meshKey": mesh_key.hex(), "version": 2}, host=h)
    pkt = os.urandom(16_000)
    n = 40  # 640 kB: more than the burst, so reading must pause at least once
    sender.send(encode_send_packet(receiver.pub, pkt) * n)
    for _ in range(n):
        src, data = await receiver.recv_packet()
        assert src == sender.pub and data == pkt
    assert h.stats.rate_limit_waits >= 1
    assert h.stats.total_drops == 0
    # Mesh peers are exempt.
    waits = h.stats.rate_limit_waits
    mesh.send(encode_send_packet(receiver.pub, pkt) * n)
    for _ in range(n):
        assert (await receiver.recv_packet())[0] == mesh.pub
    assert h.stats.rate_limit_waits == waits


async def test_client_library_sees_token_bucket() -> None:
    srv = DerpServer(make_config(rate_config=RateConfig(1_000_000, 100_000)))
    await srv.start("127.0.0.1", 0)
    try:
        async with DerpClient(f"http://127.0.0.1:{srv.port}", PrivateKey.generate()) as c:
            assert c.token_bucket == (1_000_000, 100_000)
    finally:
        await srv.stop()


async def test_write_timeout_drops_blocked_reader_only(
    make_host: HostFactory, connect: ClientFactory
) -> None:
    h = await make_host(write_timeout=0.3, write_buffer_high=16 * 1024)
    sender = await connect(host=h)
    stuck = await connect(rcvbuf=4096, host=h)  # two workers: on the other one
    other = await connect(host=h)
    frame = encode_send_packet(stuck.pub, os.urandom(60_000))

    async def flood() -> None:
        # `stuck` never reads; keep its socket full until the server gives up on it.
        while h.stats.write_timeouts == 0:
            sender.send(frame * 8)
            await sender.writer.drain()
            await asyncio.sleep(0.01)

    await asyncio.wait_for(flood(), WAIT)
    assert h.stats.write_timeouts == 1
    await wait_until(lambda: h.client_count == 2)
    sender.send(encode_send_packet(other.pub, b"sender still fine"))
    while True:
        f = await other.recv_type(FrameType.RECV_PACKET)
        if f.payload[32:] == b"sender still fine":
            break


def test_rate_config_roundtrips_through_json() -> None:
    doc = {"PerClientRateLimitBytesPerSec": 5, "PerClientRateBurstBytes": 70000}
    rc = RateConfig.from_json(json.dumps(doc))
    assert (rc.bytes_per_sec, rc.effective_burst) == (5, 70000)


async def test_rejected_accepts_do_not_break_server(connect: ClientFactory) -> None:
    # Sanity: the default server (no limits) accepts many quick connections.
    for _ in range(5):
        c = await connect()
        await c.close()


# --------------------------------------------------------------------------- derper flags


def test_prod_flags_to_server_config(tmp_path: Path) -> None:
    from derp.cli import build_parser

    (tmp_path / "rate.json").write_text('{"PerClientRateLimitBytesPerSec": 1000}')
    args = build_parser().parse_args([
        "--accept-connection-limit", "5", "--accept-connection-burst", "10",
        "--max-connections", "100", "--rate-config", str(tmp_path / "rate.json"),
        "--per-client-burst", "70000", "--tcp-write-timeout", "500ms",
        "--debug-allow", "10.0.0.0/8, 127.0.0.1/32", "--restart-try-for", "0",
    ])  # fmt: skip
    opts = server_options(args, PrivateKey.generate().public, "localhost")
    cfg = make_config(**opts.config)
    assert (cfg.accept_limit, cfg.accept_burst, cfg.max_connections) == (5.0, 10, 100)
    assert cfg.rate_config == RateConfig(1000, 70000)
    assert cfg.write_timeout == 0.5 and cfg.debug_allow == ("10.0.0.0/8", "127.0.0.1/32")
    assert opts.scheme == "http" and not opts.restart_on_sigterm


@pytest.mark.parametrize(
    "argv",
    [
        ["--certmode", "manual", "--hostname", "derp.example.com"],  # no cert files
        ["--tcp-write-timeout", "soon"],
        ["--debug-allow", "not-a-net"],
        ["--accept-connection-limit", "0"],
        ["--accept-connection-limit", "nan"],
        ["--per-client-rate-limit", "-1"],
        ["--max-connections", "-1"],
    ],
)
def test_prod_flags_errors(argv: list[str], tmp_path: Path) -> None:
    from derp.cli import build_parser

    args = build_parser().parse_args(argv + ["--certdir", str(tmp_path)])
    with pytest.raises(ValueError):
        server_options(args, PrivateKey.generate().public, args.hostname)


def test_parse_duration() -> None:
    assert [parse_duration(t) for t in ("2", "2.5", "500ms", "2s", "1m")] == [2, 2.5, 0.5, 2, 60]
