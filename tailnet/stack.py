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
   (derper's JSON format), ``resume-keys.json`` and ``tokens.json`` (token
   hashes only, :mod:`tailnet.tokens`) — all mode 0600, written atomically; the
   tokens file gets an admin (``control_plane``) token on first start (its
   plaintext exists only in this process: :attr:`TailnetStack.new_admin_token`);
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
   tokens, workspace provider, tunnel authorizer, ``config.limits``) to the
   gRPC server and to the HTTP API.
4. mounts the operator pages on the HTTP port (:mod:`tailnet.dashboard`: ``/``,
   ``/login``, ``/dashboard``, ``/metrics``, ``/debug/``) and the health checks
   (with a ``database`` section for a PostgreSQL coordinator and a live
   ``coordinator`` section).

Every startup failure raises :class:`StartupError` with one line naming what
failed (address and port, file, PostgreSQL URL without its password); the
PostgreSQL connection is bounded by ``postgres_connect_timeout``.

TLS (``derp_tls_addr``): the embedded relay also listens on that address with
TLS (its own listener, :mod:`derp.server.listener`), serving the configured
certificate chain (or a self-signed certificate for an IP host, created once
in ``<data_dir>/derp-tls/``) followed by derper's meta-certificate
(:func:`derp.tls.server_ssl_context`), so Go clients use fast start. The DERP
map's embedded node then points at it: ``HostName`` = the access URL's host,
``DERPPort`` = the TLS port, no ``ForceHTTP``, and ``CertName`` = the
``sha256-raw`` pin of a self-signed certificate. ``/derp`` on the HTTP port
keeps working.

HA (a coordinator with ``register_replica``, i.e. :class:`tailnet.pg.PgCoordinator`):
the embedded relay gets a fresh key per process (replicas may share a data
directory; equal relay keys would read as a self-connection in the mesh) and
the region's mesh key from the database (unless ``derp_mesh_key_file``); the
replica registers its relay URL (``derp_relay_url``) and
:class:`~tailnet.replicamesh.ReplicaMesh` keeps a mesh link to the relay of
every other live replica of the region. ``derp_mesh_with`` adds static links
(standalone derpers of the region, ours or Tailscale's); their nodes join the
embedded region when ``derp_config_path`` lists them under its region ID. The
DERP map keeps one node for the region: the access URL (Coder's shape behind a
load balancer). ``derp_admission = "known"`` asks the coordinator, which in HA
keeps the node keys of every replica's peers in memory.

Credentials: the stack's token file always authenticates (so the admin token
works for every endpoint); an embedder's ``authenticator`` is consulted first.
The file is checked (one ``stat``) on every authentication and twice a second,
so tokens added or revoked by ``tailnet token create|revoke`` while the server
runs count from the next request on. Revocation (:meth:`TailnetStack.revoke_token`,
the CLI, or removing the entry) also closes the token's open sessions — API
WebSockets with 1008 "session token revoked", gRPC streams with
UNAUTHENTICATED — within a second: every such session is registered in
:attr:`TailnetStack.sessions` (:class:`~tailnet.identity.SessionRegistry`).

Agents minted with :meth:`TailnetStack.create_agent` get a workspace in the
in-memory provider (persisted with their token), so users can tunnel to them.

:meth:`stop` is the reverse: DERP-map streams and Coordinate streams end
(peers see LOST "coordinator close"), WebSockets close with 1001, then the
gRPC, DERP and STUN listeners stop, all within ``grace`` seconds (a PostgreSQL
coordinator that cannot flush during an outage drops its pending writes and says
how many). Works on any asyncio loop; the CLI uses uvloop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import socket
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
from derp.mesh import Mesh, parse_mesh_with
from derp.server import DerpServer, ServerConfig
from derp.stunserver import StunServer
from derp.tls import load_manual_cert, server_ssl_context
from tailnet.admission import KnownNodeKeys
from tailnet.config import ConfigError, StackConfig, parse_addr, read_mesh_key
from tailnet.core import Coordinator, CoordinatorAPI
from tailnet.derpmap import (
    DERPMapSource,
    StaticDERPMapSource,
    derp_map_from_json,
    derp_maps_equal,
    embedded_region,
    new_derp_map,
)
from tailnet.dashboard import OperatorPages
from tailnet.health import HealthChecker, coordinator_section
from tailnet.loopmon import LoopMonitor
from tailnet.http import ApiOptions, HttpApiServer, TailnetApi
from tailnet.identity import Authenticator, Principal, SessionRegistry, StaticTokenAuthenticator
from tailnet.resume import ResumeKeyStore, ResumeTokenProvider
from tailnet.server.grpc import TailnetGrpcServer
from tailnet.service import TailnetService, TunnelAuthorizer
from tailnet.tokens import TokenInfo, TokenRecord, TokenStore
from tailnet.v2 import tailnet_pb2 as pb
from tailnet.workspaces import InMemoryWorkspaceProvider, WorkspaceProvider

__all__ = [
    "StartupError",
    "redact_dsn",
    "TailnetStack",
    "TokenStore",
    "TokenRecord",
    "TokenInfo",
    "AgentCredentials",
    "DERP_KEY_FILE",
    "DERP_TLS_DIR",
    "RESUME_KEYS_FILE",
    "TOKENS_FILE",
]

log = logging.getLogger(__name__)

DERP_KEY_FILE = "derp-server.key"
#: self-signed certificates of the embedded relay's TLS listener (``<host>.crt/.key``)
DERP_TLS_DIR = "derp-tls"
RESUME_KEYS_FILE = "resume-keys.json"
TOKENS_FILE = "tokens.json"

#: Stable principal ID of the stack's admin.
ADMIN_ID = uuid.UUID(int=1)


class StartupError(Exception):
    """:meth:`TailnetStack.start` failed; ``str()`` is one line naming what failed
    (which address and port, which file, which database URL)."""


def redact_dsn(dsn: str) -> str:
    """``dsn`` with any password replaced by ``***`` (safe to print and log)."""
    try:
        split = urllib.parse.urlsplit(dsn)
    except ValueError:
        return "<unparsable PostgreSQL URL>"
    if split.password is None and "password=" not in split.query:
        return dsn
    if "password=" in split.query:
        query = "&".join(
            "password=***" if part.startswith("password=") else part
            for part in split.query.split("&")
        )
        split = split._replace(query=query)
    if split.password is not None:
        netloc = split.netloc.rsplit("@", 1)[1]
        split = split._replace(netloc=f"{split.username or ''}:***@{netloc}")
    return urllib.parse.urlunsplit(split)


def _os_reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc)
    return text or type(exc).__name__


def _where(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host or '0.0.0.0'}:{port}"


@dataclass(frozen=True, slots=True)
class AgentCredentials:
    """What :meth:`TailnetStack.create_agent` returns."""

    agent_id: uuid.UUID
    workspace_id: uuid.UUID
    owner_id: uuid.UUID
    token: str
    #: the token's public id (``tailnet token list`` / :meth:`TailnetStack.revoke_token`)
    token_id: str = ""


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
        #: open sessions by token; revoking a token (here or in the file) closes them
        self.sessions = SessionRegistry()
        #: plaintext of the admin token minted by :meth:`prepare_data_dir` in this
        #: process (first start), else ``None``: only its hash is stored
        self.new_admin_token: str | None = None
        # a control-plane token for this process only (never stored): the health checks'
        self._process_token = ""
        self._process_auth = StaticTokenAuthenticator()
        self._token_watch: asyncio.Task[None] | None = None
        self.derp_server: DerpServer | None = None
        self.stun_server: StunServer | None = None
        self.http: HttpApiServer | None = None
        self.grpc: TailnetGrpcServer | None = None
        self.api: TailnetApi | None = None
        self.service: TailnetService | None = None
        self._probe_mesh_key: bytes | None = None
        #: the embedded relay's mesh (HA replicas and/or derp_mesh_with), else None
        self.mesh: Mesh | None = None
        self.replica_mesh: Any = None  # tailnet.replicamesh.ReplicaMesh in HA
        self._ha: Any = None  # the coordinator when it is an HA replica (register_replica)
        self.health: HealthChecker | None = None
        self.pages: OperatorPages | None = None
        self._derp_maps: DERPMapSource | None = None
        self._poll_task: asyncio.Task[None] | None = None
        self._pg: Any = None  # tailnet.pg.PgCoordinator when postgres_url is set
        #: the PostgreSQL coordinator in use (ours or an embedder's): health's database check
        self._db: Any = None
        self._tls_host = ""  # DERP map host of the TLS listener (derp_tls_addr)
        self._tls_pin: str | None = None  # CertName of a self-signed TLS certificate
        self._tls_tmp: tempfile.TemporaryDirectory[str] | None = None
        self._started = False
        self._access_url = ""
        self.loop_monitor = LoopMonitor()
        """Event-loop stalls of this stack's loop (``/api/v2/debug/loop``)."""

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
    def derp_tls_url(self) -> str | None:
        """``https://host:port/derp`` of the relay's TLS listener (``None`` without one)."""
        if not self.config.derp_tls_addr or self.derp_server is None:
            return None
        host = f"[{self._tls_host}]" if ":" in self._tls_host else self._tls_host
        return f"https://{host}:{self.derp_server.port}/derp"

    @property
    def derp_cert_name(self) -> str | None:
        """``sha256-raw:<hex>`` pin of the relay's self-signed TLS certificate, if any."""
        return self._tls_pin

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
        """A control-plane token valid while this stack runs.

        The persisted admin token when this process minted it (first start with
        this data dir, or in memory); otherwise a token for this process only
        (never stored), since the file keeps only hashes.
        """
        if self.new_admin_token is not None:
            return self.new_admin_token
        if not self._process_token:
            raise RuntimeError("no admin token (stack not started)")
        return self._process_token

    # ------------------------------------------------------------------ tokens

    def create_user(self, user_id: uuid.UUID | None = None, name: str = "user") -> tuple[uuid.UUID, str]:
        """Mint a user token; returns ``(user_id, token)`` (the token's id is its
        prefix up to the first ``-``)."""
        uid = user_id or uuid.uuid4()
        _, token = self.tokens.issue(Principal("user", uid, name))
        return uid, token

    def create_admin(self, name: str = "admin") -> str:
        """Mint another admin (``control_plane``) token; returns it."""
        _, token = self.tokens.issue(Principal("control_plane", ADMIN_ID, name))
        return token

    def list_tokens(self) -> list[TokenInfo]:
        """Every stored token: id, kind, principal id, name, created, last used (this process)."""
        return self.tokens.infos()

    def revoke_token(self, token_id: str) -> bool:
        """Revoke a stored token: it stops authenticating now and its open sessions
        close. Returns False if there is no such token."""
        return self.tokens.revoke(token_id)

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
        rec, token = self.tokens.issue(
            Principal("agent", aid, name),
            workspace_id=ws_id,
            owner_id=owner,
            workspace_name=ws_name,
        )
        self._register_agents([rec])
        return AgentCredentials(aid, ws_id, owner, token, rec.id)

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

    def prepare_data_dir(self, *, create_admin: bool = True) -> tuple[PrivateKey, ResumeKeyStore]:
        """Create/load the data dir: DERP key, resume keys, tokens (+ an admin token
        if there is none and ``create_admin``: its plaintext is :attr:`new_admin_token`).

        Raises :class:`StartupError` naming the directory or file that failed.
        """
        d = self.config.data_dir
        try:
            return self._prepare_data_dir(create_admin)
        except StartupError:
            raise
        except (OSError, ValueError) as exc:
            where = f"data dir {d}" if d is not None else "in-memory state"
            if isinstance(exc, OSError) and exc.filename:
                where = f"data dir file {exc.filename}"
                if d is not None and Path(str(exc.filename)) == d:
                    where = f"data dir {d}"
            raise StartupError(f"{where}: {_os_reason(exc)}") from None

    def _prepare_data_dir(self, create_admin: bool) -> tuple[PrivateKey, ResumeKeyStore]:
        d = self.config.data_dir
        if d is not None:
            if d.exists() and not d.is_dir():
                raise StartupError(f"data dir {d}: exists but is not a directory")
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
        key_path = self._data_path(DERP_KEY_FILE)
        key = load_or_create_server_key(key_path) if key_path else PrivateKey.generate()
        resume_keys = ResumeKeyStore.load_or_create(self._data_path(RESUME_KEYS_FILE))
        self.tokens = TokenStore(self._data_path(TOKENS_FILE))
        self.tokens.on_load.append(self._register_agents)
        self.tokens.on_revoke.append(self.sessions.revoke)
        self._register_agents(self.tokens.records)
        if create_admin and self.tokens.first("control_plane") is None:
            self.new_admin_token = self.create_admin()
        return key, resume_keys

    async def _watch_tokens(self, period: float = 0.5) -> None:
        """Notice tokens revoked by another process (CLI) even without requests."""
        while True:
            await asyncio.sleep(period)
            self.tokens.check()

    def _merge_config_regions(self, m: pb.DERPMap, extra: pb.DERPMap, path: str) -> None:
        rid_self = self.config.derp_region_id
        for rid, r in extra.regions.items():
            if rid == rid_self:
                # Standalone relays meshed with the embedded one join its region.
                for n in r.nodes:
                    node = m.regions[rid].nodes.add()
                    node.CopyFrom(n)
                    node.region_id = rid
                continue
            if rid in m.regions:
                raise ValueError(f"{path}: region {rid} is listed twice")
            m.regions[rid].CopyFrom(r)

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
        host = split.hostname or "127.0.0.1"
        if cfg.derp_tls_addr and self.derp_server is not None:
            scheme, host, port = "https", self._tls_host, self.derp_server.port
        region = embedded_region(
            host,
            port,
            region_id=cfg.derp_region_id,
            scheme=scheme,
            stun_port=self.stun_port if self.stun_port is not None else -1,
            region_code=cfg.derp_region_code,
            region_name=cfg.derp_region_name,
        )
        if self._tls_pin is not None and cfg.derp_tls_addr:
            region.nodes[0].cert_name = self._tls_pin
        m = new_derp_map(region)
        if cfg.derp_config_path:
            path = cfg.derp_config_path
            try:
                doc = json.loads(Path(path).read_text(encoding="utf-8"))
            except OSError as exc:
                raise ValueError(f"derp_config_path {path}: cannot read: {_os_reason(exc)}") from None
            except ValueError as exc:
                raise ValueError(f"derp_config_path {path}: not valid JSON: {exc}") from None
            try:
                extra = derp_map_from_json(doc)
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"derp_config_path {path}: not a DERP map: {exc}") from None
            self._merge_config_regions(m, extra, path)
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
                    "(tailnet.core.Coordinator or tailnet.pg.PgCoordinator)"
                )
            track = getattr(self._coordinator, "track_node_keys", None)
            if track is not None:
                track()  # HA: keep every replica's node keys in memory
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
        self.loop_monitor.start()
        if cfg.postgres_url and self._coordinator is None:
            self._pg = await self._connect_postgres()
            self._coordinator = self._pg
        if self._coordinator is not None and hasattr(self._coordinator, "ping"):
            self._db = self._coordinator
        if hasattr(self._coordinator, "register_replica"):
            self._ha = self._coordinator
            key = PrivateKey.generate()  # per process: see the module docstring
        try:
            await self._start_listeners(key, resume_keys)
        except BaseException:
            await self.stop(grace=1.0)
            raise

    async def _connect_postgres(self) -> Any:
        from tailnet.pg import create_pg_coordinator

        cfg = self.config
        where = redact_dsn(cfg.postgres_url)
        limit = cfg.postgres_connect_timeout
        try:
            return await asyncio.wait_for(
                create_pg_coordinator(
                    cfg.postgres_url, limits=cfg.limits,
                    heartbeat_interval=cfg.replica_heartbeat,
                ),
                limit,
            )
        except TimeoutError:
            raise StartupError(
                f"PostgreSQL at {where}: no answer within {limit:g}s (postgres_connect_timeout)"
            ) from None
        except (OSError, ValueError) as exc:
            raise StartupError(f"PostgreSQL at {where}: {_os_reason(exc)}") from None
        except Exception as exc:  # asyncpg errors (auth, missing database, ...)
            raise StartupError(
                f"PostgreSQL at {where}: {type(exc).__name__}: {_os_reason(exc)}"
            ) from None

    async def _start_listeners(self, key: PrivateKey, resume_keys: ResumeKeyStore) -> None:
        cfg = self.config
        http_host, http_port = parse_addr(cfg.http_addr)
        admission = self._derp_admission()
        self._probe_mesh_key = await self._mesh_key(admission is not None)
        ssl_ctx = self._derp_tls(key, http_host) if cfg.derp_tls_addr else None
        self.derp_server = DerpServer(
            ServerConfig(
                private_key=key,
                hostname=_url_host(http_host),
                admission=admission,
                mesh_key=self._probe_mesh_key,
                ssl_context=ssl_ctx,
            )
        )
        if cfg.derp_tls_addr:
            tls_host, tls_port = parse_addr(cfg.derp_tls_addr)
            try:
                await self.derp_server.start(tls_host, tls_port)
            except OSError as exc:
                raise StartupError(
                    f"cannot listen on DERP TLS address {_where(tls_host, tls_port)} (TCP, "
                    f"derp_tls_addr): {_os_reason(exc)}"
                ) from None
        else:
            # No listener of its own: clients reach the relay through the HTTP port's /derp.
            await self.derp_server.start(listen=False)
        if self._ha is not None or cfg.derp_mesh_with:
            self.mesh = Mesh(self.derp_server, parse_mesh_with(cfg.derp_mesh_with, "http"))
            self.mesh.start()
        if cfg.stun_addr is not None:
            stun_host, stun_port = parse_addr(cfg.stun_addr)
            self.stun_server = StunServer(stats=self.derp_server.metrics.stun)
            try:
                await self.stun_server.start(stun_host, stun_port)
            except OSError as exc:
                self.stun_server = None
                raise StartupError(
                    f"cannot listen on STUN address {_where(stun_host, stun_port)} (UDP, "
                    f"stun_addr): {_os_reason(exc)}; pick another port or 'off'"
                ) from None

        limits = cfg.limits
        coordinator = (
            self._coordinator if self._coordinator is not None else Coordinator(limits=limits)
        )
        self._process_token = secrets.token_urlsafe(32)
        self._process_auth.add(
            self._process_token, Principal("control_plane", ADMIN_ID, "this process")
        )
        auth_chain: list[Authenticator] = []
        if self._custom_auth is not None:
            auth_chain.append(self._custom_auth)
        auth_chain += [self.tokens, self._process_auth]
        if self.config.data_dir is not None:
            self._token_watch = asyncio.get_running_loop().create_task(self._watch_tokens())
        # The map needs the bound HTTP port: bind first with a placeholder app.
        self.http = HttpApiServer(
            _Unready(), derp=self.derp_server, ssl_context=self._tls_context(key)
        )
        try:
            await self.http.start(http_host, http_port)
        except OSError as exc:
            self.http = None
            raise StartupError(
                f"cannot listen on HTTP address {_where(http_host, http_port)} (TCP, "
                f"http_addr): {_os_reason(exc)}"
            ) from None
        self._access_url = (
            cfg.access_url or f"{self.http.scheme}://{_url_host(http_host)}:{self.http.port}"
        ).rstrip("/")

        if self._custom_derp_maps is not None:
            self._derp_maps = self._custom_derp_maps
        else:
            try:
                src = StaticDERPMapSource(self._default_derp_map())
            except ValueError as exc:
                raise StartupError(str(exc)) from None
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
            limits=limits,
        )
        self.health = HealthChecker(
            self._derp_maps,
            access_url=self._access_url,
            websocket_url=self.ws_url + "/api/v2/debug/ws",
            token=lambda: self._process_token,
            timeout=cfg.health_timeout,
            cache_ttl=cfg.health_cache,
            mesh_keys=(
                {cfg.derp_region_id: self._probe_mesh_key} if self._probe_mesh_key else None
            ),
            websocket=cfg.derp_force_websockets,
            database_ping=self._db.ping if self._db is not None else None,
            coordinator=self._coordinator_section,
            mesh=self._mesh_health if self.mesh is not None else None,
        )
        self.pages = OperatorPages(
            self.service,
            derp_server=self.derp_server,
            health=self.health,
            access_url=self._access_url,
            debug_allow=cfg.debug_networks,
        )
        self.api = TailnetApi(
            self.service,
            self._derp_maps,
            agent_lookup=self._agent_lookup,
            health=self.health,
            loop_monitor=self.loop_monitor,
            options=ApiOptions(
                derp_force_websockets=cfg.derp_force_websockets,
                disable_direct_connections=cfg.block_direct_connections,
                hostname_suffix=cfg.hostname_suffix,
                max_rpc_streams=limits.max_streams_per_session,
            ),
            sessions=self.sessions,
            pages=self.pages,
        )
        self.http.app = self.api
        if cfg.grpc_addr is not None:
            grpc_host, grpc_port = parse_addr(cfg.grpc_addr)
            self.grpc = TailnetGrpcServer(self.service, sessions=self.sessions)
            try:
                await self.grpc.start(grpc_host or "0.0.0.0", grpc_port)
            except (OSError, RuntimeError) as exc:
                self.grpc = None
                raise StartupError(
                    f"cannot listen on gRPC address {_where(grpc_host, grpc_port)} (TCP, "
                    f"grpc_addr): {_os_reason(exc)}"
                ) from None
        if self._ha is not None:
            await self._join_replicas(http_host)
        log.info(
            "tailnet: API %s, gRPC %s, DERP %s%s, STUN %s",
            self._access_url,
            self.grpc_target or "off",
            self.derp_url,
            f" and {self.derp_tls_url}" if self.derp_tls_url else "",
            self.stun_port if self.stun_port is not None else "off",
        )

    def _coordinator_section(self) -> dict[str, Any]:
        """The health report's live ``coordinator`` section."""
        coord = self.service.coordinator if self.service is not None else None
        if coord is None:
            return coordinator_section(accepting=False, backend="none", peers=0,
                                       error="the stack is not running")
        healthy = bool(getattr(coord, "healthy", True))
        closed = coord.closed
        error = None
        if closed:
            error = "the coordinator is closed (shutting down)"
        elif not healthy:
            error = (
                "coordinator unhealthy: this replica cannot write its heartbeat to "
                "PostgreSQL and refuses every Coordinate"
            )
        stats = coord.stats() if hasattr(coord, "stats") else None
        extra: dict[str, Any] = {}
        if self._db is not None:
            extra["replica"] = str(self._db.id)
            extra["heartbeat_failures"] = self._db.heartbeat_failures
        return coordinator_section(
            accepting=healthy and not closed,
            backend="postgres" if self._db is not None else "in-memory",
            peers=stats.peers if stats is not None else len(coord.peers()),
            error=error,
            **extra,
        )

    def _derp_tls(self, key: PrivateKey, http_host: str) -> Any:
        """The TLS context of the relay's own listener (module docstring)."""
        cfg = self.config
        host = urllib.parse.urlsplit(cfg.access_url).hostname if cfg.access_url else None
        self._tls_host = host or _url_host(http_host).strip("[]")
        if cfg.derp_tls_cert_file:
            cert, tls_key = cfg.derp_tls_cert_file, cfg.derp_tls_key_file
        else:
            if cfg.data_dir is not None:
                certdir = cfg.data_dir / DERP_TLS_DIR
            else:
                self._tls_tmp = tempfile.TemporaryDirectory(prefix="tailnet-derp-tls-")
                certdir = Path(self._tls_tmp.name)
            try:
                mc = load_manual_cert(certdir, self._tls_host)
            except FileNotFoundError:
                raise ConfigError(
                    f"derp_tls_addr: {self._tls_host!r} is not an IP address, so no "
                    "self-signed certificate: give derp_tls_cert_file and derp_tls_key_file"
                ) from None
            cert, tls_key = str(mc.cert_file), str(mc.key_file)
            self._tls_pin = mc.pin
        try:
            return server_ssl_context(cert, tls_key, key.public)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            raise ConfigError(f"derp TLS certificate {cert}: {exc}") from None

    # ------------------------------------------------------------------ mesh / HA

    async def _mesh_key(self, admission: bool) -> bytes | None:
        """The embedded relay's mesh key: ``derp_mesh_key_file``, else in HA the key
        shared through the database, else (admission control only) a per-process
        secret that only this process's health probes present. Never logged."""
        cfg = self.config
        if cfg.derp_mesh_key_file:
            return read_mesh_key(cfg.derp_mesh_key_file)
        if self._ha is not None:
            key: bytes = await self._ha.derp_mesh_key()
            return key
        if cfg.derp_mesh_with:
            raise ConfigError("derp_mesh_with needs derp_mesh_key_file (or postgres_url)")
        return secrets.token_bytes(32) if admission else None

    def _relay_url(self, http_host: str) -> str:
        cfg = self.config
        if cfg.derp_relay_url:
            return cfg.derp_relay_url.rstrip("/")
        if http_host in ("", "0.0.0.0", "::"):
            log.warning(
                "HA: the HTTP address %s is a wildcard and derp_relay_url is not set: other "
                "replicas cannot mesh with this replica's relay (set --derp-relay-url)",
                cfg.http_addr,
            )
            return ""
        return f"http://{_url_host(http_host)}:{self.http_port}"

    async def _join_replicas(self, http_host: str) -> None:
        """Register this replica's relay and follow the others (module docstring)."""
        from tailnet.pg.replicas import ReplicaInfo
        from tailnet.replicamesh import ReplicaMesh

        ha = self._ha
        assert self.mesh is not None and ha is not None
        rm = ReplicaMesh(self.mesh, ha.id, self.config.derp_region_id,
                         on_change=ha.mesh_status_changed)
        self.replica_mesh = rm
        rm.start()
        ha.add_replica_listener(rm.update)
        info = ReplicaInfo(self._relay_url(http_host), self.config.derp_region_id,
                           socket.gethostname())
        await ha.register_replica(
            info, mesh_status=lambda: json.dumps(rm.status(), separators=(",", ":"))
        )
        rm.update(ha.replicas)

    async def _mesh_health(self) -> dict[str, Any]:
        """The health report's ``derp.mesh`` section (:func:`tailnet.health.mesh_report`)."""
        from tailnet.health import mesh_report
        from tailnet.replicamesh import link_status

        rm = self.replica_mesh
        mesh = self.mesh
        own = rm.status() if rm is not None else [
            link_status(link, None) for link in (mesh.links if mesh is not None else ())
        ]
        ha = self._ha
        if ha is None or ha.replica_info is None:
            me = {"id": "local", "hostname": socket.gethostname(), "relay_url": self.access_url,
                  "region_id": self.config.derp_region_id, "started_at": None,
                  "heartbeat_at": None, "links": own}
            return mesh_report([me], self_id="local")
        relays: list[dict[str, Any]] = []
        seen_self = False
        for r in await ha.fetch_replicas():
            if r.id == ha.id:
                seen_self = True
                links: list[dict[str, Any]] | None = own
            else:
                links = _parse_links(r.mesh_status)
            relays.append({"id": str(r.id), "hostname": r.hostname, "relay_url": r.relay_url,
                           "region_id": r.region_id, "started_at": r.started_at,
                           "heartbeat_at": r.heartbeat_at, "links": links})
        if not seen_self:  # e.g. our heartbeats are failing: still show our own links
            info = ha.replica_info
            relays.append({"id": str(ha.id), "hostname": info.hostname,
                           "relay_url": info.relay_url, "region_id": info.region_id,
                           "started_at": None, "heartbeat_at": None, "links": own})
        return mesh_report(relays, self_id=str(ha.id))

    async def stop(self, grace: float = 5.0) -> None:
        """Graceful shutdown (see module doc), bounded by ``grace`` seconds overall.
        Idempotent."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace

        def left() -> float:
            return max(0.1, deadline - loop.time())

        self.loop_monitor.stop()
        if self._token_watch is not None:
            self._token_watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._token_watch
            self._token_watch = None
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
            await self.http.stop(left() / 2)
            self.http = None
        if self._pg is not None:
            pg, self._pg = self._pg, None
            await pg.stop(timeout=left() / 2)
        if self.grpc is not None:
            await self.grpc.stop(min(left() / 2, 1.0))
            self.grpc = None
        if self.replica_mesh is not None:
            await self.replica_mesh.stop()
            self.replica_mesh = None
        if self.mesh is not None:
            await self.mesh.stop()
            self.mesh = None
        if self.derp_server is not None:
            # Clients get a Restarting frame first (reconnect soon), as derper --restart-* does.
            await self.derp_server.stop(left(), restarting=True)
            self.derp_server = None
        if self.stun_server is not None:
            await self.stun_server.stop()
            self.stun_server = None
        if self._tls_tmp is not None:
            self._tls_tmp.cleanup()
            self._tls_tmp = None

    async def __aenter__(self) -> TailnetStack:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def _parse_links(text: str) -> list[dict[str, Any]] | None:
    """A replica's stored mesh status (JSON list of link objects), or None if unusable."""
    if not text:
        return None
    try:
        doc = json.loads(text)
    except ValueError:
        return None
    if not isinstance(doc, list) or not all(isinstance(x, dict) for x in doc):
        return None
    return doc


class _Unready:
    """Placeholder app while the stack finishes starting."""

    async def handle(self, req: Any) -> Any:
        from tailnet.http import HttpError

        raise HttpError(503, "Starting up, try again shortly.")
