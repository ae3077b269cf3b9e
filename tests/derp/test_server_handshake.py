"""DERP handshake: ServerKey → ClientInfo → ServerInfo, and every rejection path."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest
from hypothesis import given
from hypothesis import strategies as st

from derp.errors import HandshakeError
from derp.frames import (
    FrameType,
    encode_client_info,
    encode_frame,
    encode_note_preferred,
    encode_send_packet,
)
from derp.keys import PrivateKey, PublicKey, seal
from derp.server import DerpServer
from derp.server.handshake import open_client_info, parse_client_info_json

from .conftest import (
    UPGRADE_REQUEST,
    ClientFactory,
    HostFactory,
    RawClient,
    make_config,
    wait_until,
)

MESH = bytes(range(32))


async def _upgraded(connect: ClientFactory) -> RawClient:
    c = await connect(handshake=False)
    c.send(UPGRADE_REQUEST + b"\r\n")
    await c.read_http_head()
    await c.read_server_key()
    return c


async def test_good_handshake_server_info_first(
    server: DerpServer, connect: ClientFactory
) -> None:
    c = await _upgraded(connect)
    # ClientInfo immediately followed by NotePreferred and a packet to self.
    c.send(
        c.client_info_frame()
        + encode_note_preferred(True)
        + encode_send_packet(c.pub, b"to myself")
    )
    f = await c.recv_frame()
    assert f.type == FrameType.SERVER_INFO  # before anything else
    assert await c.recv_packet() == (c.pub, b"to myself")
    await wait_until(lambda: server.stats.current_home_connections == 1)
    assert server.client_count == 1 and c.pub in server.relay


async def _expect_rejected(server: DerpServer, c: RawClient, frame: bytes) -> None:
    c.send(frame)
    await c.expect_closed()
    await wait_until(lambda: server.stats.handshake_failures >= 1)
    assert server.client_count == 0


async def test_bad_box_rejected(server: DerpServer, connect: ClientFactory) -> None:
    c = await _upgraded(connect)
    other = PrivateKey.generate()
    # Sealed with a different private key than the claimed public key.
    frame = encode_client_info(c.pub, seal(other, server.public_key, b'{"version":2}'))
    await _expect_rejected(server, c, frame)


async def test_wrong_first_frame_rejected(server: DerpServer, connect: ClientFactory) -> None:
    c = await _upgraded(connect)
    await _expect_rejected(server, c, encode_send_packet(c.pub, b"too early"))


async def test_all_zero_key_rejected(server: DerpServer, connect: ClientFactory) -> None:
    c = await _upgraded(connect)
    await _expect_rejected(server, c, encode_frame(FrameType.CLIENT_INFO, bytes(32 + 24 + 40)))


@pytest.mark.parametrize("length", [55, 256 * 1024 + 1])
async def test_client_info_length_rules(
    server: DerpServer, connect: ClientFactory, length: int
) -> None:
    c = await _upgraded(connect)
    # The header alone decides: no need to send the oversize payload.
    header = bytes([FrameType.CLIENT_INFO]) + length.to_bytes(4, "big")
    payload = c.pub + bytes(length - 32) if length < 100 else b""
    await _expect_rejected(server, c, header + payload)


@pytest.mark.parametrize("mesh_value", ["", "abc", "zz" * 32, "00" * 31, "00" * 33, 123])
async def test_bad_mesh_key_rejected(
    server: DerpServer, connect: ClientFactory, mesh_value: object
) -> None:
    c = await _upgraded(connect)
    body = json.dumps({"meshKey": mesh_value, "version": 2}).encode()
    await _expect_rejected(
        server, c, encode_client_info(c.pub, seal(c.key, server.public_key, body))
    )


async def test_invalid_json_rejected(server: DerpServer, connect: ClientFactory) -> None:
    c = await _upgraded(connect)
    frame = encode_client_info(c.pub, seal(c.key, server.public_key, b"{not json"))
    await _expect_rejected(server, c, frame)


async def test_mesh_key_match_and_case_insensitive_json(
    make_host: HostFactory, connect: ClientFactory
) -> None:
    h = await make_host(mesh_key=MESH)
    good_info = {"MESHKEY": MESH.hex().upper(), "Version": 2, "isprober": True}
    good = await connect(info=good_info, host=h)
    bad = await connect(info={"meshKey": "11" * 32, "version": 2, "Unknown": [1, 2]}, host=h)
    await wait_until(lambda: h.client_count == 2)
    by_key = {c.key: c for c in h.connections}
    assert by_key[good.pub].is_mesh and by_key[good.pub].info is not None
    assert by_key[good.pub].info.is_prober  # type: ignore[union-attr]
    assert not by_key[bad.pub].is_mesh


async def test_handshake_timeout(clients: list[RawClient], caplog: pytest.LogCaptureFixture) -> None:
    srv = DerpServer(make_config(handshake_timeout=0.3))
    await srv.start()
    try:
        c = await RawClient.open(srv.port)
        clients.append(c)
        c.send(UPGRADE_REQUEST + b"\r\n")
        await c.read_http_head()
        await c.read_server_key()
        with caplog.at_level(logging.INFO, logger="derp.server"):
            await c.expect_closed()  # never sent ClientInfo
            await wait_until(lambda: srv.stats.handshake_failures == 1)
        assert "handshake timeout" in caplog.text
    finally:
        await srv.stop()


async def test_rejected_client_does_not_disturb_others(
    server: DerpServer, connect: ClientFactory
) -> None:
    a = await connect()
    b = await connect()
    c = await _upgraded(connect)
    c.send(encode_frame(FrameType.PING, b"12345678"))
    await c.expect_closed()
    a.send_packet(b.pub, b"still fine")
    assert await b.recv_packet() == (a.pub, b"still fine")


# --------------------------------------------------------------------------- pure


def test_open_client_info_roundtrip() -> None:
    srv = PrivateKey.generate()
    cli = PrivateKey.generate()
    body = b'{"meshKey":"' + MESH.hex().encode() + b'","version":2,"CanAckPings":true,"AppName":"x"}'
    payload = cli.public.raw + seal(cli, srv.public, body)
    info = open_client_info(srv, payload, MESH)
    assert info.key == cli.public.raw and info.is_mesh and info.mesh_key == MESH
    assert info.version == 2 and info.can_ack_pings and info.app_name == "x"
    assert not open_client_info(srv, payload, bytes(32)).is_mesh
    assert not open_client_info(srv, payload, None).is_mesh


@pytest.mark.parametrize(
    "doc",
    [b"[]", b'"x"', b'{"version":"2"}', b'{"CanAckPings":1}', b'{"version":true}',
     b'{"AppName":5}', b'{"meshKey":""}', b"\xff"],
)
def test_parse_client_info_rejects(doc: bytes) -> None:
    with pytest.raises(HandshakeError):
        parse_client_info_json(b"k" * 32, doc)


def test_parse_client_info_ignores_nulls_and_unknown() -> None:
    info = parse_client_info_json(b"k" * 32, b'{"meshKey":null,"foo":{"bar":1},"VERSION":7}')
    assert info.mesh_key is None and info.version == 7


@given(st.binary(max_size=300))
def test_open_client_info_total(payload: bytes) -> None:
    """Any bytes either parse or raise HandshakeError; nothing else escapes."""
    srv = PrivateKey.generate()
    try:
        open_client_info(srv, payload)
    except HandshakeError:
        pass


async def test_handshake_timeout_while_admission_pending(
    clients: list[RawClient], caplog: pytest.LogCaptureFixture
) -> None:
    """A hook that never answers: the handshake deadline still closes the client,
    with a reason naming admission, and it is not counted as a protocol error."""
    asked = asyncio.Event()

    class Never:
        async def admit(self, key: PublicKey, source_ip: str) -> bool:
            asked.set()
            await asyncio.Event().wait()
            return True

    srv = DerpServer(make_config(handshake_timeout=0.3, admission=Never()))
    await srv.start()
    try:
        c = await RawClient.open(srv.port)
        clients.append(c)
        c.send(UPGRADE_REQUEST + b"\r\n")
        await c.read_http_head()
        await c.read_server_key()
        with caplog.at_level(logging.INFO, logger="derp.server"):
            c.send(c.client_info_frame())
            await asyncio.wait_for(asked.wait(), 20.0)
            await c.expect_closed()
            await wait_until(lambda: srv.stats.handshake_failures == 1)
        assert "admission still pending" in caplog.text
        assert srv.stats.protocol_errors == 0
        assert srv.client_count == 0
    finally:
        await srv.stop()
