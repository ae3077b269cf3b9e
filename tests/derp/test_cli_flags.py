"""derper's flag syntax (Go ``flag`` style), --version, --http-port (derp.port80),
and the relay dashboard's building blocks (derp.dashboard)."""

from __future__ import annotations

import asyncio
import json

import pytest

from derp.cli import build_parser, go_style_args, main
from derp.dashboard import EventFeed, RelayDashboard, SseStart, tcp_byte_counters
from derp.keys import PrivateKey
from derp.metrics import DebugAccess
from derp.port80 import Port80Server
from derp.server import DerpServer, ServerConfig


def _parse(*argv: str) -> dict[str, object]:
    p = build_parser()
    return vars(p.parse_args(go_style_args(list(argv), p)))


@pytest.mark.parametrize(
    ("argv", "want"),
    [
        (["-dev"], {"dev": True}),
        (["--dev"], {"dev": True}),
        (["-dev=true"], {"dev": True}),
        (["-dev=false"], {"dev": False}),
        (["-a=:8443"], {"addr": ":8443"}),
        (["-a", "127.0.0.1:0"], {"addr": "127.0.0.1:0"}),
        (["-c=/tmp/k.json"], {"config": "/tmp/k.json"}),
        (["-hostname=derp.example.com"], {"hostname": "derp.example.com"}),
        (["-hostname", "derp.example.com"], {"hostname": "derp.example.com"}),
        (["-certmode=manual", "-certdir=/etc/d"], {"certmode": "manual", "certdir": "/etc/d"}),
        (["-stun-port=-1"], {"stun_port": -1}),
        (["-stun-port", "-1"], {"stun_port": -1}),
        (["-stun=false"], {"stun": False}),
        (["-mesh-with=a.example,b.example"], {"mesh_with": "a.example,b.example"}),
        (["-mesh-psk-file", "/k"], {"mesh_psk_file": "/k"}),
        (["-verify-client-url=http://127.0.0.1:9/x"], {"verify_client_url": "http://127.0.0.1:9/x"}),
        (["-verify-client-url-fail-open=false"], {"verify_client_url_fail_open": False}),
        (["-accept-connection-limit=50", "-accept-connection-burst=10"],
         {"accept_connection_limit": 50.0, "accept_connection_burst": 10}),
        (["-tcp-write-timeout=5s"], {"tcp_write_timeout": "5s"}),
        (["-rate-config=/r.json"], {"rate_config": "/r.json"}),
        (["-http-port=-1"], {"http_port": -1}),
        (["--http-port", "8080"], {"http_port": 8080}),
        (["-derp=false"], {"derp": False}),
        (["-version"], {"version": True}),
        (["-v"], {"verbose": True}),
        (["-tcp-user-timeout=15s", "-home=blank"], {"tcp_user_timeout": "15s", "home": "blank"}),
        ([], {"worker_link_hold": 1.0}),
        (["--worker-link-hold=0"], {"worker_link_hold": 0.0}),
    ],
)
def test_go_style_flags(argv: list[str], want: dict[str, object]) -> None:
    got = _parse(*argv)
    for k, v in want.items():
        assert got[k] == v, (argv, k, got[k])


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-version"]) == 0
    assert capsys.readouterr().out.startswith("derper (tailnet-core) ")
    assert main(["--version"]) == 0


def test_unsupported_derper_flags_fail_by_name(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-dev", "-verify-clients"]) == 1
    assert "-verify-clients: needs a local tailscaled" in capsys.readouterr().err
    assert main(["-dev", "-secrets-url=https://s"]) == 1
    assert "-secrets-url" in capsys.readouterr().err
    assert main(["-dev", "-derp=false", "-stun=false"]) == 1
    assert "nothing to serve" in capsys.readouterr().err
    assert main(["-dev", "-http-port=70000"]) == 1
    assert "-http-port 70000" in capsys.readouterr().err
    assert main(["-dev", "--worker-link-hold=500"]) == 1
    assert "--worker-link-hold 500: must be 0..100 ms" in capsys.readouterr().err


async def _get(port: int, path: str, headers: str = "") -> bytes:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n{headers}\r\n".encode())
    data = await asyncio.wait_for(r.read(), 10)
    w.close()
    return data


async def test_port80_listener() -> None:
    calls: list[str] = []

    def debug(path: str, remote: object) -> tuple[int, bytes, str]:
        calls.append(path)
        return 200, b"derp_x 1\n", "text/plain"

    srv = Port80Server(hostname="derp.example.com", tls_port=8443, debug=debug)
    await srv.start("127.0.0.1", 0)
    try:
        resp = await _get(srv.port, "/generate_204", "X-Tailscale-Challenge: ts_abc\r\n")
        assert resp.startswith(b"HTTP/1.1 204")
        assert b"X-Tailscale-Response: response ts_abc" in resp
        resp = await _get(srv.port, "/metrics")
        assert resp.startswith(b"HTTP/1.1 200") and resp.endswith(b"derp_x 1\n")
        assert calls == ["/metrics"]
        resp = await _get(srv.port, "/derp?x=1")
        assert resp.startswith(b"HTTP/1.1 302")
        assert b"Location: https://derp.example.com:8443/derp?x=1" in resp
    finally:
        await srv.stop()


async def test_event_feed_ticks_only_while_subscribed() -> None:
    built: list[int] = []

    def build() -> bytes:
        built.append(1)
        return b"event: snapshot\ndata: {}\n\n"

    idle: list[bool] = []
    feed = EventFeed(build, interval=0.05, on_idle=lambda: idle.append(True))
    got: list[bytes] = []
    unsubscribe = feed.subscribe(lambda b: got.append(b) is None)
    async with asyncio.timeout(5):
        while len(got) < 3:
            await asyncio.sleep(0.01)
    unsubscribe()
    assert feed.subscribers == 0 and idle == [True]
    n = len(built)
    await asyncio.sleep(0.2)
    assert len(built) == n  # no subscriber, no sampling
    # A subscriber that says False is dropped; close() ends the others with b"".
    feed.subscribe(lambda b: False)
    ends: list[bytes] = []
    feed.subscribe(lambda b: ends.append(b) is None)
    async with asyncio.timeout(5):
        while feed.subscribers != 1:
            await asyncio.sleep(0.01)
    feed.close()
    assert ends[-1] == b"" and feed.subscribers == 0


async def test_relay_dashboard_access_and_snapshot() -> None:
    server = DerpServer(ServerConfig(private_key=PrivateKey.generate()))
    await server.start("127.0.0.1", 0)
    try:
        dash = RelayDashboard(server, DebugAccess(["10.0.0.0/8"]))
        status, body, _, _ = dash.respond("/dashboard", ("127.0.0.1", 1))  # type: ignore[misc]
        assert status == 403
        answer = dash.respond("/dashboard/static/dashboard.js", ("192.0.2.1", 1))
        assert isinstance(answer, tuple) and answer[0] == 200
        assert isinstance(dash.respond("/dashboard/events", ("10.1.2.3", 5)), SseStart)
        answer = dash.respond("/dashboard/snapshot", ("10.1.2.3", 5))
        assert isinstance(answer, tuple)
        snap = json.loads(answer[1])
        assert snap["relay"]["key"] == str(server.public_key)
        assert set(snap["relay"]["drops"]) >= {"unknown_dest", "queue_head", "write_error"}
        assert "coordinator" not in snap
    finally:
        await server.stop()


async def test_tcp_byte_counters_from_the_kernel() -> None:
    got: list[asyncio.BaseTransport] = []

    class P(asyncio.Protocol):
        def connection_made(self, t: asyncio.BaseTransport) -> None:
            got.append(t)

    srv = await asyncio.get_running_loop().create_server(P, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(b"x" * 5000)
    await w.drain()
    async with asyncio.timeout(5):
        while not got or (c := tcp_byte_counters(got[0])) is None or c[1] < 5000:
            await asyncio.sleep(0.01)
    counters = tcp_byte_counters(got[0])
    assert counters is not None and counters[1] == 5000
    assert tcp_byte_counters(object()) is None
    w.close()
    srv.close()
