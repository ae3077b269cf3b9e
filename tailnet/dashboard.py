"""Operator pages of ``tailnet serve``: landing page, login/logout, live dashboard, metrics.

Routes (:meth:`OperatorPages.handle` answers these and returns ``None`` for
anything else, which the API then routes as usual):

=========================  ===================================================================
``GET /``                  landing page: links to the dashboard, health, metrics and docs
``GET /docs``              what each endpoint is (a short HTML page)
``GET /login``             login form (``?next=/path`` kept)
``POST /login``            form field ``token``: an admin (``control_plane``) token sets the
                           ``coder_session_token`` cookie (``HttpOnly; SameSite=Strict;
                           Path=/``, plus ``Secure`` behind an https access URL) and
                           redirects (303) to ``next``; otherwise the form again with
                           the reason (401 unknown token, 403 not an admin)
``POST|GET /logout``       clears the cookie, redirects to ``/login``
``GET /dashboard``         the live dashboard (admin; without a session → 303 to /login)
``GET /dashboard/events``  server-sent events: ``history`` once, then a ``snapshot`` every
                           ``interval`` (1 s) — relay counters, coordinator peers and
                           tunnels, health summary (admin; 401 otherwise)
``GET /dashboard/snapshot``  one snapshot as JSON (admin)
``/dashboard/static/*``    the page's JS/CSS/SVG from the ``derp`` package (no auth)
``/metrics``,              Prometheus text (:mod:`tailnet.metrics`) and ``/debug/varz``,
``/debug/…``               ``/debug/vars``, ``/debug/`` for clients in ``debug_allow``
                           (loopback by default), exactly as ``derper``'s
=========================  ===================================================================

A login POST whose ``Origin`` header names another host is refused (403).
Failed logins are logged at INFO with the reason and the remote address (never
the token). The dashboard's data come from counters the relay and the
coordinator already keep (:mod:`derp.dashboard`, :mod:`tailnet.metrics`): an open
dashboard adds one sample per tick, nothing per packet.
"""

from __future__ import annotations

import asyncio
import html
import json
import logging
import time
import urllib.parse
from collections.abc import Callable
from typing import Any, Final

from derp.dashboard import (
    CSP,
    EventFeed,
    RelaySampler,
    dashboard_page,
    format_event,
    static_asset,
)
from derp.metrics import DebugAccess
from derp.server import DerpServer
from tailnet.health import HealthChecker, summarize
from tailnet.http.errors import HttpError
from tailnet.http.request import SESSION_COOKIE, Request, extract_token
from tailnet.http.server import Response, Stream
from tailnet.identity import MD_SESSION_TOKEN, Principal
from tailnet.metrics import render, stack_registry
from tailnet.service import ServiceError, TailnetService

__all__ = ["OperatorPages", "MAX_PEER_ROWS", "session_cookie"]

log = logging.getLogger("tailnet.dashboard")

#: peers (and tunnels) listed per snapshot; the counts are always complete
MAX_PEER_ROWS: Final = 500
_KIND: Final = {"agent": "agent", "user": "client", "control_plane": "control plane"}
_HTML: Final = "text/html; charset=utf-8"


def session_cookie(token: str, *, secure: bool) -> str:
    """``Set-Cookie`` value for the session cookie (empty ``token`` clears it)."""
    parts = [f"{SESSION_COOKIE}={token}", "Path=/", "HttpOnly", "SameSite=Strict"]
    if not token:
        parts.append("Max-Age=0")
    if secure:
        parts.append("Secure")
    return "; ".join(parts)


def _safe_next(value: str) -> str:
    """A local path to redirect to (never another origin)."""
    if not value.startswith("/") or value.startswith("//") or "\\" in value:
        return "/dashboard"
    return value


def _page(title: str, body: str, status: int = 200, headers: list[tuple[str, str]] | None = None) -> Response:
    doc = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)}</title>
<link rel="icon" href="/dashboard/static/icon.svg" type="image/svg+xml">
<link rel="stylesheet" href="/dashboard/static/dashboard.css">
</head><body><main class="narrow">
{body}
</main></body></html>
"""
    hdrs = [("Content-Security-Policy", CSP), ("Cache-Control", "no-store")]
    hdrs.extend(headers or [])
    return Response(status, doc.encode("utf-8"), _HTML, hdrs)


def _redirect(location: str, headers: list[tuple[str, str]] | None = None) -> Response:
    return Response(303, b"", "text/plain", [("Location", location), *(headers or [])])


def _node_key_text(raw: bytes) -> str:
    if len(raw) == 34 and raw.startswith(b"np"):
        raw = raw[2:]
    return "nodekey:" + raw.hex() if len(raw) == 32 else ""


class OperatorPages:
    """The operator-facing pages of one stack (see the module docstring)."""

    def __init__(
        self,
        service: TailnetService,
        *,
        derp_server: DerpServer | None,
        health: HealthChecker | None,
        access_url: str,
        debug_allow: tuple[str, ...] | None = None,
        interval: float = 1.0,
        title: str = "tailnet-core",
    ) -> None:
        self.service = service
        self.derp_server = derp_server
        self.health = health
        self.secure = access_url.startswith("https://")
        self.access = DebugAccess(debug_allow)
        self.title = title
        self.started = time.time()
        self.sampler = (
            RelaySampler(derp_server, stun=derp_server.metrics.stun) if derp_server is not None else None
        )
        self.feed = EventFeed(self._build, interval=interval, on_idle=self._idle)
        self._last: bytes | None = None
        self.registry = stack_registry(
            service, derp_server.metrics.collector if derp_server is not None else None
        )
        self._health_task: asyncio.Future[Any] | None = None

    def close(self) -> None:
        """End every event stream (server shutdown)."""
        self.feed.close()

    # ------------------------------------------------------------------ routing

    async def handle(self, req: Request) -> Response | Stream | None:
        path = req.path
        if path == "/":
            return self._landing() if req.method in ("GET", "HEAD") else None
        if path == "/docs":
            return self._docs()
        if path == "/login":
            return await self._login(req)
        if path == "/logout":
            return _redirect("/login", [("Set-Cookie", session_cookie("", secure=self.secure))])
        if path == "/metrics" or path == "/debug" or path.startswith("/debug/"):
            return self._debug(req)
        if path.startswith("/dashboard/static/"):
            asset = static_asset(path[len("/dashboard/static/") :])
            if asset is None:
                raise HttpError(404, "No such asset.")
            return Response(200, asset[0], asset[1], [("Cache-Control", "no-cache")])
        if path in ("/dashboard", "/dashboard/"):
            if await self._admin(req) is None:
                return _redirect("/login?next=" + urllib.parse.quote("/dashboard"))
            page = dashboard_page(
                f"{self.title} dashboard",
                events_url="/dashboard/events",
                static_prefix="/dashboard/static",
                logout_url="/logout",
            )
            return Response(200, page, _HTML, [("Content-Security-Policy", CSP), ("Cache-Control", "no-store")])
        if path in ("/dashboard/events", "/dashboard/snapshot"):
            if await self._admin(req) is None:
                raise HttpError(401, "Log in with an admin token first.", "POST /login, or send a session token.")
            if path.endswith("/snapshot"):
                body = json.dumps(self.snapshot()).encode("utf-8")
                return Response(200, body, "application/json", [("Cache-Control", "no-store")])
            return Stream(self._attach, headers=[("X-Accel-Buffering", "no")])
        return None

    # ------------------------------------------------------------------ auth

    async def _principal(self, token: str) -> Principal | None:
        try:
            call = await self.service.authenticate({MD_SESSION_TOKEN: token})
        except ServiceError:
            return None
        return call.principal

    async def _admin(self, req: Request) -> Principal | None:
        token = extract_token(req)
        if token is None:
            return None
        p = await self._principal(token)
        return p if p is not None and p.kind == "control_plane" else None

    async def _login(self, req: Request) -> Response:
        nxt = _safe_next(req.query.get("next", "/dashboard"))
        if req.method in ("GET", "HEAD"):
            if await self._admin(req) is not None:
                return _redirect(nxt)
            return self._login_form(nxt)
        if req.method != "POST":
            raise HttpError(405, f"Method {req.method} not allowed.")
        origin = req.header("origin")
        if origin and origin != "null":
            host = urllib.parse.urlsplit(origin).netloc
            if host.lower() != req.header("host").lower():
                log.info("login refused from %s: cross-origin form (Origin %s)", _remote(req), origin)
                raise HttpError(403, "Cross-origin login refused.")
        form = urllib.parse.parse_qs(req.body.decode("utf-8", "replace"), keep_blank_values=True)
        token = (form.get("token") or [""])[0].strip()
        nxt = _safe_next((form.get("next") or [nxt])[0])
        if not token:
            return self._login_form(nxt, "Enter a token.", 400)
        p = await self._principal(token)
        if p is None:
            log.info("login failed from %s: unknown token", _remote(req))
            return self._login_form(nxt, "Unknown token.", 401)
        if p.kind != "control_plane":
            log.info("login refused from %s: %s %s is not an admin", _remote(req), p.kind, p.id)
            return self._login_form(nxt, "This token is not an admin (owner) token.", 403)
        log.info("login: admin %s from %s", p.id, _remote(req))
        return _redirect(nxt, [("Set-Cookie", session_cookie(token, secure=self.secure))])

    def _login_form(self, nxt: str, error: str = "", status: int = 200) -> Response:
        err = f'<p class="error" id="login-error">{html.escape(error)}</p>' if error else ""
        body = f"""<h1>{html.escape(self.title)}: log in</h1>
<p class="muted">Paste an admin token (printed by <code>tailnet serve</code> on first start,
kept in the data directory's <code>tokens.json</code>).</p>
{err}
<form method="post" action="/login">
<input type="hidden" name="next" value="{html.escape(nxt)}">
<label for="token">Admin token</label>
<input type="password" id="token" name="token" autocomplete="current-password" required autofocus>
<button type="submit" id="login">Log in</button>
</form>"""
        return _page(f"{self.title}: log in", body, status)

    # ------------------------------------------------------------------ static pages

    def _landing(self) -> Response:
        body = f"""<h1>{html.escape(self.title)}</h1>
<p>A Coder-compatible tailnet coordinator with an embedded DERP relay.</p>
<ul class="links">
<li><a href="/dashboard" id="link-dashboard">Live dashboard</a> (admin login)</li>
<li><a href="/api/v2/debug/health">Health report</a> (admin)</li>
<li><a href="/api/v2/debug/coordinator">Coordinator peers and tunnels</a> (admin)</li>
<li><a href="/metrics">Prometheus metrics</a> (allowed networks only)</li>
<li><a href="/docs">Endpoints</a></li>
</ul>"""
        return _page(self.title, body)

    def _docs(self) -> Response:
        rows = [
            ("/healthz", "liveness: OK"),
            ("/login, /logout", "browser session for the dashboard (admin token)"),
            ("/dashboard", "live dashboard: peers, tunnels, relay traffic, health"),
            ("/metrics, /debug/", "Prometheus metrics (allowed networks)"),
            ("/api/v2/debug/health", "health report (Coder's format)"),
            ("/api/v2/debug/coordinator", "coordinator peers and tunnels"),
            ("/api/v2/derp-map", "WebSocket: DERP map updates"),
            ("/api/v2/workspaceagents/{id}/connection", "connection info for an agent"),
            ("/api/v2/workspaceagents/{id}/coordinate", "WebSocket: Tailnet RPC (client)"),
            ("/api/v2/tailnet", "WebSocket: Tailnet RPC (user)"),
            ("/api/v2/workspaceagents/me/rpc", "WebSocket: Tailnet RPC (agent)"),
            ("/derp", "the embedded DERP relay"),
        ]
        items = "".join(
            f"<tr><td class=mono>{html.escape(p)}</td><td>{html.escape(d)}</td></tr>" for p, d in rows
        )
        body = f"""<h1>{html.escape(self.title)}: endpoints</h1>
<table><thead><tr><th>Path</th><th>What</th></tr></thead><tbody>{items}</tbody></table>
<p><a href="/">back</a></p>"""
        return _page(f"{self.title}: endpoints", body)

    def _debug(self, req: Request) -> Response:
        if not self.access.allows(req.remote):
            raise HttpError(403, "Debug access denied.", "Only networks in debug_allow (loopback by default).")
        path = req.path
        if path in ("/metrics", "/debug/varz"):
            return Response(200, render(self.registry), "text/plain; version=0.0.4; charset=utf-8")
        if path == "/debug/vars":
            doc: dict[str, Any] = {"coordinator": self._coordinator_counts()}
            if self.derp_server is not None:
                doc["derp"] = self.derp_server.metrics.snapshot()
            return Response(200, json.dumps(doc, indent=1, sort_keys=True).encode() + b"\n", "application/json")
        if path in ("/debug", "/debug/"):
            links = "".join(
                f'<li><a href="{p}">{p}</a></li>' for p in ("/debug/varz", "/debug/vars", "/metrics", "/dashboard")
            )
            return _page("debug", f"<h1>debug</h1><ul>{links}</ul>")
        raise HttpError(404, "No such debug page.")

    # ------------------------------------------------------------------ snapshots

    def _idle(self) -> None:
        if self.sampler is not None:
            self.sampler.reset()
        self._last = None

    def _attach(self, write: Callable[[bytes], bool]) -> Callable[[], None]:
        points = list(self.sampler.history) if self.sampler is not None else []
        first = self._last if self._last is not None else self._build()
        write(b"retry: 2000\n\n" + format_event("history", {"points": points}) + first)
        return self.feed.subscribe(write)

    def _build(self) -> bytes:
        self._last = format_event("snapshot", self.snapshot())
        return self._last

    def _coordinator_counts(self) -> dict[str, Any]:
        st = self.service.stats
        return {
            "peers_by_kind": self.service.peers_by_kind(),
            "requests_received": st.requests_received,
            "node_updates_received": st.node_updates_received,
            "resume_tokens_issued": st.resume_issued,
            "resume_tokens_refused": st.resume_refused,
            "authentication_failures": st.auth_failures,
        }

    def snapshot(self) -> dict[str, Any]:
        """Everything the dashboard shows, as one JSON-friendly dict."""
        now = time.time()
        coord_doc = self._coordinator()
        key_names = {
            bytes.fromhex(p["node_key"][len("nodekey:") :]): p["name"]
            for p in coord_doc["peers"]
            if p["node_key"]
        }
        snap: dict[str, Any] = (
            self.sampler.sample(key_names)
            if self.sampler is not None
            else {"relay": None, "point": None}
        )
        snap.update(
            {
                "v": 1,
                "title": self.title,
                "now": now,
                "uptime": now - self.started,
                "coordinator": coord_doc,
                "health": self._health_summary(coord_doc),
            }
        )
        return snap

    def _coordinator(self) -> dict[str, Any]:
        svc = self.service
        coord = svc.coordinator
        infos = coord.peers()
        replica = getattr(coord, "id", None)
        backend = "postgres" if replica is not None else "in-memory"
        names: dict[Any, str] = {}
        peers: list[dict[str, Any]] = []
        for info in infos:
            principal = svc.peer_principal(info.id)
            name = (principal.name if principal is not None and principal.name else info.name) or str(info.id)
            names[info.id] = name
            if len(peers) >= MAX_PEER_ROWS:
                continue
            node = info.node
            as_of = None
            if node is not None and node.HasField("as_of"):
                as_of = node.as_of.seconds + node.as_of.nanos / 1e9
            peers.append(
                {
                    "id": str(info.id),
                    "name": name,
                    "kind": _KIND.get(principal.kind, principal.kind) if principal is not None else "peer",
                    "node_key": _node_key_text(node.key) if node is not None else "",
                    "home_region": node.preferred_derp if node is not None else 0,
                    "addresses": list(node.addresses) if node is not None else [],
                    "connected_since": info.created,
                    "last_update": as_of or info.created,
                    "replica": str(replica) if replica is not None else "",
                }
            )
        peers.sort(key=lambda p: (p["kind"], p["name"], p["id"]))
        tunnels = coord.tunnels()
        kinds: dict[str, int] = {}
        for k, n in svc.peers_by_kind().items():
            kinds[_KIND.get(k, k)] = n
        healthy = bool(getattr(coord, "healthy", True)) and not coord.closed
        return {
            "backend": backend,
            "replica": str(replica) if replica is not None else "",
            "healthy": healthy,
            "peers_total": len(infos),
            "peers_by_kind": kinds,
            "peers": peers,
            "tunnels_total": len(tunnels),
            "tunnels": [
                {
                    "src": str(s),
                    "src_name": names.get(s, str(s)[:8]),
                    "dst": str(d),
                    "dst_name": names.get(d, str(d)[:8] + " (offline)"),
                }
                for s, d in tunnels[:MAX_PEER_ROWS]
            ],
            "updates_received": svc.stats.requests_received,
        }

    def _health_summary(self, coord: dict[str, Any]) -> dict[str, Any]:
        report = None
        if self.health is not None:
            report = self.health.cached_report()
            if self.health.stale() and (self._health_task is None or self._health_task.done()):
                self._health_task = asyncio.ensure_future(self.health.report())
                self._health_task.add_done_callback(_consume)
        out = summarize(report) if report is not None else {"severity": "ok", "healthy": True, "sections": {}}
        sections: dict[str, Any] = {}
        prior = out.get("sections")
        if isinstance(prior, dict):
            sections.update(prior)
        live = {
            "severity": "ok" if coord["healthy"] else "error",
            "error": None if coord["healthy"] else "the coordinator refuses new peers",
        }
        sections["coordinator"] = live
        out["sections"] = sections
        if not coord["healthy"]:
            out["severity"], out["healthy"] = "error", False
        out["link"] = "/api/v2/debug/health"
        return out


def _consume(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.warning("background health check failed: %r", fut.exception())


def _remote(req: Request) -> str:
    r = req.remote
    if isinstance(r, tuple) and len(r) >= 2:
        return f"{r[0]}:{r[1]}"
    return str(r)
