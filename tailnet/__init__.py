"""tailnet: a coordinator wire-compatible with Coder's ``coder.tailnet.v2`` API.

The generated protobuf/gRPC modules live in :mod:`tailnet.v2` (regenerate with
``python proto/generate.py``).
"""

from __future__ import annotations

__all__: list[str] = []
