"""derp.tlsio without sockets: a TlsProtocol on a fake socket transport, and a client
``ssl.SSLObject`` on memory BIOs whose ciphertext the test cuts as it likes.

Also both ends over loopback: :func:`open_tls_connection` (client mode) against a
TlsProtocol server. Covered: records split at every byte boundary and byte by byte, arbitrary chunking of
the handshake and data (hypothesis), many records in one read (one ``data_received``),
writes of one loop iteration encrypted into full-size records with one socket write,
close_notify both ways, EOF without close_notify, a corrupted record, garbage instead of
a ClientHello, the handshake deadline, and app data that arrives with the client's
Finished (fast start).
"""

from __future__ import annotations

import asyncio
import ssl
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from derp.keys import PrivateKey
from derp.tls import load_manual_cert, server_ssl_context
from derp.tlsio import READ_BUFFER_SIZE, TlsProtocol, open_tls_connection

from .conftest import WAIT

_REC = struct.Struct(">BHH")  # content type, legacy version, length


@pytest.fixture(scope="module")
def server_ctx(tmp_path_factory: pytest.TempPathFactory) -> ssl.SSLContext:
    mc = load_manual_cert(tmp_path_factory.mktemp("tlsio"), "127.0.0.1")
    return server_ssl_context(mc.cert_file, mc.key_file, PrivateKey.generate().public)


def _client_ctx(max_version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if max_version is not None:
        ctx.maximum_version = max_version
    return ctx


class FakeSocket(asyncio.Transport):
    """The socket transport under a TlsProtocol: records writes, close and abort."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False
        self.aborted = False
        self.reading = True
        self.limits: tuple[int | None, int | None] = (None, None)

    def write(self, data: Any) -> None:
        assert not self.closed, "write after close"
        self.writes.append(bytes(data))

    def take(self) -> bytes:
        out = b"".join(self.writes)
        self.writes.clear()
        return out

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = self.aborted = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 1) if name == "peername" else default

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_reading(self) -> bool:
        return self.reading

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.limits = (high, low)

    def get_write_buffer_size(self) -> int:
        return 0


class App(asyncio.Protocol):
    """The protocol on top: records what it gets."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.chunks: list[bytes] = []
        self.eof = 0
        self.lost: list[Exception | None] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        assert type(data) is bytes
        self.chunks.append(data)

    def eof_received(self) -> bool | None:
        self.eof += 1
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.append(exc)

    @property
    def data(self) -> bytes:
        return b"".join(self.chunks)


class Pair:
    """A TlsProtocol (server) on a FakeSocket and an in-memory client SSLObject."""

    def __init__(
        self, server_ctx: ssl.SSLContext, client_max: ssl.TLSVersion | None = None, **kw: Any
    ) -> None:
        self.app = App()
        self.handshakes: list[BaseException | None] = []
        self.tls = TlsProtocol(
            server_ctx, lambda: self.app, on_handshake=lambda p, e: self.handshakes.append(e), **kw
        )
        self.sock = FakeSocket()
        self.tls.connection_made(self.sock)
        self.cin, self.cout = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.client = _client_ctx(client_max).wrap_bio(
            self.cin, self.cout, server_hostname="127.0.0.1"
        )

    def feed(self, data: bytes, *, buffered: bool = True) -> None:
        """Deliver socket bytes to the TlsProtocol (buffered-protocol path by default)."""
        if not buffered:
            self.tls.data_received(data)
            return
        view = memoryview(data)
        while view:
            buf = self.tls.get_buffer(-1)
            n = min(len(buf), len(view))
            buf[:n] = view[:n]
            self.tls.buffer_updated(n)
            view = view[n:]

    def client_step(self) -> bool:
        try:
            self.client.do_handshake()
            return True
        except ssl.SSLWantReadError:
            return False

    def handshake(self, *, early_data: bytes = b"") -> None:
        """Run the handshake; ``early_data`` is written by the client right after it."""
        for _ in range(4):  # TLS 1.3: 1.5 round trips; TLS 1.2: 2
            done = self.client_step()
            if done and early_data:
                self.client.write(early_data)
                early_data = b""
            self.feed(self.cout.read())
            self.cin.write(self.sock.take())
            if done and self.client_step() and self.app.transport is not None:
                break
        self.client_read()  # session tickets
        assert self.handshakes == [None] and self.app.transport is not None

    def records(self, *payloads: bytes) -> bytes:
        """The ciphertext of one client record per payload."""
        for p in payloads:
            self.client.write(p)
        return self.cout.read()

    def client_read(self) -> bytes:
        """Plaintext the server sent so far (after feeding the socket bytes to the client)."""
        self.cin.write(self.sock.take())
        out = b""
        try:
            while True:
                chunk = self.client.read(1 << 20)
                if not chunk:
                    break
                out += chunk
        except ssl.SSLWantReadError:
            pass
        return out


@pytest.fixture
async def pair(server_ctx: ssl.SSLContext) -> AsyncIterator[Pair]:
    p = Pair(server_ctx)
    yield p
    p.tls._abort()


async def test_records_split_at_every_byte_boundary(pair: Pair) -> None:
    pair.handshake()
    payloads = (b"a", b"0123456789", bytes(range(60)))
    first = pair.records(*payloads)
    pair.feed(first)
    for k in range(len(first) + 1):
        wire = pair.records(*payloads)  # same lengths, fresh ciphertext
        assert len(wire) == len(first)
        pair.app.chunks.clear()
        pair.feed(wire[:k])
        pair.feed(wire[k:])
        assert pair.app.data == b"".join(payloads), k
        assert len(pair.app.chunks) <= 2


async def test_records_byte_by_byte(pair: Pair) -> None:
    pair.handshake()
    payloads = (b"x" * 1400, b"y" * 3, b"z" * 20000)  # the last is two records
    wire = pair.records(*payloads)
    for i in range(len(wire)):
        pair.feed(wire[i : i + 1])
    assert pair.app.data == b"".join(payloads)
    assert len(pair.app.chunks) == 4  # one delivery per completed record


@pytest.mark.parametrize("buffered", [True, False])
async def test_many_records_in_one_read_is_one_delivery(pair: Pair, buffered: bool) -> None:
    pair.handshake()
    payloads = [bytes([i]) * 1437 for i in range(150)]  # 150 records, one per packet
    pair.feed(pair.records(*payloads), buffered=buffered)
    assert pair.app.chunks == [b"".join(payloads)]


async def test_more_plaintext_than_one_buffer_in_one_read(pair: Pair) -> None:
    pair.handshake()
    payloads = [bytes([i % 251]) * 16000 for i in range(40)]  # 640 KB in one delivery
    pair.feed(pair.records(*payloads), buffered=False)
    assert len(pair.app.chunks) == 1 and pair.app.data == b"".join(payloads)
    assert len(pair.app.data) > READ_BUFFER_SIZE


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(cuts=st.lists(st.integers(min_value=0, max_value=4000), max_size=12), data=st.data())
def test_arbitrary_chunking_of_handshake_and_data(
    server_ctx: ssl.SSLContext, cuts: list[int], data: st.DataObject
) -> None:
    async def run() -> None:
        p = Pair(server_ctx)

        def chunked(wire: bytes) -> None:
            points = sorted({c % (len(wire) + 1) for c in cuts})
            last = 0
            for c in points + [len(wire)]:
                p.feed(wire[last:c])
                last = c

        p.client_step()
        chunked(p.cout.read())
        p.cin.write(p.sock.take())
        assert p.client_step()
        sizes = data.draw(st.lists(st.integers(1, 20000), min_size=1, max_size=5))
        payloads = [bytes([i + 1]) * n for i, n in enumerate(sizes)]
        for x in payloads:
            p.client.write(x)
        chunked(p.cout.read())  # Finished and the data records, cut anywhere
        assert p.handshakes == [None]
        assert p.app.data == b"".join(payloads)
        p.tls._abort()

    asyncio.run(run())


async def test_data_with_client_finished_reaches_app_at_connect(pair: Pair) -> None:
    pair.handshake(early_data=b"GET /derp HTTP/1.1\r\n\r\n")
    assert pair.app.data == b"GET /derp HTTP/1.1\r\n\r\n"


def _record_lengths(wire: bytes) -> list[int]:
    out, pos = [], 0
    while pos < len(wire):
        _t, _v, n = _REC.unpack_from(wire, pos)
        out.append(n)
        pos += 5 + n
    assert pos == len(wire)
    return out


async def test_writes_of_one_iteration_become_full_records_in_one_socket_write(
    pair: Pair,
) -> None:
    pair.handshake()
    t = pair.app.transport
    assert t is not None
    packets = [bytes([i]) * 1400 for i in range(100)]  # 140,000 bytes, written one by one
    for pkt in packets:
        t.write(pkt)
    assert pair.sock.writes == [] and t.get_write_buffer_size() == 140_000
    await asyncio.sleep(0)  # the end-of-iteration flush
    assert len(pair.sock.writes) == 1
    lengths = _record_lengths(pair.sock.writes[0])
    # 16,384 bytes of plaintext per record (+ content type + 16-byte tag in TLS 1.3)
    assert lengths[:-1] == [16384 + 17] * 8 and len(lengths) == 9
    assert pair.client_read() == b"".join(packets)


async def test_writes_after_close_are_dropped_and_close_flushes_first(pair: Pair) -> None:
    pair.handshake()
    t = pair.app.transport
    assert t is not None
    t.write(b"last words")
    t.close()  # before the end-of-iteration flush: flushed by close
    t.write(b"too late")
    assert pair.sock.closed and not pair.sock.aborted and t.is_closing()
    assert pair.client_read() == b"last words"
    assert pair.client.read(10) == b""  # close_notify followed (a read at EOF)


async def test_peer_close_notify_is_eof_and_answered(pair: Pair) -> None:
    pair.handshake()
    pair.client.write(b"bye")
    try:
        pair.client.unwrap()
    except ssl.SSLWantReadError:
        pass
    pair.feed(pair.cout.read())
    assert pair.app.data == b"bye" and pair.app.eof == 1
    assert pair.sock.closed and not pair.sock.aborted  # app said "close": ours sent, closed
    pair.cin.write(pair.sock.take())
    pair.client.unwrap()  # completes: our close_notify arrived


async def test_eof_without_close_notify_is_eof(pair: Pair) -> None:
    pair.handshake()
    pair.feed(pair.records(b"partial"))
    assert pair.tls.eof_received() is False  # the app did not ask to keep it open
    assert pair.app.eof == 1 and pair.app.data == b"partial"
    pair.tls.connection_lost(None)
    assert pair.app.lost == [None]


async def test_corrupted_record_aborts_after_delivering_good_ones(pair: Pair) -> None:
    pair.handshake()
    good = pair.records(b"good")
    bad = bytearray(pair.records(b"evil"))
    bad[-1] ^= 1  # breaks the AEAD tag
    pair.feed(good + bytes(bad))
    assert pair.app.data == b"good"
    assert pair.sock.aborted
    pair.tls.connection_lost(None)
    assert len(pair.app.lost) == 1 and isinstance(pair.app.lost[0], ssl.SSLError)


async def test_garbage_instead_of_client_hello(pair: Pair) -> None:
    pair.feed(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert pair.sock.closed
    assert len(pair.handshakes) == 1 and isinstance(pair.handshakes[0], ssl.SSLError)
    assert pair.app.transport is None  # the app protocol was never made
    pair.feed(b"more garbage")  # ignored after the failure
    pair.tls.connection_lost(None)
    assert pair.app.lost == []


async def test_handshake_deadline(server_ctx: ssl.SSLContext) -> None:
    done = asyncio.get_running_loop().create_future()
    tls = TlsProtocol(
        server_ctx,
        App,
        handshake_timeout=0.05,
        on_handshake=lambda p, e: done.set_result(e),
    )
    sock = FakeSocket()
    tls.connection_made(sock)
    tls.buffer_updated(0)  # nothing useful arrives
    exc = await asyncio.wait_for(done, WAIT)
    assert isinstance(exc, TimeoutError) and sock.aborted


async def test_flow_control_passes_through(pair: Pair) -> None:
    pair.handshake()
    t = pair.app.transport
    assert t is not None
    t.set_write_buffer_limits(high=1234)
    assert pair.sock.limits == (1234, None)
    t.pause_reading()
    assert not t.is_reading()
    t.resume_reading()
    assert t.is_reading()
    assert t.get_extra_info("peername") == ("127.0.0.1", 1)
    assert t.get_extra_info("ssl_object").version() == "TLSv1.3"


async def test_tls12_when_allowed(tmp_path: Path) -> None:
    mc = load_manual_cert(tmp_path, "127.0.0.1")
    ctx = server_ssl_context(mc.cert_file, mc.key_file, None, min_version=ssl.TLSVersion.TLSv1_2)
    p = Pair(ctx, client_max=ssl.TLSVersion.TLSv1_2)
    p.handshake()
    assert p.client.version() == "TLSv1.2"
    p.feed(p.records(b"one", b"two"))
    assert p.app.data == b"onetwo"
    p.tls._abort()


async def test_writelines_pieces_are_one_record(pair: Pair) -> None:
    pair.handshake()
    t = pair.app.transport
    assert t is not None
    t.writelines([b"head", bytearray(b"-"), memoryview(b"body")])
    await asyncio.sleep(0)
    assert len(pair.sock.writes) == 1 and len(_record_lengths(pair.sock.writes[0])) == 1
    assert pair.client_read() == b"head-body"


class Greeter(asyncio.Protocol):
    """Server app: says hello at once, then echoes; closes on EOF."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.t = transport
        transport.write(b"hello;")

    def data_received(self, data: bytes) -> None:
        self.t.write(data.upper())


async def test_client_mode_replays_what_arrived_before_the_app(
    server_ctx: ssl.SSLContext,
) -> None:
    loop = asyncio.get_running_loop()
    lsn = await loop.create_server(lambda: TlsProtocol(server_ctx, Greeter), "127.0.0.1", 0)
    try:
        port = lsn.sockets[0].getsockname()[1]
        t = await asyncio.wait_for(
            open_tls_connection("127.0.0.1", port, _client_ctx(), "127.0.0.1"), WAIT
        )
        assert t.get_extra_info("ssl_object").version() == "TLSv1.3"
        # Let the greeting arrive before the app is attached.
        await asyncio.wait_for(_until(lambda: bool(t._p._app.held)), WAIT)  # type: ignore[attr-defined]
        app = App()
        t.set_protocol(app)
        app.connection_made(t)
        t.write(b"echo me")
        await asyncio.wait_for(_until(lambda: app.data == b"hello;ECHO ME"), WAIT)
        t.close()
        await asyncio.wait_for(_until(lambda: bool(app.lost)), WAIT)
    finally:
        lsn.close()


async def test_client_mode_raises_the_handshake_error(tmp_path: Path) -> None:
    mc = load_manual_cert(tmp_path, "127.0.0.1")
    ctx = server_ssl_context(mc.cert_file, mc.key_file, None)
    loop = asyncio.get_running_loop()
    lsn = await loop.create_server(lambda: TlsProtocol(ctx, Greeter), "127.0.0.1", 0)
    try:
        port = lsn.sockets[0].getsockname()[1]
        verifying = ssl.create_default_context()  # the self-signed certificate is unknown
        with pytest.raises(ssl.SSLCertVerificationError):
            await asyncio.wait_for(open_tls_connection("127.0.0.1", port, verifying, "127.0.0.1"), WAIT)
    finally:
        lsn.close()


async def _until(cond: Any) -> None:
    while not cond():
        await asyncio.sleep(0.005)
