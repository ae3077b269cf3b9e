"""Resume tokens: issue/verify, expiry, forgery, key rotation and persistence."""

from __future__ import annotations

import json
import stat
import uuid
from datetime import timedelta
from pathlib import Path

import jwt
import pytest

from tailnet.identity import Principal
from tailnet.resume import (
    PRINCIPAL_CLAIM,
    InvalidResumeToken,
    LegacyResumeToken,
    ResumeKeyStore,
    ResumeTokenProvider,
)

DAY = 24 * 3600
ME = Principal("user", uuid.UUID("11111111-1111-4111-8111-111111111111"), "me")


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def provider(clock: Clock, store: ResumeKeyStore | None = None) -> ResumeTokenProvider:
    return ResumeTokenProvider(store or ResumeKeyStore.generate(now=clock()), clock=clock)


def test_issue_and_verify_roundtrip() -> None:
    clock = Clock()
    p = provider(clock)
    peer = uuid.uuid4()
    resp = p.issue(peer, ME)
    assert p.verify(resp.token, ME) == peer
    header = jwt.get_unverified_header(resp.token)
    assert header == {"alg": "HS512", "typ": "JWT", "kid": "1"}
    claims = jwt.decode(resp.token, options={"verify_signature": False})
    assert claims["sub"] == str(peer) and claims["exp"] == int(clock.now) + DAY
    assert claims[PRINCIPAL_CLAIM] == f"user:{ME.id}"
    assert resp.refresh_in.ToTimedelta() == timedelta(hours=12)
    assert resp.expires_at.ToSeconds() == int(clock.now) + DAY


def test_expiry_boundary() -> None:
    clock = Clock()
    p = provider(clock)
    token = p.issue(uuid.uuid4(), ME).token
    clock.now += DAY - 1
    p.verify(token, ME)
    clock.now += 1
    with pytest.raises(InvalidResumeToken, match="^Invalid resume token: resume_token has expired"):
        p.verify(token, ME)


def test_forged_and_malformed_tokens() -> None:
    clock = Clock()
    p = provider(clock)
    forged = jwt.encode(
        {"sub": str(uuid.uuid4()), "exp": int(clock.now) + 60},
        b"x" * 64, algorithm="HS512", headers={"kid": "1"},
    )
    with pytest.raises(InvalidResumeToken, match="bad signature"):
        p.verify(forged, ME)
    with pytest.raises(InvalidResumeToken, match="malformed"):
        p.verify("not.a.jwt", ME)
    hs256 = jwt.encode({"sub": "x", "exp": 1}, b"x" * 64, algorithm="HS256", headers={"kid": "1"})
    with pytest.raises(InvalidResumeToken, match="HS512"):
        p.verify(hs256, ME)
    key = p.keys.signing_key.secret
    bad_sub = jwt.encode({"sub": "nope", "exp": int(clock.now) + 60}, key, algorithm="HS512",
                         headers={"kid": "1"})
    with pytest.raises(InvalidResumeToken, match="subject"):
        p.verify(bad_sub, ME)
    no_exp = jwt.encode({"sub": str(uuid.uuid4())}, key, algorithm="HS512", headers={"kid": "1"})
    with pytest.raises(InvalidResumeToken):
        p.verify(no_exp, ME)
    legacy = jwt.encode({"sub": str(uuid.uuid4()), "exp": int(clock.now) + 60}, key,
                        algorithm="HS512")
    with pytest.raises(LegacyResumeToken):
        p.verify(legacy, ME)


@pytest.mark.parametrize(
    "other",
    [
        Principal("user", uuid.uuid4(), "me"),  # another user (same display name)
        Principal("agent", ME.id),  # same id, another kind
        Principal("control_plane", ME.id),
    ],
)
def test_token_is_bound_to_its_principal(other: Principal) -> None:
    p = provider(Clock())
    peer = uuid.uuid4()
    token = p.issue(peer, ME).token
    assert p.verify(token, Principal("user", ME.id, "renamed")) == peer  # name is not identity
    with pytest.raises(
        InvalidResumeToken,
        match="^Invalid resume token: resume_token was issued to a different principal$",
    ):
        p.verify(token, other)


def test_token_without_principal_claim_is_invalid() -> None:
    """Tokens signed before the claim existed are refused (not silently accepted)."""
    clock = Clock()
    p = provider(clock)
    old_format = jwt.encode(
        {"sub": str(uuid.uuid4()), "iat": int(clock.now), "exp": int(clock.now) + 60},
        p.keys.signing_key.secret, algorithm="HS512", headers={"kid": "1"},
    )
    with pytest.raises(InvalidResumeToken, match="not bound to a principal") as exc:
        p.verify(old_format, ME)
    assert not isinstance(exc.value, LegacyResumeToken)  # → 401, not a silent fresh ID


def test_rotation_keeps_old_tokens_for_their_lifetime() -> None:
    clock = Clock()
    p = provider(clock)
    peer = uuid.uuid4()
    old = p.issue(peer, ME).token
    clock.now += 3600
    p.rotate()
    new = p.issue(peer, ME).token
    assert jwt.get_unverified_header(new)["kid"] == "2"
    assert p.verify(old, ME) == peer and p.verify(new, ME) == peer
    # Key 1 is pruned at the next rotation once a full lifetime has passed.
    clock.now += DAY
    p.rotate()
    assert p.keys.sequences() == [2, 3]
    with pytest.raises(InvalidResumeToken, match="unknown or expired key"):
        p.verify(old, ME)
    assert p.verify(p.issue(peer, ME).token, ME) == peer


def test_key_store_persistence(tmp_path: Path) -> None:
    clock = Clock()
    path = tmp_path / "data" / "resume-keys.json"
    store = ResumeKeyStore.load_or_create(path, now=clock())
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    p = provider(clock, store)
    token = p.issue(uuid.uuid4(), ME).token
    p.rotate()  # persisted
    again = provider(clock, ResumeKeyStore.load_or_create(path))
    assert again.keys.sequences() == [1, 2]
    again.verify(token, ME)
    path.write_text(json.dumps({"keys": [{"seq": "x"}]}))
    with pytest.raises(ValueError, match="cannot load resume keys"):
        ResumeKeyStore.load_or_create(path)
    assert ResumeKeyStore.load_or_create(None).sequences() == [1]
