"""DERP admission by the coordinator: admit only node keys it currently knows.

When the DERP relay is embedded next to the coordinator (``tailnet serve`` with
``derp_admission = "known"``), a client may log in to the relay only with a node
key that some connected peer has published as its ``Node.key`` (``"np"`` + 32
raw bytes). The relay asks at each login, after ClientInfo and before
ServerInfo (see :mod:`derp.admission`), so a rejected client never has a packet
relayed. The lookup is the in-memory coordinator's O(1) index
(:meth:`tailnet.core.Coordinator.knows_node_key`), so a flood of unknown keys
costs no more than the logins themselves.
"""

from __future__ import annotations

from collections.abc import Callable

from derp.keys import PublicKey

__all__ = ["KnownNodeKeys", "NODE_KEY_PREFIX"]

#: ``Node.key`` is Tailscale's binary node-key form: ``b"np"`` + 32 raw bytes.
NODE_KEY_PREFIX = b"np"


class KnownNodeKeys:
    """Callable ``(PublicKey) -> bool`` for :class:`derp.admission.KnownKeysAdmission`.

    ``knows_node_key`` answers for a ``Node.key`` value (``b"np"`` + raw key),
    e.g. ``Coordinator.knows_node_key``.
    """

    __slots__ = ("_knows",)

    def __init__(self, knows_node_key: Callable[[bytes], bool]) -> None:
        self._knows = knows_node_key

    def __call__(self, key: PublicKey) -> bool:
        return self._knows(NODE_KEY_PREFIX + key.raw)
