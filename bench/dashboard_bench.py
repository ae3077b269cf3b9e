"""Does an open dashboard slow the relay? Relay packets/s with and without a live feed.

One DERP server process (uvloop, the same ``serve_until_signal`` as ``derp_bench.py``)
serves both conditions. Two ways to compare them:

* ``--mode interleaved`` (default): one long load run per case, cut into
  ``--windows`` windows of ``--window`` seconds in ABBA order (off, on, on, off,
  …): the feed is opened or closed at each boundary and the relay's own
  ``packets_sent`` counter (``/debug/vars``, read at every boundary in both
  conditions) gives each window's rate. Neighbouring windows share the same
  clients and nearly the same machine load, so drift and other jobs cancel out
  far better than between separate runs;
* ``--mode runs``: separate load runs, alternating off/on (``--runs`` each).

On a shared machine both are noisy (other jobs move the rate by tens of percent
from one second to the next), so the bench also prints the deterministic cost:
``--tick-cost`` times one dashboard tick (sample + JSON + fan-out) in-process with
16 and 1,000 connected DERP clients, which bounds what an open dashboard can take
from the relay's event loop (tick time / tick interval). "On" means a dashboard is open and
streaming: a reader in the runner process holds ``GET /dashboard/events`` and
checks that snapshots keep arriving (at least one per second during the window,
each a JSON document whose relay packet total keeps rising). Load is the usual
generator (``bench/derp_loadgen.py``, 2 worker processes, every delivered packet
verified):

* ``closed-32x64 window 1`` — per-packet clients: every write carries exactly one
  packet and waits for it to arrive before the next, so the relay sees one packet
  per read (the case most sensitive to anything added per read);
* ``closed-8x1400`` — the throughput case of ``derp_bench.py`` (32 in flight per pair).

``--target stack`` runs the same against ``tailnet serve``'s embedded relay (a
:class:`~tailnet.stack.TailnetStack` process; the load reaches ``/derp`` through its
HTTP port, the feed is the admin dashboard's, with coordinator and health data).

Target: packets/s with the dashboard ≥ 0.97 × without (medians). The dashboard's
numbers come from counters the hot path already keeps (``ServerStats``) and the
kernel's per-socket ``TCP_INFO`` byte counters, read once per second; nothing is
added per packet.

Usage::

    python bench/dashboard_bench.py --runs 5          # ~2.5 min
    python bench/dashboard_bench.py --runs 3 --duration 2 --cases closed-32x64/1
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from derp_bench import ServerProcess, parse_case  # noqa: E402
from derp_loadgen import LoadSpec, Target, run_load  # noqa: E402

DEFAULT_CASES = ["closed-32x64/1", "closed-8x1400/32"]


class FeedReader(threading.Thread):
    """Holds ``/dashboard/events`` open; records each snapshot's arrival and packet total."""

    def __init__(self, port: int, token: str = "") -> None:
        super().__init__(daemon=True)
        self.port = port
        self.snapshots: list[tuple[float, int]] = []
        self.error: str | None = None
        self._halt = threading.Event()
        self._sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        auth = f"Coder-Session-Token: {token}\r\n" if token else ""
        self._sock.sendall(
            f"GET /dashboard/events HTTP/1.1\r\nHost: bench\r\n{auth}\r\n".encode()
        )

    def run(self) -> None:
        buf = b""
        try:
            while not self._halt.is_set():
                chunk = self._sock.recv(1 << 16)
                if not chunk:
                    if not self._halt.is_set():
                        self.error = "feed closed by the server"
                    return
                buf += chunk
                while b"\n\n" in buf:
                    event, buf = buf.split(b"\n\n", 1)
                    if b"event: snapshot" not in event:
                        continue
                    data = event[event.index(b"data: ") + 6 :].split(b"\r\n", 1)[0]
                    snap = json.loads(data)
                    self.snapshots.append(
                        (time.monotonic(), int(snap["relay"]["totals"]["packets_out"]))
                    )
        except OSError as exc:
            if not self._halt.is_set():
                self.error = repr(exc)

    def close(self) -> None:
        self._halt.set()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()


def start_server(target: str, token_file: Path) -> ServerProcess:
    if target == "stack":
        return ServerProcess(
            "dashboard-bench-stack",
            [sys.executable, str(Path(__file__).resolve()), "--serve-stack", str(token_file)],
        )
    return ServerProcess("dashboard-bench-derp", [sys.executable, str(HERE / "derp_bench.py"), "--serve-derp"])


def serve_stack(token_file: str) -> None:
    """A TailnetStack (in memory, HTTP on 127.0.0.1:0, GC tuned as ``tailnet serve``)
    until SIGTERM; writes the admin token to ``token_file`` and prints ``PORT n``."""
    import asyncio
    import logging
    import signal

    import uvloop

    from derp_loadgen import raise_nofile_limit
    from tailnet.config import StackConfig
    from tailnet.stack import TailnetStack
    from tailnet.tuning import tune_gc

    raise_nofile_limit()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    tune_gc()

    async def run() -> None:
        stack = TailnetStack(StackConfig(http_addr="127.0.0.1:0", grpc_addr=None,
                                         stun_addr=None, data_dir=None))
        await stack.start()
        Path(token_file).write_text(stack.admin_token)
        print(f"PORT {stack.http_port}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await stack.stop(grace=1.0)

    uvloop.run(run())


def one_run(srv: ServerProcess, case: str, dashboard: bool, args: argparse.Namespace) -> dict[str, Any]:
    name, _, window = case.partition("/")
    mode, pairs, size = parse_case(name)
    spec = LoadSpec(pairs=pairs, size=size, mode=mode, warmup=args.warmup,
                    duration=args.duration, window=int(window or 32))
    reader = FeedReader(srv.port, args.token) if dashboard else None
    if reader is not None:
        reader.start()
        time.sleep(1.2)  # the feed is live (first snapshot + one tick) before the load starts
    marks: dict[str, float] = {}

    def start_mark() -> tuple[float, float]:
        marks["t0"] = time.monotonic()
        return srv.schedstat()

    def end_mark() -> tuple[float, float]:
        marks["t1"] = time.monotonic()
        return srv.schedstat()

    try:
        res = run_load(Target("derp", "127.0.0.1", srv.port), spec, workers=args.workers,
                       on_window_start=start_mark, on_window_end=end_mark)
    finally:
        if reader is not None:
            reader.close()
            reader.join(5)
    (c0, _), (c1, _) = res.pop("start_sample"), res.pop("end_sample")
    row = {
        "case": case,
        "dashboard": dashboard,
        "pps": res["pps"],
        "loss": res["loss"],
        "us_per_pkt": (c1 - c0) / res["win_recv"] * 1e6 if res["win_recv"] else float("nan"),
    }
    if reader is not None:
        inside = [(t, n) for t, n in reader.snapshots if marks["t0"] <= t <= marks["t1"]]
        gaps = [b[0] - a[0] for a, b in zip(inside, inside[1:])]
        row["snapshots"] = len(inside)
        row["max_gap_s"] = max(gaps) if gaps else float("nan")
        rising = all(b[1] > a[1] for a, b in zip(inside, inside[1:]))
        if reader.error or len(inside) < args.duration - 1 or not rising:
            raise RuntimeError(
                f"dashboard feed not live during the window: {len(inside)} snapshots, "
                f"rising={rising}, error={reader.error}"
            )
    return row


def _relay_packets_sent(port: int) -> int:
    """The relay's ``packets_sent`` counter from ``/debug/vars`` (derper or the stack)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET /debug/vars HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(1 << 16):
            data += chunk
    doc = json.loads(data.split(b"\r\n\r\n", 1)[1])
    return int(doc.get("derp", doc)["packets_sent"])


def interleaved(srv: ServerProcess, case: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """One load run; ABBA windows with the feed closed/open (see the module docstring)."""
    name, _, window = case.partition("/")
    mode, pairs, size = parse_case(name)
    n = args.windows
    order = [(i % 4) in (1, 2) for i in range(n)]  # off, on, on, off, ...
    spec = LoadSpec(pairs=pairs, size=size, mode=mode, warmup=args.warmup,
                    duration=n * args.window + 0.5, window=int(window or 32))
    rows: list[dict[str, Any]] = []
    errors: list[BaseException] = []
    go = threading.Event()

    def windows() -> None:
        try:
            go.wait(120)
            reader: FeedReader | None = None
            for on in order:
                if on and reader is None:
                    reader = FeedReader(srv.port, args.token)
                    reader.start()
                elif not on and reader is not None:
                    reader.close()
                    reader.join(5)
                    reader = None
                t0, c0, p0 = time.monotonic(), srv.cpu_s(), _relay_packets_sent(srv.port)
                time.sleep(args.window)  # the window itself: wall time is the measure
                t1, c1, p1 = time.monotonic(), srv.cpu_s(), _relay_packets_sent(srv.port)
                row: dict[str, Any] = {
                    "case": case, "dashboard": on, "pps": (p1 - p0) / (t1 - t0),
                    "us_per_pkt": (c1 - c0) / (p1 - p0) * 1e6 if p1 > p0 else float("nan"),
                }
                if reader is not None:
                    row["snapshots"] = sum(1 for t, _ in reader.snapshots if t0 <= t <= t1)
                    if reader.error:
                        raise RuntimeError(f"dashboard feed failed: {reader.error}")
                rows.append(row)
            if reader is not None:
                reader.close()
                reader.join(5)
        except BaseException as exc:  # reported by the caller
            errors.append(exc)

    t = threading.Thread(target=windows, daemon=True)
    t.start()
    res = run_load(Target("derp", "127.0.0.1", srv.port), spec, workers=args.workers,
                   on_window_start=go.set)
    t.join(30)
    if errors:
        raise errors[0]
    on_rows = [r for r in rows if r["dashboard"]]
    if any(r["snapshots"] < args.window - 1 for r in on_rows):
        raise RuntimeError(f"dashboard feed not live in every window: {on_rows}")
    for r in rows:
        extra = f" snapshots {r['snapshots']}" if r["dashboard"] else ""
        print(f"{case:<18} dashboard={'on ' if r['dashboard'] else 'off'} "
              f"{r['pps']:>10,.0f} pkt/s  {r['us_per_pkt']:.2f} µs/pkt{extra}", flush=True)
    print(f"{case:<18} load loss {res['loss']:.4f}", flush=True)
    return rows


def tick_cost(conns: int, rounds: int = 200) -> tuple[float, float]:
    """Mean µs of one derper and one stack dashboard tick with ``conns`` DERP clients."""
    import asyncio

    import uvloop

    from derp.client import DerpClient
    from derp.keys import PrivateKey
    from derp_loadgen import raise_nofile_limit
    from tailnet.config import StackConfig
    from tailnet.stack import TailnetStack

    raise_nofile_limit()

    async def run() -> tuple[float, float]:
        stack = TailnetStack(StackConfig(http_addr="127.0.0.1:0", grpc_addr=None,
                                         stun_addr=None, data_dir=None))
        await stack.start()
        assert stack.derp_server is not None and stack.pages is not None
        clients = [DerpClient(stack.derp_url, PrivateKey.generate()) for _ in range(conns)]
        try:
            for i in range(0, conns, 100):
                await asyncio.gather(*(c.connect() for c in clients[i:i + 100]))
            out = []
            for build in (stack.derp_server.dashboard._build, stack.pages._build):
                build()  # first sample: no rates yet
                t0 = time.perf_counter()
                for _ in range(rounds):
                    build()
                out.append((time.perf_counter() - t0) / rounds * 1e6)
            return out[0], out[1]
        finally:
            await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
            await stack.stop(grace=1.0)

    return uvloop.run(run())


def paired_ratio(rows: list[dict[str, Any]]) -> float:
    """Median over ABBA blocks (off, on, on, off) of the block's on/off packet rate."""
    blocks = []
    for b in range(0, len(rows) - 3, 4):
        w = rows[b : b + 4]
        on = sum(r["pps"] for r in w if r["dashboard"])
        off = sum(r["pps"] for r in w if not r["dashboard"])
        if off > 0:
            blocks.append(on / off)
    return statistics.median(blocks) if blocks else float("nan")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--mode", choices=("interleaved", "runs"), default="interleaved")
    p.add_argument("--windows", type=int, default=16, help="interleaved: windows per case")
    p.add_argument("--window", type=float, default=2.0, help="interleaved: seconds per window")
    p.add_argument("--runs", type=int, default=5, help="runs mode: runs per condition")
    p.add_argument("--cases", nargs="+", default=DEFAULT_CASES,
                   help="closed-PAIRSxSIZE[/WINDOW] (default: %(default)s)")
    p.add_argument("--duration", type=float, default=3.0, help="measured seconds per run")
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--json", help="write all rows here")
    p.add_argument("--target", choices=("derp", "stack"), default="derp",
                   help="derper's relay (default) or tailnet serve's embedded relay")
    p.add_argument("--serve-stack", metavar="TOKEN_FILE", help=argparse.SUPPRESS)
    p.add_argument("--tick-cost", action="store_true",
                   help="only time one dashboard tick in-process (16 and 1,000 clients)")
    args = p.parse_args(argv)
    if args.tick_cost:
        for n in (16, 1000):
            relay_us, stack_us = tick_cost(n)
            print(f"{n:>5} DERP clients: one tick {relay_us:,.0f} µs (derper), "
                  f"{stack_us:,.0f} µs (stack, incl. coordinator) = "
                  f"{relay_us / 1e4:.3f} % / {stack_us / 1e4:.3f} % of one core at 1 tick/s")
        return 0
    if args.serve_stack:
        serve_stack(args.serve_stack)
        return 0
    import tempfile

    token_file = Path(tempfile.mkdtemp(prefix="dash-bench-")) / "token"
    srv = start_server(args.target, token_file)
    args.token = token_file.read_text() if args.target == "stack" else ""
    rows: list[dict[str, Any]] = []
    try:
        with open("/proc/loadavg") as f:
            load_before = f.read().split()[:3]
        for case in args.cases:
            if args.mode == "interleaved":
                rows.extend(interleaved(srv, case, args))
                continue
            for i in range(args.runs):
                for dashboard in ((False, True) if i % 2 == 0 else (True, False)):
                    row = one_run(srv, case, dashboard, args)
                    rows.append(row)
                    extra = (f" snapshots {row['snapshots']} max gap {row['max_gap_s']:.2f}s"
                             if dashboard else "")
                    print(f"{case:<18} dashboard={'on ' if dashboard else 'off'} "
                          f"{row['pps']:>10,.0f} pkt/s  {row['us_per_pkt']:.2f} µs/pkt "
                          f"loss {row['loss']:.4f}{extra}", flush=True)
        with open("/proc/loadavg") as f:
            load_after = f.read().split()[:3]
    finally:
        srv.stop()
    print()
    print(f"target {args.target}; load average before {' '.join(load_before)}, "
          f"after {' '.join(load_after)}")
    per = args.windows // 2 if args.mode == "interleaved" else args.runs
    unit = f"{args.window:g} s windows" if args.mode == "interleaved" else "runs"
    print(f"{'case':<18} {'off pkt/s':>12} {'on pkt/s':>12} {'on/off':>7} "
          f"{'off µs/pkt':>10} {'on µs/pkt':>10} {'CPU on/off':>10}  (medians of {per} {unit})")
    ok = True
    for case in args.cases:
        off = [r for r in rows if r["case"] == case and not r["dashboard"]]
        on = [r for r in rows if r["case"] == case and r["dashboard"]]
        off_pps = statistics.median(r["pps"] for r in off)
        on_pps = statistics.median(r["pps"] for r in on)
        ratio = on_pps / off_pps
        if args.mode == "interleaved":
            ratio = paired_ratio([r for r in rows if r["case"] == case])
        ok = ok and ratio >= 0.97
        off_us = statistics.median(r["us_per_pkt"] for r in off)
        on_us = statistics.median(r["us_per_pkt"] for r in on)
        print(f"{case:<18} {off_pps:>12,.0f} {on_pps:>12,.0f} {ratio:>7.3f} "
              f"{off_us:>10.2f} {on_us:>10.2f} {on_us / off_us:>10.3f}")
    if args.mode == "interleaved":
        print("on/off = median over ABBA blocks of (on + on) / (off + off) packets/s")
    print("target on/off >= 0.97:", "met" if ok else "MISSED")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
