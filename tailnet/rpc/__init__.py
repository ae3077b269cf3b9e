"""Coder's RPC transports: yamux and DRPC cores and their adapters."""

__all__: list[str] = []
