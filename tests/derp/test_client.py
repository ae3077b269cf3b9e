"""Tests for derp.client: the sans-I/O ClientConnection and the asyncio DerpClient.

Layers:

* ``ClientConnection`` driven with bytes only (login, frame rules, chunking
  invariance with Hypothesis);
* ``DerpClient`` against ``FakeDerp``, a tiny in-test DERP server built on
  ``derp.frames``/``derp.keys`` that lets tests inject frames and restart;
* ``DerpClient`` against the real ``derp.server.DerpServer`` (skipped until it exists).

Every wait is bounded with ``asyncio.wait_for``; nothing sleeps and hopes.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import pytest
from hypothesis import given
from hypothesis import strategies as st

from derp import frames
from derp.client import ClientConnection, ClientState, DerpClient, parse_derp_url
from derp.errors import ConnectionClosed, FrameError, HandshakeError
from derp.events import (
    Connected,
    Disconnected,
    Event,
    HealthReceived,
    KeepAliveReceived,
    PacketReceived,
    PeerGoneReceived,
    PeerPresentReceived,
    PingReceived,
    PongReceived,
    ServerRestarting,
)
from derp.frames import FrameType, PeerGoneReason, PeerPresentFlags
from derp.keys import PrivateKey, PublicKey, open_sealed, seal

WAIT = 10.0  # generous bound for any single wait on a loaded machine
T = TypeVar("T")

SERVER_KEY = PrivateKey.generate()
CLIENT_KEY = PrivateKey.generate()
PEER_KEY = PrivateKey.generate()

UPGRADE_101 = (
    b"HTTP/1.1 101 Switching Protocols\r\n"
    b"Upgrade: DERP\r\nConnection: Upgrade\r\nDerp-Version: 2\r\n\r\n"
)


async def within(aw: Awaitable[T], timeout: float = WAIT) -> T:
    return await asyncio.wait_for(aw, timeout)


# --------------------------------------------------------------------------- sans-I/O core


def server_info_frame(
    server: PrivateKey = SERVER_KEY, client: PublicKey = CLIENT_KEY.public, info: Any = None
) -> bytes:
    blob = json.dumps({"version": 2} if info is None else info).encode()
    return frames.encode_server_info(seal(server, client, blob))


def login_bytes() -> bytes:
    return UPGRADE_101 + frames.encode_server_key(SERVER_KEY.public.raw) + server_info_frame()


def open_core(**kw: Any) -> ClientConnection:
    core = ClientConnection(CLIENT_KEY, host="derp.example:3340", **kw)
    core.data_to_send()
    core.receive_data(login_bytes())
    core.data_to_send()
    assert core.events_received() == [Connected(SERVER_KEY.public)]
    return core


def client_info_json(core_out: list[bytes]) -> dict[str, Any]:
    dec = frames.FrameDecoder()
    dec.feed(b"".join(core_out))
    frame = dec.next_frame()
    assert frame is not None and frame.type == FrameType.CLIENT_INFO
    assert frame.payload[:32] == CLIENT_KEY.public.raw
    doc = json.loads(open_sealed(SERVER_KEY, CLIENT_KEY.public, frame.payload[32:]))
    assert isinstance(doc, dict)
    return doc


def test_upgrade_request_is_the_go_request() -> None:
    core = ClientConnection(CLIENT_KEY, host="derp.example:3340")
    assert b"".join(core.data_to_send()) == (
        b"GET /derp HTTP/1.1\r\nHost: derp.example:3340\r\n"
        b"Upgrade: DERP\r\nConnection: Upgrade\r\n\r\n"
    )
    assert core.state is ClientState.HTTP


def test_login_sends_client_info_and_opens() -> None:
    core = ClientConnection(CLIENT_KEY, host="h")
    core.data_to_send()
    core.receive_data(UPGRADE_101 + frames.encode_server_key(SERVER_KEY.public.raw))
    assert core.state is ClientState.SERVER_INFO
    assert client_info_json(core.data_to_send()) == {"version": 2, "CanAckPings": True}
    core.receive_data(
        server_info_frame(
            info={"version": 2, "TokenBucketBytesPerSecond": 1000, "TokenBucketBytesBurst": 50}
        )
    )
    assert core.state is ClientState.OPEN
    assert core.events_received() == [Connected(SERVER_KEY.public)]
    assert core.server_key == SERVER_KEY.public
    assert core.token_bucket == (1000, 50)


def test_client_info_mesh_and_prober_fields() -> None:
    mesh = bytes(range(32))
    core = ClientConnection(
        CLIENT_KEY, host="h", mesh_key=mesh, is_prober=True, can_ack_pings=False
    )
    core.receive_data(UPGRADE_101 + frames.encode_server_key(SERVER_KEY.public.raw))
    out = core.data_to_send()[-1:]
    doc = client_info_json(out)
    assert list(doc) == ["meshKey", "version", "CanAckPings", "IsProber"]
    assert doc == {"meshKey": mesh.hex(), "version": 2, "CanAckPings": False, "IsProber": True}


def test_frames_sent_before_login_follow_client_info() -> None:
    core = ClientConnection(CLIENT_KEY, host="h")
    core.send_note_preferred(True)
    assert b"".join(core.data_to_send()).startswith(b"GET /derp")  # nothing extra yet
    core.receive_data(UPGRADE_101 + frames.encode_server_key(SERVER_KEY.public.raw))
    out = b"".join(core.data_to_send())
    assert out.endswith(frames.encode_note_preferred(True))
    assert out[0] == FrameType.CLIENT_INFO


@pytest.mark.parametrize(
    ("response", "needle"),
    [
        (b"HTTP/1.1 426 Upgrade Required\r\nContent-Length: 0\r\n\r\n", "426 Upgrade Required"),
        (b"HTTP/1.1 404 Not Found\r\n\r\n", "404 Not Found"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", "200 OK"),
        (b"SSH-2.0-OpenSSH\r\n\r\n", "malformed HTTP response"),
    ],
)
def test_non_101_is_a_handshake_error_with_the_status_line(response: bytes, needle: str) -> None:
    core = ClientConnection(CLIENT_KEY, host="h")
    with pytest.raises(HandshakeError, match=needle):
        core.receive_data(response)
    assert core.state is ClientState.CLOSED


@pytest.mark.parametrize(
    ("after_101", "needle"),
    [
        (frames.encode_keep_alive(), "want ServerKey"),
        (frames.encode_frame(FrameType.SERVER_KEY, b"X" * 8 + bytes(range(1, 33))), "magic"),
        (frames.encode_frame(FrameType.SERVER_KEY, frames.MAGIC + b"short"), "40..1024"),
        (
            frames.encode_frame(FrameType.SERVER_KEY, frames.MAGIC + bytes(range(1, 33)) * 32),
            "40..1024",
        ),
        (
            frames.encode_server_key(SERVER_KEY.public.raw) + frames.encode_keep_alive(),
            "want ServerInfo",
        ),
        (
            frames.encode_server_key(SERVER_KEY.public.raw) + server_info_frame(server=PEER_KEY),
            "does not open",
        ),
        (
            frames.encode_server_key(SERVER_KEY.public.raw) + server_info_frame(info=[1, 2]),
            "not an object",
        ),
        (
            frames.encode_server_key(SERVER_KEY.public.raw)
            + frames.encode_server_info(seal(SERVER_KEY, CLIENT_KEY.public, b"{nope")),
            "not JSON",
        ),
    ],
)
def test_bad_login_frames(after_101: bytes, needle: str) -> None:
    core = ClientConnection(CLIENT_KEY, host="h")
    with pytest.raises(HandshakeError, match=needle):
        core.receive_data(UPGRADE_101 + after_101)
    assert core.state is ClientState.CLOSED


def test_server_key_extra_bytes_are_ignored() -> None:
    core = ClientConnection(CLIENT_KEY, host="h")
    core.receive_data(
        UPGRADE_101
        + frames.encode_frame(FrameType.SERVER_KEY, frames.MAGIC + SERVER_KEY.public.raw + b"xx")
        + server_info_frame()
    )
    assert core.state is ClientState.OPEN


def test_steady_state_frames_become_events() -> None:
    core = open_core()
    peer = PEER_KEY.public
    data = (
        frames.encode_recv_packet(peer.raw, b"hello")
        + frames.encode_keep_alive()
        + frames.encode_peer_gone(peer.raw, PeerGoneReason.NOT_HERE)
        + frames.encode_frame(FrameType.PEER_GONE, peer.raw)  # pre-2023: no reason byte
        + frames.encode_frame(FrameType.PEER_GONE, peer.raw + b"\x77")  # unknown reason
        + frames.encode_peer_present(
            peer.raw, ipaddress.IPv6Address("::ffff:10.1.2.3").packed, 4242, 0x02
        )
        + frames.encode_frame(FrameType.PEER_PRESENT, peer.raw)
        + frames.encode_peer_present(peer.raw, ipaddress.IPv6Address("2001:db8::1").packed, 7, 0)
        + frames.encode_ping(b"12345678")
        + frames.encode_pong(b"abcdefgh")
        + frames.encode_health("dup key")
        + frames.encode_health("")
        + frames.encode_restarting(1500, 20000)
        + frames.encode_frame(0x42, b"future frame")
        + frames.encode_server_key(SERVER_KEY.public.raw)  # after login: skipped
        + server_info_frame()  # after login: skipped
    )
    core.receive_data(data)
    assert core.events_received() == [
        PacketReceived(peer, b"hello"),
        KeepAliveReceived(),
        PeerGoneReceived(peer, PeerGoneReason.NOT_HERE),
        PeerGoneReceived(peer, PeerGoneReason.DISCONNECTED),
        PeerGoneReceived(peer, 0x77),
        PeerPresentReceived(
            peer, ipaddress.IPv4Address("10.1.2.3"), 4242, PeerPresentFlags.IS_MESH_PEER
        ),
        PeerPresentReceived(peer, None, 0, PeerPresentFlags(0)),
        PeerPresentReceived(peer, ipaddress.IPv6Address("2001:db8::1"), 7, PeerPresentFlags(0)),
        PingReceived(b"12345678"),
        PongReceived(b"abcdefgh"),
        HealthReceived("dup key"),
        HealthReceived(""),
        ServerRestarting(1.5, 20.0),
    ]
    # The server Ping was answered with a Pong carrying the same bytes.
    assert core.data_to_send() == [frames.encode_pong(b"12345678")]


def test_ping_not_answered_without_can_ack_pings() -> None:
    core = open_core(can_ack_pings=False)
    core.receive_data(frames.encode_ping(b"12345678"))
    assert core.events_received() == [PingReceived(b"12345678")]
    assert core.data_to_send() == []


def test_short_frames_are_dropped_like_go() -> None:
    core = open_core()
    core.receive_data(
        frames.encode_frame(FrameType.RECV_PACKET, b"x" * 31)
        + frames.encode_frame(FrameType.PEER_GONE, b"x" * 31)
        + frames.encode_frame(FrameType.PEER_PRESENT, b"")
        + frames.encode_frame(FrameType.PING, b"1234567")
        + frames.encode_frame(FrameType.PONG, b"")
        + frames.encode_frame(FrameType.RESTARTING, b"1234")
        + frames.encode_recv_packet(bytes(32), b"zero key")
        + frames.encode_frame(FrameType.HEALTH, b"\xffbad utf8")
        + frames.encode_recv_packet(PEER_KEY.public.raw, b"")
    )
    assert core.events_received() == [
        HealthReceived("\ufffdbad utf8"),
        PacketReceived(PEER_KEY.public, b""),
    ]
    assert core.state is ClientState.OPEN


def test_oversized_frame_kills_the_connection() -> None:
    core = open_core()
    with pytest.raises(FrameError):
        core.receive_data(frames.encode_header(FrameType.RECV_PACKET, (1 << 20) + 1))
    assert core.state is ClientState.CLOSED
    with pytest.raises(ConnectionClosed):
        core.send_packet(PEER_KEY.public, b"x")


def test_send_commands_encode_frames() -> None:
    core = open_core()
    peer = PEER_KEY.public
    core.send_packet(peer, b"p")
    core.send_packet(peer.raw, b"")
    core.send_note_preferred(False)
    core.send_ping(b"pingping")
    core.send_watch_conns()
    core.send_close_peer(peer)
    core.send_forward_packet(CLIENT_KEY.public, peer, b"fwd")
    assert core.data_to_send() == [
        frames.encode_send_packet(peer.raw, b"p"),
        frames.encode_send_packet(peer.raw, b""),
        frames.encode_note_preferred(False),
        frames.encode_ping(b"pingping"),
        frames.encode_watch_conns(),
        frames.encode_close_peer(peer.raw),
        frames.encode_forward_packet(CLIENT_KEY.public.raw, peer.raw, b"fwd"),
    ]
    with pytest.raises(ValueError):
        core.send_packet(peer, b"x" * (frames.MAX_PACKET_SIZE + 1))
    with pytest.raises(ValueError):
        core.send_packet(b"short", b"x")


_SERVER_STREAM = login_bytes() + b"".join(
    [
        frames.encode_recv_packet(PEER_KEY.public.raw, b"one"),
        frames.encode_keep_alive(),
        frames.encode_frame(0x33, b"unknown"),
        frames.encode_ping(b"\x00" * 8),
        frames.encode_recv_packet(PEER_KEY.public.raw, bytes(range(256)) * 4),
        frames.encode_peer_gone(PEER_KEY.public.raw),
    ]
)


def _run_chunks(data: bytes, cuts: list[int]) -> tuple[list[Event], bytes]:
    core = ClientConnection(CLIENT_KEY, host="h")
    core.data_to_send()
    events: list[Event] = []
    out: list[bytes] = []
    prev = 0
    for cut in sorted(set(cuts)) + [len(data)]:
        core.receive_data(data[prev:cut])
        prev = cut
        events += core.events_received()
        out += core.data_to_send()
    # ClientInfo is sealed with a random nonce; compare everything after it.
    dec = frames.FrameDecoder()
    dec.feed(b"".join(out))
    rest = b"".join(frames.encode_frame(f.type, f.payload) for f in dec if f.type != 2)
    return events, rest


_REFERENCE = _run_chunks(_SERVER_STREAM, [])


@given(st.lists(st.integers(min_value=0, max_value=len(_SERVER_STREAM)), max_size=20))
def test_events_do_not_depend_on_chunking(cuts: list[int]) -> None:
    assert _run_chunks(_SERVER_STREAM, cuts) == _REFERENCE


def test_byte_at_a_time() -> None:
    assert _run_chunks(_SERVER_STREAM, list(range(len(_SERVER_STREAM)))) == _REFERENCE


@given(st.binary(max_size=300))
def test_garbage_after_login_is_events_or_protocol_error(garbage: bytes) -> None:
    core = open_core()
    try:
        core.receive_data(garbage)
    except FrameError:
        assert core.state is ClientState.CLOSED
    core.events_received()


_peer_raw = st.sampled_from([PEER_KEY.public.raw, CLIENT_KEY.public.raw])


def _frame_and_event(draw: st.DrawFn) -> tuple[bytes, Event | None]:
    kind = draw(st.integers(0, 6))
    if kind == 0:
        src, data = draw(_peer_raw), draw(st.binary(max_size=100))
        return frames.encode_recv_packet(src, data), PacketReceived(PublicKey(src), data)
    if kind == 1:
        peer, reason = draw(_peer_raw), draw(st.sampled_from(list(PeerGoneReason)))
        return frames.encode_peer_gone(peer, reason), PeerGoneReceived(PublicKey(peer), reason)
    if kind == 2:
        return frames.encode_keep_alive(), KeepAliveReceived()
    if kind == 3:
        data = draw(st.binary(min_size=8, max_size=8))
        return frames.encode_ping(data), PingReceived(data)
    if kind == 4:
        text = draw(st.text(max_size=20))
        return frames.encode_health(text), HealthReceived(text)
    if kind == 5:
        a, b = draw(st.integers(0, 2**32 - 1)), draw(st.integers(0, 2**32 - 1))
        return frames.encode_restarting(a, b), ServerRestarting(a / 1000, b / 1000)
    ftype = draw(st.integers(0x16, 0xFF))
    return frames.encode_frame(ftype, draw(st.binary(max_size=20))), None


@st.composite
def _server_streams(draw: st.DrawFn) -> tuple[list[tuple[bytes, Event | None]], list[int]]:
    pairs = [_frame_and_event(draw) for _ in range(draw(st.integers(0, 25)))]
    total = sum(len(f) for f, _ in pairs)
    cuts = draw(st.lists(st.integers(0, max(total, 0)), max_size=10))
    return pairs, cuts


@given(_server_streams())
def test_random_frame_sequences_map_to_events(
    case: tuple[list[tuple[bytes, Event | None]], list[int]],
) -> None:
    pairs, cuts = case
    core = open_core()
    data = b"".join(f for f, _ in pairs)
    prev = 0
    got: list[Event] = []
    for cut in [*sorted(set(cuts)), len(data)]:
        core.receive_data(data[prev:cut])
        prev = cut
        got += core.events_received()
    assert got == [ev for _, ev in pairs if ev is not None]
    pongs = [frames.encode_pong(ev.data) for _, ev in pairs if isinstance(ev, PingReceived)]
    assert core.data_to_send() == pongs
    assert core.state is ClientState.OPEN


def test_parse_derp_url() -> None:
    assert parse_derp_url("http://127.0.0.1:3340/derp") == (
        "http",
        "127.0.0.1",
        3340,
        "127.0.0.1:3340",
    )
    assert parse_derp_url("https://derp.example") == ("https", "derp.example", 443, "derp.example")
    assert parse_derp_url("http://[::1]:80")[1:3] == ("::1", 80)
    with pytest.raises(ValueError):
        parse_derp_url("ftp://x")
    with pytest.raises(ValueError):
        parse_derp_url("http:///derp")


# --------------------------------------------------------------------------- fake server


class FakeDerp:
    """A minimal DERP server for client tests (asyncio streams + derp.frames).

    It logs clients in, relays SendPacket between them, answers Pings, records
    NotePreferred, and lets the test inject frames (``send_to``) or go silent.
    Bad input closes only that one connection.
    """

    def __init__(self, key: PrivateKey = SERVER_KEY, *, port: int = 0, status: int = 101) -> None:
        self.key = key
        self.port = port
        self.status = status
        self.silent = False  # True: accept TCP, never answer
        self.answer_pings = True
        self.clients: dict[bytes, asyncio.StreamWriter] = {}
        self.infos: asyncio.Queue[tuple[PublicKey, dict[str, Any], str]] = asyncio.Queue()
        self.notes: asyncio.Queue[tuple[PublicKey, bool]] = asyncio.Queue()
        self.received: asyncio.Queue[tuple[PublicKey, frames.Frame]] = asyncio.Queue()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/derp"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for w in list(self._writers):
            w.transport.abort()
        await self._server.wait_closed()
        self.clients.clear()

    def send_to(self, key: PublicKey, frame: bytes) -> None:
        self.clients[key.raw].write(frame)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        key: bytes | None = None
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            if self.silent:
                await reader.read()
                return
            if self.status != 101:
                body = b"DERP requires connection upgrade"
                writer.write(
                    f"HTTP/1.1 {self.status} Upgrade Required\r\n"
                    f"Content-Length: {len(body)}\r\n\r\n".encode()
                    + body
                )
                await writer.drain()
                return
            writer.write(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n"
                b"Derp-Version: 2\r\nDerp-Public-Key: "
                + self.key.public.raw.hex().encode()
                + b"\r\n\r\n"
                + frames.encode_server_key(self.key.public.raw)
            )
            dec = frames.FrameDecoder()
            while True:
                chunk = await reader.read(65536)
                if not chunk:
                    return
                dec.feed(chunk)
                for ftype, payload in dec:
                    if key is None:
                        assert ftype == FrameType.CLIENT_INFO
                        client = PublicKey(payload[:32])
                        info = json.loads(open_sealed(self.key, client, payload[32:]))
                        key = client.raw
                        self.clients[key] = writer
                        writer.write(server_info_frame(self.key, client))
                        self.infos.put_nowait((client, info, head.decode()))
                        continue
                    src = PublicKey(key)
                    if ftype == FrameType.SEND_PACKET:
                        dst = self.clients.get(payload[:32])
                        if dst is not None:
                            dst.write(frames.encode_recv_packet(key, payload[32:]))
                    elif ftype == FrameType.PING and self.answer_pings:
                        writer.write(frames.encode_pong(payload[:8]))
                    elif ftype == FrameType.NOTE_PREFERRED:
                        self.notes.put_nowait((src, payload == b"\x01"))
                    else:
                        self.received.put_nowait((src, frames.Frame(ftype, payload)))
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            if key is not None and self.clients.get(key) is writer:
                del self.clients[key]
            self._writers.discard(writer)
            writer.transport.abort()


@pytest.fixture
async def fake() -> AsyncIterator[FakeDerp]:
    srv = FakeDerp()
    await srv.start()
    yield srv
    await srv.stop()


async def next_event(client: DerpClient, kind: type[T], timeout: float = WAIT) -> T:
    """Return the next event of type ``kind``, skipping keepalives."""

    async def loop() -> T:
        while True:
            ev = await client.recv()
            if isinstance(ev, kind):
                return ev
            assert isinstance(ev, KeepAliveReceived), f"unexpected event {ev!r}"

    return await within(loop(), timeout)


# --------------------------------------------------------------------------- DerpClient vs fake


async def test_fake_handshake_send_recv(fake: FakeDerp) -> None:
    a_key, b_key = PrivateKey.generate(), PrivateKey.generate()
    async with DerpClient(fake.url, a_key) as a, DerpClient(fake.url, b_key) as b:
        assert a.server_key == SERVER_KEY.public
        assert a.server_info == {"version": 2}
        infos = [await within(fake.infos.get()) for _ in range(2)]
        _client, info, head = infos[0]
        assert info == {"version": 2, "CanAckPings": True}
        assert head.startswith("GET /derp HTTP/1.1\r\n")
        assert f"Host: 127.0.0.1:{fake.port}\r\n" in head
        assert "Upgrade: DERP\r\n" in head and "Connection: Upgrade\r\n" in head
        await a.send(b_key.public, b"hello b")
        assert await next_event(b, PacketReceived) == PacketReceived(a_key.public, b"hello b")
        b.send_nowait(a_key.public.raw, b"x" * frames.MAX_PACKET_SIZE)
        ev = await next_event(a, PacketReceived)
        assert ev.src == b_key.public and len(ev.data) == frames.MAX_PACKET_SIZE


async def test_fake_ping_and_server_ping(fake: FakeDerp) -> None:
    async with DerpClient(fake.url, CLIENT_KEY) as c:
        rtt = await c.ping(timeout=WAIT)
        assert rtt >= 0.0
        fake.send_to(CLIENT_KEY.public, frames.encode_ping(b"srvping!"))
        assert await next_event(c, PingReceived) == PingReceived(b"srvping!")
        src, frame = await within(fake.received.get())
        assert src == CLIENT_KEY.public
        assert frame == frames.Frame(FrameType.PONG, b"srvping!")
        # An unsolicited Pong surfaces as an event.
        fake.send_to(CLIENT_KEY.public, frames.encode_pong(b"unasked!"))
        assert await next_event(c, PongReceived) == PongReceived(b"unasked!")


async def test_fake_note_preferred_and_mesh_helpers(fake: FakeDerp) -> None:
    mesh = bytes(range(32))
    async with DerpClient(fake.url, CLIENT_KEY, mesh_key=mesh, is_prober=True) as c:
        _client, info, _ = await within(fake.infos.get())
        assert info["meshKey"] == mesh.hex() and info["IsProber"] is True
        await c.note_preferred(True)
        assert await within(fake.notes.get()) == (CLIENT_KEY.public, True)
        await c.watch_conns()
        await c.close_peer(PEER_KEY.public)
        await c.forward_packet(PEER_KEY.public, CLIENT_KEY.public, b"fwd")
        got = [(await within(fake.received.get()))[1] for _ in range(3)]
        assert got == [
            frames.Frame(FrameType.WATCH_CONNS, b""),
            frames.Frame(FrameType.CLOSE_PEER, PEER_KEY.public.raw),
            frames.Frame(
                FrameType.FORWARD_PACKET, PEER_KEY.public.raw + CLIENT_KEY.public.raw + b"fwd"
            ),
        ]


async def test_fake_injected_events(fake: FakeDerp) -> None:
    async with DerpClient(fake.url, CLIENT_KEY) as c:
        fake.send_to(CLIENT_KEY.public, frames.encode_peer_gone(PEER_KEY.public.raw))
        fake.send_to(CLIENT_KEY.public, frames.encode_health("cloned key"))
        fake.send_to(CLIENT_KEY.public, frames.encode_keep_alive())
        assert await next_event(c, PeerGoneReceived) == PeerGoneReceived(
            PEER_KEY.public, PeerGoneReason.DISCONNECTED
        )
        assert await within(c.recv()) == HealthReceived("cloned key")
        assert await within(c.recv()) == KeepAliveReceived()


async def test_unconsumed_events_pause_reading_without_loss(fake: FakeDerp) -> None:
    count = 6000  # above the client's 4096-event pause threshold
    async with DerpClient(fake.url, CLIENT_KEY) as c:
        blob = b"".join(
            frames.encode_recv_packet(PEER_KEY.public.raw, i.to_bytes(4, "big"))
            for i in range(count)
        )
        fake.send_to(CLIENT_KEY.public, blob + frames.encode_health("end"))
        got = []
        while True:
            ev = await within(c.recv())
            if isinstance(ev, HealthReceived):
                break
            assert isinstance(ev, PacketReceived)
            got.append(int.from_bytes(ev.data, "big"))
        assert got == list(range(count))
        assert await within(c.ping()) >= 0.0  # reading resumed


async def test_non_101_status_is_a_clear_error() -> None:
    srv = FakeDerp(status=426)
    await srv.start()
    try:
        client = DerpClient(srv.url, CLIENT_KEY)
        with pytest.raises(HandshakeError, match="426 Upgrade Required"):
            await within(client.connect())
        await client.close()
    finally:
        await srv.stop()


async def test_connect_refused_raises_oserror(fake: FakeDerp) -> None:
    url = fake.url
    await fake.stop()
    client = DerpClient(url, CLIENT_KEY)
    with pytest.raises(OSError):
        await within(client.connect())
    await fake.start()  # same port again; the fixture stops it at the end
    await within(client.connect())  # a failed connect may be retried
    assert await within(client.ping()) >= 0.0
    await client.close()


async def test_connect_timeout() -> None:
    srv = FakeDerp()
    srv.silent = True
    await srv.start()
    try:
        client = DerpClient(srv.url, CLIENT_KEY, connect_timeout=0.2)
        with pytest.raises(TimeoutError):
            await within(client.connect())
    finally:
        await srv.stop()


async def test_read_timeout_kills_connection(fake: FakeDerp) -> None:
    client = DerpClient(fake.url, CLIENT_KEY, read_timeout=0.2)
    await within(client.connect())
    # The fake never sends keepalives, so the client gives up on its own.
    with pytest.raises(ConnectionClosed, match="no data from server"):
        await within(client.recv())
    with pytest.raises(ConnectionClosed):
        await client.send(PEER_KEY.public, b"x")
    await client.close()


async def test_server_drop_without_reconnect_ends_with_connection_closed(fake: FakeDerp) -> None:
    client = DerpClient(fake.url, CLIENT_KEY)
    await within(client.connect())
    fake.send_to(CLIENT_KEY.public, frames.encode_health("bye"))
    fake.clients[CLIENT_KEY.public.raw].close()
    # Events that arrived before the loss are still delivered, then the error.
    assert await within(client.recv()) == HealthReceived("bye")
    with pytest.raises(ConnectionClosed):
        async for _ev in client:
            pass
    await client.close()


async def test_malformed_server_frame_closes_only_that_client(fake: FakeDerp) -> None:
    a_key, b_key = PrivateKey.generate(), PrivateKey.generate()
    async with DerpClient(fake.url, a_key) as a, DerpClient(fake.url, b_key) as b:
        fake.send_to(a_key.public, frames.encode_header(FrameType.RECV_PACKET, 2 << 20))
        with pytest.raises(ConnectionClosed, match="protocol error"):
            await within(a.recv())
        await b.send(b_key.public, b"still fine")
        assert await next_event(b, PacketReceived) == PacketReceived(b_key.public, b"still fine")


async def test_close_is_idempotent_and_ends_iteration(fake: FakeDerp) -> None:
    client = DerpClient(fake.url, CLIENT_KEY)
    await within(client.connect())
    seen: list[Event] = []

    async def consume() -> None:
        async for ev in client:
            seen.append(ev)

    task = asyncio.create_task(consume())
    await within(client.ping())
    await within(client.close())
    await within(client.close())
    await within(task)  # the iterator ended without an error
    assert not client.connected
    with pytest.raises(ConnectionClosed):
        await client.send(PEER_KEY.public, b"x")
    with pytest.raises(ConnectionClosed):
        await client.recv()


async def test_close_fails_pending_ping(fake: FakeDerp) -> None:
    fake.answer_pings = False
    client = DerpClient(fake.url, CLIENT_KEY)
    await within(client.connect())
    ping = asyncio.create_task(client.ping(timeout=WAIT))
    _src, frame = await within(fake.received.get())  # the Ping reached the server
    assert frame.type == FrameType.PING
    await client.close()
    with pytest.raises(ConnectionClosed):
        await within(ping)


async def test_ping_times_out(fake: FakeDerp) -> None:
    fake.answer_pings = False
    async with DerpClient(fake.url, CLIENT_KEY) as client:
        with pytest.raises(TimeoutError):
            await within(client.ping(timeout=0.05))


async def test_reconnect_after_server_restart_on_same_port() -> None:
    srv = FakeDerp()
    await srv.start()
    client = DerpClient(srv.url, CLIENT_KEY, reconnect=True, backoff_min=0.01, backoff_max=0.2)
    try:
        await within(client.connect())
        assert await next_event(client, Connected) == Connected(SERVER_KEY.public)
        await client.note_preferred(True)
        assert await within(srv.notes.get()) == (CLIENT_KEY.public, True)
        await srv.stop()
        assert isinstance(await next_event(client, Disconnected), Disconnected)
        srv2 = FakeDerp(port=srv.port)
        await srv2.start()
        try:
            assert await next_event(client, Connected) == Connected(SERVER_KEY.public)
            # NotePreferred is re-sent on the new connection.
            assert await within(srv2.notes.get()) == (CLIENT_KEY.public, True)
            assert await within(client.ping()) >= 0.0
        finally:
            await client.close()
            await srv2.stop()
    finally:
        await client.close()


async def test_reconnect_honours_server_restarting() -> None:
    srv = FakeDerp()
    await srv.start()
    client = DerpClient(srv.url, CLIENT_KEY, reconnect=True, backoff_min=0.01, backoff_max=30.0)
    try:
        await within(client.connect())
        await next_event(client, Connected)
        srv.send_to(CLIENT_KEY.public, frames.encode_restarting(20, 30000))
        assert await next_event(client, ServerRestarting) == ServerRestarting(0.02, 30.0)
        await srv.stop()
        await next_event(client, Disconnected)
        # Several refused dials happen here; inside try_for they are retried every
        # backoff_min, so the client is back soon after the server returns.
        srv2 = FakeDerp(port=srv.port)
        await srv2.start()
        try:
            assert await next_event(client, Connected) == Connected(SERVER_KEY.public)
        finally:
            await client.close()
            await srv2.stop()
    finally:
        await client.close()


def test_client_runs_on_uvloop() -> None:
    import uvloop

    async def scenario() -> None:
        srv = FakeDerp()
        await srv.start()
        try:
            a_key, b_key = PrivateKey.generate(), PrivateKey.generate()
            async with DerpClient(srv.url, a_key) as a, DerpClient(srv.url, b_key) as b:
                assert await within(a.ping()) >= 0.0
                await a.send(b_key.public, b"via uvloop")
                assert await next_event(b, PacketReceived) == PacketReceived(
                    a_key.public, b"via uvloop"
                )
        finally:
            await srv.stop()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(scenario())


# --------------------------------------------------------------------------- DerpClient vs real server


def _real_server_factory() -> Callable[..., Any] | None:
    try:
        from derp.server import DerpServer, ServerConfig
    except ImportError:
        return None

    def make(**kw: Any) -> Any:
        return DerpServer(ServerConfig(private_key=SERVER_KEY, **kw))

    return make


@pytest.fixture
async def real() -> AsyncIterator[Any]:
    make = _real_server_factory()
    if make is None:
        pytest.skip("derp.server is not available yet")
    srv = make()
    await srv.start(host="127.0.0.1", port=0)
    yield srv
    await srv.stop()


def real_url(srv: Any, port: int | None = None) -> str:
    return f"http://127.0.0.1:{srv.port if port is None else port}/derp"


async def test_real_handshake_send_recv_ping(make_host: Any) -> None:
    real = await make_host(private_key=SERVER_KEY)  # two workers: a and b on different ones
    a_key, b_key = PrivateKey.generate(), PrivateKey.generate()
    async with DerpClient(real_url(real, real.next_port()), a_key) as a, DerpClient(
        real_url(real, real.next_port()), b_key
    ) as b:
        await within(real.synced())
        assert a.server_key == real.public_key
        assert a.server_info.get("version") == 2
        await a.note_preferred(True)
        # The server handles frames in order: once the Pong is back, NotePreferred was seen.
        assert await within(a.ping()) >= 0.0
        assert real.stats.current_home_connections == 1
        await a.send(b_key.public, b"to b")
        assert await next_event(b, PacketReceived) == PacketReceived(a_key.public, b"to b")
        await b.send(a_key.public, b"to a")
        assert await next_event(a, PacketReceived) == PacketReceived(b_key.public, b"to a")


async def test_real_peer_gone_when_sender_leaves(make_host: Any) -> None:
    real = await make_host(private_key=SERVER_KEY)
    a_key, b_key = PrivateKey.generate(), PrivateKey.generate()
    async with DerpClient(real_url(real, real.next_port()), b_key) as b:
        a = DerpClient(real_url(real, real.next_port()), a_key)
        await within(a.connect())
        await within(real.synced())
        await a.send(b_key.public, b"hi")
        assert await next_event(b, PacketReceived) == PacketReceived(a_key.public, b"hi")
        await a.close()
        assert await next_event(b, PeerGoneReceived) == PeerGoneReceived(
            a_key.public, PeerGoneReason.DISCONNECTED
        )


async def test_real_mesh_watch_conns_sees_peers_come_and_go(make_host: Any) -> None:
    mesh = bytes(range(32))
    srv = await make_host(private_key=SERVER_KEY, mesh_key=mesh)
    url = real_url(srv, srv.next_port())
    async with DerpClient(url, CLIENT_KEY, mesh_key=mesh, can_ack_pings=False) as watcher:
        await watcher.watch_conns()
        # The watcher is told about itself (already connected) first.
        ev = await next_event(watcher, PeerPresentReceived)
        assert ev.peer == CLIENT_KEY.public
        assert ev.flags & PeerPresentFlags.IS_MESH_PEER
        # Two workers: the peer connects to the other one.
        async with DerpClient(real_url(srv, srv.next_port()), PEER_KEY):
            ev = await next_event(watcher, PeerPresentReceived)
            assert ev.peer == PEER_KEY.public
            assert ev.ip == ipaddress.IPv4Address("127.0.0.1") and ev.port > 0
        ev2 = await next_event(watcher, PeerGoneReceived)
        assert ev2.peer == PEER_KEY.public


async def test_real_reconnect_after_restart_on_same_port(real: Any) -> None:
    make = _real_server_factory()
    assert make is not None
    port = real.port
    client = DerpClient(
        real_url(real), CLIENT_KEY, reconnect=True, backoff_min=0.01, backoff_max=0.2
    )
    try:
        await within(client.connect())
        await next_event(client, Connected)
        await client.note_preferred(True)
        await real.stop()
        await next_event(client, Disconnected)
        srv2 = make()
        await srv2.start(host="127.0.0.1", port=port)
        try:
            assert await next_event(client, Connected) == Connected(srv2.public_key)
            assert await within(client.ping()) >= 0.0
        finally:
            await client.close()
            await srv2.stop()
        await real.start(host="127.0.0.1", port=0)  # so the fixture can stop it
    finally:
        await client.close()


async def test_concurrent_recv_is_refused_not_silently_hung() -> None:
    """Events are for one consumer: a second concurrent recv() raises at once."""
    import asyncio as _asyncio

    from derp.client import DerpClient as _Client
    from derp.keys import PrivateKey as _Key
    from derp.server import DerpServer, ServerConfig

    srv = DerpServer(ServerConfig(private_key=_Key.generate()))
    await srv.start("127.0.0.1", 0)
    c = _Client(f"http://127.0.0.1:{srv.port}/derp", _Key.generate())
    try:
        await _asyncio.wait_for(c.connect(), 10)
        first = _asyncio.ensure_future(c.recv())
        await _asyncio.sleep(0)  # let the first consumer park
        with pytest.raises(RuntimeError, match="already"):
            await c.recv()
        first.cancel()
    finally:
        await c.close()
        await srv.stop()
