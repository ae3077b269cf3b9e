"""Tailnet RPC over WebSocket: the frame codec (pure) and a small asyncio client.

Why: Coder carries its RPCs over one WebSocket (yamux + DRPC). We keep the
"many concurrent RPCs on one socket" property with a much simpler framing that
a third party can implement in an afternoon.

Framing (normative)
-------------------
Every **binary** WebSocket message carries exactly one frame; text messages are
a protocol error. A frame is::

    offset  size  field
    0       1     kind        (see below)
    1       4     stream id   unsigned 32-bit big-endian, never 0
    5       n     payload     (n = message length - 5, may be 0)

Kinds:

=====  ==========  =========  =========================================================
kind   name        direction  payload
=====  ==========  =========  =========================================================
0x01   OPEN        c → s      UTF-8 method path, e.g. ``/coder.tailnet.v2.Tailnet/Coordinate``
0x02   MESSAGE     both       one protobuf message (standard binary encoding)
0x03   CLOSE_SEND  c → s      empty: the client sends no more MESSAGEs on this stream
0x04   END         s → c      uint32 BE status code ‖ UTF-8 message: the stream is over
0x05   CANCEL      c → s      empty: the client abandons the stream
=====  ==========  =========  =========================================================

Rules:

* Only the client opens streams. Stream ids are chosen by the client, must be
  unique for the life of the connection (use 1, 2, 3, …) and non-zero.
* Unary-request methods (StreamDERPMaps, RefreshResumeToken, PostTelemetry,
  WorkspaceUpdates): the client sends OPEN, one MESSAGE with the request, then
  CLOSE_SEND. The server answers with MESSAGE(s) and then END.
  ``Coordinate`` is bidirectional: the client sends any number of MESSAGEs and
  CLOSE_SEND when done; the server sends MESSAGEs and END.
* END status codes are gRPC's numeric codes (:class:`StatusCode`): 0 OK,
  3 INVALID_ARGUMENT, 7 PERMISSION_DENIED, 9 FAILED_PRECONDITION,
  12 UNIMPLEMENTED (unknown method: message ``"unknown rpc: <path>"``),
  13 INTERNAL, 14 UNAVAILABLE, 16 UNAUTHENTICATED. After END the server sends
  nothing more on that stream; frames the client sends on it are ignored.
* After CANCEL the server stops the stream and sends nothing more on it.
* A frame the receiver cannot parse (shorter than 5 bytes, unknown kind,
  stream id 0, OPEN for an id already used, OPEN with an empty or non-UTF-8
  method, a text message) is a connection-level protocol error: the server
  closes the WebSocket with code 1002 and a reason. A MESSAGE whose protobuf
  does not parse ends only that stream with INVALID_ARGUMENT.
* Identity is per connection, established by the HTTP upgrade (token, version,
  resume token, agent id); the 101 response carries ``Tailnet-Peer-Id: <uuid>``
  (the coordinator peer ID the server assigned) and ``Tailnet-Version``.
  ``RefreshResumeToken`` issues a token for that peer ID.
* Keepalive: the server sends WebSocket pings; clients answer with pongs (every
  WebSocket library does this automatically). On shutdown the server closes
  with 1001 (going away).

Errors never carry exception text: messages are the service's client-safe texts.
"""

from __future__ import annotations

import asyncio
import enum
import struct
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Final, TypeVar

from google.protobuf.message import DecodeError, Message

from tailnet.v2 import tailnet_pb2 as pb

__all__ = [
    "SERVICE_PREFIX",
    "METHOD_COORDINATE",
    "METHOD_STREAM_DERP_MAPS",
    "METHOD_REFRESH_RESUME_TOKEN",
    "METHOD_POST_TELEMETRY",
    "METHOD_WORKSPACE_UPDATES",
    "HEADER_PEER_ID",
    "HEADER_VERSION",
    "HEADER_LEN",
    "FrameKind",
    "StatusCode",
    "Frame",
    "FrameError",
    "encode_frame",
    "decode_frame",
    "encode_open",
    "encode_message",
    "encode_close_send",
    "encode_cancel",
    "encode_end",
    "decode_end",
    "RpcError",
    "HandshakeRejected",
    "RpcStream",
    "WsRpcClient",
    "parse_message",
]

SERVICE_PREFIX: Final = "/coder.tailnet.v2.Tailnet/"
METHOD_COORDINATE: Final = SERVICE_PREFIX + "Coordinate"
METHOD_STREAM_DERP_MAPS: Final = SERVICE_PREFIX + "StreamDERPMaps"
METHOD_REFRESH_RESUME_TOKEN: Final = SERVICE_PREFIX + "RefreshResumeToken"
METHOD_POST_TELEMETRY: Final = SERVICE_PREFIX + "PostTelemetry"
METHOD_WORKSPACE_UPDATES: Final = SERVICE_PREFIX + "WorkspaceUpdates"

#: 101 response header naming the peer ID the server assigned to this connection.
HEADER_PEER_ID: Final = "Tailnet-Peer-Id"
#: 101 response header with the negotiated API version (``"2.x"``).
HEADER_VERSION: Final = "Tailnet-Version"

HEADER_LEN: Final = 5
_HEAD = struct.Struct(">BI")
_CODE = struct.Struct(">I")


class FrameKind(enum.IntEnum):
    OPEN = 0x01
    MESSAGE = 0x02
    CLOSE_SEND = 0x03
    END = 0x04
    CANCEL = 0x05


class StatusCode(enum.IntEnum):
    """gRPC numeric status codes (names equal ``grpc.StatusCode`` members)."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


@dataclass(frozen=True, slots=True)
class Frame:
    """One decoded frame."""

    kind: FrameKind
    stream_id: int
    payload: bytes


class FrameError(ValueError):
    """A frame violates the framing rules (connection-level protocol error)."""


def encode_frame(kind: FrameKind, stream_id: int, payload: bytes = b"") -> bytes:
    """Serialize one frame (one WebSocket binary message)."""
    if not 0 < stream_id < 2**32:
        raise FrameError(f"stream id must be in 1..2**32-1, got {stream_id}")
    return _HEAD.pack(kind, stream_id) + payload


def decode_frame(data: bytes | bytearray | memoryview) -> Frame:
    """Parse one WebSocket message; raises :class:`FrameError` on malformed input."""
    raw = bytes(data)
    if len(raw) < HEADER_LEN:
        raise FrameError(f"frame too short: {len(raw)} bytes, need at least {HEADER_LEN}")
    kind_byte, stream_id = _HEAD.unpack_from(raw)
    try:
        kind = FrameKind(kind_byte)
    except ValueError:
        raise FrameError(f"unknown frame kind 0x{kind_byte:02x}") from None
    if stream_id == 0:
        raise FrameError("stream id 0 is reserved")
    payload = raw[HEADER_LEN:]
    if kind is FrameKind.OPEN:
        try:
            method = payload.decode("utf-8")
        except UnicodeDecodeError:
            raise FrameError("OPEN method is not valid UTF-8") from None
        if not method:
            raise FrameError("OPEN without a method")
    return Frame(kind, stream_id, payload)


def encode_open(stream_id: int, method: str) -> bytes:
    return encode_frame(FrameKind.OPEN, stream_id, method.encode("utf-8"))


def encode_message(stream_id: int, message: Message | bytes) -> bytes:
    data = message if isinstance(message, bytes) else message.SerializeToString()
    return encode_frame(FrameKind.MESSAGE, stream_id, data)


def encode_close_send(stream_id: int) -> bytes:
    return encode_frame(FrameKind.CLOSE_SEND, stream_id)


def encode_cancel(stream_id: int) -> bytes:
    return encode_frame(FrameKind.CANCEL, stream_id)


def encode_end(stream_id: int, code: int, message: str = "") -> bytes:
    return encode_frame(FrameKind.END, stream_id, _CODE.pack(code) + message.encode("utf-8"))


def decode_end(payload: bytes) -> tuple[int, str]:
    """``(code, message)`` of an END payload; raises :class:`FrameError` if short."""
    if len(payload) < 4:
        raise FrameError(f"END payload too short: {len(payload)} bytes")
    (code,) = _CODE.unpack_from(payload)
    return code, payload[4:].decode("utf-8", errors="replace")


# ----------------------------------------------------------------------------- client


class RpcError(Exception):
    """A stream ended with a non-OK status."""

    def __init__(self, code: int, message: str) -> None:
        self.code = code
        self.message = message
        try:
            name = StatusCode(code).name
        except ValueError:
            name = str(code)
        super().__init__(f"{name}: {message}")


class HandshakeRejected(Exception):
    """The server refused the WebSocket upgrade with an HTTP error (JSON body)."""

    def __init__(self, status: int, body: Mapping[str, object]) -> None:
        self.status = status
        self.body = dict(body)
        super().__init__(f"HTTP {status}: {self.body.get('message', '')}")

    @property
    def validation_fields(self) -> list[str]:
        vals = self.body.get("validations") or []
        if not isinstance(vals, list):
            return []
        return [str(v.get("field", "")) for v in vals if isinstance(v, dict)]


_M = TypeVar("_M", bound=Message)
_END: Final = object()


class RpcStream:
    """Client side of one RPC stream (see :meth:`WsRpcClient.open`)."""

    def __init__(self, client: WsRpcClient, stream_id: int, method: str) -> None:
        self._client = client
        self.stream_id = stream_id
        self.method = method
        self._inbox: asyncio.Queue[bytes | object] = asyncio.Queue()
        self.code: int | None = None
        self.message = ""

    async def send(self, message: Message | bytes) -> None:
        await self._client._send(encode_message(self.stream_id, message))

    async def close_send(self) -> None:
        await self._client._send(encode_close_send(self.stream_id))

    async def cancel(self) -> None:
        self._client._streams.pop(self.stream_id, None)
        await self._client._send(encode_cancel(self.stream_id))

    async def recv_bytes(self) -> bytes | None:
        """Next MESSAGE payload; ``None`` after END OK; raises :class:`RpcError` otherwise."""
        item = await self._inbox.get()
        if item is _END:
            self._inbox.put_nowait(_END)  # later calls see the end again
            if self.code not in (None, StatusCode.OK):
                raise RpcError(self.code or 0, self.message)
            return None
        assert isinstance(item, bytes)
        return item

    async def recv(self, cls: type[_M]) -> _M | None:
        """Next message parsed as ``cls`` (``None`` at a clean end)."""
        data = await self.recv_bytes()
        if data is None:
            return None
        return cls.FromString(data)

    async def iter(self, cls: type[_M]) -> AsyncIterator[_M]:
        """Messages until END (raises :class:`RpcError` on an error END)."""
        while True:
            msg = await self.recv(cls)
            if msg is None:
                return
            yield msg

    def _deliver(self, frame: Frame) -> None:
        if frame.kind is FrameKind.MESSAGE:
            self._inbox.put_nowait(frame.payload)
        elif frame.kind is FrameKind.END:
            try:
                self.code, self.message = decode_end(frame.payload)
            except FrameError:
                self.code, self.message = StatusCode.INTERNAL, "malformed END frame"
            self._inbox.put_nowait(_END)

    def _lost(self, reason: str) -> None:
        if self.code is None:
            self.code, self.message = StatusCode.UNAVAILABLE, reason
            self._inbox.put_nowait(_END)


class WsRpcClient:
    """A minimal asyncio client for the framing above (any event loop).

    Usage::

        client = await WsRpcClient.connect(
            "ws://127.0.0.1:3000/api/v2/workspaceagents/<id>/coordinate?version=2.3", token)
        coord = await client.open(METHOD_COORDINATE)
        await coord.send(pb.CoordinateRequest(...))
        resp = await coord.recv(pb.CoordinateResponse)
        ...
        await client.close()

    Raises :class:`HandshakeRejected` (with the JSON error body) when the server
    refuses the upgrade. Uses the ``websockets`` asyncio client.
    """

    def __init__(self, ws: object, peer_id: str | None, version: str | None) -> None:
        from websockets.asyncio.client import ClientConnection

        assert isinstance(ws, ClientConnection)
        self._ws = ws
        self.peer_id = peer_id
        self.version = version
        self._next_id = 1
        self._streams: dict[int, RpcStream] = {}
        self._reader = asyncio.ensure_future(self._read_loop())
        self.close_code: int | None = None
        self.close_reason = ""
        self.closed = asyncio.Event()

    @classmethod
    async def connect(
        cls,
        url: str,
        token: str | None = None,
        *,
        headers: Mapping[str, str] | None = None,
        open_timeout: float = 10.0,
    ) -> WsRpcClient:
        import json

        from websockets.asyncio.client import connect
        from websockets.exceptions import InvalidStatus

        hdrs = dict(headers or {})
        if token is not None:
            hdrs["Coder-Session-Token"] = token
        try:
            ws = await connect(
                url,
                additional_headers=hdrs,
                max_size=4 << 20,
                open_timeout=open_timeout,
                compression=None,
                ping_interval=None,
            )
        except InvalidStatus as exc:
            resp = exc.response
            try:
                body = json.loads(resp.body or b"{}")
            except ValueError:
                body = {"message": (resp.body or b"").decode("utf-8", "replace")}
            raise HandshakeRejected(
                resp.status_code, body if isinstance(body, dict) else {}
            ) from None
        resp_headers = ws.response.headers if ws.response is not None else {}
        return cls(ws, resp_headers.get(HEADER_PEER_ID), resp_headers.get(HEADER_VERSION))

    async def open(self, method: str) -> RpcStream:
        """Open a stream for ``method`` (a full path such as :data:`METHOD_COORDINATE`)."""
        sid = self._next_id
        self._next_id += 1
        stream = RpcStream(self, sid, method)
        self._streams[sid] = stream
        await self._send(encode_open(sid, method))
        return stream

    async def unary(self, method: str, request: Message, cls: type[_M]) -> _M:
        """OPEN, MESSAGE, CLOSE_SEND, then exactly one response."""
        stream = await self.open(method)
        await stream.send(request)
        await stream.close_send()
        resp = await stream.recv(cls)
        if resp is None:
            raise RpcError(StatusCode.INTERNAL, "stream ended without a response")
        return resp

    async def server_stream(self, method: str, request: Message) -> RpcStream:
        """OPEN, MESSAGE, CLOSE_SEND; read the responses from the returned stream."""
        stream = await self.open(method)
        await stream.send(request)
        await stream.close_send()
        return stream

    async def coordinate(self) -> RpcStream:
        return await self.open(METHOD_COORDINATE)

    async def stream_derp_maps(self) -> RpcStream:
        return await self.server_stream(METHOD_STREAM_DERP_MAPS, pb.StreamDERPMapsRequest())

    async def refresh_resume_token(self) -> pb.RefreshResumeTokenResponse:
        return await self.unary(
            METHOD_REFRESH_RESUME_TOKEN,
            pb.RefreshResumeTokenRequest(),
            pb.RefreshResumeTokenResponse,
        )

    async def post_telemetry(self, req: pb.TelemetryRequest) -> pb.TelemetryResponse:
        return await self.unary(METHOD_POST_TELEMETRY, req, pb.TelemetryResponse)

    async def workspace_updates(self, req: pb.WorkspaceUpdatesRequest) -> RpcStream:
        return await self.server_stream(METHOD_WORKSPACE_UPDATES, req)

    async def send_raw(self, data: bytes | str) -> None:
        """Send an arbitrary WebSocket message (tests of the server's error handling)."""
        await self._ws.send(data)

    async def close(self) -> None:
        await self._ws.close()
        self._reader.cancel()
        try:
            await self._reader
        except asyncio.CancelledError:
            pass
        self._finish("client closed")

    async def _send(self, data: bytes) -> None:
        await self._ws.send(data)

    def _finish(self, reason: str) -> None:
        for stream in list(self._streams.values()):
            stream._lost(reason)
        self._streams.clear()
        self.closed.set()

    async def _read_loop(self) -> None:
        from websockets.exceptions import ConnectionClosed

        try:
            async for msg in self._ws:
                if isinstance(msg, str):
                    continue
                try:
                    frame = decode_frame(msg)
                except FrameError:
                    continue
                stream = self._streams.get(frame.stream_id)
                if stream is None:
                    continue
                stream._deliver(frame)
                if frame.kind is FrameKind.END:
                    self._streams.pop(frame.stream_id, None)
        except ConnectionClosed:
            pass
        finally:
            self.close_code = self._ws.close_code
            self.close_reason = self._ws.close_reason or ""
            self._finish(f"connection closed ({self.close_code} {self.close_reason})")


def parse_message(cls: type[_M], data: bytes) -> _M:
    """Parse protobuf ``data`` as ``cls``; raises ``ValueError`` if malformed."""
    try:
        return cls.FromString(data)
    except DecodeError as exc:
        raise ValueError(f"malformed {cls.__name__}: {exc}") from None
