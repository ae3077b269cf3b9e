"""DERP map JSON <-> proto, change detection and the static source."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tailnet.derpmap import (
    StaticDERPMapSource,
    derp_map_from_json,
    derp_map_to_json,
    derp_maps_equal,
    embedded_region,
    new_derp_map,
    validate_derp_map,
)
from tailnet.v2 import tailnet_pb2 as pb

# What Coder's /api/v2/debug/health shows (issue #9337), plus extra fields.
CODER_JSON = """
{"HomeParams": {"RegionScore": {"999": 0.8}},
 "Regions": {"999": {"EmbeddedRelay": true, "RegionID": 999, "RegionCode": "coder",
                     "RegionName": "Coder Embedded Relay",
                     "Nodes": [{"Name": "999b", "RegionID": 999, "HostName": "coder.example.com",
                                "STUNPort": -1, "DERPPort": 443}]},
             "1000": {"EmbeddedRelay": false, "RegionID": 1000, "RegionCode": "coder_stun_1000",
                      "RegionName": "STUN", "Avoid": true,
                      "Nodes": [{"Name": "1000s", "RegionID": 1000, "HostName": "",
                                 "IPv4": "192.0.2.1", "STUNPort": 3478, "STUNOnly": true,
                                 "CanPort80": true, "ForceHTTP": true, "CertName": "c",
                                 "IPv6": "2001:db8::1", "InsecureForTests": true,
                                 "STUNTestIP": "192.0.2.9"}]}},
 "omitDefaultRegions": true}
"""


def test_parse_coder_json_and_render_back() -> None:
    m = derp_map_from_json(json.loads(CODER_JSON))
    assert dict(m.home_params.region_score) == {999: 0.8}
    r = m.regions[999]
    assert r.embedded_relay and r.region_code == "coder"
    n = r.nodes[0]
    assert (n.name, n.host_name, n.stun_port, n.derp_port) == ("999b", "coder.example.com", -1, 443)
    s = m.regions[1000].nodes[0]
    assert s.stun_only and s.can_port_80 and s.force_http and s.insecure_for_tests
    assert m.regions[1000].avoid
    out = derp_map_to_json(m)
    assert out["Regions"]["999"] == json.loads(CODER_JSON)["Regions"]["999"]
    assert out["Regions"]["1000"] == json.loads(CODER_JSON)["Regions"]["1000"]
    assert out["HomeParams"] == {"RegionScore": {"999": 0.8}}
    assert "omitDefaultRegions" not in out  # no proto field


def test_camel_case_keys_accepted() -> None:
    camel = {
        "homeParams": {"regionScore": {"1": 1.5}},
        "regions": {"1": {"embeddedRelay": False, "regionID": 1, "regionCode": "x",
                          "regionName": "X", "nodes": [{"name": "1a", "regionID": 1,
                                                        "hostName": "h", "stunport": 5,
                                                        "derpport": 6, "canPort80": True}]}},
    }
    m = derp_map_from_json(camel)
    node = m.regions[1].nodes[0]
    assert (node.host_name, node.stun_port, node.derp_port, node.can_port_80) == ("h", 5, 6, True)
    assert m.home_params.region_score[1] == 1.5


@pytest.mark.parametrize(
    ("doc", "where"),
    [
        ({"Regions": []}, "Regions"),
        ({"Regions": {"x": {}}}, "region key"),
        ({"Regions": {"1": {"RegionID": "1"}}}, "Regions[1].RegionID"),
        ({"Regions": {"1": {"Nodes": [{"STUNPort": 2**40}]}}}, "STUNPort"),
        ({"Regions": {"1": {"Nodes": [{"STUNOnly": 1}]}}}, "STUNOnly"),
        ({"HomeParams": {"RegionScore": {"1": "a"}}}, "RegionScore"),
    ],
)
def test_malformed_json_names_the_field(doc: dict[str, Any], where: str) -> None:
    with pytest.raises(ValueError, match=where.replace("[", r"\[").replace("]", r"\]")):
        derp_map_from_json(doc)


def test_home_params_always_present() -> None:
    m = derp_map_from_json({})
    assert m.HasField("home_params")
    assert derp_map_to_json(pb.DERPMap()) == {"HomeParams": {}, "Regions": {}}


def _base() -> pb.DERPMap:
    region = embedded_region("example.com", 443)
    region.nodes.add(name="999c", region_id=999, host_name="b.example.com")
    return new_derp_map(region)


def test_equality_rules() -> None:
    a = _base()
    b = _base()
    # Node order does not matter; a missing home_params equals an empty one.
    nodes = list(b.regions[999].nodes)
    del b.regions[999].nodes[:]
    b.regions[999].nodes.extend(reversed(nodes))
    b.ClearField("home_params")
    assert derp_maps_equal(a, b)
    c = _base()
    c.home_params.region_score[999] = 0.5
    assert not derp_maps_equal(a, c)
    d = _base()
    d.regions[999].nodes[0].can_port_80 = True
    assert not derp_maps_equal(a, d)
    e = _base()
    e.regions[999].region_name = "other"
    assert not derp_maps_equal(a, e)


def test_embedded_region() -> None:
    r = embedded_region("127.0.0.1", 8080, scheme="http")
    assert r.region_id == 999 and r.embedded_relay and r.region_code == "coder"
    (n,) = r.nodes
    assert (n.name, n.host_name, n.derp_port, n.stun_port, n.force_http) == (
        "999b", "127.0.0.1", 8080, -1, True,
    )
    assert not embedded_region("h", 443, stun_port=3478).nodes[0].force_http
    validate_derp_map(new_derp_map(r))
    with pytest.raises(ValueError, match="no regions"):
        validate_derp_map(pb.DERPMap())
    stun = pb.DERPMap.Region(region_id=5)
    stun.nodes.add(name="s", stun_only=True)
    with pytest.raises(ValueError, match="non-STUN"):
        validate_derp_map(new_derp_map(stun))


async def test_static_source_wakes_watchers() -> None:
    src = StaticDERPMapSource(_base())
    v = src.version
    waiter = asyncio.ensure_future(src.wait_changed(v))
    await asyncio.sleep(0)
    assert not waiter.done()
    changed = _base()
    changed.home_params.region_score[1] = 2.0
    src.set(changed)
    assert await asyncio.wait_for(waiter, 10) == v + 1
    assert src.current().home_params.region_score[1] == 2.0
    assert await asyncio.wait_for(src.wait_changed(v), 10) == v + 1  # already changed


_text = st.text(alphabet="abcdefghijklmnop0123456789.-", max_size=12)
_node = st.builds(
    lambda name, host, stun, derp, flags, ip4: pb.DERPMap.Region.Node(
        name=name, host_name=host, stun_port=stun, derp_port=derp,
        stun_only=flags[0], insecure_for_tests=flags[1], force_http=flags[2],
        can_port_80=flags[3], ipv4=ip4, cert_name=host, stun_test_ip=ip4,
    ),
    _text, _text, st.integers(-1, 65535), st.integers(0, 65535),
    st.tuples(st.booleans(), st.booleans(), st.booleans(), st.booleans()), _text,
)


@st.composite
def _maps(draw: st.DrawFn) -> pb.DERPMap:
    m = pb.DERPMap()
    m.home_params.SetInParent()
    for rid in draw(st.sets(st.integers(1, 2**40), max_size=3)):
        region = m.regions[rid]
        region.region_id = rid
        region.region_code = draw(_text)
        region.region_name = draw(_text)
        region.embedded_relay = draw(st.booleans())
        region.avoid = draw(st.booleans())
        for n in draw(st.lists(_node, max_size=3)):
            region.nodes.append(n)
            region.nodes[-1].region_id = rid
        if draw(st.booleans()):
            m.home_params.region_score[rid] = draw(
                st.floats(0.01, 100, allow_nan=False, allow_infinity=False)
            )
    return m


@settings(max_examples=50)
@given(_maps())
def test_json_roundtrip_property(m: pb.DERPMap) -> None:
    doc = json.loads(json.dumps(derp_map_to_json(m)))
    back = derp_map_from_json(doc)
    assert back == m
    assert derp_maps_equal(back, m)


async def test_version_signal_coalesces_bursts_and_never_misses_a_change() -> None:
    """Watchers wake once per burst with the latest version; a change made before
    the wait started is returned at once."""
    import asyncio

    from tailnet.signal import VersionSignal

    sig = VersionSignal()
    waiter = asyncio.ensure_future(sig.wait_changed(0))
    await asyncio.sleep(0)  # let it park
    assert not waiter.done()
    sig.bump()
    sig.bump()
    assert await asyncio.wait_for(waiter, 5) == 2
    assert await asyncio.wait_for(sig.wait_changed(1), 5) == 2  # already changed


async def test_static_source_add_and_remove_waiter() -> None:
    src = StaticDERPMapSource(_base())
    loop = asyncio.get_running_loop()
    kept: asyncio.Future[None] = loop.create_future()
    removed: asyncio.Future[None] = loop.create_future()
    src.add_waiter(kept)
    src.add_waiter(removed)
    src.remove_waiter(removed)
    src.remove_waiter(removed)  # idempotent
    src.set(_base())
    assert kept.done() and not removed.done()


async def test_stream_derp_maps_share_one_map_and_wait_without_tasks() -> None:
    """Every StreamDERPMaps stream waits on one future (no task of its own), gets
    the same map object per version, and ends when the service closes."""
    import uuid

    from tailnet.core import Coordinator
    from tailnet.identity import Principal, StaticTokenAuthenticator
    from tailnet.service import CallContext, TailnetService

    src = StaticDERPMapSource(_base())
    svc = TailnetService(
        coordinator=Coordinator(), authenticator=StaticTokenAuthenticator({}), derp_maps=src
    )
    call = CallContext(Principal("user", uuid.uuid4(), "u"), (2, 3), {})
    streams = [svc.stream_derp_maps(call) for _ in range(3)]
    first = [await anext(s) for s in streams]
    assert first[0] is first[1] is first[2]
    assert first[0].HasField("home_params")
    tasks_before = len(asyncio.all_tasks())
    pending = [asyncio.ensure_future(anext(s)) for s in streams]
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    # only the three consumers: the streams themselves start no tasks to wait
    assert len(asyncio.all_tasks()) == tasks_before + 3
    src.set(_base())  # a version bump with an equal map: nothing is sent
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert not any(p.done() for p in pending)
    changed = _base()
    changed.home_params.region_score[1] = 3.0
    src.set(changed)
    second = await asyncio.wait_for(asyncio.gather(*pending), 10)
    assert second[0] is second[1] is second[2]
    assert second[0].home_params.region_score[1] == 3.0
    pending = [asyncio.ensure_future(anext(s)) for s in streams]
    await asyncio.sleep(0)
    svc.close()
    for p in pending:
        with pytest.raises(StopAsyncIteration):
            await asyncio.wait_for(p, 10)
