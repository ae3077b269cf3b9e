"""Sans-I/O DERP client core: :class:`ClientConnection` (no sockets, no clock).

Login flow (client side, spec §1.5/§2.1)::

    client                                              server
      | TCP connect (TLS for https)
      | GET /derp HTTP/1.1, Host, Upgrade: DERP, Connection: Upgrade
      |-------------------------------------------------->|
      |          HTTP/1.1 101 Switching Protocols ...      |   anything else: HandshakeError
      |          ServerKey   magic ‖ server key            |   must be the first frame
      |<--------------------------------------------------|
      | ClientInfo  client key ‖ nonce ‖ box(JSON)         |
      |-------------------------------------------------->|
      |          ServerInfo  nonce ‖ box(JSON)             |   must follow ServerKey
      |<--------------------------------------------------|
      | steady state: SendPacket / RecvPacket / KeepAlive / Ping / Pong / PeerGone ...
Feed bytes with :meth:`~ClientConnection.receive_data`, then collect
:meth:`~ClientConnection.events_received` and write
:meth:`~ClientConnection.data_to_send` to the network. The HTTP response head is
parsed with h11; bytes that arrive after the head are DERP bytes and go straight
into the frame decoder. The asyncio adapter lives in :mod:`derp.client.connection`.

Receive rules follow the Go client (``derp_client.go`` ``recvTimeout``): frames
larger than 1 MiB kill the connection; RecvPacket/PeerGone/PeerPresent shorter
than 32 bytes, Ping/Pong shorter than 8 bytes and Restarting shorter than 8 bytes
are dropped; ServerKey/ServerInfo after login and unknown types are skipped.
"""

from __future__ import annotations

import enum
import ipaddress
import json
import logging
import urllib.parse
from collections.abc import Callable
from typing import Any

import h11
import nacl.exceptions

from ..errors import ConnectionClosed, DerpError, HandshakeError, InvalidKeyError
from ..events import (
    Connected,
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
from ..frames import (
    KEY_LEN,
    MAGIC,
    MAX_CLIENT_FRAME_SIZE,
    MAX_SERVER_INFO_LEN,
    PROTOCOL_VERSION,
    FrameDecoder,
    FrameType,
    PeerGoneReason,
    PeerPresentFlags,
    decode_json_payload,
    encode_client_info,
    encode_close_peer,
    encode_forward_packet,
    encode_note_preferred,
    encode_ping,
    encode_pong,
    encode_send_packet,
    encode_watch_conns,
)
from ..keys import PrivateKey, PublicKey, open_sealed, seal

__all__ = [
    "CLIENT_READ_TIMEOUT",
    "ClientConnection",
    "ClientState",
    "parse_derp_url",
]

log = logging.getLogger("derp.client")

#: The Go client kills a connection that delivers no frame for this long (2x keepalive).
CLIENT_READ_TIMEOUT = 120.0

_MAX_SERVER_KEY_LEN = 1024
_PUBKEY_CACHE_MAX = 4096


def _raw_key(key: PublicKey | bytes, what: str) -> bytes:
    raw = key.raw if isinstance(key, PublicKey) else bytes(key)
    if len(raw) != KEY_LEN:
        raise ValueError(f"{what} must be {KEY_LEN} bytes, got {len(raw)}")
    return raw


def parse_derp_url(url: str) -> tuple[str, str, int, str]:
    """Split a DERP server URL into ``(scheme, host, port, host_header)``.

    Accepts ``http://host[:port][/derp]`` (default port 80) and ``https://...``
    (default 443), and ``ws://``/``wss://`` for DERP over WebSocket (same
    ports). The path is ignored: DERP always upgrades on ``/derp``.
    """
    u = urllib.parse.urlsplit(url)
    if u.scheme not in ("http", "https", "ws", "wss"):
        raise ValueError(f"unsupported DERP URL scheme {u.scheme!r} in {url!r}")
    if not u.hostname:
        raise ValueError(f"DERP URL {url!r} has no host")
    port = u.port if u.port is not None else (443 if u.scheme in ("https", "wss") else 80)
    return u.scheme, u.hostname, port, u.netloc.rsplit("@", 1)[-1]


# --------------------------------------------------------------------------- sans-I/O core


class ClientState(enum.Enum):
    """Login progress of a :class:`ClientConnection`.

    Transitions: ``HTTP -> SERVER_KEY -> SERVER_INFO -> OPEN``; any error or EOF
    moves to ``CLOSED``, which is final.
    """

    HTTP = "awaiting 101 response"
    SERVER_KEY = "awaiting ServerKey"
    SERVER_INFO = "awaiting ServerInfo"
    OPEN = "open"
    CLOSED = "closed"


class ClientConnection:
    """Sans-I/O DERP client connection (one TCP/TLS connection's worth of state).

    Caller obligations: right after construction, and after every call to
    :meth:`receive_data` or a ``send_*`` method, write :meth:`data_to_send` to the
    network and handle :meth:`events_received`. :meth:`receive_data` raises a
    :class:`~derp.errors.ProtocolError` (``HandshakeError`` or ``FrameError``)
    when the server breaks the protocol; the connection is then ``CLOSED`` and
    the caller closes the socket. Nothing else is raised for remote input.

    ``send_*`` methods may be called in any state but ``CLOSED``; before ``OPEN``
    the frames are queued behind the handshake like the Go client does (it does
    not wait for ServerInfo before sending).

    The first event after a successful login is always :class:`Connected`.
    """

    def __init__(
        self,
        private_key: PrivateKey,
        *,
        host: str,
        mesh_key: bytes | None = None,
        is_prober: bool = False,
        can_ack_pings: bool = True,
    ) -> None:
        if mesh_key is not None and len(mesh_key) != 32:
            raise ValueError(f"mesh key must be 32 bytes, got {len(mesh_key)}")
        self._key = private_key
        self._mesh_key = mesh_key
        self._is_prober = is_prober
        self.can_ack_pings = can_ack_pings
        self.state = ClientState.HTTP
        self.server_key: PublicKey | None = None
        #: Parsed ServerInfo JSON (``{"version": 2}`` from derper).
        self.server_info: dict[str, Any] = {}
        self._events: list[Event] = []
        self._out: list[bytes] = []
        # Frames the user sent before login finished; released after ClientInfo.
        self._early: list[bytes] = []
        self._decoder = FrameDecoder(MAX_SERVER_INFO_LEN)
        self._keys: dict[bytes, PublicKey] = {}
        self._http = h11.Connection(h11.CLIENT)
        headers = [("Host", host), ("Upgrade", "DERP"), ("Connection", "Upgrade")]
        self._out.append(
            self._http.send(h11.Request(method="GET", target="/derp", headers=headers)) or b""
        )
        self._out.append(self._http.send(h11.EndOfMessage()) or b"")
        self._host = host
        #: fast start: ServerKey frames in SERVER_INFO state are skipped
        self._fast = False
        self._handlers: dict[int, Callable[[bytes], Event | None]] = {
            FrameType.RECV_PACKET: self._handle_recv_packet,
            FrameType.KEEP_ALIVE: self._handle_keep_alive,
            FrameType.PEER_GONE: self._handle_peer_gone,
            FrameType.PEER_PRESENT: self._handle_peer_present,
            FrameType.PING: self._handle_ping,
            FrameType.PONG: self._handle_pong,
            FrameType.HEALTH: self._handle_health,
            FrameType.RESTARTING: self._handle_restarting,
        }

    # ------------------------------------------------------------------ transport modes

    def start_upgraded(self) -> None:
        """The transport is already upgraded (DERP over WebSocket, spec §2.3).

        Call before the first :meth:`data_to_send`: the HTTP request is
        dropped and the first thing expected is the ServerKey frame.
        """
        if self.state is not ClientState.HTTP:
            raise DerpError("start_upgraded() must be called before any I/O")
        self._out = []
        self.state = ClientState.SERVER_KEY

    def start_fast(self, server_key: PublicKey) -> None:
        """Fast start (spec §2.2): the server key came from the TLS meta-certificate.

        Call before the first :meth:`data_to_send`. The request carries
        ``Derp-Fast-Start: 1`` and goes out together with ClientInfo; no HTTP
        response is expected and the ServerKey frame the server still sends
        is skipped.
        """
        if self.state is not ClientState.HTTP:
            raise DerpError("start_fast() must be called before any I/O")
        http = h11.Connection(h11.CLIENT)
        headers = [
            ("Host", self._host),
            ("Upgrade", "DERP"),
            ("Connection", "Upgrade"),
            ("Derp-Fast-Start", "1"),
        ]
        self._out = [
            http.send(h11.Request(method="GET", target="/derp", headers=headers)) or b"",
            http.send(h11.EndOfMessage()) or b"",
        ]
        self._fast = True
        self._send_client_info(server_key)

    # ------------------------------------------------------------------ results

    @property
    def token_bucket(self) -> tuple[int, int] | None:
        """``(bytes_per_second, burst)`` if the server asked for send rate limiting."""
        rate = self.server_info.get("TokenBucketBytesPerSecond") or 0
        burst = self.server_info.get("TokenBucketBytesBurst") or 0
        if isinstance(rate, int) and isinstance(burst, int) and rate > 0:
            return rate, burst
        return None

    def events_received(self) -> list[Event]:
        """Return and clear the events produced since the last call."""
        ev, self._events = self._events, []
        return ev

    def data_to_send(self) -> list[bytes]:
        """Return and clear the byte chunks to write, in order."""
        out, self._out = self._out, []
        return out

    # ------------------------------------------------------------------ input

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Process bytes from the server. Raises ``ProtocolError`` on bad input.

        An empty chunk is a no-op (use :meth:`receive_eof` for end of stream)."""
        if self.state is ClientState.CLOSED or not data:
            return
        try:
            if self.state is ClientState.HTTP:
                data = self._receive_http(bytes(data))
                if self.state is ClientState.HTTP:
                    return
            if data:
                self._decoder.feed(data)
            self._process_frames()
        except DerpError:
            self.state = ClientState.CLOSED
            raise

    def receive_eof(self) -> None:
        """The server closed its side; the connection is over."""
        self.state = ClientState.CLOSED

    def _receive_http(self, data: bytes) -> bytes:
        http = self._http
        try:
            http.receive_data(data)
            while True:
                ev = http.next_event()
                if ev is h11.NEED_DATA:
                    return b""
                if isinstance(ev, h11.InformationalResponse) and ev.status_code == 101:
                    continue  # h11 now reports PAUSED with the DERP bytes as trailing data
                if ev is h11.PAUSED:
                    trailing, _closed = http.trailing_data
                    self.state = ClientState.SERVER_KEY
                    return bytes(trailing)
                if isinstance(ev, (h11.Response, h11.InformationalResponse)):
                    line = (
                        f"HTTP/{ev.http_version.decode('ascii', 'replace')} "
                        f"{ev.status_code} {ev.reason.decode('latin-1')}"
                    ).rstrip()
                    raise HandshakeError(f"DERP upgrade failed: server answered {line!r}")
                if isinstance(ev, h11.ConnectionClosed):
                    raise HandshakeError("server closed the connection before answering")
                raise HandshakeError(f"unexpected HTTP event {type(ev).__name__}")
        except h11.RemoteProtocolError as exc:
            raise HandshakeError(f"malformed HTTP response: {exc}") from None

    def _process_frames(self) -> None:
        decoder = self._decoder
        handlers = self._handlers
        events = self._events
        while True:
            frame = decoder.next_frame()  # raises FrameError on an oversized frame
            if frame is None:
                return
            ftype, payload = frame
            if self.state is ClientState.OPEN:
                handler = handlers.get(ftype)
                if handler is not None:
                    ev = handler(payload)
                    if ev is not None:
                        events.append(ev)
                # ServerKey, ServerInfo after login, unknown types: skipped.
            elif self.state is ClientState.SERVER_KEY:
                self._handle_server_key(ftype, payload)
            elif self.state is ClientState.SERVER_INFO:
                self._handle_server_info(ftype, payload)
            else:  # CLOSED by a handler
                return

    # ------------------------------------------------------------------ login

    def _handle_server_key(self, ftype: int, payload: bytes) -> None:
        n = len(payload)
        if ftype != FrameType.SERVER_KEY:
            raise HandshakeError(f"first frame is type 0x{ftype:02x}, want ServerKey")
        if not 40 <= n <= _MAX_SERVER_KEY_LEN:
            raise HandshakeError(f"ServerKey frame of {n} bytes, want 40..1024")
        if payload[:8] != MAGIC:
            raise HandshakeError("ServerKey frame has a bad magic")
        try:
            server_key = PublicKey(payload[8:40])
        except InvalidKeyError as exc:
            raise HandshakeError(f"bad server key: {exc}") from None
        self._send_client_info(server_key)

    def _send_client_info(self, server_key: PublicKey) -> None:
        self.server_key = server_key
        info: dict[str, Any] = {}
        if self._mesh_key is not None:
            info["meshKey"] = self._mesh_key.hex()
        info["version"] = PROTOCOL_VERSION
        info["CanAckPings"] = self.can_ack_pings
        if self._is_prober:
            info["IsProber"] = True
        blob = json.dumps(info, separators=(",", ":")).encode()
        self._out.append(
            encode_client_info(self._key.public.raw, seal(self._key, self.server_key, blob))
        )
        if self._early:
            self._out.extend(self._early)
            self._early = []
        self.state = ClientState.SERVER_INFO

    def _handle_server_info(self, ftype: int, payload: bytes) -> None:
        assert self.server_key is not None
        n = len(payload)
        if ftype == FrameType.SERVER_KEY and self._fast:
            return  # fast start: the key came from the TLS meta-certificate
        if ftype != FrameType.SERVER_INFO:
            raise HandshakeError(f"frame type 0x{ftype:02x} after ServerKey, want ServerInfo")
        if not 24 <= n <= MAX_SERVER_INFO_LEN:
            raise HandshakeError(f"ServerInfo frame of {n} bytes, want 24..24+1MiB")
        try:
            blob = open_sealed(self._key, self.server_key, payload)
        except nacl.exceptions.CryptoError:
            raise HandshakeError("ServerInfo box does not open with the server key") from None
        try:
            info = decode_json_payload(blob)
        except ValueError as exc:
            raise HandshakeError(f"ServerInfo is not JSON: {exc}") from None
        if not isinstance(info, dict):
            raise HandshakeError("ServerInfo JSON is not an object")
        self.server_info = info
        self._decoder.max_frame_size = MAX_CLIENT_FRAME_SIZE
        self.state = ClientState.OPEN
        self._events.append(Connected(self.server_key))

    # ------------------------------------------------------------------ steady state

    def _pubkey(self, raw: bytes) -> PublicKey | None:
        key = self._keys.get(raw)
        if key is None:
            try:
                key = PublicKey(raw)
            except InvalidKeyError:
                log.debug("dropping frame naming an all-zero key")
                return None
            if len(self._keys) >= _PUBKEY_CACHE_MAX:
                self._keys.clear()
            self._keys[raw] = key
        return key

    def _handle_recv_packet(self, payload: bytes) -> Event | None:
        if len(payload) < KEY_LEN:
            return None
        src = self._pubkey(payload[:KEY_LEN])
        return None if src is None else PacketReceived(src, payload[KEY_LEN:])

    def _handle_keep_alive(self, payload: bytes) -> Event | None:
        return KeepAliveReceived()

    def _handle_peer_gone(self, payload: bytes) -> Event | None:
        if len(payload) < KEY_LEN:
            return None
        peer = self._pubkey(payload[:KEY_LEN])
        if peer is None:
            return None
        reason: PeerGoneReason | int = PeerGoneReason.DISCONNECTED
        if len(payload) > KEY_LEN:
            try:
                reason = PeerGoneReason(payload[KEY_LEN])
            except ValueError:
                reason = payload[KEY_LEN]
        return PeerGoneReceived(peer, reason)

    def _handle_peer_present(self, payload: bytes) -> Event | None:
        n = len(payload)
        if n < KEY_LEN:
            return None
        peer = self._pubkey(payload[:KEY_LEN])
        if peer is None:
            return None
        ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None
        port = 0
        if n >= 50:
            raw_ip = payload[32:48]
            port = int.from_bytes(payload[48:50], "big")
            if raw_ip != bytes(16):
                v6 = ipaddress.IPv6Address(raw_ip)
                ip = v6.ipv4_mapped or v6
        flags = PeerPresentFlags(payload[50]) if n >= 51 else PeerPresentFlags(0)
        return PeerPresentReceived(peer, ip, port, flags)

    def _handle_ping(self, payload: bytes) -> Event | None:
        if len(payload) < 8:
            return None
        data = payload[:8]
        if self.can_ack_pings:
            self._out.append(encode_pong(data))
        return PingReceived(data)

    def _handle_pong(self, payload: bytes) -> Event | None:
        if len(payload) < 8:
            return None
        return PongReceived(payload[:8])

    def _handle_health(self, payload: bytes) -> Event | None:
        return HealthReceived(payload.decode("utf-8", "replace"))

    def _handle_restarting(self, payload: bytes) -> Event | None:
        if len(payload) < 8:
            return None
        reconnect_ms = int.from_bytes(payload[0:4], "big")
        try_ms = int.from_bytes(payload[4:8], "big")
        return ServerRestarting(reconnect_ms / 1000.0, try_ms / 1000.0)

    # ------------------------------------------------------------------ output

    def _queue(self, frame: bytes) -> None:
        state = self.state
        if state is ClientState.OPEN or state is ClientState.SERVER_INFO:
            self._out.append(frame)
        elif state is ClientState.CLOSED:
            raise ConnectionClosed("connection is closed")
        else:
            self._early.append(frame)

    def send_packet(self, dst: PublicKey | bytes, packet: bytes) -> None:
        """Queue a SendPacket (``packet`` at most 64 KiB; ``ValueError`` otherwise)."""
        self._queue(encode_send_packet(_raw_key(dst, "destination key"), packet))

    def send_note_preferred(self, preferred: bool) -> None:
        """Queue NotePreferred: whether this server is the client's home."""
        self._queue(encode_note_preferred(preferred))

    def send_ping(self, data: bytes) -> None:
        """Queue a Ping carrying 8 opaque bytes."""
        self._queue(encode_ping(data))

    def send_pong(self, data: bytes) -> None:
        """Queue a Pong answering a server Ping (done automatically when ``can_ack_pings``)."""
        self._queue(encode_pong(data))

    def send_watch_conns(self) -> None:
        """Queue WatchConns (mesh key required; the server closes us otherwise)."""
        self._queue(encode_watch_conns())

    def send_close_peer(self, peer: PublicKey | bytes) -> None:
        """Queue ClosePeer for ``peer`` (mesh key required)."""
        self._queue(encode_close_peer(_raw_key(peer, "peer key")))

    def send_forward_packet(
        self, src: PublicKey | bytes, dst: PublicKey | bytes, packet: bytes
    ) -> None:
        """Queue ForwardPacket ``src -> dst`` (mesh key required)."""
        self._queue(
            encode_forward_packet(
                _raw_key(src, "source key"), _raw_key(dst, "destination key"), packet
            )
        )
