"""Authorization policies (spec coordinator.md §2.3)."""

from __future__ import annotations

import ipaddress
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tailnet.auth import (
    CODER_SERVICE_PREFIX,
    LEGACY_AGENT_IP,
    TAILSCALE_SERVICE_PREFIX,
    TUNNEL_DENIED,
    AgentPolicy,
    AuthorizationError,
    ClientPolicy,
    CoordinateePolicy,
    UnrestrictedPolicy,
    UserPolicy,
    addr_from_uuid,
)
from tailnet.v2 import tailnet_pb2 as pb

Req = pb.CoordinateRequest
AGENT = uuid.UUID("12345678-9abc-def0-1234-56789abcdef0")
OTHER = uuid.UUID("aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee")
PEER = uuid.uuid4()


def with_addrs(*addrs: str) -> Req:
    return Req(update_self=Req.UpdateSelf(node=pb.Node(addresses=list(addrs))))


def add(dst: uuid.UUID) -> Req:
    return Req(add_tunnel=Req.Tunnel(id=dst.bytes))


RFH = Req(ready_for_handshake=[Req.ReadyForHandshake(id=OTHER.bytes)])
CLIENT_ADDR = f"{addr_from_uuid(TAILSCALE_SERVICE_PREFIX, uuid.uuid4())}/128"


def test_addr_from_uuid_overwrites_first_six_bytes() -> None:
    a = addr_from_uuid(TAILSCALE_SERVICE_PREFIX, AGENT)
    assert a.packed[:6] == bytes.fromhex("fd7a115ca1e0")
    assert a.packed[6:] == AGENT.bytes[6:]
    assert str(a) == "fd7a:115c:a1e0:def0:1234:5678:9abc:def0"
    c = addr_from_uuid(CODER_SERVICE_PREFIX, AGENT)
    assert c.packed[:6] == bytes.fromhex("fd60627aa42b") and c.packed[6:] == AGENT.bytes[6:]


@given(st.uuids(), st.integers(min_value=0, max_value=128))
def test_addr_from_uuid_in_prefix(u: uuid.UUID, bits: int) -> None:
    net = ipaddress.IPv6Network((int(TAILSCALE_SERVICE_PREFIX.network_address), bits), strict=False)
    a = addr_from_uuid(net, u)
    assert a in net
    low = (1 << (128 - bits)) - 1
    assert int(a) & low == u.int & low


async def test_policies_satisfy_protocol() -> None:
    async def yes(_: uuid.UUID) -> bool:
        return True

    policies: list[CoordinateePolicy] = [
        AgentPolicy(AGENT),
        ClientPolicy(AGENT),
        UserPolicy(yes),
        UnrestrictedPolicy(),
    ]
    for p in policies:
        await p.authorize(PEER, Req())  # empty request always fine
        await p.authorize(PEER, Req(disconnect=Req.Disconnect()))
        await p.authorize(PEER, Req(remove_tunnel=Req.Tunnel(id=OTHER.bytes)))


# --------------------------------------------------------------------------- agent


@pytest.mark.parametrize(
    "addr",
    [
        f"{addr_from_uuid(TAILSCALE_SERVICE_PREFIX, AGENT)}/128",
        f"{addr_from_uuid(CODER_SERVICE_PREFIX, AGENT)}/128",
        f"{LEGACY_AGENT_IP}/128",
    ],
)
async def test_agent_own_addresses_allowed(addr: str) -> None:
    await AgentPolicy(AGENT).authorize(AGENT, with_addrs(addr))


async def test_agent_all_three_addresses_and_rfh_allowed() -> None:
    r = with_addrs(
        f"{addr_from_uuid(TAILSCALE_SERVICE_PREFIX, AGENT)}/128",
        f"{addr_from_uuid(CODER_SERVICE_PREFIX, AGENT)}/128",
    )
    r.ready_for_handshake.add(id=OTHER.bytes)
    await AgentPolicy(AGENT).authorize(AGENT, r)


@pytest.mark.parametrize(
    ("req", "detail"),
    [
        (add(OTHER), "agents cannot open tunnels"),
        (
            with_addrs(f"{addr_from_uuid(TAILSCALE_SERVICE_PREFIX, OTHER)}/128"),
            "invalid node address",
        ),
        (
            with_addrs(f"{addr_from_uuid(TAILSCALE_SERVICE_PREFIX, AGENT)}/64"),
            "expected 128, got 64",
        ),
        (with_addrs(str(addr_from_uuid(TAILSCALE_SERVICE_PREFIX, AGENT))), "parse node address"),
        (with_addrs("10.0.0.1/32"), "expected 128, got 32"),
        (with_addrs("not-an-ip/128"), "parse node address"),
        (with_addrs("fd7a::1/129"), "parse node address"),
        (with_addrs("fe80::1%eth0/128"), "parse node address"),
    ],
)
async def test_agent_denied(req: Req, detail: str) -> None:
    with pytest.raises(AuthorizationError, match=detail) as info:
        await AgentPolicy(AGENT).authorize(AGENT, req)
    assert info.value.wire_message.startswith("authorization: ")


# --------------------------------------------------------------------------- client


async def test_client_allowed() -> None:
    p = ClientPolicy(AGENT)
    await p.authorize(PEER, add(AGENT))
    await p.authorize(PEER, with_addrs(CLIENT_ADDR, "fd60:627a:a42b::5/128"))


@pytest.mark.parametrize(
    ("req", "detail"),
    [
        (add(OTHER), f"invalid agent id, expected {AGENT}, got {OTHER}"),
        (Req(add_tunnel=Req.Tunnel(id=b"abc")), "parse add tunnel id"),
        (with_addrs("fd7a:115c:a1e0::/48"), "expected 128, got 48"),
        (RFH, "clients may not send ready_for_handshake"),
    ],
)
async def test_client_denied(req: Req, detail: str) -> None:
    with pytest.raises(AuthorizationError, match=detail):
        await ClientPolicy(AGENT).authorize(PEER, req)


# --------------------------------------------------------------------------- user


async def test_user_policy_asks_authorizer_per_agent() -> None:
    asked: list[uuid.UUID] = []

    async def may_reach(agent: uuid.UUID) -> bool:
        asked.append(agent)
        return agent == AGENT

    p = UserPolicy(may_reach)
    await p.authorize(PEER, add(AGENT))
    with pytest.raises(AuthorizationError) as info:
        await p.authorize(PEER, add(OTHER))
    assert str(info.value) == TUNNEL_DENIED
    assert info.value.wire_message == f"authorization: {TUNNEL_DENIED}"
    await p.authorize(PEER, with_addrs(CLIENT_ADDR))  # no tunnel: authorizer not consulted
    assert asked == [AGENT, OTHER]


async def test_user_policy_authorizer_exception_is_denial_without_leaking() -> None:
    async def broken(agent: uuid.UUID) -> bool:
        raise ConnectionError("db password=hunter2")

    with pytest.raises(AuthorizationError) as info:
        await UserPolicy(broken).authorize(PEER, add(AGENT))
    assert str(info.value) == TUNNEL_DENIED
    assert isinstance(info.value.__cause__, ConnectionError)


@pytest.mark.parametrize(
    ("req", "detail"),
    [
        (with_addrs("fd7a::1/127"), "expected 128, got 127"),
        (RFH, "clients may not send ready_for_handshake"),
    ],
)
async def test_user_denied_before_asking(req: Req, detail: str) -> None:
    async def never(agent: uuid.UUID) -> bool:  # pragma: no cover - must not be called
        raise AssertionError("authorizer called")

    with pytest.raises(AuthorizationError, match=detail):
        await UserPolicy(never).authorize(PEER, req)


# --------------------------------------------------------------------------- unrestricted


async def test_unrestricted_allows_everything() -> None:
    r = with_addrs("10.0.0.0/8", "garbage")
    r.add_tunnel.id = OTHER.bytes
    r.ready_for_handshake.add(id=AGENT.bytes)
    await UnrestrictedPolicy().authorize(PEER, r)
