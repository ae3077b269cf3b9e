"""Exceptions raised by the DERP packages.

Hierarchy::

    DerpError
    ├── ProtocolError          the peer broke the protocol; close that connection
    │   ├── FrameError         a frame broke a length/format rule
    │   └── HandshakeError     ServerKey/ClientInfo/ServerInfo exchange failed
    ├── KeyError_              malformed or all-zero key text/bytes (ValueError subclass)
    └── ConnectionClosed       the connection is gone (carries the reason)

Parsers are total: they return a value or raise one of these documented
errors. Exception text is for logs; it is never sent to a peer.
"""

from __future__ import annotations

__all__ = [
    "DerpError",
    "ProtocolError",
    "FrameError",
    "HandshakeError",
    "InvalidKeyError",
    "ConnectionClosed",
]


class DerpError(Exception):
    """Base class of every DERP error."""


class ProtocolError(DerpError):
    """The remote side violated the DERP protocol."""


class FrameError(ProtocolError):
    """A frame broke a length or format rule (spec §1.3)."""


class HandshakeError(ProtocolError):
    """The connection handshake failed (bad box, wrong first frame, bad JSON...)."""


class InvalidKeyError(DerpError, ValueError):
    """A key is malformed (wrong length, bad hex, wrong prefix) or all zero."""


class ConnectionClosed(DerpError):
    """The DERP connection is closed; ``reason`` says why."""

    def __init__(self, reason: str = "connection closed") -> None:
        super().__init__(reason)
        self.reason = reason
