"""A raw RFC 6455 client on a plain socket, for tests that must misbehave.

Library clients read and answer everything; these helpers let a test send
frames without ever reading (ping floods, never-reading peers) and observe the
server only through what the socket accepts.
"""

from __future__ import annotations

import base64
import os
import select
import socket
import struct

__all__ = [
    "ws_connect",
    "ws_frame",
    "read_http_head",
    "push_until_stalled",
    "OP_TEXT",
    "OP_BINARY",
    "OP_CLOSE",
    "OP_PING",
]

OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9


def ws_frame(opcode: int, payload: bytes) -> bytes:
    """One final client frame, masked with an all-zero key (payload bytes unchanged)."""
    n = len(payload)
    head = bytes([0x80 | opcode])
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 1 << 16:
        head += bytes([0x80 | 126]) + struct.pack("!H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", n)
    return head + b"\0\0\0\0" + payload


def read_http_head(sock: socket.socket) -> tuple[bytes, bytes]:
    """Read a response head; returns ``(head, bytes read after it)``."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a complete response head: {buf!r}")
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    return head, rest


def ws_connect(
    port: int,
    path: str,
    headers: dict[str, str] | None = None,
    *,
    rcvbuf: int | None = None,
    sndbuf: int | None = None,
    subprotocol: str | None = None,
    timeout: float = 10.0,
) -> tuple[socket.socket, bytes]:
    """Connect to 127.0.0.1:``port`` and upgrade ``path``; returns ``(socket, early bytes)``.

    ``rcvbuf``/``sndbuf`` are set before connecting (so the kernel does not
    autotune them): a small ``rcvbuf`` makes the server's writes back up fast.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    if sndbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    sock.settimeout(timeout)
    sock.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
    ]
    if subprotocol:
        lines.append(f"Sec-WebSocket-Protocol: {subprotocol}")
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    head, rest = read_http_head(sock)
    if not head.startswith(b"HTTP/1.1 101"):
        sock.close()
        raise ConnectionError(f"upgrade refused: {head!r}")
    return sock, rest


def push_until_stalled(
    sock: socket.socket, data: bytes, *, limit: int, stall: float = 1.0
) -> tuple[int, str]:
    """Write ``data`` over and over without reading, until ``limit`` bytes were
    accepted, the socket stayed unwritable for ``stall`` seconds, or the peer
    closed it.

    Returns ``(bytes accepted, "stalled" | "limit" | "closed")``. A peer that
    keeps reading never stalls; one that stopped reading stalls once the
    kernel buffers are full. The byte stream is ``data`` repeated exactly
    (partial sends resume where they stopped), so frames stay well-formed.
    """
    sock.setblocking(False)
    sent = 0
    chunk = data * max(1, 65536 // len(data))
    view = memoryview(chunk)
    offset = 0
    try:
        while sent < limit:
            _, writable, _ = select.select([], [sock], [], stall)
            if not writable:
                return sent, "stalled"
            try:
                n = sock.send(view[offset:])
            except BlockingIOError:
                continue
            except OSError:  # reset or broken pipe: the server closed it
                return sent, "closed"
            sent += n
            offset = (offset + n) % len(chunk)
    finally:
        sock.setblocking(True)
    return sent, "limit"
