"""DERP maps: JSON (Go ``tailcfg.DERPMap`` field names) <-> proto, comparison, sources.

JSON shape (spec §4.2). Output uses Go's PascalCase names::

    {"HomeParams": {"RegionScore": {"1": 0.5}},          # RegionScore omitted if empty
     "Regions": {"999": {"EmbeddedRelay": true, "RegionID": 999, "RegionCode": "coder",
                         "RegionName": "Coder Embedded Relay", "Avoid": false?,
                         "Nodes": [{"Name": "999b", "RegionID": 999, "HostName": "h",
                                    "STUNPort": -1, "DERPPort": 443, ...}]}}}

``Name``/``RegionID``/``HostName`` and ``EmbeddedRelay`` are always written;
the other fields only when non-zero (Go ``omitempty``). Input keys are matched
case-insensitively, as Go's decoder does, so camelCase (``regionID``,
``hostName``, ``stunport``…) is accepted too. ``omitDefaultRegions`` has no proto
field and is dropped.

Change detection (:func:`derp_maps_equal`) treats node order within a region as
irrelevant (nodes are matched by name) but, unlike Coder's CompareDERPMaps,
*does* compare ``HomeParams`` and ``CanPort80``. A missing ``home_params`` equals
an empty one, and every map we send has ``home_params`` populated
(:func:`with_home_params`) because Go clients dereference it unconditionally.

Sources: a :class:`DERPMapSource` has a ``current()`` map and a ``version``
counter; ``await wait_changed(v)`` returns the new version once it differs from
``v``; ``add_waiter(fut)``/``remove_waiter(fut)`` register a future resolved at
the next change (no task per watcher). :class:`StaticDERPMapSource` is the in-process implementation (call
``set()`` from the event loop thread).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any, Protocol

from tailnet.signal import VersionSignal
from tailnet.v2 import tailnet_pb2 as pb

__all__ = [
    "derp_map_to_json",
    "derp_map_from_json",
    "derp_maps_equal",
    "with_home_params",
    "validate_derp_map",
    "new_derp_map",
    "embedded_region",
    "DERPMapSource",
    "StaticDERPMapSource",
]

# (JSON name, proto field, kind) for DERP nodes; kind drives type checks.
_NODE_FIELDS: tuple[tuple[str, str, type], ...] = (
    ("Name", "name", str),
    ("RegionID", "region_id", int),
    ("HostName", "host_name", str),
    ("CertName", "cert_name", str),
    ("IPv4", "ipv4", str),
    ("IPv6", "ipv6", str),
    ("STUNPort", "stun_port", int),
    ("STUNOnly", "stun_only", bool),
    ("DERPPort", "derp_port", int),
    ("InsecureForTests", "insecure_for_tests", bool),
    ("ForceHTTP", "force_http", bool),
    ("STUNTestIP", "stun_test_ip", str),
    ("CanPort80", "can_port_80", bool),
)
_NODE_ALWAYS = frozenset({"Name", "RegionID", "HostName"})
_INT32_FIELDS = frozenset({"stun_port", "derp_port"})


def _lower_keys(d: Mapping[str, Any], where: str) -> dict[str, Any]:
    if not isinstance(d, Mapping):
        raise ValueError(f"{where}: expected a JSON object, got {type(d).__name__}")
    return {str(k).lower(): v for k, v in d.items()}


def _typed(value: Any, kind: type, where: str) -> Any:
    if kind is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where}: expected a boolean, got {value!r}")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ValueError(f"{where}: expected an integer, got {value!r}")
        return value
    if not isinstance(value, str):
        raise ValueError(f"{where}: expected a string, got {value!r}")
    return value


def _region_key(key: Any, where: str) -> int:
    try:
        return int(str(key), 10)
    except ValueError:
        raise ValueError(f"{where}: region key {key!r} is not an integer") from None


def derp_map_to_json(m: pb.DERPMap) -> dict[str, Any]:
    """Render ``m`` as Go's ``tailcfg.DERPMap`` JSON (PascalCase keys)."""
    home: dict[str, Any] = {}
    if m.home_params.region_score:
        home["RegionScore"] = {
            str(k): v for k, v in sorted(m.home_params.region_score.items())
        }
    regions: dict[str, Any] = {}
    for rid in sorted(m.regions):
        r = m.regions[rid]
        region: dict[str, Any] = {
            "EmbeddedRelay": r.embedded_relay,
            "RegionID": r.region_id,
            "RegionCode": r.region_code,
            "RegionName": r.region_name,
        }
        if r.avoid:
            region["Avoid"] = True
        nodes = []
        for n in r.nodes:
            node: dict[str, Any] = {}
            for jname, fname, _kind in _NODE_FIELDS:
                value = getattr(n, fname)
                if jname in _NODE_ALWAYS or value:
                    node[jname] = value
            nodes.append(node)
        region["Nodes"] = nodes
        regions[str(rid)] = region
    return {"HomeParams": home, "Regions": regions}


def derp_map_from_json(d: Mapping[str, Any]) -> pb.DERPMap:
    """Parse Go ``tailcfg.DERPMap`` JSON (any key casing) into a proto map.

    Raises ``ValueError`` naming the offending path on malformed input. The
    result always has ``home_params`` set.
    """
    top = _lower_keys(d, "DERPMap")
    out = pb.DERPMap()
    out.home_params.SetInParent()
    home = top.get("homeparams")
    if home is not None:
        hp = _lower_keys(home, "HomeParams")
        scores = hp.get("regionscore")
        if scores is not None:
            if not isinstance(scores, Mapping):
                raise ValueError("HomeParams.RegionScore: expected a JSON object")
            for k, v in scores.items():
                rid = _region_key(k, "HomeParams.RegionScore")
                if isinstance(v, bool) or not isinstance(v, (int, float)):
                    raise ValueError(f"HomeParams.RegionScore[{k}]: expected a number, got {v!r}")
                out.home_params.region_score[rid] = float(v)
    regions = top.get("regions")
    if regions is None:
        return out
    if not isinstance(regions, Mapping):
        raise ValueError("Regions: expected a JSON object")
    for key, raw in regions.items():
        rid = _region_key(key, "Regions")
        where = f"Regions[{key}]"
        r = _lower_keys(raw, where)
        region = out.regions[rid]
        region.region_id = _typed(r.get("regionid", rid), int, f"{where}.RegionID")
        region.embedded_relay = _typed(r.get("embeddedrelay", False), bool, f"{where}.EmbeddedRelay")
        region.region_code = _typed(r.get("regioncode", ""), str, f"{where}.RegionCode")
        region.region_name = _typed(r.get("regionname", ""), str, f"{where}.RegionName")
        region.avoid = _typed(r.get("avoid", False), bool, f"{where}.Avoid")
        nodes = r.get("nodes") or []
        if not isinstance(nodes, list):
            raise ValueError(f"{where}.Nodes: expected a JSON array")
        for i, raw_node in enumerate(nodes):
            nwhere = f"{where}.Nodes[{i}]"
            n = _lower_keys(raw_node, nwhere)
            node = region.nodes.add()
            for jname, fname, kind in _NODE_FIELDS:
                value = n.get(jname.lower())
                if value is None:
                    continue
                value = _typed(value, kind, f"{nwhere}.{jname}")
                if fname in _INT32_FIELDS and not -(2**31) <= value < 2**31:
                    raise ValueError(f"{nwhere}.{jname}: {value} out of range")
                setattr(node, fname, value)
    return out


def with_home_params(m: pb.DERPMap) -> pb.DERPMap:
    """A copy of ``m`` whose ``home_params`` is present (possibly empty)."""
    out = pb.DERPMap()
    out.CopyFrom(m)
    out.home_params.SetInParent()
    return out


def _normalized(m: pb.DERPMap) -> bytes:
    norm = with_home_params(m)
    for region in norm.regions.values():
        nodes = sorted(
            (pb.DERPMap.Region.Node.FromString(n.SerializeToString(deterministic=True))
             for n in region.nodes),
            key=lambda n: (n.name, n.SerializeToString(deterministic=True)),
        )
        del region.nodes[:]
        region.nodes.extend(nodes)
    return norm.SerializeToString(deterministic=True)


def derp_maps_equal(a: pb.DERPMap, b: pb.DERPMap) -> bool:
    """True if ``a`` and ``b`` describe the same map (node order ignored).

    Every field counts, including ``home_params`` and ``can_port_80``.
    """
    return _normalized(a) == _normalized(b)


def validate_derp_map(m: pb.DERPMap) -> None:
    """Reject maps a client could not use (Coder's startup checks).

    Raises ``ValueError`` if there are no regions, a region's key differs from
    its ``region_id``, or no node can relay (all STUN-only).
    """
    if not m.regions:
        raise ValueError("DERP map has no regions")
    relay = False
    for rid, region in m.regions.items():
        if region.region_id != rid:
            raise ValueError(f"region key {rid} differs from its region_id {region.region_id}")
        relay = relay or any(not n.stun_only for n in region.nodes)
    if not relay:
        raise ValueError("DERP map has no non-STUN-only node")


def new_derp_map(*regions: pb.DERPMap.Region) -> pb.DERPMap:
    """A map containing ``regions`` (keyed by their ids) and empty home_params."""
    out = pb.DERPMap()
    out.home_params.SetInParent()
    for r in regions:
        if r.region_id in out.regions:
            raise ValueError(f"duplicate region id {r.region_id}")
        out.regions[r.region_id].CopyFrom(r)
    return out


def embedded_region(
    host: str,
    port: int,
    *,
    region_id: int = 999,
    scheme: str = "https",
    stun_port: int = -1,
    region_code: str = "coder",
    region_name: str = "Coder Embedded Relay",
    insecure_for_tests: bool = False,
) -> pb.DERPMap.Region:
    """The control plane's own relay region (Coder's ``tailnet.NewDERPMap``).

    One node named ``"<region_id>b"``; ``EmbeddedRelay`` set; STUN disabled (-1)
    unless ``stun_port`` is given; ``ForceHTTP`` when ``scheme`` is ``"http"``.
    """
    if scheme not in ("http", "https"):
        raise ValueError(f"scheme must be http or https, not {scheme!r}")
    region = pb.DERPMap.Region(
        region_id=region_id,
        embedded_relay=True,
        region_code=region_code,
        region_name=region_name,
    )
    region.nodes.add(
        name=f"{region_id}b",
        region_id=region_id,
        host_name=host,
        derp_port=port,
        stun_port=stun_port,
        force_http=scheme == "http",
        insecure_for_tests=insecure_for_tests,
    )
    return region


class DERPMapSource(Protocol):
    """The current DERP map plus change notification.

    ``version`` increases whenever the map may have changed; consumers compare
    maps with :func:`derp_maps_equal` before pushing, so spurious bumps are
    harmless.
    """

    @property
    def version(self) -> int: ...

    def current(self) -> pb.DERPMap: ...

    async def wait_changed(self, last_version: int) -> int:
        """Return the current version as soon as it differs from ``last_version``."""
        ...

    def add_waiter(self, fut: asyncio.Future[None]) -> None:
        """Resolve ``fut`` (once) when ``version`` next changes; lets a watcher wait
        for a change and something else with one future, without a task."""
        ...

    def remove_waiter(self, fut: asyncio.Future[None]) -> None:
        """Forget ``fut`` (no-op if it was resolved or never added)."""
        ...


class StaticDERPMapSource:
    """A DERP map held in memory; :meth:`set` publishes a new one.

    Not thread-safe: call ``set`` on the event loop that runs the watchers.
    """

    def __init__(self, initial: pb.DERPMap) -> None:
        self._map = with_home_params(initial)
        self._signal = VersionSignal(1)

    @property
    def version(self) -> int:
        return self._signal.version

    def current(self) -> pb.DERPMap:
        return self._map

    def set(self, new_map: pb.DERPMap) -> None:
        """Replace the map, bump ``version`` and wake every watcher."""
        self._map = with_home_params(new_map)
        self._signal.bump()

    async def wait_changed(self, last_version: int) -> int:
        return await self._signal.wait_changed(last_version)

    def add_waiter(self, fut: asyncio.Future[None]) -> None:
        self._signal.add_waiter(fut)

    def remove_waiter(self, fut: asyncio.Future[None]) -> None:
        self._signal.remove_waiter(fut)
