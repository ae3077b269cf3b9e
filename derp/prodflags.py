"""``derper`` flags for TLS, limits, metrics access and graceful restart.

:func:`add_arguments` adds the flags to the ``derper`` parser and
:func:`server_options` turns the parsed values into :class:`ServerConfig`
keyword arguments (raising ``ValueError`` with a user-facing message on bad
input). Kept apart from :mod:`derp.cli` so the CLI only wires them in.

==================================  ===========================================================
flag                                meaning (derper equivalent in parentheses)
==================================  ===========================================================
``--certmode manual``               TLS with ``<certdir>/<hostname>.crt/.key``; for an IP
                                    hostname a self-signed pair is created there and the
                                    ``CertName: "sha256-raw:<hex>"`` pin is printed
``--certdir DIR``                   certificate directory (``-certdir``)
``--tls-min-version 1.2|1.3``       TLS floor, default 1.3 (fast start needs 1.3)
``--accept-connection-limit N``     accepted connections/s, default unlimited
``--accept-connection-burst N``     burst of the above
``--max-connections N``             open sockets cap, 0 = unlimited
``--rate-config FILE``              JSON ``{"PerClientRateLimitBytesPerSec": N,
                                    "PerClientRateBurstBytes": M}`` (``-rate-config``)
``--per-client-rate-limit BPS``     the same limit inline (overrides the file)
``--per-client-burst BYTES``
``--tcp-write-timeout DUR``         drop clients blocked this long; ``2s`` default, 0 = off
``--debug-allow CIDRS``             comma-separated networks for ``/debug/`` and
                                    ``/metrics`` (default: loopback only)
``--restart-reconnect-in DUR``      Restarting frame on SIGTERM: wait before reconnecting
``--restart-try-for DUR``           ... and keep trying this long; 0 = send no Restarting
==================================  ===========================================================

Durations accept plain seconds (``2.5``) or Go-style ``500ms``/``2s``/``1m``.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .keys import PublicKey
from .limits import RateConfig
from .tls import load_manual_cert, server_ssl_context

__all__ = ["ServerOptions", "add_arguments", "parse_duration", "server_options"]

_DUR = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(ms|s|m|h)?\s*$")
_UNITS = {None: 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """Seconds from ``2.5``, ``500ms``, ``2s``, ``1m`` or ``1h``."""
    m = _DUR.match(text)
    if m is None:
        raise ValueError(f"bad duration {text!r} (use seconds, or 500ms / 2s / 1m)")
    return float(m.group(1)) * _UNITS[m.group(2)]


def _default_certdir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "tailscale", "derper-certs")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the production flags (see the module docstring) to ``p``."""
    g = p.add_argument_group("TLS, limits, metrics, restart")
    g.add_argument("--certmode", choices=["manual"], default=None,
                   help="serve TLS with certificates from --certdir (default: plain HTTP)")
    g.add_argument("--certdir", default=_default_certdir(),
                   help="directory of <hostname>.crt/.key (default %(default)s)")
    g.add_argument("--tls-min-version", choices=["1.2", "1.3"], default="1.3",
                   help="minimum TLS version (default %(default)s)")
    g.add_argument("--accept-connection-limit", type=float, default=math.inf,
                   help="accepted connections per second (default unlimited)")
    g.add_argument("--accept-connection-burst", type=int, default=2**31 - 1,
                   help="burst for --accept-connection-limit")
    g.add_argument("--max-connections", type=int, default=0,
                   help="close new sockets above this many open ones (0 = unlimited)")
    g.add_argument("--rate-config", default=None,
                   help="JSON file with PerClientRateLimitBytesPerSec / PerClientRateBurstBytes")
    g.add_argument("--per-client-rate-limit", type=int, default=None,
                   help="per-client receive limit in bytes/s (0 = off; overrides --rate-config)")
    g.add_argument("--per-client-burst", type=int, default=None,
                   help="per-client receive burst in bytes (at least 65568 is used)")
    g.add_argument("--tcp-write-timeout", default="2s",
                   help="drop a client whose socket stays blocked this long (0 = off)")
    g.add_argument("--debug-allow", default=None,
                   help="comma-separated CIDRs allowed to read /debug/ and /metrics "
                   "(default loopback only)")
    g.add_argument("--restart-reconnect-in", default="1s",
                   help="Restarting frame on SIGTERM: clients wait this long (default 1s)")
    g.add_argument("--restart-try-for", default="30s",
                   help="... then retry for this long (default 30s; 0 = no Restarting frame)")


@dataclass
class ServerOptions:
    """What :func:`server_options` derived from the flags."""

    config: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments for :class:`derp.server.ServerConfig`."""
    scheme: str = "http"
    notes: list[str] = field(default_factory=list)
    """Lines to print at startup (e.g. the CertName pin)."""
    restart_on_sigterm: bool = True


def server_options(args: argparse.Namespace, server_key: PublicKey, hostname: str) -> ServerOptions:
    """Validate the production flags; raise ``ValueError`` with a user-facing message."""
    opts = ServerOptions()
    cfg = opts.config
    if args.certmode == "manual":
        try:
            mc = load_manual_cert(args.certdir, hostname)
        except FileNotFoundError as exc:
            raise ValueError(str(exc)) from None
        except OSError as exc:
            raise ValueError(f"--certdir {args.certdir}: {exc}") from None
        floor = ssl.TLSVersion.TLSv1_2 if args.tls_min_version == "1.2" else ssl.TLSVersion.TLSv1_3
        try:
            cfg["ssl_context"] = server_ssl_context(
                mc.cert_file, mc.key_file, server_key, min_version=floor
            )
        except (ssl.SSLError, OSError) as exc:
            raise ValueError(f"cannot load {mc.cert_file} / {mc.key_file}: {exc}") from None
        opts.scheme = "https"
        if mc.created:
            opts.notes.append(f"created self-signed certificate {mc.cert_file}")
        opts.notes.append(f"DERP map node: HostName: {hostname!r}, {mc.cert_name_hint()}")
    if not args.accept_connection_limit > 0 or args.accept_connection_burst < 1:  # NaN too
        raise ValueError("--accept-connection-limit must be > 0 and --accept-connection-burst >= 1")
    cfg["accept_limit"] = args.accept_connection_limit
    cfg["accept_burst"] = args.accept_connection_burst
    if args.max_connections < 0:
        raise ValueError("--max-connections must be >= 0")
    cfg["max_connections"] = args.max_connections
    rate = RateConfig()
    if args.rate_config:
        try:
            rate = RateConfig.from_json(Path(args.rate_config).read_text())
        except OSError as exc:
            raise ValueError(f"--rate-config {args.rate_config}: {exc}") from None
    if args.per_client_rate_limit is not None or args.per_client_burst is not None:
        rate = RateConfig(
            args.per_client_rate_limit if args.per_client_rate_limit is not None else rate.bytes_per_sec,
            args.per_client_burst if args.per_client_burst is not None else rate.burst_bytes,
        )
    cfg["rate_config"] = rate
    cfg["write_timeout"] = parse_duration(args.tcp_write_timeout)
    if args.debug_allow is not None:
        nets = tuple(n.strip() for n in args.debug_allow.split(",") if n.strip())
        try:
            from .metrics import DebugAccess

            DebugAccess(nets)
        except ValueError as exc:
            raise ValueError(f"--debug-allow: {exc}") from None
        cfg["debug_allow"] = nets
    cfg["restart_reconnect_in"] = parse_duration(args.restart_reconnect_in)
    cfg["restart_try_for"] = parse_duration(args.restart_try_for)
    opts.restart_on_sigterm = cfg["restart_try_for"] > 0
    return opts
