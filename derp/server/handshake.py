"""Pure server side of the DERP handshake (spec §1.5–§1.6). No I/O.

Flow::

    server → ServerKey   magic ‖ server public key          (encode_server_key)
    client → ClientInfo  client key(32) ‖ nonce(24) ‖ box(JSON)
    server:  open the box with (server private, claimed client key); parse JSON
    server → ServerInfo  nonce ‖ box({"version":2})           (sealed per connection)

:func:`open_client_info` turns a ClientInfo payload into a :class:`ClientInfoData`
or raises :class:`derp.errors.HandshakeError` with a reason for the log. Rules:

* 56 ≤ payload length ≤ 256 KiB (checked by the caller from the frame header too);
* the claimed client key must not be all zero;
* the box must authenticate (it proves the client owns the key);
* the JSON must be an object, nested at most :data:`~derp.frames.MAX_JSON_DEPTH`
  deep with at most :data:`~derp.frames.MAX_JSON_CONTAINERS` arrays/objects
  (:func:`~derp.frames.decode_json_payload`; otherwise a clean
  :class:`~derp.errors.HandshakeError`, never a ``RecursionError``); keys match case-insensitively (like Go's
  ``encoding/json``), unknown keys are ignored, ``null`` values are ignored,
  a value of the wrong type rejects the whole ClientInfo;
* ``meshKey``, when present, must be exactly 64 hex digits (an empty string is
  invalid too). Whether it matches the configured mesh key is decided with
  :func:`hmac.compare_digest`.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

import nacl.exceptions

from ..errors import HandshakeError, InvalidKeyError
from ..frames import (
    KEY_LEN,
    MAX_CLIENT_INFO_LEN,
    NONCE_LEN,
    PROTOCOL_VERSION,
    decode_json_payload,
)
from ..keys import PrivateKey, open_sealed, seal

__all__ = [
    "ClientInfoData",
    "open_client_info",
    "parse_client_info_json",
    "seal_server_info",
    "SERVER_INFO_JSON",
    "MIN_CLIENT_INFO_LEN",
]

MIN_CLIENT_INFO_LEN = KEY_LEN + NONCE_LEN
SERVER_INFO_JSON = b'{"version":%d}' % PROTOCOL_VERSION
_ZERO_KEY = bytes(KEY_LEN)
_HEX = frozenset("0123456789abcdefABCDEF")


@dataclass(frozen=True, slots=True)
class ClientInfoData:
    """What a client declared in its ClientInfo.

    ``mesh_key`` is the raw 32-byte key the client presented (``None`` if absent);
    ``is_mesh`` says whether it matched the server's configured mesh key.
    """

    key: bytes
    mesh_key: bytes | None = None
    is_mesh: bool = False
    version: int = 0
    can_ack_pings: bool = False
    is_prober: bool = False
    app_name: str = ""


def _typed(value: object, kind: type, name: str) -> object:
    # bool is an int subclass in Python but not a JSON number in Go.
    if kind is int and isinstance(value, bool):
        raise HandshakeError(f"ClientInfo {name} must be a number")
    if not isinstance(value, kind):
        raise HandshakeError(f"ClientInfo {name} has the wrong JSON type")
    return value


def parse_client_info_json(
    key: bytes, data: bytes, server_mesh_key: bytes | None = None
) -> ClientInfoData:
    """Parse the decrypted ClientInfo JSON of client ``key``."""
    try:
        doc = decode_json_payload(data)
    except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError included
        raise HandshakeError(f"ClientInfo is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise HandshakeError("ClientInfo JSON is not an object")
    fields: dict[str, object] = {}
    for k, v in doc.items():
        if v is not None:
            fields[k.lower()] = v  # later duplicates win, like Go
    mesh_key: bytes | None = None
    is_mesh = False
    if "meshkey" in fields:
        text = _typed(fields["meshkey"], str, "meshKey")
        assert isinstance(text, str)
        if len(text) != 64 or not _HEX.issuperset(text):
            raise HandshakeError("invalid mesh key: must be 64 hex digits")
        mesh_key = bytes.fromhex(text)
        if server_mesh_key is not None:
            is_mesh = hmac.compare_digest(mesh_key, server_mesh_key)
    version = fields.get("version", 0)
    version = _typed(version, int, "version")
    can_ack = _typed(fields.get("canackpings", False), bool, "CanAckPings")
    prober = _typed(fields.get("isprober", False), bool, "IsProber")
    app = _typed(fields.get("appname", ""), str, "AppName")
    assert isinstance(version, int) and isinstance(app, str)
    return ClientInfoData(
        key=key,
        mesh_key=mesh_key,
        is_mesh=is_mesh,
        version=version,
        can_ack_pings=bool(can_ack),
        is_prober=bool(prober),
        app_name=app,
    )


def open_client_info(
    server_key: PrivateKey, payload: bytes, server_mesh_key: bytes | None = None
) -> ClientInfoData:
    """Authenticate and parse a ClientInfo frame payload (see module rules)."""
    n = len(payload)
    if not MIN_CLIENT_INFO_LEN <= n <= MAX_CLIENT_INFO_LEN:
        raise HandshakeError(f"ClientInfo of {n} bytes (must be 56..256 KiB)")
    client_key = bytes(payload[:KEY_LEN])
    if client_key == _ZERO_KEY:
        raise HandshakeError("all-zero client key")
    try:
        plain = open_sealed(server_key, client_key, bytes(payload[KEY_LEN:]))
    except (nacl.exceptions.CryptoError, InvalidKeyError, ValueError) as exc:
        raise HandshakeError(f"ClientInfo box does not open: {exc}") from None
    return parse_client_info_json(client_key, plain, server_mesh_key)


def seal_server_info(server_key: PrivateKey, client_key: bytes) -> bytes:
    """The ServerInfo payload for ``client_key``: ``nonce ‖ box({"version":2})``."""
    return seal(server_key, client_key, SERVER_INFO_JSON)
