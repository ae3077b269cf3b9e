"""Curve25519 node keys, their text forms, the NaCl box, and derper's key file.

DERP identifies every client by its WireGuard node public key (32 raw bytes);
the server has a long-lived private key. Text forms follow Tailscale:

* public:  ``nodekey:<64 lowercase hex>``
* private: ``privkey:<64 lowercase hex>``

The box is NaCl ``crypto_box`` (X25519 + XSalsa20-Poly1305). ``seal`` returns
``nonce(24) ‖ tag(16) ‖ ciphertext``, exactly what Go's ``SealTo`` emits and
``OpenFrom`` expects. All-zero keys are rejected everywhere (Go panics on them).

The server key file is derper's JSON ``{"PrivateKey": "privkey:<hex>"}``;
:func:`load_or_create_server_key` creates it (mode 0600) when missing and
returns the same key on every later start.

Secret files (this key, and the tailnet data dir's token and resume-key files)
are written with :func:`write_secret_file`: a fresh temporary name opened
``O_CREAT|O_EXCL|O_NOFOLLOW`` with mode 0600, written and fsynced, renamed
over (or linked to) the target, and the directory fsynced. Nothing that
already exists — a stale ``.tmp``, a symlink planted there — can give the
result another mode or redirect the write.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import nacl.exceptions
import nacl.public

from .errors import InvalidKeyError

__all__ = [
    "PUBLIC_PREFIX",
    "PRIVATE_PREFIX",
    "PublicKey",
    "PrivateKey",
    "seal",
    "open_sealed",
    "load_or_create_server_key",
    "write_secret_file",
]

PUBLIC_PREFIX = "nodekey:"
PRIVATE_PREFIX = "privkey:"
_ZERO = bytes(32)


def _from_hex(text: str, prefix: str) -> bytes:
    if not text.startswith(prefix):
        raise InvalidKeyError(f"key text must start with {prefix!r}")
    hexpart = text[len(prefix) :]
    if len(hexpart) != 64:
        raise InvalidKeyError(f"key text must have 64 hex digits, got {len(hexpart)}")
    try:
        raw = bytes.fromhex(hexpart)
    except ValueError:
        raise InvalidKeyError("key text is not valid hex") from None
    return raw


def _check_raw(raw: bytes) -> bytes:
    if len(raw) != 32:
        raise InvalidKeyError(f"key must be 32 bytes, got {len(raw)}")
    if raw == _ZERO:
        raise InvalidKeyError("all-zero key")
    return bytes(raw)


@dataclass(frozen=True, slots=True)
class PublicKey:
    """A node public key (raw 32 bytes), never all zero."""

    raw: bytes

    def __post_init__(self) -> None:
        # store immutable bytes even when given a bytearray/memoryview (hashable key)
        object.__setattr__(self, "raw", _check_raw(self.raw))

    @classmethod
    def from_text(cls, text: str) -> PublicKey:
        """Parse ``nodekey:<hex>``."""
        return cls(_from_hex(text.strip(), PUBLIC_PREFIX))

    def text(self) -> str:
        """``nodekey:<hex>``."""
        return PUBLIC_PREFIX + self.raw.hex()

    def short(self) -> str:
        """Abbreviated form for logs, like Tailscale's ``[abcde]``."""
        return "[" + self.raw.hex()[:8] + "]"

    def __str__(self) -> str:
        return self.text()


class PrivateKey:
    """A node (or server) private key with its public half."""

    __slots__ = ("_sk", "public")

    def __init__(self, raw: bytes) -> None:
        self._sk = nacl.public.PrivateKey(_check_raw(raw))
        self.public = PublicKey(bytes(self._sk.public_key))

    @classmethod
    def generate(cls) -> PrivateKey:
        """A fresh random key."""
        while True:
            sk = nacl.public.PrivateKey.generate()
            raw = bytes(sk)
            if raw != _ZERO and bytes(sk.public_key) != _ZERO:
                return cls(raw)

    @classmethod
    def from_text(cls, text: str) -> PrivateKey:
        """Parse ``privkey:<hex>``."""
        return cls(_from_hex(text.strip(), PRIVATE_PREFIX))

    @property
    def raw(self) -> bytes:
        return bytes(self._sk)

    def text(self) -> str:
        """``privkey:<hex>``."""
        return PRIVATE_PREFIX + self.raw.hex()

    def box(self, peer: PublicKey | bytes) -> nacl.public.Box:
        """The NaCl box shared with ``peer`` (cache it for repeated use)."""
        raw = peer.raw if isinstance(peer, PublicKey) else _check_raw(peer)
        return nacl.public.Box(self._sk, nacl.public.PublicKey(raw))

    def __repr__(self) -> str:
        return f"PrivateKey(public={self.public.text()})"


def seal(private: PrivateKey, peer: PublicKey | bytes, message: bytes) -> bytes:
    """Seal ``message`` to ``peer``: ``nonce ‖ tag ‖ ciphertext`` (random nonce)."""
    return bytes(private.box(peer).encrypt(message))


def open_sealed(private: PrivateKey, peer: PublicKey | bytes, sealed: bytes) -> bytes:
    """Open ``nonce ‖ box`` from ``peer``; raises :class:`InvalidKeyError` on a bad key
    and ``nacl.exceptions.CryptoError`` when the box does not authenticate."""
    if len(sealed) < 24 + 16:
        raise nacl.exceptions.CryptoError("sealed message too short")
    return bytes(private.box(peer).decrypt(sealed))


def write_secret_file(path: str | os.PathLike[str], data: bytes, *, replace: bool = True) -> None:
    """Atomically write ``data`` to ``path`` with mode 0600 (see the module docstring).

    Readers see the old content or the new, never a partial file. With
    ``replace=False`` an existing ``path`` is left alone and
    ``FileExistsError`` raised (first writer wins, for create-once files).
    The parent directory is created (mode 0700) if missing.
    """
    p = Path(path)
    parent = p.parent
    parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    while True:
        tmp = parent / f".{p.name}.{secrets.token_hex(8)}.tmp"
        try:
            fd = os.open(tmp, flags, 0o600)
            break
        except FileExistsError:  # pragma: no cover - 64 random bits collided
            continue
    try:
        try:
            os.fchmod(fd, 0o600)  # exactly 0600 whatever the umask
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        if replace:
            os.replace(tmp, p)
        else:
            try:
                os.link(tmp, p)  # FileExistsError if p exists
            except FileExistsError:
                raise
            except OSError:  # pragma: no cover - no hard links here (some FUSE, SMB)
                if p.exists():
                    raise FileExistsError(f"{p} exists") from None
                os.replace(tmp, p)
    finally:
        tmp.unlink(missing_ok=True)  # gone after a rename; a second name after a link
    _fsync_dir(parent)


def _fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (best effort where directories cannot be opened)."""
    try:
        dfd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(dfd)
    except OSError:  # pragma: no cover - filesystems without directory fsync
        pass
    finally:
        os.close(dfd)


def load_or_create_server_key(path: str | os.PathLike[str]) -> PrivateKey:
    """Load derper's JSON key file, creating it with a new key when it is missing.

    Raises ``ValueError`` (with the path) if the file exists but is not a valid key file.
    """
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        key = PrivateKey.generate()
        text = json.dumps({"PrivateKey": key.text()}, indent="\t") + "\n"
        try:
            write_secret_file(p, text.encode("ascii"), replace=False)
            return key
        except FileExistsError:  # another process created it first: use theirs
            data = p.read_bytes()
    try:
        doc = json.loads(data.decode("utf-8"))
        value = doc["PrivateKey"]
        if not isinstance(value, str):
            raise TypeError("PrivateKey is not a string")
        return PrivateKey.from_text(value)
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{p}: invalid derper key file: {exc}") from None
