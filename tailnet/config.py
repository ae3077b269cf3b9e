"""Configuration of the embedded stack: flags > ``TAILNET_*`` environment > TOML file > defaults.

Every option is declared once in :data:`OPTIONS` (name, type, default, help);
from that table come the ``tailnet serve`` flags (``--http-addr``), the
environment variables (``TAILNET_HTTP_ADDR``) and the TOML keys (``http_addr``,
top level of the file given by ``--config`` / ``TAILNET_CONFIG``). Booleans
accept ``1/true/yes/on`` and ``0/false/no/off`` in the environment.

Defaults: HTTP API and embedded DERP on ``127.0.0.1:3000``, gRPC coordinator
on ``127.0.0.1:3001``, STUN on UDP ``127.0.0.1:3478``, data in ``$XDG_STATE_HOME/tailnet-core`` (or
``~/.local/state/tailnet-core``), access URL derived from the HTTP address.

Resource limits (:mod:`tailnet.limits`): the per-principal, per-connection and
per-peer ones are options here (``max_peers_per_principal``,
``max_streams_per_grpc_connection``, ``max_streams_per_session``,
``max_tunnels_per_peer``, ``peer_buffer_bytes``); :attr:`StackConfig.limits`
combines them with the library defaults of the node/request caps.
"""

from __future__ import annotations

import argparse
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Final

from derp.mesh import parse_mesh_with
from tailnet.limits import DEFAULT_LIMITS, Limits

__all__ = [
    "Option",
    "OPTIONS",
    "StackConfig",
    "ConfigError",
    "default_data_dir",
    "parse_addr",
    "read_mesh_key",
    "add_arguments",
    "load_config",
    "ENV_PREFIX",
]

ENV_PREFIX: Final = "TAILNET_"


class ConfigError(ValueError):
    """A configuration value is invalid; ``str()`` names the source and the option."""


def default_data_dir() -> Path:
    """``$XDG_STATE_HOME/tailnet-core``, else ``~/.local/state/tailnet-core``."""
    base = os.environ.get("XDG_STATE_HOME")
    root = Path(base) if base else Path.home() / ".local" / "state"
    return root / "tailnet-core"


def parse_addr(text: str) -> tuple[str, int]:
    """``host:port`` / ``[v6]:port`` / ``:port`` → ``(host, port)`` (empty host = all)."""
    t = text.strip()
    if t.startswith("["):
        host, sep, rest = t[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError(f"invalid address {text!r}: expected [host]:port")
        port_text = rest[1:]
    else:
        host, sep, port_text = t.rpartition(":")
        if not sep:
            raise ValueError(f"invalid address {text!r}: expected host:port")
    if not port_text.isdigit():
        raise ValueError(f"invalid port {port_text!r} in address {text!r}")
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise ValueError(
            f"port {port} out of range 0-65535 in address {text!r} (0 = any free port)"
        )
    return host, port


def read_mesh_key(path: str) -> bytes:
    """The 32-byte mesh key in ``path`` (64 hex digits, derper's ``--mesh-psk-file``
    format); :class:`ConfigError` names the file (never the content)."""
    try:
        text = Path(path).read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"derp_mesh_key_file {path}: cannot read: {exc}") from None
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != 32:
        raise ConfigError(f"derp_mesh_key_file {path}: must hold 64 hex digits")
    return key


@dataclass(frozen=True, slots=True)
class Option:
    name: str
    kind: type
    default: Any
    help: str


OPTIONS: Final[tuple[Option, ...]] = (
    Option("http_addr", str, "127.0.0.1:3000",
           "Address of the HTTP API; the embedded DERP relay is served on the same port "
           "under /derp. Port 0 picks a free port."),
    Option("grpc_addr", str, "127.0.0.1:3001",
           "Address of the gRPC coordinator (coder.tailnet.v2.Tailnet). 'off' disables it."),
    Option("stun_addr", str, "127.0.0.1:3478",
           "UDP address of the embedded STUN responder (advertised as the embedded "
           "node's STUNPort). 'off' disables STUN (STUNPort -1)."),
    Option("access_url", str, "",
           "External URL clients use to reach the HTTP API (and the embedded relay); "
           "default http://<http-addr with the bound port> (https:// with --tls-cert-file)."),
    Option("tls_cert_file", str, "",
           "PEM certificate chain: the HTTP listener (API and embedded DERP) terminates "
           "TLS itself. Needs --tls-key-file."),
    Option("tls_key_file", str, "", "PEM private key of --tls-cert-file."),
    Option("tls_min_version", str, "1.3",
           "Lowest TLS version of the HTTP listener: 1.3 (default, as the DERP relay) or 1.2."),
    Option("data_dir", str, "",
           "Directory for persistent state: DERP server key, resume-token keys, tokens "
           "(default $XDG_STATE_HOME/tailnet-core or ~/.local/state/tailnet-core)."),
    Option("derp_region_id", int, 999, "Region ID of the embedded DERP relay."),
    Option("derp_region_code", str, "coder", "Region code of the embedded DERP relay."),
    Option("derp_region_name", str, "Coder Embedded Relay", "Region name of the embedded relay."),
    Option("derp_config_path", str, "",
           "Optional JSON file (Go tailcfg.DERPMap) with extra DERP regions to advertise."),
    Option("derp_admission", str, "any",
           "Which clients the embedded DERP relay admits: 'any' (like Coder's embedded relay) "
           "or 'known' (only node keys the coordinator currently knows; with PostgreSQL, "
           "keys known to any replica)."),
    Option("derp_verify_client_url", str, "",
           "Also ask this URL (derper's --verify-client-url protocol) before admitting a "
           "DERP client; fails closed when the URL is unreachable."),
    Option("derp_force_websockets", bool, False,
           "Tell clients to reach DERP over WebSocket (reported in /connection)."),
    Option("block_direct_connections", bool, False,
           "Tell clients not to attempt direct (P2P) connections."),
    Option("hostname_suffix", str, "coder", "DNS suffix reported to clients."),
    Option("derp_map_poll", float, 5.0,
           "Seconds between re-reads of --derp-config-path (changes are pushed to clients)."),
    Option("health_cache", float, 10.0, "Seconds a health report is cached (?force=true re-runs)."),
    Option("health_timeout", float, 5.0, "Timeout of each health check."),
    Option("postgres_url", str, "",
           "PostgreSQL DSN: use the HA coordinator (tailnet.pg) instead of the in-memory one; "
           "replicas on the same database also mesh their embedded DERP relays."),
    Option("replica_heartbeat", float, 2.0,
           "Seconds between this replica's heartbeats in PostgreSQL; a replica silent for 3 "
           "heartbeats is dead (its peers are LOST, it leaves the mesh)."),
    Option("derp_relay_url", str, "",
           "With PostgreSQL: the URL other replicas dial to reach this replica's embedded "
           "relay (http[s]://host:port; default http://<http-addr> unless it is a wildcard "
           "address). Clients keep using the access URL (one node per region)."),
    Option("derp_mesh_key_file", str, "",
           "File holding the 64-hex-digit DERP mesh key of the embedded relay's region "
           "(default with PostgreSQL: one key shared through the database)."),
    Option("derp_tls_addr", str, "",
           "Also serve the embedded DERP relay over TLS on this address (derper's "
           "meta-certificate included, so Go clients use fast start); the DERP map's embedded "
           "node then points at it. Default: off."),
    Option("derp_tls_cert_file", str, "",
           "PEM certificate chain for --derp-tls-addr (with --derp-tls-key-file). Without "
           "both, an IP access-URL host gets a self-signed certificate kept in the data "
           "directory and its CertName pin in the DERP map."),
    Option("derp_tls_key_file", str, "", "PEM private key of --derp-tls-cert-file."),
    Option("derp_mesh_with", str, "",
           "Comma-separated relays (derper or tailnet-core) the embedded relay meshes with: "
           "URLs, or host[:port] (http). Needs a mesh key: --derp-mesh-key-file or PostgreSQL."),
    Option("max_peers_per_principal", int, DEFAULT_LIMITS.max_peers_per_principal,
           "Concurrent Coordinate streams one principal (agent, user or control-plane "
           "token identity) may hold in this process; more are refused with "
           "RESOURCE_EXHAUSTED."),
    Option("max_streams_per_grpc_connection", int,
           DEFAULT_LIMITS.max_streams_per_grpc_connection,
           "Concurrent RPCs on one gRPC (HTTP/2) connection (grpc.max_concurrent_streams); "
           "further calls on it wait for a free slot."),
    Option("max_streams_per_session", int, DEFAULT_LIMITS.max_streams_per_session,
           "Concurrent RPC streams on one WebSocket RPC session; more are refused with "
           "RESOURCE_EXHAUSTED."),
    Option("max_tunnels_per_peer", int, DEFAULT_LIMITS.max_tunnels_per_peer,
           "Tunnels one coordinator peer may have as their source; an AddTunnel beyond it "
           "ends that stream with RESOURCE_EXHAUSTED."),
    Option("peer_buffer_bytes", int, DEFAULT_LIMITS.peer_buffer_bytes,
           "Bytes of responses waiting for one coordinator peer (besides at most "
           f"{DEFAULT_LIMITS.peer_buffer_responses} responses) before it is evicted as a "
           "slow consumer."),
    Option("debug_allow", str, "",
           "Comma-separated networks (CIDRs) allowed to read /metrics and /debug/ "
           "(default: loopback only, as derper's --debug-allow)."),
    Option("postgres_connect_timeout", float, 10.0,
           "Seconds to wait for PostgreSQL at startup before giving up with an error."),
    Option("log_level", str, "INFO", "Log level: DEBUG, INFO, WARNING, ERROR."),
)


@dataclass(frozen=True, slots=True)
class StackConfig:
    """Resolved settings of a :class:`~tailnet.stack.TailnetStack`.

    ``data_dir=None`` keeps everything in memory (fresh keys on every start);
    ``grpc_addr=None`` disables the gRPC listener.
    """

    http_addr: str = "127.0.0.1:3000"
    grpc_addr: str | None = "127.0.0.1:3001"
    stun_addr: str | None = "127.0.0.1:3478"
    access_url: str = ""
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_min_version: str = "1.3"
    data_dir: Path | None = None
    derp_region_id: int = 999
    derp_region_code: str = "coder"
    derp_region_name: str = "Coder Embedded Relay"
    derp_config_path: str = ""
    derp_admission: str = "any"
    derp_verify_client_url: str = ""
    derp_force_websockets: bool = False
    block_direct_connections: bool = False
    hostname_suffix: str = "coder"
    derp_map_poll: float = 5.0
    health_cache: float = 10.0
    health_timeout: float = 5.0
    postgres_url: str = ""
    postgres_connect_timeout: float = 10.0
    debug_allow: str = ""
    replica_heartbeat: float = 2.0
    derp_relay_url: str = ""
    derp_mesh_key_file: str = ""
    derp_mesh_with: str = ""
    derp_tls_addr: str = ""
    derp_tls_cert_file: str = ""
    derp_tls_key_file: str = ""
    log_level: str = "INFO"
    max_peers_per_principal: int = DEFAULT_LIMITS.max_peers_per_principal
    max_streams_per_grpc_connection: int = DEFAULT_LIMITS.max_streams_per_grpc_connection
    max_streams_per_session: int = DEFAULT_LIMITS.max_streams_per_session
    max_tunnels_per_peer: int = DEFAULT_LIMITS.max_tunnels_per_peer
    peer_buffer_bytes: int = DEFAULT_LIMITS.peer_buffer_bytes

    @property
    def debug_networks(self) -> tuple[str, ...] | None:
        """``debug_allow`` as a tuple of networks (``None``: loopback only)."""
        nets = tuple(n.strip() for n in self.debug_allow.split(",") if n.strip())
        return nets or None

    @property
    def limits(self) -> Limits:
        """:class:`~tailnet.limits.Limits` from the limit options (others at defaults)."""
        return Limits(
            max_peers_per_principal=self.max_peers_per_principal,
            max_streams_per_grpc_connection=self.max_streams_per_grpc_connection,
            max_streams_per_session=self.max_streams_per_session,
            max_tunnels_per_peer=self.max_tunnels_per_peer,
            peer_buffer_bytes=self.peer_buffer_bytes,
        )

    def __post_init__(self) -> None:
        for name in ("http_addr", "grpc_addr", "stun_addr", "derp_tls_addr"):
            addr = getattr(self, name)
            if addr is None or (name == "derp_tls_addr" and not addr):  # off
                continue
            try:
                parse_addr(addr)
            except ValueError as exc:
                raise ConfigError(f"{name}: {exc}") from None
        if not 0 < self.derp_region_id < 2**31:
            raise ConfigError(f"derp_region_id must be positive, got {self.derp_region_id}")
        if self.derp_admission not in ("any", "known"):
            raise ConfigError(f"derp_admission must be 'any' or 'known', got {self.derp_admission!r}")
        # A zero poll interval would spin the DERP-config poller on the event loop.
        for name in ("derp_map_poll", "health_timeout", "postgres_connect_timeout",
                     "replica_heartbeat"):
            seconds = getattr(self, name)
            if not seconds > 0:
                raise ConfigError(f"{name} must be a positive number of seconds, got {seconds!r}")
        if not self.health_cache >= 0:
            raise ConfigError(f"health_cache must not be negative, got {self.health_cache!r}")
        if self.debug_allow:
            from derp.metrics import DebugAccess

            try:
                DebugAccess(self.debug_networks)
            except ValueError as exc:
                raise ConfigError(f"debug_allow: {exc}") from None
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ConfigError("tls_cert_file and tls_key_file go together: give both or neither")
        if self.tls_min_version not in ("1.2", "1.3"):
            raise ConfigError(f"tls_min_version must be 1.2 or 1.3, got {self.tls_min_version!r}")
        if self.access_url and not self.access_url.startswith(("http://", "https://")):
            raise ConfigError(f"access_url must start with http:// or https://: {self.access_url!r}")
        if self.derp_relay_url and not self.derp_relay_url.startswith(("http://", "https://")):
            raise ConfigError(
                f"derp_relay_url must start with http:// or https://: {self.derp_relay_url!r}"
            )
        if bool(self.derp_tls_cert_file) != bool(self.derp_tls_key_file):
            raise ConfigError("derp_tls_cert_file and derp_tls_key_file go together")
        if self.derp_tls_cert_file and not self.derp_tls_addr:
            raise ConfigError("derp_tls_cert_file needs derp_tls_addr")
        if self.derp_mesh_with:
            try:
                parse_mesh_with(self.derp_mesh_with, "http")
            except ValueError as exc:
                raise ConfigError(f"derp_mesh_with: {exc}") from None
            if not (self.derp_mesh_key_file or self.postgres_url):
                raise ConfigError(
                    "derp_mesh_with needs a mesh key: derp_mesh_key_file, or postgres_url "
                    "(the replicas' shared key)"
                )
        try:
            self.limits  # noqa: B018 - validates every limit option
        except ValueError as exc:
            raise ConfigError(str(exc)) from None


def _convert(opt: Option, value: Any, source: str) -> Any:
    if opt.kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off", ""):
            return False
        raise ConfigError(f"{source}: {opt.name} expects a boolean, got {value!r}")
    if isinstance(value, bool):
        raise ConfigError(f"{source}: {opt.name} expects {opt.kind.__name__}, got {value!r}")
    try:
        return opt.kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: {opt.name} expects {opt.kind.__name__}, got {value!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--config`` and one flag per option (defaults resolved later, see module doc)."""
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="TOML file with any of the options below as top-level keys "
        f"(env {ENV_PREFIX}CONFIG).",
    )
    for opt in OPTIONS:
        flag = "--" + opt.name.replace("_", "-")
        env = ENV_PREFIX + opt.name.upper()
        text = f"{opt.help} [env {env}; default {opt.default!r}]"
        if opt.kind is bool:
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=None, help=text
            )
        else:
            parser.add_argument(flag, type=str, default=None, metavar=opt.name.upper(), help=text)


def load_config(
    args: argparse.Namespace | None = None,
    env: Mapping[str, str] | None = None,
    *,
    overrides: Mapping[str, Any] | None = None,
) -> StackConfig:
    """Merge flags (``args``), environment, TOML and defaults into a :class:`StackConfig`."""
    environ = os.environ if env is None else env
    values: dict[str, Any] = {opt.name: opt.default for opt in OPTIONS}
    sources: dict[str, str] = {}  # option -> where its value came from (for errors)
    cfg_path = getattr(args, "config", None) or environ.get(ENV_PREFIX + "CONFIG")
    known = {opt.name: opt for opt in OPTIONS}
    if cfg_path:
        try:
            doc = tomllib.loads(Path(cfg_path).read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"cannot read config file {cfg_path}: {exc.strerror or exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {cfg_path}: {exc}") from None
        for key, value in doc.items():
            name = key.replace("-", "_")
            if name not in known:
                raise ConfigError(f"config file {cfg_path}: unknown option {key!r}")
            values[name] = _convert(known[name], value, f"config file {cfg_path}")
            sources[name] = f"config file {cfg_path}: {name}"
    for opt in OPTIONS:
        env_name = ENV_PREFIX + opt.name.upper()
        if env_name in environ:
            values[opt.name] = _convert(opt, environ[env_name], f"environment {env_name}")
            sources[opt.name] = f"environment {env_name}"
    if args is not None:
        for opt in OPTIONS:
            value = getattr(args, opt.name, None)
            if value is not None:
                values[opt.name] = _convert(opt, value, "--" + opt.name.replace("_", "-"))
                sources[opt.name] = "--" + opt.name.replace("_", "-")
    for name, value in (overrides or {}).items():
        values[name] = value
    for name in ("http_addr", "grpc_addr", "stun_addr"):  # errors name the flag/env/key
        text = str(values[name])
        if name != "http_addr" and _addr_or_off(text) is None:
            continue  # 'off'
        try:
            parse_addr(text)
        except ValueError as exc:
            raise ConfigError(f"{sources.get(name, name)}: {exc}") from None
    data_dir = values.pop("data_dir")
    grpc = values.pop("grpc_addr")
    stun = values.pop("stun_addr")
    allowed = {f.name for f in fields(StackConfig)}
    kwargs = {k: v for k, v in values.items() if k in allowed}
    return StackConfig(
        data_dir=Path(data_dir).expanduser() if data_dir else default_data_dir(),
        grpc_addr=_addr_or_off(grpc),
        stun_addr=_addr_or_off(stun),
        **kwargs,
    )


def _addr_or_off(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    return None if text.lower() in ("", "off", "none") else text
