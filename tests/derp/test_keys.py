"""Tests for :mod:`derp.keys`: key text forms, NaCl box, derper's key file."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import nacl.exceptions
import pytest
from hypothesis import given
from hypothesis import strategies as st

from derp.errors import DerpError, InvalidKeyError
from derp.keys import (
    PRIVATE_PREFIX,
    PUBLIC_PREFIX,
    PrivateKey,
    PublicKey,
    load_or_create_server_key,
    open_sealed,
    seal,
)

# RFC 7748 §6.1 test vector (Alice): private scalar and its X25519 public key.
ALICE_SK = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
ALICE_PK = bytes.fromhex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
BOB_SK = bytes.fromhex("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb")
BOB_PK = bytes.fromhex("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f")

nonzero_keys = st.binary(min_size=32, max_size=32).filter(lambda b: b != bytes(32))


# --------------------------------------------------------------------------- text forms


def test_public_text_form() -> None:
    pub = PublicKey(ALICE_PK)
    assert pub.text() == "nodekey:" + ALICE_PK.hex()
    assert str(pub) == pub.text()
    assert pub.short() == "[8520f009]"
    assert PublicKey.from_text(pub.text()) == pub
    assert PublicKey.from_text("  " + pub.text() + "\n") == pub  # surrounding whitespace
    assert PublicKey.from_text("nodekey:" + ALICE_PK.hex().upper()) == pub


def test_private_text_form_and_public_half() -> None:
    sk = PrivateKey(ALICE_SK)
    assert sk.text() == "privkey:" + ALICE_SK.hex()
    assert sk.raw == ALICE_SK
    assert sk.public == PublicKey(ALICE_PK)  # RFC 7748 vector
    again = PrivateKey.from_text(sk.text())
    assert again.raw == sk.raw and again.public == sk.public
    assert ALICE_SK.hex() not in repr(sk)  # never log secrets
    assert sk.public.text() in repr(sk)


@given(nonzero_keys)
def test_public_text_roundtrip(raw: bytes) -> None:
    pub = PublicKey(raw)
    assert pub.text().startswith(PUBLIC_PREFIX)
    assert len(pub.text()) == len(PUBLIC_PREFIX) + 64
    assert PublicKey.from_text(pub.text()) == pub
    assert hash(PublicKey.from_text(pub.text())) == hash(pub)


def test_generate_gives_distinct_valid_keys() -> None:
    a, b = PrivateKey.generate(), PrivateKey.generate()
    assert a.raw != b.raw and a.public != b.public
    assert a.raw != bytes(32) and a.public.raw != bytes(32)
    assert PrivateKey.from_text(a.text()).public == a.public
    assert a.text().startswith(PRIVATE_PREFIX)


def test_all_zero_keys_are_rejected() -> None:
    with pytest.raises(InvalidKeyError, match="zero"):
        PublicKey(bytes(32))
    with pytest.raises(InvalidKeyError, match="zero"):
        PrivateKey(bytes(32))
    with pytest.raises(InvalidKeyError):
        PublicKey.from_text("nodekey:" + "0" * 64)
    with pytest.raises(InvalidKeyError):
        PrivateKey.from_text("privkey:" + "0" * 64)
    with pytest.raises(InvalidKeyError):
        PrivateKey(ALICE_SK).box(bytes(32))


@pytest.mark.parametrize(
    "text",
    [
        "",
        ALICE_PK.hex(),  # no prefix
        "privkey:" + ALICE_PK.hex(),  # wrong prefix
        "NODEKEY:" + ALICE_PK.hex(),  # prefix is case sensitive
        "nodekey:" + ALICE_PK.hex()[:-2],  # 62 digits
        "nodekey:" + ALICE_PK.hex() + "00",  # 66 digits
        "nodekey:" + "zz" + ALICE_PK.hex()[2:],  # not hex
        "nodekey:" + "0x" + ALICE_PK.hex()[2:],
        "nodekey:" + ALICE_PK.hex()[:32] + " " + ALICE_PK.hex()[33:],  # embedded space
    ],
)
def test_bad_public_text(text: str) -> None:
    with pytest.raises(InvalidKeyError):
        PublicKey.from_text(text)


def test_bad_private_text() -> None:
    with pytest.raises(InvalidKeyError, match="privkey"):
        PrivateKey.from_text("nodekey:" + ALICE_SK.hex())
    with pytest.raises(InvalidKeyError, match="64"):
        PrivateKey.from_text("privkey:abcd")


@pytest.mark.parametrize("n", [0, 31, 33, 64])
def test_wrong_raw_length(n: int) -> None:
    with pytest.raises(InvalidKeyError, match="32"):
        PublicKey(b"\x01" * n)
    with pytest.raises(InvalidKeyError, match="32"):
        PrivateKey(b"\x01" * n)


def test_invalid_key_error_is_a_value_error_and_derp_error() -> None:
    with pytest.raises(ValueError):
        PublicKey(b"")
    with pytest.raises(DerpError):
        PublicKey(b"")


# --------------------------------------------------------------------------- box


def test_seal_open_roundtrip_and_layout() -> None:
    client, server = PrivateKey(ALICE_SK), PrivateKey(BOB_SK)
    msg = b'{"version":2,"CanAckPings":true}'
    sealed = seal(client, server.public, msg)
    assert len(sealed) == 24 + 16 + len(msg)  # nonce ‖ tag ‖ ciphertext
    assert open_sealed(server, client.public, sealed) == msg
    assert open_sealed(server, client.public.raw, sealed) == msg  # raw bytes accepted too
    assert seal(client, server.public, msg)[:24] != sealed[:24]  # random nonce


@given(st.binary(max_size=300))
def test_seal_open_property(msg: bytes) -> None:
    a, b = PrivateKey(ALICE_SK), PrivateKey(BOB_SK)
    assert open_sealed(b, a.public, seal(a, b.public, msg)) == msg
    assert open_sealed(a, b.public, seal(b, a.public, msg)) == msg  # same shared key both ways


def test_tampering_is_detected() -> None:
    a, b = PrivateKey(ALICE_SK), PrivateKey(BOB_SK)
    sealed = seal(a, b.public, b"hello derp")
    for i in (0, 23, 24, 39, 40, len(sealed) - 1):  # nonce, tag, ciphertext
        bad = bytearray(sealed)
        bad[i] ^= 0x01
        with pytest.raises(nacl.exceptions.CryptoError):
            open_sealed(b, a.public, bytes(bad))
    with pytest.raises(nacl.exceptions.CryptoError):
        open_sealed(b, a.public, sealed[:-1] if len(sealed) > 40 else sealed)
    with pytest.raises(nacl.exceptions.CryptoError):
        open_sealed(b, a.public, sealed[:39])  # shorter than nonce + tag


def test_wrong_key_cannot_open() -> None:
    a, b, eve = PrivateKey(ALICE_SK), PrivateKey(BOB_SK), PrivateKey.generate()
    sealed = seal(a, b.public, b"secret")
    with pytest.raises(nacl.exceptions.CryptoError):
        open_sealed(eve, a.public, sealed)
    with pytest.raises(nacl.exceptions.CryptoError):
        open_sealed(b, eve.public, sealed)  # a claimed sender that did not seal it


# --------------------------------------------------------------------------- key file


def test_key_file_created_0600_and_stable(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "derper.key"
    key = load_or_create_server_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    doc = json.loads(path.read_text())
    assert doc == {"PrivateKey": key.text()}
    again = load_or_create_server_key(str(path))
    assert again.raw == key.raw and again.public == key.public
    assert path.read_text() == json.dumps({"PrivateKey": key.text()}, indent="\t") + "\n"
    assert [p.name for p in path.parent.iterdir()] == ["derper.key"]  # no temp file left


def test_key_file_0600_even_with_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        path = tmp_path / "derper.key"
        load_or_create_server_key(path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_existing_derper_key_file_is_loaded(tmp_path: Path) -> None:
    path = tmp_path / "derper.key"
    path.write_text('{"PrivateKey": "privkey:' + ALICE_SK.hex() + '"}')
    assert load_or_create_server_key(path).public == PublicKey(ALICE_PK)


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"not json",
        b"[]",
        b'"privkey:00"',
        b"{}",
        b'{"PrivateKey": 5}',
        b'{"PrivateKey": "nodekey:' + ALICE_SK.hex().encode() + b'"}',
        b'{"PrivateKey": "privkey:' + b"0" * 64 + b'"}',
        b'{"PrivateKey": "privkey:abc"}',
        b"\xff\xfe\x00garbage",  # not UTF-8
    ],
    ids=["empty", "text", "list", "string", "no-field", "int", "nodekey", "zero", "short", "binary"],
)
def test_invalid_key_file_names_the_path(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "derper.key"
    path.write_bytes(content)
    with pytest.raises(ValueError) as info:
        load_or_create_server_key(path)
    assert str(path) in str(info.value)
    assert path.read_bytes() == content  # never overwritten


def test_public_key_from_bytearray_is_stored_as_bytes() -> None:
    pub = PublicKey(bytearray(ALICE_PK))  # type: ignore[arg-type]
    assert type(pub.raw) is bytes
    assert {pub: 1}[PublicKey(ALICE_PK)] == 1  # hashable, equal to the bytes form
