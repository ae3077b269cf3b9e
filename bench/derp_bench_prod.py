"""DERP transport variants: TCP (baseline) vs WebSocket vs TLS vs WebSocket over TLS.

Same load generator and method as ``bench/derp_bench.py`` (forked uvloop worker
processes, server in its own process, CPU from ``/proc/<pid>/task/*/schedstat``);
only the transport between the generator and the server changes:

=========  ===================================================================
variant    generator connection
=========  ===================================================================
``tcp``    plain TCP, ``Upgrade: DERP`` (the single-relay baseline)
``ws``     WebSocket (``Upgrade: websocket``, subprotocol ``derp``), each
           generator write = one binary message, masked as RFC 6455 requires
``tls``    TLS 1.3 (server: self-signed cert + meta-cert), ``Upgrade: DERP``
``wss``    WebSocket over TLS 1.3
=========  ===================================================================

Cases (default): ``closed-8x1400`` (throughput: 8 pairs, 1400-byte packets, 32 in
flight per pair) and ``open-1x1400`` at 2,000 packets/s (latency of one lightly
loaded pair). Each row reports delivered packets/s, MB/s, one-way latency
p50/p99, server CPU µs per relayed packet, and the cost relative to ``tcp``.

Usage::

    python bench/derp_bench_prod.py                      # all variants, 1 run
    python bench/derp_bench_prod.py --repeat 3           # medians of 3 runs
    python bench/derp_bench_prod.py --variants tcp ws --cases closed-8x1400

Importable pieces (for other bench files, e.g. a mesh case): :func:`start_server`,
:func:`use_transport`, :func:`run_variant`.

Internal: ``--serve plain|tls`` runs the server under test and prints ``PORT <n>``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import derp_loadgen  # noqa: E402
from derp_bench import ServerProcess, run_throughput, serve_until_signal  # noqa: E402
from derp_loadgen import Clock, GenConn, Target, raise_nofile_limit  # noqa: E402

from derp import frames  # noqa: E402
from derp.keys import PrivateKey  # noqa: E402

__all__ = ["VARIANTS", "main", "run_variant", "start_server", "use_transport"]

VARIANTS = ("tcp", "ws", "tls", "wss")
DEFAULT_CASES = ("closed-8x1400", "open-1x1400")
LATENCY_RATE = 2000.0  # packets/s offered in open-1xN cases

_plain_connect = derp_loadgen._connect
_transport = "tcp"


class _UpgradedGenConn(GenConn):
    """Generator connection on an already-upgraded WebSocket: ServerKey comes first."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.dec = frames.FrameDecoder()


def _client_ssl() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the bench measures transport cost, not PKI
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    return ctx


async def _connect(
    target: Target, key: PrivateKey | None, raw: bytes, dst: bytes, clock: Clock
) -> GenConn:
    """Replacement for ``derp_loadgen._connect`` honouring the selected transport."""
    if _transport == "tcp":
        return await _plain_connect(target, key, raw, dst, clock)
    from derp.websocket import websocket_client

    loop = asyncio.get_running_loop()
    secure = _transport in ("tls", "wss")
    ctx = _client_ssl() if secure else None
    if _transport == "tls":
        _, proto = await loop.create_connection(
            lambda: GenConn(target, key, raw, dst, clock),
            target.host,
            target.port,
            ssl=ctx,
            server_hostname=target.host,
        )
    else:
        transport, _ = await loop.create_connection(
            asyncio.Protocol,
            target.host,
            target.port,
            ssl=ctx,
            server_hostname=target.host if secure else None,
        )
        proto = await websocket_client(
            transport,
            lambda: _UpgradedGenConn(target, key, raw, dst, clock),
            host_header=f"{target.host}:{target.port}",
            secure=secure,
        )
    await asyncio.wait_for(proto.ready, 30)
    return proto


def use_transport(variant: str) -> None:
    """Make the load generator dial with ``variant`` (workers are forked afterwards)."""
    global _transport
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; want one of {VARIANTS}")
    _transport = variant
    derp_loadgen._connect = _connect  # type: ignore[assignment]


def start_server(tls: bool) -> ServerProcess:
    """The DERP server under test in its own process (plain HTTP or TLS 1.3)."""
    mode = "tls" if tls else "plain"
    return ServerProcess(f"derp-{mode}", [sys.executable, str(Path(__file__).resolve()), "--serve", mode])


def serve(mode: str) -> None:
    """Run the server (TLS with a self-signed IP certificate for ``tls``) until SIGTERM."""
    from derp.server import ServerConfig
    from derp.tls import load_manual_cert, server_ssl_context

    key = PrivateKey.generate()
    ctx = None
    if mode == "tls":
        mc = load_manual_cert(tempfile.mkdtemp(prefix="derp-bench-"), "127.0.0.1")
        ctx = server_ssl_context(mc.cert_file, mc.key_file, key.public)
    serve_until_signal(ServerConfig(private_key=key, ssl_context=ctx))


def run_variant(variant: str, cases: list[str], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Run ``cases`` over ``variant`` against a fresh server process."""
    use_transport(variant)
    srv = start_server(tls=variant in ("tls", "wss"))
    rows = []
    try:
        for case in cases:
            ns = argparse.Namespace(**vars(args))
            if case.startswith("open-1x"):
                ns.open_rate = LATENCY_RATE
            res = run_throughput(srv, "derp", case, ns)
            res["variant"] = variant
            rows.append(res)
    finally:
        srv.stop()
    return rows


def _median_rows(runs: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    out = []
    for i, first in enumerate(runs[0]):
        row = dict(first)
        for k in ("pps", "mbps", "p50_us", "p99_us", "srv_us_per_pkt", "loss", "srv_cores", "gen_cores"):
            row[k] = statistics.median(r[i][k] for r in runs)
        out.append(row)
    return out


def table(rows: list[dict[str, Any]]) -> str:
    base = {r["case"]: r for r in rows if r["variant"] == "tcp"}
    lines = [
        f"{'variant':<8}{'case':<16}{'pkt/s':>10}{'MB/s':>8}{'p50 us':>9}{'p99 us':>9}"
        f"{'srv us/pkt':>11}{'srv cores':>10}{'gen cores':>10}{'loss':>7}"
        f"{'pkt/s vs tcp':>13}{'us/pkt vs tcp':>14}"
    ]
    for r in rows:
        b = base.get(r["case"])
        rel = f"{r['pps'] / b['pps']:.2f}x" if b and b["pps"] else "-"
        rel_cpu = (
            f"{r['srv_us_per_pkt'] / b['srv_us_per_pkt']:.2f}x"
            if b and b["srv_us_per_pkt"] == b["srv_us_per_pkt"] and b["srv_us_per_pkt"]
            else "-"
        )
        lines.append(
            f"{r['variant']:<8}{r['case']:<16}{r['pps']:>10.0f}{r['mbps']:>8.1f}"
            f"{r['p50_us']:>9.0f}{r['p99_us']:>9.0f}{r['srv_us_per_pkt']:>11.2f}"
            f"{r['srv_cores']:>10.2f}{r['gen_cores']:>10.2f}"
            f"{r['loss'] * 100:>6.1f}%{rel:>13}{rel_cpu:>14}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--cases", nargs="+", default=list(DEFAULT_CASES))
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--duration", type=float, default=3.0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--open-rate", type=float, default=LATENCY_RATE)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--json", default=None, help="write all rows to this file")
    p.add_argument("--serve", choices=["plain", "tls"], default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve:
        serve(args.serve)
        return 0
    raise_nofile_limit()
    runs: list[list[dict[str, Any]]] = []
    for i in range(args.repeat):
        rows: list[dict[str, Any]] = []
        for v in args.variants:
            rows += run_variant(v, args.cases, args)
        print(f"run {i + 1}/{args.repeat}\n{table(rows)}\n", flush=True)
        runs.append(rows)
    final = _median_rows(runs) if len(runs) > 1 else runs[0]
    if len(runs) > 1:
        print(f"medians of {len(runs)} runs\n{table(final)}")
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": runs, "medians": final}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
