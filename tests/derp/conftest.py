"""Fixtures for DERP server tests: a server on 127.0.0.1:0 and raw-socket clients.

``RawClient`` speaks DERP with nothing but :mod:`derp.frames` and :mod:`derp.keys`
over an asyncio stream, so server tests do not depend on the client library.
Every wait is bounded (``WAIT`` seconds, generous for a loaded machine).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import uvloop

from derp.frames import (
    HEADER_LEN,
    MAGIC,
    Frame,
    FrameType,
    encode_client_info,
    encode_send_packet,
)
from derp.keys import PrivateKey, open_sealed, seal
from derp.server import DerpServer, ServerConfig

WAIT = 20.0
_HDR = struct.Struct(">BI")

UPGRADE_REQUEST = (
    b"GET /derp HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: Go-http-client/1.1\r\n"
    b"Upgrade: DERP\r\nConnection: Upgrade\r\n"
)


class RawClient:
    """A minimal DERP client over raw TCP for tests."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, key: PrivateKey
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.key = key
        self.server_key = b""
        self.server_info: dict[str, Any] | None = None

    @property
    def pub(self) -> bytes:
        return self.key.public.raw

    @classmethod
    async def open(
        cls,
        port: int,
        key: PrivateKey | None = None,
        *,
        rcvbuf: int | None = None,
    ) -> RawClient:
        key = key or PrivateKey.generate()
        if rcvbuf is not None:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
            r, w = await asyncio.open_connection(sock=sock)
        else:
            r, w = await asyncio.open_connection("127.0.0.1", port)
        return cls(r, w, key)

    async def read_http_head(self) -> bytes:
        return await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), WAIT)

    def client_info_frame(self, info: dict[str, Any] | None = None) -> bytes:
        body = json.dumps(info if info is not None else {"version": 2, "CanAckPings": True})
        return encode_client_info(self.pub, seal(self.key, self.server_key, body.encode()))

    async def read_server_key(self) -> bytes:
        f = await self.recv_frame()
        assert f.type == FrameType.SERVER_KEY, f
        assert len(f.payload) == 40 and f.payload[:8] == MAGIC
        self.server_key = f.payload[8:40]
        return self.server_key

    async def read_server_info(self) -> dict[str, Any]:
        f = await self.recv_frame()
        assert f.type == FrameType.SERVER_INFO, f
        plain = open_sealed(self.key, self.server_key, f.payload)
        info = json.loads(plain)
        assert isinstance(info, dict)
        self.server_info = info
        return info

    async def handshake(self, info: dict[str, Any] | None = None) -> None:
        """Upgrade (101 path), read ServerKey, send ClientInfo, read ServerInfo."""
        self.writer.write(UPGRADE_REQUEST + b"\r\n")
        head = await self.read_http_head()
        assert head.startswith(b"HTTP/1.1 101 "), head
        await self.read_server_key()
        self.writer.write(self.client_info_frame(info))
        await self.read_server_info()

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    def send_packet(self, dst: bytes, packet: bytes) -> None:
        self.writer.write(encode_send_packet(dst, packet))

    async def recv_frame(self, timeout: float = WAIT) -> Frame:
        hdr = await asyncio.wait_for(self.reader.readexactly(HEADER_LEN), timeout)
        t, n = _HDR.unpack(hdr)
        payload = await asyncio.wait_for(self.reader.readexactly(n), timeout) if n else b""
        return Frame(t, payload)

    async def recv_type(self, ftype: int, timeout: float = WAIT) -> Frame:
        """Next frame of ``ftype``, skipping KeepAlives and other frames."""
        while True:
            f = await self.recv_frame(timeout)
            if f.type == ftype:
                return f

    async def recv_packet(self, timeout: float = WAIT) -> tuple[bytes, bytes]:
        f = await self.recv_type(FrameType.RECV_PACKET, timeout)
        return f.payload[:32], f.payload[32:]

    async def expect_closed(self, timeout: float = WAIT) -> None:
        """Wait until the server closes the connection (frames before EOF are ignored)."""

        async def drain() -> None:
            while True:
                try:
                    chunk = await self.reader.read(65536)
                except ConnectionResetError:
                    return
                if not chunk:
                    return

        await asyncio.wait_for(drain(), timeout)

    async def close(self) -> None:
        self.writer.close()
        try:
            await asyncio.wait_for(self.writer.wait_closed(), WAIT)
        except (ConnectionError, asyncio.TimeoutError):
            pass


ClientFactory = Callable[..., Awaitable[RawClient]]


async def wait_until(cond: Callable[[], bool], timeout: float = WAIT) -> None:
    """Poll a server-side condition on the event loop (bounded; yields each turn)."""

    async def loop() -> None:
        while not cond():
            await asyncio.sleep(0.005)

    await asyncio.wait_for(loop(), timeout)


def make_config(**kw: Any) -> ServerConfig:
    kw.setdefault("private_key", PrivateKey.generate())
    return ServerConfig(**kw)


if os.environ.get("DERP_TEST_UVLOOP") == "1":
    # Opt-in: run the async tests of this directory on uvloop instead of asyncio.

    def pytest_asyncio_loop_factories(
        config: pytest.Config, item: pytest.Item
    ) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
        return {"uvloop": uvloop.new_event_loop}


@pytest.fixture
async def server() -> AsyncIterator[DerpServer]:
    srv = DerpServer(make_config())
    await srv.start("127.0.0.1", 0)
    try:
        yield srv
    finally:
        await srv.stop()


@pytest.fixture
async def clients() -> AsyncIterator[list[RawClient]]:
    """A list that tests append their clients to; all are closed at teardown."""
    made: list[RawClient] = []
    yield made
    for c in made:
        await c.close()


@pytest.fixture
def connect(server: DerpServer, clients: list[RawClient]) -> ClientFactory:
    """``await connect()`` → a handshaken RawClient on the ``server`` fixture."""

    async def factory(
        key: PrivateKey | None = None,
        *,
        info: dict[str, Any] | None = None,
        handshake: bool = True,
        rcvbuf: int | None = None,
        srv: DerpServer | None = None,
    ) -> RawClient:
        c = await RawClient.open((srv or server).port, key, rcvbuf=rcvbuf)
        clients.append(c)
        if handshake:
            await c.handshake(info)
        return c

    return factory
