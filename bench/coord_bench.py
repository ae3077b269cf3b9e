"""Coordinator benchmark: one connection per peer, DRPC/WebSocket and gRPC side by side.

Usage::

    python bench/coord_bench.py --quick                  # 1,000 peers, both transports, ~2 min
    python bench/coord_bench.py --runs 3 --json out.json # 10,000 peers: DRPC and gRPC,
                                                         # fan-out 1 and 4, tuned GC
    python bench/coord_bench.py --runs 3 --gc tuned,default   # also with CPython's default GC
    python bench/coord_bench.py --transport drpc --fanout 1 --peers 2000 --census
    python bench/coord_bench.py --quick --profile /tmp/coord.prof   # cProfile the coordinator

Processes (all on this machine, talking over 127.0.0.1):

* **coordinator** (this script with ``--serve``): a :class:`tailnet.stack.TailnetStack`
  (HTTP API with the RPC WebSocket endpoints, gRPC, embedded DERP; STUN off) on
  uvloop, as ``tailnet serve`` runs it. Credentials come from the stack's own API:
  per agent ``i`` one owner (``create_user``) and the agent (``create_agent``, peer
  ID ``agent_id(i)``); the tokens go to a 0600 file the load generators read.
  ``tailnet.tuning.tune_gc()`` once listening (``--gc tuned``, what ``tailnet
  serve`` does) or CPython's default GC (``--gc default``). Serves until stdin closes.
* **load generators** (``bench/coord_loadgen.py`` × ``--gens``, default 2): each
  owns a slice of the peers, **one connection per peer** (a WebSocket carrying
  yamux + DRPC through ``TailnetClient``, or a gRPC channel), each with Coordinate
  and StreamDERPMaps open, and verifies every update it receives (see its docstring).

Peers: ``--peers`` (10,000) = A agents + A × fan-out clients; client ``j`` is bound
to agent ``j % A``. One command runs every combination of ``--transport``,
``--fanout`` and ``--gc`` (a fresh coordinator per run) and prints one table per GC
mode, transports and fan-outs side by side.

Measured (coordinator process only for RSS/CPU, via ``/proc/<pid>``):

1. *connect*: all agents dial, then all clients (64 dials in flight per generator);
   time until every peer has both streams open and every tunnel has exchanged
   nodes in both directions.
2. *dial → first NODE*: from just before a client's TCP connect to the first NODE
   about its agent: for every client during the connect burst, and for
   ``--probe`` re-dials per generator, one at a time, on the idle coordinator.
3. *RSS per peer*: (VmRSS with all peers connected − VmRSS before) / peers.
4. *fan-out latency* at ``--rate`` node updates/s (spread round-robin over all
   peers) for ``--duration`` s: sender's ``time.time_ns()`` in ``Node.as_of`` →
   receiver's clock on receipt, for every tunnel peer; delivered = verified NODEs
   received / NODEs expected (an agent's update goes to each of its clients).
5. *CPU per delivered update*: coordinator utime+stime in that window / NODE
   updates delivered (the agents' READY_FOR_HANDSHAKE acks are included).
6. *highest rate with p99 < 100 ms*: rates are stepped up (``--steps``); a step
   passes while p99 < 100 ms, ≥ 97 % delivered, the generators kept up with the
   offered rate and verification found nothing wrong.

Each step also reports how long the coordinator and the generators waited for a
CPU (``/proc/<pid>/schedstat``) and their event-loop lag: the load generators share
the 2 cores with the coordinator (and with whatever else runs on the machine), so
latencies include their scheduling delay.
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
import tempfile
import time
import tracemalloc
import uuid
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from coord_loadgen import LoopLag, agent_id, raise_nofile  # noqa: E402


def client_user_id(i: int) -> uuid.UUID:
    """User ID of the owner of benchmark agent ``i`` (its clients use this user's token)."""
    return uuid.UUID(int=(0xC11E << 112) | i)

CLK_TCK = os.sysconf("SC_CLK_TCK")
#: tailnet.tuning.DEFAULT_GC_THRESHOLDS (not imported here: the orchestrator stays light).
DEFAULT_GC = (50_000, 50, 1000)


# --------------------------------------------------------------------------------------
# Coordinator process


async def _serve(args: argparse.Namespace) -> None:
    import logging

    from tailnet.config import StackConfig
    from tailnet.stack import TailnetStack

    logging.basicConfig(level=logging.WARNING)
    raise_nofile()
    stack = TailnetStack(
        StackConfig(
            http_addr="127.0.0.1:0", grpc_addr="127.0.0.1:0", stun_addr=None, data_dir=None
        )
    )
    await stack.start()
    # Credentials through the stack's own API: one owner per agent; the agent's
    # clients all use its owner's token (each connection is its own peer).
    agents: list[str] = []
    owners: list[str] = []
    for i in range(args.agents):
        uid, user_token = stack.create_user(client_user_id(i), name=f"user-{i}")
        cred = stack.create_agent(owner_id=uid, agent_id=agent_id(i))
        agents.append(cred.token)
        owners.append(user_token)
    doc = {
        "http": stack.ws_url,
        "grpc": stack.grpc_target,
        "agents": agents,
        "owners": owners,
        "clients": args.clients,
    }
    fd = os.open(args.tokens, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(doc, f)
    del agents, owners, doc
    gc_stats = _GcStats()
    lag = LoopLag()
    if args.gc_tuning:
        # What `tailnet serve` does by default (tailnet.tuning.tune_gc).
        from tailnet.tuning import parse_thresholds, tune_gc

        tune_gc(parse_thresholds(args.gc_threshold) if args.gc_threshold else DEFAULT_GC)
    elif args.gc_threshold:
        gc.set_threshold(*(int(x) for x in args.gc_threshold.split(",")))
    if args.tracemalloc:
        tracemalloc.start(args.tracemalloc_frames)
    print(json.dumps({"pid": os.getpid(), "gc": list(gc.get_threshold())}), flush=True)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    snap0: tracemalloc.Snapshot | None = None
    while True:
        line = await reader.readline()
        cmd = line.strip()
        if not line or cmd == b"stop":
            break
        if cmd == b"stats":
            print(json.dumps({"gc": gc_stats.snapshot(), "lag": lag.take()}), flush=True)
        elif cmd == b"snap":
            snap0 = tracemalloc.take_snapshot() if tracemalloc.is_tracing() else None
            print(json.dumps({"ok": True}), flush=True)
        elif cmd == b"census":
            print(json.dumps(_census(snap0, args.agents + args.clients)), flush=True)
    if gc_stats.long_passes:
        print("long GC passes (gen, wall ms, thread CPU ms, collected):", file=sys.stderr)
        print(f"  {gc_stats.long_passes}", file=sys.stderr)
    await stack.stop(2.0)


def _census(snap0: tracemalloc.Snapshot | None, peers: int) -> dict[str, Any]:
    """Live objects by type per peer and (with tracemalloc) the heap diff by file/line."""
    gc.collect()
    counts: dict[str, int] = {}
    sizes: dict[str, int] = {}
    coros: dict[str, list[int]] = {}
    for o in gc.get_objects():
        name = type(o).__name__
        counts[name] = counts.get(name, 0) + 1
        sizes[name] = sizes.get(name, 0) + sys.getsizeof(o)
        if name in ("coroutine", "async_generator"):
            c = coros.setdefault(o.__qualname__, [0, 0])
            c[0] += 1
            c[1] += sys.getsizeof(o)
    top = sorted(counts.items(), key=lambda kv: -sizes[kv[0]])[:30]
    out: dict[str, Any] = {
        # type: [objects per peer, shallow bytes per peer]
        "objects_per_peer": {k: [round(v / peers, 2), round(sizes[k] / peers)] for k, v in top},
        "coroutines_per_peer": {
            k: [round(n / peers, 2), round(b / peers)]
            for k, (n, b) in sorted(coros.items(), key=lambda kv: -kv[1][1])[:20]
        },
        "tasks": len(asyncio.all_tasks()),
    }
    if snap0 is not None:
        snap1 = tracemalloc.take_snapshot()
        for key in ("filename", "lineno"):
            diff = snap1.compare_to(snap0, key)[:30]
            out[f"by_{key}"] = [
                [str(d.traceback), round(d.size_diff / peers, 1), round(d.count_diff / peers, 2)]
                for d in diff
            ]
        out["traced_per_peer"] = round(
            sum(d.size_diff for d in snap1.compare_to(snap0, "filename")) / peers, 1
        )
    return out


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


def _runq_s(pid: int) -> float:
    """Time the process's main thread spent runnable but waiting for a CPU (schedstat)."""
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[1]) / 1e9


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


def _coord_gc(server: subprocess.Popen[str]) -> tuple[dict[str, Any], dict[str, float]]:
    """The server's GC statistics and event-loop lag since the last call."""
    assert server.stdin is not None and server.stdout is not None
    server.stdin.write("stats\n")
    server.stdin.flush()
    doc = json.loads(server.stdout.readline())
    return doc["gc"], doc["lag"]


def _run_step(
    gens: list[Gen], pid: int, rate: float, duration: float, server: subprocess.Popen[str]
) -> dict[str, Any]:
    gc0, _ = _coord_gc(server)
    cpu0 = _cpu_s(pid)
    gcpu0 = sum(_cpu_s(g.proc.pid) for g in gens)
    rq0 = _runq_s(pid)
    grq0 = [_runq_s(g.proc.pid) for g in gens]
    t0 = time.perf_counter()
    replies = _all(
        gens, {"cmd": "run", "rate": rate / len(gens), "duration": duration, "drain": 3.0}
    )
    wall = time.perf_counter() - t0
    cpu = _cpu_s(pid) - cpu0
    gen_cpu = sum(_cpu_s(g.proc.pid) for g in gens) - gcpu0
    runq = _runq_s(pid) - rq0
    gen_runq = max(_runq_s(g.proc.pid) - x for g, x in zip(gens, grq0))
    gc1, lag = _coord_gc(server)
    lat = [x for r in replies for x in r["lat_ms"]]

    def tot(k: str) -> int:
        return int(sum(r[k] for r in replies))

    sent, expected, received = tot("sent"), tot("expected"), tot("received")
    verify = {k: tot(k) for k in VERIFY_KEYS}
    return {
        "rate": rate,
        "sent": sent,
        "achieved_rate": sent / duration,
        "expected": expected,
        "received": received,
        "measured": len(lat),
        "delivery": len(lat) / expected if expected else 0.0,
        "p50_ms": _pct(lat, 50),
        "p99_ms": _pct(lat, 99),
        "max_ms": max(lat) if lat else float("nan"),
        "rfh": tot("rfh"),
        "verify": verify,
        "verify_errors": sum(verify.values()),
        "send_errors": tot("send_errors"),
        "coord_cpu_s": cpu,
        "coord_cpu_util": cpu / wall,
        "gens_cpu_util": gen_cpu / wall,
        "coord_gc2_passes": gc1["count"][2] - gc0["count"][2],
        "coord_gc_max_ms": gc1["window_max_s"] * 1000,
        "coord_gc_long": gc1["long"] - gc0["long"],
        "cpu_us_per_update": cpu / received * 1e6 if received else float("nan"),
        "coord_runq_wait": runq / wall,
        "gens_runq_wait": gen_runq / wall,
        "coord_lag_max_ms": lag["max_ms"],
        "coord_lag_p99_ms": lag["p99_ms"],
        "gens_lag_max_ms": max(r["lag"]["max_ms"] for r in replies),
        "gens_lag_p99_ms": max(r["lag"]["p99_ms"] for r in replies),
    }


#: Loadgen counters that must stay 0 in a measurement window (see coord_loadgen.py).
VERIFY_KEYS = (
    "bad_source", "bad_content", "out_of_order", "gaps", "errors", "lost", "maps_bad",
    "send_errors", "stream_ends",
)


def _passes(step: dict[str, Any]) -> bool:
    return bool(
        step["p99_ms"] < 100.0
        and step["delivery"] >= 0.97
        and step["achieved_rate"] >= 0.9 * step["rate"]
        and step["verify_errors"] == 0
    )


def _load() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def run_once(
    args: argparse.Namespace, transport: str, fanout: int, tuned: bool
) -> dict[str, Any]:
    py = sys.executable
    here = Path(__file__).resolve()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    agents = args.peers // (fanout + 1)
    clients = agents * fanout
    tokens = Path(tempfile.mkdtemp(prefix="coord-bench-")) / "tokens.json"
    serve_cmd = [
        py, str(here), "--serve", "--agents", str(agents), "--clients", str(clients),
        "--tokens", str(tokens),
    ]
    if args.profile:
        serve_cmd += ["--profile", args.profile]
    if args.tracemalloc:
        serve_cmd += ["--tracemalloc", "--tracemalloc-frames", str(args.tracemalloc_frames)]
    if args.gc_threshold:
        serve_cmd += ["--gc-threshold", args.gc_threshold]
    if not tuned:
        serve_cmd.append("--no-gc-tuning")
    load_before = _load()
    server = subprocess.Popen(
        serve_cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
    )
    gens: list[Gen] = []
    try:
        assert server.stdout is not None and server.stdin is not None
        info = json.loads(server.stdout.readline())
        pid = info["pid"]
        rss0 = _rss_kb(pid)
        if args.tracemalloc:
            server.stdin.write("snap\n")
            server.stdin.flush()
            server.stdout.readline()
        for k in range(args.gens):
            cmd = [
                py, str(here.parent / "coord_loadgen.py"), "--transport", transport,
                "--tokens", str(tokens), "--index", str(k), "--nproc", str(args.gens),
            ]
            if not args.acks:
                cmd.append("--no-acks")
            gens.append(
                Gen(
                    subprocess.Popen(
                        cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
                    )
                )
            )
        peers = agents + clients
        t0 = time.perf_counter()
        ccpu0 = _cpu_s(pid)
        conn_a = _all(gens, {"cmd": "connect", "kind": "agent"})
        conn_c = _all(gens, {"cmd": "connect", "kind": "client"})
        streams_s = time.perf_counter() - t0
        ready = _all(gens, {"cmd": "ready"})
        connect_s = time.perf_counter() - t0
        connect_cpu = _cpu_s(pid) - ccpu0
        failed = sum(r["failed"] for r in conn_a + conn_c)
        if failed or not all(r["ok"] for r in ready):
            raise RuntimeError(f"connect failed: {failed} dials failed; ready: "
                               f"{[{k: v for k, v in r.items() if k != 'dial_ms'} for r in ready]}")
        burst_dial = [x for r in ready for x in r["dial_ms"]]
        time.sleep(2.0)  # let the connect burst's stragglers (GC, buffers) settle
        rss1 = _rss_kb(pid)
        # Idle: no updates, only keepalives (yamux pings both ways every 30 s, and
        # WebSocket pings every 15 s on the client endpoints; gRPC sends none).
        icpu0, igcpu0, it0 = _cpu_s(pid), sum(_cpu_s(g.proc.pid) for g in gens), time.perf_counter()
        time.sleep(args.idle)
        iwall = time.perf_counter() - it0
        idle_cpu = (_cpu_s(pid) - icpu0) / iwall
        idle_gens_cpu = (sum(_cpu_s(g.proc.pid) for g in gens) - igcpu0) / iwall
        census = None
        if args.census:
            server.stdin.write("census\n")
            server.stdin.flush()
            census = json.loads(server.stdout.readline())
        idle_dial: list[float] = []
        for g in gens:  # one generator at a time: one dial in flight
            g.send({"cmd": "probe", "n": args.probe, "gap": 0.02})
            idle_dial += [x for x in g.recv()["dial_ms"] if x == x]
        result: dict[str, Any] = {
            "transport": transport,
            "fanout": fanout,
            "agents": agents,
            "clients": clients,
            "peers": peers,
            "gens": args.gens,
            "acks": args.acks,
            "coord_gc": "tuned" if tuned else "default",
            "coord_gc_thresholds": info["gc"],
            "load_before": load_before,
            "connect_s": connect_s,
            "agents_dialled_s": max(r["streams_s"] for r in conn_a),
            "all_dialled_s": streams_s,
            "connect_coord_cpu_util": connect_cpu / connect_s,
            "burst_dial_p50_ms": _pct(burst_dial, 50),
            "burst_dial_p99_ms": _pct(burst_dial, 99),
            "idle_dial_n": len(idle_dial),
            "idle_dial_p50_ms": _pct(idle_dial, 50),
            "idle_dial_p99_ms": _pct(idle_dial, 99),
            "maps_ok": sum(r["maps_ok"] for r in ready),
            "connect_verify_errors": sum(r[k] for r in ready for k in VERIFY_KEYS),
            "rss_base_mb": rss0 / 1024,
            "rss_connected_mb": rss1 / 1024,
            "rss_per_peer_kb": (rss1 - rss0) / peers,
            "idle_coord_cpu_util": idle_cpu,
            "idle_gens_cpu_util": idle_gens_cpu,
        }
        if census is not None:
            result["census"] = census
        print(
            f"  [{transport} fan-out {fanout} gc {result['coord_gc']}] connected {peers} in "
            f"{connect_s:.1f} s, RSS/peer {result['rss_per_peer_kb']:.1f} KB, dial→NODE "
            f"burst p99 {result['burst_dial_p99_ms']:.0f} ms, idle p50/p99 "
            f"{result['idle_dial_p50_ms']:.1f}/{result['idle_dial_p99_ms']:.1f} ms, idle CPU "
            f"server {idle_cpu:.0%} gens {idle_gens_cpu:.0%}",
            file=sys.stderr,
        )
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
                f"  verify errors {step['verify_errors']}"
                f"  loop lag p99/max server {step['coord_lag_p99_ms']:.0f}/"
                f"{step['coord_lag_max_ms']:.0f} ms, gens {step['gens_lag_p99_ms']:.0f}/"
                f"{step['gens_lag_max_ms']:.0f} ms"
                f"  coord cpu {step['coord_cpu_util']:.0%} (waiting for a CPU "
                f"{step['coord_runq_wait']:.0%})  gens cpu {step['gens_cpu_util']:.0%} (waiting "
                f"{step['gens_runq_wait']:.0%})"
                f"  (longest GC pause {step['coord_gc_max_ms']:.0f} ms)",
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
                g.proc.wait(timeout=60)
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
        tokens.unlink(missing_ok=True)
        tokens.parent.rmdir()


def _median(runs: list[dict[str, Any]], *path: str) -> float:
    vals = []
    for r in runs:
        v: Any = r
        for p in path:
            v = v[p]
        vals.append(float(v))
    return statistics.median(vals)


def _runs_text(runs: list[dict[str, Any]], fmt: str, *path: str) -> str:
    if len(runs) < 2:
        return ""
    vals = []
    for r in runs:
        v: Any = r
        for p in path:
            v = v[p]
        vals.append(format(float(v), fmt))
    return " (" + " / ".join(vals) + ")"


ROWS: tuple[tuple[str, str, tuple[str, ...], str, str], ...] = (
    # label, format, path, unit, per-run format
    ("time to connect all peers (dial, both streams, nodes exchanged)", ".1f",
     ("connect_s",), " s", ".1f"),
    ("dial → first NODE p50, connect burst (clients)", ".0f", ("burst_dial_p50_ms",), " ms", ""),
    ("dial → first NODE p99, connect burst (clients)", ".0f", ("burst_dial_p99_ms",), " ms", ""),
    ("dial → first NODE p50, idle (re-dials one at a time)", ".1f",
     ("idle_dial_p50_ms",), " ms", ""),
    ("dial → first NODE p99, idle", ".1f", ("idle_dial_p99_ms",), " ms", ".1f"),
    ("fan-out latency p50 @ RATE upd/s", ".2f", ("fixed", "p50_ms"), " ms", ""),
    ("fan-out latency p99 @ RATE upd/s", ".1f", ("fixed", "p99_ms"), " ms", ".1f"),
    ("  delivered (verified) / expected", ".1%", ("fixed", "delivery"), "", ""),
    ("  verification errors (all windows of run 1)", ".0f", ("verify_errors_all",), "", ""),
    ("highest rate with p99 < 100 ms", ".0f", ("max_sustained_rate",), " upd/s", ".0f"),
    ("server RSS per peer", ".1f", ("rss_per_peer_kb",), " KB", ".1f"),
    ("server RSS with all peers connected", ".0f", ("rss_connected_mb",), " MB", ""),
    ("server CPU per delivered update", ".0f", ("fixed", "cpu_us_per_update"), " µs", ""),
    ("server CPU at idle, all peers connected (keepalives)", ".0%", ("idle_coord_cpu_util",),
     "", ""),
    ("server CPU @ RATE upd/s (of one core)", ".0%", ("fixed", "coord_cpu_util"), "", ""),
    ("load generators' CPU @ RATE upd/s (sum)", ".0%", ("fixed", "gens_cpu_util"), "", ""),
    ("longest server GC pause @ RATE upd/s", ".0f", ("fixed", "coord_gc_max_ms"), " ms", ""),
)


def report(
    groups: dict[tuple[str, int, str], list[dict[str, Any]]], args: argparse.Namespace,
    out: IO[str],
) -> dict[str, Any]:
    medians: dict[str, Any] = {}
    for runs in groups.values():
        for r in runs:
            r["verify_errors_all"] = r["connect_verify_errors"] + r["fixed"]["verify_errors"] + sum(
                s["verify_errors"] for s in r["steps"])
    for gc_mode in dict.fromkeys(k[2] for k in groups):
        cols = [(k, v) for k, v in groups.items() if k[2] == gc_mode]
        r0 = cols[0][1][0]
        print(
            f"\n### Coordinator: {r0['peers']:,} peers, one connection each; server GC "
            f"{'tuned (tune_gc ' + str(tuple(r0['coord_gc_thresholds'])) + ')' if gc_mode == 'tuned' else 'CPython default ' + str(tuple(r0['coord_gc_thresholds']))}"
            f"; {args.gens} load generators; acks {'on' if args.acks else 'off'}; "
            f"median of {len(cols[0][1])} run(s)\n",
            file=out,
        )
        head = " | ".join(
            f"{'DRPC/WebSocket' if t == 'drpc' else 'gRPC'}, fan-out {f} "
            f"({v[0]['agents']:,} + {v[0]['clients']:,})"
            for (t, f, _), v in cols
        )
        print(f"| metric | {head} |", file=out)
        print("| --- |" + " --- |" * len(cols), file=out)
        for label, fmt, path, unit, run_fmt in ROWS:
            cells = []
            for key, runs in cols:
                v = _median(runs, *path)
                cell = format(v, fmt) + unit
                if run_fmt:
                    cell += _runs_text(runs, run_fmt, *path)
                cells.append(cell)
                medians.setdefault("/".join(map(str, key)), {})["/".join(path)] = v
            print(f"| {label.replace('RATE', format(args.rate, ',.0f'))} | "
                  + " | ".join(cells) + " |", file=out)
        # The same rate again as a later rate step (after the fixed window: steady state,
        # no post-connect GC pass); only runs whose 1,000/s step passed get there.
        cells = []
        for _key, runs in cols:
            vals = [s["p99_ms"] for r in runs for s in r["steps"] if s["rate"] == args.rate]
            cells.append(
                f"{statistics.median(vals):.1f} ms ({len(vals)} of {len(runs)} runs: "
                + " / ".join(f"{v:.1f}" for v in vals) + ")" if vals else "not reached"
            )
        print(f"| fan-out latency p99 @ {args.rate:,.0f} upd/s, later rate step | "
              + " | ".join(cells) + " |", file=out)
        loads = [r["load_before"] for _, runs in cols for r in runs]
        print(f"\nLoad average (1 min) before each run: {', '.join(f'{x:.1f}' for x in loads)}",
              file=out)
    print("\nRate steps (run 1 of each):\n", file=out)
    print("| config | offered/s | achieved/s | delivered | p50 ms | p99 ms | server CPU"
          " | gens CPU | µs/update | longest GC pause |", file=out)
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |", file=out)
    for (t, f, g), runs in groups.items():
        for s in runs[0]["steps"]:
            print(
                f"| {t} f{f} gc {g} | {s['rate']:.0f} | {s['achieved_rate']:.0f} | "
                f"{s['delivery']:.1%} | {s['p50_ms']:.1f} | {s['p99_ms']:.1f} | "
                f"{s['coord_cpu_util']:.0%} | {s['gens_cpu_util']:.0%} | "
                f"{s['cpu_us_per_update']:.0f} | {s['coord_gc_max_ms']:.0f} ms |",
                file=out,
            )
    return medians


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Tailnet coordinator benchmark")
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--agents", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--clients", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--tokens", help=argparse.SUPPRESS)
    ap.add_argument("--profile", help="cProfile the coordinator; write stats to this file")
    ap.add_argument(
        "--tracemalloc", action="store_true",
        help="trace the coordinator's Python allocations (slow; with --census: heap diff per peer)",
    )
    ap.add_argument("--tracemalloc-frames", type=int, default=1)
    ap.add_argument(
        "--census", action="store_true",
        help="after connect: live objects per peer by type (+ tracemalloc diff by file/line)",
    )
    ap.add_argument("--quick", action="store_true", help="1,000 peers, short steps (~1 min)")
    ap.add_argument("--transport", choices=("drpc", "grpc", "both"), default="both")
    ap.add_argument("--fanout", default="1,4", help="clients per agent, comma-separated")
    ap.add_argument("--gc", default="tuned", help="server GC: tuned, default or tuned,default")
    ap.add_argument("--peers", type=int, help="agents + clients (default 10,000)")
    ap.add_argument("--rate", type=float, help="fixed offered node updates/s")
    ap.add_argument("--duration", type=float, help="seconds at the fixed rate")
    ap.add_argument("--steps", type=str, help="comma-separated rates to step through")
    ap.add_argument("--step-duration", type=float)
    ap.add_argument("--probe", type=int, help="idle re-dials per load generator")
    ap.add_argument("--idle", type=float, default=10.0,
                    help="seconds with all peers connected and no updates (idle CPU)")
    ap.add_argument("--gens", type=int, default=2, help="load generator processes")
    ap.add_argument("--no-acks", dest="acks", action="store_false")
    ap.add_argument(
        "--gc-threshold", metavar="G0,G1,G2",
        help="gc thresholds of the coordinator process (default with tuning: 50000,50,1000)",
    )
    ap.add_argument("--no-gc-tuning", dest="gc_tuning", action="store_false",
                    help=argparse.SUPPRESS)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--json", help="write all results to this file")
    ap.add_argument("--report", nargs="+", metavar="JSON",
                    help="no run: print the tables for the runs saved in these --json files")
    args = ap.parse_args(argv)

    if args.serve:
        serve_main(args)
        return
    quick = args.quick
    args.peers = args.peers or (1000 if quick else 10_000)
    args.rate = args.rate or (500.0 if quick else 2000.0)
    args.duration = args.duration or (4.0 if quick else 10.0)
    args.step_duration = args.step_duration or (3.0 if quick else 5.0)
    args.probe = args.probe or (20 if quick else 100)
    default_steps = "1000,2000,3000" if quick else "1000,2000,3000,4000,5000,6000,8000"
    args.steps = [float(x) for x in (args.steps or default_steps).split(",") if x]
    if args.report:
        saved: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
        for name in args.report:
            for r in json.loads(Path(name).read_text())["runs"]:
                saved.setdefault((r["transport"], r["fanout"], r["coord_gc"]), []).append(r)
        args.gens = saved[next(iter(saved))][0]["gens"]
        args.acks = saved[next(iter(saved))][0]["acks"]
        report(dict(sorted(saved.items(), key=lambda kv: (kv[0][2] != "tuned", kv[0][1],
                                                           kv[0][0]))), args, sys.stdout)
        return
    transports = ["drpc", "grpc"] if args.transport == "both" else [args.transport]
    fanouts = [int(x) for x in args.fanout.split(",") if x]
    gcs = [x.strip() for x in args.gc.split(",") if x.strip()]
    if any(g not in ("tuned", "default") for g in gcs):
        ap.error("--gc takes tuned, default or both comma-separated")
    raise_nofile()

    groups: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
    failures: list[str] = []
    for i in range(args.runs):
        for gc_mode in gcs:
            for fanout in fanouts:
                for transport in transports:
                    print(
                        f"run {i + 1}/{args.runs}: {transport}, fan-out {fanout}, GC {gc_mode}, "
                        f"load {_load():.1f}",
                        file=sys.stderr,
                    )
                    t0 = time.perf_counter()
                    try:
                        r = run_once(args, transport, fanout, gc_mode == "tuned")
                    except Exception as exc:  # report it, keep the other runs
                        print(f"  run failed: {exc!r}", file=sys.stderr)
                        failures.append(f"{transport} fan-out {fanout} GC {gc_mode}: {exc!r}")
                        continue
                    groups.setdefault((transport, fanout, gc_mode), []).append(r)
                    print(f"  took {time.perf_counter() - t0:.0f} s", file=sys.stderr)
                    if args.json:  # keep partial results
                        Path(args.json).write_text(json.dumps(
                            {"runs": [r for v in groups.values() for r in v]}, indent=1))
    medians = report(groups, args, sys.stdout)
    for f in failures:
        print(f"\nFailed run: {f}")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"medians": medians, "runs": [r for v in groups.values() for r in v]}, indent=1))


if __name__ == "__main__":
    main()
