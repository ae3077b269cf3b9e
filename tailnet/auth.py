"""Authorization policies for coordinate requests (spec coordinator.md §2.3).

A transport picks one policy per connection from the caller's identity and calls
``await policy.authorize(peer_id, req)`` on every request AFTER
:func:`tailnet.core.validate_request` and BEFORE :meth:`tailnet.core.Coordinator.handle`.
A refusal raises :class:`AuthorizationError`; the transport ends that one stream
(as LOST) and sends ``"authorization: <detail>"``.

==================  ===============  ================================  ==============
policy              AddTunnel        UpdateSelf addresses              ReadyForHandsh.
==================  ===============  ================================  ==============
AgentPolicy(id)     always refused   each a /128 equal to the agent's  allowed
                                     derived address (Tailscale or
                                     Coder prefix, or the legacy IP)
ClientPolicy(id)    only to ``id``   each a /128                       refused
UserPolicy(cb)      ``await cb(d)``  each a /128                       refused
UnrestrictedPolicy  anything         anything                          anything
==================  ===============  ================================  ==============

RemoveTunnel and Disconnect are never restricted. The whole request is checked
before any part of it is applied. Policies are per stream and remember the
last accepted address list, so an UpdateSelf with unchanged addresses (the
common case) is not parsed again. Addresses are prefix texts such as
``fd7a:115c:a1e0:4ffa:…/128`` (the ``/bits`` suffix is required).
"""

from __future__ import annotations

import ipaddress
import uuid
from collections.abc import Awaitable, Callable
from typing import Final, Protocol

from tailnet.errors import AuthorizationError
from tailnet.v2 import tailnet_pb2 as pb

__all__ = [
    "CODER_SERVICE_PREFIX",
    "LEGACY_AGENT_IP",
    "TAILSCALE_SERVICE_PREFIX",
    "TUNNEL_DENIED",
    "AgentPolicy",
    "AuthorizationError",
    "ClientPolicy",
    "CoordinateePolicy",
    "TunnelAuthorizer",
    "UnrestrictedPolicy",
    "UserPolicy",
    "addr_from_uuid",
]

#: Tailscale's CGNAT-like ULA range; clients pick random addresses here.
TAILSCALE_SERVICE_PREFIX: Final = ipaddress.IPv6Network("fd7a:115c:a1e0::/48")
#: Coder's service prefix (Coder Connect DNS points here).
CODER_SERVICE_PREFIX: Final = ipaddress.IPv6Network("fd60:627a:a42b::/48")
#: The fixed address every workspace agent used to share.
LEGACY_AGENT_IP: Final = ipaddress.IPv6Address("fd7a:115c:a1e0:49d6:b259:b7ac:b1b2:48f4")
#: UserPolicy's refusal text (Coder's wording).
TUNNEL_DENIED: Final = "workspace agent not found or you do not have permission"

#: Async callback deciding whether the user may open a tunnel to an agent.
TunnelAuthorizer = Callable[[uuid.UUID], Awaitable[bool]]


def addr_from_uuid(prefix: ipaddress.IPv6Network, peer_id: uuid.UUID) -> ipaddress.IPv6Address:
    """The UUID's 128 bits with the top ``prefix.prefixlen`` bits taken from ``prefix``.

    For the /48 service prefixes this is Coder's ``AddrFromUUID``: the UUID's 16
    bytes with the first 6 overwritten by the prefix.
    """
    bits = prefix.prefixlen
    mask = ((1 << bits) - 1) << (128 - bits) if bits else 0
    value = (int(prefix.network_address) & mask) | (peer_id.int & ~mask & ((1 << 128) - 1))
    return ipaddress.IPv6Address(value)


class CoordinateePolicy(Protocol):
    """Decides whether a peer may make a (validated) coordinate request."""

    async def authorize(self, peer_id: uuid.UUID, req: pb.CoordinateRequest) -> None:
        """Return if allowed; raise :class:`AuthorizationError` otherwise."""
        ...


def _parse_host_prefix(text: str) -> ipaddress.IPv6Address:
    """Parse ``addr/128`` (Go ``netip.ParsePrefix`` rules); refuse anything else."""
    addr_text, sep, bits_text = text.partition("/")
    if not sep or not bits_text.isdigit() or len(bits_text) > 3 or "%" in addr_text:
        raise AuthorizationError(f"parse node address: invalid prefix {text!r}")
    try:
        # Same result as ipaddress.ip_address, without first failing as IPv4.
        addr: ipaddress.IPv4Address | ipaddress.IPv6Address = (
            ipaddress.IPv6Address(addr_text) if ":" in addr_text
            else ipaddress.IPv4Address(addr_text)
        )
    except ValueError:
        raise AuthorizationError(f"parse node address: invalid prefix {text!r}") from None
    bits = int(bits_text)
    if bits > addr.max_prefixlen:
        raise AuthorizationError(f"parse node address: invalid prefix {text!r}")
    if bits != 128 or not isinstance(addr, ipaddress.IPv6Address):
        raise AuthorizationError(f"invalid address bits, expected 128, got {bits}")
    return addr


def _new_host_addresses(req: pb.CoordinateRequest, last: tuple[str, ...]) -> tuple[str, ...]:
    """The UpdateSelf's address texts if they differ from ``last`` (already accepted).

    Returns ``last`` itself when there is no UpdateSelf or the addresses are
    unchanged (the common case: nodes rarely change addresses), so callers
    parse only new address lists.
    """
    if not req.HasField("update_self"):
        return last
    addrs = tuple(req.update_self.node.addresses)
    return last if addrs == last else addrs


def _check_host_addresses(
    req: pb.CoordinateRequest, last: tuple[str, ...]
) -> tuple[str, ...]:
    """Validate new UpdateSelf addresses (each a /128); returns the accepted texts."""
    addrs = _new_host_addresses(req, last)
    if addrs is not last:
        for a in addrs:
            _parse_host_prefix(a)
    return addrs


def _tunnel_dst(req: pb.CoordinateRequest) -> uuid.UUID | None:
    if not req.HasField("add_tunnel"):
        return None
    raw = req.add_tunnel.id
    if len(raw) != 16:
        raise AuthorizationError(f"parse add tunnel id: expected 16 bytes, got {len(raw)}")
    return uuid.UUID(bytes=raw)


def _refuse_rfh(req: pb.CoordinateRequest) -> None:
    if len(req.ready_for_handshake):
        raise AuthorizationError("clients may not send ready_for_handshake")


class AgentPolicy:
    """A workspace agent (peer ID = its agent ID): no tunnels, own addresses only, RFH ok."""

    __slots__ = ("_allowed", "_ok_addrs", "agent_id")

    def __init__(self, agent_id: uuid.UUID) -> None:
        self.agent_id = agent_id
        self._ok_addrs: tuple[str, ...] = ()
        self._allowed = frozenset(
            {
                addr_from_uuid(TAILSCALE_SERVICE_PREFIX, agent_id),
                addr_from_uuid(CODER_SERVICE_PREFIX, agent_id),
                LEGACY_AGENT_IP,
            }
        )

    async def authorize(self, peer_id: uuid.UUID, req: pb.CoordinateRequest) -> None:
        if req.HasField("add_tunnel"):
            raise AuthorizationError("agents cannot open tunnels")
        addrs = _new_host_addresses(req, self._ok_addrs)
        if addrs is not self._ok_addrs:
            for text in addrs:
                addr = _parse_host_prefix(text)
                if addr not in self._allowed:
                    raise AuthorizationError(f"invalid node address, got {addr}")
            self._ok_addrs = addrs

    def __repr__(self) -> str:
        return f"AgentPolicy({self.agent_id})"


class ClientPolicy:
    """A client bound to one agent: tunnels only to ``agent_id``, /128 addresses, no RFH."""

    __slots__ = ("_ok_addrs", "agent_id")

    def __init__(self, agent_id: uuid.UUID) -> None:
        self.agent_id = agent_id
        self._ok_addrs: tuple[str, ...] = ()

    async def authorize(self, peer_id: uuid.UUID, req: pb.CoordinateRequest) -> None:
        dst = _tunnel_dst(req)
        if dst is not None and dst != self.agent_id:
            raise AuthorizationError(f"invalid agent id, expected {self.agent_id}, got {dst}")
        addrs = _check_host_addresses(req, self._ok_addrs)
        _refuse_rfh(req)
        self._ok_addrs = addrs

    def __repr__(self) -> str:
        return f"ClientPolicy({self.agent_id})"


class UserPolicy:
    """A user-scoped client (Coder Connect): each AddTunnel is checked by ``authorizer``.

    ``authorizer(agent_id)`` returns True if the user may reach that agent. A
    ``False`` result or an exception refuses with :data:`TUNNEL_DENIED` (the
    exception is chained as ``__cause__`` for logs, never shown to the peer).
    """

    __slots__ = ("_authorizer", "_ok_addrs")

    def __init__(self, authorizer: TunnelAuthorizer) -> None:
        self._authorizer = authorizer
        self._ok_addrs: tuple[str, ...] = ()

    async def authorize(self, peer_id: uuid.UUID, req: pb.CoordinateRequest) -> None:
        self._ok_addrs = _check_host_addresses(req, self._ok_addrs)
        _refuse_rfh(req)
        dst = _tunnel_dst(req)
        if dst is None:
            return
        try:
            ok = await self._authorizer(dst)
        except Exception as exc:
            raise AuthorizationError(TUNNEL_DENIED) from exc
        if not ok:
            raise AuthorizationError(TUNNEL_DENIED)


class UnrestrictedPolicy:
    """The control plane's own tailnet (coderd / proxies): everything is allowed."""

    __slots__ = ()

    async def authorize(self, peer_id: uuid.UUID, req: pb.CoordinateRequest) -> None:
        return None
