"""Event-loop stall monitor and its debug endpoint."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request

import pytest

from tailnet.loopmon import LoopMonitor
from tailnet.stack import TailnetStack

T = 10.0


async def next_sample(mon: LoopMonitor) -> None:
    n = mon.stats().samples
    loop = asyncio.get_running_loop()
    deadline = loop.time() + T
    while mon.stats().samples <= n:
        assert loop.time() < deadline, "monitor did not tick"
        await asyncio.sleep(mon.interval / 2)


async def test_a_blocked_loop_is_measured_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    mon = LoopMonitor(interval=0.02, warn_after=0.2)
    mon.start()
    try:
        await next_sample(mon)
        assert mon.stats().max_stall < 0.2
        with caplog.at_level("WARNING", logger="tailnet.loopmon"):
            time.sleep(0.3)  # the stall under test: the loop is blocked on purpose
            await next_sample(mon)
        st = mon.stats(reset=True)
        assert st.max_stall >= 0.25 and st.over_50ms >= 1 and st.over_250ms >= 1
        assert "event loop blocked for" in caplog.text
        assert mon.stats().max_stall == 0.0 and mon.stats().samples == 0  # new window
    finally:
        mon.stop()


def _get(url: str, token: str) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers={"Coder-Session-Token": token})
    try:
        with urllib.request.urlopen(req, timeout=T) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


async def test_debug_loop_endpoint_is_owner_only(stack: TailnetStack) -> None:
    url = stack.access_url + "/api/v2/debug/loop"
    status, body = await asyncio.to_thread(_get, url + "?reset=1", stack.admin_token)
    assert status == 200
    doc = json.loads(body)
    assert set(doc) == {"window_s", "samples", "max_stall_ms", "stalls_over_50ms",
                        "stalls_over_250ms"}
    _, user_token = stack.create_user()
    status, _ = await asyncio.to_thread(_get, url, user_token)
    assert status == 403
