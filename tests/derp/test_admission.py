"""Admission control: pure decision rules, hooks, and the server gate with real sockets."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from typing import Any

import h11
import pytest

from derp.admission import (
    MAX_RESPONSE_BODY,
    AllOf,
    KnownKeysAdmission,
    VerifyClientURL,
    admission_request_body,
    decide_response,
)
from derp.frames import FrameType, encode_send_packet
from derp.keys import PrivateKey, PublicKey
from derp.server import DerpServer, ServerConfig

from .conftest import UPGRADE_REQUEST, WAIT, HostFactory, RawClient, wait_until

# --------------------------------------------------------------------------- pure rules


def test_request_body_format() -> None:
    key = PrivateKey.generate().public
    doc = json.loads(admission_request_body(key, "192.0.2.7"))
    assert doc == {"NodePublic": f"nodekey:{key.raw.hex()}", "Source": "192.0.2.7"}


@pytest.mark.parametrize(
    ("status", "body", "allowed"),
    [
        (200, b'{"Allow":true}', True),
        (200, b'{"allow": true, "extra": 1}', True),  # Go's json: case-insensitive keys
        (200, b'{"Allow":false}', False),
        (200, b'{"Allow":"true"}', False),
        (200, b"{}", False),
        (200, b"[true]", False),
        (200, b"not json", False),
        (200, b"", False),
        (500, b'{"Allow":true}', False),
        (403, b'{"Allow":true}', False),
        (200, b'{"Allow":true,"pad":"' + b"x" * MAX_RESPONSE_BODY + b'"}', False),
    ],
)
def test_decide_response(status: int, body: bytes, allowed: bool) -> None:
    assert decide_response(status, body)[0] is allowed


async def test_known_keys_sync_async_and_all_of() -> None:
    a, b = PrivateKey.generate().public, PrivateKey.generate().public
    sync_hook = KnownKeysAdmission(lambda k: k == a)

    async def known(k: PublicKey) -> bool:
        return k == a

    async_hook = KnownKeysAdmission(known)
    for hook in (sync_hook, async_hook):
        assert await hook.admit(a, "1.2.3.4") is True
        assert await hook.admit(b, "1.2.3.4") is False
    assert await AllOf(sync_hook, async_hook).admit(a, "") is True
    assert await AllOf(sync_hook, KnownKeysAdmission(lambda k: False)).admit(a, "") is False


def test_verify_url_rejects_bad_urls() -> None:
    for url in ("ftp://x/", "http:///path", "nonsense"):
        with pytest.raises(ValueError):
            VerifyClientURL(url)


# --------------------------------------------------------------------------- fake controller


class Controller:
    """A tiny HTTP admission controller (h11 server role) on 127.0.0.1:0."""

    def __init__(self) -> None:
        self.status = 200
        self.body = b'{"Allow":true}'
        self.requests: list[tuple[bytes, dict[str, Any]]] = []
        #: NodePublic values always answered 200 {"Allow":true}
        self.always: set[str] = set()
        self.server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/verify?x=1"

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER)
        target = b""
        body = b""
        try:
            while True:
                ev = conn.next_event()
                if ev is h11.NEED_DATA:
                    conn.receive_data(await r.read(65536))
                    continue
                if isinstance(ev, h11.Request):
                    target = ev.target
                elif isinstance(ev, h11.Data):
                    body += ev.data
                elif isinstance(ev, h11.EndOfMessage):
                    break
                else:
                    return
            doc = json.loads(body)
            self.requests.append((target, doc))
            status, out = self.status, self.body
            if doc.get("NodePublic") in self.always:
                status, out = 200, b'{"Allow":true}'
            headers = [("Content-Type", "application/json"), ("Content-Length", str(len(out)))]
            w.write(conn.send(h11.Response(status_code=status, headers=headers)) or b"")
            w.write(conn.send(h11.Data(data=out)) or b"")
            w.write(conn.send(h11.EndOfMessage()) or b"")
            await w.drain()
        finally:
            w.close()


@pytest.fixture
async def controller() -> AsyncIterator[Controller]:
    c = Controller()
    await c.start()
    yield c
    await c.stop()


def _dead_url() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens: connection refused
    return f"http://127.0.0.1:{port}/verify"


async def _server(**kw: Any) -> DerpServer:
    srv = DerpServer(ServerConfig(private_key=PrivateKey.generate(), **kw))
    await srv.start("127.0.0.1", 0)
    return srv


async def _attempt(port: int, key: PrivateKey | None = None, extra: bytes = b"") -> RawClient:
    """Upgrade, read ServerKey, send ClientInfo (+ ``extra`` in the same write)."""
    c = await RawClient.open(port, key)
    c.writer.write(UPGRADE_REQUEST + b"\r\n")
    await c.read_http_head()
    await c.read_server_key()
    c.writer.write(c.client_info_frame() + extra)
    return c


async def _expect_admitted(c: RawClient) -> None:
    await c.read_server_info()


async def _expect_rejected(c: RawClient) -> None:
    # The server closes without ServerInfo: at most EOF, never a frame.
    data = await asyncio.wait_for(c.reader.read(65536), WAIT)
    assert data == b""


# --------------------------------------------------------------------------- server + URL


async def test_url_allow_and_request_contents(controller: Controller) -> None:
    srv = await _server(admission=VerifyClientURL(controller.url))
    try:
        c = await _attempt(srv.port)
        await _expect_admitted(c)
        target, doc = controller.requests[0]
        assert target == b"/verify?x=1"
        assert doc == {"NodePublic": f"nodekey:{c.pub.hex()}", "Source": "127.0.0.1"}
        # Admitted clients relay normally (to themselves here).
        c.send_packet(c.pub, b"hello")
        assert await c.recv_packet() == (c.pub, b"hello")
        assert srv.stats.admission_rejected == 0
        await c.close()
    finally:
        await srv.stop()


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (200, b'{"Allow":false}'),
        (500, b'{"Allow":true}'),
        (200, b'{"Allow":true,"pad":"' + b"x" * (MAX_RESPONSE_BODY + 10) + b'"}'),
    ],
    ids=["deny", "non-200", "oversize-body"],
)
async def test_url_rejections(
    controller: Controller, make_host: HostFactory, status: int, body: bytes
) -> None:
    controller.status, controller.body = status, body
    h = await make_host(admission=VerifyClientURL(controller.url))
    rkey = PrivateKey.generate()
    controller.always.add(f"nodekey:{rkey.public.raw.hex()}")
    receiver = await RawClient.open(h.next_port(), rkey)
    await receiver.handshake()
    await h.synced()
    # The rejected client (two workers: on the other one) sends a packet right
    # behind its ClientInfo: never relayed.
    c = await _attempt(h.next_port(), extra=encode_send_packet(receiver.pub, b"sneaky"))
    await _expect_rejected(c)
    assert h.stats.admission_rejected == 1
    assert h.stats.packets_received == 0
    assert h.client_count == 1
    # The receiver is unaffected: it still talks to itself.
    receiver.send_packet(receiver.pub, b"ok")
    assert await receiver.recv_packet() == (receiver.pub, b"ok")
    await c.close()
    await receiver.close()


@pytest.mark.parametrize("fail_open", [True, False])
async def test_url_down(fail_open: bool) -> None:
    srv = await _server(admission=VerifyClientURL(_dead_url(), fail_open=fail_open))
    try:
        c = await _attempt(srv.port)
        if fail_open:
            await _expect_admitted(c)
            assert srv.stats.admission_rejected == 0
        else:
            await _expect_rejected(c)
            assert srv.stats.admission_rejected == 1
        await c.close()
    finally:
        await srv.stop()


async def test_url_timeout_counts_as_down() -> None:
    # A listener that accepts but never answers: the check times out (fail-closed here).
    silent = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    hook = VerifyClientURL(f"http://127.0.0.1:{port}/", fail_open=False, timeout=0.2)
    try:
        assert await hook.admit(PrivateKey.generate().public, "1.2.3.4") is False
        hook.fail_open = True
        assert await hook.admit(PrivateKey.generate().public, "1.2.3.4") is True
    finally:
        silent.close()


# --------------------------------------------------------------------------- gate behaviour


class Blocking:
    """Admits keys in ``allow``; blocks on ``release`` for keys in ``hold``."""

    def __init__(self) -> None:
        self.allow: set[bytes] = set()
        self.hold: set[bytes] = set()
        self.release = asyncio.Event()
        self.started = asyncio.Event()
        self.calls = 0

    async def admit(self, key: PublicKey, source_ip: str) -> bool:
        self.calls += 1
        if key.raw in self.hold:
            self.started.set()
            await self.release.wait()
        return key.raw in self.allow


async def test_pending_admission_does_not_stall_others(make_host: HostFactory) -> None:
    hook = Blocking()
    slow, fast = PrivateKey.generate(), PrivateKey.generate()
    hook.allow |= {slow.public.raw, fast.public.raw}
    hook.hold.add(slow.public.raw)
    h = await make_host(admission=hook)
    # The slow client also sends a packet to itself behind ClientInfo.
    s = await _attempt(h.next_port(), slow, extra=encode_send_packet(slow.public.raw, b"early"))
    await asyncio.wait_for(hook.started.wait(), WAIT)
    f = await _attempt(h.next_port(), fast)
    await _expect_admitted(f)
    f.send_packet(f.pub, b"fast")
    assert await f.recv_packet() == (f.pub, b"fast")
    hook.release.set()
    await _expect_admitted(s)
    # The packet buffered during admission is relayed after it.
    assert await s.recv_packet() == (s.pub, b"early")
    # Both admitted, on different workers (two): they reach each other.
    await h.synced()
    s.send_packet(f.pub, b"s to f")
    assert await f.recv_packet() == (s.pub, b"s to f")
    await s.close()
    await f.close()


async def test_mesh_peers_skip_admission(make_host: HostFactory) -> None:
    hook = Blocking()  # admits nobody
    mesh_key = bytes(range(32))
    h = await make_host(admission=hook, mesh_key=mesh_key)
    m = await RawClient.open(h.next_port())
    await m.handshake({"meshKey": mesh_key.hex(), "version": 2})
    m.send(b"\x10\x00\x00\x00\x00")  # WatchConns works: it is a mesh peer
    f = await m.recv_type(FrameType.PEER_PRESENT)
    assert f.payload[:32] == m.pub
    assert hook.calls == 0
    # A non-mesh client is asked about, and rejected.
    c = await _attempt(h.next_port())
    await _expect_rejected(c)
    assert hook.calls == 1
    await c.close()
    await m.close()


async def test_failing_hook_rejects_and_server_survives(make_host: HostFactory) -> None:
    class Broken:
        async def admit(self, key: PublicKey, source_ip: str) -> bool:
            raise RuntimeError("boom")

    h = await make_host(admission=Broken())
    for _ in range(2):
        c = await _attempt(h.next_port())
        await _expect_rejected(c)
        await c.close()
    assert h.stats.admission_rejected == 2


async def test_stop_cancels_pending_checks(make_host: HostFactory) -> None:
    hook = Blocking()
    key = PrivateKey.generate()
    hook.hold.add(key.public.raw)
    h = await make_host(admission=hook)
    h.next_worker()  # two workers: the client goes to worker 1
    c = await _attempt(h.next_port(), key)
    await asyncio.wait_for(hook.started.wait(), WAIT)
    await asyncio.wait_for(h.stop(), WAIT)
    await _expect_rejected(c)
    await c.close()
    await wait_until(lambda: h.client_count == 0)
