"""TLS: meta-certificate, manual/self-signed certificates, pins, fast start (spec §2.2, §2.5)."""

from __future__ import annotations

import asyncio
import datetime
import os
import shutil
import socket
import ssl
import subprocess
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
from derp.frames import encode_send_packet
from derp.server import DerpServer
from derp.server.listener import bind_all
from derp.stats import KIND_OTHER, QUEUE_HEAD, QUEUE_TAIL
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

from .conftest import UPGRADE_REQUEST, WAIT, RawClient, make_config, wait_until


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


# --------------------------------------------------------------------------- the TLS path under stress


def _any_cert_ctx(max_version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if max_version is not None:
        ctx.maximum_version = max_version
    return ctx


async def tls_raw(
    port: int,
    *,
    host: str = "127.0.0.1",
    rcvbuf: int | None = None,
    max_version: ssl.TLSVersion | None = None,
    handshake: bool = True,
) -> RawClient:
    """A RawClient (conftest) over TLS, logged in unless ``handshake=False``."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, (host, port)), WAIT)
    r, w = await asyncio.wait_for(
        asyncio.open_connection(sock=sock, ssl=_any_cert_ctx(max_version), server_hostname=host),
        WAIT,
    )
    c = RawClient(r, w, PrivateKey.generate())
    if handshake:
        await c.handshake()
    return c


async def test_stalled_handshake_is_closed_at_the_deadline(tmp_path: Path) -> None:
    mc = load_manual_cert(tmp_path, "127.0.0.1")
    key = PrivateKey.generate()
    srv = DerpServer(
        make_config(
            private_key=key,
            handshake_timeout=0.3,
            ssl_context=server_ssl_context(mc.cert_file, mc.key_file, key.public),
        )
    )
    await srv.start("127.0.0.1", 0)
    try:
        silent = await asyncio.open_connection("127.0.0.1", srv.port)
        half = await asyncio.open_connection("127.0.0.1", srv.port)
        half[1].write(b"\x16\x03\x01\x02\x00\x01")  # the start of a ClientHello, no more
        await wait_until(lambda: srv.open_connections == 2)
        for r, w in (silent, half):
            assert await asyncio.wait_for(r.read(), WAIT) == b""  # closed by the server
            w.close()
        await wait_until(lambda: srv.open_connections == 0)
        async with DerpClient(f"https://127.0.0.1:{srv.port}", PrivateKey.generate(), cert_name=mc.pin):
            pass
    finally:
        await srv.stop()


async def test_garbage_instead_of_client_hello(tls_server: tuple[DerpServer, str, Path]) -> None:
    srv, pin, _ = tls_server
    async with DerpClient(f"https://127.0.0.1:{srv.port}", PrivateKey.generate(), cert_name=pin) as a:
        for junk in (os.urandom(3000), b"\x16\x03\x01\x00\x05hello" + os.urandom(100)):
            r, w = await asyncio.open_connection("127.0.0.1", srv.port)
            w.write(junk)
            out = await asyncio.wait_for(r.read(), WAIT)  # to EOF: the server closed
            assert out == b"" or (out[0] == 0x15 and len(out) == 7)  # at most a fatal alert
            w.close()
        assert await a.ping() >= 0  # the established connection never noticed
    await wait_until(lambda: srv.open_connections == 0)


async def test_peer_closing_without_close_notify(tls_server: tuple[DerpServer, str, Path]) -> None:
    srv, pin, _ = tls_server
    a = await tls_raw(srv.port)
    b = await tls_raw(srv.port)
    await wait_until(lambda: srv.client_count == 2)
    a.send_packet(b.pub, b"before the cut")
    assert await b.recv_packet() == (a.pub, b"before the cut")
    # Close the TCP connection under the TLS layer: FIN, no close_notify.
    with socket.socket(fileno=os.dup(a.writer.get_extra_info("socket").fileno())) as raw_sock:
        raw_sock.shutdown(socket.SHUT_RDWR)
    await wait_until(lambda: srv.client_count == 1)
    a.writer.transport.abort()
    b.send_packet(b.pub, b"to myself")
    assert await b.recv_packet() == (b.pub, b"to myself")
    await b.close()


async def test_one_slow_tls_reader_does_not_slow_others(
    tls_server: tuple[DerpServer, str, Path],
) -> None:
    srv, _, _ = tls_server
    s = await tls_raw(srv.port)
    live = await tls_raw(srv.port)
    stalled = await tls_raw(srv.port, rcvbuf=4096)
    stalled.writer.transport.pause_reading()
    big = bytes(60_000)
    n = 200  # 12 MB to the stalled receiver: far beyond socket buffers + queue
    try:
        for i in range(n):
            s.send(encode_send_packet(stalled.pub, big) + encode_send_packet(live.pub, i.to_bytes(4, "big")))
            if i % 16 == 0:
                await s.writer.drain()
        for i in range(n):
            assert await live.recv_packet() == (s.pub, i.to_bytes(4, "big"))
        st = srv.stats
        dropped = st.packets_dropped[QUEUE_HEAD, KIND_OTHER] + st.packets_dropped[QUEUE_TAIL, KIND_OTHER]
        assert dropped > 0
    finally:
        for c in (s, live):
            await c.close()
        stalled.writer.transport.abort()


async def test_close_notify_from_client_ends_the_connection(
    tls_server: tuple[DerpServer, str, Path],
) -> None:
    srv, _, _ = tls_server
    c = await tls_raw(srv.port)
    await wait_until(lambda: srv.client_count == 1)
    c.writer.close()  # asyncio sends close_notify first
    await wait_until(lambda: srv.client_count == 0)
    assert srv.stats.protocol_errors == 0


async def test_tls12_allowed_by_flag(tmp_path: Path) -> None:
    mc = load_manual_cert(tmp_path, "127.0.0.1")
    key = PrivateKey.generate()
    ctx = server_ssl_context(mc.cert_file, mc.key_file, key.public, min_version=ssl.TLSVersion.TLSv1_2)
    srv = DerpServer(make_config(private_key=key, ssl_context=ctx))
    await srv.start("127.0.0.1", 0)
    try:
        old = await tls_raw(srv.port, max_version=ssl.TLSVersion.TLSv1_2)
        new = await tls_raw(srv.port)
        assert old.writer.get_extra_info("ssl_object").version() == "TLSv1.2"
        assert new.writer.get_extra_info("ssl_object").version() == "TLSv1.3"
        old.send_packet(new.pub, b"from 1.2")
        assert await new.recv_packet() == (old.pub, b"from 1.2")
        for c in (old, new):
            await c.close()
    finally:
        await srv.stop()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
async def test_tls12_renegotiation_is_refused(tmp_path: Path) -> None:
    mc = load_manual_cert(tmp_path, "127.0.0.1")
    key = PrivateKey.generate()
    ctx = server_ssl_context(mc.cert_file, mc.key_file, key.public, min_version=ssl.TLSVersion.TLSv1_2)
    srv = DerpServer(make_config(private_key=key, ssl_context=ctx))
    await srv.start("127.0.0.1", 0)
    try:
        proc = await asyncio.create_subprocess_exec(
            "openssl", "s_client", "-tls1_2", "-connect", f"127.0.0.1:{srv.port}",
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )  # fmt: skip
        assert proc.stdin is not None and proc.stdout is not None
        await asyncio.wait_for(proc.stdout.readuntil(b"---\n"), WAIT)  # connected
        proc.stdin.write(b"R\n")  # s_client: renegotiate
        out = await asyncio.wait_for(proc.stdout.read(), WAIT)
        await asyncio.wait_for(proc.wait(), WAIT)
        assert b"no renegotiation" in out
        await wait_until(lambda: srv.open_connections == 0)
        async with DerpClient(f"https://127.0.0.1:{srv.port}", PrivateKey.generate(), cert_name=mc.pin):
            pass
    finally:
        await srv.stop()


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback")
async def test_tls_listeners_on_ipv4_and_ipv6(tmp_path: Path) -> None:
    mc = load_manual_cert(tmp_path, "127.0.0.1")
    key = PrivateKey.generate()
    srv = DerpServer(
        make_config(
            private_key=key, ssl_context=server_ssl_context(mc.cert_file, mc.key_file, key.public)
        )
    )
    await srv.start(["127.0.0.1", "::1"], 0)
    try:
        names = sorted((s.family, s.getsockname()[0], s.getsockname()[1]) for s in srv.sockets)
        assert names == [
            (socket.AF_INET, "127.0.0.1", srv.port),
            (socket.AF_INET6, "::1", srv.port),
        ]
        v4 = await tls_raw(srv.port)
        v6 = await tls_raw(srv.port, host="::1")
        v6.send_packet(v4.pub, b"from ::1")
        assert await v4.recv_packet() == (v6.pub, b"from ::1")
        async with DerpClient(f"https://[::1]:{srv.port}", PrivateKey.generate(), cert_name=mc.pin) as c:
            await c.send(v4.key.public, b"client over ::1")
            assert await v4.recv_packet() == (c.public_key.raw, b"client over ::1")
        await v4.recv_type(FrameType.PEER_GONE)  # c left; then nothing more is in flight
        for x in (v4, v6):
            await x.close()
    finally:
        await srv.stop()


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback")
def test_bind_all_shares_one_port_between_families() -> None:
    infos = [
        (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", 0)),
        (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("::1", 0, 0, 0)),
        (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", 0)),  # duplicate: once
    ]
    socks = bind_all(infos, 0)
    try:
        assert len(socks) == 2
        assert socks[0].getsockname()[1] == socks[1].getsockname()[1] != 0
        assert socks[1].getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
    finally:
        for s in socks:
            s.close()


async def test_server_stop_aborts_handshakes_in_progress(
    tls_server: tuple[DerpServer, str, Path],
) -> None:
    srv, _, _ = tls_server
    r, w = await asyncio.open_connection("127.0.0.1", srv.port)
    await wait_until(lambda: srv.open_connections == 1)
    await asyncio.wait_for(srv.stop(grace=1.0), WAIT)
    assert srv.open_connections == 0
    assert await asyncio.wait_for(r.read(), WAIT) == b""
    w.close()
