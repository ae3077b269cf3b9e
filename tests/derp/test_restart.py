"""Graceful restart (Restarting frames, client honours them) and Health frames."""

from __future__ import annotations

import asyncio
import re
import signal
from pathlib import Path

import pytest

from derp.client import DerpClient
from derp.events import Connected, Disconnected, HealthReceived, PacketReceived, ServerRestarting
from derp.frames import FrameType
from derp.keys import PrivateKey
from derp.server import DerpServer
from derp.server.conn import DUPLICATE_KEY_HEALTH
from derp.tls import load_manual_cert

from .conftest import WAIT, ClientFactory, HostFactory, make_config, wait_until
from .test_cli import start_derper


async def test_stop_restarting_sends_frame_before_close(
    make_host: HostFactory, connect: ClientFactory
) -> None:
    h = await make_host(restart_reconnect_in=1.5, restart_try_for=20.0)
    cs = [await connect(host=h) for _ in range(h.workers)]  # one on each worker
    await h.stop(restarting=True)
    for c in cs:
        f = await c.recv_type(FrameType.RESTARTING)
        assert f.payload == (1500).to_bytes(4, "big") + (20000).to_bytes(4, "big")
        await c.expect_closed()
    assert h.stats.restarting_frames_sent == h.workers


async def test_plain_stop_sends_no_restarting(
    make_host: HostFactory, connect: ClientFactory
) -> None:
    h = await make_host()
    cs = [await connect(host=h) for _ in range(h.workers)]
    await h.stop()
    for c in cs:
        with_frames: list[int] = []
        try:
            while True:
                f = await c.recv_frame()
                with_frames.append(f.type)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        assert FrameType.RESTARTING not in with_frames


async def _next(client: DerpClient, kind: type) -> object:
    while True:
        ev = await asyncio.wait_for(client.recv(), WAIT)
        if isinstance(ev, kind):
            return ev


async def test_client_reconnects_to_restarted_server_within_window() -> None:
    key = PrivateKey.generate()
    first = DerpServer(make_config(private_key=key, restart_reconnect_in=0.2, restart_try_for=30.0))
    await first.start("127.0.0.1", 0)
    port = first.port
    # The notice says: wait 0.2 s, then keep trying for 30 s (the client's own
    # reconnect-loop tests in test_client.py cover the timing rules).
    client = DerpClient(
        f"http://127.0.0.1:{port}",
        PrivateKey.generate(),
        reconnect=True,
        backoff_min=0.05,
        backoff_max=60.0,
    )
    second: DerpServer | None = None
    try:
        await client.connect()
        await wait_until(lambda: first.client_count == 1)
        await first.stop(restarting=True)
        ev = await _next(client, ServerRestarting)
        assert isinstance(ev, ServerRestarting)
        assert (ev.reconnect_in, ev.try_for) == (0.2, 30.0)
        await _next(client, Disconnected)
        second = DerpServer(make_config(private_key=key))
        await second.start("127.0.0.1", port)  # same key, same port: "restarted"
        ev = await _next(client, Connected)
        assert isinstance(ev, Connected) and ev.server_key == key.public
        await client.send(client.public_key, b"back")
        got = await _next(client, PacketReceived)
        assert isinstance(got, PacketReceived) and got.data == b"back"
    finally:
        await client.close()
        if second is not None:
            await second.stop()


async def test_health_announces_and_clears_duplicate_key(
    server: DerpServer, connect: ClientFactory
) -> None:
    key = PrivateKey.generate()
    url = f"http://127.0.0.1:{server.next_port()}"
    lib = DerpClient(url, key)
    await lib.connect()
    try:
        await wait_until(lambda: server.client_count == 1)
        await server.synced()
        dup = await connect(key)  # same node key elsewhere (two workers: on the other one)
        f = await dup.recv_type(FrameType.HEALTH)
        assert f.payload.decode() == DUPLICATE_KEY_HEALTH
        ev = await _next(lib, HealthReceived)
        assert isinstance(ev, HealthReceived) and ev.problem == DUPLICATE_KEY_HEALTH
        await dup.close()
        ev = await _next(lib, HealthReceived)
        assert isinstance(ev, HealthReceived) and ev.problem == ""  # healthy again
        assert server.stats.health_frames_sent == 3
    finally:
        await lib.close()


async def test_health_disabled_by_config(make_host: HostFactory, connect: ClientFactory) -> None:
    h = await make_host(health_on_duplicate=False)
    key = PrivateKey.generate()
    a = await connect(key, host=h)
    b = await connect(key, host=h)  # every worker has seen both: no Health was due
    b.send(b"\x12\x00\x00\x00\x08pingping")  # a Pong proves b's frames were all read
    f = await b.recv_frame()
    while f.type == FrameType.KEEP_ALIVE:
        f = await b.recv_frame()
    assert f.type == FrameType.PONG
    a.send(b"\x12\x00\x00\x00\x08pingping")
    f = await a.recv_type(FrameType.PONG)
    assert h.stats.health_frames_sent == 0


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_derper_process_tls_pin_and_sigterm_restarting(tmp_path: Path, workers: str) -> None:
    d = await start_derper(
        "--dev", "-a", "127.0.0.1:0", "--no-stun", "--stats-interval", "0",
        "--certmode", "manual", "--certdir", str(tmp_path), "--hostname", "127.0.0.1",
        "--restart-reconnect-in", "250ms", "--restart-try-for", "5s", "--workers", workers,
    )  # fmt: skip
    client: DerpClient | None = None
    try:
        assert d.proc.stdout is not None
        pin = url = ""
        while not url:
            line = (await asyncio.wait_for(d.proc.stdout.readline(), WAIT)).decode()
            assert line, f"derper exited: {d.stderr.decode()}"
            if m := re.search(r'CertName: "(sha256-raw:[0-9a-f]{64})"', line):
                pin = m.group(1)
            if m := re.search(r"listening on (https://\S+/derp)", line):
                url = m.group(1)
        assert pin == load_manual_cert(tmp_path, "127.0.0.1").pin
        client = DerpClient(url, PrivateKey.generate(), cert_name=pin, reconnect=True)
        await client.connect()
        d.proc.send_signal(signal.SIGTERM)
        ev = await _next(client, ServerRestarting)
        assert isinstance(ev, ServerRestarting) and (ev.reconnect_in, ev.try_for) == (0.25, 5.0)
        assert await asyncio.wait_for(d.proc.wait(), WAIT) == 0
    finally:
        if client is not None:
            await client.close()
        d.kill()
        await asyncio.wait_for(d.proc.wait(), WAIT)
