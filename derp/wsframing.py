"""RFC 6455 framing for DERP over WebSocket, sans-I/O (no handshake, no asyncio).

DERP over WebSocket is a byte stream carried in binary messages (spec §2.3):
message boundaries mean nothing, so the receiving side only needs the payload
bytes, in order. :class:`WsFramer` is built for that and for clients that
send one message per packet (Tailscale's and Coder's Go clients do): one
:meth:`~WsFramer.receive_data` call parses every complete frame of a read in
one loop and returns the binary payload bytes of all of them as one ``bytes``.

Frame layout (RFC 6455 §5.2)::

    byte 0: FIN(1) RSV1-3(3) opcode(4)     byte 1: MASK(1) len(7)
    len 126: + 16-bit length;  len 127: + 64-bit length (top bit 0)
    MASK: + 4-byte masking key, payload XOR key (client → server only)

Rules enforced on what the peer sends (failures close with the code shown):

* the mask bit must match the side (masked towards a server, unmasked towards
  a client), RSV bits must be 0 (no extension is ever negotiated), the opcode
  must be known, control frames must have FIN and ≤ 125 bytes, continuation
  frames only inside a fragmented message and data frames only outside one,
  a 64-bit length must have its top bit clear: 1002 (protocol error);
* a text message: 1003 (DERP needs binary data);
* a message over ``max_message`` bytes: 1009, decided on the frame header,
  so an oversized frame is never buffered;
* a close frame with a 1-byte body or an invalid code: 1002; a reason that
  is not UTF-8: 1007.

Control frames: a ping is answered with a pong carrying the same payload; a
pong is ignored; the peer's close frame is answered with a close frame
carrying its code (RFC 6455 §5.5.1), after which the state is ``CLOSED``
and further input is ignored. Outgoing binary data is cut into messages of at
most ``max_send`` bytes (Go's WebSocket libraries refuse messages over 32 KiB
by default, closing with 1009); the cut may fall anywhere, even inside a DERP
frame, because the stream is reassembled on the other side.

Masking uses ``websockets``' C ``apply_mask`` when available. Client masking
keys come from ``os.urandom`` (RFC 6455 §5.3: unpredictable).

Caller's obligations, h11/websockets style: after :meth:`receive_data` or
:meth:`receive_eof`, send :meth:`data_to_send` to the network; when
:attr:`state` is ``CLOSED`` after that, close the TCP connection (a server
closes first, RFC 6455 §7.1.1). :attr:`error` says why a connection was
failed (empty if the peer closed it or it is still open).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from typing import Final

try:
    from websockets.speedups import apply_mask as _apply_mask
except ImportError:  # pragma: no cover - pure-Python build of websockets
    from websockets.utils import apply_mask as _apply_mask

from .frames import HEADER_LEN, MAX_CLIENT_INFO_LEN

__all__ = [
    "CLOSED",
    "CLOSING",
    "MAX_MESSAGE_SIZE",
    "MAX_SEND_MESSAGE",
    "OPEN",
    "WsFramer",
    "apply_mask",
    "encode_frame",
]

#: Largest WebSocket message accepted: a ClientInfo of the maximal size, or several
#: 64 KiB packets in one flush.
MAX_MESSAGE_SIZE: Final = MAX_CLIENT_INFO_LEN + HEADER_LEN + 59
#: Largest WebSocket message sent: Go's default read limit.
MAX_SEND_MESSAGE: Final = 32 * 1024

OPEN, CLOSING, CLOSED = 0, 1, 2

apply_mask: Callable[[bytes, bytes], bytes] = _apply_mask

_OP_CONT, _OP_TEXT, _OP_BINARY, _OP_CLOSE, _OP_PING, _OP_PONG = 0, 1, 2, 8, 9, 10
_FIN = 0x80
_MASK = 0x80
_H16 = struct.Struct(">BBH")
_H64 = struct.Struct(">BBQ")
_U16 = struct.Struct(">H")
_u16_from = _U16.unpack_from
_u64_from = struct.Struct(">Q").unpack_from
_masked16 = struct.Struct(">BBH4s").unpack_from
_CLOSE_CODES_OK = frozenset(range(1000, 1004)) | frozenset(range(1007, 1015))


def _header(b0: int, n: int, mask_bit: int) -> bytes:
    if n < 126:
        return bytes((b0, mask_bit | n))
    if n < 65536:
        return _H16.pack(b0, mask_bit | 126, n)
    return _H64.pack(b0, mask_bit | 127, n)


def encode_frame(opcode: int, payload: bytes, *, mask: bool, fin: bool = True) -> bytes:
    """One frame (with a random masking key if ``mask``); for control frames and tests."""
    b0 = (_FIN if fin else 0) | opcode
    if not mask:
        return _header(b0, len(payload), 0) + payload
    key = os.urandom(4)
    return _header(b0, len(payload), _MASK) + key + apply_mask(payload, key)


class WsFramer:
    """One side of a WebSocket connection after the handshake; see the module docstring.

    ``client=True``: frames sent are masked, frames received must not be;
    the server side is the reverse.
    """

    __slots__ = (
        "client",
        "max_message",
        "max_send",
        "state",
        "error",
        "close_code",
        "close_rcvd",
        "_out",
        "_buf",
        "_need",
        "_msg_len",
        "_in_msg",
    )

    def __init__(
        self,
        *,
        client: bool,
        max_message: int = MAX_MESSAGE_SIZE,
        max_send: int = MAX_SEND_MESSAGE,
    ) -> None:
        self.client = client
        self.max_message = max_message
        self.max_send = max_send
        self.state = OPEN
        #: why we failed the connection ("" unless we did)
        self.error = ""
        #: the close code we sent (0: none yet)
        self.close_code = 0
        #: (code, reason) of the peer's close frame; code 1005 if it had no body
        self.close_rcvd: tuple[int, str] | None = None
        self._out: list[bytes] = []
        #: a partial frame kept from the previous read
        self._buf: bytearray | None = None
        self._need = 0
        #: payload bytes of the fragmented message in progress
        self._msg_len = 0
        self._in_msg = False

    # ------------------------------------------------------------------ sending

    def encode_binary(self, data: bytes) -> list[bytes]:
        """Wire chunks for ``data`` as binary messages of at most ``max_send`` bytes.

        The caller writes them (``writelines``) unless :attr:`state` is not
        ``OPEN``. Unmasked (server side) the payload object itself is one of
        the chunks, so nothing is copied.
        """
        n = len(data)
        limit = self.max_send
        if not self.client:
            if n <= limit:
                return [_header(0x82, n, 0), data]
            out: list[bytes] = []
            for i in range(0, n, limit):
                part = data[i : i + limit]
                out.append(_header(0x82, len(part), 0))
                out.append(part)
            return out
        out = []
        for i in range(0, n, limit) if n else (0,):
            part = data[i : i + limit] if n > limit else data
            key = os.urandom(4)
            out.append(_header(0x82, len(part), _MASK) + key)
            out.append(apply_mask(part, key))
        return out

    def send_close(self, code: int = 1000, reason: str = "") -> None:
        """Queue a close frame (once) and move to ``CLOSING``."""
        if self.state != OPEN:
            return
        self.close_code = code
        self._out.append(
            encode_frame(_OP_CLOSE, _U16.pack(code) + reason.encode()[:123], mask=self.client)
        )
        self.state = CLOSING

    def data_to_send(self) -> list[bytes]:
        """Frames the protocol produced (pongs, close frames); clears the queue."""
        out = self._out
        self._out = []
        return out

    # ------------------------------------------------------------------ receiving

    def receive_eof(self) -> None:
        """The peer closed TCP: without a close frame that is an abnormal closure."""
        if self.state != CLOSED:
            if self.close_rcvd is None and not self.error:
                self.close_rcvd = (1006, "")
            self.state = CLOSED
        self._buf = None

    def receive_data(self, data: bytes) -> bytes:
        """Parse every complete frame; return the binary payload bytes, in order.

        Returns what arrived before a failure or a close frame, too. Afterwards
        send :meth:`data_to_send` and check :attr:`state`.
        """
        if self.state == CLOSED:
            return b""
        buf = self._buf
        if buf is not None:
            buf += data
            if len(buf) < self._need:
                return b""
            data = bytes(buf)
            self._buf = None
        n = len(data)
        pos = 0
        chunks: list[bytes] = []
        need = 0
        masked_in = 0 if self.client else _MASK
        max_message = self.max_message
        fast = masked_in and max_message >= 65535
        append = chunks.append
        while n - pos >= 2:
            if fast and n - pos >= 6 and data[pos] == 0x82 and not self._in_msg:
                # The common frames from a client: FIN + binary, masked, a 7- or 16-bit
                # length (one message per packet). Everything they could violate is
                # checked here; anything else takes the general path below.
                b1 = data[pos + 1]
                if b1 == 0xFE and n - pos >= 8:
                    _b0, _b1, ln, key = _masked16(data, pos)
                    end = pos + 8 + ln
                    if end <= n:
                        append(apply_mask(data[pos + 8 : end], key))
                        pos = end
                        continue
                elif 0x80 <= b1 < 0xFE:
                    end = pos + 6 + b1 - 0x80
                    if end <= n:
                        append(apply_mask(data[pos + 6 : end], data[pos + 2 : pos + 6]))
                        pos = end
                        continue
            b0 = data[pos]
            b1 = data[pos + 1]
            ln = b1 & 0x7F
            hl = pos + 2
            if ln == 126:
                if n - pos < 4:
                    break
                ln = _u16_from(data, hl)[0]
                hl += 2
            elif ln == 127:
                if n - pos < 10:
                    break
                ln = _u64_from(data, hl)[0]
                hl += 8
                if ln >> 63:
                    self._fail(1002, "64-bit frame length with the top bit set")
                    break
            if b1 & _MASK != masked_in:
                self._fail(1002, "masked frame from the server" if self.client else "unmasked frame")
                break
            if b0 & 0x70:
                self._fail(1002, "reserved bits set (no extension was negotiated)")
                break
            op = b0 & 0x0F
            if op == _OP_BINARY or op == _OP_CONT:
                if (op == _OP_CONT) != self._in_msg:
                    self._fail(
                        1002,
                        "continuation frame outside a message"
                        if op == _OP_CONT
                        else "new message inside a fragmented one",
                    )
                    break
                if self._msg_len + ln > max_message:
                    self._fail(1009, f"message over {max_message} bytes")
                    break
            elif op >= _OP_CLOSE:
                if op > _OP_PONG:
                    self._fail(1002, f"unknown opcode {op}")
                    break
                if not b0 & _FIN or ln > 125:
                    self._fail(1002, "fragmented or oversized control frame")
                    break
            elif op == _OP_TEXT:
                self._fail(1003, "text message on a DERP WebSocket")
                break
            else:
                self._fail(1002, f"unknown opcode {op}")
                break
            end = hl + ln + (4 if masked_in else 0)
            if end > n:
                # Incomplete: keep it, and wait for all of it before parsing again.
                need = end - pos
                break
            if masked_in:
                payload = apply_mask(data[hl + 4 : end], data[hl : hl + 4])
            else:
                payload = data[hl:end]
            pos = end
            if op <= _OP_BINARY:
                append(payload)
                if b0 & _FIN:
                    self._in_msg = False
                    self._msg_len = 0
                else:
                    self._in_msg = True
                    self._msg_len += ln
            elif op == _OP_PING:
                if self.state == OPEN:
                    self._out.append(encode_frame(_OP_PONG, payload, mask=self.client))
            elif op == _OP_CLOSE:
                self._peer_close(payload)
                break
        if pos < n and self.state != CLOSED:
            self._buf = bytearray(data[pos:])
            # A known frame length, or (header incomplete) parse again on any new byte.
            self._need = need or n - pos + 1
        if not chunks:
            return b""
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def _peer_close(self, body: bytes) -> None:
        if len(body) == 1:
            self._fail(1002, "close frame with a 1-byte body")
            return
        code, reason = 1005, ""
        if body:
            code = _u16_from(body, 0)[0]
            try:
                reason = body[2:].decode()
            except UnicodeDecodeError:
                self._fail(1007, "close reason is not UTF-8")
                return
            if code not in _CLOSE_CODES_OK and not 3000 <= code <= 4999:
                self._fail(1002, f"invalid close code {code}")
                return
        self.close_rcvd = (code, reason)
        if self.state == OPEN:  # echo the code (RFC 6455 §5.5.1)
            self.close_code = code if body else 1000
            self._out.append(
                encode_frame(_OP_CLOSE, body[:2] if body else b"", mask=self.client)
            )
        self.state = CLOSED

    def _fail(self, code: int, reason: str) -> None:
        """Fail the connection: close frame with ``code`` (if still open), then CLOSED."""
        if not self.error:
            self.error = reason
        if self.state == OPEN:
            self.close_code = code
            self._out.append(
                encode_frame(_OP_CLOSE, _U16.pack(code) + reason.encode()[:123], mask=self.client)
            )
        self.state = CLOSED
        self._buf = None
