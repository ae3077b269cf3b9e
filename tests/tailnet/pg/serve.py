"""``tailnet serve`` replicas as real processes on one PostgreSQL, for the HA mesh tests.

:func:`start_replica` runs ``python -m tailnet serve`` with ``--postgres-url``
on ephemeral loopback ports (no gRPC, no STUN) and returns once the banner is
printed (the relay is registered and meshing by then). Replicas of one test
share a data directory (tokens and resume keys, as replicas behind one load
balancer must); its relay key is per process in HA. Each replica's log goes to
``<dir>/<name>.log``.

Also here: the peers' side of the demo flow split across replicas
(:func:`ping_until_answered`, :func:`echo_sealed`), DERP logins retried while
admission control has not learned a key yet, and health-report polling.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import urllib.request
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nacl.exceptions

from derp.client import DerpClient
from derp.events import PacketReceived
from derp.keys import PrivateKey, PublicKey, open_sealed, seal

T = 20.0
ROOT = Path(__file__).resolve().parents[3]


@dataclass
class Replica:
    name: str
    proc: asyncio.subprocess.Process
    api: str
    log: Path
    banner: dict[str, str] = field(default_factory=dict)

    @property
    def derp_url(self) -> str:
        return self.api + "/derp"

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None

    async def kill(self) -> None:
        """SIGKILL: no graceful anything (sockets reset by the kernel)."""
        self.proc.send_signal(signal.SIGKILL)
        await asyncio.wait_for(self.proc.wait(), T)

    async def stop(self) -> int:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), T)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        assert self.proc.returncode is not None
        return self.proc.returncode


async def start_replica(
    name: str, dsn: str, data_dir: Path, *extra: str, heartbeat: float = 0.5
) -> Replica:
    log = data_dir / f"{name}.log"
    with open(log, "ab") as err:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tailnet", "serve",
            "--http-addr", "127.0.0.1:0", "--grpc-addr", "off", "--stun-addr", "off",
            "--data-dir", str(data_dir), "--postgres-url", dsn,
            "--replica-heartbeat", str(heartbeat), "--log-level", "INFO",
            *extra,
            stdout=asyncio.subprocess.PIPE, stderr=err,
            env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT,
        )
    banner: dict[str, str] = {}

    async def read_banner() -> None:
        assert proc.stdout is not None
        while True:
            line = (await proc.stdout.readline()).decode()
            if not line:
                raise AssertionError(f"replica {name} exited: {log.read_text()[-3000:]}")
            key, sep, value = line.strip().partition(":")
            if sep:
                banner[key.strip()] = value.strip()
            if line.strip().startswith("try:"):
                return

    try:
        await asyncio.wait_for(read_banner(), T)
    except BaseException:
        proc.kill()
        await proc.wait()
        raise
    return Replica(name, proc, banner["API"], log, banner)


def admin_token(data_dir: Path) -> str:
    """Mint an admin (control-plane) token into the shared tokens file (the file keeps
    only hashes; running replicas pick the new entry up)."""
    from tailnet.identity import Principal
    from tailnet.tokens import TokenStore

    _, token = TokenStore(data_dir / "tokens.json").issue(
        Principal("control_plane", uuid.UUID(int=1), "test admin"))
    return token


def _get_json(url: str, token: str) -> dict[str, Any]:
    req = urllib.request.Request(url, headers={"Coder-Session-Token": token})
    with urllib.request.urlopen(req, timeout=T) as resp:
        doc: dict[str, Any] = json.loads(resp.read())
        return doc


async def health(replica: Replica, token: str) -> dict[str, Any]:
    """A fresh health report of ``replica`` (``?force=true``)."""
    return await asyncio.to_thread(
        _get_json, replica.api + "/api/v2/debug/health?force=true", token
    )


async def wait_health(
    replica: Replica, token: str, pred: Callable[[dict[str, Any]], bool], what: str,
    timeout: float = T,
) -> dict[str, Any]:
    """Poll ``replica``'s health report until ``pred(report["derp"]["mesh"])``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last: dict[str, Any] = {}
    while True:
        last = (await health(replica, token))["derp"].get("mesh") or {}
        if pred(last):
            return last
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}: {json.dumps(last, indent=1)}")
        await asyncio.sleep(0.2)


def fully_meshed(n: int) -> Callable[[dict[str, Any]], bool]:
    """Every one of ``n`` live relays reports an up link to each of the others, no
    link to any other replica, and no warning."""

    def pred(mesh: dict[str, Any]) -> bool:
        relays = mesh.get("relays", [])
        if len(relays) != n or mesh.get("warnings"):
            return False
        ids = {r["id"] for r in relays}
        for r in relays:
            up = {x["replica_id"] for x in r["links"] if x["state"] == "up"}
            known = {x["replica_id"] for x in r["links"] if x["replica_id"] is not None}
            if up != ids - {r["id"]} or known != up:
                return False
        return True

    return pred


async def derp_login(url: str, key: PrivateKey, timeout: float = T) -> DerpClient:
    """Log in to ``url``, retrying while the relay refuses (admission control learns
    keys through the database a moment after the coordinator delivered them)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        c = DerpClient(url, key, connect_timeout=timeout)
        try:
            await c.connect()
            return c
        except Exception:
            await c.close()
            if loop.time() > deadline:
                raise
            await asyncio.sleep(0.1)


async def ping_until_answered(
    client: DerpClient, key: PrivateKey, peer: PublicKey, payload: bytes, timeout: float = T
) -> bytes:
    """Send ``seal(payload)`` to ``peer`` every 100 ms until a sealed answer that opens
    to ``b"pong " + payload`` arrives (a packet sent before the mesh route exists is
    dropped, as on any DERP; real peers retransmit). Returns the answer's plaintext."""
    box = seal(key, peer, payload)

    async def wait_answer() -> bytes:
        while True:
            ev = await client.recv()
            if isinstance(ev, PacketReceived) and ev.src == peer:
                plain = open_sealed(key, ev.src, ev.data)
                if plain == b"pong " + payload:
                    return plain

    answer = asyncio.ensure_future(wait_answer())
    try:
        async with asyncio.timeout(timeout):
            while True:
                await client.send(peer, box)
                done, _ = await asyncio.wait({answer}, timeout=0.1)
                if done:
                    return answer.result()
    finally:
        answer.cancel()
        await asyncio.gather(answer, return_exceptions=True)


async def echo_sealed(
    client: DerpClient, key: PrivateKey, peer: PublicKey, rejected: asyncio.Event,
    others: asyncio.Queue[object] | None = None,
) -> None:
    """Answer every sealed packet from ``peer`` with a sealed ``b"pong " + plaintext``;
    a box that does not open sets ``rejected``; every other event goes to ``others``.
    Runs until cancelled."""
    while True:
        ev = await client.recv()
        if not isinstance(ev, PacketReceived) or ev.src != peer:
            if others is not None:
                others.put_nowait(ev)
            continue
        try:
            plain = open_sealed(key, ev.src, ev.data)
        except nacl.exceptions.CryptoError:
            rejected.set()
            continue
        await client.send(peer, seal(key, peer, b"pong " + plain))


async def until(cond: Callable[[], bool | Awaitable[bool]], what: str, timeout: float = T) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        r = cond()
        if not isinstance(r, bool):
            r = await r
        if r:
            return
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)
