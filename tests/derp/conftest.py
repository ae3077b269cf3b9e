"""Fixtures for DERP server tests: a server on 127.0.0.1:0 and raw-socket clients.

``RawClient`` speaks DERP with nothing but :mod:`derp.frames` and :mod:`derp.keys`
over an asyncio stream, so server tests do not depend on the client library.
Every wait is bounded (``WAIT`` seconds, generous for a loaded machine).

One worker and two: every test that uses the ``server``, ``connect``, ``make_host`` or
``derp_workers`` fixtures runs twice, ``[w1]`` against one :class:`DerpServer` and ``[w2]``
against two of them in this event loop joined by :class:`WorkerNode` links, as
``derper --workers 2`` runs them in two processes (:class:`Host`). With two
workers, client *k* of a test connects to worker *k* % 2, so a pair of clients
sits on different workers and every packet between them crosses the link; the
``connect`` factory returns only once every worker knows the new client's key
(:meth:`Host.known`: a worker learns it one link message after the client
registered, and a packet for it sent from the other worker in that window would
be dropped as unknown); ``connect(worker=i)`` picks the worker instead. A test
that starts its own relay uses ``make_host(**config)`` (limits split as the
supervisor splits them). ``server.stats`` and ``server.client_count`` are totals
over the workers; :meth:`Host.synced` waits until every worker has heard of every
arrival and departure, :meth:`Host.stats_synced` until ``/metrics`` on any worker
shows current totals. The workers' registries, route tables and their views of
each other are checked (:meth:`Host.check_invariants`) after every ``connect``,
at ``synced`` and at teardown. A test that checks state which is per process by
definition says so with ``@pytest.mark.single_worker("reason")`` and runs with
one worker.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import math
import os
import shutil
import socket
import struct
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import uvloop

from derp.frames import (
    HEADER_LEN,
    MAGIC,
    Frame,
    FrameType,
    encode_client_info,
    encode_send_packet,
)
from derp.keys import PrivateKey, open_sealed, seal
from derp.server import DerpServer, ServerConfig
from derp.stats import ServerStats
from derp.workers.node import WorkerNode, WorkerSpec
from derp.workers.shared import SharedLimits

WAIT = 20.0
_HDR = struct.Struct(">BI")

UPGRADE_REQUEST = (
    b"GET /derp HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: Go-http-client/1.1\r\n"
    b"Upgrade: DERP\r\nConnection: Upgrade\r\n"
)


class RawClient:
    """A minimal DERP client over raw TCP for tests."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, key: PrivateKey
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.key = key
        self.server_key = b""
        self.server_info: dict[str, Any] | None = None

    @property
    def pub(self) -> bytes:
        return self.key.public.raw

    @classmethod
    async def open(
        cls,
        port: int,
        key: PrivateKey | None = None,
        *,
        rcvbuf: int | None = None,
    ) -> RawClient:
        key = key or PrivateKey.generate()
        if rcvbuf is not None:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
            r, w = await asyncio.open_connection(sock=sock)
        else:
            r, w = await asyncio.open_connection("127.0.0.1", port)
        return cls(r, w, key)

    async def read_http_head(self) -> bytes:
        return await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), WAIT)

    def client_info_frame(self, info: dict[str, Any] | None = None) -> bytes:
        body = json.dumps(info if info is not None else {"version": 2, "CanAckPings": True})
        return encode_client_info(self.pub, seal(self.key, self.server_key, body.encode()))

    async def read_server_key(self) -> bytes:
        f = await self.recv_frame()
        assert f.type == FrameType.SERVER_KEY, f
        assert len(f.payload) == 40 and f.payload[:8] == MAGIC
        self.server_key = f.payload[8:40]
        return self.server_key

    async def read_server_info(self) -> dict[str, Any]:
        f = await self.recv_frame()
        assert f.type == FrameType.SERVER_INFO, f
        plain = open_sealed(self.key, self.server_key, f.payload)
        info = json.loads(plain)
        assert isinstance(info, dict)
        self.server_info = info
        return info

    async def handshake(self, info: dict[str, Any] | None = None) -> None:
        """Upgrade (101 path), read ServerKey, send ClientInfo, read ServerInfo."""
        self.writer.write(UPGRADE_REQUEST + b"\r\n")
        head = await self.read_http_head()
        assert head.startswith(b"HTTP/1.1 101 "), head
        await self.read_server_key()
        self.writer.write(self.client_info_frame(info))
        await self.read_server_info()

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    def send_packet(self, dst: bytes, packet: bytes) -> None:
        self.writer.write(encode_send_packet(dst, packet))

    async def recv_frame(self, timeout: float = WAIT) -> Frame:
        hdr = await asyncio.wait_for(self.reader.readexactly(HEADER_LEN), timeout)
        t, n = _HDR.unpack(hdr)
        payload = await asyncio.wait_for(self.reader.readexactly(n), timeout) if n else b""
        return Frame(t, payload)

    async def recv_type(self, ftype: int, timeout: float = WAIT) -> Frame:
        """Next frame of ``ftype``, skipping KeepAlives and other frames."""
        while True:
            f = await self.recv_frame(timeout)
            if f.type == ftype:
                return f

    async def recv_packet(self, timeout: float = WAIT) -> tuple[bytes, bytes]:
        f = await self.recv_type(FrameType.RECV_PACKET, timeout)
        return f.payload[:32], f.payload[32:]

    async def expect_closed(self, timeout: float = WAIT) -> None:
        """Wait until the server closes the connection (frames before EOF are ignored)."""

        async def drain() -> None:
            while True:
                try:
                    chunk = await self.reader.read(65536)
                except ConnectionResetError:
                    return
                if not chunk:
                    return

        await asyncio.wait_for(drain(), timeout)

    async def close(self) -> None:
        self.writer.close()
        try:
            await asyncio.wait_for(self.writer.wait_closed(), WAIT)
        except (ConnectionError, asyncio.TimeoutError):
            pass


ClientFactory = Callable[..., Awaitable[RawClient]]


async def closed_at_once(port: int) -> bool:
    """Connect and send an HTTP request; True if the server closed without
    answering (refused at accept by a limit)."""
    r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), WAIT)
    try:
        w.write(b"GET /derp/probe HTTP/1.1\r\nHost: x\r\n\r\n")
        data = await asyncio.wait_for(r.read(), WAIT)
    except ConnectionResetError:
        data = b""
    finally:
        w.close()
    return data == b""


async def wait_until(cond: Callable[[], bool], timeout: float = WAIT) -> None:
    """Poll a server-side condition on the event loop (bounded; yields each turn)."""

    async def loop() -> None:
        while not cond():
            await asyncio.sleep(0.005)

    await asyncio.wait_for(loop(), timeout)


def make_config(**kw: Any) -> ServerConfig:
    kw.setdefault("private_key", PrivateKey.generate())
    return ServerConfig(**kw)


if os.environ.get("DERP_TEST_UVLOOP") == "1":
    # Opt-in: run the async tests of this directory on uvloop instead of asyncio.

    def pytest_asyncio_loop_factories(
        config: pytest.Config, item: pytest.Item
    ) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
        return {"uvloop": uvloop.new_event_loop}


class Host:
    """The relay as a test sees it: one :class:`DerpServer`, or two joined like the
    workers of ``derper --workers 2`` (see the module docstring).

    Attributes not defined here are worker 0's (``server.relay``,
    ``server.public_key``, ``server.metrics`` …); ``port`` is worker 0's port and
    :meth:`next_port` the port of the worker the next client goes to.
    """

    def __init__(
        self, servers: list[DerpServer], nodes: list[WorkerNode], sock_dir: str | None
    ) -> None:
        self.servers = servers
        self.nodes = nodes
        self._sock_dir = sock_dir
        self._shared: SharedLimits | None = None
        self._turn = itertools.count()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.servers[0], name)

    @property
    def workers(self) -> int:
        return len(self.servers)

    @property
    def port(self) -> int:
        return self.servers[0].port

    def next_worker(self) -> int:
        """The worker the next client connects to (client k → worker k % workers)."""
        return next(self._turn) % len(self.servers)

    def next_port(self) -> int:
        return self.servers[self.next_worker()].port

    @property
    def stats(self) -> ServerStats:
        """The counters: totals over every worker (a fresh copy with two)."""
        if len(self.servers) == 1:
            return self.servers[0].stats
        total = ServerStats()
        for name in ServerStats.__slots__:
            parts = [getattr(s.stats, name) for s in self.servers]
            if isinstance(parts[0], dict):
                setattr(total, name, {k: sum(p[k] for p in parts) for k in parts[0]})
            elif name == "average_queue_duration_ms":
                setattr(total, name, max(parts))
            else:
                setattr(total, name, sum(parts))
        for node in self.nodes:  # counted as sent by two workers (as /metrics does)
            total.packets_sent -= node.recounted[0]
            total.bytes_sent -= node.recounted[1]
        return total

    @property
    def client_count(self) -> int:
        return sum(s.client_count for s in self.servers)

    @property
    def open_connections(self) -> int:
        return sum(s.open_connections for s in self.servers)

    @property
    def connections(self) -> frozenset[Any]:
        return frozenset().union(*(s.connections for s in self.servers))

    def holds(self, key: bytes) -> bool:
        """Some worker has a connection of ``key``."""
        return any(key in s.relay for s in self.servers)

    def _known(self, key: bytes, home: int) -> bool:
        if key not in self.servers[home].relay:
            return True  # gone again (or rejected): nothing to wait for
        for j, node in enumerate(self.nodes):
            if j != home:
                si = node.stand_ins.get(key)
                if si is None or si.link.index != home or node.ctx.relay.active.get(key) is not si:
                    return False
        return True

    async def known(self, key: bytes, home: int) -> None:
        """Wait until every other worker routes ``key`` to worker ``home`` (the
        worker of its newest connection): presence, and for a duplicate key the
        step aside, have crossed the links."""
        if self.nodes:
            await wait_until(lambda: self._known(key, home))

    def _synced(self) -> bool:
        for j, node in enumerate(self.nodes):
            for i, srv in enumerate(self.servers):
                if i == j:
                    continue
                link = node.links.get(i)
                if link is None or set(link.keys) != set(srv.relay.keys()):
                    return False
        return True

    async def synced(self) -> None:
        """Wait until every worker knows exactly the keys every other one holds
        (arrivals and departures have crossed the links)."""
        if self.nodes:
            await wait_until(self._synced)
        self.check_invariants()

    async def stats_synced(self) -> None:
        """Make every worker send its counters now and wait until each sibling
        has them, so ``/metrics`` and ``/debug/`` on any worker show current totals."""
        if not self.nodes:
            return

        def current() -> bool:
            for j, node in enumerate(self.nodes):
                for i, srv in enumerate(self.servers):
                    if i != j:
                        got = node._sibling_stats.get(i)
                        if got is None or got["stats"] != srv.stats.snapshot():
                            return False
            return True

        async def loop() -> None:
            while not current():
                for node in self.nodes:  # a STATS frame now (as its timer does)
                    payload = node._stats_payload()
                    for link in node.links.values():
                        link.control().stats(payload)
                await asyncio.sleep(0.005)

        await asyncio.wait_for(loop(), WAIT)

    def check_invariants(self) -> None:
        """Every worker's registry and route table are consistent, and with two,
        each worker's view of its sibling matches what the sibling announced
        (``relay.elsewhere``, the routes via the link, the stand-ins)."""
        for i, srv in enumerate(self.servers):
            relay = srv.relay
            relay.check_invariants()
            srv.context.routes.check_invariants()
            if not self.nodes:
                continue
            node = self.nodes[i]
            counts: dict[bytes, int] = {}
            for link in node.links.values():
                assert link.up
                for k in link.keys:
                    counts[k] = counts.get(k, 0) + 1
                    assert link in srv.context.routes.links_for(k), "announced key not routed"
            assert counts == relay.elsewhere, "elsewhere is not what the siblings announced"
            for k, si in node.stand_ins.items():
                assert si in relay.stand_ins
                assert k in relay.elsewhere, "stand-in for a key no sibling holds"
            for k, c in relay.active.items():
                if c in relay.stand_ins:
                    assert node.stand_ins.get(k) is c
                    assert k not in relay or relay.is_aside(k)

    async def stop(self, grace: float = 5.0, *, restarting: bool = False) -> None:
        """Stop every worker (each closes its own clients), then the links."""
        try:
            for s in self.servers:
                await s.stop(grace, restarting=restarting)
            for node in self.nodes:
                await node.stop()
        finally:
            for srv in self.servers:
                if isinstance(srv.config.host_limits, SharedLimits):
                    srv.config.host_limits.close()
            if self._shared is not None:
                self._shared.close()
                self._shared = None
            if self._sock_dir is not None:
                shutil.rmtree(self._sock_dir, ignore_errors=True)
                self._sock_dir = None


async def start_host(config: ServerConfig, workers: int = 1, *, port: int = 0) -> Host:
    """Start the relay (``workers`` 1 or more) on 127.0.0.1 with ``config``, its
    connection and accept limits host totals as under ``derper --workers N``
    (one :class:`~derp.workers.shared.SharedLimits` file); worker 0 on ``port``."""
    if workers == 1:
        srv = DerpServer(config)
        await srv.start("127.0.0.1", port)
        return Host([srv], [], None)
    # Not tmp_path: a Unix socket path must stay under ~107 bytes.
    sock_dir = tempfile.mkdtemp(prefix="derp-w-")
    limits = os.path.join(sock_dir, "limits")
    shared = None
    if config.max_connections or math.isfinite(config.accept_limit):
        shared = SharedLimits.create(
            limits,
            workers,
            max_connections=config.max_connections,
            accept_limit=config.accept_limit,
            accept_burst=config.accept_burst,
        )
    servers: list[DerpServer] = []
    nodes: list[WorkerNode] = []
    host = Host(servers, nodes, sock_dir)
    host._shared = shared
    try:
        for i in range(workers):
            cfg = config
            if shared is not None:
                cfg = dataclasses.replace(config, host_limits=SharedLimits.open(limits, i))
            srv = DerpServer(cfg)
            servers.append(srv)
            await srv.start("127.0.0.1", port if i == 0 else 0)
            node = WorkerNode(srv, WorkerSpec(i, workers, sock_dir))
            nodes.append(node)
            await node.start()
            await asyncio.wait_for(node.wait_linked(), WAIT)
        # wait_linked covers the lower-index siblings; the others see our HELLO later.
        await wait_until(lambda: all(len(n.links) == workers - 1 for n in nodes))
    except BaseException:
        await host.stop()
        raise
    return host


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "single_worker(reason): run this DERP server test with one worker only "
        "(what it checks is per process by definition)",
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "derp_workers" in metafunc.fixturenames:
        mark = metafunc.definition.get_closest_marker("single_worker")
        if mark is not None and not (mark.args and isinstance(mark.args[0], str)):
            raise pytest.UsageError(f"{metafunc.definition.nodeid}: single_worker needs a reason")
        counts = [1] if mark is not None else [1, 2]
        metafunc.parametrize("derp_workers", counts, ids=[f"w{n}" for n in counts])


@pytest.fixture
async def hosts() -> AsyncIterator[list[Host]]:
    """Hosts a test started itself (``make_host``); stopped at teardown."""
    made: list[Host] = []
    yield made
    for h in reversed(made):
        h.check_invariants()
        await h.stop()


HostFactory = Callable[..., Awaitable[Host]]


@pytest.fixture
def make_host(derp_workers: int, hosts: list[Host]) -> HostFactory:
    """``await make_host(**config)`` → a started :class:`Host` of ``derp_workers``
    workers (``make_config(**config)``), stopped at teardown (``host.stop()``
    before that is fine)."""

    async def factory(**kw: Any) -> Host:
        h = await start_host(make_config(**kw), derp_workers)
        hosts.append(h)
        return h

    return factory


@pytest.fixture
async def server(make_host: HostFactory) -> Host:
    return await make_host()


@pytest.fixture
async def clients() -> AsyncIterator[list[RawClient]]:
    """A list that tests append their clients to; all are closed at teardown."""
    made: list[RawClient] = []
    yield made
    for c in made:
        await c.close()


@pytest.fixture
def connect(
    request: pytest.FixtureRequest, make_host: HostFactory, clients: list[RawClient]
) -> ClientFactory:
    """``await connect()`` → a handshaken RawClient on the ``server`` fixture (or on
    ``host=``), on the next worker in turn (or on ``worker=`` modulo the count);
    it returns once every worker routes its key to it (:meth:`Host.known`). A
    test that uses ``connect`` without ``server`` gets a default host on its
    first call."""
    default: list[Host] = []
    if "server" in request.fixturenames:
        default.append(request.getfixturevalue("server"))

    async def factory(
        key: PrivateKey | None = None,
        *,
        info: dict[str, Any] | None = None,
        handshake: bool = True,
        rcvbuf: int | None = None,
        host: Host | None = None,
        worker: int | None = None,
    ) -> RawClient:
        if host is None:
            if not default:
                default.append(await make_host())
            host = default[0]
        w = host.next_worker() if worker is None else worker % host.workers
        c = await RawClient.open(host.servers[w].port, key, rcvbuf=rcvbuf)
        clients.append(c)
        if handshake:
            await c.handshake(info)
            await host.known(c.pub, w)
            host.check_invariants()
        return c

    return factory
