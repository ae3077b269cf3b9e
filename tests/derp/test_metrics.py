"""Prometheus metrics at /metrics and /debug/varz, and the /debug access policy."""

from __future__ import annotations

import asyncio
import json

import pytest
from prometheus_client.parser import text_string_to_metric_families

from derp.frames import encode_send_packet
from derp.metrics import DebugAccess, DerpMetrics
from derp.server import DerpServer
from derp.stats import ServerStats

from .conftest import WAIT, ClientFactory, make_config, wait_until


async def _get(port: int, path: str) -> tuple[int, dict[str, str], bytes]:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    try:
        w.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = await asyncio.wait_for(r.read(), WAIT)
    finally:
        w.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


@pytest.mark.parametrize("path", ["/metrics", "/debug/varz"])
async def test_prometheus_exposition(server: DerpServer, connect: ClientFactory, path: str) -> None:
    a = await connect()
    b = await connect()
    a.send_packet(b.pub, b"x" * 100)
    await b.recv_packet()
    a.send_packet(bytes(range(32)), b"nobody")  # unknown_dest drop
    await wait_until(lambda: server.stats.total_drops == 1)
    server.metrics.stun.requests["success"] += 3
    server.metrics.gauges["current_mesh_peers"] = lambda: 2
    await server.stats_synced()  # two workers: worker 0 answers with both workers' totals
    status, headers, body = await _get(server.port, path)
    assert status == 200
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    s = _samples(body.decode())
    assert s[("derp_current_connections", ())] == 2
    assert s[("derp_accepts_total", ())] == 2
    assert s[("derp_packets_received_total", ())] == 2
    assert s[("derp_packets_sent_total", ())] == 1
    assert s[("derp_bytes_sent_total", ())] == 100
    drop = ("derp_packets_dropped_total", (("kind", "other"), ("reason", "unknown_dest")))
    assert s[drop] == 1
    assert s[("derp_packets_dropped_total", (("kind", "disco"), ("reason", "queue_head")))] == 0
    assert s[("derp_stun_requests_total", (("disposition", "success"),))] == 3
    assert s[("derp_current_mesh_peers", ())] == 2
    for name in ("derp_websocket_accepts_total", "derp_sclient_write_timeouts_total",
                 "derp_average_queue_duration_ms", "derp_current_home_connections"):
        assert any(k[0] == name for k in s), name


async def test_debug_vars_and_index(server: DerpServer, connect: ClientFactory) -> None:
    await connect()
    await connect()
    await server.stats_synced()
    status, headers, body = await _get(server.port, "/debug/vars")
    assert status == 200 and headers["content-type"] == "application/json"
    doc = json.loads(body)
    assert doc["current_connections"] == 2 and "stun_requests" in doc
    status, _, body = await _get(server.port, "/debug/")
    assert status == 200 and b"/debug/varz" in body
    status, _, _ = await _get(server.port, "/debug/nope")
    assert status == 404


@pytest.mark.parametrize("path", ["/metrics", "/debug/varz", "/debug/vars", "/debug/"])
async def test_debug_forbidden_outside_allow_list(path: str) -> None:
    srv = DerpServer(make_config(debug_allow=("10.0.0.0/8", "fd00::/8")))
    await srv.start("127.0.0.1", 0)
    try:
        status, _, body = await _get(srv.port, path)
        assert status == 403 and b"denied" in body
        status, _, _ = await _get(srv.port, "/derp/probe")  # other endpoints unaffected
        assert status == 200
    finally:
        await srv.stop()


def test_debug_access_policy() -> None:
    default = DebugAccess()
    assert default.allows(("127.0.0.1", 1)) and default.allows(("::1", 1, 0, 0))
    assert default.allows(("::ffff:127.0.0.1", 1, 0, 0))  # v4-mapped
    assert not default.allows(("192.0.2.1", 1))
    assert not default.allows(None) and not default.allows(("not-an-ip", 1))
    custom = DebugAccess(["192.0.2.0/24"])
    assert custom.allows(("192.0.2.7", 1)) and not custom.allows(("127.0.0.1", 1))


def test_collector_exports_unknown_fields_generically() -> None:
    stats = ServerStats()
    m = DerpMetrics(stats)
    m.gauges["broken"] = lambda: 1 / 0  # a failing callback is skipped, not fatal
    s = _samples(m.render().decode())
    assert ("derp_unknown_frames_total", ()) in s
    assert ("derp_broken", ()) not in s


async def test_metrics_after_traffic_counts_packets(server: DerpServer, connect: ClientFactory) -> None:
    a = await connect()
    b = await connect()
    a.send(encode_send_packet(b.pub, b"1") * 10)
    for _ in range(10):
        await b.recv_packet()
    s = _samples(server.metrics.render().decode())
    assert s[("derp_packets_received_total", ())] == 10


async def test_stun_and_mesh_figures_reach_the_relay_metrics() -> None:
    """A STUN server built with the relay's counters shows up in its exposition,
    and a mesh registers the ``derp_current_mesh_peers`` gauge."""
    from derp.keys import PrivateKey
    from derp.mesh import Mesh, parse_mesh_with
    from derp.server import DerpServer, ServerConfig
    from derp.stunserver import StunServer, stun_request

    srv = DerpServer(ServerConfig(private_key=PrivateKey.generate(), mesh_key=bytes(range(1, 33))))
    await srv.start("127.0.0.1", 0)
    stun = StunServer(stats=srv.metrics.stun)
    await stun.start("127.0.0.1", 0)
    mesh = Mesh(srv, parse_mesh_with("http://127.0.0.1:9", "http"), retry_interval=60.0)
    try:
        await stun_request("127.0.0.1", stun.port, timeout=5.0)
        mesh.start()
        text = srv.metrics.render().decode()
        assert 'derp_stun_requests_total{disposition="success"} 1.0' in text
        assert 'derp_stun_addrfamily_total{family="ipv4"} 1.0' in text
        assert "derp_current_mesh_peers 0.0" in text
    finally:
        await mesh.stop()
        await stun.stop()
        await srv.stop()
