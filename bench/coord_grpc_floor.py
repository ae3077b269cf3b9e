"""Native memory floor of one open grpc.aio bidi stream (no tailnet code at all).

Usage::

    python bench/coord_grpc_floor.py                      # 5,000 streams, every variant
    python bench/coord_grpc_floor.py --streams 10000 --variants coro
    python bench/coord_grpc_floor.py --option grpc.http2.lookahead_bytes=1024
    PYTHONTRACEMALLOC=1 python bench/coord_grpc_floor.py   # + Python heap per stream

A server process (this script with ``--serve``) hosts one stream-stream method
with a trivial handler, on uvloop like the coordinator. This process opens
``--streams`` streams over channels of 200 streams each (like the load
generators), sends one small message per stream and waits for its echo, so
every stream is fully established on both sides. Reported: the server's
(VmRSS after − VmRSS before) / streams.

Variants of the server handler:

* ``coro``: ``async def handler(it, ctx)`` reading with ``ctx.read()`` and
  answering with ``ctx.write()`` (what the coordinator's servicer does);
* ``agen``: an async-generator handler (``async for req in it: yield req``),
  the previous servicer shape;
* ``park``: reads one message, writes it, then awaits a future forever
  (the smallest Python state a live stream can have).

Whatever a variant measures above ``park`` is Python state; ``park`` itself is
the floor set by gRPC core (call arena, HTTP/2 stream, completion-queue tags,
the grpc.aio RPC objects and their task) plus allocator overhead.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

METHOD = "/floor.Echo/Chat"


def _ident(b: bytes) -> bytes:
    return b


async def _serve(variant: str, options: list[tuple[str, Any]]) -> None:
    async def coro(_it: Any, ctx: grpc.aio.ServicerContext[bytes, bytes]) -> None:
        while True:
            msg = await ctx.read()
            if msg is grpc.aio.EOF:  # type: ignore[attr-defined]
                return
            await ctx.write(msg)

    async def agen(it: Any, _ctx: Any) -> Any:
        async for msg in it:
            yield msg

    async def park(_it: Any, ctx: grpc.aio.ServicerContext[bytes, bytes]) -> None:
        msg = await ctx.read()
        await ctx.write(msg)
        await asyncio.get_running_loop().create_future()

    fn = {"coro": coro, "agen": agen, "park": park}[variant]
    handler = grpc.stream_stream_rpc_method_handler(
        fn, request_deserializer=_ident, response_serializer=_ident
    )
    server = grpc.aio.server(options=options)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("floor.Echo", {"Chat": handler}),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    gc.collect()
    gc.freeze()
    print(json.dumps({"port": port, "pid": os.getpid()}), flush=True)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while (await reader.readline()).strip() == b"stats":
        import tracemalloc

        traced = tracemalloc.get_traced_memory()[0] if tracemalloc.is_tracing() else 0
        print(json.dumps({"objects": len(gc.get_objects()), "py_traced": traced}), flush=True)
    await server.stop(0)


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


async def _open_all(target: str, n: int) -> tuple[list[Any], list[grpc.aio.Channel]]:
    channels: list[grpc.aio.Channel] = []
    calls: list[Any] = []
    sem = asyncio.Semaphore(200)

    async def one(i: int) -> None:
        while len(channels) <= i // 200:
            channels.append(
                grpc.aio.insecure_channel(
                    target,
                    options=[
                        ("grpc.use_local_subchannel_pool", 1),
                        ("grpc.max_concurrent_streams", 1 << 20),
                    ],
                )
            )
        async with sem:
            mc = channels[i // 200].stream_stream(
                METHOD, request_serializer=_ident, response_deserializer=_ident
            )
            call = mc(None)
            await call.write(b"x" * 64)
            await call.read()
            calls.append(call)

    for base in range(0, n, 1000):
        await asyncio.wait_for(
            asyncio.gather(*(one(i) for i in range(base, min(n, base + 1000)))), 120
        )
    return calls, channels


def measure(variant: str, streams: int, options: list[str]) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--serve", "--variants", variant]
    for o in options:
        cmd += ["--option", o]
    srv = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert srv.stdout is not None and srv.stdin is not None
        info = json.loads(srv.stdout.readline())
        time.sleep(0.5)
        rss0 = _rss_kb(info["pid"])

        def stats() -> dict[str, int]:
            assert srv.stdin is not None and srv.stdout is not None
            srv.stdin.write("stats\n")
            srv.stdin.flush()
            out: dict[str, int] = json.loads(srv.stdout.readline())
            return out

        st0 = stats()

        async def run() -> int:
            calls, channels = await _open_all(f"127.0.0.1:{info['port']}", streams)
            await asyncio.sleep(1.0)  # let the server settle (not a correctness wait)
            rss1 = _rss_kb(info["pid"])
            st1.update(stats())
            for ch in channels:
                await ch.close(None)
            return rss1 + 0 * len(calls)

        st1: dict[str, int] = {}
        rss1 = asyncio.run(run())
        return {
            "variant": variant,
            "streams": streams,
            "options": options,
            "rss_per_stream_kb": (rss1 - rss0) / streams,
            "gc_objects_per_stream": (st1["objects"] - st0["objects"]) / streams,
            "py_traced_per_stream_kb": (st1["py_traced"] - st0["py_traced"]) / streams / 1024,
        }
    finally:
        if srv.stdin is not None:
            srv.stdin.close()
        try:
            srv.wait(timeout=30)
        except subprocess.TimeoutExpired:
            srv.kill()


def _parse_option(text: str) -> tuple[str, Any]:
    key, _, value = text.partition("=")
    return key, int(value) if value.lstrip("-").isdigit() else value


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--streams", type=int, default=5000)
    ap.add_argument("--variants", default="park,coro,agen")
    ap.add_argument("--option", action="append", default=[], help="server channel arg K=V")
    args = ap.parse_args()
    if args.serve:
        import uvloop

        uvloop.run(_serve(args.variants, [_parse_option(o) for o in args.option]))
        return
    print("| handler | server options | streams | server RSS per stream"
          " | GC-tracked objects per stream | Python heap per stream (tracemalloc) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for v in args.variants.split(","):
        r = measure(v, args.streams, args.option)
        print(
            f"| {v} | {' '.join(args.option) or '(defaults)'} | {r['streams']} | "
            f"{r['rss_per_stream_kb']:.1f} KB | {r['gc_objects_per_stream']:.1f} | "
            f"{r['py_traced_per_stream_kb']:.1f} KB |",
            flush=True,
        )


if __name__ == "__main__":
    main()
