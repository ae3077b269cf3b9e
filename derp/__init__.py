"""DERP relay: Tailscale's DERP protocol v2, byte-compatible with Go clients and derper.

Modules (pure cores first, I/O adapters after):

* :mod:`derp.frames`  frame codec (constants, encoders, incremental decoder)
* :mod:`derp.keys`    Curve25519 node keys, NaCl box, derper key file
* :mod:`derp.relay`   pure relay registry (key → connections, duplicates, PeerGone routes)
* :mod:`derp.errors`  exception hierarchy
* :mod:`derp.events`  events surfaced by the client library
* :mod:`derp.peers`   "other relays" abstraction (route table, forwarders) for mesh and workers
* :mod:`derp.server`  the relay server (uvloop protocols, HTTP front door)
* :mod:`derp.client`  the asyncio client library (any event loop)
* :mod:`derp.workers` ``derper --workers N``: supervisor, worker links, totals
* :mod:`derp.cli`     the ``derper`` command
"""

from __future__ import annotations

from .client import DerpClient
from .errors import (
    ConnectionClosed,
    DerpError,
    FrameError,
    HandshakeError,
    InvalidKeyError,
    ProtocolError,
)
from .events import (
    Connected,
    Disconnected,
    Event,
    HealthReceived,
    KeepAliveReceived,
    PacketReceived,
    PeerGoneReceived,
    PeerPresentReceived,
    PingReceived,
    PongReceived,
    ServerRestarting,
)
from .keys import PrivateKey, PublicKey
from . import mesh as _mesh  # noqa: F401  registers the mesh with derp.peers (mesh_with)

__all__ = [
    "DerpClient",
    "ConnectionClosed",
    "DerpError",
    "FrameError",
    "HandshakeError",
    "InvalidKeyError",
    "ProtocolError",
    "Connected",
    "Disconnected",
    "Event",
    "HealthReceived",
    "KeepAliveReceived",
    "PacketReceived",
    "PeerGoneReceived",
    "PeerPresentReceived",
    "PingReceived",
    "PongReceived",
    "ServerRestarting",
    "PrivateKey",
    "PublicKey",
]
