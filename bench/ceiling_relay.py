"""Minimal uvloop byte-forwarding relay: the "Python ceiling" for the DERP benchmark.

It measures what Python + uvloop can relay at all when the relay does nothing but
move bytes, so the DERP server's numbers can be read as a fraction of it.

Protocol (bench only, not DERP)::

    client -> relay   own key(32) ‖ destination key(32)    (zeros: receive only)
    client -> relay   then any bytes: forwarded verbatim to the destination's connection

There is no handshake, no framing and no parsing: each read is written to the
destination with one ``transport.write`` (the kernel read already batches frames).
The load generator sends exactly the bytes it sends to DERP (SendPacket frames of
the same length), so receivers see frames of the same size as DERP RecvPacket
frames and the comparison is fair.

Invariants: one connection per key (a later one replaces the earlier); bytes for
a destination that is not connected are dropped and counted; backpressure is
by pausing the readers that feed a destination whose write buffer is full, so
a byte stream is never cut in the middle of a frame.

Run: ``python bench/ceiling_relay.py [--host 127.0.0.1] [--port 0]``; prints
``PORT <n>`` on stdout once listening, stops on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import signal
import sys
from typing import cast

__all__ = ["CeilingRelay", "RelayConnection", "HELLO_LEN", "main"]

HELLO_LEN = 64
_ZERO_KEY = bytes(32)


class CeilingRelay:
    """Key -> connection registry plus counters; one per listening socket."""

    def __init__(self) -> None:
        self.conns: dict[bytes, RelayConnection] = {}
        self.dropped_bytes = 0

    def protocol(self) -> RelayConnection:
        return RelayConnection(self)


class RelayConnection(asyncio.Protocol):
    """One client connection: reads its 64-byte hello, then forwards bytes raw."""

    __slots__ = ("relay", "transport", "hello", "key", "dst_key", "dst", "feeders", "paused")

    def __init__(self, relay: CeilingRelay) -> None:
        self.relay = relay
        self.transport: asyncio.Transport | None = None
        self.hello = bytearray()
        self.key: bytes | None = None
        self.dst_key = _ZERO_KEY
        self.dst: RelayConnection | None = None
        self.feeders: set[RelayConnection] = set()
        self.paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        dst = self.dst
        if dst is not None:  # hot path: one write per read
            assert dst.transport is not None
            dst.transport.write(data)
            return
        if self.key is None:
            self.hello += data
            if len(self.hello) < HELLO_LEN:
                return
            self.key = bytes(self.hello[:32])
            self.dst_key = bytes(self.hello[32:64])
            data = bytes(self.hello[64:])
            self.hello = bytearray()
            old = self.relay.conns.get(self.key)
            if old is not None and old.transport is not None:
                old.transport.close()
            self.relay.conns[self.key] = self
        if not data:
            return
        if self._attach():
            assert self.dst is not None and self.dst.transport is not None
            self.dst.transport.write(data)
        else:
            self.relay.dropped_bytes += len(data)

    def _attach(self) -> bool:
        if self.dst_key == _ZERO_KEY:
            return False
        dst = self.relay.conns.get(self.dst_key)
        if dst is None or dst.transport is None or dst.transport.is_closing():
            return False
        self.dst = dst
        dst.feeders.add(self)
        if dst.paused and self.transport is not None:
            self.transport.pause_reading()
        return True

    def pause_writing(self) -> None:
        self.paused = True
        for f in self.feeders:
            if f.transport is not None and not f.transport.is_closing():
                f.transport.pause_reading()

    def resume_writing(self) -> None:
        self.paused = False
        for f in self.feeders:
            if f.transport is not None and not f.transport.is_closing():
                f.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.key is not None and self.relay.conns.get(self.key) is self:
            del self.relay.conns[self.key]
        for f in self.feeders:
            f.dst = None
            if f.transport is not None and not f.transport.is_closing():
                f.transport.resume_reading()
        self.feeders.clear()
        if self.dst is not None:
            self.dst.feeders.discard(self)
            self.dst = None
        self.transport = None


def raise_nofile_limit() -> int:
    """Raise RLIMIT_NOFILE to the hard limit; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


async def serve(host: str, port: int) -> None:
    relay = CeilingRelay()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(relay.protocol, host, port, backlog=4096)
    bound = server.sockets[0].getsockname()[1]
    print(f"PORT {bound}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()
    for conn in list(relay.conns.values()):
        if conn.transport is not None:
            conn.transport.close()
    await server.wait_closed()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    raise_nofile_limit()
    import uvloop

    uvloop.run(serve(args.host, args.port))


if __name__ == "__main__":
    main(sys.argv[1:])
