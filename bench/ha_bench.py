"""HA coordinator benchmark: cross-replica fan-out latency through PostgreSQL.

Usage::

    python bench/ha_bench.py                       # 2 replicas, 2,000 peers, 500 updates/s, 20 s
    python bench/ha_bench.py --runs 3              # medians over 3 runs
    python bench/ha_bench.py --dsn postgresql://…  # use an existing server (else a throw-away one)

Processes (all on this machine):

* PostgreSQL: a throw-away cluster (``tests/tailnet/pgserver.py``) unless ``--dsn``;
  each run uses a fresh database.
* replica **B** (this script, ``--role b``): a :class:`PgCoordinator` under uvloop
  with ``--peers`` clients; client *i* adds a tunnel to agent *i*.
* replica **A** (``--role a``): a :class:`PgCoordinator` under uvloop with
  ``--peers`` agents, each with a node; on "GO" it sends ``--rate`` node updates/s
  for ``--duration`` s, round-robin over the agents (update *k* goes to agent
  ``k mod peers`` and carries ``Node.id = k`` and ``as_of`` = the send time).

Measured in B's sinks: latency = receive wall-clock time − ``as_of`` for every
NODE "node update" (A's write + PostgreSQL NOTIFY + B's queries + delivery), and
whether every agent's *last* update reached its client ("no update lost";
coalescing may legitimately skip an intermediate node, which is counted as
``coalesced``). Target on the 2-core machine: p99 < 100 ms, nothing lost.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tailnet.pg import PgCoordinator, PgCoordinatorConfig  # noqa: E402
from tailnet.v2 import tailnet_pb2 as pb  # noqa: E402

NS = uuid.UUID("6f1f6d0e-6a43-4c1a-9c4e-2d1b7f0d6a11")
Req = pb.CoordinateRequest


def agent_id(i: int) -> uuid.UUID:
    return uuid.uuid5(NS, f"agent-{i}")


def client_id(i: int) -> uuid.UUID:
    return uuid.uuid5(NS, f"client-{i}")


class Sink:
    """Counts and timestamps updates (B side) or ignores them (A side)."""

    def __init__(self, rec: Recorder | None = None) -> None:
        self.rec = rec

    def send(self, resp: pb.CoordinateResponse) -> bool:
        if self.rec is not None:
            self.rec.got(resp)
        return True

    def close(self, error: str | None = None) -> None:
        pass


class Recorder:
    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.last: dict[bytes, int] = {}
        self.changed = asyncio.Event()

    def got(self, resp: pb.CoordinateResponse) -> None:
        now = time.time()
        for u in resp.peer_updates:
            if u.kind == pb.CoordinateResponse.PeerUpdate.NODE:
                if u.reason == "node update" and u.node.id >= 0:
                    self.latencies.append(now - u.node.as_of.ToNanoseconds() / 1e9)
                self.last[u.id] = u.node.id
        self.changed.set()


def _node(k: int) -> pb.Node:
    n = pb.Node(id=k, preferred_derp=1, key=b"np" + bytes(32), disco="discokey:" + "0" * 64,
                addresses=["fd7a:115c:a1e0::1/128"], endpoints=["192.0.2.1:41641"])
    n.as_of.FromNanoseconds(time.time_ns())
    return n


async def role_b(args: argparse.Namespace) -> None:
    cfg = PgCoordinatorConfig()
    coord = PgCoordinator(args.dsn, cfg)
    await coord.start()
    rec = Recorder()
    sinks = []
    for i in range(args.peers):
        s = Sink(rec)
        sinks.append(s)
        cid = client_id(i)
        coord.connect(cid, "client", s)
        coord.handle(cid, s, Req(update_self=Req.UpdateSelf(node=_node(-1))))
        coord.handle(cid, s, Req(add_tunnel=Req.Tunnel(id=agent_id(i).bytes)))
    await coord.flush()
    print("READY", flush=True)
    line = await asyncio.to_thread(sys.stdin.readline)  # "DONE <total sent>"
    total = int(line.split()[1])
    want = {}
    for i in range(args.peers):
        ks = [k for k in range(i, total, args.peers)]
        if ks:
            want[agent_id(i).bytes] = ks[-1]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if all(rec.last.get(a, -2) == k for a, k in want.items()):
            break
        rec.changed.clear()
        try:
            await asyncio.wait_for(rec.changed.wait(), 1.0)
        except TimeoutError:
            pass
    lost = sum(1 for a, k in want.items() if rec.last.get(a, -2) != k)
    lat = sorted(rec.latencies)
    out: dict[str, Any] = {
        "sent": total,
        "delivered": len(lat),
        "coalesced": total - len(lat),
        "lost_final": lost,
        "p50_ms": 1000 * lat[len(lat) // 2] if lat else None,
        "p99_ms": 1000 * lat[min(len(lat) - 1, int(len(lat) * 0.99))] if lat else None,
        "max_ms": 1000 * lat[-1] if lat else None,
        "query_batches": coord.query_batches,
    }
    print("RESULT " + json.dumps(out), flush=True)
    await coord.stop()


async def role_a(args: argparse.Namespace) -> None:
    coord = PgCoordinator(args.dsn, PgCoordinatorConfig())
    await coord.start()
    sinks = []
    for i in range(args.peers):
        s = Sink()
        sinks.append(s)
        aid = agent_id(i)
        coord.connect(aid, "agent", s)
        coord.handle(aid, s, Req(update_self=Req.UpdateSelf(node=_node(-1))))
    await coord.flush()
    print("READY", flush=True)
    await asyncio.to_thread(sys.stdin.readline)  # "GO"
    total = int(args.rate * args.duration)
    loop = asyncio.get_running_loop()
    start = loop.time()
    tick = 0.01
    k = 0
    while k < total:
        due = min(total, int((loop.time() - start) * args.rate) + 1)
        while k < due:
            i = k % args.peers
            coord.handle(agent_id(i), sinks[i], Req(update_self=Req.UpdateSelf(node=_node(k))))
            k += 1
        await asyncio.sleep(tick)  # pacing timer for the open-loop load
    await coord.flush()
    print(f"SENT {total} batches={coord.write_batches}", flush=True)
    await asyncio.to_thread(sys.stdin.readline)
    await coord.stop()


def _spawn(role: str, args: argparse.Namespace, dsn: str) -> subprocess.Popen[str]:
    cmd = [sys.executable, __file__, "--role", role, "--dsn", dsn, "--peers", str(args.peers),
           "--rate", str(args.rate), "--duration", str(args.duration)]
    return subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def _expect(p: subprocess.Popen[str], prefix: str) -> str:
    assert p.stdout is not None
    while True:
        line = p.stdout.readline()
        if not line:
            raise RuntimeError(f"replica exited before {prefix!r}")
        if line.startswith(prefix):
            return line.strip()


def one_run(args: argparse.Namespace, dsn: str) -> dict[str, Any]:
    b = _spawn("b", args, dsn)
    _expect(b, "READY")
    a = _spawn("a", args, dsn)
    _expect(a, "READY")
    assert a.stdin is not None and b.stdin is not None
    a.stdin.write("GO\n")
    a.stdin.flush()
    sent = _expect(a, "SENT")
    total = int(sent.split()[1])
    b.stdin.write(f"DONE {total}\n")
    b.stdin.flush()
    result: dict[str, Any] = json.loads(_expect(b, "RESULT").split(" ", 1)[1])
    result["a_write_batches"] = int(sent.split("batches=")[1])
    a.stdin.write("STOP\n")
    a.stdin.flush()
    for p in (a, b):
        p.wait(60)
    return result


async def _with_db(server: Any) -> str:
    from tests.tailnet.pgserver import create_database

    return await create_database(server)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--role", choices=["a", "b"])
    ap.add_argument("--dsn")
    ap.add_argument("--peers", type=int, default=2000)
    ap.add_argument("--rate", type=float, default=500.0)
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.role:
        import uvloop

        uvloop.run(role_a(args) if args.role == "a" else role_b(args))
        return
    server = None
    if args.dsn is None:
        from tests.tailnet.pgserver import PgServer, find_pg_bin

        bindir = find_pg_bin()
        if bindir is None:
            sys.exit("PostgreSQL binaries not found; pass --dsn")
        server = PgServer(bindir)
        server.start()
    results = []
    try:
        for r in range(args.runs):
            dsn = args.dsn or asyncio.run(_with_db(server))
            res = one_run(args, dsn)
            print(f"run {r + 1}: {json.dumps(res)}", flush=True)
            results.append(res)
    finally:
        if server is not None:
            server.destroy()
    summary = {
        "peers_per_replica": args.peers,
        "rate": args.rate,
        "duration_s": args.duration,
        "runs": args.runs,
        "p50_ms_median": statistics.median(r["p50_ms"] for r in results),
        "p99_ms_median": statistics.median(r["p99_ms"] for r in results),
        "max_ms_median": statistics.median(r["max_ms"] for r in results),
        "lost_final_total": sum(r["lost_final"] for r in results),
        "coalesced_total": sum(r["coalesced"] for r in results),
    }
    print(json.dumps(summary, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "runs": results}, indent=2))


if __name__ == "__main__":
    main()
