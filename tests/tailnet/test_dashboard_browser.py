"""The live dashboard in a real browser (headless Chromium over CDP, tests/browser.py).

One stack, one browser: log in (a wrong token first), watch an agent and a client
appear when they coordinate, the packet counter rise while they relay through
DERP, the client go when it disconnects; then log out. Also derper's relay-only
variant, one process and two workers. Skipped, with the reason, only where no Chromium can be had.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator

import pytest

from derp.client import DerpClient
from derp.keys import PrivateKey
from derp.server import DerpServer, ServerConfig
from tailnet.auth import TAILSCALE_SERVICE_PREFIX, addr_from_uuid
from tailnet.client import AgentConnection, ClientConnection, ConnectionOptions
from tailnet.demo import make_node
from tailnet.stack import TailnetStack

from ..browser import Browser, find_chromium
from ..derp.conftest import make_config, start_host

pytestmark = pytest.mark.timeout(90)

_CHROMIUM, _WHY = find_chromium()
needs_browser = pytest.mark.skipif(_CHROMIUM is None, reason=_WHY)


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    b = await Browser.launch()
    try:
        yield b
    finally:
        await b.close()


async def _pump(a: DerpClient, dst: object, stop: asyncio.Event) -> None:
    """Keep sending small packets until stopped (the relay's counters rise)."""
    while not stop.is_set():
        for _ in range(20):
            await a.send(dst, b"p" * 64)  # type: ignore[arg-type]
        await asyncio.sleep(0.02)  # pacing, not synchronisation


async def _stop_pair(
    stop: asyncio.Event, tasks: list[asyncio.Task[None]], a: DerpClient, b: DerpClient
) -> None:
    """Stop the pump and the drain, close both clients."""
    stop.set()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await asyncio.gather(a.close(), b.close(), return_exceptions=True)


async def _drain(c: DerpClient) -> None:
    with contextlib.suppress(Exception):
        while True:
            await c.recv()


@needs_browser
async def test_dashboard_login_live_peers_traffic_logout(
    stack: TailnetStack, browser: Browser
) -> None:
    base = stack.access_url
    creds = stack.create_agent(name="dash-agent")
    _, user_token = stack.create_user(name="dash-user")

    # Not logged in: the dashboard sends the browser to the login page.
    await browser.goto(base + "/dashboard")
    assert await browser.eval("location.pathname") == "/login"
    assert await browser.eval("location.search") == "?next=/dashboard"

    # A wrong token shows the reason; a user (non-admin) token is refused too.
    for bad, reason in (("not-a-token", "Unknown token"), (user_token, "not an admin")):
        await browser.eval(
            f"document.getElementById('token').value = {json.dumps(bad)};"
            "document.getElementById('login').click(); true"
        )
        await browser.wait_for(
            f"(document.getElementById('login-error')?.textContent || '').includes({json.dumps(reason)})"
        )
    await browser.eval(
        f"document.getElementById('token').value = {json.dumps(stack.admin_token)};"
        "document.getElementById('login').click(); true"
    )
    await browser.wait_for("location.pathname === '/dashboard'")
    cookies = {c["name"]: c for c in await browser.cookies()}
    session = cookies["coder_session_token"]
    assert session["httpOnly"] is True and session["sameSite"] == "Strict"
    assert session["value"] == stack.admin_token
    assert "coder_session_token" not in await browser.eval("document.cookie")

    # Live: the page updates by itself, at least once a second.
    await browser.wait_for("document.getElementById('status').textContent === 'live'")
    n0 = int(await browser.eval("document.body.dataset.updates"))
    # The feed ticks every second: three more renders arrive well within 5 s.
    await browser.wait_for(f"Number(document.body.dataset.updates) >= {n0 + 3}", timeout=5.0)

    # An agent and a client coordinate (Coder's transport): both appear.
    agent_key, client_key = PrivateKey.generate(), PrivateKey.generate()
    opts = ConnectionOptions(version="2.3")
    agent_addr = addr_from_uuid(TAILSCALE_SERVICE_PREFIX, creds.agent_id)
    agent = AgentConnection(
        base, creds.token,
        node=make_node(agent_key, agent_addr, 999), options=opts,
    )
    client = ClientConnection(
        base, stack.admin_token, agent_id=creds.agent_id,
        node=make_node(client_key, addr_from_uuid(TAILSCALE_SERVICE_PREFIX, uuid.uuid4()), 999),
        options=opts,
    )
    stop = asyncio.Event()
    tasks: list[asyncio.Task[None]] = []
    da = DerpClient(stack.derp_url, agent_key)
    dc = DerpClient(stack.derp_url, client_key)
    try:
        await agent.start(10)
        client_peer = await client.start(10)
        agent_row = f"document.querySelector('#peers tr[data-peer-id=\"{creds.agent_id}\"]')"
        client_row = f"document.querySelector('#peers tr[data-peer-id=\"{client_peer}\"]')"
        text = await browser.wait_for(f"{agent_row}?.textContent")
        assert "dash-agent" in text and "agent" in text and "nodekey:" in text
        await browser.wait_for(f"{client_row}?.textContent")
        assert f"{agent_addr}/128" in await browser.eval(f"{agent_row}.textContent")
        await browser.wait_for(
            f"document.querySelector('#tunnels tr[data-dst=\"{creds.agent_id}\"]')?.textContent"
            ".includes('dash-agent')"
        )

        # They relay through DERP: the packet counter rises on the page.
        await asyncio.gather(da.connect(), dc.connect())
        tasks = [
            asyncio.ensure_future(_drain(dc)),
            asyncio.ensure_future(_pump(da, client_key.public, stop)),
        ]
        await browser.wait_for("Number(document.body.dataset.derpConnections) >= 2")
        p0 = int(await browser.wait_for("Number(document.body.dataset.packetsOut) > 0"))
        await browser.wait_for(f"Number(document.body.dataset.packetsOut) > {p0 + 100}")
        # The connection table names the agent's DERP connection after its peer.
        row = await browser.wait_for(
            "document.querySelector('#conns tr[data-key=\"nodekey:"
            f"{agent_key.public.raw.hex()}\"]')?.textContent"
        )
        assert "dash-agent" in row
        stop.set()

        # The client disconnects: its row goes, the agent's stays.
        await client.close()
        await browser.wait_for(f"!{client_row}")
        assert await browser.eval(f"!!{agent_row}")
    finally:
        stop.set()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(da.close(), dc.close(), client.close(), agent.close(),
                             return_exceptions=True)

    # Everything the page loaded came from the stack itself (no CDN, nothing else).
    assert browser.requests and all(u.startswith(base + "/") for u in browser.requests), (
        browser.requests
    )

    # Log out: the cookie is gone and the dashboard wants a login again.
    await browser.eval("document.getElementById('logout').click(); true")
    await browser.wait_for("location.pathname === '/login'")
    assert "coder_session_token" not in {c["name"] for c in await browser.cookies()}
    await browser.goto(base + "/dashboard")
    assert await browser.eval("location.pathname") == "/login"


@needs_browser
async def test_derper_relay_dashboard(browser: Browser) -> None:
    server = DerpServer(ServerConfig(private_key=PrivateKey.generate()))
    await server.start("127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.port}"
    a = DerpClient(url + "/derp", PrivateKey.generate())
    b = DerpClient(url + "/derp", PrivateKey.generate())
    stop = asyncio.Event()
    tasks: list[asyncio.Task[None]] = []
    try:
        await browser.goto(url + "/dashboard")
        await browser.wait_for("document.getElementById('status').textContent === 'live'")
        assert not await browser.eval("document.getElementById('peers')")  # relay only
        await asyncio.gather(a.connect(), b.connect())
        tasks = [asyncio.ensure_future(_drain(b)), asyncio.ensure_future(_pump(a, b.public_key, stop))]
        await browser.wait_for("Number(document.body.dataset.derpConnections) === 2")
        await browser.wait_for("Number(document.body.dataset.packetsOut) > 200")
        await browser.wait_for("document.querySelectorAll('#conns tbody tr[data-key]').length === 2")
        stop.set()
        await b.close()
        await browser.wait_for("Number(document.body.dataset.derpConnections) === 1")
    finally:
        await _stop_pair(stop, tasks, a, b)
        await server.stop()
    assert all(u.startswith(url + "/") for u in browser.requests), browser.requests



@needs_browser
async def test_derper_dashboard_with_two_workers(browser: Browser) -> None:
    """Two linked workers (as ``derper --workers 2`` runs them): the page on
    worker 0 shows host totals and one line per worker."""
    h = await start_host(make_config(), 2)
    url0 = f"http://127.0.0.1:{h.servers[0].port}"
    a = DerpClient(url0 + "/derp", PrivateKey.generate())
    b = DerpClient(f"http://127.0.0.1:{h.servers[1].port}/derp", PrivateKey.generate())
    stop = asyncio.Event()
    tasks: list[asyncio.Task[None]] = []
    try:
        await asyncio.gather(a.connect(), b.connect())
        await h.known(b.public_key.raw, 1)
        await browser.goto(url0 + "/dashboard")
        await browser.wait_for("document.getElementById('status').textContent === 'live'")
        tasks = [asyncio.ensure_future(_drain(b)), asyncio.ensure_future(_pump(a, b.public_key, stop))]
        await browser.wait_for("document.querySelectorAll('#workers tbody tr[data-worker]').length === 2")
        # host totals: a on worker 0, b on worker 1; a's packets cross to b
        await browser.wait_for("Number(document.body.dataset.derpConnections) === 2", timeout=15)
        await browser.wait_for("Number(document.body.dataset.packetsOut) > 200", timeout=15)
        assert "(this page)" in await browser.eval(
            "document.querySelector('#workers tbody tr[data-worker=\"0\"]').textContent"
        )
    finally:
        await _stop_pair(stop, tasks, a, b)
        await h.stop()
