"""Coordinator benchmark: real gRPC over 127.0.0.1, coordinator and load in separate processes.

Usage::

    python bench/coord_bench.py --quick                 # 500 agents + 500 clients, < 1 min
    python bench/coord_bench.py                         # 5,000 + 5,000 (target config)
    python bench/coord_bench.py --agents 2000 --clients 4000 --rate 2000 --duration 10
    python bench/coord_bench.py --runs 3 --json out.json  # medians over 3 runs
    python bench/coord_bench.py --quick --profile /tmp/coord.prof   # cProfile the coordinator

Processes:

* **coordinator** (this script with ``--serve``): TailnetService + TailnetGrpcServer
  under uvloop, a StaticTokenAuthenticator with generated tokens (``agent-<i>``
  → agent ``i``; ``client-<j>`` → a user bound via ``tailnet-agent-id`` to agent
  ``j % A``), one ``StaticDERPMapSource``; ``tailnet.tuning.tune_gc()`` like
  ``tailnet serve`` unless ``--no-gc-tuning``. Prints ``{"port", "pid"}`` and serves
  until stdin closes. With ``--profile`` it runs under cProfile and prints the top
  functions to stderr on exit.
* **load generators** (``bench/coord_loadgen.py`` × ``--gens``): raw gRPC stubs,
  each owning a slice of the peers (see its docstring).

Measured (coordinator process only for RSS/CPU, via ``/proc/<pid>``):

1. *connect*: time until every stream is open and every tunnel has exchanged
   nodes in both directions (each client got its agent's NODE and vice versa).
2. *RSS per peer*: (VmRSS after connect − VmRSS before) / peers.
3. *fan-out latency* at ``--rate`` node updates/s (spread over all peers,
   agents and clients alike) for ``--duration`` s: sender's ``time.time_ns()`` in
   ``Node.as_of`` → receiver's clock on receipt, for every tunnel peer.
4. *CPU per delivered update*: coordinator utime+stime during step 3 divided by
   NODE updates delivered (agents also send READY_FOR_HANDSHAKE acks, as real
   agents do, unless ``--no-acks``; that work is included).
5. *max sustained rate*: rates are stepped up; a step passes while p99 ≤ 100 ms,
   ≥ 97 % of the updates sent are delivered and the generators kept up with
   the offered rate. Reported: the highest passing step.

The load generators share the 2 cores with the coordinator, so latencies include
their scheduling delay: numbers are an upper bound for the coordinator alone.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import statistics
import subprocess
import sys
import time
import tracemalloc
import uuid
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from coord_loadgen import agent_id, client_user_id  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
#: tailnet.tuning.DEFAULT_GC_THRESHOLDS (not imported here: the orchestrator stays light).
DEFAULT_GC = (50_000, 50, 1000)


# --------------------------------------------------------------------------------------
# Coordinator process


async def _serve(args: argparse.Namespace) -> None:
    from tailnet.core import Coordinator
    from tailnet.derpmap import StaticDERPMapSource, embedded_region, new_derp_map
    from tailnet.identity import Principal, StaticTokenAuthenticator
    from tailnet.resume import ResumeTokenProvider
    from tailnet.server.grpc import TailnetGrpcServer
    from tailnet.service import TailnetService

    auth = StaticTokenAuthenticator()
    for i in range(args.agents):
        auth.add(f"agent-{i}", Principal("agent", agent_id(i), f"bench-ws-{i}"))
    for j in range(args.clients):
        auth.add(f"client-{j}", Principal("user", client_user_id(j), f"user-{j}"))

    async def allow(_p: Principal, _agent: uuid.UUID) -> bool:
        return True

    svc = TailnetService(
        coordinator=Coordinator(),
        authenticator=auth,
        derp_maps=StaticDERPMapSource(
            new_derp_map(embedded_region("127.0.0.1", 3340, scheme="http"))
        ),
        resume=ResumeTokenProvider(),
        tunnel_authorizer=allow,
    )
    srv = TailnetGrpcServer(svc)
    await srv.start("127.0.0.1", 0)
    gc_stats = _GcStats()
    if args.gc_tuning:
        # What `tailnet serve` does by default (tailnet.tuning.tune_gc).
        from tailnet.tuning import parse_thresholds, tune_gc

        tune_gc(parse_thresholds(args.gc_threshold) if args.gc_threshold else DEFAULT_GC)
    elif args.gc_threshold:
        gc.set_threshold(*(int(x) for x in args.gc_threshold.split(",")))
    if args.tracemalloc:
        tracemalloc.start(1)
    print(json.dumps({"port": srv.port, "pid": os.getpid()}), flush=True)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while True:
        line = await reader.readline()
        if not line or line.strip() == b"stop":
            break
        if line.strip() == b"stats":
            print(json.dumps({"gc": gc_stats.snapshot()}), flush=True)
        elif line.strip() == b"freeze":
            # Experiment (--coord-gc-freeze): move every live object to the permanent
            # generation so full collections stop scanning the connected peers.
            gc.collect()
            gc.freeze()
            print(json.dumps({"frozen": gc.get_freeze_count()}), flush=True)
    if gc_stats.long_passes:
        print("long GC passes (gen, wall ms, thread CPU ms, collected):", file=sys.stderr)
        print(f"  {gc_stats.long_passes}", file=sys.stderr)
    if tracemalloc.is_tracing():
        snap = tracemalloc.take_snapshot()
        print("top Python allocation sites (live, by line):", file=sys.stderr)
        for stat in snap.statistics("lineno")[:20]:
            print(f"  {stat}", file=sys.stderr)
    await srv.stop(1.0)


class _GcStats:
    """Counts garbage-collector passes and their pause times (per generation)."""

    def __init__(self) -> None:
        self.count = [0, 0, 0]
        self.total_s = [0.0, 0.0, 0.0]
        self.max_s = [0.0, 0.0, 0.0]
        self.window_max_s = 0.0  # longest pause since the last snapshot
        self.long = 0  # pauses >= 50 ms
        self._t0 = 0.0
        self._c0 = 0.0
        # (generation, wall ms, CPU ms of this thread, objects collected) of long passes
        self.long_passes: list[tuple[int, float, float, int]] = []
        gc.callbacks.append(self._cb)

    def _cb(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
            self._c0 = time.thread_time()
            return
        g = info["generation"]
        dt = time.perf_counter() - self._t0
        if dt >= 0.05 and len(self.long_passes) < 50:
            self.long_passes.append(
                (g, round(dt * 1000, 1), round((time.thread_time() - self._c0) * 1000, 1),
                 info.get("collected", 0))
            )
        self.count[g] += 1
        self.total_s[g] += dt
        self.max_s[g] = max(self.max_s[g], dt)
        self.window_max_s = max(self.window_max_s, dt)
        if dt >= 0.05:
            self.long += 1

    def snapshot(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "count": list(self.count),
            "total_s": self.total_s[:],
            "max_s": self.max_s[:],
            "window_max_s": self.window_max_s,
            "long": self.long,
        }
        self.window_max_s = 0.0
        if tracemalloc.is_tracing():
            out["py_traced_mb"] = tracemalloc.get_traced_memory()[0] / 2**20
        return out


def serve_main(args: argparse.Namespace) -> None:
    import uvloop

    if args.profile:
        import cProfile
        import pstats

        prof = cProfile.Profile()
        prof.enable()
        try:
            uvloop.run(_serve(args))
        finally:
            prof.disable()
            prof.dump_stats(args.profile)
            st = pstats.Stats(prof, stream=sys.stderr).sort_stats("tottime")
            st.print_stats(25)
    else:
        uvloop.run(_serve(args))


# --------------------------------------------------------------------------------------
# Orchestrator


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def _cpu_s(pid: int) -> float:
    raw = Path(f"/proc/{pid}/stat").read_text()
    fields = raw[raw.rindex(")") + 2 :].split()
    # fields[0] is state (field 3); utime/stime are fields 14/15 (1-based).
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = min(len(xs) - 1, max(0, int(round(q / 100 * (len(xs) - 1)))))
    return xs[k]


class Gen:
    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc

    def send(self, msg: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()

    def recv(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"load generator exited (rc={self.proc.poll()})")
        out: dict[str, Any] = json.loads(line)
        return out


def _all(gens: list[Gen], msg: dict[str, Any]) -> list[dict[str, Any]]:
    for g in gens:
        g.send(msg)
    return [g.recv() for g in gens]


def _coord_gc(server: subprocess.Popen[str]) -> dict[str, Any]:
    assert server.stdin is not None and server.stdout is not None
    server.stdin.write("stats\n")
    server.stdin.flush()
    out: dict[str, Any] = json.loads(server.stdout.readline())["gc"]
    return out


def _run_step(
    gens: list[Gen], pid: int, rate: float, duration: float, server: subprocess.Popen[str]
) -> dict[str, Any]:
    gc0 = _coord_gc(server)
    cpu0 = _cpu_s(pid)
    gcpu0 = sum(_cpu_s(g.proc.pid) for g in gens)
    t0 = time.perf_counter()
    replies = _all(
        gens, {"cmd": "run", "rate": rate / len(gens), "duration": duration, "drain": 3.0}
    )
    wall = time.perf_counter() - t0
    cpu = _cpu_s(pid) - cpu0
    gen_cpu = sum(_cpu_s(g.proc.pid) for g in gens) - gcpu0
    gc1 = _coord_gc(server)
    lat = [x for r in replies for x in r["lat_ms"]]
    sent = sum(r["sent"] for r in replies)
    received = sum(r["received"] for r in replies)
    measured = len(lat)
    return {
        "rate": rate,
        "sent": sent,
        "achieved_rate": sent / duration,
        "received": received,
        "measured": measured,
        "delivery": measured / sent if sent else 0.0,
        "p50_ms": _pct(lat, 50),
        "p99_ms": _pct(lat, 99),
        "max_ms": max(lat) if lat else float("nan"),
        "rfh": sum(r["rfh"] for r in replies),
        "errors": sum(r["errors"] for r in replies),
        "send_errors": sum(r["send_errors"] for r in replies),
        "coord_cpu_s": cpu,
        "coord_cpu_util": cpu / wall,
        "gens_cpu_util": gen_cpu / wall,
        "coord_gc2_passes": gc1["count"][2] - gc0["count"][2],
        "coord_gc_max_ms": gc1["window_max_s"] * 1000,
        "coord_gc_long": gc1["long"] - gc0["long"],
        "cpu_us_per_update": cpu / received * 1e6 if received else float("nan"),
    }


def _passes(step: dict[str, Any]) -> bool:
    return bool(
        step["p99_ms"] <= 100.0
        and step["delivery"] >= 0.97
        and step["achieved_rate"] >= 0.9 * step["rate"]
        and step["errors"] == 0
    )


def run_once(args: argparse.Namespace) -> dict[str, Any]:
    py = sys.executable
    here = Path(__file__).resolve()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    serve_cmd = [
        py, str(here), "--serve", "--agents", str(args.agents), "--clients", str(args.clients)
    ]
    if args.profile:
        serve_cmd += ["--profile", args.profile]
    if args.tracemalloc:
        serve_cmd.append("--tracemalloc")
    if args.gc_threshold:
        serve_cmd += ["--gc-threshold", args.gc_threshold]
    if not args.gc_tuning:
        serve_cmd.append("--no-gc-tuning")
    server = subprocess.Popen(
        serve_cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
    )
    gens: list[Gen] = []
    try:
        assert server.stdout is not None
        info = json.loads(server.stdout.readline())
        port, pid = info["port"], info["pid"]
        rss0 = _rss_kb(pid)
        for k in range(args.gens):
            cmd = [
                py, str(here.parent / "coord_loadgen.py"),
                "--target", f"127.0.0.1:{port}",
                "--agents", str(args.agents), "--clients", str(args.clients),
                "--index", str(k), "--nproc", str(args.gens),
            ]
            if not args.acks:
                cmd.append("--no-acks")
            if args.gen_loop == "asyncio":
                cmd.append("--no-uvloop")
            gens.append(
                Gen(
                    subprocess.Popen(
                        cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
                    )
                )
            )
        peers = args.agents + args.clients
        t0 = time.perf_counter()
        ccpu0 = _cpu_s(pid)
        conn = _all(gens, {"cmd": "connect"})
        connect_s = time.perf_counter() - t0
        connect_cpu = _cpu_s(pid) - ccpu0
        streams_s = max(r["streams_s"] for r in conn)
        rss1 = _rss_kb(pid)
        py_mb = _coord_gc(server).get("py_traced_mb")
        if args.coord_gc_freeze:
            assert server.stdin is not None and server.stdout is not None
            server.stdin.write("freeze\n")
            server.stdin.flush()
            server.stdout.readline()
        result: dict[str, Any] = {
            "agents": args.agents,
            "clients": args.clients,
            "peers": peers,
            "gens": args.gens,
            "acks": args.acks,
            "coord_gc_freeze": args.coord_gc_freeze,
            "coord_gc_threshold": args.gc_threshold,
            "coord_gc_tuning": args.gc_tuning,
            "connect_s": connect_s,
            "streams_open_s": streams_s,
            "connect_coord_cpu_util": connect_cpu / connect_s,
            "rss_base_mb": rss0 / 1024,
            "rss_connected_mb": rss1 / 1024,
            "rss_per_peer_kb": (rss1 - rss0) / peers,
        }
        if py_mb is not None:
            result["py_traced_per_peer_kb"] = py_mb * 1024 / peers
            print(f"  Python-traced heap: {py_mb:.1f} MB = "
                  f"{result['py_traced_per_peer_kb']:.1f} KB/peer", file=sys.stderr)
        # Warm-up (not reported), then the fixed-rate measurement.
        _run_step(gens, pid, args.rate / 2, 3.0, server)
        result["fixed"] = _run_step(gens, pid, args.rate, args.duration, server)
        steps: list[dict[str, Any]] = []
        best = 0.0
        for rate in args.steps:
            step = _run_step(gens, pid, rate, args.step_duration, server)
            steps.append(step)
            print(
                f"  step {rate:>6.0f}/s: p50 {step['p50_ms']:.1f} ms  p99 {step['p99_ms']:.1f} ms"
                f"  delivered {step['delivery']:.1%}  achieved {step['achieved_rate']:.0f}/s"
                f"  coord cpu {step['coord_cpu_util']:.0%}  gens cpu {step['gens_cpu_util']:.0%}"
                f"  coord gc2 {step['coord_gc2_passes']}"
                f" (longest GC pause {step['coord_gc_max_ms']:.0f} ms)",
                file=sys.stderr,
            )
            if not _passes(step):
                break
            best = rate
        result["steps"] = steps
        result["max_sustained_rate"] = best
        result["rss_end_mb"] = _rss_kb(pid) / 1024
        return result
    finally:
        for g in gens:
            try:
                g.send({"cmd": "quit"})
            except (BrokenPipeError, OSError):
                pass
        for g in gens:
            try:
                g.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                g.proc.kill()
        if server.stdin is not None:
            try:
                server.stdin.write("stop\n")
                server.stdin.flush()
                server.stdin.close()
            except (BrokenPipeError, OSError):
                pass
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()


def _median(runs: list[dict[str, Any]], *path: str) -> float:
    vals = []
    for r in runs:
        v: Any = r
        for p in path:
            v = v[p]
        vals.append(float(v))
    return statistics.median(vals)


def report(runs: list[dict[str, Any]], out: IO[str]) -> dict[str, Any]:
    r0 = runs[0]
    m = {
        "connect_s": _median(runs, "connect_s"),
        "streams_open_s": _median(runs, "streams_open_s"),
        "rss_per_peer_kb": _median(runs, "rss_per_peer_kb"),
        "rss_connected_mb": _median(runs, "rss_connected_mb"),
        "p50_ms": _median(runs, "fixed", "p50_ms"),
        "p99_ms": _median(runs, "fixed", "p99_ms"),
        "delivery": _median(runs, "fixed", "delivery"),
        "achieved_rate": _median(runs, "fixed", "achieved_rate"),
        "cpu_us_per_update": _median(runs, "fixed", "cpu_us_per_update"),
        "coord_cpu_util": _median(runs, "fixed", "coord_cpu_util"),
        "gens_cpu_util": _median(runs, "fixed", "gens_cpu_util"),
        "coord_gc_max_ms": _median(runs, "fixed", "coord_gc_max_ms"),
        "connect_coord_cpu_util": _median(runs, "connect_coord_cpu_util"),
        "max_sustained_rate": _median(runs, "max_sustained_rate"),
    }
    rate = r0["fixed"]["rate"]
    gc_thr = r0.get("coord_gc_threshold")
    print(
        f"\n### Coordinator benchmark: {r0['agents']} agents + {r0['clients']} clients, "
        f"{r0['gens']} load generators, acks {'on' if r0['acks'] else 'off'}, "
        f"coordinator GC {'tuned (tune_gc)' if r0.get('coord_gc_tuning') else 'defaults'}, "
        f"{'coordinator gc.freeze() after connect, ' if r0['coord_gc_freeze'] else ''}"
        f"{'coordinator gc threshold ' + gc_thr + ', ' if gc_thr else ''}"
        f"median of {len(runs)} run(s)\n",
        file=out,
    )
    rows = [
        ("time to connect all peers (streams + node exchange)", f"{m['connect_s']:.2f} s"),
        ("  of which all streams open", f"{m['streams_open_s']:.2f} s"),
        ("  coordinator CPU while connecting", f"{m['connect_coord_cpu_util']:.0%}"),
        ("coordinator RSS when connected", f"{m['rss_connected_mb']:.0f} MB"),
        ("RSS per connected peer", f"{m['rss_per_peer_kb']:.1f} KB"),
        (f"fan-out latency p50 @ {rate:.0f} upd/s", f"{m['p50_ms']:.2f} ms"),
        (f"fan-out latency p99 @ {rate:.0f} upd/s", f"{m['p99_ms']:.2f} ms"),
        (
            "  offered rate achieved / delivered",
            f"{m['achieved_rate']:.0f}/s / {m['delivery']:.1%}",
        ),
        ("coordinator CPU per delivered update", f"{m['cpu_us_per_update']:.0f} µs"),
        ("coordinator CPU utilisation at that rate", f"{m['coord_cpu_util']:.0%}"),
        ("load generators' CPU at that rate (sum)", f"{m['gens_cpu_util']:.0%}"),
        ("longest coordinator GC pause in that window", f"{m['coord_gc_max_ms']:.0f} ms"),
        ("max sustained rate (p99 ≤ 100 ms)", f"{m['max_sustained_rate']:.0f} upd/s"),
    ]
    print("| metric | value |\n| --- | --- |", file=out)
    for k, v in rows:
        print(f"| {k} | {v} |", file=out)
    print("\nSteps (run 1):\n", file=out)
    print(
        "| offered/s | achieved/s | delivered | p50 ms | p99 ms | coord CPU | gens CPU"
        " | µs/update | coord gen-2 GCs | longest coord GC pause |",
        file=out,
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |", file=out)
    for s in r0["steps"]:
        print(
            f"| {s['rate']:.0f} | {s['achieved_rate']:.0f} | {s['delivery']:.1%} | "
            f"{s['p50_ms']:.1f} | {s['p99_ms']:.1f} | {s['coord_cpu_util']:.0%} | "
            f"{s['gens_cpu_util']:.0%} | {s['cpu_us_per_update']:.0f} | {s['coord_gc2_passes']} | "
            f"{s['coord_gc_max_ms']:.0f} ms |",
            file=out,
        )
    return m


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Tailnet coordinator benchmark")
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--profile", help="cProfile the coordinator; write stats to this file")
    ap.add_argument(
        "--tracemalloc", action="store_true",
        help="trace the coordinator's Python allocations (slow; for the RSS breakdown)",
    )
    ap.add_argument("--quick", action="store_true", help="500 + 500 peers, short steps (< 1 min)")
    ap.add_argument("--agents", type=int)
    ap.add_argument("--clients", type=int)
    ap.add_argument("--rate", type=float, help="fixed offered node updates/s")
    ap.add_argument("--duration", type=float, help="seconds at the fixed rate")
    ap.add_argument("--steps", type=str, help="comma-separated rates to step through")
    ap.add_argument("--step-duration", type=float)
    ap.add_argument("--gens", type=int, default=2, help="load generator processes")
    ap.add_argument("--no-acks", dest="acks", action="store_false")
    ap.add_argument(
        "--gen-loop", choices=("uvloop", "asyncio"), default="uvloop",
        help="event loop of the load generators (the coordinator always runs uvloop)",
    )
    ap.add_argument(
        "--coord-gc-freeze", action="store_true",
        help="experiment: gc.freeze() in the coordinator once all peers are connected",
    )
    ap.add_argument(
        "--gc-threshold", metavar="G0,G1,G2",
        help="gc thresholds of the coordinator process (default with tuning: 50000,50,1000)",
    )
    ap.add_argument(
        "--no-gc-tuning", dest="gc_tuning", action="store_false",
        help="run the coordinator with CPython's default GC (no tailnet.tuning.tune_gc)",
    )
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--json", help="write all results to this file")
    args = ap.parse_args(argv)

    if args.serve:
        serve_main(args)
        return
    quick = args.quick
    args.agents = args.agents or (500 if quick else 5000)
    args.clients = args.clients or (500 if quick else 5000)
    args.rate = args.rate or (500.0 if quick else 2000.0)
    args.duration = args.duration or (4.0 if quick else 10.0)
    args.step_duration = args.step_duration or (3.0 if quick else 5.0)
    default_steps = "1000,2000,3000" if quick else "1000,2000,3000,4000,5000,6000,8000"
    args.steps = [float(x) for x in (args.steps or default_steps).split(",") if x]

    runs = []
    for i in range(args.runs):
        print(
            f"run {i + 1}/{args.runs}: {args.agents} agents + {args.clients} clients",
            file=sys.stderr,
        )
        t0 = time.perf_counter()
        runs.append(run_once(args))
        print(f"run {i + 1} took {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    medians = report(runs, sys.stdout)
    if args.json:
        Path(args.json).write_text(json.dumps({"medians": medians, "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
