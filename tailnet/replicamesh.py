"""HA replicas mesh their embedded DERP relays, following replica discovery in PostgreSQL.

Every replica (a stack with ``postgres_url``) runs one :class:`derp.mesh.Mesh`
on its embedded relay, keyed with the region's shared mesh key. A
:class:`ReplicaMesh` keeps, in that mesh, one link to the relay of every other
live replica of the same DERP region::

    PgCoordinator replica listener ──► ReplicaMesh.update(replicas)
        targets = mesh_targets(replicas, me, region)    replica ID → relay URL
        a new replica          → Mesh.add_peer(relay URL): dialled at once
        its relay URL changed  → old link removed, a new one added
        no longer live         → its link is removed once it is down; a link
                                 still up stays (that relay evidently works,
                                 e.g. a replica that only lost its database)
    Mesh.on_link_change ──► a link of a replica no longer live went down → removed

The links are ordinary mesh links (WatchConns / PeerPresent / ForwardPacket),
so a client on any replica reaches a key on any other, PeerGone crosses
replicas and duplicate keys across replicas follow the mesh rules. Static
links (``derp_mesh_with``) live in the same mesh; ReplicaMesh never touches
them. One task owns every change to the link set (updates only set the
target and wake it), so adds and removals never interleave.

:meth:`ReplicaMesh.status` is this replica's view of all its links (JSON-ready,
sorted, times as Unix seconds); the coordinator stores it in the replica's row
after a heartbeat whenever it changed, and the health report of any replica
shows every replica's view (:func:`tailnet.health.mesh_report`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Callable, Iterable
from typing import Any

from derp.mesh import Mesh, MeshLink, parse_mesh_peer
from tailnet.pg.replicas import Replica, mesh_targets

__all__ = ["ReplicaMesh", "link_status"]

log = logging.getLogger(__name__)


def link_status(link: MeshLink, replica_id: uuid.UUID | None) -> dict[str, Any]:
    """JSON view of one mesh link: ``url``, ``replica_id`` (``None``: a static link),
    ``state`` (``up``/``down``), ``since`` (Unix seconds) and ``error``."""
    return {
        "url": link.peer.url,
        "replica_id": str(replica_id) if replica_id is not None else None,
        "state": "up" if link.connected else "down",
        "since": round(link.since, 3),
        "error": None if link.connected else link.last_error,
    }


class ReplicaMesh:
    """Links of one replica's relay to the other live replicas' relays (module docstring)."""

    def __init__(
        self,
        mesh: Mesh,
        self_id: uuid.UUID,
        region_id: int,
        *,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self.mesh = mesh
        self.self_id = self_id
        self.region_id = region_id
        #: called when :meth:`status` may have changed (a link added, removed, up or down)
        self.on_change = on_change
        #: replica ID → (relay URL, link) for the replica links this object added
        self._links: dict[uuid.UUID, tuple[str, MeshLink]] = {}
        self._targets: dict[uuid.UUID, str] = {}
        self._bad_urls: set[str] = set()
        self._kick = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        #: reconciliation rounds run so far
        self.rounds = 0

    def start(self) -> None:
        """Start the reconciling task (needs a running loop)."""
        self.mesh.on_link_change.append(self._on_link_change)
        self._task = asyncio.get_running_loop().create_task(self._run(), name="replica-mesh")

    async def stop(self) -> None:
        """Stop reconciling; the links themselves stop with the mesh."""
        with contextlib.suppress(ValueError):
            self.mesh.on_link_change.remove(self._on_link_change)
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def update(self, replicas: Iterable[Replica]) -> None:
        """New set of live replicas (a :meth:`PgCoordinator.add_replica_listener` callback)."""
        self._targets = mesh_targets(replicas, self.self_id, self.region_id)
        self._kick.set()

    def links(self) -> dict[uuid.UUID, MeshLink]:
        """Replica ID → its link (links of replicas no longer live included until down)."""
        return {rid: link for rid, (_, link) in self._links.items()}

    def status(self) -> list[dict[str, Any]]:
        """Every link of the mesh (replica and static), sorted by URL."""
        by_link = {id(link): rid for rid, (_, link) in self._links.items()}
        out = [link_status(link, by_link.get(id(link))) for link in self.mesh.links]
        out.sort(key=lambda d: (d["url"], d["replica_id"] or ""))
        return out

    # ------------------------------------------------------------------ internals

    def _on_link_change(self, link: MeshLink) -> None:
        if not link.connected:
            self._kick.set()
        self._changed()

    def _changed(self) -> None:
        if self.on_change is not None:
            try:
                self.on_change()
            except Exception:
                log.exception("replica mesh: on_change callback failed")

    async def _run(self) -> None:
        while True:
            await self._kick.wait()
            self._kick.clear()
            try:
                await self._reconcile()
            except asyncio.CancelledError:
                raise
            except Exception:  # never let one bad update stop the mesh from following
                log.exception("replica mesh: reconciliation failed")
            self.rounds += 1
            self._changed()

    async def _reconcile(self) -> None:
        targets = self._targets
        mesh = self.mesh
        for rid, (url, link) in list(self._links.items()):
            want = targets.get(rid)
            if want == url:
                continue
            if want is None and link.connected:
                continue  # not live in the database, but its relay still answers
            del self._links[rid]
            log.info("replica mesh: dropping link to replica %s (%s)", rid, url)
            await mesh.remove_link(link)
        for rid, url in targets.items():
            if rid in self._links:
                continue
            try:
                peer = parse_mesh_peer(url)
            except ValueError as exc:
                if url not in self._bad_urls:
                    self._bad_urls.add(url)
                    log.warning("replica mesh: replica %s has an unusable relay URL: %s", rid, exc)
                continue
            log.info("replica mesh: linking to replica %s at %s", rid, peer.url)
            self._links[rid] = (url, mesh.add_peer(peer))
