"""Operating the stack on PostgreSQL: the health report's database section, the
verdict while the replica refuses peers, and a shutdown bounded by the grace time
during a database outage (saying what it dropped)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from tailnet.client import AgentConnection, ConnectionOptions
from tailnet.config import StackConfig
from tailnet.pg import PgCoordinator
from tailnet.pg.coordinator import PgCoordinatorConfig
from tailnet.stack import TailnetStack

from ..pgserver import PgServer, pg_dsn, pg_server  # noqa: F401  (fixtures)

pytestmark = pytest.mark.timeout(90)

FAST = PgCoordinatorConfig(heartbeat_interval=0.2, missed_heartbeats=50, retry_max=0.3,
                           listen_probe_interval=0.5, query_timeout=1.0)


async def test_health_database_and_outage_verdict_and_bounded_stop(
    pg_server: PgServer, pg_dsn: str, caplog: pytest.LogCaptureFixture  # noqa: F811
) -> None:
    caplog.set_level(logging.WARNING)
    coord = PgCoordinator(pg_dsn, FAST)
    await coord.start()
    stack = TailnetStack(
        StackConfig(http_addr="127.0.0.1:0", grpc_addr=None, stun_addr=None, data_dir=None,
                    health_timeout=1.0),
        coordinator=coord,
    )
    await stack.start()
    assert stack.health is not None
    creds = stack.create_agent()
    agent = AgentConnection(stack.access_url, creds.token, options=ConnectionOptions(version="2.3"))
    stopped = False
    try:
        await agent.start(10)
        report = await stack.health.report(force=True)
        db = report["database"]
        assert db["severity"] in ("ok", "warning") and db["healthy"] and db["reachable"]
        assert db["threshold_ms"] == 15 and db["latency"] and isinstance(db["latency_ms"], int)
        assert report["coordinator"]["backend"] == "postgres"
        assert report["coordinator"]["replica"] == str(coord.id)
        assert report["severity"] != "error" and report["healthy"] is True

        pg_server.stop()
        async with asyncio.timeout(20):
            while coord.healthy:  # 3 failed heartbeats at 0.2 s
                await asyncio.sleep(0.05)
        report = await stack.health.report(force=True)
        assert report["severity"] == "error" and report["healthy"] is False
        assert report["coordinator"]["severity"] == "error"
        assert "cannot write its heartbeat" in report["coordinator"]["error"]
        assert report["database"]["severity"] == "error"
        assert report["database"]["warnings"][0]["code"] == "EDB01"
        assert not report["database"]["reachable"]

        # SIGTERM's path during the outage: stop() keeps to its grace time.
        await agent.close()
        t0 = time.monotonic()
        await stack.stop(grace=3.0)
        stopped = True
        elapsed = time.monotonic() - t0
        assert elapsed < 3.0 + 1.5, elapsed
        await asyncio.wait_for(coord.stop(timeout=1.0), 5)
        assert any("dropped" in r.getMessage() and "pending write" in r.getMessage()
                   for r in caplog.records), [r.getMessage() for r in caplog.records][-10:]
    finally:
        pg_server.start()
        await agent.close()
        if not stopped:
            await stack.stop(grace=2.0)
        await asyncio.wait_for(coord.stop(timeout=2.0), 10)


async def test_sigterm_during_database_outage_exits_within_grace(
    pg_server: PgServer, pg_dsn: str, tmp_path: Path  # noqa: F811
) -> None:
    root = Path(__file__).resolve().parents[3]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tailnet", "serve", "--http-addr", "127.0.0.1:0",
        "--grpc-addr", "off", "--stun-addr", "off", "--data-dir", str(tmp_path / "d"),
        "--postgres-url", pg_dsn, "--log-level", "WARNING",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(root)}, cwd=root,
    )
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(30):
            while not (await proc.stdout.readline()).strip().startswith(b"try:"):
                pass
        pg_server.stop()
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, err = await asyncio.wait_for(proc.communicate(), 15)
        elapsed = time.monotonic() - t0
    finally:
        pg_server.start()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()[-2000:]
    assert elapsed < 5.0 + 2.0, elapsed  # SHUTDOWN_GRACE, plus interpreter exit
    text = err.decode()
    assert "dropped" in text and "pending write" in text, text[-2000:]
    assert "Traceback" not in text
