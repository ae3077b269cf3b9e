"""Transports serving :class:`tailnet.service.TailnetService`.

Only the gRPC transport exists so far (:mod:`tailnet.server.grpc`).
"""

from __future__ import annotations

from tailnet.server.grpc import TailnetGrpcServer, TailnetServicer

__all__ = ["TailnetGrpcServer", "TailnetServicer"]
