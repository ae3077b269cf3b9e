"""tailnet: a coordinator wire-compatible with Coder's ``coder.tailnet.v2`` API.

Main entry points (imported lazily, so ``import tailnet`` stays cheap and the
generated :mod:`tailnet.v2` modules import without pulling in the servers):

* :class:`Coordinator` (pure core), :class:`TailnetService`, :class:`TailnetGrpcServer`
* :class:`AgentConnection`, :class:`ClientConnection` (client libraries)
* :class:`TailnetStack`, :class:`StackConfig` (the embedding API behind ``tailnet serve``)
* :class:`Principal`, :class:`StaticTokenAuthenticator` (identity)

The generated protobuf/gRPC modules live in :mod:`tailnet.v2` (regenerate with
``python proto/generate.py``).
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "AgentConnection",
    "ClientConnection",
    "Coordinator",
    "Principal",
    "StackConfig",
    "StaticTokenAuthenticator",
    "TailnetGrpcServer",
    "TailnetService",
    "TailnetStack",
]

_HOME = {
    "AgentConnection": "tailnet.client",
    "ClientConnection": "tailnet.client",
    "Coordinator": "tailnet.core",
    "Principal": "tailnet.identity",
    "StackConfig": "tailnet.config",
    "StaticTokenAuthenticator": "tailnet.identity",
    "TailnetGrpcServer": "tailnet.server.grpc",
    "TailnetService": "tailnet.service",
    "TailnetStack": "tailnet.stack",
}


def __getattr__(name: str) -> Any:
    module = _HOME.get(name)
    if module is None:
        raise AttributeError(f"module 'tailnet' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
