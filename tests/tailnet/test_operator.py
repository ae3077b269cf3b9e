"""Operator pages of the stack over plain HTTP: landing page, login/logout cookie,
dashboard access, the server-sent event feed, /metrics and /debug/, health sections,
and the per-connection log lines."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import AsyncIterator

import h11
import pytest

from tailnet.client import AgentConnection, ConnectionOptions
from tailnet.config import StackConfig
from tailnet.stack import TailnetStack

pytestmark = pytest.mark.timeout(60)
T = 10.0


async def http(
    base: str,
    method: str,
    path: str,
    *,
    headers: dict[str, str] | None = None,
    body: bytes = b"",
) -> tuple[int, dict[str, str], bytes]:
    """One request on its own connection; ``(status, headers (lower-case), body)``."""
    hostport = base.split("://", 1)[1]
    host, port = hostport.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    conn = h11.Connection(h11.CLIENT)
    hdrs = [("Host", hostport), ("Connection", "close"), *(headers or {}).items()]
    if body:
        hdrs.append(("Content-Length", str(len(body))))
    writer.write(conn.send(h11.Request(method=method, target=path, headers=hdrs)) or b"")
    if body:
        writer.write(conn.send(h11.Data(data=body)) or b"")
    writer.write(conn.send(h11.EndOfMessage()) or b"")
    status, out_headers, data = 0, {}, b""
    try:
        async with asyncio.timeout(T):
            while True:
                ev = conn.next_event()
                if ev is h11.NEED_DATA:
                    conn.receive_data(await reader.read(65536))
                    continue
                if isinstance(ev, h11.Response):
                    status = ev.status_code
                    out_headers = {k.decode().lower(): v.decode() for k, v in ev.headers}
                elif isinstance(ev, h11.Data):
                    data += ev.data
                elif isinstance(ev, (h11.EndOfMessage, h11.ConnectionClosed)):
                    break
    finally:
        writer.close()
    return status, out_headers, data


def _form(**fields: str) -> tuple[dict[str, str], bytes]:
    import urllib.parse

    return (
        {"Content-Type": "application/x-www-form-urlencoded"},
        urllib.parse.urlencode(fields).encode(),
    )


async def test_landing_and_docs(stack: TailnetStack) -> None:
    status, headers, body = await http(stack.access_url, "GET", "/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    for link in ("/dashboard", "/api/v2/debug/health", "/metrics", "/docs"):
        assert f'href="{link}"'.encode() in body
    assert "default-src 'self'" in headers["content-security-policy"]
    status, _, body = await http(stack.access_url, "GET", "/docs")
    assert status == 200 and b"/api/v2/workspaceagents/me/rpc" in body
    # The coordinator page is readable in a browser (cookie) and styled from the package.
    status, _, body = await http(
        stack.access_url, "GET", "/api/v2/debug/coordinator",
        headers={"Cookie": f"coder_session_token={stack.admin_token}"},
    )
    assert status == 200 and b"/dashboard/static/dashboard.css" in body and b"Node key" in body


async def test_login_sets_httponly_strict_cookie_and_logout_clears_it(stack: TailnetStack) -> None:
    base = stack.access_url
    status, headers, _ = await http(base, "GET", "/dashboard")
    assert status == 303 and headers["location"] == "/login?next=/dashboard"
    status, _, body = await http(base, "GET", "/login?next=/dashboard")
    assert status == 200 and b'name="token"' in body

    h, b = _form(token="nope", next="/dashboard")
    status, headers, body = await http(base, "POST", "/login", headers=h, body=b)
    assert status == 401 and b"Unknown token" in body and "set-cookie" not in headers
    _, user_token = stack.create_user()
    h, b = _form(token=user_token)
    status, headers, body = await http(base, "POST", "/login", headers=h, body=b)
    assert status == 403 and b"not an admin" in body and "set-cookie" not in headers

    # Another origin may not log the browser in (login CSRF).
    h, b = _form(token=stack.admin_token)
    h["Origin"] = "http://evil.example"
    status, headers, _ = await http(base, "POST", "/login", headers=h, body=b)
    assert status == 403 and "set-cookie" not in headers

    # An open redirect is not possible: next= must be a local path.
    h, b = _form(token=stack.admin_token, next="//evil.example/x")
    status, headers, _ = await http(base, "POST", "/login", headers=h, body=b)
    assert status == 303 and headers["location"] == "/dashboard"
    cookie = headers["set-cookie"]
    parts = [p.strip() for p in cookie.split(";")]
    assert parts[0] == f"coder_session_token={stack.admin_token}"
    assert {"HttpOnly", "SameSite=Strict", "Path=/"} <= set(parts)
    assert "Secure" not in parts  # plain-http access URL

    # The cookie opens the dashboard and its feed.
    jar = {"Cookie": f"coder_session_token={stack.admin_token}"}
    status, headers, body = await http(base, "GET", "/dashboard", headers=jar)
    assert status == 200 and b"/dashboard/static/dashboard.js" in body
    assert "script-src 'self'" in headers["content-security-policy"]
    status, _, body = await http(base, "GET", "/dashboard/snapshot", headers=jar)
    assert status == 200 and json.loads(body)["coordinator"]["backend"] == "in-memory"

    status, headers, _ = await http(base, "POST", "/logout", headers=jar)
    assert status == 303 and headers["location"] == "/login"
    assert "Max-Age=0" in headers["set-cookie"] and "coder_session_token=;" in headers["set-cookie"]


async def test_dashboard_data_needs_an_admin(stack: TailnetStack) -> None:
    _, user_token = stack.create_user()
    for hdrs in ({}, {"Coder-Session-Token": user_token}):
        for path in ("/dashboard/events", "/dashboard/snapshot"):
            status, _, body = await http(stack.access_url, "GET", path, headers=hdrs)
            assert status == 401, (path, hdrs)
            assert "message" in json.loads(body)
    # The static assets are public (and come from the package).
    for name, ctype in (("dashboard.js", "text/javascript"), ("dashboard.css", "text/css"),
                        ("icon.svg", "image/svg+xml")):
        status, headers, body = await http(stack.access_url, "GET", f"/dashboard/static/{name}")
        assert status == 200 and headers["content-type"].startswith(ctype) and body
    status, _, _ = await http(stack.access_url, "GET", "/dashboard/static/../stack.py")
    assert status == 404


async def test_event_stream_ticks_and_detaches(stack: TailnetStack) -> None:
    pages = stack.pages
    assert pages is not None
    host, port = stack.access_url.split("://")[1].rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        f"GET /dashboard/events HTTP/1.1\r\nHost: {host}\r\n"
        f"Coder-Session-Token: {stack.admin_token}\r\n\r\n".encode()
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), T)
    assert head.startswith(b"HTTP/1.1 200") and b"text/event-stream" in head
    seen: list[str] = []
    buf = b""
    async with asyncio.timeout(T):
        while seen.count("snapshot") < 3:
            buf += await reader.read(65536)
            seen = re.findall(r"event: (\w+)", buf.decode("latin-1"))
    assert seen[0] == "history" and pages.feed.subscribers == 1
    last = buf.decode("latin-1").rsplit("data: ", 1)[1]
    snap = json.loads(last[: last.index("\n")] if "\n" in last else last.split("\r\n")[0])
    assert snap["relay"]["key"].startswith("nodekey:")
    assert snap["health"]["sections"]["coordinator"]["severity"] == "ok"
    writer.close()
    async with asyncio.timeout(T):
        while pages.feed.subscribers:
            await asyncio.sleep(0.05)  # the server notices the closed socket on its next write


async def test_metrics_and_debug_on_the_stack(stack: TailnetStack) -> None:
    creds = stack.create_agent()
    agent = AgentConnection(stack.access_url, creds.token, options=ConnectionOptions(version="2.3"))
    await agent.start(T)
    try:
        status, headers, body = await http(stack.access_url, "GET", "/metrics")
    finally:
        await agent.close()
    assert status == 200 and headers["content-type"].startswith("text/plain")
    text = body.decode()
    assert 'tailnet_coordinator_peers{kind="agent"} 1.0' in text
    for name in ("derp_packets_sent_total", "process_cpu_seconds_total",
                 "tailnet_coordinator_fanout_seconds_bucket", "tailnet_resume_tokens_issued_total",
                 "tailnet_authorization_denials_total", "derp_dup_client_conns_total"):
        assert name in text, name
    helps = re.findall(r"^# HELP (\S+) (.*)$", text, re.M)
    assert helps
    for name, doc in helps:
        assert doc and "ServerStats" not in doc and doc != name, (name, doc)
    for line in text.splitlines():
        if not line.startswith("#"):
            assert "_total_total" not in line, line
    for path in ("/debug/varz", "/debug/vars", "/debug/"):
        status, _, _ = await http(stack.access_url, "GET", path)
        assert status == 200, path


async def test_metrics_allow_list() -> None:
    s = TailnetStack(StackConfig(http_addr="127.0.0.1:0", grpc_addr=None, stun_addr=None,
                                 data_dir=None, debug_allow="10.0.0.0/8"))
    await s.start()
    try:
        for path in ("/metrics", "/debug/vars"):
            status, _, _ = await http(s.access_url, "GET", path)
            assert status == 403, path
    finally:
        await s.stop()


async def test_health_has_a_live_coordinator_section(stack: TailnetStack) -> None:
    assert stack.health is not None and stack.service is not None
    report = await stack.health.report(force=True)
    assert report["coordinator"]["severity"] == "ok" and report["coordinator"]["accepting_peers"]
    assert "database" not in report  # in-memory coordinator
    stack.service.coordinator.close()
    report = await stack.health.report()  # cached, but the coordinator is judged live
    assert report["coordinator"]["severity"] == "error"
    assert report["severity"] == "error" and report["healthy"] is False
    assert report["coordinator"]["warnings"][0]["code"] == "ECOORD01"


async def test_connection_log_lines(stack: TailnetStack, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    creds = stack.create_agent(name="logged-agent")
    agent = AgentConnection(stack.access_url, creds.token, options=ConnectionOptions(version="2.3"))
    await agent.start(T)
    await agent.close()
    status, _, _ = await http(stack.access_url, "GET", "/api/v2/workspaceagents/me/rpc",
                              headers={"Coder-Session-Token": "wrong-token"})
    assert status == 401
    async with asyncio.timeout(T):
        while not any("rpc connection closed" in r.getMessage() for r in caplog.records):
            await asyncio.sleep(0.05)  # the server logs when it notices the close
    lines = [r.getMessage() for r in caplog.records]
    opened = [m for m in lines if m.startswith("rpc connection open:")]
    assert len(opened) == 1
    line = opened[0]
    assert "/api/v2/workspaceagents/me/rpc" in line and f"agent {creds.agent_id}" in line
    assert f"peer {creds.agent_id}" in line and "from 127.0.0.1:" in line
    assert "logged-agent" in line
    failed = [r for r in caplog.records if r.getMessage().startswith("auth failed:")]
    assert failed and failed[0].levelno == logging.INFO
    assert "invalid or unknown session token" in failed[0].getMessage()
    for m in lines:
        assert creds.token not in m and "wrong-token" not in m and stack.admin_token not in m


@pytest.fixture
async def https_stack() -> AsyncIterator[TailnetStack]:
    s = TailnetStack(StackConfig(http_addr="127.0.0.1:0", grpc_addr=None, stun_addr=None,
                                 data_dir=None, access_url="https://tailnet.example.com"))
    await s.start()
    try:
        yield s
    finally:
        await s.stop()


async def test_cookie_is_secure_behind_https(https_stack: TailnetStack) -> None:
    host_url = f"http://127.0.0.1:{https_stack.http_port}"
    h, b = _form(token=https_stack.admin_token)
    status, headers, _ = await http(host_url, "POST", "/login", headers=h, body=b)
    assert status == 303 and "Secure" in [p.strip() for p in headers["set-cookie"].split(";")]
