"""DERP benchmark runner: starts the relays, drives the load generator, prints a table.

What one run measures (see ``bench/README.md``):

* throughput cases ``{closed|open}-{pairs}x{size}``: N sender/receiver pairs through
  the DERP server and, for comparison, through the byte-forwarding ceiling relay
  (``bench/ceiling_relay.py``); delivered packets/s, MB/s, loss, one-way latency
  p50/p99, server CPU per relayed packet, server RSS, generator CPU, DERP/ceiling;
* idle memory cases ``idle-{clients}``: the *marginal* server RSS per idle handshaked
  client, on a fresh server process (clients are added cumulatively: 1,000 then up to
  10,000; each row's KB/client is its RSS growth over the previous row divided by the
  clients added, so the base process and the first connections' one-time allocations
  are not averaged in).

Load: by default every packet is its own ``write`` (Tailscale's client flushes per
packet); ``--batched`` writes every packet due at once instead. Every delivered packet
is verified; lost, duplicated, reordered, misdelivered and corrupted packets are
counted separately and any non-zero count is printed after the row.

Every server runs in its own process so its CPU time (``/proc/<pid>/task/*/schedstat``,
ns resolution) and RSS (``VmRSS``) are read at the start and end of each
measurement window. Load comes from forked uvloop worker processes
(``bench/derp_loadgen.py``).

Usage::

    python bench/derp_bench.py                  # full matrix, ~4 min
    python bench/derp_bench.py --quick          # small subset, ~1 min
    python bench/derp_bench.py --quick --batched   # one write per batch of due packets
    python bench/derp_bench.py --cases closed-8x1400 idle-1000 --duration 5
    python bench/derp_bench.py --quick --json bench/results/run1.json
    python bench/derp_bench.py --cases closed-8x1400 --targets derp --profile bench/results/srv.prof

Internal: ``--serve-derp`` runs the DERP server (uvloop, 127.0.0.1:0) and prints
``PORT <n>``; the runner uses it to start the server under test.
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import json
import logging
import os
import select
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from derp_loadgen import IdleClients, LoadSpec, Target, raise_nofile_limit, run_load  # noqa: E402

__all__ = ["ServerProcess", "main", "parse_case", "verify_note", "FULL_CASES", "QUICK_CASES"]

RESULTS = HERE / "results"
FULL_CASES = [
    f"{mode}-{pairs}x{size}"
    for mode in ("closed", "open")
    for pairs in (1, 8, 32)
    for size in (64, 1024, 1400)
] + ["idle-1000", "idle-10000"]
QUICK_CASES = ["closed-1x1400", "closed-8x1400", "open-8x1400", "idle-1000", "idle-10000"]


# --------------------------------------------------------------------------- server processes


class ServerProcess:
    """A relay in a child process; reads its port, CPU time and RSS from /proc."""

    def __init__(self, name: str, argv: list[str]) -> None:
        RESULTS.mkdir(exist_ok=True)
        self.name = name
        self.log_path = RESULTS / f"{name}.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=self._log, cwd=HERE.parent)
        self.port = self._read_port(timeout=30)

    def _read_port(self, timeout: float) -> int:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        line = b""
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.5)
            if ready:
                line = self.proc.stdout.readline()
                if line.startswith(b"PORT "):
                    return int(line.split()[1])
                if not line:
                    break
            if self.proc.poll() is not None:
                break
        self.stop()
        tail = self.log_path.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{self.name} did not start (last line {line!r}); log:\n{tail}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cpu_s(self) -> float:
        """CPU seconds used by all threads of the server (scheduler ns counters)."""
        return self.schedstat()[0]

    def schedstat(self) -> tuple[float, float]:
        """(on-CPU, runnable-but-waiting) seconds summed over the server's threads."""
        run = wait = 0
        for path in glob.glob(f"/proc/{self.pid}/task/*/schedstat"):
            try:
                with open(path) as f:
                    fields = f.read().split()
                run += int(fields[0])
                wait += int(fields[1])
            except (OSError, ValueError, IndexError):
                pass
        return run / 1e9, wait / 1e9

    def rss_bytes(self) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def fd_count(self) -> int:
        """Open file descriptors of the server (sanity check for idle clients)."""
        try:
            return len(os.listdir(f"/proc/{self.pid}/fd"))
        except OSError:
            return -1

    def syscalls(self) -> tuple[int, int]:
        """(read-like, write-like) system calls of the server so far (``/proc/<pid>/io``)."""
        r = w = 0
        try:
            with open(f"/proc/{self.pid}/io") as f:
                for line in f:
                    if line.startswith("syscr:"):
                        r = int(line.split()[1])
                    elif line.startswith("syscw:"):
                        w = int(line.split()[1])
        except OSError:
            pass
        return r, w

    def sample(
        self,
    ) -> tuple[tuple[float, float], int, tuple[float, float], tuple[int, int]]:
        return self.schedstat(), self.rss_bytes(), host_cpu(), self.syscalls()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log.close()


def host_cpu() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    hz = os.sysconf("SC_CLK_TCK")
    user, nice, system, idle, iowait, irq, softirq = fields[:7]
    steal = fields[7] if len(fields) > 7 else 0
    return (user + nice + system + irq + softirq) / hz, steal / hz


def start_derp(profile: str | None = None) -> ServerProcess:
    argv = [sys.executable, str(Path(__file__).resolve()), "--serve-derp"]
    if profile:
        argv += ["--profile", profile]
    return ServerProcess("derp-server", argv)


def start_ceiling() -> ServerProcess:
    return ServerProcess("ceiling-relay", [sys.executable, str(HERE / "ceiling_relay.py")])


def serve_until_signal(config: Any, port: int = 0, profile: str | None = None) -> None:
    """Run ``DerpServer(config)`` on uvloop at 127.0.0.1:``port`` until SIGTERM/SIGINT.

    Prints ``PORT n`` once listening (the runner reads it). The body of every
    server process the DERP benches start; ``profile`` writes cProfile stats.
    """
    import cProfile

    import uvloop

    from derp.server import DerpServer

    raise_nofile_limit()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    prof = cProfile.Profile() if profile else None

    async def run() -> None:
        srv = DerpServer(config)
        await srv.start("127.0.0.1", port)
        print(f"PORT {srv.port}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        if prof is not None:
            prof.enable()
        await stop.wait()
        if prof is not None:
            prof.disable()
        await srv.stop()

    uvloop.run(run())
    if prof is not None and profile:
        prof.dump_stats(profile)


def serve_derp(profile: str | None) -> None:
    """Run the DERP server on uvloop at 127.0.0.1:0 until SIGTERM (the process under test)."""
    from derp.keys import PrivateKey
    from derp.server import ServerConfig

    serve_until_signal(ServerConfig(private_key=PrivateKey.generate()), profile=profile)


# --------------------------------------------------------------------------- cases


def parse_case(case: str) -> tuple[str, int, int]:
    """``closed-8x1400`` -> ("closed", 8, 1400); ``idle-1000`` -> ("idle", 1000, 0)."""
    mode, _, rest = case.partition("-")
    if mode == "idle":
        return mode, int(rest), 0
    if mode not in ("closed", "open") or "x" not in rest:
        raise ValueError(f"bad case {case!r}: want closed-NxSIZE, open-NxSIZE or idle-N")
    pairs, size = rest.split("x")
    return mode, int(pairs), int(size)


def run_throughput(
    srv: ServerProcess, kind: str, case: str, args: argparse.Namespace
) -> dict[str, Any]:
    mode, pairs, size = parse_case(case)
    spec = LoadSpec(
        pairs=pairs,
        size=size,
        mode=mode,
        warmup=args.warmup,
        duration=args.duration,
        rate=args.open_rate,
        per_packet=not getattr(args, "batched", False),
        drain=getattr(args, "drain", 1.0),
    )
    target = Target(kind, "127.0.0.1", srv.port)
    res = run_load(target, spec, workers=args.workers, on_window_start=srv.sample, on_window_end=srv.sample)
    ((c0, w0), _, h0, io0), ((c1, w1), rss, h1, io1) = res.pop("start_sample"), res.pop("end_sample")
    win = res["win_recv"] or float("nan")
    res.update(
        target=kind,
        case=case,
        srv_cpu_s=c1 - c0,
        srv_us_per_pkt=(c1 - c0) / res["win_recv"] * 1e6 if res["win_recv"] else float("nan"),
        srv_rss_mb=rss / 1e6,
        gen_cores=res["gen_cpu_s"] / res["window_s"],
        srv_cores=(c1 - c0) / res["window_s"],
        srv_wait=(w1 - w0) / res["window_s"],
        # socket reads and writes per relayed packet (both relays: what batching the load allowed)
        srv_reads_per_pkt=(io1[0] - io0[0]) / win,
        srv_writes_per_pkt=(io1[1] - io0[1]) / win,
        host_cores=(h1[0] - h0[0]) / res["window_s"],
        steal_cores=(h1[1] - h0[1]) / res["window_s"],
        offered_pps=(res["sent"] + res["gen_skipped"]) / (args.warmup + args.duration),
    )
    return res


def verify_note(r: dict[str, Any]) -> str:
    """``""`` if every packet arrived intact and in order, else what went wrong."""
    parts = [
        f"{r[k]} {k}"
        for k in ("lost", "duplicated", "reordered", "misdelivered", "corrupted")
        if r.get(k)
    ]
    parts += [f"error: {e}" for e in r.get("errors", [])[:3]]
    return ("  !! " + ", ".join(parts)) if parts else ""


def run_idle(counts: list[int], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Add idle clients cumulatively to a fresh DERP server; report marginal RSS per client.

    Each row's ``kb_per_client`` is (RSS - previous row's RSS) / (clients -
    previous row's clients): what one more idle connection costs at that scale.
    The first row's previous point is the warmed-up server with no client
    (``kb_from_base`` keeps the old average over all clients for reference).
    """
    rows: list[dict[str, Any]] = []
    srv = start_derp()
    idle = IdleClients()
    try:
        target = Target("derp", "127.0.0.1", srv.port)
        # warm the server with one short-lived batch so one-time allocations are not billed
        warm = IdleClients()
        warm.add(target, 50, procs=1)
        warm.close()
        time.sleep(0.5)
        base = srv.rss_bytes()
        prev_rss, prev_n = base, 0
        for n in sorted(counts):
            add = n - idle.count
            if add > 0:
                t0 = time.monotonic()
                idle.add(target, add, procs=args.idle_procs)
                setup_s = time.monotonic() - t0
            else:
                setup_s = 0.0
            time.sleep(1.0)  # let the server finish post-handshake work before sampling
            rss = srv.rss_bytes()
            fds = srv.fd_count()
            rows.append(
                dict(
                    target="derp",
                    case=f"idle-{n}",
                    clients=idle.count,
                    server_fds=fds,
                    base_rss_mb=base / 1e6,
                    rss_mb=rss / 1e6,
                    kb_per_client=(rss - prev_rss) / max(1, idle.count - prev_n) / 1e3,
                    marginal_from=prev_n,
                    kb_from_base=(rss - base) / max(1, idle.count) / 1e3,
                    setup_s=setup_s,
                )
            )
            prev_rss, prev_n = rss, idle.count
            print(_idle_line(rows[-1]), flush=True)
    finally:
        idle.close()
        srv.stop()
    return rows


# --------------------------------------------------------------------------- output


def _fmt(v: float, nd: int = 1) -> str:
    if v != v:  # NaN
        return "-"
    return f"{v:,.{nd}f}"


def _idle_line(r: dict[str, Any]) -> str:
    return (
        f"  idle {r['clients']:>6} clients: RSS {r['rss_mb']:.1f} MB "
        f"(base {r['base_rss_mb']:.1f} MB) -> {r['kb_per_client']:.2f} KB/client marginal "
        f"over {r['marginal_from']:,} -> {r['clients']:,} clients "
        f"({r['kb_from_base']:.2f} KB averaged from the base), server has {r['server_fds']} fds"
    )


def table(rows: list[dict[str, Any]]) -> str:
    tp = [r for r in rows if not r["case"].startswith("idle")]
    idle = [r for r in rows if r["case"].startswith("idle")]
    ceiling = {r["case"]: r["pps"] for r in tp if r["target"] == "ceiling"}
    out = []
    if tp:
        out.append(
            "| target | case | offered pkt/s | delivered pkt/s | MB/s | loss % | p50 µs | p99 µs "
            "| srv CPU µs/pkt | srv reads/pkt | srv writes/pkt | srv cores | srv runq wait | srv RSS MB "
            "| gen cores | host busy cores | vs ceiling |"
        )
        out.append("|" + "---|" * 17)
        for r in tp:
            ratio = ""
            if r["target"] == "derp" and ceiling.get(r["case"]):
                ratio = f"{r['pps'] / ceiling[r['case']]:.2f}"
            out.append(
                f"| {r['target']} | {r['case']} | {_fmt(r['offered_pps'], 0)} | {_fmt(r['pps'], 0)} "
                f"| {_fmt(r['mbps'])} | {_fmt(100 * r['loss'], 2)} | {_fmt(r['p50_us'], 0)} "
                f"| {_fmt(r['p99_us'], 0)} | {_fmt(r['srv_us_per_pkt'], 2)} "
                f"| {_fmt(r.get('srv_reads_per_pkt', float('nan')), 2)} "
                f"| {_fmt(r.get('srv_writes_per_pkt', float('nan')), 2)} | {_fmt(r['srv_cores'], 2)} "
                f"| {_fmt(r['srv_wait'], 2)} "
                f"| {_fmt(r['srv_rss_mb'])} | {_fmt(r['gen_cores'], 2)} | {_fmt(r['host_cores'], 2)} | {ratio} |"
            )
    if idle:
        out.append("")
        out.append(
            "| idle clients | server fds | server RSS MB | base RSS MB | marginal KB per client "
            "| (over clients) | KB per client from base | connect s |"
        )
        out.append("|---|---|---|---|---|---|---|---|")
        for r in idle:
            out.append(
                f"| {r['clients']:,.0f} | {r['server_fds']:,.0f} | {_fmt(r['rss_mb'])} | {_fmt(r['base_rss_mb'])} "
                f"| {_fmt(r['kb_per_client'], 2)} | {r['marginal_from']:,.0f} → {r['clients']:,.0f} "
                f"| {_fmt(r['kb_from_base'], 2)} | {_fmt(r['setup_s'])} |"
            )
    return "\n".join(out)


def run_once(
    tp_cases: list[str], idle_counts: list[int], targets: list[str], args: argparse.Namespace
) -> list[dict[str, Any]]:
    """Run every case once (fresh server processes) and return the rows."""
    rows: list[dict[str, Any]] = []
    servers: dict[str, ServerProcess] = {}
    try:
        if tp_cases:
            if "derp" in targets:
                servers["derp"] = start_derp(args.profile)
            if "ceiling" in targets:
                servers["ceiling"] = start_ceiling()
            for case in tp_cases:
                for kind in targets:
                    r = run_throughput(servers[kind], kind, case, args)
                    rows.append(r)
                    print(
                        f"  {kind:8} {case:14} {r['pps']:>10,.0f} pkt/s  loss {100 * r['loss']:.2f}%"
                        f"  p50 {r['p50_us']:,.0f} µs  p99 {r['p99_us']:,.0f} µs"
                        f"  srv {r['srv_us_per_pkt']:.2f} µs/pkt"
                        f" ({r['srv_reads_per_pkt']:.2f} reads, {r['srv_writes_per_pkt']:.2f} writes/pkt)"
                        f"  gen {r['gen_cores']:.2f} cores"
                        f"  srv waited {r['srv_wait']:.2f} s/s  host {r['host_cores']:.2f} busy"
                        f"{verify_note(r)}",
                        flush=True,
                    )
    finally:
        for srv in servers.values():
            srv.stop()
    if idle_counts and "derp" in targets:
        rows.extend(run_idle(idle_counts, args))
    return rows


def median_rows(runs: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per (target, case), the median of every numeric field over the runs."""
    out: list[dict[str, Any]] = []
    for i, first in enumerate(runs[0]):
        same = [run[i] for run in runs if i < len(run)]
        row: dict[str, Any] = {}
        for k, v in first.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                vals = [r[k] for r in same if isinstance(r.get(k), (int, float))]
                vals = [x for x in vals if x == x]  # drop NaN
                row[k] = statistics.median(vals) if vals else float("nan")
            else:
                row[k] = v
        out.append(row)
    return out


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="DERP relay benchmark (see bench/README.md)")
    p.add_argument("--quick", action="store_true", help=f"run {' '.join(QUICK_CASES)}")
    p.add_argument("--cases", nargs="+", help="cases, e.g. closed-8x1400 open-1x64 idle-10000")
    p.add_argument("--targets", default="derp,ceiling", help="comma list of derp,ceiling")
    p.add_argument("--duration", type=float, help="measured seconds per case (3; quick 2)")
    p.add_argument("--warmup", type=float, help="unmeasured seconds before the window (1; quick 0.5)")
    p.add_argument("--workers", type=int, default=2, help="load generator processes")
    p.add_argument("--idle-procs", type=int, default=2, help="processes holding idle clients")
    p.add_argument("--open-rate", type=float, default=100_000, help="open loop: total offered pkt/s")
    p.add_argument("--per-packet", action="store_true",
                   help="one write per packet, as Tailscale's client (the default; kept for old commands)")
    p.add_argument("--batched", action="store_true",
                   help="one write per batch of due packets instead of one per packet")
    p.add_argument("--repeat", type=int, default=1, help="run everything N times, print medians")
    p.add_argument("--json", help="write all rows to this JSON file")
    p.add_argument("--profile", help="run the DERP server under cProfile, dump stats here")
    p.add_argument("--serve-derp", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.serve_derp:
        serve_derp(args.profile)
        return 0

    cases = args.cases or (QUICK_CASES if args.quick else FULL_CASES)
    cases = [c for arg in cases for c in arg.split(",") if c]
    for c in cases:
        parse_case(c)
    if args.duration is None:
        args.duration = 2.0 if args.quick else 3.0
    if args.warmup is None:
        args.warmup = 0.5 if args.quick else 1.0
    targets = [t for t in args.targets.split(",") if t]
    raise_nofile_limit()

    tp_cases = [c for c in cases if not c.startswith("idle")]
    idle_counts = [parse_case(c)[1] for c in cases if c.startswith("idle")]
    t_begin = time.monotonic()
    runs: list[list[dict[str, Any]]] = []
    for rep in range(args.repeat):
        if args.repeat > 1:
            print(f"run {rep + 1}/{args.repeat}", flush=True)
        rows = run_once(tp_cases, idle_counts, targets, args)
        runs.append(rows)
        if args.repeat > 1:
            print()
            print(table(rows))
            print()
    rows = runs[0] if len(runs) == 1 else median_rows(runs)
    print()
    if len(runs) > 1:
        print(f"Median of {len(runs)} runs:\n")
    print(table(rows))
    print(
        f"\n({len(rows)} rows, {len(runs)} run(s) in {time.monotonic() - t_begin:.0f} s; "
        f"duration {args.duration} s, warmup {args.warmup} s, {args.workers} generator "
        f"processes, open loop {args.open_rate:,.0f} pkt/s offered in total, "
        f"{'batched' if args.batched else 'per-packet'} writes)"
    )
    if args.profile and tp_cases and "derp" in targets:
        import pstats

        print(f"\nDERP server profile ({args.profile}), top functions by own time:")
        pstats.Stats(args.profile).sort_stats("tottime").print_stats(25)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"median" if len(runs) > 1 else "rows": rows, "runs": runs}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
