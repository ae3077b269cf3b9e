"""A PgCoordinator replica in its own process, for tests that SIGKILL it.

Usage: ``python replica_proc.py DSN HEARTBEAT PEER_UUID NODE_ID [TUNNEL_DST_UUID]``.
Connects one peer with the given node (and tunnel), waits until its writes are
committed, prints ``READY <coordinator-id>`` and then runs until killed.
"""

from __future__ import annotations

import asyncio
import sys
import uuid

from tailnet.pg import PgCoordinator, PgCoordinatorConfig
from tailnet.v2 import tailnet_pb2 as pb


class _Sink:
    def send(self, resp: pb.CoordinateResponse) -> bool:
        return True

    def close(self, error: str | None = None) -> None:
        pass


async def main() -> None:
    dsn, hb, peer, node_id = sys.argv[1], float(sys.argv[2]), uuid.UUID(sys.argv[3]), int(sys.argv[4])
    coord = PgCoordinator(dsn, PgCoordinatorConfig(heartbeat_interval=hb, retry_max=0.5))
    await coord.start()
    sink = _Sink()
    coord.connect(peer, "replica-proc-peer", sink)
    req = pb.CoordinateRequest(update_self=pb.CoordinateRequest.UpdateSelf(
        node=pb.Node(id=node_id, preferred_derp=999)))
    coord.handle(peer, sink, req)
    if len(sys.argv) > 5:
        dst = uuid.UUID(sys.argv[5])
        coord.handle(peer, sink, pb.CoordinateRequest(add_tunnel=pb.CoordinateRequest.Tunnel(id=dst.bytes)))
    await coord.flush()
    print(f"READY {coord.id}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main())
