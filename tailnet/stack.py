"""The embedding API: one object running coordinator, HTTP API, DERP relay and STUN.

::

    stack = TailnetStack(StackConfig(http_addr="127.0.0.1:0", grpc_addr="127.0.0.1:0"),
                         authenticator=my_auth,            # optional
                         tunnel_authorizer=my_authorizer,  # optional
                         workspaces=my_provider,           # optional
                         derp_maps=my_map_source)          # optional
    await stack.start()
    ... stack.access_url, stack.grpc_target, stack.derp_url, stack.admin_token ...
    await stack.stop()

What :meth:`TailnetStack.start` does, in order:

1. data directory (``config.data_dir``; ``None`` = in memory): ``derp-server.key``
   (derper's JSON format), ``resume-keys.json`` and ``tokens.json`` — all mode
   0600; the tokens file gets an admin (``control_plane``) token on first start;
2. binds the HTTP port (API + embedded DERP under ``/derp``; with
   ``tls_cert_file``/``tls_key_file`` it terminates TLS itself through the
   relay's TLS path, :mod:`derp.tlsio`, and the access URL defaults to
   ``https://``), the STUN socket and the gRPC port; builds the default DERP map (embedded region
   ``derp_region_id`` pointing at the access URL, ``ForceHTTP`` for ``http``,
   ``STUNPort`` = the STUN port or -1, plus regions from ``derp_config_path``)
   unless ``derp_maps`` was given;
3. wires :class:`~tailnet.service.TailnetService` (coordinator: ``coordinator``
   if given, else the PostgreSQL HA coordinator when ``postgres_url`` is set,
   else the in-memory core; resume
   tokens, workspace provider, tunnel authorizer) to the gRPC server and to
   the HTTP API.

Credentials: the stack's token file always authenticates (so the admin token
works for every endpoint); an embedder's ``authenticator`` is consulted first.
Tokens added with ``tailnet token create`` while the server runs are picked
up on the next unknown-token lookup (the file's mtime is checked).

Agents minted with :meth:`TailnetStack.create_agent` get a workspace in the
in-memory provider (persisted with their token), so users can tunnel to them.

:meth:`stop` is the reverse: DERP-map streams and Coordinate streams end
(peers see LOST "coordinator close"), WebSockets close with 1001, then the
gRPC, DERP and STUN listeners stop. Works on any asyncio loop; the CLI uses uvloop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import ssl
import tempfile
import urllib.parse
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from derp.admission import Admission, AllOf, KnownKeysAdmission, VerifyClientURL
from derp.keys import PrivateKey, load_or_create_server_key
from derp.server import DerpServer, ServerConfig
from derp.stunserver import StunServer
from derp.tls import server_ssl_context
from tailnet.admission import KnownNodeKeys
from tailnet.config import ConfigError, StackConfig, parse_addr
from tailnet.core import Coordinator, CoordinatorAPI
from tailnet.derpmap import (
    DERPMapSource,
    StaticDERPMapSource,
    derp_map_from_json,
    derp_maps_equal,
    embedded_region,
    new_derp_map,
)
from tailnet.health import HealthChecker
from tailnet.http import ApiOptions, HttpApiServer, TailnetApi
from tailnet.identity import Authenticator, Principal
from tailnet.resume import ResumeKeyStore, ResumeTokenProvider
from tailnet.server.grpc import TailnetGrpcServer
from tailnet.service import TailnetService, TunnelAuthorizer
from tailnet.v2 import tailnet_pb2 as pb
from tailnet.workspaces import InMemoryWorkspaceProvider, WorkspaceProvider

__all__ = [
    "TailnetStack",
    "TokenStore",
    "TokenRecord",
    "AgentCredentials",
    "DERP_KEY_FILE",
    "RESUME_KEYS_FILE",
    "TOKENS_FILE",
]

log = logging.getLogger(__name__)

DERP_KEY_FILE = "derp-server.key"
RESUME_KEYS_FILE = "resume-keys.json"
TOKENS_FILE = "tokens.json"

#: Stable principal ID of the stack's admin.
ADMIN_ID = uuid.UUID(int=1)


@dataclass(frozen=True, slots=True)
class TokenRecord:
    """One issued token. Agent records carry their workspace for the in-memory provider."""

    token: str
    principal: Principal
    workspace_id: uuid.UUID | None = None
    owner_id: uuid.UUID | None = None
    workspace_name: str = ""

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "token": self.token,
            "kind": self.principal.kind,
            "id": str(self.principal.id),
            "name": self.principal.name,
        }
        if self.workspace_id is not None:
            doc["workspace_id"] = str(self.workspace_id)
            doc["owner_id"] = str(self.owner_id)
            doc["workspace_name"] = self.workspace_name
        return doc

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> TokenRecord:
        kind = doc["kind"]
        if kind not in ("agent", "user", "control_plane"):
            raise ValueError(f"unknown principal kind {kind!r}")
        ws = doc.get("workspace_id")
        return cls(
            token=str(doc["token"]),
            principal=Principal(kind, uuid.UUID(doc["id"]), str(doc.get("name", ""))),
            workspace_id=uuid.UUID(ws) if ws else None,
            owner_id=uuid.UUID(doc["owner_id"]) if ws else None,
            workspace_name=str(doc.get("workspace_name", "")),
        )


@dataclass(frozen=True, slots=True)
class AgentCredentials:
    """What :meth:`TailnetStack.create_agent` returns."""

    agent_id: uuid.UUID
    workspace_id: uuid.UUID
    owner_id: uuid.UUID
    token: str


class TokenStore:
    """Tokens → principals, optionally persisted to a JSON file (mode 0600).

    An :class:`~tailnet.identity.Authenticator`. With a path, an unknown token
    triggers a reload if the file changed (tokens minted by another process).
    ``on_load(records)`` runs after every (re)load.
    """

    def __init__(self, path: Path | None = None) -> None:
        self._path = path
        self._records: dict[str, TokenRecord] = {}
        self._mtime: int | None = None
        self.on_load: list[Any] = []
        if path is not None and path.exists():
            self._load()

    @property
    def records(self) -> list[TokenRecord]:
        return list(self._records.values())

    def _load(self) -> None:
        assert self._path is not None
        try:
            doc = json.loads(self._path.read_text(encoding="utf-8"))
            records = [TokenRecord.from_json(d) for d in doc.get("tokens", [])]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"cannot load tokens from {self._path}: {exc}") from exc
        self._records = {r.token: r for r in records}
        self._mtime = self._path.stat().st_mtime_ns
        for cb in self.on_load:
            cb(self.records)

    def _save(self) -> None:
        if self._path is None:
            return
        self._path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self._path.parent, prefix=".tokens-")
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump({"tokens": [r.to_json() for r in self._records.values()]}, f, indent=2)
            os.replace(tmp, self._path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self._mtime = self._path.stat().st_mtime_ns

    def add(self, record: TokenRecord) -> None:
        """Store (and persist) ``record``."""
        if self._path is not None and self._path.exists():
            self._maybe_reload()
        self._records[record.token] = record
        self._save()

    def first(self, kind: str) -> TokenRecord | None:
        for r in self._records.values():
            if r.principal.kind == kind:
                return r
        return None

    def _maybe_reload(self) -> None:
        if self._path is None:
            return
        try:
            mtime = self._path.stat().st_mtime_ns
        except OSError:
            return
        if mtime != self._mtime:
            try:
                self._load()
            except ValueError:
                log.exception("tokens file changed but cannot be read; keeping the old tokens")

    async def authenticate(self, token: str) -> Principal | None:
        rec = self._records.get(token)
        if rec is None:
            self._maybe_reload()
            rec = self._records.get(token)
        return rec.principal if rec is not None else None


def new_token() -> str:
    return secrets.token_urlsafe(32)


class _ChainAuthenticator:
    def __init__(self, chain: Sequence[Authenticator]) -> None:
        self._chain = list(chain)

    async def authenticate(self, token: str) -> Principal | None:
        for auth in self._chain:
            p = await auth.authenticate(token)
            if p is not None:
                return p
        return None


def _url_host(host: str) -> str:
    if host in ("", "0.0.0.0", "::"):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


class TailnetStack:
    """Coordinator (gRPC + HTTP/WebSocket), embedded DERP relay and STUN in one process."""

    def __init__(
        self,
        config: StackConfig | None = None,
        *,
        authenticator: Authenticator | None = None,
        tunnel_authorizer: TunnelAuthorizer | None = None,
        workspaces: WorkspaceProvider | None = None,
        derp_maps: DERPMapSource | None = None,
        coordinator: CoordinatorAPI | None = None,
    ) -> None:
        self.config = config or StackConfig(data_dir=None)
        self._custom_auth = authenticator
        self._tunnel_authorizer = tunnel_authorizer
        self.workspaces: WorkspaceProvider = (
            workspaces if workspaces is not None else InMemoryWorkspaceProvider()
        )
        self._custom_derp_maps = derp_maps
        self._coordinator = coordinator
        self.tokens: TokenStore = TokenStore(None)
        self.derp_server: DerpServer | None = None
        self.stun_server: StunServer | None = None
        self.http: HttpApiServer | None = None
        self.grpc: TailnetGrpcServer | None = None
        self.api: TailnetApi | None = None
        self.service: TailnetService | None = None
        self._probe_mesh_key: bytes | None = None
        self.health: HealthChecker | None = None
        self._derp_maps: DERPMapSource | None = None
        self._poll_task: asyncio.Task[None] | None = None
        self._pg: Any = None  # tailnet.pg.PgCoordinator when postgres_url is set
        self._started = False
        self._access_url = ""

    # ------------------------------------------------------------------ properties

    @property
    def derp_maps(self) -> DERPMapSource:
        if self._derp_maps is None:
            raise RuntimeError("stack not started")
        return self._derp_maps

    @property
    def access_url(self) -> str:
        """Base URL of the HTTP API (no trailing slash)."""
        return self._access_url

    @property
    def http_port(self) -> int:
        assert self.http is not None
        return self.http.port

    @property
    def grpc_target(self) -> str | None:
        """``host:port`` of the gRPC coordinator (``None`` if disabled)."""
        return self.grpc.target if self.grpc is not None else None

    @property
    def derp_url(self) -> str:
        """URL of the embedded DERP relay."""
        return self._access_url + "/derp"

    @property
    def stun_port(self) -> int | None:
        return self.stun_server.port if self.stun_server is not None else None

    @property
    def ws_url(self) -> str:
        """``ws://`` / ``wss://`` form of :attr:`access_url`."""
        if self._access_url.startswith("https://"):
            return "wss://" + self._access_url[len("https://") :]
        return "ws://" + self._access_url[len("http://") :]

    @property
    def admin_token(self) -> str:
        rec = self.tokens.first("control_plane")
        if rec is None:
            raise RuntimeError("no admin token (stack not started)")
        return rec.token

    # ------------------------------------------------------------------ tokens

    def create_user(self, user_id: uuid.UUID | None = None, name: str = "user") -> tuple[uuid.UUID, str]:
        """Mint a user token; returns ``(user_id, token)``."""
        uid = user_id or uuid.uuid4()
        token = new_token()
        self.tokens.add(TokenRecord(token, Principal("user", uid, name)))
        return uid, token

    def create_agent(
        self,
        owner_id: uuid.UUID | None = None,
        *,
        agent_id: uuid.UUID | None = None,
        name: str = "main",
        workspace_name: str = "",
    ) -> AgentCredentials:
        """Mint an agent token and register its workspace (owner ``owner_id``, default admin)."""
        aid = agent_id or uuid.uuid4()
        owner = owner_id or ADMIN_ID
        ws_id = uuid.uuid4()
        ws_name = workspace_name or f"ws-{str(aid)[:8]}"
        token = new_token()
        rec = TokenRecord(token, Principal("agent", aid, name), ws_id, owner, ws_name)
        self.tokens.add(rec)
        self._register_agents([rec])
        return AgentCredentials(aid, ws_id, owner, token)

    def _register_agents(self, records: list[TokenRecord]) -> None:
        provider = self.workspaces
        if not isinstance(provider, InMemoryWorkspaceProvider):
            return
        for rec in records:
            if rec.principal.kind != "agent" or rec.workspace_id is None or rec.owner_id is None:
                continue
            if provider.agent_owner(rec.principal.id) is not None:
                continue
            provider.upsert_workspace(rec.owner_id, rec.workspace_id, rec.workspace_name)
            provider.upsert_agent(rec.workspace_id, rec.principal.id, rec.principal.name or "main")

    # ------------------------------------------------------------------ lifecycle

    def _data_path(self, name: str) -> Path | None:
        d = self.config.data_dir
        return None if d is None else d / name

    def prepare_data_dir(self) -> tuple[PrivateKey, ResumeKeyStore]:
        """Create/load the data dir: DERP key, resume keys, tokens (+ admin token)."""
        d = self.config.data_dir
        if d is not None:
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
        key_path = self._data_path(DERP_KEY_FILE)
        key = load_or_create_server_key(key_path) if key_path else PrivateKey.generate()
        resume_keys = ResumeKeyStore.load_or_create(self._data_path(RESUME_KEYS_FILE))
        self.tokens = TokenStore(self._data_path(TOKENS_FILE))
        self.tokens.on_load.append(self._register_agents)
        self._register_agents(self.tokens.records)
        if self.tokens.first("control_plane") is None:
            self.tokens.add(TokenRecord(new_token(), Principal("control_plane", ADMIN_ID, "admin")))
        return key, resume_keys

    def _tls_context(self, derp_key: PrivateKey) -> ssl.SSLContext | None:
        """The HTTP listener's TLS context (None: plain HTTP).

        The chain gets the relay's meta-certificate (derp.tls), so DERP clients
        on TLS 1.3 skip the 101 round trip, as with derper.
        """
        cfg = self.config
        if not cfg.tls_cert_file:
            return None
        floor = ssl.TLSVersion.TLSv1_2 if cfg.tls_min_version == "1.2" else ssl.TLSVersion.TLSv1_3
        try:
            return server_ssl_context(
                cfg.tls_cert_file, cfg.tls_key_file, derp_key.public, min_version=floor
            )
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"cannot load TLS certificate {cfg.tls_cert_file} / key {cfg.tls_key_file}: {exc}"
            ) from None

    def _default_derp_map(self) -> pb.DERPMap:
        cfg = self.config
        split = urllib.parse.urlsplit(self._access_url)
        scheme = split.scheme
        port = split.port or (443 if scheme == "https" else 80)
        region = embedded_region(
            split.hostname or "127.0.0.1",
            port,
            region_id=cfg.derp_region_id,
            scheme=scheme,
            stun_port=self.stun_port if self.stun_port is not None else -1,
            region_code=cfg.derp_region_code,
            region_name=cfg.derp_region_name,
        )
        m = new_derp_map(region)
        if cfg.derp_config_path:
            extra = derp_map_from_json(
                json.loads(Path(cfg.derp_config_path).read_text(encoding="utf-8"))
            )
            for rid, r in extra.regions.items():
                if rid in m.regions:
                    raise ValueError(
                        f"{cfg.derp_config_path}: region {rid} conflicts with the embedded region"
                    )
                m.regions[rid].CopyFrom(r)
        return m

    async def _poll_derp_config(self, src: StaticDERPMapSource) -> None:
        path = Path(self.config.derp_config_path)
        last = path.stat().st_mtime_ns if path.exists() else 0
        while True:
            await asyncio.sleep(self.config.derp_map_poll)
            try:
                mtime = path.stat().st_mtime_ns
                if mtime == last:
                    continue
                last = mtime
                new = self._default_derp_map()
            except (OSError, ValueError) as exc:
                log.warning("DERP config %s not reloaded: %s", path, exc)
                continue
            if not derp_maps_equal(new, src.current()):
                log.info("DERP map changed (%s)", path)
                src.set(new)

    async def _agent_lookup(self, principal: Principal, agent_id: uuid.UUID) -> bool:
        if self._tunnel_authorizer is not None:
            return await self._tunnel_authorizer(principal, agent_id)
        provider = self.workspaces
        if isinstance(provider, InMemoryWorkspaceProvider):
            return provider.can_access(principal, agent_id)
        return False

    def _derp_admission(self) -> Admission | None:
        """The embedded relay's admission hook from ``derp_admission`` /
        ``derp_verify_client_url`` (``None`` admits everyone, as Coder's relay does)."""
        cfg = self.config
        hooks: list[Admission] = []
        if cfg.derp_admission == "known":
            if self._coordinator is not None and not hasattr(self._coordinator, "knows_node_key"):
                raise ConfigError(
                    "derp_admission 'known' needs a coordinator with knows_node_key() "
                    "(the in-memory tailnet.core.Coordinator)"
                )
            hooks.append(KnownKeysAdmission(KnownNodeKeys(self._knows_node_key)))
        if cfg.derp_verify_client_url:
            hooks.append(VerifyClientURL(cfg.derp_verify_client_url, fail_open=False))
        if not hooks:
            return None
        return hooks[0] if len(hooks) == 1 else AllOf(*hooks)

    def _knows_node_key(self, key: bytes) -> bool:
        coord = self.service.coordinator if self.service is not None else None
        knows = getattr(coord, "knows_node_key", None)
        return bool(knows(key)) if knows is not None else False

    async def start(self) -> None:
        """Open the data dir, bind every listener and start serving (see module doc)."""
        if self._started:
            raise RuntimeError("stack already started")
        self._started = True
        cfg = self.config
        key, resume_keys = self.prepare_data_dir()
        if cfg.postgres_url and self._coordinator is None:
            from tailnet.pg import create_pg_coordinator

            self._pg = await create_pg_coordinator(cfg.postgres_url)
            self._coordinator = self._pg
        try:
            await self._start_listeners(key, resume_keys)
        except BaseException:
            await self.stop()
            raise

    async def _start_listeners(self, key: PrivateKey, resume_keys: ResumeKeyStore) -> None:
        cfg = self.config
        http_host, http_port = parse_addr(cfg.http_addr)
        admission = self._derp_admission()
        # The embedded relay's mesh key is a per-process secret: only this process's
        # health probes present it, to get past admission control.
        self._probe_mesh_key = secrets.token_bytes(32) if admission is not None else None
        self.derp_server = DerpServer(
            ServerConfig(
                private_key=key,
                hostname=_url_host(http_host),
                admission=admission,
                mesh_key=self._probe_mesh_key,
            )
        )
        # No listener of its own: clients reach the relay through the HTTP port's /derp.
        await self.derp_server.start(listen=False)
        if cfg.stun_addr is not None:
            stun_host, stun_port = parse_addr(cfg.stun_addr)
            self.stun_server = StunServer()
            await self.stun_server.start(stun_host, stun_port)

        coordinator = self._coordinator if self._coordinator is not None else Coordinator()
        auth_chain: list[Authenticator] = []
        if self._custom_auth is not None:
            auth_chain.append(self._custom_auth)
        auth_chain.append(self.tokens)
        # The map needs the bound HTTP port: bind first with a placeholder app.
        self.http = HttpApiServer(
            _Unready(), derp=self.derp_server, ssl_context=self._tls_context(key)
        )
        await self.http.start(http_host, http_port)
        self._access_url = (
            cfg.access_url or f"{self.http.scheme}://{_url_host(http_host)}:{self.http.port}"
        ).rstrip("/")

        if self._custom_derp_maps is not None:
            self._derp_maps = self._custom_derp_maps
        else:
            src = StaticDERPMapSource(self._default_derp_map())
            self._derp_maps = src
            if cfg.derp_config_path:
                self._poll_task = asyncio.get_running_loop().create_task(
                    self._poll_derp_config(src)
                )
        self.service = TailnetService(
            coordinator=coordinator,
            authenticator=_ChainAuthenticator(auth_chain),
            derp_maps=self._derp_maps,
            resume=ResumeTokenProvider(resume_keys),
            workspaces=self.workspaces,
            tunnel_authorizer=self._tunnel_authorizer,
        )
        self.health = HealthChecker(
            self._derp_maps,
            access_url=self._access_url,
            websocket_url=self.ws_url + "/api/v2/debug/ws",
            token=lambda: self.admin_token,
            timeout=cfg.health_timeout,
            cache_ttl=cfg.health_cache,
            mesh_keys=(
                {cfg.derp_region_id: self._probe_mesh_key} if self._probe_mesh_key else None
            ),
            websocket=cfg.derp_force_websockets,
        )
        self.api = TailnetApi(
            self.service,
            self._derp_maps,
            agent_lookup=self._agent_lookup,
            health=self.health,
            options=ApiOptions(
                derp_force_websockets=cfg.derp_force_websockets,
                disable_direct_connections=cfg.block_direct_connections,
                hostname_suffix=cfg.hostname_suffix,
            ),
        )
        self.http.app = self.api
        if cfg.grpc_addr is not None:
            grpc_host, grpc_port = parse_addr(cfg.grpc_addr)
            self.grpc = TailnetGrpcServer(self.service)
            await self.grpc.start(grpc_host or "0.0.0.0", grpc_port)
        log.info(
            "tailnet: API %s, gRPC %s, DERP %s, STUN %s",
            self._access_url,
            self.grpc_target or "off",
            self.derp_url,
            self.stun_port if self.stun_port is not None else "off",
        )

    async def stop(self, grace: float = 5.0) -> None:
        """Graceful shutdown (see module doc). Idempotent."""
        if self._poll_task is not None:
            self._poll_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poll_task
            self._poll_task = None
        if self.api is not None:
            self.api.close()
        if self.service is not None:
            self.service.close()
        if self.http is not None:
            await self.http.stop(grace)
            self.http = None
        if self._pg is not None:
            pg, self._pg = self._pg, None
            await pg.stop()
        if self.grpc is not None:
            await self.grpc.stop(min(grace, 1.0))
            self.grpc = None
        if self.derp_server is not None:
            # Clients get a Restarting frame first (reconnect soon), as derper --restart-* does.
            await self.derp_server.stop(grace, restarting=True)
            self.derp_server = None
        if self.stun_server is not None:
            await self.stun_server.stop()
            self.stun_server = None

    async def __aenter__(self) -> TailnetStack:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


class _Unready:
    """Placeholder app while the stack finishes starting."""

    async def handle(self, req: Any) -> Any:
        from tailnet.http import HttpError

        raise HttpError(503, "Starting up, try again shortly.")
