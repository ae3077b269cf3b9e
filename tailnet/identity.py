"""Caller identity: principals, the authenticator interface and the metadata contract.

Coder carries identity in HTTP headers/query parameters of the websocket that
holds the RPC connection. Over gRPC every call carries it in request metadata
instead (keys are lower case, as gRPC requires):

===========================  ==================================================
``authorization``            ``Bearer <token>`` (session or agent token)
``coder-session-token``      ``<token>`` (alternative to ``authorization``)
``tailnet-version``          ``"2.x"``; optional, default ``"2.0"``. Malformed
                             → INVALID_ARGUMENT, unsupported → FAILED_PRECONDITION
``tailnet-agent-id``         ``<uuid>``; a *user* principal coordinates as a
                             client bound to that one agent (ClientPolicy).
                             Absent → UserPolicy (any agent the user may reach)
``tailnet-resume-token``     ``<jwt>``; reconnect with the same peer ID
``tailnet-peer-id``          ``<uuid>``; on RefreshResumeToken, names the
                             caller's live Coordinate peer
===========================  ==================================================

Server → client initial metadata on ``Coordinate``: ``tailnet-peer-id: <uuid>``
(the peer ID the server assigned; peer IDs are never taken from messages).

Roles: an ``agent`` principal coordinates as peer ``principal.id`` under
AgentPolicy; a ``user`` principal gets a fresh (or resumed) peer ID under
ClientPolicy/UserPolicy; a ``control_plane`` principal gets a fresh (or resumed)
peer ID under UnrestrictedPolicy.

Tokens are opaque to this module: an :class:`Authenticator` maps a token to a
:class:`Principal` or ``None`` (unknown token).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final, Literal, Protocol

__all__ = [
    "Principal",
    "PrincipalKind",
    "Authenticator",
    "StaticTokenAuthenticator",
    "MD_AUTHORIZATION",
    "MD_SESSION_TOKEN",
    "MD_VERSION",
    "MD_AGENT_ID",
    "MD_RESUME_TOKEN",
    "MD_PEER_ID",
    "token_from_metadata",
    "metadata_dict",
]

MD_AUTHORIZATION: Final = "authorization"
MD_SESSION_TOKEN: Final = "coder-session-token"
MD_VERSION: Final = "tailnet-version"
MD_AGENT_ID: Final = "tailnet-agent-id"
MD_RESUME_TOKEN: Final = "tailnet-resume-token"
MD_PEER_ID: Final = "tailnet-peer-id"

PrincipalKind = Literal["agent", "user", "control_plane"]


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller.

    ``kind`` decides the coordination policy; ``id`` is the agent ID for agents,
    the user ID for users, and an arbitrary stable ID for the control plane.
    """

    kind: PrincipalKind
    id: uuid.UUID
    name: str = ""


class Authenticator(Protocol):
    """Maps a bearer/session token to a principal (``None`` = unknown token)."""

    async def authenticate(self, token: str) -> Principal | None: ...


class StaticTokenAuthenticator:
    """In-memory token table; tokens may be added and removed at runtime."""

    def __init__(self, tokens: Mapping[str, Principal] | None = None) -> None:
        self._tokens: dict[str, Principal] = dict(tokens or {})

    def add(self, token: str, principal: Principal) -> None:
        """Accept ``token`` as ``principal`` (replacing any previous binding)."""
        if not token:
            raise ValueError("token must not be empty")
        self._tokens[token] = principal

    def remove(self, token: str) -> None:
        """Stop accepting ``token`` (no error if unknown)."""
        self._tokens.pop(token, None)

    async def authenticate(self, token: str) -> Principal | None:
        return self._tokens.get(token)


def metadata_dict(metadata: Iterable[tuple[str, str | bytes]] | None) -> dict[str, str]:
    """Flatten gRPC-style metadata pairs into a dict (lower-case keys, first value wins).

    Binary (``-bin``) values are ignored; nothing in our contract uses them.
    """
    out: dict[str, str] = {}
    for key, value in metadata or ():
        if isinstance(value, bytes):
            continue
        out.setdefault(key.lower(), value)
    return out


def token_from_metadata(md: Mapping[str, str]) -> str | None:
    """Extract the caller's token: ``authorization: Bearer <t>`` or ``coder-session-token``.

    Returns ``None`` when neither is present (or the value is empty). An
    ``authorization`` value that is not a Bearer credential counts as absent
    unless ``coder-session-token`` is set.
    """
    auth = md.get(MD_AUTHORIZATION, "").strip()
    if auth:
        scheme, _, rest = auth.partition(" ")
        if scheme.lower() == "bearer" and rest.strip():
            return rest.strip()
    session = md.get(MD_SESSION_TOKEN, "").strip()
    return session or None
