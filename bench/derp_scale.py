#!/usr/bin/env python3
"""``derper --workers N`` scaling: the same per-packet load against 1, 2, … W workers.

For each worker count the runner starts ``python -m derp --dev --workers N`` (the
real CLI: supervisor + N SO_REUSEPORT workers; N = 1 is the single process),
drives it with ``bench/derp_loadgen.py`` (per-packet writes, every delivery
verified: source key, pair tag, crc32, sequence) and prints packets/s and the
server's CPU per relayed packet, counting every process of the relay (the
supervisor and all workers: ``/proc/<pid>/task/*/schedstat``).

``--cross`` adds the case the issue's 1.3x target is about: 2 workers, senders
connected to worker 0 and receivers to worker 1 (every packet crosses the Unix
socket link), against senders and receivers both on worker 0 (no packet
crosses), and the crossing case once more with ``--worker-link-hold 0`` (the
link writes every loop iteration: what the default 1 ms hold buys, and what
its latency costs). The workers' test ports (``--worker-test-ports``) address
each one. Every line shows the one-way latency p50/p99 of the deliveries.

Those closed-loop runs each go as fast as they can, so the two cases are compared
at different packet rates; and CPU per packet falls steeply with the rate (more
packets per read and per write), so a ratio taken there mixes the cost of
crossing with the cost of a lighter load. ``--cross`` therefore also compares the
two at **equal offered load**: open loop, both cases at the same packet rates,
by default 40 % and 80 % of the crossing case's closed-loop rate in this run
(``--cross-load``), so both sustain it. Such a line counts only when every
offered packet was delivered (none lost, none skipped by the generator) and
delivered packets/s is within 3 % of the offered rate; the summary says which.

Usage::

    .venv/bin/python bench/derp_scale.py                       # 1..CPUs workers, 32x64
    .venv/bin/python bench/derp_scale.py --max-workers 4 --pairs 8 --size 1400
    .venv/bin/python bench/derp_scale.py --cross --runs 3      # + crossing vs staying, medians
    .venv/bin/python bench/derp_scale.py --cross --cross-load 0.5  # equal load at 50 % only
    .venv/bin/python bench/derp_scale.py --no-scale --idle 1000,3000   # marginal idle memory
    .venv/bin/python bench/derp_scale.py --cross --no-scale --per-worker  # where each worker's CPU goes

On a machine with C cores the load generator shares the cores with the relay:
packets/s stops scaling at about C/2 workers here (``--host``/``--port`` of a
relay started elsewhere is not supported). Sharing also moves CPU per packet: a
relay that takes more CPU leaves the generators less, the packet rate falls, and
at a lower rate each read and write carries fewer packets, so every packet costs
more. That is why ``--cross`` compares at equal offered load as well. (Pinning
the generators to one core and the relay to the other is no way out on 2 cores:
both workers then share one core.)
"""

from __future__ import annotations

import argparse
import glob
import os
import re
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
sys.path.insert(0, str(HERE.parent))

from derp_loadgen import IdleClients, LoadSpec, Target, raise_nofile_limit, run_load  # noqa: E402


def _cpu_s(pids: list[int]) -> float:
    """CPU seconds of every thread of ``pids`` (``/proc/<pid>/task/*/schedstat``)."""
    total = 0
    for pid in pids:
        for path in glob.glob(f"/proc/{pid}/task/*/schedstat"):
            try:
                with open(path) as f:
                    total += int(f.read().split()[0])
            except (OSError, ValueError, IndexError):
                pass
    return total / 1e9


class Relay:
    """``derper --workers N`` in a child process; CPU summed over all its processes."""

    def __init__(self, workers: int, log: Path, link_hold_ms: float | None = None) -> None:
        self._log = open(log, "wb")
        argv = [sys.executable, "-m", "derp", "--dev", "-a", "127.0.0.1:0", "--no-stun",
                "--stats-interval", "0", "--log-level", "warning", "--workers", str(workers)]
        if link_hold_ms is not None:
            argv += ["--worker-link-hold", str(link_hold_ms)]
        if workers > 1:
            argv.append("--worker-test-ports")
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=self._log, cwd=HERE.parent)
        self.port = 0
        self.pids = [self.proc.pid]
        self.test_ports: dict[int, int] = {}
        self._read(workers)

    def _read(self, workers: int) -> None:
        """Parse the startup lines (raw ``os.read``: select() does not see what a
        buffered reader already holds)."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + 60
        need_ports = workers if workers > 1 else 0
        buf = b""
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.5)
            if not ready:
                if self.proc.poll() is not None:
                    break
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for raw in lines:
                line = raw.decode()
                if m := re.search(r"listening on http://[^:]+:(\d+)/derp", line):
                    self.port = int(m.group(1))
                elif m := re.search(r"\d+ workers \(pids ([\d ]+)\)", line):
                    self.pids += [int(p) for p in m.group(1).split()]
                elif m := re.search(r"worker (\d+) test port (\d+)", line):
                    self.test_ports[int(m.group(1))] = int(m.group(2))
            if self.port and len(self.test_ports) >= need_ports and (workers == 1 or len(self.pids) > 1):
                return
        self.stop()
        raise RuntimeError("derper did not start")

    def cpu_s(self) -> float:
        return _cpu_s(self.pids)

    def sample(self) -> tuple[float, list[tuple[float, int, int]]]:
        """Total CPU seconds, and per worker process (the supervisor left out)
        its CPU seconds and read/write syscalls so far (``/proc/<pid>/io``)."""
        per: list[tuple[float, int, int]] = []
        for pid in self.pids[1:]:
            cpu = _cpu_s([pid])
            io = {"syscr": 0, "syscw": 0}
            try:
                with open(f"/proc/{pid}/io") as f:
                    for line in f:
                        k, _, v = line.partition(":")
                        if k in io:
                            io[k] = int(v)
            except OSError:
                pass
            per.append((cpu, io["syscr"], io["syscw"]))
        return _cpu_s(self.pids[:1]) + sum(p[0] for p in per), per

    def rss_bytes(self) -> int:
        """Resident memory summed over the supervisor and every worker."""
        total = 0
        for pid in self.pids:
            try:
                with open(f"/proc/{pid}/status") as f:
                    for line in f:
                        if line.startswith("VmRSS:"):
                            total += int(line.split()[1]) * 1024
            except OSError:
                pass
        return total

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()


def measure(relay: Relay, target: Target, spec: LoadSpec, gen_procs: int) -> dict[str, Any]:
    res = run_load(target, spec, workers=gen_procs,
                   on_window_start=relay.sample, on_window_end=relay.sample)
    (c0, w0), (c1, w1) = res.pop("start_sample"), res.pop("end_sample")
    n = res["win_recv"] or 1
    # per worker: CPU us, read and write syscalls, each per delivered packet
    res["per_worker"] = [((b[0] - a[0]) / n * 1e6, (b[1] - a[1]) / n, (b[2] - a[2]) / n)
                         for a, b in zip(w0, w1)]
    res["srv_cpu_s"] = c1 - c0
    res["us_per_pkt"] = (c1 - c0) / res["win_recv"] * 1e6 if res["win_recv"] else float("nan")
    res["srv_cores"] = (c1 - c0) / res["window_s"]
    return res


def idle_marginal(workers: int, low: int, high: int, log: Path) -> tuple[float, float]:
    """KB of relay RSS (all processes) per idle client between ``low`` and ``high``
    clients, and the RSS at ``low`` in MB."""
    relay = Relay(workers, log)
    idle = IdleClients()
    try:
        target = Target("derp", "127.0.0.1", relay.port)
        idle.add(target, low)
        time.sleep(1.0)  # let the relay finish post-handshake work before sampling
        r0 = relay.rss_bytes()
        idle.add(target, high - low)
        time.sleep(1.0)
        r1 = relay.rss_bytes()
        return (r1 - r0) / (idle.count - low) / 1e3, r0 / 1e6
    finally:
        idle.close()
        relay.stop()


def verify(r: dict[str, Any]) -> str:
    bad = [f"{r[k]} {k}" for k in ("lost", "duplicated", "misdelivered", "corrupted", "gaps") if r.get(k)]
    bad += [f"error: {e}" for e in r.get("errors", [])[:2]]
    return "ok" if not bad else "!! " + ", ".join(bad)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max-workers", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--pairs", type=int, default=32)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--duration", type=float, default=3.0)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--gen-procs", type=int, default=2, help="load generator processes (default 2)")
    p.add_argument("--runs", type=int, default=1, help="repeat and print medians")
    p.add_argument("--cross", action="store_true", help="also: 2 workers, crossing vs staying")
    p.add_argument("--cross-load", default="0.4,0.8", metavar="F,F",
                   help="with --cross: open-loop rates, as fractions of the crossing case's "
                   "closed-loop pkt/s, at which staying and crossing are compared (default 0.4,0.8)")
    p.add_argument("--no-scale", action="store_true", help="skip the 1..W curve")
    p.add_argument("--per-worker", action="store_true",
                   help="also print each worker's CPU and read/write syscalls per packet")
    p.add_argument("--idle", default="", metavar="LOW,HIGH",
                   help="also: marginal idle memory per client between LOW and HIGH clients, "
                   "for 1 and for W workers (e.g. 1000,3000)")
    args = p.parse_args(argv)
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    spec = LoadSpec(pairs=args.pairs, size=args.size, mode="closed", warmup=args.warmup,
                    duration=args.duration, per_packet=True)
    modes = "closed loop" + (" (and open loop at equal load for --cross)" if args.cross else "")
    print(f"# derp_scale: {args.pairs} pairs x {args.size} B, {modes}, per-packet writes, "
          f"{args.gen_procs} generator processes, {args.runs} run(s); "
          f"cores available {len(os.sched_getaffinity(0))}; load {os.getloadavg()[0]:.2f}")
    rows: list[tuple[str, list[dict[str, Any]]]] = []
    cases: list[tuple[str, int, str]] = []
    if not args.no_scale:
        cases += [(f"{w} worker{'s' if w > 1 else ''}", w, "shared") for w in range(1, args.max_workers + 1)]
    if args.cross:
        cases += [("2 workers, stay in w0", 2, "stay"), ("2 workers, cross w0->w1", 2, "cross"),
                  ("2 workers, cross, no hold", 2, "cross0")]
    # Runs alternate between the cases (run 1 of every case, then run 2, ...),
    # so a change in the machine's load hits all of them alike.
    by_case: dict[str, list[dict[str, Any]]] = {name: [] for name, _, _ in cases}
    for i in range(args.runs):
        for name, w, how in cases:
            relay = Relay(w, results / f"scale-w{w}-{how}.log", 0.0 if how == "cross0" else None)
            try:
                if how == "shared":
                    target = Target("derp", "127.0.0.1", relay.port)
                elif how == "stay":
                    target = Target("derp", "127.0.0.1", relay.test_ports[0], relay.test_ports[0])
                else:
                    target = Target("derp", "127.0.0.1", relay.test_ports[0], relay.test_ports[1])
                by_case[name].append(measure(relay, target, spec, args.gen_procs))
            finally:
                relay.stop()
            if i == args.runs - 1:
                rows.append((name, by_case[name]))
                print(_line(name, by_case[name]), flush=True)
                if args.per_worker:
                    print(_workers_line(by_case[name]), flush=True)
    if args.idle:
        raise_nofile_limit()
        low, high = (int(x) for x in args.idle.split(","))
        for w in sorted({1, args.max_workers}):
            kb, base = idle_marginal(w, low, high, results / f"scale-idle-w{w}.log")
            print(f"| idle, {w} worker{'s' if w > 1 else ''}: {kb:5.2f} KB per client between "
                  f"{low} and {high} clients (relay RSS at {low}: {base:.1f} MB, all processes) |",
                  flush=True)
    by = dict(rows)
    if args.cross:
        stay = statistics.median(r["us_per_pkt"] for r in by["2 workers, stay in w0"])
        cross = statistics.median(r["us_per_pkt"] for r in by["2 workers, cross w0->w1"])
        cross0 = statistics.median(r["us_per_pkt"] for r in by["2 workers, cross, no hold"])
        capacity = statistics.median(r["pps"] for r in by["2 workers, cross w0->w1"])
        loads = [float(f) for f in args.cross_load.split(",") if f.strip()]
        equal = equal_load(args, capacity, loads, results)
        print(f"\ncrossing / staying CPU per packet, closed loop (each case at its own "
              f"saturated rate): {cross / stay:.2f}x; without the link hold {cross0 / stay:.2f}x")
        for rate, ratio, fair in equal:
            print(f"crossing / staying CPU per packet at an equal {rate:,.0f} pkt/s offered: "
                  f"{ratio:.2f}x (target <= 1.3x)" + ("" if fair else
                                                     " -- NOT COMPARABLE: a case did not sustain the rate"))
    return 0


def equal_load(args: argparse.Namespace, capacity: float, loads: list[float],
               results: Path) -> list[tuple[float, float, bool]]:
    """Staying against crossing, open loop at each ``load * capacity`` pkt/s.

    Returns ``(rate, crossing/staying median CPU per packet, comparable)`` per
    rate; comparable means every run of both cases delivered every packet at
    the offered rate (within 3 %)."""
    out: list[tuple[float, float, bool]] = []
    for load in loads:
        rate = round(load * capacity, -3)
        spec = LoadSpec(pairs=args.pairs, size=args.size, mode="open", rate=rate,
                        warmup=args.warmup, duration=args.duration, per_packet=True)
        runs: dict[str, list[dict[str, Any]]] = {"stay": [], "cross": []}
        for _ in range(args.runs):
            for how in ("stay", "cross"):
                relay = Relay(2, results / f"scale-w2-{how}-open.log")
                try:
                    t = relay.test_ports
                    target = Target("derp", "127.0.0.1", t[0], t[0] if how == "stay" else t[1])
                    runs[how].append(measure(relay, target, spec, args.gen_procs))
                finally:
                    relay.stop()
        for how, name in (("stay", "stay in w0"), ("cross", "cross w0->w1")):
            print(_line(f"{rate / 1e3:,.0f}k/s offered, {name}", runs[how]), flush=True)
            if args.per_worker:
                print(_workers_line(runs[how]), flush=True)
        fair = all(sustained(r, rate) for rs in runs.values() for r in rs)
        ratio = (statistics.median(r["us_per_pkt"] for r in runs["cross"])
                 / statistics.median(r["us_per_pkt"] for r in runs["stay"]))
        out.append((rate, ratio, fair))
    return out


def sustained(r: dict[str, Any], rate: float) -> bool:
    """An open-loop run that delivered everything it offered, at the offered rate."""
    return (verify(r) == "ok" and not r.get("gen_skipped") and not r.get("lost")
            and abs(r["pps"] - rate) <= 0.03 * rate)


def _line(name: str, runs: list[dict[str, Any]]) -> str:
    pps = statistics.median(r["pps"] for r in runs)
    us = statistics.median(r["us_per_pkt"] for r in runs)
    cores = statistics.median(r["srv_cores"] for r in runs)
    p50 = statistics.median(r["p50_us"] for r in runs) / 1e3
    p99 = statistics.median(r["p99_us"] for r in runs) / 1e3
    checks = "; ".join(sorted({verify(r) for r in runs}))
    return (f"| {name:<30} | {pps:>10,.0f} pkt/s | {us:6.2f} us server CPU/pkt | "
            f"{cores:4.2f} server cores | latency p50 {p50:5.2f} / p99 {p99:5.2f} ms | {checks} |")


def _workers_line(runs: list[dict[str, Any]]) -> str:
    """Medians per worker process: CPU, reads and writes (syscalls) per packet."""
    cells = []
    for i in range(len(runs[0]["per_worker"])):
        cpu, rd, wr = (statistics.median(r["per_worker"][i][k] for r in runs) for k in range(3))
        cells.append(f"worker {i}: {cpu:5.2f} us/pkt, {rd:5.3f} reads/pkt, {wr:5.3f} writes/pkt")
    return "|   " + " | ".join(cells) + " |"


if __name__ == "__main__":
    raise SystemExit(main())
