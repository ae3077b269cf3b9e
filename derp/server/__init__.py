"""DERP relay server: one TCP port serving HTTP extras and the DERP upgrade.

Modules:

* :mod:`derp.server.app`        :class:`DerpServer`, :class:`ServerConfig` (listener, timers, accept)
* :mod:`derp.server.http`       h11 front door: routing, extras endpoints, upgrade hand-over
* :mod:`derp.server.listener`   accept policy: accept-rate limit, connection cap, TLS listener
* :mod:`derp.server.conn`       one DERP connection: handshake, relaying, backpressure
* :mod:`derp.server.handshake`  pure ClientInfo/ServerInfo handling
* :mod:`derp.server.wheel`      pure timer wheel for KeepAlives

Pure routing state lives in :mod:`derp.relay`, counters in :mod:`derp.stats`.
"""

from __future__ import annotations

from .app import DerpServer, ServerConfig
from .conn import DerpConnection

__all__ = ["DerpServer", "ServerConfig", "DerpConnection"]
