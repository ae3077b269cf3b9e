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

Revocation: every long-lived session a token opens (an API WebSocket, a gRPC
stream) registers with a :class:`SessionRegistry` under the token's
:func:`token_hash`; revoking the hash runs each session's ``close`` callback
once (and any session registered later for that hash is closed at once, so a
session authenticated just before a revocation cannot outlive it).
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from collections.abc import Callable, Iterable, Mapping
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
    "token_hash",
    "SessionRegistry",
]

log = logging.getLogger(__name__)

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


def token_hash(token: str) -> str:
    """SHA-256 (hex) of a token: how tokens are stored and how sessions are keyed."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class SessionRegistry:
    """Open sessions by the hash of the token that opened them (see module docstring).

    Pure bookkeeping, no I/O: ``close`` callbacks are synchronous and must not
    block (schedule the actual closing). Everything runs on one event loop.
    """

    def __init__(self) -> None:
        self._open: dict[str, dict[int, Callable[[], None]]] = {}
        self._revoked: set[str] = set()
        self._next = 0

    def __len__(self) -> int:
        return sum(len(v) for v in self._open.values())

    def open(self, token: str, close: Callable[[], None]) -> Callable[[], None]:
        """Register a session of ``token``; returns the function that unregisters it.

        If the token is already revoked, ``close`` runs now.
        """
        h = token_hash(token)
        if h in self._revoked:
            close()
            return _noop
        self._next += 1
        n = self._next
        sessions = self._open.setdefault(h, {})
        sessions[n] = close

        def unregister() -> None:
            live = self._open.get(h)
            if live is not None:
                live.pop(n, None)
                if not live:
                    del self._open[h]

        return unregister

    def revoke(self, hashes: Iterable[str]) -> int:
        """Close every session of these token hashes (now and future); returns how many."""
        closed = 0
        for h in hashes:
            self._revoked.add(h)
            for close in list(self._open.pop(h, {}).values()):
                closed += 1
                try:
                    close()
                except Exception:  # one failing session must not keep the others open
                    log.exception("closing a revoked session failed")
        return closed


def _noop() -> None:
    pass
