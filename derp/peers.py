"""Other relays: the one abstraction the server uses to reach keys it does not hold.

A DERP server reaches a key that has no local connection through *another
relay*. Two kinds exist, and both implement the same small contract:

* the regional DERP mesh (:mod:`derp.mesh`): TCP/TLS links to other relay
  nodes, WatchConns + ForwardPacket (spec §4);
* sibling worker processes of one ``derper --workers N`` host
  (:mod:`derp.workers`): Unix-domain-socket links with a batched framing.

Dependency direction: the server (:mod:`derp.server`) depends on this module
only; :mod:`derp.mesh` and :mod:`derp.workers` depend on this module and on the
server. Nothing here imports either side.

Contract::

    relay.forwarders[key] ──► Forwarder (the route in use for key)
    ConnContext.forward_hook(src, dst, packet)   (installed by PeerRelays.start)
        └─ RouteTable.route(dst).forward(src, dst, packet) -> bool (False: dropped)

    a link announces key   → RouteTable.add(key, link)      (PeerPresent / presence)
    a link says key left   → RouteTable.remove(key, link)   (PeerGone / presence gone)
    a link breaks          → RouteTable.drop_link(link)     (every key it announced)
    a key loses its last route and has no local connection
                           → PeerGone(key, Disconnected) to local receivers (spec §3.4)

Preference: routes through *preferred* links (sibling workers: same host, one
extra hop at most) are used before routes through other links (mesh peers).
One :class:`RouteTable` per server holds both kinds (``ConnContext.routes``),
so a key reachable both ways is forwarded to the sibling worker.

:data:`mesh_factory` is how the server starts the mesh configured by
``ServerConfig.mesh_with`` without importing :mod:`derp.mesh`: that module
registers its constructor here when imported (``import derp`` does).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, Hashable, Protocol, TypeVar

__all__ = [
    "ForwardHook",
    "Forwarder",
    "PeerRelays",
    "RouteTable",
    "mesh_factory",
    "register_mesh_factory",
]

L = TypeVar("L", bound=Hashable)

#: ``forward_hook(src, dst, packet)``: the server calls it for a packet whose
#: destination has no local connection but a route (``dst in relay.forwarders``).
ForwardHook = Callable[[bytes, bytes, memoryview], None]


class Forwarder(Protocol):
    """A link to another relay that can carry a packet for a key it announced."""

    def forward(self, src: bytes, dst: bytes, packet: memoryview) -> bool:
        """Queue ``packet`` from ``src`` to ``dst``; false if it was dropped."""


class PeerRelays(Protocol):
    """A set of links to other relays attached to one server (mesh, workers)."""

    def start(self) -> None:
        """Install the forward hook and start the links (needs a running loop)."""

    async def stop(self) -> None:
        """Stop every link and forget its routes."""


_mesh_factory: list[Callable[..., Any]] = []


def register_mesh_factory(factory: Callable[..., Any]) -> None:
    """Register the constructor ``factory(server, peers, *, retry_interval)`` of the
    DERP mesh (called by :mod:`derp.mesh` on import)."""
    _mesh_factory[:] = [factory]


def mesh_factory() -> Callable[..., Any]:
    """The registered mesh constructor; ``RuntimeError`` if :mod:`derp.mesh` was
    never imported (``import derp`` imports it)."""
    if not _mesh_factory:
        raise RuntimeError("ServerConfig.mesh_with needs derp.mesh (import derp.mesh)")
    return _mesh_factory[0]


# --------------------------------------------------------------------------- pure route table


class RouteTable(Generic[L]):
    """Which mesh links can reach which keys (pure; event loop thread only).

    ``routes[key]`` lists the links that announced ``key``: preferred links
    (see :meth:`prefer`) first, then the others, each group oldest first; the
    first one is the route in use and is mirrored into ``forwarders`` (the
    server's ``Relay.forwarders`` dict, read on the packet path).

    Invariants (:meth:`check_invariants`): no key maps to an empty list; the
    per-link index is the exact inverse of ``routes``; ``forwarders[k]`` is
    ``routes[k][0]`` for every key and has no other keys.
    """

    __slots__ = ("_routes", "_by_link", "forwarders", "stale_removals", "_preferred")

    def __init__(self, forwarders: dict[bytes, object] | None = None) -> None:
        self._routes: dict[bytes, list[L]] = {}
        self._by_link: dict[L, set[bytes]] = {}
        self.forwarders: dict[bytes, object] = forwarders if forwarders is not None else {}
        #: removals of a (key, link) that was not registered (duplicate PeerGone)
        self.stale_removals = 0
        self._preferred: set[L] = set()

    def prefer(self, link: L) -> None:
        """Routes through ``link`` go before routes through non-preferred links
        (sibling workers before mesh peers). Call before ``link`` announces keys."""
        self._preferred.add(link)

    def is_preferred(self, link: object) -> bool:
        """True if ``link`` was marked with :meth:`prefer` (a sibling worker)."""
        return link in self._preferred

    def promote(self, key: bytes, link: L) -> None:
        """Make ``link`` the route in use for ``key`` (a sibling worker whose
        connection of ``key`` became the most recently active). No-op unless
        ``link`` is preferred and announced ``key``."""
        links = self._routes.get(key)
        if links is None or link not in self._preferred or link not in links or links[0] is link:
            return
        links.remove(link)
        links.insert(0, link)
        self.forwarders[key] = link

    def forget_preference(self, link: L) -> None:
        """``link`` is gone for good (call after :meth:`drop_link`)."""
        self._preferred.discard(link)

    def __len__(self) -> int:
        return len(self._routes)

    def __contains__(self, key: bytes) -> bool:
        return key in self._routes

    def route(self, key: bytes) -> L | None:
        """The link used for ``key`` (oldest announcer), or ``None``."""
        links = self._routes.get(key)
        return links[0] if links else None

    def links_for(self, key: bytes) -> tuple[L, ...]:
        return tuple(self._routes.get(key, ()))

    def keys_via(self, link: L) -> frozenset[bytes]:
        return frozenset(self._by_link.get(link, ()))

    def add(self, key: bytes, link: L) -> bool:
        """``link`` announced ``key``; returns true if ``key`` was unreachable before."""
        links = self._routes.get(key)
        if links is None:
            self._routes[key] = [link]
            self.forwarders[key] = link
            self._by_link.setdefault(link, set()).add(key)
            return True
        if link not in links:
            if link in self._preferred:
                pos = 0
                while pos < len(links) and links[pos] in self._preferred:
                    pos += 1
                links.insert(pos, link)
                self.forwarders[key] = links[0]
            else:
                links.append(link)
            self._by_link.setdefault(link, set()).add(key)
        return False

    def remove(self, key: bytes, link: L) -> bool:
        """``link`` says ``key`` is gone; returns true if ``key`` lost its last route."""
        links = self._routes.get(key)
        if links is None or link not in links:
            self.stale_removals += 1
            return False
        links.remove(link)
        keys = self._by_link[link]
        keys.discard(key)
        if not keys:
            del self._by_link[link]
        if links:
            self.forwarders[key] = links[0]
            return False
        del self._routes[key]
        del self.forwarders[key]
        return True

    def drop_link(self, link: L) -> list[bytes]:
        """Forget every route via ``link``; returns the keys left with no route."""
        gone = []
        for key in list(self._by_link.get(link, ())):
            if self.remove(key, link):
                gone.append(key)
        return gone

    def check_invariants(self) -> None:
        """Raise ``AssertionError`` if the table is inconsistent (tests only)."""
        inverse: dict[L, set[bytes]] = {}
        for key, links in self._routes.items():
            assert links, "empty route list"
            assert len(set(links)) == len(links), "link listed twice"
            assert self.forwarders.get(key) is links[0], "forwarder is not the first link"
            flags = [link in self._preferred for link in links]
            assert flags == sorted(flags, reverse=True), "preferred link after another"
            for link in links:
                inverse.setdefault(link, set()).add(key)
        assert inverse == self._by_link, "per-link index out of sync"
        assert self.forwarders.keys() == self._routes.keys(), "forwarders out of sync"
