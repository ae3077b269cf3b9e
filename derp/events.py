"""Events a DERP client surfaces to its user.

Each received server frame that matters to an application becomes one immutable
event; :class:`derp.client.DerpClient` yields them in arrival order (``async for
ev in client`` or ``await client.recv()``). Names are in the past tense and mirror
Tailscale's ``derp.ReceivedMessage`` family:

=====================  ==========================  =========================================
event                  frame / cause               notes
=====================  ==========================  =========================================
PacketReceived         RecvPacket (0x05)           frames shorter than 32 bytes are dropped
PeerGoneReceived       PeerGone (0x08)             reason 0 when the server sent none
PeerPresentReceived    PeerPresent (0x09)          mesh watchers only; IP/port/flags optional
PingReceived           Ping (0x12)                 already answered when ``can_ack_pings``
PongReceived           Pong (0x13)                 only Pongs no ``ping()`` call was waiting on
HealthReceived         Health (0x14)               ``""`` means healthy again
KeepAliveReceived      KeepAlive (0x06)            liveness only
ServerRestarting       Restarting (0x15)           times converted to seconds
Connected              handshake finished          only with ``reconnect=True``
Disconnected           connection lost             only with ``reconnect=True``
=====================  ==========================  =========================================

Events are frozen, slotted dataclasses; dispatch on ``type(ev)`` or with
``match``. Don't subclass them.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import TypeAlias

from .frames import PeerGoneReason, PeerPresentFlags
from .keys import PublicKey

__all__ = [
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
]


@dataclass(frozen=True, slots=True)
class PacketReceived:
    """A packet relayed to us."""

    src: PublicKey
    """Node key of the sender."""
    data: bytes
    """The opaque packet (WireGuard or disco), at most 64 KiB."""


@dataclass(frozen=True, slots=True)
class PeerGoneReceived:
    """A peer we talked to has left the server, or a key we sent disco to is unknown."""

    peer: PublicKey
    reason: PeerGoneReason | int
    """A :class:`PeerGoneReason`, or the raw byte if this client does not know it."""


@dataclass(frozen=True, slots=True)
class PeerPresentReceived:
    """A client connected to the server (sent to mesh watchers only)."""

    peer: PublicKey
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None
    """The peer's remote IP (IPv4-mapped addresses unmapped), ``None`` if not sent."""
    port: int
    """The peer's remote port, 0 if not sent."""
    flags: PeerPresentFlags
    """Connection flags; 0 means the server does not send flags."""


@dataclass(frozen=True, slots=True)
class PingReceived:
    """The server pinged us (answered automatically when ``can_ack_pings``)."""

    data: bytes
    """The 8 opaque bytes."""


@dataclass(frozen=True, slots=True)
class PongReceived:
    """A Pong that no pending :meth:`DerpClient.ping` was waiting for."""

    data: bytes


@dataclass(frozen=True, slots=True)
class HealthReceived:
    """The server reports a problem with this connection; ``""`` clears it."""

    problem: str


@dataclass(frozen=True, slots=True)
class KeepAliveReceived:
    """The server's periodic keepalive."""


@dataclass(frozen=True, slots=True)
class ServerRestarting:
    """The server is about to restart: reconnect after ``reconnect_in`` seconds and
    keep trying for ``try_for`` seconds."""

    reconnect_in: float
    try_for: float


@dataclass(frozen=True, slots=True)
class Connected:
    """A (re)connection finished its handshake (only with ``reconnect=True``)."""

    server_key: PublicKey


@dataclass(frozen=True, slots=True)
class Disconnected:
    """The connection was lost and a reconnect starts (only with ``reconnect=True``)."""

    reason: str


Event: TypeAlias = (
    PacketReceived
    | PeerGoneReceived
    | PeerPresentReceived
    | PingReceived
    | PongReceived
    | HealthReceived
    | KeepAliveReceived
    | ServerRestarting
    | Connected
    | Disconnected
)
"""Any event a :class:`derp.client.DerpClient` yields."""
