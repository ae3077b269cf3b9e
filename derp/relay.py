"""Pure DERP routing registry: which connection receives packets for which key.

No sockets, no asyncio, no clocks. The server adapter (:mod:`derp.server`) owns
one :class:`Relay` and calls it from the event loop thread only; connection
handles are opaque hashable objects (the adapter uses its protocol objects,
tests use plain strings).

Model (spec §3.3–§3.5)::

    key ──► _KeySet { conns: registration order, history: activity order }
    active[key] ──► the one connection that receives traffic for key

Rules, all enforced here:

1. *Registration* adds the connection to its key's set and makes it active
   (a new connection is the most recent one).
2. *Duplicates* (2+ connections for one key) are all kept open. Policy
   "last writer is active": whichever duplicate most recently sent any frame
   (:meth:`Relay.note_activity`) receives all traffic for the key.
3. *Removal*: if the active connection leaves, the most recently active
   remaining connection takes over; with one left the key is a plain single
   client again; with none left the key disappears and every connection that
   received a packet *from* that key (a "return-path" subscriber, spec §3.4)
   is owed ``PeerGone(key, Disconnected)``. PeerGone is only owed on the
   1 → 0 transition, never for a departing duplicate.
4. Subscriptions are recorded per receiving *connection* (not key): a client
   that reconnects must hear from the source again before it is told the
   source left. A departing receiver's subscriptions are discarded.

Hot path contract: ``relay.active.get(dst)`` is a plain ``dict`` lookup and is
the only thing a packet needs. :meth:`note_activity` and :meth:`note_delivery`
are called at most once per read batch / new (src, receiver) pair.

Invariants (checked by ``check_invariants`` in tests):

* ``active.keys() == sets.keys()`` and every set is non-empty (with sibling
  workers: ``sets.keys() ⊆ active.keys()``, the extra keys have stand-ins);
* ``active[k]`` is in ``sets[k]`` and is the last entry of its activity history;
* the activity history of ``k`` is a permutation of ``sets[k]``.

Mesh hooks (filled by :mod:`derp.mesh`): ``watchers`` holds connections that
asked for WatchConns; ``forwarders`` maps keys that live on another region node
to an opaque forwarder handle. Local presence always wins over a forwarder.
When the last local connection of a key leaves while a forwarder for it exists,
the key has not left the region: no PeerGone is owed yet, and the subscribers
are kept until the mesh removes the last route (:meth:`Relay.take_subscribers`).

Worker hooks (filled by :mod:`derp.workers`, sibling processes of one host):
``elsewhere[key]`` counts sibling workers holding ``key``; such a key is a
duplicate on registration and its departure here owes the mesh watchers no
PeerGone (the host still has it). ``active[key]`` may then hold a *stand-in*
for the sibling (an object with a connection's hot-path attributes that writes
to the sibling link), so the packet path needs no extra lookup:
:meth:`Relay.route_remote` installs one for a key with no local connection,
:meth:`Relay.step_aside` for a local key whose most recently active connection
is on a sibling; the next :meth:`note_activity` of a local connection takes the
key back. ``observer`` (:class:`RelayObserver`) hears registrations, last
departures and such take-backs, so the worker can tell its siblings.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Generic, Hashable, Iterator, Protocol, TypeVar

__all__ = ["Relay", "Departure", "Registration", "RelayObserver"]

C = TypeVar("C", bound=Hashable)


class _KeySet(Generic[C]):
    """Connections of one key. ``order`` is activity order, most recent last."""

    __slots__ = ("order",)

    def __init__(self) -> None:
        self.order: list[C] = []

    def touch(self, conn: C) -> None:
        order = self.order
        if order[-1] is not conn:
            order.remove(conn)
            order.append(conn)


class RelayObserver(Protocol):
    """Hears the registry's presence changes (``derp.workers`` tells siblings)."""

    def registered(self, key: bytes, conn: object) -> None:
        """``conn`` of ``key`` registered (it is now the active connection)."""

    def departed(self, key: bytes) -> None:
        """The last local connection of ``key`` left."""

    def reactivated(self, key: bytes, conn: object) -> None:
        """``conn`` spoke while ``key`` had stepped aside: it is active again."""


@dataclass(frozen=True, slots=True)
class Registration(Generic[C]):
    """Result of :meth:`Relay.register`.

    ``duplicate`` is true when the key already had a connection;
    ``watchers`` are the mesh watchers to send PeerPresent for this connection.
    """

    duplicate: bool
    watchers: tuple[C, ...] = ()


@dataclass(frozen=True, slots=True)
class Departure(Generic[C]):
    """Result of :meth:`Relay.unregister`.

    ``last`` is true when the key has no connection left (the 1 → 0
    transition). ``peer_gone`` lists the connections owed
    ``PeerGone(key, Disconnected)``; ``watchers`` the mesh watchers owed a
    PeerGone for the key (both empty unless ``last``). ``new_active`` is the
    connection now receiving for the key, if any.
    """

    last: bool
    new_active: C | None = None
    peer_gone: tuple[C, ...] = ()
    watchers: tuple[C, ...] = field(default=())


class Relay(Generic[C]):
    """Key → connection registry with duplicate policy and PeerGone subscriptions."""

    __slots__ = (
        "active",
        "_sets",
        "_subscribers",
        "_subscriptions",
        "watchers",
        "forwarders",
        "elsewhere",
        "observer",
        "_aside",
        "stand_ins",
    )

    def __init__(self) -> None:
        #: key → connection receiving its traffic. Read directly on the hot path.
        self.active: dict[bytes, C] = {}
        self._sets: dict[bytes, _KeySet[C]] = {}
        # src key → {receiving conn: None}: who must hear PeerGone(src).
        self._subscribers: dict[bytes, dict[C, None]] = {}
        # receiving conn → set of src keys it is subscribed to (for cleanup).
        self._subscriptions: dict[C, set[bytes]] = {}
        #: mesh watchers (WatchConns senders, see :mod:`derp.mesh`).
        self.watchers: dict[C, None] = {}
        #: key → forwarder handle for keys on other region nodes (filled by :mod:`derp.mesh`).
        self.forwarders: dict[bytes, object] = {}
        #: key → number of sibling workers holding it (filled by derp.workers).
        self.elsewhere: dict[bytes, int] = {}
        #: presence observer (derp.workers), None in a single process.
        self.observer: RelayObserver | None = None
        # local keys whose active entry is a sibling's stand-in (step_aside)
        self._aside: set[bytes] = set()
        #: stand-ins for sibling workers (derp.workers): never subscribed to PeerGone
        self.stand_ins: set[C] = set()

    # ------------------------------------------------------------------ queries

    def __len__(self) -> int:
        """Number of distinct keys with at least one local connection."""
        return len(self._sets)

    def __contains__(self, key: bytes) -> bool:
        return key in self._sets

    def connections(self, key: bytes) -> tuple[C, ...]:
        """All connections of ``key`` in activity order (most recent last)."""
        s = self._sets.get(key)
        return tuple(s.order) if s is not None else ()

    def is_duplicate(self, key: bytes) -> bool:
        """True if ``key`` currently has two or more connections."""
        s = self._sets.get(key)
        return s is not None and len(s.order) > 1

    def keys(self) -> Iterator[bytes]:
        """Keys with a local connection."""
        return iter(self._sets)

    @property
    def duplicate_keys(self) -> int:
        """Number of keys with 2+ connections."""
        return sum(1 for s in self._sets.values() if len(s.order) > 1)

    def subscribers(self, src: bytes) -> tuple[C, ...]:
        """Connections that received a packet from ``src`` (owed PeerGone on its exit)."""
        return tuple(self._subscribers.get(src, ()))

    # ------------------------------------------------------------------ mutations

    def register(self, key: bytes, conn: C) -> Registration[C]:
        """Add ``conn`` for ``key``; it becomes the active (most recent) connection."""
        s = self._sets.get(key)
        dup = s is not None
        if s is None:
            s = self._sets[key] = _KeySet()
        elif conn in s.order:
            raise ValueError("connection already registered")
        s.order.append(conn)
        self.active[key] = conn
        if self.observer is not None:
            dup = dup or key in self.elsewhere
            self.observer.registered(key, conn)
        return Registration(dup, tuple(self.watchers))

    def note_activity(self, key: bytes, conn: C) -> bool:
        """``conn`` (of ``key``) just sent a frame; make it active if it is a duplicate.

        Returns true if the active connection changed. Unknown connections are
        ignored (a frame may race its own disconnect in adapters).
        """
        current = self.active.get(key)
        if current is conn:
            return False
        s = self._sets.get(key)
        if s is None or conn not in s.order:
            return False
        s.touch(conn)
        self.active[key] = conn
        if self._aside and key in self._aside:
            self._aside.discard(key)
            if self.observer is not None:
                self.observer.reactivated(key, conn)
        return True

    def step_aside(self, key: bytes, stand_in: C) -> bool:
        """A sibling worker's connection of ``key`` is now the most recently active:
        packets for ``key`` go to ``stand_in`` until a local connection speaks
        (:meth:`note_activity`) or :meth:`take_back`. False if ``key`` has no
        local connection (use :meth:`route_remote`)."""
        if key not in self._sets:
            return False
        self.active[key] = stand_in
        self._aside.add(key)
        return True

    def take_back(self, key: bytes) -> bool:
        """Undo :meth:`step_aside` (the sibling that was active left): the most
        recently active local connection receives again. True if it changed."""
        s = self._sets.get(key)
        if s is None or key not in self._aside:
            return False
        self._aside.discard(key)
        self.active[key] = s.order[-1]
        return True

    def is_aside(self, key: bytes) -> bool:
        """True if ``key`` stepped aside for a sibling worker (:meth:`step_aside`)."""
        return key in self._aside

    def route_remote(self, key: bytes, stand_in: C | None) -> None:
        """Packets for ``key`` (no local connection) go to ``stand_in`` (a sibling
        worker's stand-in), or nowhere special (``None``). A local key keeps its
        connections; only its step-aside target is updated."""
        if key in self._sets:
            if stand_in is not None and key in self._aside:
                self.active[key] = stand_in
            return
        if stand_in is None:
            self.active.pop(key, None)
        else:
            self.active[key] = stand_in

    def note_delivery(self, src: bytes, receiver: C) -> None:
        """``receiver`` got (or will get) a packet from ``src``: subscribe it to PeerGone(src).

        Idempotent. Only the departure of ``src``'s last connection triggers
        the notice (spec §3.4).
        """
        subs = self._subscribers.get(src)
        if subs is not None and receiver in subs:
            return
        if receiver in self.stand_ins:  # a sibling's stand-in: its relay does this
            return
        if subs is None:
            subs = self._subscribers[src] = {}
        subs[receiver] = None
        mine = self._subscriptions.get(receiver)
        if mine is None:
            mine = self._subscriptions[receiver] = set()
        mine.add(src)

    def unregister(self, key: bytes, conn: C) -> Departure[C]:
        """Remove ``conn`` of ``key``; see the module rules for what the result means.

        Unregistering an unknown connection is a no-op returning ``last=False``.
        """
        self._drop_subscriptions(conn)
        self.watchers.pop(conn, None)
        s = self._sets.get(key)
        if s is None or conn not in s.order:
            return Departure(False, self.active.get(key))
        s.order.remove(conn)
        if s.order:
            new_active = s.order[-1]
            if key not in self._aside:  # else a sibling's stand-in keeps receiving
                self.active[key] = new_active
            return Departure(False, new_active)
        del self._sets[key]
        self.active.pop(key, None)
        self._aside.discard(key)
        # A key still reachable through a mesh forwarder has not left the region:
        # its subscribers keep waiting (take_subscribers when the route goes).
        owed = () if key in self.forwarders else self.take_subscribers(key)
        if key in self.elsewhere:  # a sibling worker still has it: the host does
            watchers: tuple[C, ...] = ()
        else:
            watchers = tuple(w for w in self.watchers if w is not conn)
        if self.observer is not None:
            self.observer.departed(key)
        return Departure(True, None, owed, watchers)

    def take_subscribers(self, src: bytes) -> tuple[C, ...]:
        """Remove and return every connection subscribed to PeerGone(``src``).

        Called by :meth:`unregister` on the 1 → 0 transition, and by the mesh
        when the last route to a remote ``src`` without local connections goes.
        """
        subs = self._subscribers.pop(src, None)
        if not subs:
            return ()
        owed = tuple(subs)
        for r in owed:
            mine = self._subscriptions.get(r)
            if mine is not None:
                mine.discard(src)
                if not mine:
                    del self._subscriptions[r]
        return owed

    def _drop_subscriptions(self, receiver: C) -> None:
        mine = self._subscriptions.pop(receiver, None)
        if not mine:
            return
        for src in mine:
            subs = self._subscribers.get(src)
            if subs is not None:
                subs.pop(receiver, None)
                if not subs:
                    del self._subscribers[src]

    def add_watcher(self, conn: C) -> list[bytes]:
        """Register a mesh watcher; returns the keys to announce to it (PeerPresent)."""
        self.watchers[conn] = None
        return list(self._sets)

    # ------------------------------------------------------------------ testing

    def check_invariants(self) -> None:
        """Raise ``AssertionError`` if the registry is inconsistent (tests only)."""
        if not self.elsewhere:
            assert self.active.keys() == self._sets.keys(), "active/sets key mismatch"
        assert self._sets.keys() <= self.active.keys(), "a local key has no active entry"
        assert self._aside <= self._sets.keys(), "stepped-aside key without connections"
        for k, s in self._sets.items():
            assert s.order, f"empty set for {k!r}"
            assert len(set(map(id, s.order))) == len(s.order), "connection listed twice"
            if k not in self._aside:
                assert self.active[k] is s.order[-1], "active is not the most recent"
        for src, subs in self._subscribers.items():
            assert subs, "empty subscriber map"
            for r in subs:
                assert src in self._subscriptions.get(r, ()), "subscription index out of sync"
        for r, mine in self._subscriptions.items():
            assert mine, "empty subscription set"
            for src in mine:
                assert r in self._subscribers.get(src, {}), "subscriber index out of sync"
