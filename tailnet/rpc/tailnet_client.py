"""Client stub for ``coder.tailnet.v2.Tailnet`` over Coder's transport (as Coder's
generated ``DRPCTailnetClient``): one method per RPC on an :class:`~tailnet.rpc.client.RpcClient`.

Works against tailnet-core and against a real Coder deployment::

    c = await TailnetClient.connect(
        f"{access_url}/api/v2/workspaceagents/{agent_id}/coordinate?version=2.3", token)
    coord = c.coordinate()                       # bidi; Invoke sent with the first send/recv
    await coord.send(pb.CoordinateRequest(add_tunnel=...))
    resp = await coord.recv()                    # None once the server closed the stream
    maps = await c.stream_derp_maps(); first = await maps.recv()
    tok = await c.refresh_resume_token()
    await c.close()

This module imports no server code.
"""

from __future__ import annotations

import ssl as ssl_module
import uuid
from collections.abc import Sequence
from typing import Final

from tailnet.v2 import tailnet_pb2 as pb

from .client import ClientStream, RpcClient

__all__ = [
    "SERVICE",
    "METHOD_COORDINATE",
    "METHOD_STREAM_DERP_MAPS",
    "METHOD_REFRESH_RESUME_TOKEN",
    "METHOD_POST_TELEMETRY",
    "METHOD_WORKSPACE_UPDATES",
    "TailnetClient",
]

SERVICE: Final = "coder.tailnet.v2.Tailnet"
METHOD_COORDINATE: Final = f"/{SERVICE}/Coordinate"
METHOD_STREAM_DERP_MAPS: Final = f"/{SERVICE}/StreamDERPMaps"
METHOD_REFRESH_RESUME_TOKEN: Final = f"/{SERVICE}/RefreshResumeToken"
METHOD_POST_TELEMETRY: Final = f"/{SERVICE}/PostTelemetry"
METHOD_WORKSPACE_UPDATES: Final = f"/{SERVICE}/WorkspaceUpdates"


class TailnetClient:
    """The Tailnet RPCs on one connection (see the module docstring)."""

    def __init__(self, rpc: RpcClient) -> None:
        self.rpc = rpc
        headers = {k.lower(): v for k, v in rpc.response_headers.items()}
        self.peer_id: str | None = headers.get("tailnet-peer-id")
        """Our peer ID as a tailnet-core server reports it (Coder servers don't)."""
        self.version: str | None = headers.get("tailnet-version")

    @classmethod
    async def connect(
        cls,
        url: str,
        token: str | None,
        *,
        cookie: bool = False,
        headers: Sequence[tuple[str, str]] = (),
        ssl: ssl_module.SSLContext | None = None,
        open_timeout: float = 10.0,
    ) -> TailnetClient:
        """Dial ``url`` (an RPC endpoint with ``?version=``); raises ``DialError``."""
        rpc = await RpcClient.connect(
            url, token, cookie=cookie, headers=headers, ssl=ssl, open_timeout=open_timeout
        )
        return cls(rpc)

    def coordinate(self) -> ClientStream[pb.CoordinateResponse]:
        return self.rpc.bidi(METHOD_COORDINATE, pb.CoordinateResponse)

    async def stream_derp_maps(self) -> ClientStream[pb.DERPMap]:
        return await self.rpc.server_stream(
            METHOD_STREAM_DERP_MAPS, pb.StreamDERPMapsRequest(), pb.DERPMap
        )

    async def refresh_resume_token(self) -> pb.RefreshResumeTokenResponse:
        return await self.rpc.unary(
            METHOD_REFRESH_RESUME_TOKEN,
            pb.RefreshResumeTokenRequest(),
            pb.RefreshResumeTokenResponse,
        )

    async def post_telemetry(self, req: pb.TelemetryRequest) -> pb.TelemetryResponse:
        return await self.rpc.unary(METHOD_POST_TELEMETRY, req, pb.TelemetryResponse)

    async def workspace_updates(self, owner_id: uuid.UUID) -> ClientStream[pb.WorkspaceUpdate]:
        return await self.rpc.server_stream(
            METHOD_WORKSPACE_UPDATES,
            pb.WorkspaceUpdatesRequest(workspace_owner_id=owner_id.bytes),
            pb.WorkspaceUpdate,
        )

    async def close(self) -> None:
        await self.rpc.close()

    async def __aenter__(self) -> TailnetClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
