"""Replicas of the HA coordinator and the node keys they know (pure: no asyncio, no database).

Replica discovery (issue 10): every replica that runs an embedded DERP relay
publishes a :class:`ReplicaInfo` (the URL other replicas dial to reach its
relay, its DERP region, its host name) in ``tailnet_replicas``; its liveness is
the heartbeat of its ``tailnet_coordinators`` row. Each replica reads the live
rows back as :class:`Replica` values (every heartbeat interval, and at once
when a ``tailnet_replica_update`` notification says one registered or
stopped) and hands them to its listeners (the stack meshes its relay with
:func:`mesh_targets`).

``derp_admission = "known"`` in HA: :class:`NodeKeyIndex` holds the node keys
of every live peer of every replica (rows with status ``ok`` whose replica is
alive). The coordinator fills it from the tables once and then keeps it
current from the same peer notifications that drive the mapping, re-reading
only the rows of the peers a notification names; a relay login is a dict
lookup, never a query.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from tailnet.pg.mapper import BindingRow
from tailnet.v2 import tailnet_pb2 as pb

__all__ = [
    "ReplicaInfo",
    "Replica",
    "replicas_changed",
    "mesh_targets",
    "node_key_of",
    "NodeKeyIndex",
]


@dataclass(frozen=True, slots=True)
class ReplicaInfo:
    """What a replica publishes about its embedded relay.

    ``relay_url`` is the base URL (``http[s]://host:port``, the relay answers on
    ``/derp``) other replicas dial; empty means "do not mesh with me" (the
    health report warns about it).
    """

    relay_url: str = ""
    region_id: int = 0
    hostname: str = ""


@dataclass(frozen=True, slots=True)
class Replica:
    """One live replica as read from ``tailnet_replicas`` (times: Unix seconds, DB clock)."""

    id: uuid.UUID
    relay_url: str
    region_id: int
    hostname: str
    started_at: float
    heartbeat_at: float
    #: the replica's own JSON list of its mesh links ("" until it wrote one)
    mesh_status: str = ""
    status_at: float | None = None

    @property
    def identity(self) -> tuple[uuid.UUID, str, int, str]:
        """What decides the mesh: changes here (not heartbeat times) matter to listeners."""
        return (self.id, self.relay_url, self.region_id, self.hostname)


def replicas_changed(old: Iterable[Replica], new: Iterable[Replica]) -> bool:
    """True if the set of replica identities differs (heartbeat times ignored)."""
    return {r.identity for r in old} != {r.identity for r in new}


def mesh_targets(
    replicas: Iterable[Replica], self_id: uuid.UUID, region_id: int
) -> dict[uuid.UUID, str]:
    """Replica ID → relay URL of every other live replica this one should mesh with.

    Replicas mesh within their DERP region (one region = one set of relays
    that share clients); a replica without a relay URL cannot be dialled.
    """
    return {
        r.id: r.relay_url
        for r in replicas
        if r.id != self_id and r.region_id == region_id and r.relay_url
    }


def node_key_of(node: bytes) -> bytes | None:
    """``Node.key`` of a serialized node (``b"np"`` + 32 bytes), or ``None``."""
    try:
        key = pb.Node.FromString(node).key
    except Exception:  # protobuf DecodeError: a row we cannot read knows no key
        return None
    return bytes(key) if key else None


class NodeKeyIndex:
    """Node keys of live peers on any replica, reference-counted per peer.

    A peer may hold rows on several replicas (it reconnected elsewhere); its
    keys are those of its *live* rows. A key is known while at least one peer
    has it. Invariant: ``_refs[k]`` = number of peers whose key set holds ``k``.
    """

    __slots__ = ("_by_peer", "_refs", "loaded")

    def __init__(self) -> None:
        self._by_peer: dict[uuid.UUID, frozenset[bytes]] = {}
        self._refs: dict[bytes, int] = {}
        #: False until the first full load (lookups fail closed before it)
        self.loaded = False

    def __contains__(self, key: object) -> bool:
        return key in self._refs

    def __len__(self) -> int:
        return len(self._refs)

    def peers(self) -> int:
        return len(self._by_peer)

    def replace_all(self, rows: Iterable[tuple[uuid.UUID, bytes]]) -> None:
        """Rebuild from ``(peer, node bytes)`` of every live row."""
        keys: dict[uuid.UUID, set[bytes]] = {}
        for peer, node in rows:
            k = node_key_of(node)
            if k is not None:
                keys.setdefault(peer, set()).add(k)
        self._by_peer = {}
        self._refs = {}
        for peer, ks in keys.items():
            self._set(peer, frozenset(ks))
        self.loaded = True

    def update(self, peers: Iterable[uuid.UUID], rows: Mapping[uuid.UUID, Iterable[BindingRow]]) -> None:
        """Re-evaluate ``peers`` from ``rows`` (all their rows, live or not; a peer
        without rows has disconnected)."""
        for peer in peers:
            ks = {k for r in rows.get(peer, ()) if r.alive and (k := node_key_of(r.node))}
            self._set(peer, frozenset(ks))

    def _set(self, peer: uuid.UUID, keys: frozenset[bytes]) -> None:
        old = self._by_peer.get(peer, frozenset())
        if old == keys:
            return
        refs = self._refs
        for k in old - keys:
            n = refs[k] - 1
            if n:
                refs[k] = n
            else:
                del refs[k]
        for k in keys - old:
            refs[k] = refs.get(k, 0) + 1
        if keys:
            self._by_peer[peer] = keys
        else:
            self._by_peer.pop(peer, None)

    def check_invariants(self) -> None:
        """Raise ``AssertionError`` if the reference counts are inconsistent (tests)."""
        counts: dict[bytes, int] = {}
        for ks in self._by_peer.values():
            assert ks, "empty key set stored"
            for k in ks:
                counts[k] = counts.get(k, 0) + 1
        assert counts == self._refs, "reference counts out of sync"

