"""DERP server settings: :class:`ServerConfig` (a frozen value, no I/O)."""

from __future__ import annotations

import math
import ssl
from dataclasses import dataclass, field

from ..admission import Admission
from ..keys import PrivateKey
from ..limits import HostLimits, RateConfig
from ..meshconfig import MeshPeer

__all__ = ["ServerConfig"]


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """DERP server settings.

    ``mesh_key`` is the raw 32-byte mesh pre-shared key (``None``: no mesh).
    ``keepalive_jitter`` is the upper bound of the per-connection random
    KeepAlive jitter (derper: 5 s). ``queue_depth`` bounds each of a client's
    two send queues (data and disco). ``write_buffer_high`` is the transport
    high-water mark above which a client counts as not writable.
    """

    private_key: PrivateKey
    mesh_key: bytes | None = None
    hostname: str = "127.0.0.1"
    keepalive_interval: float = 60.0
    handshake_timeout: float = 10.0
    queue_depth: int = 32
    keepalive_jitter: float = 5.0
    write_buffer_high: int = 64 * 1024
    # --- production limits, TLS, metrics, restart (derp.limits/tls/metrics) ---
    #: TLS for the listener (derp.tls.server_ssl_context); None = plain HTTP
    ssl_context: ssl.SSLContext | None = None
    #: accepted connections per second (inf = unlimited) and burst
    accept_limit: float = math.inf
    accept_burst: int = 2**31 - 1
    #: open sockets above which new ones are closed at accept (0 = unlimited)
    max_connections: int = 0
    #: per-client receive rate limit (advertised in ServerInfo; mesh peers exempt)
    rate_config: RateConfig = field(default_factory=RateConfig)
    #: drop a client whose socket stays blocked this long (0 disables); mesh peers get 30 s
    write_timeout: float = 2.0
    mesh_write_timeout: float = 30.0
    #: networks allowed to read /debug/* and /metrics (None: loopback only)
    debug_allow: tuple[str, ...] | None = None
    #: Restarting frame sent to every client on stop(restarting=True)
    restart_reconnect_in: float = 1.0
    restart_try_for: float = 30.0
    #: tell duplicate connections of a key about each other with Health frames
    health_on_duplicate: bool = True
    #: admission hook for non-mesh clients (derp.admission); None admits everyone
    admission: Admission | None = None
    #: mesh peers to dial (derp.meshconfig.parse_mesh_with); needs mesh_key
    mesh_with: tuple[MeshPeer, ...] = ()
    #: seconds between mesh reconnect attempts (derper: 5)
    mesh_retry_interval: float = 5.0
    #: bind the listening sockets with SO_REUSEPORT (``derper --workers N``: every
    #: worker process listens on the same port and the kernel spreads connections)
    reuse_port: bool = False
    #: the connection cap and accept limit shared with sibling processes
    #: (``derper --workers N``: :class:`derp.workers.shared.SharedLimits`); its
    #: host totals apply instead of ``max_connections``/``accept_limit``/``accept_burst``
    host_limits: HostLimits | None = None

    def __post_init__(self) -> None:
        if self.mesh_key is not None and len(self.mesh_key) != 32:
            raise ValueError("mesh_key must be 32 raw bytes")
        if self.keepalive_interval <= 0 or self.handshake_timeout <= 0:
            raise ValueError("keepalive_interval and handshake_timeout must be positive")
        if self.queue_depth < 0:
            raise ValueError("queue_depth must be >= 0")
        if self.mesh_with and self.mesh_key is None:
            raise ValueError("mesh_with needs a mesh_key")
        if self.write_timeout < 0 or self.mesh_write_timeout < 0 or self.max_connections < 0:
            raise ValueError("write timeouts and max_connections must be >= 0")
        if self.restart_reconnect_in < 0 or self.restart_try_for < 0:
            raise ValueError("restart times must be >= 0")
