"""Deployment health report (Coder's ``/api/v2/debug/health``): DERP, access URL, WebSocket.

Structure: pure report builders (:func:`node_report`, :func:`region_report`,
:func:`derp_report`, :func:`health_report`) turn check results into the JSON
Coder's ``healthsdk`` uses; the async checks (:func:`check_node`,
:func:`check_access_url`, :func:`check_websocket`) do the I/O;
:class:`HealthChecker` runs them all concurrently and caches the result.

DERP node check (per node of every region of the current DERP map):

1. unless STUN-only: two fresh :class:`~derp.client.DerpClient` log in to the
   node (``http`` when ``ForceHTTP`` is set, else ``https``; port ``DERPPort``
   or the scheme default); A sends a probe packet to B, B echoes it to A. The
   node ``can_exchange_messages`` iff the echo arrives; ``round_trip_ping`` is
   A's send → echo time (Go duration text) and ``round_trip_ping_ms`` the same
   in whole milliseconds;
2. STUN (``STUNPort`` ≥ 0; 0 means 3478): one Binding request over UDP
   (:func:`derp.stunserver.stun_request`); ``stun.CanSTUN`` iff it is answered.

Severity rules (``ok`` < ``warning`` < ``error``):

* node: error if it cannot exchange messages (or, STUN-only, cannot STUN);
  warning ``ESTUN01`` if STUN is enabled but fails on a relay node;
  warning ``EDERP01`` if it only works over WebSocket (never set here: we dial
  plain DERP);
* region: error if every node is unhealthy; warning ``EDERP02`` if some are;
  otherwise the worst node severity;
* derp section: error if every region is in error; if only some are, warning
  ``EDERP02`` naming them (clients use the other regions); otherwise the worst
  region severity;
* report: the worst section severity. ``healthy`` everywhere means
  ``severity != "error"`` (Coder keeps it for backward compatibility).

Two more sections when the stack provides them:

* ``database`` (Coder's ``DatabaseReport``, only with PostgreSQL): the median of
  :data:`DB_PINGS` ``SELECT 1`` round trips; ``reachable``, ``latency`` (Go
  duration text), ``latency_ms``, ``threshold_ms`` (15); error ``EDB01`` when
  the database does not answer within the timeout, warning ``EDB02`` when the
  median is at or above the threshold;
* ``coordinator``: evaluated live on *every* call, even when the rest comes
  from the cache, so the verdict turns to ``error`` the moment the coordinator
  refuses peers (closed, or a PostgreSQL replica that cannot write its
  heartbeat: ``ECOORD01``), with ``accepting_peers``, ``backend``, ``peers``.

Mesh (``derp.mesh``, when the embedded relay meshes: HA replicas or
``derp_mesh_with``): :func:`mesh_report` lists, per replica relay, its mesh
links (``up``/``down``, ``since``, ``error``) as that replica last reported
them, and warns (``EMESH01``) when a live replica is not meshed with another
live replica of its region, has no relay URL, or a static link is down. The
section sits in ``derp.mesh``; its warnings also count for the DERP section
(warning at most: clients on one replica still relay among themselves).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Final

import h11

from derp.client import DerpClient
from derp.events import PacketReceived
from derp.keys import PrivateKey
from derp.stunserver import stun_request
from tailnet import redact as _redact  # noqa: F401 - websockets' client header dump (token)
from tailnet.derpmap import DERPMapSource, derp_map_to_json
from tailnet.v2 import tailnet_pb2 as pb

__all__ = [
    "SEVERITY_OK",
    "SEVERITY_WARNING",
    "SEVERITY_ERROR",
    "CODE_DERP_WEBSOCKET",
    "CODE_DERP_NODE_UNHEALTHY",
    "CODE_STUN_FAILED",
    "CODE_DERP_MESH",
    "NodeCheck",
    "node_url",
    "node_report",
    "region_report",
    "derp_report",
    "mesh_report",
    "health_report",
    "check_node",
    "check_stun",
    "check_access_url",
    "check_websocket",
    "HealthChecker",
    "report_json",
    "CODE_DB_UNREACHABLE",
    "CODE_DB_SLOW",
    "CODE_COORDINATOR_REFUSING",
    "DB_THRESHOLD_MS",
    "check_database",
    "coordinator_section",
    "summarize",
]

SEVERITY_OK: Final = "ok"
SEVERITY_WARNING: Final = "warning"
SEVERITY_ERROR: Final = "error"
_RANK: Final = {SEVERITY_OK: 0, SEVERITY_WARNING: 1, SEVERITY_ERROR: 2}

CODE_DERP_WEBSOCKET: Final = "EDERP01"
CODE_DERP_NODE_UNHEALTHY: Final = "EDERP02"
CODE_STUN_FAILED: Final = "ESTUN01"
CODE_DB_UNREACHABLE: Final = "EDB01"
CODE_DB_SLOW: Final = "EDB02"
CODE_COORDINATOR_REFUSING: Final = "ECOORD01"
#: ``SELECT 1`` round trips per database check (the median is reported)
DB_PINGS: Final = 3
#: median database latency at or above which the section warns (Coder: 15 ms)
DB_THRESHOLD_MS: Final = 15
#: tailnet-core's own code (Coder has none for meshes): a replica relay is not meshed
CODE_DERP_MESH: Final = "EMESH01"


def _worst(severities: Iterable[str]) -> str:
    out = SEVERITY_OK
    for s in severities:
        if _RANK[s] > _RANK[out]:
            out = s
    return out


def _warning(code: str, message: str) -> dict[str, str]:
    return {"code": code, "message": message}


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, timezone.utc).isoformat().replace("+00:00", "Z")


def _go_duration(seconds: float) -> str:
    """Go ``time.Duration.String()``-like text (``1.234ms``, ``2.5s``)."""
    if seconds >= 1:
        return f"{seconds:.3f}".rstrip("0").rstrip(".") + "s"
    ms = seconds * 1000
    if ms >= 1:
        return f"{ms:.3f}".rstrip("0").rstrip(".") + "ms"
    return f"{seconds * 1e6:.0f}µs"


# ----------------------------------------------------------------------------- pure


@dataclass(frozen=True, slots=True)
class NodeCheck:
    """Raw results of checking one DERP node."""

    node: pb.DERPMap.Region.Node
    can_exchange_messages: bool = False
    round_trip_ping: float | None = None
    error: str | None = None
    stun_enabled: bool = False
    can_stun: bool = False
    stun_error: str | None = None
    uses_websocket: bool = False


def _node_json(node: pb.DERPMap.Region.Node) -> dict[str, Any]:
    m = pb.DERPMap()
    m.regions[node.region_id or 1].nodes.append(node)
    region = derp_map_to_json(m)["Regions"][str(node.region_id or 1)]
    nodes: list[dict[str, Any]] = region["Nodes"]
    return nodes[0]


def node_report(check: NodeCheck) -> dict[str, Any]:
    """JSON of one node (Coder ``derphealth.NodeReport``)."""
    warnings: list[dict[str, str]] = []
    node = check.node
    if node.stun_only:
        ok = check.can_stun
        severity = SEVERITY_OK if ok else SEVERITY_ERROR
    else:
        ok = check.can_exchange_messages
        severity = SEVERITY_OK if ok else SEVERITY_ERROR
        if ok and check.stun_enabled and not check.can_stun:
            severity = SEVERITY_WARNING
            warnings.append(
                _warning(CODE_STUN_FAILED, f"STUN on node {node.name} failed: {check.stun_error}")
            )
        if ok and check.uses_websocket:
            severity = _worst([severity, SEVERITY_WARNING])
            warnings.append(
                _warning(CODE_DERP_WEBSOCKET, f"Node {node.name} uses WebSocket instead of DERP")
            )
    rtt = check.round_trip_ping
    return {
        "healthy": severity != SEVERITY_ERROR,
        "severity": severity,
        "warnings": warnings,
        "error": check.error,
        "node": _node_json(node),
        "node_info": {},
        "can_exchange_messages": check.can_exchange_messages,
        "round_trip_ping": _go_duration(rtt) if rtt is not None else "",
        "round_trip_ping_ms": round(rtt * 1000) if rtt is not None else 0,
        "uses_websocket": check.uses_websocket,
        "client_logs": [],
        "client_errs": [[check.error]] if check.error else [],
        "stun": {
            "Enabled": check.stun_enabled,
            "CanSTUN": check.can_stun,
            "Error": check.stun_error,
        },
    }


def region_report(region: pb.DERPMap.Region, nodes: list[dict[str, Any]]) -> dict[str, Any]:
    """JSON of one region from its node reports (Coder ``derphealth.RegionReport``)."""
    unhealthy = [n for n in nodes if n["severity"] == SEVERITY_ERROR]
    warnings: list[dict[str, str]] = [w for n in nodes for w in n["warnings"]]
    error: str | None = None
    if not nodes:
        severity, error = SEVERITY_ERROR, "region has no nodes"
    elif len(unhealthy) == len(nodes):
        severity = SEVERITY_ERROR
        error = "; ".join(f"{n['node']['Name']}: {n['error']}" for n in unhealthy)
    elif unhealthy:
        severity = SEVERITY_WARNING
        warnings.append(
            _warning(
                CODE_DERP_NODE_UNHEALTHY,
                "Region is operational, but performance might be degraded as "
                f"{len(unhealthy)} node(s) are unhealthy.",
            )
        )
    else:
        severity = _worst(n["severity"] for n in nodes)
    m = pb.DERPMap()
    m.regions[region.region_id].CopyFrom(region)
    return {
        "healthy": severity != SEVERITY_ERROR,
        "severity": severity,
        "warnings": warnings,
        "error": error,
        "region": derp_map_to_json(m)["Regions"][str(region.region_id)],
        "node_reports": nodes,
    }


def mesh_report(relays: Sequence[Mapping[str, Any]], *, self_id: str | None) -> dict[str, Any]:
    """The ``derp.mesh`` section from each live replica relay's own view of its links.

    ``relays``: one mapping per live replica relay with ``id``, ``hostname``,
    ``relay_url``, ``region_id``, ``started_at``/``heartbeat_at`` (Unix seconds
    or ``None``) and ``links`` (its list of link mappings — ``url``,
    ``replica_id`` or ``None`` for a static link, ``state``, ``since``,
    ``error`` — or ``None`` when it has not reported any yet). ``self_id`` is
    the replica answering. Warnings: see the module docstring.
    """
    warnings: list[dict[str, str]] = []
    out: list[dict[str, Any]] = []

    def name(r: Mapping[str, Any]) -> str:
        host = r.get("hostname") or ""
        return f"{host} ({r['id']})" if host else str(r["id"])

    for r in relays:
        links = r.get("links")
        peers = [
            o for o in relays
            if o["id"] != r["id"] and o.get("region_id") == r.get("region_id")
        ]
        if not r.get("relay_url") and peers:
            warnings.append(_warning(
                CODE_DERP_MESH,
                f"Replica {name(r)} has no relay URL (set --derp-relay-url): the other "
                "replicas cannot mesh with its relay.",
            ))
        by_replica = {
            str(link.get("replica_id")): link for link in links or () if link.get("replica_id")
        }
        missing: list[str] = []
        for o in peers:
            if not o.get("relay_url"):
                continue
            link = by_replica.get(str(o["id"]))
            if link is not None and link.get("state") == "up":
                continue
            missing.append(str(o["id"]))
            if links is None:
                why = "it has not reported its mesh links yet"
            elif link is None:
                why = "no link"
            else:
                why = f"link down since {_iso(link.get('since'))}"
                if link.get("error"):
                    why += f": {link['error']}"
            warnings.append(_warning(
                CODE_DERP_MESH,
                f"Replica {name(r)} is not meshed with replica {name(o)} "
                f"({o['relay_url']}): {why}.",
            ))
        for link in links or ():
            if link.get("replica_id") is None and link.get("state") != "up":
                warnings.append(_warning(
                    CODE_DERP_MESH,
                    f"Mesh link of replica {name(r)} to {link.get('url')} is down since "
                    f"{_iso(link.get('since'))}: {link.get('error')}.",
                ))
        out.append({
            "id": str(r["id"]),
            "hostname": r.get("hostname") or "",
            "relay_url": r.get("relay_url") or "",
            "region_id": r.get("region_id"),
            "started_at": _iso(r.get("started_at")),
            "heartbeat_at": _iso(r.get("heartbeat_at")),
            "links": [
                {**link, "since": _iso(link.get("since"))} for link in links or ()
            ],
            "links_reported": links is not None,
            "not_meshed_with": missing,
        })
    severity = SEVERITY_WARNING if warnings else SEVERITY_OK
    return {
        "healthy": True,
        "severity": severity,
        "warnings": warnings,
        "error": None,
        "replica_id": self_id,
        "relays": out,
    }


def derp_report(
    regions: Mapping[int, dict[str, Any]], mesh: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The ``derp`` section from region reports (keys: region id) and, when the
    relay meshes, the :func:`mesh_report` section."""
    failing = sorted(rid for rid, r in regions.items() if r["severity"] == SEVERITY_ERROR)
    warnings: list[dict[str, str]] = [w for r in regions.values() for w in r["warnings"]]
    error: str | None = None
    if not regions:
        severity, error = SEVERITY_ERROR, "the DERP map has no regions"
    elif len(failing) == len(regions):
        severity, error = SEVERITY_ERROR, "no DERP region is reachable"
    elif failing:
        severity = SEVERITY_WARNING
        warnings.append(
            _warning(
                CODE_DERP_NODE_UNHEALTHY,
                "Some DERP regions are unhealthy: " + ", ".join(str(r) for r in failing),
            )
        )
    else:
        severity = _worst(r["severity"] for r in regions.values())
    if mesh is not None:
        warnings.extend(mesh["warnings"])
        if mesh["severity"] != SEVERITY_OK and severity == SEVERITY_OK:
            severity = SEVERITY_WARNING
    report = {
        "healthy": severity != SEVERITY_ERROR,
        "severity": severity,
        "warnings": warnings,
        "dismissed": False,
        "error": error,
        "regions": {str(rid): regions[rid] for rid in sorted(regions)},
        "netcheck": None,
        "netcheck_err": None,
        "netcheck_logs": [],
    }
    if mesh is not None:
        report["mesh"] = dict(mesh)
    return report


_SECTIONS: Final = ("derp", "access_url", "websocket", "database", "coordinator")


def health_report(
    *,
    derp: dict[str, Any],
    access_url: dict[str, Any],
    websocket: dict[str, Any],
    now: float,
    database: dict[str, Any] | None = None,
    coordinator: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The whole report; top-level severity is the worst section's."""
    report: dict[str, Any] = {
        "time": datetime.fromtimestamp(now, timezone.utc).isoformat().replace("+00:00", "Z"),
        "healthy": True,
        "severity": SEVERITY_OK,
        "derp": derp,
        "access_url": access_url,
        "websocket": websocket,
        "coder_version": "tailnet-core",
    }
    if database is not None:
        report["database"] = database
    if coordinator is not None:
        report["coordinator"] = coordinator
    return _rejudge(report)


def _rejudge(report: dict[str, Any]) -> dict[str, Any]:
    severity = _worst(report[k]["severity"] for k in _SECTIONS if k in report)
    report["severity"] = severity
    report["healthy"] = severity != SEVERITY_ERROR
    return report


def summarize(report: Mapping[str, Any]) -> dict[str, Any]:
    """Verdict and one line per section (for the dashboard)."""
    return {
        "severity": report.get("severity", SEVERITY_OK),
        "healthy": report.get("healthy", True),
        "time": report.get("time"),
        "sections": {
            k: {"severity": report[k]["severity"], "error": report[k].get("error")}
            for k in _SECTIONS
            if isinstance(report.get(k), dict)
        },
    }


def coordinator_section(
    *, accepting: bool, backend: str, peers: int, error: str | None = None, **extra: Any
) -> dict[str, Any]:
    """The ``coordinator`` section: an error while the coordinator refuses peers."""
    warnings: list[dict[str, str]] = []
    if not accepting:
        error = error or "the coordinator refuses new peers"
        warnings.append(_warning(CODE_COORDINATOR_REFUSING, error))
    return {
        "healthy": accepting,
        "severity": SEVERITY_OK if accepting else SEVERITY_ERROR,
        "warnings": warnings,
        "dismissed": False,
        "error": None if accepting else error,
        "accepting_peers": accepting,
        "backend": backend,
        "peers": peers,
        **extra,
    }


# ----------------------------------------------------------------------------- I/O


def node_url(node: pb.DERPMap.Region.Node) -> str:
    """The DERP URL a client would dial for ``node``."""
    scheme = "http" if node.force_http else "https"
    host = node.host_name or node.ipv4 or node.ipv6
    if ":" in host:
        host = f"[{host}]"
    port = node.derp_port or (80 if scheme == "http" else 443)
    return f"{scheme}://{host}:{port}/derp"


async def check_stun(host: str, port: int, timeout: float) -> tuple[bool, str | None]:
    """One STUN Binding exchange (:func:`derp.stunserver.stun_request`); ``(ok, error)``."""
    try:
        await stun_request(host, port, timeout)
    except TimeoutError:
        return False, f"no STUN answer from {host}:{port} within {timeout:g}s"
    except OSError as exc:
        return False, f"STUN {host}:{port}: {exc.strerror or exc}"
    return True, None


async def check_node(
    node: pb.DERPMap.Region.Node,
    *,
    timeout: float = 5.0,
    mesh_key: bytes | None = None,
    websocket: bool = False,
) -> NodeCheck:
    """Check one node (see module docstring); never raises for network problems.

    ``mesh_key`` lets the probe clients past a relay's admission control (only
    ever pass the key of a relay this process runs); ``websocket`` dials DERP
    over WebSocket, as clients told ``derp_force_websockets`` do.
    """
    stun_enabled = node.stun_port >= 0
    can_stun, stun_error = False, None
    if stun_enabled:
        host = node.stun_test_ip or node.ipv4 or node.host_name
        can_stun, stun_error = await check_stun(host, node.stun_port or 3478, timeout)
    if node.stun_only:
        return NodeCheck(
            node, stun_enabled=stun_enabled, can_stun=can_stun, stun_error=stun_error,
            error=None if can_stun else stun_error,
        )
    url = node_url(node)
    opts: dict[str, Any] = {
        "is_prober": True,
        "connect_timeout": timeout,
        "mesh_key": mesh_key,
        "websocket": websocket,
        "cert_name": node.cert_name or None,
    }
    a = DerpClient(url, PrivateKey.generate(), **opts)
    b = DerpClient(url, PrivateKey.generate(), **opts)
    rtt: float | None = None
    error: str | None = None
    try:
        await asyncio.wait_for(asyncio.gather(a.connect(), b.connect()), timeout)
        probe = os.urandom(16)

        async def echo() -> None:
            while True:
                ev = await b.recv()
                if isinstance(ev, PacketReceived) and ev.data == probe:
                    await b.send(ev.src, ev.data)
                    return

        async def roundtrip() -> float:
            start = time.perf_counter()
            await a.send(b.public_key, probe)
            while True:
                ev = await a.recv()
                if isinstance(ev, PacketReceived) and ev.data == probe:
                    return time.perf_counter() - start

        echo_task = asyncio.ensure_future(echo())
        try:
            rtt = await asyncio.wait_for(roundtrip(), timeout)
        finally:
            echo_task.cancel()
            # retrieve its outcome (e.g. B's connection failing) so it is not logged as lost
            await asyncio.gather(echo_task, return_exceptions=True)
    except TimeoutError:
        error = f"{url}: no answer within {timeout:g}s"
    except OSError as exc:
        error = f"{url}: {exc.strerror or exc}"
    except Exception as exc:  # DERP protocol/handshake errors
        error = f"{url}: {type(exc).__name__}: {exc}"
    finally:
        await asyncio.gather(a.close(), b.close(), return_exceptions=True)
    return NodeCheck(
        node,
        can_exchange_messages=rtt is not None,
        round_trip_ping=rtt,
        error=error,
        stun_enabled=stun_enabled,
        can_stun=can_stun,
        stun_error=stun_error,
    )


def _section(ok: bool, error: str | None, **extra: Any) -> dict[str, Any]:
    severity = SEVERITY_OK if ok else SEVERITY_ERROR
    return {
        "healthy": ok,
        "severity": severity,
        "warnings": [],
        "dismissed": False,
        "error": error,
        **extra,
    }


async def check_access_url(access_url: str, *, timeout: float = 5.0) -> dict[str, Any]:
    """GET ``<access_url>/healthz`` with an h11 client; the ``access_url`` section."""
    split = urllib.parse.urlsplit(access_url)
    host = split.hostname or "127.0.0.1"
    port = split.port or (443 if split.scheme == "https" else 80)
    status = 0
    body = b""
    error: str | None = None
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=split.scheme == "https"), timeout
        )
        try:
            conn = h11.Connection(h11.CLIENT)
            writer.write(
                conn.send(
                    h11.Request(
                        method="GET",
                        target="/healthz",
                        headers=[("Host", split.netloc), ("Connection", "close")],
                    )
                )
                + conn.send(h11.EndOfMessage())
            )
            while True:
                ev = conn.next_event()
                if ev is h11.NEED_DATA:
                    conn.receive_data(await asyncio.wait_for(reader.read(65536), timeout))
                    continue
                if isinstance(ev, h11.Response):
                    status = ev.status_code
                elif isinstance(ev, h11.Data):
                    body += ev.data
                elif isinstance(ev, (h11.EndOfMessage, h11.ConnectionClosed)):
                    break
        finally:
            writer.close()
    except TimeoutError:
        error = f"GET {access_url}/healthz: no answer within {timeout:g}s"
    except (OSError, h11.ProtocolError) as exc:
        error = f"GET {access_url}/healthz: {exc}"
    ok = error is None and status == 200
    if error is None and not ok:
        error = f"GET {access_url}/healthz: status {status}"
    return _section(
        ok,
        error,
        access_url=access_url,
        reachable=status != 0,
        status_code=status,
        healthz_response=body.decode("utf-8", "replace"),
    )


async def check_websocket(url: str, token: str | None, *, timeout: float = 5.0) -> dict[str, Any]:
    """Open a WebSocket to the echo endpoint ``url``, echo one message; the ``websocket`` section."""
    from websockets.asyncio.client import connect

    error: str | None = None
    body = ""
    code = 0
    headers = {"Coder-Session-Token": token} if token else {}
    try:
        async with asyncio.timeout(timeout):
            async with connect(url, additional_headers=headers, compression=None) as ws:
                code = 101
                await ws.send("ping")
                reply = await ws.recv()
                body = reply if isinstance(reply, str) else reply.decode("utf-8", "replace")
                if body != "ping":
                    error = f"echo mismatch: {body!r}"
    except TimeoutError:
        error = f"{url}: no answer within {timeout:g}s"
    except Exception as exc:  # InvalidStatus, OSError, protocol errors
        error = f"{url}: {exc}"
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if isinstance(status, int):
            code = status
    return _section(error is None, error, body=body, code=code)


async def check_database(
    ping: Callable[[float], Awaitable[float]],
    *,
    timeout: float = 5.0,
    threshold_ms: int = DB_THRESHOLD_MS,
    pings: int = DB_PINGS,
) -> dict[str, Any]:
    """Coder's ``database`` section: ``ping(timeout)`` returns one round trip in seconds."""
    samples: list[float] = []
    error: str | None = None
    try:
        async with asyncio.timeout(timeout):
            for _ in range(pings):
                samples.append(await ping(timeout))
    except TimeoutError:
        error = f"database ping: no answer within {timeout:g}s"
    except Exception as exc:  # asyncpg / OS errors: report, never raise
        error = f"database ping: {type(exc).__name__}: {exc}"
    warnings: list[dict[str, str]] = []
    if error is not None or not samples:
        severity = SEVERITY_ERROR
        warnings.append(_warning(CODE_DB_UNREACHABLE, error or "database ping failed"))
        latency = 0.0
    else:
        samples.sort()
        latency = samples[len(samples) // 2]
        severity = SEVERITY_OK
        if latency * 1000 >= threshold_ms:
            severity = SEVERITY_WARNING
            warnings.append(
                _warning(
                    CODE_DB_SLOW,
                    f"median database ping {latency * 1000:.1f} ms is at or above "
                    f"{threshold_ms} ms",
                )
            )
    return {
        "healthy": severity != SEVERITY_ERROR,
        "severity": severity,
        "warnings": warnings,
        "dismissed": False,
        "error": error,
        "reachable": error is None and bool(samples),
        "latency": _go_duration(latency) if samples and error is None else "",
        "latency_ms": round(latency * 1000) if samples and error is None else 0,
        "threshold_ms": threshold_ms,
    }


@dataclass(slots=True)
class _Cached:
    at: float
    report: dict[str, Any]


class HealthChecker:
    """Runs all checks concurrently, caching the report for ``cache_ttl`` seconds.

    ``access_url`` and ``websocket_url`` are optional: without them those
    sections report ``ok`` with ``error`` null and nothing checked. Concurrent
    callers share one run. ``database_ping`` (PostgreSQL in use) adds the
    ``database`` section; ``coordinator`` (a callable returning
    :func:`coordinator_section`) adds a section that is re-evaluated on every
    call, cached report or not.
    """

    def __init__(
        self,
        derp_maps: DERPMapSource,
        *,
        access_url: str | None = None,
        websocket_url: str | None = None,
        token: Callable[[], str | None] | None = None,
        timeout: float = 5.0,
        cache_ttl: float = 10.0,
        clock: Callable[[], float] = time.time,
        node_checker: Callable[..., Awaitable[NodeCheck]] = check_node,
        mesh_keys: Mapping[int, bytes] | None = None,
        websocket: bool = False,
        database_ping: Callable[[float], Awaitable[float]] | None = None,
        coordinator: Callable[[], dict[str, Any]] | None = None,
        mesh: Callable[[], Awaitable[dict[str, Any]]] | None = None,
    ) -> None:
        self._derp_maps = derp_maps
        self.access_url = access_url
        self.websocket_url = websocket_url
        self._token = token
        self._timeout = timeout
        self._ttl = cache_ttl
        self._clock = clock
        self._check_node = node_checker
        #: region id → mesh key of a relay this process runs (probes bypass its admission)
        self._mesh_keys = dict(mesh_keys or {})
        self._websocket = websocket
        #: returns the derp.mesh section (mesh_report) when the relay meshes
        self._mesh = mesh
        self._cached: _Cached | None = None
        self._running: asyncio.Future[dict[str, Any]] | None = None
        self._database_ping = database_ping
        self._coordinator = coordinator

    async def report(self, *, force: bool = False) -> dict[str, Any]:
        """The cached report, or a fresh one if forced/expired (coordinator: always live)."""
        now = self._clock()
        cached = self._cached
        if not force and cached is not None and now - cached.at < self._ttl:
            return self._with_live(cached.report)
        if self._running is None or self._running.done():
            self._running = asyncio.ensure_future(self._run())
        return self._with_live(await asyncio.shield(self._running))

    def _with_live(self, report: dict[str, Any]) -> dict[str, Any]:
        if self._coordinator is None:
            return report
        out = dict(report)
        out["coordinator"] = self._coordinator()
        return _rejudge(out)

    def cached_report(self) -> dict[str, Any] | None:
        """The last report (with the live coordinator section), or ``None`` before the first."""
        return self._with_live(self._cached.report) if self._cached is not None else None

    def stale(self) -> bool:
        """True if the next :meth:`report` would run the checks (no report, or expired)."""
        c = self._cached
        return c is None or self._clock() - c.at >= self._ttl

    async def _run(self) -> dict[str, Any]:
        m = self._derp_maps.current()
        regions = sorted(m.regions.items())

        async def one_region(region: pb.DERPMap.Region) -> dict[str, Any]:
            checks = await asyncio.gather(
                *(
                    self._check_node(
                        n,
                        timeout=self._timeout,
                        mesh_key=self._mesh_keys.get(region.region_id),
                        websocket=self._websocket,
                    )
                    for n in region.nodes
                )
            )
            return region_report(region, [node_report(c) for c in checks])

        async def skipped(section: str) -> dict[str, Any]:
            return _section(True, None, skipped=f"{section} check not configured")

        access = (
            check_access_url(self.access_url, timeout=self._timeout)
            if self.access_url
            else skipped("access URL")
        )
        token = self._token() if self._token is not None else None
        ws = (
            check_websocket(self.websocket_url, token, timeout=self._timeout)
            if self.websocket_url
            else skipped("websocket")
        )
        db = (
            check_database(self._database_ping, timeout=self._timeout)
            if self._database_ping is not None
            else skipped("database")
        )
        async def mesh() -> dict[str, Any] | None:
            if self._mesh is None:
                return None
            try:
                return await asyncio.wait_for(self._mesh(), self._timeout)
            except Exception as exc:  # e.g. the database is unreachable
                msg = f"cannot read the replicas' mesh links: {type(exc).__name__}: {exc}"
                return {"healthy": True, "severity": SEVERITY_WARNING,
                        "warnings": [_warning(CODE_DERP_MESH, msg)], "error": msg,
                        "replica_id": None, "relays": []}

        results = await asyncio.gather(
            access, ws, db, mesh(), *(one_region(r) for _, r in regions)
        )
        access_section, ws_section, db_section, mesh_section = results[:4]
        region_reports = {rid: rep for (rid, _), rep in zip(regions, results[4:])}
        report = health_report(
            derp=derp_report(region_reports, mesh_section),
            access_url=access_section,
            websocket=ws_section,
            database=db_section if self._database_ping is not None else None,
            now=self._clock(),
        )
        self._cached = _Cached(self._clock(), report)
        return report


def report_json(report: Mapping[str, Any]) -> bytes:
    """Serialize a report (stable key order for humans)."""
    return json.dumps(report, indent=2).encode("utf-8")
