"""NOTIFY channels and their payloads (pure codec, no I/O).

Payloads carry IDs and a one-letter event code only; receivers read the rows
(the tables are the source of truth, notifications are triggers to re-query,
spec coordinator.md §7.2 and coder#7295). Many events are packed into one
payload, and a batch is split so that no payload exceeds :data:`MAX_PAYLOAD`
bytes (PostgreSQL refuses NOTIFY payloads of 8000 bytes or more).

Wire format (ASCII; UUIDs as 32 lowercase hex digits; entries joined by ``,``):

* :data:`CHAN_PEER` — ``<code><peer>``, code ∈ :class:`PeerCode`.
* :data:`CHAN_TUNNEL` — ``<code><src><dst>``, code ``a`` (added) or ``r`` (removed).
* :data:`CHAN_RFH` — ``<to><from>``: ``from`` (an agent) is ready for a handshake
  with ``to`` (its tunnel peer).
* :data:`CHAN_HEARTBEAT` — ``<coordinator>``.
* :data:`CHAN_REPLICA` — ``<coordinator>``: that replica registered its relay or
  stopped (receivers re-read the live replicas).

Decoders raise :class:`PayloadError` on anything malformed; a receiver then
resynchronises instead of guessing.
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

__all__ = [
    "CHAN_PEER",
    "CHAN_TUNNEL",
    "CHAN_RFH",
    "CHAN_HEARTBEAT",
    "CHAN_REPLICA",
    "CHANNELS",
    "MAX_PAYLOAD",
    "PayloadError",
    "PeerCode",
    "PeerEvent",
    "TunnelEvent",
    "RfhEvent",
    "encode_peer_events",
    "decode_peer_events",
    "encode_tunnel_events",
    "decode_tunnel_events",
    "encode_rfh_events",
    "decode_rfh_events",
    "encode_heartbeat",
    "decode_heartbeat",
]

CHAN_PEER: Final = "tailnet_peer_update"
CHAN_TUNNEL: Final = "tailnet_tunnel_update"
CHAN_RFH: Final = "tailnet_ready_for_handshake"
CHAN_HEARTBEAT: Final = "tailnet_coordinator_heartbeat"
CHAN_REPLICA: Final = "tailnet_replica_update"
CHANNELS: Final = (CHAN_PEER, CHAN_TUNNEL, CHAN_RFH, CHAN_HEARTBEAT, CHAN_REPLICA)

#: Largest payload we emit (PostgreSQL's hard limit is just below 8000 bytes).
MAX_PAYLOAD: Final = 7600


class PayloadError(ValueError):
    """A notification payload could not be decoded."""


class PeerCode(enum.Enum):
    """Why a peer's rows changed (decides the reason text receivers show)."""

    NODE = "n"  # UpdateSelf
    LOST = "l"  # stream ended without Disconnect
    DISCONNECT = "d"  # graceful Disconnect (rows deleted)
    CLOSE = "c"  # its replica shut down gracefully


@dataclass(frozen=True, slots=True)
class PeerEvent:
    peer: uuid.UUID
    code: PeerCode


@dataclass(frozen=True, slots=True)
class TunnelEvent:
    src: uuid.UUID
    dst: uuid.UUID
    added: bool


@dataclass(frozen=True, slots=True)
class RfhEvent:
    to: uuid.UUID
    frm: uuid.UUID


def _pack(entries: Iterable[str]) -> list[str]:
    out: list[str] = []
    cur: list[str] = []
    size = 0
    for e in entries:
        extra = len(e) + (1 if cur else 0)
        if cur and size + extra > MAX_PAYLOAD:
            out.append(",".join(cur))
            cur, size = [], 0
            extra = len(e)
        cur.append(e)
        size += extra
    if cur:
        out.append(",".join(cur))
    return out


def _uuid(text: str) -> uuid.UUID:
    if len(text) != 32:
        raise PayloadError(f"bad UUID {text!r}")
    try:
        return uuid.UUID(hex=text)
    except ValueError:
        raise PayloadError(f"bad UUID {text!r}") from None


def _split(payload: str) -> list[str]:
    if not payload:
        raise PayloadError("empty payload")
    return payload.split(",")


def encode_peer_events(events: Iterable[PeerEvent]) -> list[str]:
    """Payloads (each ≤ :data:`MAX_PAYLOAD` bytes) for ``events``, order kept."""
    return _pack(e.code.value + e.peer.hex for e in events)


def decode_peer_events(payload: str) -> list[PeerEvent]:
    out = []
    for entry in _split(payload):
        if len(entry) != 33:
            raise PayloadError(f"bad peer entry {entry!r}")
        try:
            code = PeerCode(entry[0])
        except ValueError:
            raise PayloadError(f"bad peer code {entry[0]!r}") from None
        out.append(PeerEvent(_uuid(entry[1:]), code))
    return out


def encode_tunnel_events(events: Iterable[TunnelEvent]) -> list[str]:
    return _pack(("a" if e.added else "r") + e.src.hex + e.dst.hex for e in events)


def decode_tunnel_events(payload: str) -> list[TunnelEvent]:
    out = []
    for entry in _split(payload):
        if len(entry) != 65 or entry[0] not in "ar":
            raise PayloadError(f"bad tunnel entry {entry!r}")
        out.append(TunnelEvent(_uuid(entry[1:33]), _uuid(entry[33:]), entry[0] == "a"))
    return out


def encode_rfh_events(events: Iterable[RfhEvent]) -> list[str]:
    return _pack(e.to.hex + e.frm.hex for e in events)


def decode_rfh_events(payload: str) -> list[RfhEvent]:
    out = []
    for entry in _split(payload):
        if len(entry) != 64:
            raise PayloadError(f"bad ready-for-handshake entry {entry!r}")
        out.append(RfhEvent(_uuid(entry[:32]), _uuid(entry[32:])))
    return out


def encode_heartbeat(coordinator: uuid.UUID) -> str:
    return coordinator.hex


def decode_heartbeat(payload: str) -> uuid.UUID:
    return _uuid(payload)
