"""``tailnet serve`` terminating TLS itself (tls_cert_file / tls_key_file) on its HTTP
listener, through the relay's TLS path (derp.tlsio): the HTTP API, DERP over TLS with
fast start (meta-certificate), DERP over WSS, and the configuration checks."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from derp.client import DerpClient
from derp.events import PacketReceived
from derp.keys import PrivateKey
from derp.tls import cert_pin, self_signed_cert
from tailnet.config import ConfigError, StackConfig
from tailnet.stack import TailnetStack

T = 10.0


def _cert(tmp_path: Path) -> tuple[Path, Path, str]:
    cert_pem, key_pem = self_signed_cert("127.0.0.1")
    (tmp_path / "c.crt").write_bytes(cert_pem)
    (tmp_path / "c.key").write_bytes(key_pem)
    pin = cert_pin(x509.load_pem_x509_certificate(cert_pem).public_bytes(Encoding.DER))
    return tmp_path / "c.crt", tmp_path / "c.key", pin


def _cfg(cert: Path, key: Path, **kw: object) -> StackConfig:
    return StackConfig(
        http_addr="127.0.0.1:0", grpc_addr=None, stun_addr=None, data_dir=None,
        tls_cert_file=str(cert), tls_key_file=str(key), **kw,  # type: ignore[arg-type]
    )  # fmt: skip


async def _get(port: int, ctx: ssl.SSLContext, path: str) -> bytes:
    r, w = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="127.0.0.1"), T
    )
    try:
        w.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        return await asyncio.wait_for(r.read(), T)
    finally:
        w.close()


async def test_https_api_and_derp_over_tls_and_wss(tmp_path: Path) -> None:
    cert, key, pin = _cert(tmp_path)
    stack = TailnetStack(_cfg(cert, key))
    await stack.start()
    try:
        assert stack.access_url.startswith("https://127.0.0.1:")
        assert stack.derp_url == stack.access_url + "/derp"
        trusted = ssl.create_default_context(cafile=str(cert))
        reply = await _get(stack.http_port, trusted, "/healthz")
        assert reply.startswith(b"HTTP/1.1 200 ") and reply.endswith(b"OK")
        with pytest.raises(ssl.SSLCertVerificationError):  # really TLS, really this cert
            await _get(stack.http_port, ssl.create_default_context(), "/healthz")

        a = DerpClient(stack.access_url, PrivateKey.generate(), cert_name=pin)
        b = DerpClient(stack.ws_url, PrivateKey.generate(), cert_name=pin)
        async with a, b:
            assert a._link is not None and a._link.core._fast  # meta-certificate: fast start
            assert stack.derp_server is not None and a.server_key == stack.derp_server.public_key
            await a.send(b.public_key, b"https to wss")
            ev = await asyncio.wait_for(b.recv(), T)
            assert isinstance(ev, PacketReceived) and ev.data == b"https to wss"
            await b.send(a.public_key, b"x" * 60_000)
            ev = await asyncio.wait_for(a.recv(), T)
            assert isinstance(ev, PacketReceived) and len(ev.data) == 60_000
    finally:
        await stack.stop()


async def test_plaintext_to_the_tls_listener_is_closed(tmp_path: Path) -> None:
    cert, key, _ = _cert(tmp_path)
    stack = TailnetStack(_cfg(cert, key))
    await stack.start()
    try:
        r, w = await asyncio.open_connection("127.0.0.1", stack.http_port)
        w.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        out = await asyncio.wait_for(r.read(), T)
        assert not out.startswith(b"HTTP/")  # at most a TLS alert, then EOF
        w.close()
    finally:
        await stack.stop()


def test_tls_config_checks(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="give both or neither"):
        StackConfig(tls_cert_file="x.crt")
    with pytest.raises(ConfigError, match="1.2 or 1.3"):
        StackConfig(tls_cert_file="x.crt", tls_key_file="x.key", tls_min_version="1.1")


async def test_unreadable_certificate_fails_start(tmp_path: Path) -> None:
    stack = TailnetStack(_cfg(tmp_path / "missing.crt", tmp_path / "missing.key"))
    with pytest.raises(ConfigError, match="cannot load TLS certificate"):
        await stack.start()
