"""Health report: pure severity rules and a live run with one healthy and one unreachable region."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import pytest

from tailnet.config import StackConfig
from tailnet.derpmap import StaticDERPMapSource, embedded_region, new_derp_map
from tailnet.health import (
    CODE_DERP_NODE_UNHEALTHY,
    HealthChecker,
    NodeCheck,
    derp_report,
    node_report,
    region_report,
)
from tailnet.stack import TailnetStack
from tailnet.v2 import tailnet_pb2 as pb


def _node(name: str, region: int = 1, stun_only: bool = False) -> pb.DERPMap.Region.Node:
    return pb.DERPMap.Region.Node(name=name, region_id=region, host_name="h", stun_port=-1,
                                  stun_only=stun_only)


def _region(rid: int, *names: str) -> pb.DERPMap.Region:
    r = pb.DERPMap.Region(region_id=rid, region_code=f"r{rid}")
    r.nodes.extend(_node(n, rid) for n in names)
    return r


def test_node_severity() -> None:
    ok = node_report(NodeCheck(_node("a"), can_exchange_messages=True, round_trip_ping=0.0015))
    assert (ok["severity"], ok["healthy"], ok["round_trip_ping_ms"]) == ("ok", True, 2)
    assert ok["round_trip_ping"] == "1.5ms"
    bad = node_report(NodeCheck(_node("a"), error="refused"))
    assert (bad["severity"], bad["healthy"], bad["error"]) == ("error", False, "refused")
    stun_bad = node_report(NodeCheck(_node("a"), can_exchange_messages=True, stun_enabled=True,
                                     stun_error="timeout"))
    assert stun_bad["severity"] == "warning" and stun_bad["warnings"][0]["code"] == "ESTUN01"


def test_region_and_derp_severity() -> None:
    good = node_report(NodeCheck(_node("a"), can_exchange_messages=True, round_trip_ping=0.001))
    bad = node_report(NodeCheck(_node("b"), error="x"))
    assert region_report(_region(1, "a"), [good])["severity"] == "ok"
    partial = region_report(_region(1, "a", "b"), [good, bad])
    assert partial["severity"] == "warning" and partial["healthy"]
    assert [w["code"] for w in partial["warnings"]] == [CODE_DERP_NODE_UNHEALTHY]
    dead = region_report(_region(2, "b"), [bad])
    assert dead["severity"] == "error" and not dead["healthy"]
    assert derp_report({1: region_report(_region(1, "a"), [good])})["severity"] == "ok"
    mixed = derp_report({1: region_report(_region(1, "a"), [good]), 2: dead})
    assert mixed["severity"] == "warning" and mixed["healthy"]
    assert "2" in mixed["warnings"][-1]["message"]
    assert derp_report({2: dead})["severity"] == "error"
    assert derp_report({})["severity"] == "error"


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens here any more
    return port


@pytest.fixture
async def stack() -> AsyncIterator[TailnetStack]:
    s = TailnetStack(StackConfig(http_addr="127.0.0.1:0", grpc_addr=None, stun_addr="127.0.0.1:0",
                                 health_timeout=3.0))
    await s.start()
    try:
        yield s
    finally:
        await s.stop()


async def test_one_healthy_one_unreachable_region(stack: TailnetStack) -> None:
    src = stack.derp_maps
    assert isinstance(src, StaticDERPMapSource)
    dead_port = _closed_port()
    src.set(new_derp_map(
        src.current().regions[999],
        embedded_region("127.0.0.1", dead_port, region_id=2, scheme="http", region_code="dead"),
    ))
    assert stack.health is not None
    report = await stack.health.report(force=True)
    derp = report["derp"]
    r999, r2 = derp["regions"]["999"], derp["regions"]["2"]
    assert (r999["severity"], r999["healthy"]) == ("ok", True)
    node = r999["node_reports"][0]
    assert node["can_exchange_messages"] is True
    assert node["round_trip_ping"] and node["round_trip_ping_ms"] >= 0
    assert node["stun"] == {"Enabled": True, "CanSTUN": True, "Error": None}
    assert (r2["severity"], r2["healthy"]) == ("error", False)
    dead_node = r2["node_reports"][0]
    assert dead_node["can_exchange_messages"] is False
    assert str(dead_port) in dead_node["error"]
    assert derp["severity"] == "warning"
    assert any(w["code"] == "EDERP02" for w in derp["warnings"])
    assert report["severity"] == "warning"
    assert report["access_url"]["healthy"] and report["access_url"]["status_code"] == 200
    assert report["websocket"]["healthy"] and report["websocket"]["code"] == 101
    assert report["time"].endswith("Z")


async def test_health_endpoint_caches_and_force_reruns(stack: TailnetStack) -> None:
    import asyncio
    import json
    import urllib.request

    def get(query: str) -> dict[str, object]:
        req = urllib.request.Request(
            stack.access_url + "/api/v2/debug/health" + query,
            headers={"Coder-Session-Token": stack.admin_token},
        )
        with urllib.request.urlopen(req, timeout=20) as resp:
            doc: dict[str, object] = json.loads(resp.read())
            return doc

    first = await asyncio.to_thread(get, "")
    assert first["severity"] == "ok" and first["healthy"] is True
    cached = await asyncio.to_thread(get, "")
    assert cached["time"] == first["time"]
    forced = await asyncio.to_thread(get, "?force=true")
    assert forced["time"] != first["time"]


async def test_all_regions_down_is_error() -> None:
    src = StaticDERPMapSource(new_derp_map(
        embedded_region("127.0.0.1", _closed_port(), region_id=5, scheme="http")))
    report = await HealthChecker(src, timeout=3.0).report()
    assert report["derp"]["severity"] == "error"
    assert report["severity"] == "error" and report["healthy"] is False


# ----------------------------------------------------------------------------- database


async def test_database_section_ok_slow_and_unreachable() -> None:
    from tailnet.health import check_database

    async def fast(timeout: float) -> float:
        return 0.002

    async def slow(timeout: float) -> float:
        return 0.020

    async def down(timeout: float) -> float:
        raise ConnectionRefusedError(111, "Connection refused")

    async def silent(timeout: float) -> float:
        await asyncio.Event().wait()
        return 0.0

    ok = await check_database(fast)
    assert ok["severity"] == "ok" and ok["healthy"] and ok["reachable"]
    assert ok["latency"] == "2ms" and ok["latency_ms"] == 2 and ok["threshold_ms"] == 15
    assert ok["error"] is None and ok["warnings"] == []
    warn = await check_database(slow)
    assert warn["severity"] == "warning" and warn["healthy"] and warn["latency_ms"] == 20
    assert warn["warnings"][0]["code"] == "EDB02"
    bad = await check_database(down)
    assert bad["severity"] == "error" and not bad["healthy"] and not bad["reachable"]
    assert "Connection refused" in bad["error"] and bad["warnings"][0]["code"] == "EDB01"
    hung = await asyncio.wait_for(check_database(silent, timeout=0.2), 5)
    assert hung["severity"] == "error" and "no answer within 0.2s" in hung["error"]
