"""TLS: meta-certificate, manual/self-signed certificates, pins, fast start (spec §2.2, §2.5)."""

from __future__ import annotations

import asyncio
import datetime
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.serialization import Encoding

from derp.client import DerpClient
from derp.events import PacketReceived
from derp.frames import FrameType, encode_client_info
from derp.keys import PrivateKey, seal
from derp.server import DerpServer
from derp.tls import (
    PinMismatchError,
    cert_pin,
    client_tls,
    load_manual_cert,
    meta_cert_pem,
    parse_meta_cert,
    self_signed_cert,
    server_ssl_context,
)

from .conftest import UPGRADE_REQUEST, WAIT, make_config


def test_meta_cert_fields() -> None:
    key = PrivateKey.generate().public
    now = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
    cert = x509.load_pem_x509_certificate(meta_cert_pem(key, now))
    assert cert.serial_number == 2
    assert isinstance(cert.public_key(), ed25519.Ed25519PublicKey)
    assert cert.not_valid_before_utc == now - datetime.timedelta(days=30)
    assert cert.not_valid_after_utc == now + datetime.timedelta(days=30)
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert parse_meta_cert(cert.public_bytes(Encoding.DER)) == (key, 2)


def test_parse_meta_cert_rejects_other_certs() -> None:
    pem, _ = self_signed_cert("127.0.0.1")
    der = x509.load_pem_x509_certificate(pem).public_bytes(Encoding.DER)
    assert parse_meta_cert(der) is None
    assert parse_meta_cert(b"garbage") is None


def test_manual_cert_self_signed_for_ip_is_stable(tmp_path: Path) -> None:
    first = load_manual_cert(tmp_path, "127.0.0.1")
    assert first.created and first.pin.startswith("sha256-raw:") and len(first.pin) == 75
    assert first.cert_name_hint() == f'CertName: "{first.pin}"'
    assert (tmp_path / "127.0.0.1.key").stat().st_mode & 0o077 == 0
    again = load_manual_cert(tmp_path, "127.0.0.1")
    assert not again.created and again.pin == first.pin
    assert cert_pin(again.leaf_der) == first.pin


def test_manual_cert_missing_for_dns_name(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="derp.example.com.crt"):
        load_manual_cert(tmp_path, "derp.example.com")


def test_client_tls_rejects_malformed_pin() -> None:
    with pytest.raises(ValueError, match="sha256-raw"):
        client_tls("127.0.0.1", "sha256-raw:abcd")


@pytest.fixture
async def tls_server(tmp_path: Path) -> AsyncIterator[tuple[DerpServer, str, Path]]:
    """A DERP server on 127.0.0.1 with a self-signed certificate and the meta-cert."""
    mc = load_manual_cert(tmp_path, "127.0.0.1")
    key = PrivateKey.generate()
    ctx = server_ssl_context(mc.cert_file, mc.key_file, key.public)
    srv = DerpServer(make_config(private_key=key, ssl_context=ctx))
    await srv.start("127.0.0.1", 0)
    try:
        yield srv, mc.pin, mc.cert_file
    finally:
        await srv.stop()


async def test_client_with_pin_uses_fast_start(tls_server: tuple[DerpServer, str, Path]) -> None:
    srv, pin, _ = tls_server
    url = f"https://127.0.0.1:{srv.port}"
    a = DerpClient(url, PrivateKey.generate(), cert_name=pin)
    b = DerpClient(url, PrivateKey.generate(), cert_name=pin, fast_start=False)
    async with a, b:
        assert a._link is not None and a._link.core._fast  # meta-cert seen: no 101
        assert b._link is not None and not b._link.core._fast
        assert a.server_key == srv.public_key == b.server_key
        await a.send(b.public_key, b"over tls")
        ev = await asyncio.wait_for(b.recv(), WAIT)
        assert isinstance(ev, PacketReceived) and ev.data == b"over tls"


async def test_raw_fast_start_gets_no_http_response(
    tls_server: tuple[DerpServer, str, Path],
) -> None:
    srv, pin, _ = tls_server
    tls = client_tls("127.0.0.1", pin)
    r, w = await asyncio.open_connection(
        "127.0.0.1", srv.port, ssl=tls.context, server_hostname=tls.server_hostname
    )
    try:
        me = PrivateKey.generate()
        ci = encode_client_info(me.public.raw, seal(me, srv.public_key, b'{"version":2}'))
        w.write(UPGRADE_REQUEST + b"Derp-Fast-Start: 1\r\n\r\n" + ci)  # one write
        hdr = await asyncio.wait_for(r.readexactly(5), WAIT)
        assert hdr[0] == FrameType.SERVER_KEY  # not "HTTP/1.1 101"
        await asyncio.wait_for(r.readexactly(40), WAIT)
        hdr = await asyncio.wait_for(r.readexactly(5), WAIT)
        assert hdr[0] == FrameType.SERVER_INFO
    finally:
        w.close()


async def test_wrong_pin_is_refused(tls_server: tuple[DerpServer, str, Path]) -> None:
    srv, pin, _ = tls_server
    wrong = "sha256-raw:" + "00" * 32
    c = DerpClient(f"https://127.0.0.1:{srv.port}", PrivateKey.generate(), cert_name=wrong)
    with pytest.raises(PinMismatchError):
        await c.connect()
    await c.close()
    # The server is fine; the right pin still works.
    async with DerpClient(f"https://127.0.0.1:{srv.port}", PrivateKey.generate(), cert_name=pin):
        pass


async def test_default_verification_refuses_self_signed(
    tls_server: tuple[DerpServer, str, Path],
) -> None:
    srv, _, cert_file = tls_server
    c = DerpClient(f"https://127.0.0.1:{srv.port}", PrivateKey.generate())
    with pytest.raises(ssl.SSLCertVerificationError):
        await c.connect()
    await c.close()
    # Trusting the certificate as a CA: verification (including the IP SAN) passes.
    ctx = ssl.create_default_context(cafile=str(cert_file))
    async with DerpClient(f"https://127.0.0.1:{srv.port}", PrivateKey.generate(), ssl_context=ctx):
        pass


async def test_cert_name_as_alternate_hostname(tmp_path: Path) -> None:
    cert_pem, key_pem = self_signed_cert("derp.example.test")
    (tmp_path / "c.crt").write_bytes(cert_pem)
    (tmp_path / "c.key").write_bytes(key_pem)
    key = PrivateKey.generate()
    srv = DerpServer(
        make_config(
            private_key=key,
            ssl_context=server_ssl_context(tmp_path / "c.crt", tmp_path / "c.key", key.public),
        )
    )
    await srv.start("127.0.0.1", 0)
    try:
        ctx = ssl.create_default_context(cafile=str(tmp_path / "c.crt"))
        url = f"https://127.0.0.1:{srv.port}"
        with pytest.raises(ssl.SSLCertVerificationError):
            await DerpClient(url, PrivateKey.generate(), ssl_context=ctx).connect()
        c = DerpClient(url, PrivateKey.generate(), ssl_context=ctx, cert_name="derp.example.test")
        async with c:
            assert c.server_key == key.public
    finally:
        await srv.stop()


async def test_tls12_client_refused_by_tls13_server(
    tls_server: tuple[DerpServer, str, Path],
) -> None:
    srv, pin, _ = tls_server
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", srv.port, ssl=ctx, server_hostname="x"), WAIT
        )
    async with DerpClient(f"https://127.0.0.1:{srv.port}", PrivateKey.generate(), cert_name=pin):
        pass


async def test_plaintext_to_tls_port_does_not_hurt(
    tls_server: tuple[DerpServer, str, Path],
) -> None:
    srv, pin, _ = tls_server
    r, w = await asyncio.open_connection("127.0.0.1", srv.port)
    w.write(UPGRADE_REQUEST + b"\r\n")
    assert await asyncio.wait_for(r.read(), WAIT) == b""  # handshake fails, socket closed
    w.close()
    async with DerpClient(f"https://127.0.0.1:{srv.port}", PrivateKey.generate(), cert_name=pin):
        pass


async def test_wss_with_pin(tls_server: tuple[DerpServer, str, Path]) -> None:
    srv, pin, _ = tls_server
    a = DerpClient(f"wss://127.0.0.1:{srv.port}", PrivateKey.generate(), cert_name=pin)
    b = DerpClient(f"https://127.0.0.1:{srv.port}", PrivateKey.generate(), cert_name=pin)
    async with a, b:
        await b.send(a.public_key, b"x" * 65536)
        ev = await asyncio.wait_for(a.recv(), WAIT)
        assert isinstance(ev, PacketReceived) and len(ev.data) == 65536
    assert srv.stats.websocket_accepts == 1
