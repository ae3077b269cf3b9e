"""Coder's RPC transports: yamux and DRPC cores and their adapters."""

from __future__ import annotations

__all__: list[str] = []
