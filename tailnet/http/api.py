"""The Coder-compatible HTTP API (routes, auth, endpoint handlers).

Endpoints (all ``GET``; JSON errors per :mod:`tailnet.http.errors`):

======================================================  ===============================================
``/healthz``                                            ``OK`` (no auth)
``/api/v2/derp-map``                                    WS: DERP map JSON (Go names) as one binary
                                                        message at once and on every change
``/api/v2/workspaceagents/{id}/connection``             ``AgentConnectionInfo`` JSON
``/api/v2/workspaceagents/connection``                  the same, not bound to an agent
``/api/v2/workspaceagents/{id}/coordinate``             WS: Tailnet RPC, client bound to agent ``{id}``
``/api/v2/tailnet``                                     WS: user-scoped Tailnet RPC
``/api/v2/workspaceagents/me/rpc``                      WS: Tailnet RPC for an agent (agent token)
``/api/v2/debug/health``                                health report (``?force=true`` re-runs)
``/api/v2/debug/coordinator``                           peers and tunnels (HTML; JSON on
                                                        ``Accept: application/json``)
``/api/v2/debug/ws``                                    WS echo (used by the health check);
                                                        closed after ``echo_idle_timeout``
                                                        (30 s) without a message
``/api/v2/debug/loop``                                  event-loop stalls (JSON; ``?reset=1``
                                                        starts a new window)
======================================================  ===============================================

Checks, in order, for every endpoint but ``/healthz``:

1. credentials (:func:`~tailnet.http.request.extract_token`): none or unknown → 401;
2. for RPC endpoints ``?version=`` (default ``2.0``): malformed/unsupported →
   400 with ``validations[0].field == "version"``;
3. role: debug endpoints need a ``control_plane`` principal (403); the agent
   endpoint needs an agent token (403); agents may not use client endpoints (403);
4. ``{id}``: not a UUID → 400 (field ``workspaceagent``); unknown agent or no
   access (the tunnel authorizer says no) → 404;
5. ``?resume_token=``: invalid → 401 with ``validations[0].field == "resume_token"``;
6. non-WebSocket request to a WS endpoint → 426.

Every accepted WebSocket is registered, for its lifetime, under the token that
opened it (``sessions``, a :class:`~tailnet.identity.SessionRegistry`): when
that token is revoked the socket is closed with 1008 "session token revoked".

RPC WebSockets speak Coder's transport: the binary messages are one byte stream
carrying a yamux server session, each yamux stream one DRPC connection
(:mod:`tailnet.rpc`). The client endpoints serve the Tailnet service
(:attr:`TailnetApi.client_mux`); ``/me/rpc`` serves :attr:`TailnetApi.agent_mux`
(the Tailnet service plus whatever the embedder registers, e.g. Coder's Agent
service) and accepts the Agent API's versions (up to 2.6). The 101 response
includes ``Tailnet-Peer-Id`` and ``Tailnet-Version`` (informational; Coder's
clients ignore them). Client endpoints ping every 15 s; every endpoint runs
yamux keepalive (30 s).
"""

from __future__ import annotations

import asyncio
import dataclasses
import html
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final, Protocol

from tailnet.auth import ClientPolicy
from tailnet.derpmap import DERPMapSource, derp_map_to_json, derp_maps_equal, with_home_params
from tailnet.errors import CoordinatorClosed
from tailnet.health import HealthChecker
from tailnet.loopmon import LoopMonitor
from tailnet.identity import (
    MD_AGENT_ID,
    MD_RESUME_TOKEN,
    MD_SESSION_TOKEN,
    MD_VERSION,
    Principal,
    SessionRegistry,
)
from tailnet.rpc.mux import Mux
from tailnet.rpc.server import DEFAULT_MAX_STREAMS, RpcServerConnection
from tailnet.rpc.tailnet import TailnetContext, register_tailnet
from tailnet.service import CallContext, ServiceError, Status, StreamIdentity, TailnetService
from tailnet.version import AGENT_API_VERSION, format_version

from .errors import HttpError, Validation
from .request import Request, extract_token
from .server import Response, Stream, Upgrade
from .websocket import CLOSE_GOING_AWAY, ServerWebSocket

__all__ = ["ApiOptions", "TailnetApi", "AgentLookup", "Pages"]

log = logging.getLogger(__name__)

#: ``(principal, agent_id) -> may this principal reach this (existing) agent?``
AgentLookup = Callable[[Principal, uuid.UUID], Awaitable[bool]]


class Pages(Protocol):
    """Extra (non-API) routes consulted before the API's; ``None`` = not mine."""

    async def handle(self, req: Request) -> Response | Stream | None: ...

    def close(self) -> None: ...

_AGENTS: Final = "/api/v2/workspaceagents/"
#: Informational headers on the 101 of RPC endpoints.
HEADER_PEER_ID: Final = "Tailnet-Peer-Id"
HEADER_VERSION: Final = "Tailnet-Version"
CLOSE_POLICY_VIOLATION: Final = 1008


@dataclass(slots=True)
class ApiOptions:
    """Values reported by ``/connection`` and WebSocket keepalive settings."""

    derp_force_websockets: bool = False
    disable_direct_connections: bool = False
    hostname_suffix: str = "coder"
    ping_interval: float = 15.0
    max_rpc_streams: int = DEFAULT_MAX_STREAMS
    """yamux streams one RPC WebSocket may have open at once."""
    #: ``/api/v2/debug/ws`` closes (1001 "idle timeout") after this long without a message.
    echo_idle_timeout: float = 30.0


def _json(status: int, doc: Any) -> Response:
    return Response(status, json.dumps(doc).encode("utf-8"))


class TailnetApi:
    """Routes requests to handlers; see the module docstring for the contract."""

    def __init__(
        self,
        service: TailnetService,
        derp_maps: DERPMapSource,
        *,
        agent_lookup: AgentLookup,
        health: HealthChecker | None = None,
        options: ApiOptions | None = None,
        loop_monitor: LoopMonitor | None = None,
        sessions: SessionRegistry | None = None,
        pages: Pages | None = None,
    ) -> None:
        self.service = service
        self.derp_maps = derp_maps
        self._agent_lookup = agent_lookup
        self.health = health
        self.loop_monitor = loop_monitor
        self.options = options or ApiOptions()
        self.sessions = sessions if sessions is not None else SessionRegistry()
        self.pages = pages
        """Answers non-API paths first (``tailnet.dashboard.OperatorPages``: /, /login,
        /dashboard, /metrics …); ``None`` from it falls through to the API routes."""
        self._closing = asyncio.Event()
        self._closers: set[asyncio.Task[None]] = set()
        self.client_mux = register_tailnet(Mux(), service)
        """Methods served on the client endpoints (``/coordinate``, ``/api/v2/tailnet``)."""
        self.agent_mux = register_tailnet(Mux(), service)
        """Methods served on ``/api/v2/workspaceagents/me/rpc``; register more here."""

    def close(self) -> None:
        """Stop DERP-map streams and dashboard feeds (at shutdown, before sockets close)."""
        self._closing.set()
        if self.pages is not None:
            self.pages.close()

    # ------------------------------------------------------------------ routing

    async def handle(self, req: Request) -> Response | Upgrade | Stream:
        result = await self._route(req)
        if isinstance(result, Upgrade):
            token = extract_token(req)
            if token is not None:  # every WebSocket endpoint authenticated it
                result.handler = self._revocable(token, result.handler)
        return result

    def _revocable(
        self, token: str, handler: Callable[[ServerWebSocket], Awaitable[None]]
    ) -> Callable[[ServerWebSocket], Awaitable[None]]:
        """``handler`` with the socket registered under ``token`` while it runs."""

        async def run(ws: ServerWebSocket) -> None:
            def close() -> None:
                task = asyncio.ensure_future(
                    ws.close(CLOSE_POLICY_VIOLATION, "session token revoked", timeout=1.0)
                )
                self._closers.add(task)
                task.add_done_callback(self._closers.discard)

            unregister = self.sessions.open(token, close)
            try:
                await handler(ws)
            finally:
                unregister()

        return run

    async def _route(self, req: Request) -> Response | Upgrade | Stream:
        path = req.path.rstrip("/") or "/"
        if self.pages is not None and not path.startswith("/api/"):
            answer = await self.pages.handle(req)
            if answer is not None:
                return answer
        if req.method not in ("GET", "HEAD"):
            raise HttpError(405, f"Method {req.method} not allowed.")
        if path == "/healthz":
            return Response(200, b"OK", "text/plain; charset=utf-8")
        if path == "/api/v2/derp-map":
            await self._authenticate(req)
            return Upgrade(self._derp_map_ws, ping_interval=self.options.ping_interval)
        if path == "/api/v2/tailnet":
            return await self._tailnet(req)
        if path == "/api/v2/debug/health":
            await self._require_owner(req)
            return await self._health(req)
        if path == "/api/v2/debug/coordinator":
            await self._require_owner(req)
            return self._coordinator_debug(req)
        if path == "/api/v2/debug/loop":
            await self._require_owner(req)
            return self._loop_debug(req)
        if path == "/api/v2/debug/ws":
            await self._authenticate(req)
            return Upgrade(self._echo_ws, ping_interval=None)
        if path == "/api/v2/workspaceagents/connection":
            await self._authenticate(req)
            return self._connection_info()
        if path.startswith(_AGENTS):
            rest = path[len(_AGENTS) :].split("/")
            if rest == ["me", "rpc"]:
                return await self._agent_rpc(req)
            if len(rest) == 2 and rest[1] in ("connection", "coordinate"):
                agent_id = _parse_agent_id(rest[0])
                if rest[1] == "connection":
                    principal = await self._authenticate(req)
                    await self._require_agent_access(principal, agent_id)
                    return self._connection_info()
                return await self._client_coordinate(req, agent_id)
        raise HttpError(404, "Route not found.", f"No route for {req.method} {req.path}.")

    # ------------------------------------------------------------------ auth

    def _metadata(self, req: Request, *, rpc: bool) -> dict[str, str]:
        md: dict[str, str] = {}
        token = extract_token(req)
        if token is not None:
            md[MD_SESSION_TOKEN] = token
        if rpc:
            if "version" in req.query:
                md[MD_VERSION] = req.query["version"]
            resume = req.query.get("resume_token", "").strip()
            if resume:
                md[MD_RESUME_TOKEN] = resume
        return md

    async def _call(
        self, req: Request, *, rpc: bool, server_version: tuple[int, int] | None = None
    ) -> CallContext:
        md = self._metadata(req, rpc=rpc)
        if MD_SESSION_TOKEN not in md:
            log.info("auth failed: %s from %s: no credentials", req.path, _remote_text(req.remote))
            raise HttpError(
                401,
                "You must be authenticated to use this endpoint.",
                "Send the Coder-Session-Token header, Authorization: Bearer <token>, "
                "or the coder_session_token cookie.",
            )
        try:
            return await self.service.authenticate(md, server_version=server_version)
        except ServiceError as exc:
            log.info("auth failed: %s from %s: %s", req.path, _remote_text(req.remote), exc.message)
            if exc.status is Status.UNAUTHENTICATED:
                raise HttpError(401, "Invalid or unknown session token.") from None
            if exc.status in (Status.INVALID_ARGUMENT, Status.FAILED_PRECONDITION):
                raise HttpError(
                    400,
                    "Unknown or unsupported API version",
                    validations=[Validation("version", exc.message)],
                ) from None
            raise HttpError(503, "Authentication backend unavailable.") from None

    async def _authenticate(self, req: Request) -> Principal:
        return (await self._call(req, rpc=False)).principal

    async def _require_owner(self, req: Request) -> Principal:
        p = await self._authenticate(req)
        if p.kind != "control_plane":
            raise HttpError(403, "Forbidden.", "Debug endpoints require an owner (admin) token.")
        return p

    async def _require_agent_access(self, principal: Principal, agent_id: uuid.UUID) -> None:
        try:
            ok = await self._agent_lookup(principal, agent_id)
        except Exception:
            log.exception("agent lookup failed for %s", agent_id)
            ok = False
        if not ok:
            raise HttpError(404, "Workspace agent not found.", f"No agent {agent_id} you may access.")

    async def _resolve(self, call: CallContext) -> StreamIdentity:
        try:
            return await self.service.resolve_stream(call)
        except ServiceError as exc:
            log.info(
                "rpc refused: %s %s: %s", call.principal.kind, call.principal.id, exc.message
            )
            if exc.status is Status.UNAUTHENTICATED:
                raise HttpError(
                    401,
                    "Invalid resume token",
                    exc.message,
                    [Validation("resume_token", exc.message)],
                ) from None
            if exc.status is Status.PERMISSION_DENIED:
                raise HttpError(404, "Workspace agent not found.", exc.message) from None
            if exc.status is Status.INVALID_ARGUMENT:
                raise HttpError(400, exc.message) from None
            raise HttpError(503, exc.message) from None

    def _rpc_upgrade(
        self, req: Request, call: CallContext, ident: StreamIdentity, *, agent_api: bool = False
    ) -> Upgrade:
        coord = self.service.coordinator
        if coord.closed or not getattr(coord, "healthy", True):
            # Refuse before upgrading, so clients see a refusal with a status (503),
            # never a session that then fails.
            log.info("rpc refused: %s from %s: coordinator not accepting peers",
                     req.path, _remote_text(req.remote))
            raise HttpError(
                503, str(CoordinatorClosed()) if coord.closed else "coordinator unhealthy",
                "The coordinator is not accepting peers right now (shutting down, or its "
                "database is unreachable).",
            )
        n = self.service.principal_streams(call.principal)
        cap = self.service.limits.max_peers_per_principal
        if n >= cap:
            log.info("rpc refused: %s from %s: %s %s has %d streams (max_peers_per_principal)",
                     req.path, _remote_text(req.remote), call.principal.kind, call.principal.id, n)
            raise HttpError(
                429, "Too many concurrent Coordinate streams.",
                f"{n} open, at most {cap} allowed for this principal (max_peers_per_principal).",
            )
        headers = [
            (HEADER_VERSION, format_version(call.version)),
            (HEADER_PEER_ID, str(ident.peer_id)),
        ]
        conns: dict[ServerWebSocket, RpcServerConnection] = {}
        mux = self.agent_mux if agent_api else self.client_mux
        context = TailnetContext(call, ident, agent_api)
        p = call.principal
        # Everything an operator needs to find this connection; never the token.
        name = (
            f"{req.path} {p.kind} {p.id} ({p.name or ident.name}) peer {ident.peer_id}"
            f"{' resumed' if ident.resumed else ''} from {_remote_text(req.remote)}"
        )

        async def run(ws: ServerWebSocket) -> None:
            conn = RpcServerConnection(
                ws, mux, context, max_streams=self.options.max_rpc_streams, name=name
            )
            conns[ws] = conn
            started = time.monotonic()
            log.info("rpc connection open: %s version %s", name, format_version(call.version))
            try:
                await conn.run()
            finally:
                conns.pop(ws, None)
                log.info(
                    "rpc connection closed: %s after %.1fs", name, time.monotonic() - started
                )

        async def shutdown(ws: ServerWebSocket) -> None:
            conn = conns.get(ws)
            if conn is not None:
                await conn.shutdown()
            else:
                await ws.close(CLOSE_GOING_AWAY, "server shutting down")

        # Coder pings the client endpoints every 15 s; /me/rpc relies on yamux pings.
        ping = None if agent_api else self.options.ping_interval
        return Upgrade(run, headers, ping, shutdown)

    # ------------------------------------------------------------------ RPC endpoints

    async def _client_coordinate(self, req: Request, agent_id: uuid.UUID) -> Upgrade:
        md = self._metadata(req, rpc=True)
        call = await self._call(req, rpc=True)
        p = call.principal
        if p.kind == "agent":
            raise HttpError(403, "Agents cannot coordinate as clients.")
        await self._require_agent_access(p, agent_id)
        md.update(call.metadata)
        md[MD_AGENT_ID] = str(agent_id)
        call = CallContext(p, call.version, md)
        ident = await self._resolve(call)
        if not isinstance(ident.policy, ClientPolicy):
            ident = dataclasses.replace(ident, name="client", policy=ClientPolicy(agent_id))
        return self._rpc_upgrade(req, call, ident)

    async def _tailnet(self, req: Request) -> Upgrade:
        call = await self._call(req, rpc=True)
        if call.principal.kind == "agent":
            raise HttpError(
                403, "Agents cannot use the user-scoped tailnet API.",
                "Agents coordinate on /api/v2/workspaceagents/me/rpc.",
            )
        ident = await self._resolve(call)
        return self._rpc_upgrade(req, call, ident)

    async def _agent_rpc(self, req: Request) -> Upgrade:
        call = await self._call(req, rpc=True, server_version=AGENT_API_VERSION)
        if call.principal.kind != "agent":
            raise HttpError(403, "This endpoint requires a workspace agent token.")
        ident = await self._resolve(call)
        return self._rpc_upgrade(req, call, ident, agent_api=True)

    # ------------------------------------------------------------------ DERP map

    def _connection_info(self) -> Response:
        o = self.options
        doc: dict[str, Any] = {
            "derp_map": derp_map_to_json(self.derp_maps.current()),
            "derp_force_websockets": o.derp_force_websockets,
            "disable_direct_connections": o.disable_direct_connections,
        }
        if o.hostname_suffix:
            doc["hostname_suffix"] = o.hostname_suffix
        return _json(200, doc)

    async def _derp_map_ws(self, ws: ServerWebSocket) -> None:
        """Send the map now and on every change; a reader drains (and ignores) input."""
        src = self.derp_maps

        async def drain_input() -> None:
            while await ws.recv() is not None:
                pass

        reader = asyncio.ensure_future(drain_input())
        closing = asyncio.ensure_future(self._closing.wait())
        changed: asyncio.Future[int] | None = None
        try:
            version = src.version
            last = with_home_params(src.current())
            await ws.send(json.dumps(derp_map_to_json(last)).encode("utf-8"))
            while ws.open:
                changed = asyncio.ensure_future(src.wait_changed(version))
                done, _ = await asyncio.wait(
                    {changed, reader, closing}, return_when=asyncio.FIRST_COMPLETED
                )
                if changed not in done:
                    changed.cancel()
                    if closing in done:
                        await ws.close(CLOSE_GOING_AWAY, "server shutting down")
                    return
                version = changed.result()
                cur = src.current()
                if not derp_maps_equal(last, cur):
                    last = with_home_params(cur)
                    await ws.send(json.dumps(derp_map_to_json(last)).encode("utf-8"))
        except ConnectionError:
            return
        finally:
            reader.cancel()
            closing.cancel()
            if changed is not None:
                changed.cancel()

    async def _echo_ws(self, ws: ServerWebSocket) -> None:
        """Echo every message (text as its UTF-8 bytes, binary replies).

        Idle = no message received *and* echoed within ``echo_idle_timeout``
        (a client that never reads blocks the echo, which counts as idle too):
        the socket is then closed with 1001, or aborted if even that stalls.
        """
        while True:
            try:
                async with asyncio.timeout(self.options.echo_idle_timeout):
                    msg = await ws.recv()
                    if msg is None:
                        return
                    await ws.send(msg.encode("utf-8") if isinstance(msg, str) else msg)
            except TimeoutError:
                await ws.close(CLOSE_GOING_AWAY, "idle timeout", timeout=1.0)
                return
            except ConnectionError:
                return

    # ------------------------------------------------------------------ debug

    async def _health(self, req: Request) -> Response:
        if self.health is None:
            raise HttpError(404, "Health checks are not configured.")
        force = req.query.get("force", "").lower() in ("1", "true", "yes")
        report = await self.health.report(force=force)
        return _json(200, report)

    def _loop_debug(self, req: Request) -> Response:
        mon = self.loop_monitor
        if mon is None:
            raise HttpError(404, "No event-loop monitor.", "This server runs without one.")
        st = mon.stats(reset=req.query.get("reset") in ("1", "true"))
        return _json(200, {
            "window_s": round(time.monotonic() - st.since, 3),
            "samples": st.samples,
            "max_stall_ms": round(st.max_stall * 1000, 3),
            "stalls_over_50ms": st.over_50ms,
            "stalls_over_250ms": st.over_250ms,
        })

    def _coordinator_debug(self, req: Request) -> Response:
        coord = self.service.coordinator
        now = time.time()
        peers = sorted(coord.peers(), key=lambda p: (p.name, str(p.id)))
        tunnels = sorted(coord.tunnels(), key=lambda t: (str(t[0]), str(t[1])))
        if req.accepts_json():
            from google.protobuf.json_format import MessageToDict

            return _json(
                200,
                {
                    "peers": [
                        {
                            "id": str(p.id),
                            "name": p.name,
                            "created_at": p.created,
                            "last_write_at": p.last_write,
                            "overwrites": p.overwrites,
                            "node": MessageToDict(p.node) if p.node is not None else None,
                        }
                        for p in peers
                    ],
                    "tunnels": [{"src": str(s), "dst": str(d)} for s, d in tunnels],
                },
            )
        names = {p.id: p.name for p in peers}
        rows = "".join(
            f"<tr><td>{html.escape(p.name)}</td><td class=mono>{p.id}</td>"
            f"<td class=mono>{html.escape(_node_key_text(p.node))}</td>"
            f"<td>{p.node.preferred_derp if p.node is not None else ''}</td>"
            f"<td class=mono>{html.escape(', '.join(p.node.addresses) if p.node else '')}</td>"
            f"<td>{now - p.created:.0f}s ago</td><td>{now - p.last_write:.0f}s ago</td>"
            f"<td>{p.overwrites}</td></tr>"
            for p in peers
        )
        trows = "".join(
            f"<tr><td>{html.escape(names.get(s, '?'))} <span class=mono>{s}</span></td>"
            f"<td>{html.escape(names.get(d, '(offline)'))} <span class=mono>{d}</span></td></tr>"
            for s, d in tunnels
        )
        page = (
            "<!DOCTYPE html>\n<html><head><meta charset=utf-8><title>coordinator</title>"
            '<link rel="stylesheet" href="/dashboard/static/dashboard.css"></head><body><main>\n'
            '<p><a href="/dashboard">live dashboard</a> · <a href="?">refresh</a></p>\n'
            f"<section class=panel><h2 id=peers>peers: total {len(peers)}</h2>\n"
            "<table><tr><th>Name</th><th>ID</th><th>Node key</th><th>Home region</th>"
            "<th>Addresses</th><th>Created</th><th>Last write</th><th>Overwrites</th></tr>"
            f"{rows}</table></section>\n"
            f"<section class=panel><h2 id=tunnels>tunnels: total {len(tunnels)}</h2>\n"
            f"<table><tr><th>Source</th><th>Destination</th></tr>{trows}</table></section>\n"
            "</main></body></html>\n"
        )
        return Response(200, page.encode("utf-8"), "text/html; charset=utf-8")


def _remote_text(remote: object) -> str:
    if isinstance(remote, tuple) and len(remote) >= 2:
        host = str(remote[0])
        return f"[{host}]:{remote[1]}" if ":" in host else f"{host}:{remote[1]}"
    return "?" if remote is None else str(remote)


def _node_key_text(node: object) -> str:
    """A node's WireGuard key as ``nodekey:<hex>`` (Coder sends ``np`` + 32 bytes)."""
    key = getattr(node, "key", b"")
    if isinstance(key, bytes) and len(key) == 34 and key.startswith(b"np"):
        key = key[2:]
    return "nodekey:" + key.hex() if isinstance(key, bytes) and len(key) == 32 else ""


def _parse_agent_id(text: str) -> uuid.UUID:
    try:
        return uuid.UUID(text)
    except ValueError:
        raise HttpError(
            400,
            f"Invalid UUID {text!r}.",
            validations=[Validation("workspaceagent", "must be a UUID")],
        ) from None
