"""Interpreter cost of the DERP server's hot path, without sockets or a kernel.

``DerpConnection.data_received`` is fed prepared reads (``frames`` SendPacket
frames of ``size`` bytes each, to one or several destinations) on in-memory
transports whose ``write`` only counts bytes; the best of several timed rounds
is printed as µs per read and per packet (thread CPU time, so time spent
waiting for a CPU is not counted). The kernel's share (socket reads and
writes, epoll) and uvloop's are not included: this isolates the Python work,
which is what the relay code controls, and it is not disturbed by other load on
the machine the way ``derp_bench.py`` is (it still measures wall time: run it
on a quiet core or compare runs made back to back).

Each loop iteration handles ``--per-iteration`` reads (default 1: every read in
an iteration of its own, the worst case for work deferred to the end of an
iteration); the cost of the empty iterations themselves is subtracted.

Usage::

    python bench/derp_hotpath.py                 # the default grid
    python bench/derp_hotpath.py --per-iteration 8
    python bench/derp_hotpath.py --reads 20000 --rounds 7
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from derp.frames import encode_client_info, encode_send_packet  # noqa: E402
from derp.keys import PrivateKey, seal  # noqa: E402
from derp.server import DerpServer, ServerConfig  # noqa: E402

__all__ = ["main"]


class CountingTransport(asyncio.Transport):
    """Counts written bytes and writes; the calls the server makes, nothing else."""

    def __init__(self) -> None:
        super().__init__()
        self.nbytes = 0
        self.writes = 0
        self.protocol: Any = None

    def write(self, data: Any) -> None:
        self.nbytes += len(data)
        self.writes += 1

    def writelines(self, lines: Any) -> None:
        for d in lines:
            self.nbytes += len(d)
        self.writes += 1

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self.protocol  # type: ignore[no-any-return]

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass


def _client_info(key: PrivateKey, server: PrivateKey) -> bytes:
    body = json.dumps({"version": 2}).encode()
    return encode_client_info(key.public.raw, seal(key, server.public, body))


async def _idle_iterations(iterations: int, rounds: int) -> float:
    """Best thread CPU seconds of ``iterations`` empty event-loop iterations."""
    best = float("inf")
    for _ in range(rounds):
        t0 = time.thread_time()
        for _ in range(iterations):
            await asyncio.sleep(0)
        best = min(best, time.thread_time() - t0)
    return best


async def _measure(
    frames: int, size: int, dests: int, reads: int, rounds: int, per_iter: int
) -> tuple[float, int]:
    """Best µs per read of ``frames`` packets of ``size`` bytes spread over ``dests``,
    ``per_iter`` reads per event-loop iteration (the iterations' own cost subtracted)."""
    server_key = PrivateKey.generate()
    srv = DerpServer(ServerConfig(private_key=server_key))
    await srv.start("127.0.0.1", 0)
    loop = asyncio.get_running_loop()
    try:
        sender_key = PrivateKey.generate()
        dst_keys = [PrivateKey.generate() for _ in range(dests)]
        dst_transports = []
        for k in dst_keys:
            t = CountingTransport()
            srv.accept(t, fast_start=True, initial_data=_client_info(k, server_key))
            dst_transports.append(t)
        ts = CountingTransport()
        conn = srv.accept(ts, fast_start=True, initial_data=_client_info(sender_key, server_key))
        body = bytes(size)
        chunk = b"".join(
            encode_send_packet(dst_keys[i % dests].public.raw, body) for i in range(frames)
        )
        # Reads arrive as fresh bytes objects (uvloop copies each read into one).
        chunks = [bytes(bytearray(chunk)) for _ in range(64)]
        feed = conn.data_received
        best = float("inf")
        for _ in range(rounds):
            await asyncio.sleep(0)
            t0 = time.thread_time()
            for i in range(reads):
                feed(chunks[i & 63])
                if i % per_iter == per_iter - 1:
                    await asyncio.sleep(0)  # end of an iteration: deferred writes run
            await asyncio.sleep(0)
            best = min(best, time.thread_time() - t0)
        best -= await _idle_iterations(reads // per_iter + 1, rounds)
        delivered = sum(t.nbytes for t in dst_transports)
        assert delivered >= reads * frames * (size + 37), "not everything was relayed"
        del loop
        return best / reads * 1e6, sum(t.writes for t in dst_transports)
    finally:
        await srv.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reads", type=int, default=2_000)
    p.add_argument("--rounds", type=int, default=41)
    p.add_argument(
        "--grid",
        default="1x64x1,2x64x1,4x64x1,16x64x1,1x1400x1,8x1400x1,8x64x4,32x64x8",
        help="comma list of FRAMESxSIZExDESTS (packets per read, bytes, destinations)",
    )
    p.add_argument("--per-iteration", type=int, default=1,
                   help="reads per event-loop iteration (1: every read in its own)")
    args = p.parse_args(argv)
    import uvloop

    print(f"{args.per_iteration} read(s) per event-loop iteration\n")
    print("| packets/read | size | destinations | µs/read | µs/packet |")
    print("|---:|---:|---:|---:|---:|")
    for cell in args.grid.split(","):
        f, s, d = (int(x) for x in cell.split("x"))
        us, _ = uvloop.run(_measure(f, s, d, args.reads, args.rounds, args.per_iteration))
        print(f"| {f} | {s} | {d} | {us:.2f} | {us / f:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
