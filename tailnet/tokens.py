"""Tokens of the embedded stack: only their hashes are stored; they can be listed and revoked.

A token reads ``<id>-<secret>`` (as Coder's API keys): ``id`` is 10 characters
of ``[0-9a-z]``, public, and names the token in listings and revocations;
``secret`` is 32 alphanumeric characters (~190 bits). The file stores, per
token, its ``id``, ``hashed_secret`` = SHA-256 (hex) of the *whole* token
string, the principal and the creation time, never the token itself. A
presented token is looked up by its hash, so tokens of the older plaintext
format (any string) keep working after migration.

``tokens.json`` (mode 0600, written atomically by
:func:`derp.keys.write_secret_file`)::

    {"version": 2,
     "tokens": [{"id": "k3v9x0a2mq", "hashed_secret": "<64 hex>",
                 "kind": "agent" | "user" | "control_plane",
                 "principal_id": "<uuid>", "name": "...",
                 "created_at": "2026-11-30T12:00:00Z",
                 # agents only: their workspace, for the in-memory provider
                 "workspace_id": "<uuid>", "owner_id": "<uuid>", "workspace_name": "..."}]}

Migration: a file of the first format (entries ``{"token": "<plaintext>",
"kind", "id": <principal uuid>, ...}``) is rewritten on load with each token
replaced by a fresh id and its hash.

Several processes share the file (``tailnet serve`` and ``tailnet token
create|revoke``): every read-modify-write holds an exclusive ``flock`` on
``tokens.json.lock``. A running server notices another process's change by
``stat`` (inode, mtime, size) — on every authentication and when
:meth:`TokenStore.check` runs (the stack calls it twice a second) — and then
reloads; tokens gone from the file are reported to ``on_revoke`` listeners
(which close the sessions they opened: :class:`tailnet.identity.SessionRegistry`).
Reloads read at most :data:`MAX_FILE_SIZE` bytes; an unreadable file keeps the
previous tokens (logged once per change).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets
import string
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Final

from derp.keys import write_secret_file
from tailnet.identity import Principal, token_hash

__all__ = [
    "TokenRecord",
    "TokenInfo",
    "TokenStore",
    "new_token",
    "MAX_FILE_SIZE",
    "TOKEN_ID_LEN",
]

log = logging.getLogger(__name__)

#: Largest tokens file a (re)load reads.
MAX_FILE_SIZE: Final = 16 << 20
TOKEN_ID_LEN: Final = 10
_SECRET_LEN: Final = 32
_ID_ALPHABET: Final = string.ascii_lowercase + string.digits
_SECRET_ALPHABET: Final = string.ascii_letters + string.digits
_FORMAT_VERSION: Final = 2


def _random(alphabet: str, n: int) -> str:
    return "".join(secrets.choice(alphabet) for _ in range(n))


def new_token() -> tuple[str, str]:
    """A fresh ``(id, token)``; the token reads ``<id>-<secret>``."""
    tid = _random(_ID_ALPHABET, TOKEN_ID_LEN)
    return tid, f"{tid}-{_random(_SECRET_ALPHABET, _SECRET_LEN)}"


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _from_iso(text: str) -> float:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc).timestamp()


@dataclass(frozen=True, slots=True)
class TokenRecord:
    """One issued token, as stored: its id and hash, never the token.

    Agent records carry their workspace for the in-memory workspace provider.
    """

    id: str
    hashed_secret: str
    principal: Principal
    created_at: float = 0.0
    workspace_id: uuid.UUID | None = None
    owner_id: uuid.UUID | None = None
    workspace_name: str = ""

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "id": self.id,
            "hashed_secret": self.hashed_secret,
            "kind": self.principal.kind,
            "principal_id": str(self.principal.id),
            "name": self.principal.name,
            "created_at": _iso(self.created_at),
        }
        if self.workspace_id is not None:
            doc["workspace_id"] = str(self.workspace_id)
            doc["owner_id"] = str(self.owner_id)
            doc["workspace_name"] = self.workspace_name
        return doc

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> tuple[TokenRecord, bool]:
        """Parse one entry; returns ``(record, migrated)`` (``migrated``: it held a
        plaintext token of the first format, now hashed under a fresh id)."""
        kind = doc["kind"]
        if kind not in ("agent", "user", "control_plane"):
            raise ValueError(f"unknown principal kind {kind!r}")
        ws = doc.get("workspace_id")
        extra: dict[str, Any] = {
            "workspace_id": uuid.UUID(ws) if ws else None,
            "owner_id": uuid.UUID(doc["owner_id"]) if ws else None,
            "workspace_name": str(doc.get("workspace_name", "")),
        }
        if "token" in doc:  # first format: plaintext token, "id" is the principal
            token = str(doc["token"])
            if not token:
                raise ValueError("empty token")
            principal = Principal(kind, uuid.UUID(doc["id"]), str(doc.get("name", "")))
            tid = _random(_ID_ALPHABET, TOKEN_ID_LEN)
            return cls(tid, token_hash(token), principal, time.time(), **extra), True
        hashed = str(doc["hashed_secret"])
        if len(hashed) != 64 or any(c not in "0123456789abcdef" for c in hashed):
            raise ValueError(f"token {doc.get('id')!r}: hashed_secret is not 64 hex digits")
        principal = Principal(kind, uuid.UUID(doc["principal_id"]), str(doc.get("name", "")))
        created = _from_iso(doc["created_at"]) if doc.get("created_at") else 0.0
        return cls(str(doc["id"]), hashed, principal, created, **extra), False


@dataclass(frozen=True, slots=True)
class TokenInfo:
    """What :meth:`TokenStore.infos` reports (``last_used``: in this process, else ``None``)."""

    id: str
    kind: str
    principal_id: uuid.UUID
    name: str
    created_at: float
    last_used: float | None


_Signature = tuple[int, int, int]  # inode, mtime ns, size


class TokenStore:
    """Token hashes → principals, optionally persisted (see module docstring).

    An :class:`~tailnet.identity.Authenticator`. Listeners: ``on_load(records)``
    after every (re)load; ``on_revoke(hashes)`` with the hashes of tokens that
    disappeared (revoked here, or removed from the file by another process).
    """

    def __init__(self, path: Path | None = None) -> None:
        self._path = path
        self._lock_path = path.with_name(path.name + ".lock") if path is not None else None
        self._by_hash: dict[str, TokenRecord] = {}
        self._sig: _Signature | None = None
        self._holding_lock = False
        self._last_used: dict[str, float] = {}
        self.on_load: list[Callable[[list[TokenRecord]], object]] = []
        self.on_revoke: list[Callable[[set[str]], object]] = []
        if path is not None and path.exists():
            with self._locked():
                self._load(strict=True)

    # ------------------------------------------------------------------ queries

    @property
    def records(self) -> list[TokenRecord]:
        return list(self._by_hash.values())

    def first(self, kind: str) -> TokenRecord | None:
        for r in self._by_hash.values():
            if r.principal.kind == kind:
                return r
        return None

    def infos(self) -> list[TokenInfo]:
        """Every token (oldest first), with its last use in this process if any."""
        self.check()
        return [
            TokenInfo(
                r.id, r.principal.kind, r.principal.id, r.principal.name, r.created_at,
                self._last_used.get(r.id),
            )
            for r in sorted(self._by_hash.values(), key=lambda r: (r.created_at, r.id))
        ]

    async def authenticate(self, token: str) -> Principal | None:
        self.check()
        rec = self._by_hash.get(token_hash(token))
        if rec is None:
            return None
        self._last_used[rec.id] = time.time()
        return rec.principal

    # ------------------------------------------------------------------ changes

    def issue(
        self,
        principal: Principal,
        *,
        workspace_id: uuid.UUID | None = None,
        owner_id: uuid.UUID | None = None,
        workspace_name: str = "",
    ) -> tuple[TokenRecord, str]:
        """Mint, store (and persist) a token for ``principal``; returns ``(record, token)``.

        The token itself is returned only here: it is not stored anywhere.
        """
        tid, token = new_token()
        rec = TokenRecord(
            tid, token_hash(token), principal, time.time(), workspace_id, owner_id, workspace_name
        )
        with self._locked():
            self.check()
            self._by_hash[rec.hashed_secret] = rec
            self._save()
        return rec, token

    def revoke(self, token_id: str) -> bool:
        """Remove the token ``token_id`` (persisted); its sessions are told at once.

        Returns False if no such token exists.
        """
        with self._locked():
            self.check()
            gone = {h for h, r in self._by_hash.items() if r.id == token_id}
            if not gone:
                return False
            for h in gone:
                del self._by_hash[h]
            self._save()
        self._last_used.pop(token_id, None)
        self._notify_revoked(gone)
        return True

    def check(self) -> None:
        """Reload if the file changed since we last read or wrote it (one ``stat``)."""
        if self._path is None:
            return
        if self._signature() != self._sig:
            self._load(strict=False)

    # ------------------------------------------------------------------ file

    def _signature(self) -> _Signature | None:
        assert self._path is not None
        try:
            st = self._path.stat()
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Exclusive lock against other processes' read-modify-write of the file."""
        if self._lock_path is None:
            yield
            return
        self._lock_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._holding_lock = True
            yield
        finally:
            self._holding_lock = False
            os.close(fd)  # releases the lock

    def _load(self, *, strict: bool) -> None:
        """(Re)read the file. ``strict``: raise ``ValueError`` on a bad file (first
        load); else keep the current tokens and log once per file change."""
        assert self._path is not None
        sig = self._signature()
        migrated = False
        try:
            if sig is None:
                records: list[TokenRecord] = []
            else:
                if sig[2] > MAX_FILE_SIZE:
                    raise ValueError(f"file larger than {MAX_FILE_SIZE} bytes")
                with open(self._path, "rb") as f:
                    doc = json.loads(f.read(MAX_FILE_SIZE + 1))
                records = []
                for entry in doc.get("tokens", []):
                    rec, was_plain = TokenRecord.from_json(entry)
                    records.append(rec)
                    migrated = migrated or was_plain
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            self._sig = sig
            if strict:
                raise ValueError(f"cannot load tokens from {self._path}: {exc}") from exc
            log.warning("tokens file %s changed but cannot be read (%s); keeping the old tokens",
                        self._path, exc)
            return
        before = set(self._by_hash)
        self._by_hash = {r.hashed_secret: r for r in records}
        self._sig = sig
        if migrated:
            self._migrate()
        gone = before - set(self._by_hash)
        if gone:
            live = {r.id for r in self._by_hash.values()}
            for tid in [t for t in self._last_used if t not in live]:
                del self._last_used[tid]
            self._notify_revoked(gone)
        for cb in self.on_load:
            cb(self.records)

    def _migrate(self) -> None:
        """Rewrite a first-format file without its plaintext tokens (under the lock
        only; a reload outside it migrates on the next locked access)."""
        if not self._holding_lock:
            return
        try:
            self._save()
            log.info("tokens file %s: plaintext tokens replaced by their hashes", self._path)
        except OSError as exc:
            log.warning("tokens file %s holds plaintext tokens and cannot be rewritten: %s",
                        self._path, exc)

    def _save(self) -> None:
        if self._path is None:
            return
        doc = {
            "version": _FORMAT_VERSION,
            "tokens": [r.to_json() for r in self._by_hash.values()],
        }
        write_secret_file(self._path, json.dumps(doc, indent=2).encode("utf-8") + b"\n")
        self._sig = self._signature()

    def _notify_revoked(self, hashes: set[str]) -> None:
        for cb in self.on_revoke:
            try:
                cb(hashes)
            except Exception:  # a listener's bug must not keep a token alive elsewhere
                log.exception("token revocation listener failed")
