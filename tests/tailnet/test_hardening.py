"""Issue 9 (coordinator half): bounded cost per peer, principal and connection; resume
tokens bound to their principal. gRPC on 127.0.0.1 over real sockets (the service
layer is shared by every transport); the HTTP 401 for a foreign resume token through
the stack's HTTP API.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import socket
import struct
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import grpc.aio
import pytest

import tailnet.core
import tailnet.service
from tailnet.cli import build_parser
from tailnet.auth import UnrestrictedPolicy
from tailnet.config import ConfigError, StackConfig, add_arguments, load_config
from tailnet.identity import Principal
from tailnet.limits import DEFAULT_LIMITS, Limits
from tailnet.service import QueueSink, response_size
from tailnet.stack import TailnetStack
from tailnet.v2 import tailnet_pb2 as pb
from tailnet.v2 import tailnet_pb2_grpc as pb_grpc

from .test_grpc_service import (
    AGENT,
    AGENT2,
    SC,
    USER,
    Kind,
    Peer,
    Stack,
    T,
    add_tunnel,
    connect_agent,
    connect_client,
    end_status,
    make_stack,
    md_for,
    node_for,
    update_self,
)

Req = pb.CoordinateRequest


async def _stack(limits: Limits = DEFAULT_LIMITS) -> Stack:
    return await make_stack(limits)


async def _close(s: Stack) -> None:
    for p in s.peers:
        p.call.cancel()
    await s.channel.close()
    await s.server.stop(0)


@pytest.fixture
async def small() -> AsyncIterator[Stack]:
    """A stack with small limits (reachable in a test)."""
    s = await _stack(Limits(max_peers_per_principal=2, max_tunnels_per_peer=2,
                            peer_buffer_bytes=64 * 1024))
    try:
        yield s
    finally:
        await _close(s)


# --------------------------------------------------------------------------- outbound bytes


def _resp(nbytes: int) -> pb.CoordinateResponse:
    return pb.CoordinateResponse(error="x" * nbytes)


def test_queue_sink_is_bounded_in_bytes_and_count() -> None:
    sink = QueueSink(maxsize=10, max_bytes=1000)
    r300 = _resp(297)  # tag + 2-byte length + 297
    assert response_size(r300) == r300.ByteSize() == 300
    assert sink.send(r300) and sink.send(r300) and sink.send(r300)
    assert sink.queued_bytes == 900 and len(sink) == 3
    assert not sink.send(_resp(99))  # 900 + 101 > 1000: the coordinator evicts
    assert sink.send(_resp(98))  # 900 + 100: exactly the budget fits
    assert sink.pop() is r300 and sink.queued_bytes == 700
    # A response larger than the whole budget is accepted only into an empty queue.
    while sink.pop() is not None:
        pass
    assert sink.queued_bytes == 0
    big = _resp(5000)
    assert sink.send(big) and not sink.send(_resp(1))
    assert sink.pop() is big and sink.queued_bytes == 0
    # The count bound still applies.
    counted = QueueSink(maxsize=2, max_bytes=10**9)
    assert counted.send(_resp(1)) and counted.send(_resp(1)) and not counted.send(_resp(1))


async def test_eviction_drops_what_was_queued() -> None:
    """An evicted peer keeps nothing queued but the close error; other closes
    (overwrite, failure) still deliver what was queued before it."""
    evicted = QueueSink(maxsize=10, max_bytes=1000)
    assert evicted.send(_resp(297)) and evicted.send(_resp(297))
    evicted.close(tailnet.core.CLOSE_ERR_FAILED_UPDATE)
    assert len(evicted) == 0 and evicted.queued_bytes == 0
    assert evicted.send(_resp(1)) and len(evicted) == 0  # dropped after close
    assert [r.error async for r in evicted.drain()] == [tailnet.core.CLOSE_ERR_FAILED_UPDATE]
    overwritten = QueueSink(maxsize=10, max_bytes=1000)
    assert overwritten.send(_resp(5))
    overwritten.close("peer ID overwritten by new connection")
    assert [r.error async for r in overwritten.drain()] == [
        "x" * 5, "peer ID overwritten by new connection"]


def test_response_size_is_measured_once_per_shared_response() -> None:
    a, b = _resp(10), _resp(20)
    assert response_size(a) == 12 and response_size(a) == 12
    assert response_size(b) == 22 and response_size(a) == 12


async def test_slow_consumer_is_evicted_by_the_byte_bound(
    small: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Far fewer than 512 responses are held for a peer that does not read, and
    nothing of them once it is evicted."""
    agent, _ = await connect_agent(small)
    slow, slow_id = await connect_client(small, AGENT)
    await agent.expect_update(Kind.NODE, slow_id)
    sink = small.service._streams[slow_id].sink  # noqa: SLF001 - observe the peer's buffer
    at_eviction: list[tuple[int, int]] = []
    real_close = QueueSink.close

    def spy(self: QueueSink, error: str | None = None) -> None:
        if self is sink and not self.closed:
            at_eviction.append((len(self), self.queued_bytes))
        real_close(self, error)

    monkeypatch.setattr(QueueSink, "close", spy)
    evicted = asyncio.ensure_future(agent.expect_update(Kind.DISCONNECTED, slow_id, "failed update"))
    for i in range(5000):
        agent.send(update_self(AGENT, derp=1 + i % 1000, endpoints=200))  # ~4 KB per update
        if i % 16 == 15:
            await asyncio.wait({evicted}, timeout=0.05)
            if evicted.done():
                break
    await asyncio.wait_for(evicted, T)
    # What it held when evicted was bounded by the 64 KiB, far below the
    # 512-response count; its writer is blocked (the client reads nothing), and
    # the eviction dropped it all: only the close error is left to write.
    one = response_size(pb.CoordinateResponse(peer_updates=[Kind(
        id=AGENT.bytes, kind=Kind.NODE, reason="node update",
        node=node_for(AGENT, derp=999, endpoints=200))]))
    [(held, held_bytes)] = at_eviction
    assert 0 < held < 64, held
    assert held_bytes <= 64 * 1024 < held_bytes + one + 8
    assert sink.closed and len(sink) == 0 and sink.queued_bytes == 0
    error, code, _ = await slow.expect_error_end()
    assert error == "failed to update tunnel peer mapping" and code == SC.OK


# --------------------------------------------------------------------------- request caps


@pytest.mark.parametrize(
    ("make", "text"),
    [
        (lambda pid: Req(update_self=Req.UpdateSelf(node=node_for(pid, endpoints=300))),
         "update_self node has 300 endpoints entries; at most 256 are allowed (max_endpoints)"),
        (lambda pid: Req(ready_for_handshake=[Req.ReadyForHandshake(id=pid.bytes)] * 1025),
         "request has 1025 ready_for_handshake entries; at most 1024 are allowed "
         "(max_ready_for_handshake)"),
        (lambda pid: Req(update_self=Req.UpdateSelf(node=pb.Node(key=b"np" + b"k" * 31))),
         'update_self node key must be 34 bytes ("np" + 32-byte public key), got 33 bytes'),
    ],
)
async def test_over_cap_request_ends_only_that_stream(
    small: Stack, make: object, text: str
) -> None:
    agent, _ = await connect_agent(small)
    bystander, bid = await connect_client(small, AGENT)
    await agent.expect_update(Kind.NODE, bid)
    bad = small.peer("cp-token")
    bad_id = await bad.peer_id()
    bad.send(add_tunnel(AGENT))
    bad.send(update_self(bad_id))
    await agent.expect_update(Kind.NODE, bad_id)
    bad.send(make(bad_id))  # type: ignore[operator]
    error, code, details = await bad.expect_error_end()
    assert (error, code, details) == (text, SC.INVALID_ARGUMENT, text)
    await agent.expect_update(Kind.LOST, bad_id)
    bystander.send(update_self(bid, derp=7))
    assert (await agent.expect_update(Kind.NODE, bid, "node update")).node.preferred_derp == 7


async def test_tunnels_per_peer_is_resource_exhausted(small: Stack) -> None:
    cp = small.peer("cp-token")
    await cp.peer_id()
    for _ in range(2):
        cp.send(add_tunnel(uuid.uuid4()))
    cp.send(add_tunnel(uuid.uuid4()))
    error, code, details = await cp.expect_error_end()
    text = ("add_tunnel refused: this peer already has 2 tunnels; at most 2 are allowed "
            "(max_tunnels_per_peer)")
    assert (error, code, details) == (text, SC.RESOURCE_EXHAUSTED, text)


async def test_each_request_is_validated_once(
    small: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    real = tailnet.core.validate_request

    def counting(req: Req, limits: Limits = DEFAULT_LIMITS) -> None:
        calls.append(len(req.ready_for_handshake))
        real(req, limits)

    monkeypatch.setattr(tailnet.service, "validate_request", counting)
    monkeypatch.setattr(tailnet.core, "validate_request", counting)
    agent, _ = await connect_agent(small)
    client, cid = await connect_client(small, AGENT)
    await agent.expect_update(Kind.NODE, cid)
    agent.send(Req(ready_for_handshake=[Req.ReadyForHandshake(id=cid.bytes)]))
    await client.expect_update(Kind.READY_FOR_HANDSHAKE, AGENT)
    assert len(calls) == 4  # agent: update_self, rfh; client: add_tunnel, update_self


# --------------------------------------------------------------------------- per principal


async def test_peers_per_principal(small: Stack) -> None:
    first, _ = await connect_client(small, AGENT)
    second, _ = await connect_client(small, AGENT)
    third = small.peer("user-token", tailnet_agent_id=str(AGENT))
    code, details = await end_status(third.call)
    assert code == SC.RESOURCE_EXHAUSTED
    assert details == ("too many concurrent Coordinate streams for this principal: 2 open, "
                       "at most 2 allowed (max_peers_per_principal)")
    # Another principal is not affected; other RPCs of the same principal neither.
    other = small.peer("other-token")
    await other.peer_id()
    await asyncio.wait_for(small.stub.PostTelemetry(pb.TelemetryRequest(),
                                                    metadata=md_for("user-token")), T)
    # A slot frees when a stream ends.
    first.done_writing()
    await first.expect_end()
    again = small.peer("user-token", tailnet_agent_id=str(AGENT))
    await again.peer_id()
    assert small.service.principal_streams(Principal("user", USER, "renamed")) == 2


# --------------------------------------------------------------------------- streams per connection


def _server_settings(port: int) -> dict[int, int]:
    """Open an HTTP/2 connection by hand and return the server's SETTINGS."""
    with socket.create_connection(("127.0.0.1", port), timeout=T) as sock:
        # Connection preface, then an empty SETTINGS frame (RFC 9113 §3.4, §6.5):
        # length 0 (3 bytes), type 0x4, flags 0, stream 0.
        sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes.fromhex("000000" "04" "00" "00000000"))
        buf = b""
        while True:
            while len(buf) < 9:
                chunk = sock.recv(4096)
                assert chunk, "connection closed before SETTINGS"
                buf += chunk
            length = int.from_bytes(buf[:3], "big")
            ftype, flags = buf[3], buf[4]
            while len(buf) < 9 + length:
                buf += sock.recv(4096)
            payload, buf = buf[9 : 9 + length], buf[9 + length :]
            if ftype == 0x4 and not flags & 0x1:  # SETTINGS, not an ACK
                return {
                    ident: value
                    for ident, value in struct.iter_unpack(">HI", payload)
                }


async def test_grpc_streams_per_connection() -> None:
    s = await _stack(Limits(max_streams_per_grpc_connection=2))
    try:
        settings = await asyncio.to_thread(_server_settings, s.server.port)
        assert settings[0x3] == 2  # SETTINGS_MAX_CONCURRENT_STREAMS
        a = s.peer("user-token")
        b = s.peer("other-token")
        await a.peer_id()
        await b.peer_id()
        # A third call on the same connection waits for a free stream slot ...
        c = s.peer("cp-token")
        got = asyncio.ensure_future(c.peer_id())
        done, _ = await asyncio.wait({got}, timeout=0.5)
        assert not done
        assert len(s.coordinator.peers()) == 2
        # ... and proceeds as soon as one ends.
        a.done_writing()
        await a.expect_end()
        await asyncio.wait_for(got, T)
    finally:
        await _close(s)


# --------------------------------------------------------------------------- resume tokens


async def _refresh(s: Stack, token: str, peer_id: uuid.UUID) -> str:
    resp = await asyncio.wait_for(
        s.stub.RefreshResumeToken(
            pb.RefreshResumeTokenRequest(), metadata=md_for(token, tailnet_peer_id=str(peer_id))
        ),
        T,
    )
    return resp.token


async def test_resume_token_of_another_principal_is_refused() -> None:
    s = await _stack()
    try:
        client, cid = await connect_client(s, AGENT)
        token = await _refresh(s, "user-token", cid)
        thief = s.peer("other-token", tailnet_resume_token=token)
        code, details = await end_status(thief.call)
        assert code == SC.UNAUTHENTICATED
        assert details == ("Invalid resume token: resume_token was issued to a different "
                           "principal")
        assert s.coordinator.is_connected(cid)  # the owner's stream is untouched
        owner = s.peer("user-token", tailnet_resume_token=token)
        assert await owner.peer_id() == cid
    finally:
        await _close(s)


async def test_resumed_connection_reauthorizes_inherited_tunnels() -> None:
    """A user (UserPolicy) loses access to one agent, then resumes: that tunnel goes."""
    s = await _stack()
    try:
        a1, _ = await connect_agent(s)
        a2, _ = await connect_agent(s, "agent2-token")
        user = s.peer("user-token")  # no agent id: UserPolicy
        uid = await user.peer_id()
        user.send(add_tunnel(AGENT))
        user.send(add_tunnel(AGENT2))
        user.send(update_self(uid))
        await a1.expect_update(Kind.NODE, uid)
        await a2.expect_update(Kind.NODE, uid)
        await user.expect_update(Kind.NODE, AGENT2)
        token = await _refresh(s, "user-token", uid)
        s.workspaces.delete_agent(AGENT2)  # the user may no longer reach AGENT2
        again = s.peer("user-token", tailnet_resume_token=token)  # replaces `user`
        assert await again.peer_id() == uid
        await a2.expect_update(Kind.DISCONNECTED, uid, "remove tunnel")
        init = await again.recv()
        assert [(u.id, u.reason) for u in init.peer_updates] == [(AGENT.bytes, "init")]
        assert sorted(s.coordinator.tunnels()) == [(uid, AGENT)]
        error, code, _ = await user.expect_error_end()
        assert (error, code) == ("peer ID overwritten by new connection", SC.OK)
    finally:
        await _close(s)


async def test_resumed_client_bound_to_another_agent_loses_the_old_tunnel() -> None:
    s = await _stack()
    try:
        a1, _ = await connect_agent(s)
        client, cid = await connect_client(s, AGENT)  # ClientPolicy(AGENT)
        await a1.expect_update(Kind.NODE, cid)
        token = await _refresh(s, "user-token", cid)
        again = s.peer("user-token", tailnet_agent_id=str(AGENT2), tailnet_resume_token=token)
        assert await again.peer_id() == cid
        await a1.expect_update(Kind.DISCONNECTED, cid, "remove tunnel")
        assert s.coordinator.tunnels() == []
        again.send(add_tunnel(AGENT))  # still bound to AGENT2 only
        error, code, _ = await again.expect_error_end()
        assert code == SC.PERMISSION_DENIED and f"expected {AGENT2}" in error
    finally:
        await _close(s)


async def test_http_resume_token_of_another_principal_is_401() -> None:
    import urllib.error
    import urllib.request

    st = TailnetStack(StackConfig(http_addr="127.0.0.1:0", grpc_addr="127.0.0.1:0",
                                  stun_addr=None, data_dir=None))
    await st.start()
    try:
        _, alice = st.create_user(name="alice")
        _, bob = st.create_user(name="bob")
        assert st.grpc_target is not None
        async with grpc.aio.insecure_channel(st.grpc_target) as ch:
            stub = pb_grpc.TailnetStub(ch)
            p = Peer(stub, md_for(alice))
            pid = await p.peer_id()
            token = (await stub.RefreshResumeToken(
                pb.RefreshResumeTokenRequest(), metadata=md_for(alice, tailnet_peer_id=str(pid))
            )).token
            p.call.cancel()

        def get(session: str) -> tuple[int, bytes]:
            req = urllib.request.Request(
                f"{st.access_url}/api/v2/tailnet?version=2.3&resume_token={token}",
                headers={"Coder-Session-Token": session},
            )
            try:
                with urllib.request.urlopen(req, timeout=T) as resp:
                    return resp.status, resp.read()
            except urllib.error.HTTPError as exc:
                return exc.code, exc.read()

        status, body = await asyncio.to_thread(get, bob)
        assert status == 401
        doc = json.loads(body)
        assert doc["message"] == "Invalid resume token"
        assert [v["field"] for v in doc["validations"]] == ["resume_token"]
        assert "issued to a different principal" in doc["validations"][0]["detail"]
        status, _ = await asyncio.to_thread(get, alice)
        assert status == 426  # the token is fine for its owner (then: not a WebSocket request)
    finally:
        await st.stop()


# --------------------------------------------------------------------------- configuration


async def test_stack_applies_limit_options() -> None:
    st = TailnetStack(StackConfig(
        http_addr="127.0.0.1:0", grpc_addr="127.0.0.1:0", stun_addr=None, data_dir=None,
        max_peers_per_principal=3, max_streams_per_grpc_connection=5,
        max_streams_per_session=7, max_tunnels_per_peer=11, peer_buffer_bytes=123_456,
    ))
    await st.start()
    try:
        assert st.service is not None and st.grpc is not None
        lim = st.service.limits
        assert (lim.max_peers_per_principal, lim.max_streams_per_grpc_connection,
                lim.max_streams_per_session, lim.max_tunnels_per_peer,
                lim.peer_buffer_bytes) == (3, 5, 7, 11, 123_456)
        coord = st.service.coordinator
        assert isinstance(coord, tailnet.core.Coordinator) and coord.limits is lim
        assert st.grpc.max_concurrent_streams == 5
        settings = await asyncio.to_thread(_server_settings, int(st.grpc_target.rsplit(":", 1)[1]))  # type: ignore[union-attr]
        assert settings[0x3] == 5
    finally:
        await st.stop()



def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(argv)


def test_limit_options_from_flags_env_and_toml(tmp_path: Path) -> None:
    toml = tmp_path / "t.toml"
    toml.write_text("max_tunnels_per_peer = 10\nmax_streams_per_session = 9\n")
    env = {"TAILNET_CONFIG": str(toml), "TAILNET_PEER_BUFFER_BYTES": "1048576",
           "TAILNET_MAX_STREAMS_PER_SESSION": "8"}
    cfg = load_config(_parse(["--max-peers-per-principal", "5",
                              "--max-streams-per-grpc-connection", "6"]), env)
    lim = cfg.limits
    assert (lim.max_peers_per_principal, lim.max_streams_per_grpc_connection,
            lim.max_streams_per_session, lim.max_tunnels_per_peer,
            lim.peer_buffer_bytes) == (5, 6, 8, 10, 1 << 20)
    assert lim.max_endpoints == DEFAULT_LIMITS.max_endpoints  # node caps keep their defaults
    assert load_config(_parse([]), {}).limits == DEFAULT_LIMITS


@pytest.mark.parametrize(
    ("argv", "env", "match"),
    [
        (["--max-peers-per-principal", "0"], {}, "max_peers_per_principal must be a positive"),
        (["--max-tunnels-per-peer", "x"], {}, "max_tunnels_per_peer expects int"),
        ([], {"TAILNET_PEER_BUFFER_BYTES": "-1"}, "peer_buffer_bytes must be a positive"),
        ([], {"TAILNET_MAX_STREAMS_PER_SESSION": "8MiB"}, "TAILNET_MAX_STREAMS_PER_SESSION"),
    ],
)
def test_limit_option_errors(argv: list[str], env: dict[str, str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config(_parse(argv), env)


def test_serve_help_documents_the_limits() -> None:
    parser = build_parser()
    serve = next(a for a in parser._actions if a.dest == "command").choices["serve"]  # type: ignore[union-attr]  # noqa: SLF001
    text = " ".join(serve.format_help().split())
    for flag, default in (("--max-peers-per-principal", 64),
                          ("--max-streams-per-grpc-connection", 100),
                          ("--max-streams-per-session", 64),
                          ("--max-tunnels-per-peer", 4096),
                          ("--peer-buffer-bytes", 8388608)):
        assert f"default {default}]" in text.rsplit(flag, 1)[1][:600]  # the option, not usage


async def test_inherited_tunnels_that_cannot_be_checked_refuse_the_stream(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """If the coordinator cannot list inherited tunnels (HA database down), a resumed
    stream is refused with UNAVAILABLE instead of inheriting them unchecked."""

    class Unreachable(tailnet.core.Coordinator):
        async def tunnels_from(self, peer_id: uuid.UUID) -> set[uuid.UUID]:
            raise TimeoutError("database unreachable")

    svc = tailnet.service.TailnetService(
        coordinator=Unreachable(), authenticator=None, derp_maps=None,  # type: ignore[arg-type]
    )
    who = Principal("user", USER)
    ident = tailnet.service.StreamIdentity(who, uuid.uuid4(), "client", UnrestrictedPolicy(),
                                           resumed=True)

    async def read() -> object:
        return None

    async def write(resp: pb.CoordinateResponse) -> None:
        raise AssertionError("nothing may be written")

    with pytest.raises(tailnet.service.ServiceError) as exc:
        await svc.run_coordinate(ident, read, write)
    assert exc.value.status is tailnet.service.Status.UNAVAILABLE
    assert "inherited tunnels" in exc.value.message
    assert svc.principal_streams(who) == 0 and svc.coordinator.peers() == []
    # A fresh (not resumed, not replacing) peer ID needs no check and connects.
    fresh = tailnet.service.StreamIdentity(who, uuid.uuid4(), "client", UnrestrictedPolicy())
    await svc.run_coordinate(fresh, read, write)
    assert svc.principal_streams(who) == 0


# --------------------------------------------------------------------------- peers that leave


@pytest.mark.parametrize("how", ["cancel", "drop"])
async def test_client_leaving_while_its_writes_are_blocked_is_no_error(
    how: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A client that stops reading and then cancels its call (or drops the
    connection) while the server is blocked writing to it is an ordinary end:
    the peer is LOST, nothing is logged as an error (the bench/soak.py slow
    consumers found an ERROR with a traceback for each one)."""
    stack = await _stack()
    try:
        await _blocked_client_leaves(stack, how, caplog)
    finally:
        await _close(stack)


async def _blocked_client_leaves(stack: Stack, how: str, caplog: pytest.LogCaptureFixture) -> None:
    agent, _ = await connect_agent(stack)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{stack.server.port}")
    slow = Peer(pb_grpc.TailnetStub(channel), md_for("user-token", tailnet_agent_id=str(AGENT)))
    slow_id = await slow.peer_id()
    slow.send(add_tunnel(AGENT))
    slow.send(update_self(slow_id))
    await agent.expect_update(Kind.NODE, slow_id)
    sink = stack.service._streams[slow_id].sink  # noqa: SLF001 - observe the peer's buffer
    # Flood until responses pile up in the sink: the server's writer is blocked.
    for i in range(20_000):
        agent.send(update_self(AGENT, derp=1 + i % 1000, endpoints=200))
        if i % 32 == 31:
            await asyncio.sleep(0.01)
            if len(sink) >= 8:
                break
    assert len(sink) >= 8, "the server's writes never blocked"
    caplog.clear()
    if how == "cancel":
        slow.call.cancel()
    else:
        await channel.close(None)
    await agent.expect_update(Kind.LOST, slow_id)

    async def gone() -> None:
        while slow_id in stack.service._streams:  # noqa: SLF001
            await asyncio.sleep(0.01)

    await asyncio.wait_for(gone(), T)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]
    await channel.close(None)
