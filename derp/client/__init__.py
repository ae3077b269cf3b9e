"""DERP client: a sans-I/O connection core plus an asyncio client on top.

Layout: :mod:`derp.client.core` (sans-I/O :class:`ClientConnection`) and
:mod:`derp.client.connection` (asyncio :class:`DerpClient`); this package
re-exports the public names of both.

The login flow (spec §1.5/§2.1) is drawn in :mod:`derp.client.core`.

:class:`ClientConnection` is the pure state machine (no sockets, no clock): feed it
bytes with :meth:`~ClientConnection.receive_data`, then collect
:meth:`~ClientConnection.events_received` and write
:meth:`~ClientConnection.data_to_send` to the network. The HTTP response head is
parsed with h11; bytes that arrive after the head are DERP bytes and go straight
into the frame decoder.

:class:`DerpClient` is the asyncio adapter. It works on any event loop (it uses
only ``loop.create_connection`` and an :class:`asyncio.Protocol`), answers server
Pings, matches Pongs for :meth:`DerpClient.ping`, enforces the 120 s read timeout
and, with ``reconnect=True``, reconnects with jittered exponential backoff.

Receive rules follow the Go client (``derp_client.go`` ``recvTimeout``): frames
larger than 1 MiB kill the connection; RecvPacket/PeerGone/PeerPresent shorter
than 32 bytes, Ping/Pong shorter than 8 bytes and Restarting shorter than 8 bytes
are dropped; ServerKey/ServerInfo after login and unknown types are skipped.
"""

from __future__ import annotations

from .connection import DerpClient
from .core import CLIENT_READ_TIMEOUT, ClientConnection, ClientState, parse_derp_url

__all__ = [
    "CLIENT_READ_TIMEOUT",
    "ClientConnection",
    "ClientState",
    "DerpClient",
    "parse_derp_url",
]
