"""TailnetService.run_coordinate with on-demand reading (``ready``/``listen``,
as the DRPC transport uses it): requests are handled in order, none is lost
when it arrives while the reader finishes, and an idle peer has no reader task."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable

from tailnet.auth import TAILSCALE_SERVICE_PREFIX, UnrestrictedPolicy, addr_from_uuid
from tailnet.core import Coordinator
from tailnet.derpmap import StaticDERPMapSource, embedded_region, new_derp_map
from tailnet.identity import Principal, StaticTokenAuthenticator
from tailnet.service import StreamIdentity, TailnetService
from tailnet.v2 import tailnet_pb2 as pb

T = 10.0
EOF_MARK = object()


def node_for(peer_id: uuid.UUID, derp: int) -> pb.Node:
    addr = f"{addr_from_uuid(TAILSCALE_SERVICE_PREFIX, peer_id)}/128"
    return pb.Node(
        id=peer_id.int & 0x7FFFFFFF, key=b"np" + peer_id.bytes * 2,
        disco="discokey:" + peer_id.hex * 2, preferred_derp=derp,
        addresses=[addr], allowed_ips=[addr],
    )


def update_self(peer_id: uuid.UUID, derp: int) -> pb.CoordinateRequest:
    return pb.CoordinateRequest(
        update_self=pb.CoordinateRequest.UpdateSelf(node=node_for(peer_id, derp))
    )


class PushedRequests:
    """The transport side: a queue with ready/listen (like a DRPC call)."""

    def __init__(self) -> None:
        self.items: list[object] = []
        self.listener: Callable[[], None] | None = None
        self.responses: list[pb.CoordinateResponse] = []
        self.got = asyncio.Event()

    def push(self, item: object) -> None:
        self.items.append(item)
        if self.listener is not None:
            self.listener()

    def ready(self) -> bool:
        return bool(self.items)

    def listen(self, cb: Callable[[], None] | None) -> None:
        self.listener = cb

    async def read(self) -> object:
        assert self.items, "read() without ready()"
        return self.items.pop(0)

    async def write(self, resp: pb.CoordinateResponse) -> None:
        self.responses.append(resp)
        self.got.set()


def _service() -> TailnetService:
    return TailnetService(
        coordinator=Coordinator(),
        authenticator=StaticTokenAuthenticator({}),
        derp_maps=StaticDERPMapSource(new_derp_map(embedded_region("127.0.0.1", 1))),
    )


def _ident(name: str) -> StreamIdentity:
    p = Principal("control_plane", uuid.uuid4(), name)
    return StreamIdentity(p, uuid.uuid4(), name, UnrestrictedPolicy())


def _run(svc: TailnetService, ident: StreamIdentity, io: PushedRequests) -> asyncio.Task[None]:
    return asyncio.ensure_future(svc.run_coordinate(
        ident, io.read, io.write, EOF_MARK, ready=io.ready, listen=io.listen
    ))


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_requests_are_handled_in_order_without_an_idle_reader_task() -> None:
    svc = _service()
    a, b = _ident("a"), _ident("b")
    io_a, io_b = PushedRequests(), PushedRequests()
    run_a, run_b = _run(svc, a, io_a), _run(svc, b, io_b)
    await _settle()
    assert io_a.listener is not None and io_b.listener is not None
    idle_tasks = len(asyncio.all_tasks())
    # b tunnels to a; a updates itself three times in one burst: b sees the last
    io_b.push(pb.CoordinateRequest(add_tunnel=pb.CoordinateRequest.Tunnel(id=a.peer_id.bytes)))
    for derp in (1, 2, 3):
        io_a.push(update_self(a.peer_id, derp))
    await _settle()
    assert len(asyncio.all_tasks()) == idle_tasks  # the readers came and went

    def last_derp_b_saw() -> int | None:
        for resp in reversed(io_b.responses):
            for upd in resp.peer_updates:
                if upd.id == a.peer_id.bytes and upd.HasField("node"):
                    return upd.node.preferred_derp
        return None

    async def until_b_sees(derp: int) -> None:
        while last_derp_b_saw() != derp:
            io_b.got.clear()
            await io_b.got.wait()

    await asyncio.wait_for(until_b_sees(3), T)
    assert svc.stats.requests_received == 4
    io_a.push(update_self(a.peer_id, 4))
    await asyncio.wait_for(until_b_sees(4), T)
    # Disconnect ends a's stream (its run returns); EOF ends b's (the peer is lost)
    io_a.push(pb.CoordinateRequest(disconnect=pb.CoordinateRequest.Disconnect()))
    await asyncio.wait_for(run_a, T)
    io_b.push(EOF_MARK)
    await asyncio.wait_for(run_b, T)
    assert io_a.listener is None and io_b.listener is None  # unregistered: no cycle


async def test_input_during_the_readers_last_step_is_not_lost() -> None:
    """A request pushed after the reader task decided to stop (but before its
    done-callback ran) is picked up by a new reader."""
    svc = _service()
    a = _ident("a")
    io = PushedRequests()
    run = _run(svc, a, io)
    await _settle()
    io.push(update_self(a.peer_id, 1))
    # the reader task now exists; push again before it ran at all and once more
    # right after it has returned (its done-callback is still pending)
    io.push(update_self(a.peer_id, 2))
    for _ in range(3):
        await asyncio.sleep(0)
        io.push(update_self(a.peer_id, 3))
    await _settle()
    assert svc.stats.requests_received == 5
    assert not io.items
    io.push(EOF_MARK)
    await asyncio.wait_for(run, T)


class Ends:
    def __init__(self) -> None:
        self.got: list[BaseException | None] = []
        self.event = asyncio.Event()

    def __call__(self, exc: BaseException | None) -> None:
        self.got.append(exc)
        self.event.set()


async def _start(svc: TailnetService, ident: StreamIdentity, io: PushedRequests, ends: Ends):
    run = await svc.start_coordinate(
        ident, read=io.read, ready=io.ready, send=io.write, on_end=ends, eof=EOF_MARK
    )
    io.listen(run.input)
    return run


async def test_start_coordinate_runs_without_tasks_while_idle() -> None:
    """The held form: tasks only while requests or responses wait; a tunnel's
    updates reach the peer in order; Disconnect ends it with on_end(None)."""
    svc = _service()
    a, b = _ident("a"), _ident("b")
    io_a, io_b = PushedRequests(), PushedRequests()
    end_a, end_b = Ends(), Ends()
    baseline = len(asyncio.all_tasks())
    run_a = await _start(svc, a, io_a, end_a)
    run_b = await _start(svc, b, io_b, end_b)
    await _settle()
    assert len(asyncio.all_tasks()) == baseline
    io_b.push(pb.CoordinateRequest(add_tunnel=pb.CoordinateRequest.Tunnel(id=a.peer_id.bytes)))
    for derp in (1, 2, 3):
        io_a.push(update_self(a.peer_id, derp))
    await _settle()
    assert len(asyncio.all_tasks()) == baseline
    seen = [
        u.node.preferred_derp
        for r in io_b.responses for u in r.peer_updates if u.id == a.peer_id.bytes
    ]
    assert seen and seen[-1] == 3 and seen == sorted(seen)
    io_a.push(pb.CoordinateRequest(disconnect=pb.CoordinateRequest.Disconnect()))
    await asyncio.wait_for(end_a.event.wait(), T)
    assert end_a.got == [None] and run_a.over
    # b hears a go away (DISCONNECTED), then the transport cancels b: no on_end
    run_b.cancel()
    run_b.cancel()  # idempotent
    await _settle()
    assert end_b.got == [] and run_b.over
    assert svc.coordinator.peers() == []
    assert len(asyncio.all_tasks()) == baseline


async def test_start_coordinate_service_close_writes_the_error_then_ends() -> None:
    svc = _service()
    a = _ident("a")
    io, ends = PushedRequests(), Ends()
    await _start(svc, a, io, ends)
    svc.close()
    await asyncio.wait_for(ends.event.wait(), T)
    assert ends.got == [None]
    assert io.responses[-1].error  # the close error, written before the end


async def test_start_coordinate_failed_send_ends_with_that_error() -> None:
    svc = _service()
    a = _ident("a")
    io, ends = PushedRequests(), Ends()

    async def broken(resp: pb.CoordinateResponse) -> None:
        raise ConnectionError("gone")

    await svc.start_coordinate(
        a, read=io.read, ready=io.ready, send=broken, on_end=ends, eof=EOF_MARK
    )
    svc.close()  # something to write
    await asyncio.wait_for(ends.event.wait(), T)
    assert len(ends.got) == 1 and isinstance(ends.got[0], ConnectionError)
    assert svc.coordinator.peers() == []


class NowaitIO(PushedRequests):
    """A transport with the fast path: send_nowait / drain (a window we control)."""

    def __init__(self) -> None:
        super().__init__()
        self.room = True
        self.drains = 0
        self.opened = asyncio.Event()
        self.order: list[str] = []

    def send_nowait(self, resp: pb.CoordinateResponse) -> bool:
        self.responses.append(resp)
        self.order.append("nowait")
        self.got.set()
        return self.room

    async def drain(self) -> None:
        self.drains += 1
        self.order.append("drain")
        await self.opened.wait()

    async def write(self, resp: pb.CoordinateResponse) -> None:
        self.order.append("send")
        await super().write(resp)


async def _start_nowait(svc: TailnetService, ident: StreamIdentity, io: NowaitIO, ends: Ends):
    run = await svc.start_coordinate(
        ident, read=io.read, ready=io.ready, send=io.write, on_end=ends, eof=EOF_MARK,
        send_nowait=io.send_nowait, drain=io.drain,
    )
    io.listen(run.input)
    return run


async def test_fast_path_writes_without_tasks_and_waits_when_told() -> None:
    svc = _service()
    a, b = _ident("a"), _ident("b")
    io_a, io_b = NowaitIO(), NowaitIO()
    end_a, end_b = Ends(), Ends()
    await _start_nowait(svc, a, io_a, end_a)
    await _start_nowait(svc, b, io_b, end_b)
    await _settle()
    baseline = len(asyncio.all_tasks())
    io_b.push(pb.CoordinateRequest(add_tunnel=pb.CoordinateRequest.Tunnel(id=a.peer_id.bytes)))
    io_a.push(update_self(a.peer_id, 1))
    await _settle()
    assert io_b.order and set(io_b.order) == {"nowait"}  # written at once
    assert len(asyncio.all_tasks()) == baseline
    # the transport is full: the next response waits for drain(), then send()
    io_b.room = False
    io_a.push(update_self(a.peer_id, 2))
    await _settle()
    mark = len(io_b.order)
    io_a.push(update_self(a.peer_id, 3))
    await _settle()
    assert io_b.order[mark - 2 :] == ["nowait", "drain"]  # 2 went out; then it waits
    io_b.opened.set()
    await _settle()
    assert io_b.order[-1] == "send"
    derps = [u.node.preferred_derp for r in io_b.responses for u in r.peer_updates
             if u.id == a.peer_id.bytes and u.HasField("node")]
    assert derps == [1, 2, 3]
    svc.close()
    await asyncio.wait_for(end_b.event.wait(), T)
    assert end_b.got == [None] and io_b.responses[-1].error


async def test_fast_path_error_ends_the_stream_with_it() -> None:
    """send_nowait raising (e.g. a response too big) ends the stream with that error."""
    svc = _service()
    a, b = _ident("a"), _ident("b")
    io_a, io_b = NowaitIO(), NowaitIO()
    end_a, end_b = Ends(), Ends()

    def too_big(resp: pb.CoordinateResponse) -> bool:
        raise ValueError("too big")

    await _start_nowait(svc, a, io_a, end_a)
    run_b = await svc.start_coordinate(
        b, read=io_b.read, ready=io_b.ready, send=io_b.write, on_end=end_b, eof=EOF_MARK,
        send_nowait=too_big, drain=io_b.drain,
    )
    io_b.listen(run_b.input)
    io_b.push(pb.CoordinateRequest(add_tunnel=pb.CoordinateRequest.Tunnel(id=a.peer_id.bytes)))
    io_a.push(update_self(a.peer_id, 1))  # b gets a response: it cannot be sent
    await asyncio.wait_for(end_b.event.wait(), T)
    assert len(end_b.got) == 1 and isinstance(end_b.got[0], ValueError)
    assert run_b.over and [p.id for p in svc.coordinator.peers()] == [a.peer_id]
