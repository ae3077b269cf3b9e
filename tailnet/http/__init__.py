"""Coder-compatible HTTP/WebSocket API of the embedded stack.

Modules:

* :mod:`tailnet.http.server`     h11 listener: routing to the app, DERP hand-over, WS upgrades
* :mod:`tailnet.http.api`        the endpoints (auth, errors, DERP map WS, RPC WS, debug)
* RPC WebSockets (yamux + DRPC) are served by :mod:`tailnet.rpc.server`
* :mod:`tailnet.http.websocket`  server WebSocket over an asyncio transport (``websockets`` sans-I/O)
* :mod:`tailnet.http.request`    request object and credential extraction
* :mod:`tailnet.http.errors`     Coder-style JSON errors
"""

from __future__ import annotations

from .api import AgentLookup, ApiOptions, TailnetApi
from .errors import HttpError, Validation
from .server import HttpApiServer, Response, Stream, Upgrade

__all__ = [
    "AgentLookup",
    "ApiOptions",
    "TailnetApi",
    "HttpError",
    "Validation",
    "HttpApiServer",
    "Response",
    "Stream",
    "Upgrade",
]
