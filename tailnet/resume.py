"""Resume tokens: let a reconnecting client keep its coordinator peer ID.

Flow (Coder's ``tailnet/resume.go``):

1. While a client's Coordinate stream is live it calls ``RefreshResumeToken``;
   the server answers with a token bound to that stream's peer ID **and to the
   caller's principal**, ``refresh_in`` (half the lifetime) and ``expires_at``.
2. On reconnect the client presents the token (gRPC metadata
   ``tailnet-resume-token``) with its session token. A valid token presented by
   the same principal makes the server reuse the peer ID (``sub``), so agents
   see LOST → NODE for the same peer instead of DISCONNECTED plus a new peer.
   An invalid one — including one issued to another principal — is refused
   with a message naming ``resume_token`` (HTTP 401, validation field
   ``resume_token``; Coder's clients then retry at once without it); a legacy
   token without ``kid`` is ignored and the client gets a fresh ID.

Token format: compact JWS, algorithm HS512, header ``kid`` = the signing key's
sequence number as a decimal string; claims ``sub`` (peer UUID string), ``exp``
and ``iat`` (NumericDate), and ``principal`` = ``"<kind>:<id>"`` of the
principal it was issued to (e.g. ``"user:1111…"``). Default lifetime 24 h,
``refresh_in`` 12 h.

Binding to the principal (a deliberate difference from Coder, whose tokens
carry only the peer ID): otherwise anyone holding a token could move that peer
ID, and the tunnels of it that other peers opened, to their own identity. A
token that has a ``kid`` but no ``principal`` claim (issued before the claim
existed) is refused as invalid — the safe choice: the client reconnects without
it and gets a fresh peer ID, once.

Keys: :class:`ResumeKeyStore` holds 64-byte random secrets numbered 1, 2, …;
the newest signs. :meth:`ResumeTokenProvider.rotate` adds a key and *retires*
the previous one, which keeps verifying tokens until ``retired_at + lifetime``
(every token it signed has expired by then) and is then pruned. The store may
be persisted as JSON (written atomically, mode 0600) so tokens survive restarts.

Invariant: a token verifies iff its ``kid`` names a key still in the store, its
signature matches that key, ``exp`` is in the future, ``sub`` is a UUID and its
``principal`` claim names the presenting principal.
"""

from __future__ import annotations

import json
import os
import secrets
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import jwt
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from derp.keys import write_secret_file
from tailnet.identity import Principal
from tailnet.v2 import tailnet_pb2 as pb

__all__ = [
    "DEFAULT_LIFETIME",
    "ALGORITHM",
    "PRINCIPAL_CLAIM",
    "principal_claim",
    "InvalidResumeToken",
    "LegacyResumeToken",
    "ResumeKey",
    "ResumeKeyStore",
    "ResumeTokenProvider",
]

DEFAULT_LIFETIME = timedelta(hours=24)
ALGORITHM = "HS512"
#: Claim naming the principal a token was issued to (value: :func:`principal_claim`).
PRINCIPAL_CLAIM = "principal"
_SECRET_LEN = 64


def principal_claim(principal: Principal) -> str:
    """``"<kind>:<id>"``: the principal's identity (its display name is not part of it)."""
    return f"{principal.kind}:{principal.id}"


class InvalidResumeToken(Exception):
    """A presented resume token was refused; ``str()`` is the client-facing text."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"Invalid resume token: resume_token {reason}")


class LegacyResumeToken(InvalidResumeToken):
    """A token without ``kid`` (pre-rotation format): callers use a fresh peer ID."""


@dataclass(slots=True)
class ResumeKey:
    """One HMAC signing key. ``retired_at`` is set once a newer key took over."""

    seq: int
    secret: bytes
    created_at: float
    retired_at: float | None = None


class ResumeKeyStore:
    """Signing keys by sequence number, optionally persisted to a JSON file.

    The newest key (highest ``seq``) signs; all keys present verify.
    """

    def __init__(self, keys: list[ResumeKey], path: Path | None = None) -> None:
        if not keys:
            raise ValueError("a key store needs at least one key")
        self._keys: dict[int, ResumeKey] = {k.seq: k for k in keys}
        self._path = path

    @classmethod
    def generate(cls, *, now: float | None = None, path: Path | None = None) -> ResumeKeyStore:
        """A store with one fresh random key (sequence number 1)."""
        created = time.time() if now is None else now
        return cls([ResumeKey(1, secrets.token_bytes(_SECRET_LEN), created)], path)

    @classmethod
    def load_or_create(
        cls, path: str | os.PathLike[str] | None, *, now: float | None = None
    ) -> ResumeKeyStore:
        """Load keys from ``path``; create (and save) a new store if it does not exist.

        ``path=None`` gives an in-memory store. A corrupt file raises ``ValueError``
        rather than silently invalidating every issued token.
        """
        if path is None:
            return cls.generate(now=now)
        p = Path(path)
        if not p.exists():
            store = cls.generate(now=now, path=p)
            try:
                store._write(replace=False)
                return store
            except FileExistsError:  # another process created it first: load theirs
                pass
        try:
            data = json.loads(p.read_text())
            keys = [
                ResumeKey(
                    seq=int(k["seq"]),
                    secret=bytes.fromhex(k["secret"]),
                    created_at=float(k["created_at"]),
                    retired_at=None if k.get("retired_at") is None else float(k["retired_at"]),
                )
                for k in data["keys"]
            ]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"cannot load resume keys from {p}: {exc}") from exc
        return cls(keys, p)

    def save(self) -> None:
        """Write the keys to the store's path (no-op for in-memory stores).

        Atomic, mode 0600 (:func:`derp.keys.write_secret_file`)."""
        self._write(replace=True)

    def _write(self, *, replace: bool) -> None:
        if self._path is None:
            return
        data = {
            "keys": [
                {
                    "seq": k.seq,
                    "secret": k.secret.hex(),
                    "created_at": k.created_at,
                    "retired_at": k.retired_at,
                }
                for k in sorted(self._keys.values(), key=lambda k: k.seq)
            ]
        }
        write_secret_file(self._path, json.dumps(data).encode("utf-8"), replace=replace)

    @property
    def signing_key(self) -> ResumeKey:
        """The newest key."""
        return self._keys[max(self._keys)]

    def get(self, seq: int) -> ResumeKey | None:
        """The key with sequence number ``seq``, if still kept."""
        return self._keys.get(seq)

    def sequences(self) -> list[int]:
        """Sequence numbers currently kept, ascending."""
        return sorted(self._keys)

    def rotate(self, now: float) -> ResumeKey:
        """Add a new signing key (seq + 1) and retire the previous one at ``now``."""
        old = self.signing_key
        if old.retired_at is None:
            old.retired_at = now
        new = ResumeKey(old.seq + 1, secrets.token_bytes(_SECRET_LEN), now)
        self._keys[new.seq] = new
        return new

    def prune(self, now: float, lifetime: float) -> None:
        """Drop retired keys whose tokens have all expired (retired_at + lifetime <= now)."""
        for seq, key in list(self._keys.items()):
            if key.retired_at is not None and key.retired_at + lifetime <= now:
                del self._keys[seq]


class ResumeTokenProvider:
    """Issues and verifies resume tokens (see module docstring for the format)."""

    def __init__(
        self,
        keys: ResumeKeyStore | None = None,
        *,
        lifetime: timedelta = DEFAULT_LIFETIME,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if lifetime <= timedelta(0):
            raise ValueError("lifetime must be positive")
        self._clock = clock
        self._keys = keys if keys is not None else ResumeKeyStore.generate(now=clock())
        self._lifetime = lifetime

    @property
    def lifetime(self) -> timedelta:
        return self._lifetime

    @property
    def keys(self) -> ResumeKeyStore:
        return self._keys

    def issue(self, peer_id: uuid.UUID, principal: Principal) -> pb.RefreshResumeTokenResponse:
        """A token for ``peer_id``, usable only by ``principal``, with
        ``refresh_in = lifetime / 2``."""
        now = self._clock()
        lifetime_s = self._lifetime.total_seconds()
        exp = now + lifetime_s
        key = self._keys.signing_key
        token = jwt.encode(
            {
                "sub": str(peer_id),
                "iat": int(now),
                "exp": int(exp),
                PRINCIPAL_CLAIM: principal_claim(principal),
            },
            key.secret,
            algorithm=ALGORITHM,
            headers={"kid": str(key.seq)},
        )
        refresh_in = Duration()
        refresh_in.FromTimedelta(self._lifetime / 2)
        expires_at = Timestamp()
        expires_at.FromSeconds(int(exp))
        return pb.RefreshResumeTokenResponse(
            token=token, refresh_in=refresh_in, expires_at=expires_at
        )

    def verify(self, token: str, principal: Principal) -> uuid.UUID:
        """Return the peer ID in ``token`` if ``principal`` may resume it.

        Raises :class:`LegacyResumeToken` for a token without ``kid`` and
        :class:`InvalidResumeToken` for anything else that is wrong, including a
        token issued to another principal or one without a ``principal`` claim.
        """
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise InvalidResumeToken("is malformed") from None
        if header.get("alg") != ALGORITHM:
            raise InvalidResumeToken(f"uses algorithm {header.get('alg')!r}, expected HS512")
        kid = header.get("kid")
        if kid is None:
            raise LegacyResumeToken("has no key id")
        try:
            seq = int(str(kid), 10)
        except ValueError:
            raise InvalidResumeToken(f"has an invalid key id {kid!r}") from None
        key = self._keys.get(seq)
        if key is None:
            raise InvalidResumeToken(f"is signed with an unknown or expired key {kid!r}")
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key.secret,
                algorithms=[ALGORITHM],
                options={"verify_exp": False, "require": ["exp", "sub"]},
            )
        except jwt.InvalidSignatureError:
            raise InvalidResumeToken("has a bad signature") from None
        except jwt.PyJWTError as exc:
            raise InvalidResumeToken(f"is invalid ({exc})") from None
        exp = claims["exp"]
        if not isinstance(exp, (int, float)) or exp <= self._clock():
            raise InvalidResumeToken("has expired")
        try:
            peer_id = uuid.UUID(str(claims["sub"]))
        except ValueError:
            raise InvalidResumeToken("has an invalid subject (expected a peer UUID)") from None
        bound = claims.get(PRINCIPAL_CLAIM)
        if bound is None:
            raise InvalidResumeToken("is not bound to a principal (issued by an older server)")
        if bound != principal_claim(principal):
            raise InvalidResumeToken("was issued to a different principal")
        return peer_id

    def rotate(self) -> None:
        """Start signing with a new key; old keys verify for one more token lifetime."""
        now = self._clock()
        self._keys.prune(now, self._lifetime.total_seconds())
        self._keys.rotate(now)
        self._keys.save()
