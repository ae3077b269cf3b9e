"""``--mesh-with`` entries: which other relay nodes of the region to mesh with.

Pure configuration (no sockets), shared by the server's config
(:class:`derp.server.ServerConfig`), the CLI and :mod:`derp.mesh`.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["MeshPeer", "parse_mesh_peer", "parse_mesh_with"]


@dataclass(frozen=True, slots=True)
class MeshPeer:
    """One ``--mesh-with`` entry: ``host`` names the node (URL, TLS, Host header);
    the link dials ``dial_host`` (the same unless ``host/dialhost`` was given)."""

    scheme: str
    host: str
    port: int
    dial_host: str

    @property
    def url(self) -> str:
        h = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return f"{self.scheme}://{h}{'' if self.port == default else f':{self.port}'}/derp"

    @property
    def host_header(self) -> str:
        h = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return h if self.port == default else f"{h}:{self.port}"


def parse_mesh_peer(entry: str, scheme: str = "https") -> MeshPeer:
    """Parse one mesh entry.

    Forms: ``host``, ``host:port``, ``host/dialhost``, ``host:port/dialhost``
    (derper's forms; ``scheme`` applies, https by default like derper), or a
    full URL ``http[s]://host[:port][/derp]``. Raises ``ValueError``.
    """
    entry = entry.strip()
    if not entry:
        raise ValueError("empty mesh peer")
    if "://" in entry:
        u = urllib.parse.urlsplit(entry)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"bad mesh peer URL {entry!r}")
        try:
            port_given = u.port
        except ValueError as exc:
            raise ValueError(f"bad mesh peer {entry!r}: {exc}") from None
        if port_given == 0:
            raise ValueError(f"bad mesh peer {entry!r}: port must be 1-65535")
        port = port_given or (443 if u.scheme == "https" else 80)
        return MeshPeer(u.scheme, u.hostname, port, u.hostname)
    if scheme not in ("http", "https"):
        raise ValueError(f"bad mesh scheme {scheme!r}")
    name, _, dial = entry.partition("/")
    u = urllib.parse.urlsplit(f"{scheme}://{name}")
    try:
        port_opt = u.port
    except ValueError as exc:
        raise ValueError(f"bad mesh peer {entry!r}: {exc}") from None
    if not u.hostname:
        raise ValueError(f"bad mesh peer {entry!r}")
    if port_opt == 0:
        raise ValueError(f"bad mesh peer {entry!r}: port must be 1-65535")
    port = port_opt or (443 if scheme == "https" else 80)
    dial = dial.strip().strip("[]") or u.hostname
    return MeshPeer(scheme, u.hostname, port, dial)


def parse_mesh_with(value: str | Sequence[str], scheme: str = "https") -> list[MeshPeer]:
    """Parse ``--mesh-with`` (comma-separated string or a list of entries)."""
    items = value.split(",") if isinstance(value, str) else list(value)
    return [parse_mesh_peer(e, scheme) for e in items if e.strip()]
