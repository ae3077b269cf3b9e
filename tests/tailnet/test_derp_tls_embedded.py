"""The embedded relay over TLS (``derp_tls_addr``): meta-certificate, fast start, CertName pin."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from derp.client import DerpClient
from derp.events import PacketReceived
from derp.keys import PrivateKey
from derp.tls import self_signed_cert
from tailnet.config import ConfigError, StackConfig
from tailnet.health import node_url
from tailnet.stack import DERP_TLS_DIR, TailnetStack

T = 10.0


def _cfg(data_dir: Path | None, **kw: object) -> StackConfig:
    return StackConfig(http_addr="127.0.0.1:0", grpc_addr=None, stun_addr=None,
                       data_dir=data_dir, derp_tls_addr="127.0.0.1:0", **kw)  # type: ignore[arg-type]


async def test_self_signed_tls_with_fast_start_and_pin(tmp_path: Path) -> None:
    s = TailnetStack(_cfg(tmp_path))
    await s.start()
    try:
        node = s.derp_maps.current().regions[999].nodes[0]
        pin = s.derp_cert_name
        assert pin is not None and node.cert_name == pin and pin.startswith("sha256-raw:")
        assert not node.force_http and node.host_name == "127.0.0.1"
        assert s.derp_server is not None and node.derp_port == s.derp_server.port
        assert node_url(node) == s.derp_tls_url
        assert (tmp_path / DERP_TLS_DIR / "127.0.0.1.crt").exists()
        # Our client: pinned TLS, meta-certificate seen → fast start (no HTTP 101).
        ka, kb = PrivateKey.generate(), PrivateKey.generate()
        a = DerpClient(node_url(node), ka, cert_name=node.cert_name, connect_timeout=T)
        b = DerpClient(s.derp_url, kb, connect_timeout=T)  # plain /derp on the API port
        try:
            await asyncio.wait_for(asyncio.gather(a.connect(), b.connect()), T)
            assert a._link is not None and a._link.core._fast
            await a.send(kb.public, b"over TLS")
            ev = await asyncio.wait_for(b.recv(), T)
            assert isinstance(ev, PacketReceived) and ev.data == b"over TLS"
        finally:
            await asyncio.gather(a.close(), b.close())
        report = await s.health.report(force=True) if s.health else {}
        assert report["derp"]["regions"]["999"]["healthy"] is True
    finally:
        await s.stop()
    # The certificate (and so the pin in the DERP map) survives a restart.
    s2 = TailnetStack(_cfg(tmp_path))
    await s2.start()
    try:
        assert s2.derp_cert_name == pin
    finally:
        await s2.stop()


async def test_tls_with_given_certificate(tmp_path: Path) -> None:
    cert, key = self_signed_cert("localhost")
    (tmp_path / "c.pem").write_bytes(cert)
    (tmp_path / "k.pem").write_bytes(key)
    s = TailnetStack(_cfg(None, access_url="http://localhost:1",
                          derp_tls_cert_file=str(tmp_path / "c.pem"),
                          derp_tls_key_file=str(tmp_path / "k.pem")))
    await s.start()
    try:
        node = s.derp_maps.current().regions[999].nodes[0]
        assert node.host_name == "localhost" and not node.cert_name and not node.force_http
        import ssl

        ctx = ssl.create_default_context(cafile=str(tmp_path / "c.pem"))
        c = DerpClient(node_url(node), PrivateKey.generate(), ssl_context=ctx,
                       connect_timeout=T)
        try:
            await asyncio.wait_for(c.connect(), T)
            assert c._link is not None and c._link.core._fast
        finally:
            await c.close()
    finally:
        await s.stop()


async def test_tls_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="go together"):
        _cfg(None, derp_tls_cert_file="x")
    with pytest.raises(ConfigError, match="needs derp_tls_addr"):
        StackConfig(derp_tls_cert_file="x", derp_tls_key_file="y")
    s = TailnetStack(_cfg(tmp_path, access_url="https://relay.example.com"))
    with pytest.raises(ConfigError, match="not an IP address"):
        await s.start()
