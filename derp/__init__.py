"""DERP relay: Tailscale's DERP protocol v2, byte-compatible with Go clients and derper.

Modules:

* :mod:`derp.frames`  pure frame codec (constants, encoders, incremental decoder)
* :mod:`derp.keys`    Curve25519 node keys, NaCl box, derper key file
* :mod:`derp.errors`  exception hierarchy
"""

from __future__ import annotations

from .errors import (
    ConnectionClosed,
    DerpError,
    FrameError,
    HandshakeError,
    InvalidKeyError,
    ProtocolError,
)
from .keys import PrivateKey, PublicKey

__all__ = [
    "ConnectionClosed",
    "DerpError",
    "FrameError",
    "HandshakeError",
    "InvalidKeyError",
    "ProtocolError",
    "PrivateKey",
    "PublicKey",
]
