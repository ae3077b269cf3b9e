"""Tokens: hashed at rest, listed and revoked (embedding API and CLI); revocation
takes effect on the next request and closes the token's open connections.

Real stacks on 127.0.0.1; WebSockets with the ``websockets`` client, gRPC with
the generated stub.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import stat
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import grpc.aio
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from tailnet.cli import main
from tailnet.config import StackConfig
from tailnet.identity import Principal, SessionRegistry, token_hash
from tailnet.stack import TOKENS_FILE, TailnetStack
from tailnet.tokens import TOKEN_ID_LEN, TokenStore
from tailnet.v2 import tailnet_pb2 as pb
from tailnet.v2 import tailnet_pb2_grpc as pb_grpc

T = 10.0
USER = uuid.UUID("11111111-1111-4111-8111-111111111111")


def _cfg(data_dir: Path | None) -> StackConfig:
    return StackConfig(
        http_addr="127.0.0.1:0", grpc_addr="127.0.0.1:0", stun_addr=None, data_dir=data_dir
    )


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[TailnetStack]:
    s = TailnetStack(_cfg(tmp_path))
    await s.start()
    try:
        yield s
    finally:
        await s.stop()


def _status(url: str, token: str) -> int:
    req = urllib.request.Request(url, headers={"Coder-Session-Token": token})
    try:
        with urllib.request.urlopen(req, timeout=T) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code


async def status(stack: TailnetStack, token: str) -> int:
    url = stack.access_url + "/api/v2/workspaceagents/connection"
    return await asyncio.wait_for(asyncio.to_thread(_status, url, token), T * 2)


def cli(*argv: str) -> tuple[int, str]:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(list(argv))
    return code, buf.getvalue()


async def closed_with(ws: ClientConnection) -> tuple[int, str]:
    with pytest.raises(ConnectionClosed) as info:
        while True:
            await asyncio.wait_for(ws.recv(), T)
    rcvd = info.value.rcvd
    assert rcvd is not None, "closed without a close frame"
    return int(rcvd.code), rcvd.reason


# --------------------------------------------------------------------------- storage


def test_only_hashes_are_stored(tmp_path: Path) -> None:
    path = tmp_path / TOKENS_FILE
    store = TokenStore(path)
    rec, token = store.issue(Principal("user", USER, "u"))
    tid, _, secret = token.partition("-")
    assert tid == rec.id and len(tid) == TOKEN_ID_LEN and len(secret) == 32
    text = path.read_text()
    assert token not in text and secret not in text
    doc = json.loads(text)
    assert doc["version"] == 2
    (entry,) = doc["tokens"]
    assert entry["id"] == tid and entry["hashed_secret"] == token_hash(token)
    assert entry["kind"] == "user" and entry["principal_id"] == str(USER)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = TokenStore(path)
    assert asyncio.run(again.authenticate(token)) == Principal("user", USER, "u")
    assert asyncio.run(again.authenticate(token + "x")) is None


def test_plaintext_token_file_is_migrated_on_load(tmp_path: Path) -> None:
    path = tmp_path / TOKENS_FILE
    agent = uuid.uuid4()
    legacy = {
        "tokens": [
            {"token": "old-user-token", "kind": "user", "id": str(USER), "name": "u"},
            {"token": "old-agent-token", "kind": "agent", "id": str(agent), "name": "main",
             "workspace_id": str(uuid.uuid4()), "owner_id": str(USER), "workspace_name": "ws"},
        ]
    }
    path.write_text(json.dumps(legacy))
    path.chmod(0o644)
    store = TokenStore(path)
    text = path.read_text()
    assert "old-user-token" not in text and "old-agent-token" not in text
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert asyncio.run(store.authenticate("old-user-token")) == Principal("user", USER, "u")
    rec = next(r for r in TokenStore(path).records if r.principal.kind == "agent")
    assert rec.principal.id == agent and rec.owner_id == USER and rec.workspace_name == "ws"
    assert asyncio.run(TokenStore(path).authenticate("old-agent-token")) == rec.principal


async def test_token_removed_from_the_file_stops_working_on_the_next_request(
    stack: TailnetStack, tmp_path: Path
) -> None:
    _, tok = stack.create_user()
    assert await status(stack, tok) == 200
    path = tmp_path / TOKENS_FILE
    doc = json.loads(path.read_text())
    doc["tokens"] = [t for t in doc["tokens"] if t["id"] != tok.split("-")[0]]
    path.write_text(json.dumps(doc))  # edited by hand, not through the store
    assert await status(stack, tok) == 401  # no unrelated unknown token needed


def test_session_registry_closes_now_and_later() -> None:
    reg = SessionRegistry()
    closed: list[str] = []
    unregister = reg.open("a", lambda: closed.append("a1"))
    reg.open("a", lambda: closed.append("a2"))
    reg.open("b", lambda: closed.append("b"))
    unregister()
    assert reg.revoke([token_hash("a")]) == 1 and closed == ["a2"]
    reg.open("a", lambda: closed.append("late"))  # authenticated before, registered after
    assert closed == ["a2", "late"] and len(reg) == 1


# --------------------------------------------------------------------------- stack


async def test_list_and_revoke_through_the_embedding_api(stack: TailnetStack) -> None:
    uid, tok = stack.create_user(name="alice")
    creds = stack.create_agent(uid)
    infos = {t.id: t for t in stack.list_tokens()}
    tid = tok.split("-")[0]
    assert infos[tid].kind == "user" and infos[tid].principal_id == uid
    assert infos[tid].name == "alice" and infos[tid].created_at > 0
    assert infos[tid].last_used is None
    assert infos[creds.token_id].kind == "agent"
    assert await status(stack, tok) == 200
    assert {t.id: t for t in stack.list_tokens()}[tid].last_used is not None
    assert stack.revoke_token(tid) is True
    assert stack.revoke_token(tid) is False
    assert await status(stack, tok) == 401
    assert tid not in {t.id for t in stack.list_tokens()}


async def test_revocation_closes_websockets_and_grpc_streams(stack: TailnetStack) -> None:
    uid, tok = stack.create_user()
    _, other = stack.create_user()
    ws = await connect(
        stack.ws_url + "/api/v2/derp-map", additional_headers={"Coder-Session-Token": tok}
    )
    keep = await connect(
        stack.ws_url + "/api/v2/derp-map", additional_headers={"Coder-Session-Token": other}
    )
    await asyncio.wait_for(ws.recv(), T)  # the map: the session is live
    await asyncio.wait_for(keep.recv(), T)
    assert stack.grpc_target is not None
    async with grpc.aio.insecure_channel(stack.grpc_target) as channel:
        stub = pb_grpc.TailnetStub(channel)
        call = stub.Coordinate(metadata=(("authorization", f"Bearer {tok}"),))
        await asyncio.wait_for(call.initial_metadata(), T)
        maps = stub.StreamDERPMaps(
            pb.StreamDERPMapsRequest(), metadata=(("authorization", f"Bearer {tok}"),)
        )
        await asyncio.wait_for(maps.read(), T)
        assert stack.revoke_token(tok.split("-")[0])
        assert await closed_with(ws) == (1008, "session token revoked")
        assert await asyncio.wait_for(call.code(), T) == grpc.StatusCode.UNAUTHENTICATED
        assert await call.details() == "session token revoked"
        assert await asyncio.wait_for(maps.code(), T) == grpc.StatusCode.UNAUTHENTICATED
    # the other token's session is untouched
    await keep.ping()
    await keep.close()
    assert len(stack.sessions) == 0


async def test_cli_list_and_revoke_against_a_running_server(
    stack: TailnetStack, tmp_path: Path
) -> None:
    _, tok = stack.create_user(name="bob")
    tid = tok.split("-")[0]
    ws = await connect(
        stack.ws_url + "/api/v2/debug/ws", additional_headers={"Coder-Session-Token": tok}
    )
    code, out = await asyncio.to_thread(cli, "token", "list", "--data-dir", str(tmp_path))
    assert code == 0
    header, *rows = out.splitlines()
    assert header.split() == ["ID", "KIND", "PRINCIPAL", "NAME", "CREATED"]
    assert any(r.split()[:2] == [tid, "user"] and "bob" in r for r in rows)
    assert any(r.split()[1] == "control_plane" for r in rows)
    assert tok not in out
    code, out = await asyncio.to_thread(cli, "token", "revoke", tid, "--data-dir", str(tmp_path))
    assert (code, out.strip()) == (0, f"revoked {tid}")
    # no request needed: the server notices the file change and closes the socket
    assert await closed_with(ws) == (1008, "session token revoked")
    assert await status(stack, tok) == 401
    code, _ = await asyncio.to_thread(cli, "token", "revoke", tid, "--data-dir", str(tmp_path))
    assert code == 1


async def test_cli_create_admin_and_first_admin_shown_once(tmp_path: Path) -> None:
    code, out = await asyncio.to_thread(cli, "token", "create", "--admin", "--data-dir", str(tmp_path))
    assert code == 0
    printed = dict(line.split("=", 1) for line in out.splitlines())
    s = TailnetStack(_cfg(tmp_path))
    await s.start()
    try:
        assert s.new_admin_token is None  # there is an admin already: none minted
        assert await status(s, printed["token"]) == 200
        assert printed["id"] == printed["token"].split("-")[0]
    finally:
        await s.stop()


async def test_data_dir_files_are_0600_despite_stale_tmp_files(tmp_path: Path) -> None:
    for name in ("tokens.json.tmp", "resume-keys.json.tmp", "derp-server.key.tmp"):
        (tmp_path / name).write_text("stale")
        (tmp_path / name).chmod(0o644)
    s = TailnetStack(_cfg(tmp_path))
    await s.start()
    try:
        s.create_user()
    finally:
        await s.stop()
    for name in (TOKENS_FILE, "resume-keys.json", "derp-server.key"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600, name
