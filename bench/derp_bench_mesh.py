"""DERP mesh benchmark: sender on relay A, receiver on relay B, versus one relay.

Topology (every process on 127.0.0.1; servers on uvloop, one process each)::

    single:  sender ──SendPacket──► relay ──RecvPacket──► receiver
    mesh:    sender ──SendPacket──► relay A ──ForwardPacket (A's mesh link)──► relay B
                                                             ──RecvPacket──► receiver

The load generator is ``bench/derp_loadgen.py`` unchanged. For the mesh case
its worker processes are told, after the fork, to open receivers on B and
senders on A (``_connect_many`` is wrapped in the worker only: receivers are
the calls without destination keys). Both relays mesh with each other (A→B and
B→A links) like a real two-node region; the one-way data path uses A→B.

Before measuring, a probe packet must cross A→B (bounded wait), so routes are
known. Reported per case (median of ``--repeat`` runs): delivered packets/s,
one-way latency p50/p99 (sender stamp → receiver read, same clock), loss, and
server CPU µs per delivered packet (mesh: A + B summed); the last columns give
the mesh figure relative to the single relay.

Run::

    .venv/bin/python bench/derp_bench_mesh.py --repeat 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import derp_loadgen  # noqa: E402
from derp_bench import ServerProcess, host_cpu, parse_case, serve_until_signal  # noqa: E402
from derp_loadgen import LoadSpec, Target, run_load  # noqa: E402

MESH_KEY = bytes(range(32))
CASES = ["closed-1x1400", "closed-8x1400", "open-8x1400"]


# --------------------------------------------------------------------------- servers


def serve_node(port: int, peer_port: int | None) -> None:
    """Run one relay (meshing with ``peer_port`` if given) until SIGTERM."""
    from derp.keys import PrivateKey
    from derp.mesh import parse_mesh_peer
    from derp.server import ServerConfig

    peers = () if peer_port is None else (parse_mesh_peer(f"http://127.0.0.1:{peer_port}"),)
    config = ServerConfig(
        private_key=PrivateKey.generate(),
        mesh_key=MESH_KEY,
        mesh_with=peers,
        mesh_retry_interval=0.2,
    )
    serve_until_signal(config, port)


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _node(name: str, port: int, peer: int | None) -> ServerProcess:
    argv = [sys.executable, str(Path(__file__).resolve()), "--serve-node", str(port)]
    if peer is not None:
        argv += ["--peer", str(peer)]
    return ServerProcess(name, argv)


async def _probe(port_a: int, port_b: int, timeout: float = 30.0) -> None:
    """Send from a client on A to a client on B until one packet arrives."""
    from derp.client import DerpClient
    from derp.events import PacketReceived
    from derp.keys import PrivateKey

    rx = DerpClient(f"http://127.0.0.1:{port_b}", PrivateKey.generate())
    tx = DerpClient(f"http://127.0.0.1:{port_a}", PrivateKey.generate())
    await rx.connect()
    await tx.connect()
    try:
        async with asyncio.timeout(timeout):
            while True:
                await tx.send(rx.public_key, b"probe")
                try:
                    ev = await asyncio.wait_for(rx.recv(), 0.2)
                except TimeoutError:
                    continue
                if isinstance(ev, PacketReceived):
                    return
    finally:
        await tx.close()
        await rx.close()


# --------------------------------------------------------------------------- load


_RECEIVER_TARGET: Target | None = None
_orig_connect_many = derp_loadgen._connect_many
_orig_pairs_worker = derp_loadgen._pairs_worker


async def _split_connect_many(
    target: Target, n: int, clock: Any, dsts: list[bytes] | None = None, concurrency: int = 32
) -> Any:
    # Receivers are opened without destination keys: put them on relay B.
    where = _RECEIVER_TARGET if (dsts is None and _RECEIVER_TARGET is not None) else target
    return await _orig_connect_many(where, n, clock, dsts, concurrency)


def _mesh_pairs_worker(pipe: Any, target: Target, n: int, spec: LoadSpec) -> None:
    derp_loadgen._connect_many = _split_connect_many  # this forked worker only
    _orig_pairs_worker(pipe, target, n, spec)


def run_case(
    case: str,
    sender: ServerProcess,
    receiver: ServerProcess | None,
    args: argparse.Namespace,
) -> dict[str, Any]:
    global _RECEIVER_TARGET
    mode, pairs, size = parse_case(case)
    spec = LoadSpec(
        pairs=pairs, size=size, mode=mode, warmup=args.warmup, duration=args.duration,
        rate=args.open_rate,
    )  # fmt: skip
    servers = [sender] if receiver is None else [sender, receiver]

    def sample() -> tuple[float, tuple[float, float]]:
        return sum(s.cpu_s() for s in servers), host_cpu()

    target = Target("derp", "127.0.0.1", sender.port)
    _RECEIVER_TARGET = None if receiver is None else Target("derp", "127.0.0.1", receiver.port)
    derp_loadgen._pairs_worker = _mesh_pairs_worker  # resolved by run_load before forking
    try:
        res = run_load(target, spec, workers=args.workers, on_window_start=sample, on_window_end=sample)
    finally:
        derp_loadgen._pairs_worker = _orig_pairs_worker
        _RECEIVER_TARGET = None
    (c0, h0), (c1, h1) = res.pop("start_sample"), res.pop("end_sample")
    res.update(
        case=case,
        topology="single" if receiver is None else "mesh",
        srv_us_per_pkt=(c1 - c0) / res["win_recv"] * 1e6 if res["win_recv"] else float("nan"),
        srv_cores=(c1 - c0) / res["window_s"],
        host_cores=(h1[0] - h0[0]) / res["window_s"],
    )
    return res


def run_once(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    pa, pb = _free_ports(2)
    single = _node("mesh-bench-single", 0, None)
    a = b = None
    try:
        a = _node("mesh-bench-a", pa, pb)
        b = _node("mesh-bench-b", pb, pa)
        asyncio.run(_probe(a.port, b.port))
        for case in args.cases:
            for topo in ("single", "mesh"):
                r = (
                    run_case(case, single, None, args)
                    if topo == "single"
                    else run_case(case, a, b, args)
                )
                rows.append(r)
                print(
                    f"  {topo:6} {case:14} {r['pps']:>10,.0f} pkt/s  loss {100 * r['loss']:.2f}%"
                    f"  p50 {r['p50_us']:,.0f} µs  p99 {r['p99_us']:,.0f} µs"
                    f"  srv {r['srv_us_per_pkt']:.2f} µs/pkt  host {r['host_cores']:.2f} busy",
                    flush=True,
                )
    finally:
        for s in (single, a, b):
            if s is not None:
                s.stop()
    return rows


def _median(runs: list[list[dict[str, Any]]], i: int, key: str) -> float:
    vals = [run[i][key] for run in runs if run[i].get(key) == run[i].get(key)]
    return statistics.median(vals) if vals else float("nan")


def report(runs: list[list[dict[str, Any]]]) -> str:
    lines = [
        "| case | topology | pkt/s | p50 µs | p99 µs | loss % | srv µs/pkt | mesh/single pkt/s | mesh/single p50 |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    first = runs[0]
    for i, row in enumerate(first):
        pps = _median(runs, i, "pps")
        p50 = _median(runs, i, "p50_us")
        rel = ""
        if row["topology"] == "mesh":
            j = next(k for k, r in enumerate(first) if r["case"] == row["case"] and r["topology"] == "single")
            rel_pps = pps / _median(runs, j, "pps")
            rel_p50 = p50 / _median(runs, j, "p50_us")
            rel = f" {rel_pps:.2f}x | {rel_p50:.2f}x |"
        else:
            rel = " | |"
        lines.append(
            f"| {row['case']} | {row['topology']} | {pps:,.0f} | {p50:,.0f} |"
            f" {_median(runs, i, 'p99_us'):,.0f} | {100 * _median(runs, i, 'loss'):.2f} |"
            f" {_median(runs, i, 'srv_us_per_pkt'):.2f} |{rel}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="DERP mesh benchmark (sender on A, receiver on B)")
    p.add_argument("--cases", nargs="+", default=CASES, help="closed-NxSIZE / open-NxSIZE")
    p.add_argument("--duration", type=float, default=3.0, help="measured seconds per case")
    p.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds first")
    p.add_argument("--workers", type=int, default=2, help="load generator processes")
    p.add_argument("--open-rate", type=float, default=20_000, help="open loop: total pkt/s")
    p.add_argument("--repeat", type=int, default=3, help="runs; the table shows medians")
    p.add_argument("--json", help="write all rows to this JSON file")
    p.add_argument("--serve-node", type=int, help=argparse.SUPPRESS)
    p.add_argument("--peer", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve_node is not None:
        serve_node(args.serve_node, args.peer)
        return 0
    for c in args.cases:
        parse_case(c)
    runs = []
    t0 = time.monotonic()
    for n in range(args.repeat):
        print(f"run {n + 1}/{args.repeat}", flush=True)
        runs.append(run_once(args))
    print(f"\nmedians of {args.repeat} run(s), {time.monotonic() - t0:.0f} s total:\n")
    print(report(runs))
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
