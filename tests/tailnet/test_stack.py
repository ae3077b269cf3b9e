"""The embedding API (TailnetStack) and configuration loading."""

from __future__ import annotations

import argparse
import asyncio
import json
import stat
import uuid
from pathlib import Path

import pytest

from derp.keys import load_or_create_server_key
from tailnet.config import ConfigError, StackConfig, add_arguments, load_config
from tailnet.derpmap import StaticDERPMapSource, embedded_region, new_derp_map
from tailnet.identity import Principal
from tailnet.stack import DERP_KEY_FILE, RESUME_KEYS_FILE, TOKENS_FILE, TailnetStack
from tailnet.rpc.tailnet_client import TailnetClient
from tailnet.rpc.websocket import DialError

T = 10.0


def _cfg(data_dir: Path | None, **kw: object) -> StackConfig:
    return StackConfig(http_addr="127.0.0.1:0", grpc_addr="127.0.0.1:0", stun_addr=None,
                       data_dir=data_dir, **kw)  # type: ignore[arg-type]


async def test_restart_keeps_relay_key_and_tokens(tmp_path: Path) -> None:
    s1 = TailnetStack(_cfg(tmp_path))
    await s1.start()
    try:
        admin = s1.admin_token
        agent = s1.create_agent()
        assert s1.derp_server is not None
        key1 = s1.derp_server.public_key
    finally:
        await s1.stop()
    for name in (DERP_KEY_FILE, RESUME_KEYS_FILE, TOKENS_FILE):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600, name
    assert load_or_create_server_key(tmp_path / DERP_KEY_FILE).public == key1

    s2 = TailnetStack(_cfg(tmp_path))
    await s2.start()
    try:
        assert s2.new_admin_token is None  # the admin minted by s1 still exists
        assert s2.admin_token != admin  # s1's plaintext is not stored: a per-process token
        assert s2.derp_server is not None and s2.derp_server.public_key == key1
        # the agent minted before the restart still authenticates and still has its workspace
        c = await TailnetClient.connect(f"{s2.ws_url}/api/v2/workspaceagents/me/rpc", agent.token)
        assert c.peer_id == str(agent.agent_id)
        await c.close()
        c = await TailnetClient.connect(
            f"{s2.ws_url}/api/v2/workspaceagents/{agent.agent_id}/coordinate", admin)
        await c.close()
    finally:
        await s2.stop()


async def test_tokens_minted_by_another_process_are_picked_up(tmp_path: Path) -> None:
    s = TailnetStack(_cfg(tmp_path))
    await s.start()
    try:
        other = TailnetStack(StackConfig(data_dir=tmp_path))  # like `tailnet token create`
        other.prepare_data_dir()
        uid, tok = other.create_user()
        creds = other.create_agent(owner_id=uid)
        c = await TailnetClient.connect(f"{s.ws_url}/api/v2/tailnet", tok)
        await c.close()
        c = await TailnetClient.connect(
            f"{s.ws_url}/api/v2/workspaceagents/{creds.agent_id}/coordinate", tok)
        await c.close()
    finally:
        await s.stop()


async def test_in_memory_stack_has_fresh_keys_each_time() -> None:
    keys = []
    for _ in range(2):
        s = TailnetStack(_cfg(None))
        await s.start()
        assert s.derp_server is not None
        keys.append(s.derp_server.public_key)
        await s.stop()
    assert keys[0] != keys[1]


async def test_embedding_with_custom_auth_authorizer_and_derp_map() -> None:
    user = Principal("user", uuid.uuid4(), "alice")
    agent_id = uuid.uuid4()
    seen: list[tuple[Principal, uuid.UUID]] = []

    class Auth:
        async def authenticate(self, token: str) -> Principal | None:
            return user if token == "alice-token" else None

    async def authorize(p: Principal, a: uuid.UUID) -> bool:
        seen.append((p, a))
        return p == user and a == agent_id

    derp_maps = StaticDERPMapSource(new_derp_map(embedded_region("derp.example", 443, region_id=7)))
    s = TailnetStack(_cfg(None), authenticator=Auth(), tunnel_authorizer=authorize,
                     derp_maps=derp_maps)
    await s.start()
    try:
        assert s.derp_maps is derp_maps
        c = await TailnetClient.connect(
            f"{s.ws_url}/api/v2/workspaceagents/{agent_id}/coordinate", "alice-token")
        await c.close()
        assert (user, agent_id) in seen
        with pytest.raises(DialError) as info:
            await TailnetClient.connect(
                f"{s.ws_url}/api/v2/workspaceagents/{uuid.uuid4()}/coordinate", "alice-token")
        assert info.value.status == 404
        # the stack's own admin token still works next to the embedder's authenticator
        c = await TailnetClient.connect(f"{s.ws_url}/api/v2/tailnet", s.admin_token)
        await c.close()
    finally:
        await s.stop()


async def test_unreachable_postgres_fails_start_cleanly() -> None:
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    s = TailnetStack(_cfg(None, postgres_url=f"postgresql://u@127.0.0.1:{port}/db"))
    with pytest.raises((OSError, Exception)):
        await asyncio.wait_for(s.start(), T * 3)
    assert s.http is None and s.derp_server is None


async def test_derp_config_path_adds_regions(tmp_path: Path) -> None:
    extra = tmp_path / "derp.json"
    extra.write_text(json.dumps({"Regions": {"1000": {
        "RegionID": 1000, "RegionCode": "x", "RegionName": "X",
        "Nodes": [{"Name": "1000a", "RegionID": 1000, "HostName": "x.example"}]}}}))
    s = TailnetStack(_cfg(None, derp_config_path=str(extra)))
    await s.start()
    try:
        assert set(s.derp_maps.current().regions) == {999, 1000}
    finally:
        await s.stop()


async def test_derp_config_path_nodes_join_the_embedded_region(tmp_path: Path) -> None:
    # Standalone relays meshed with the embedded one are listed under its region ID.
    extra = tmp_path / "derp.json"
    extra.write_text(json.dumps({"Regions": {"999": {
        "RegionID": 999, "Nodes": [{"Name": "999d", "HostName": "derp1.example"}]}}}))
    s = TailnetStack(_cfg(None, derp_config_path=str(extra)))
    await s.start()
    try:
        nodes = s.derp_maps.current().regions[999].nodes
        assert [n.name for n in nodes] == ["999b", "999d"]
        assert nodes[1].host_name == "derp1.example" and nodes[1].region_id == 999
    finally:
        await s.stop()


# --------------------------------------------------------------------------- config


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(argv)


def test_config_defaults(tmp_path: Path) -> None:
    cfg = load_config(_parse([]), {"XDG_STATE_HOME": str(tmp_path)})
    assert cfg.http_addr == "127.0.0.1:3000" and cfg.grpc_addr == "127.0.0.1:3001"
    assert cfg.stun_addr == "127.0.0.1:3478"
    assert cfg.derp_region_id == 999


def test_config_precedence_flags_env_toml(tmp_path: Path) -> None:
    toml = tmp_path / "t.toml"
    toml.write_text('http_addr = "127.0.0.1:4000"\nhostname_suffix = "toml"\n'
                    'derp_region_id = 900\nblock_direct_connections = true\n')
    env = {"TAILNET_CONFIG": str(toml), "TAILNET_HOSTNAME_SUFFIX": "env",
           "TAILNET_GRPC_ADDR": "off", "TAILNET_DATA_DIR": str(tmp_path / "d")}
    cfg = load_config(_parse(["--hostname-suffix", "flag", "--no-block-direct-connections"]), env)
    assert cfg.http_addr == "127.0.0.1:4000"  # toml
    assert cfg.derp_region_id == 900  # toml, converted
    assert cfg.hostname_suffix == "flag"  # flag beats env beats toml
    assert cfg.block_direct_connections is False  # flag beats toml
    assert cfg.grpc_addr is None  # env "off"
    assert cfg.data_dir == tmp_path / "d"
    cfg = load_config(_parse([]), {**env, "TAILNET_BLOCK_DIRECT_CONNECTIONS": "no"})
    assert cfg.hostname_suffix == "env" and cfg.block_direct_connections is False


@pytest.mark.parametrize(
    ("argv", "env", "match"),
    [
        (["--http-addr", "nope"], {}, "host:port"),
        (["--derp-region-id", "x"], {}, "derp_region_id"),
        ([], {"TAILNET_DERP_FORCE_WEBSOCKETS": "maybe"}, "TAILNET_DERP_FORCE_WEBSOCKETS"),
        (["--access-url", "ftp://x"], {}, "access_url"),
        (["--config", "/nonexistent/x.toml"], {}, "cannot read"),
        (["--derp-map-poll", "0"], {}, "derp_map_poll must be a positive"),
        ([], {"TAILNET_HEALTH_TIMEOUT": "-1"}, "health_timeout must be a positive"),
        (["--health-timeout", "nan"], {}, "health_timeout must be a positive"),
        (["--health-cache", "-5"], {}, "health_cache must not be negative"),
    ],
)
def test_config_errors(argv: list[str], env: dict[str, str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config(_parse(argv), env)


def test_config_unknown_toml_key(tmp_path: Path) -> None:
    toml = tmp_path / "t.toml"
    toml.write_text("bogus = 1\n")
    with pytest.raises(ConfigError, match="bogus"):
        load_config(_parse(["--config", str(toml)]), {})


async def test_stack_context_manager_and_urls() -> None:
    async with TailnetStack(_cfg(None)) as s:
        assert s.access_url == f"http://127.0.0.1:{s.http_port}"
        assert s.derp_url == s.access_url + "/derp"
        assert s.ws_url.startswith("ws://127.0.0.1:")
        assert s.grpc_target is not None
        await asyncio.sleep(0)


from .pgserver import pg_dsn, pg_server  # noqa: E402,F401  (fixtures; skip without PostgreSQL)


async def test_postgres_url_uses_the_ha_coordinator(pg_dsn: str) -> None:  # noqa: F811
    from tailnet.pg import PgCoordinator
    from tailnet.v2 import tailnet_pb2 as pb

    s = TailnetStack(_cfg(None, postgres_url=pg_dsn))
    await s.start()
    try:
        assert s.service is not None and isinstance(s.service.coordinator, PgCoordinator)
        uid, tok = s.create_user()
        agent = s.create_agent(owner_id=uid)
        ac = await TailnetClient.connect(f"{s.ws_url}/api/v2/workspaceagents/me/rpc", agent.token)
        cc = await TailnetClient.connect(
            f"{s.ws_url}/api/v2/workspaceagents/{agent.agent_id}/coordinate", tok)
        try:
            a = ac.coordinate()
            c = cc.coordinate()
            await a.send(pb.CoordinateRequest(update_self=pb.CoordinateRequest.UpdateSelf(
                node=pb.Node(id=1, key=b"np" + b"\x01" * 32, preferred_derp=999))))
            await c.send(pb.CoordinateRequest(
                add_tunnel=pb.CoordinateRequest.Tunnel(id=agent.agent_id.bytes)))

            async def agent_node() -> pb.CoordinateResponse.PeerUpdate:
                while True:
                    resp = await c.recv()
                    assert resp is not None
                    for u in resp.peer_updates:
                        if u.kind == pb.CoordinateResponse.PeerUpdate.NODE:
                            return u

            upd = await asyncio.wait_for(agent_node(), T * 2)
            assert upd.id == agent.agent_id.bytes and upd.node.preferred_derp == 999
        finally:
            await cc.close()
            await ac.close()
    finally:
        await s.stop()


def test_ha_mesh_options(tmp_path: Path) -> None:
    from tailnet.config import read_mesh_key

    cfg = load_config(_parse(["--derp-relay-url", "http://10.0.0.5:3000",
                              "--replica-heartbeat", "0.5", "--postgres-url", "postgresql://x/y",
                              "--derp-mesh-with", "http://derp1:3340,derp2"]), {})
    assert (cfg.derp_relay_url, cfg.replica_heartbeat) == ("http://10.0.0.5:3000", 0.5)
    with pytest.raises(ConfigError, match="derp_relay_url"):
        StackConfig(derp_relay_url="10.0.0.5:3000")
    with pytest.raises(ConfigError, match="needs a mesh key"):
        StackConfig(derp_mesh_with="http://derp1:3340")
    with pytest.raises(ConfigError, match="derp_mesh_with"):
        StackConfig(derp_mesh_with="ftp://x", postgres_url="postgresql://x/y")
    with pytest.raises(ConfigError, match="replica_heartbeat"):
        StackConfig(replica_heartbeat=0)
    key = tmp_path / "mesh.key"
    key.write_text("ab" * 32 + "\n")
    assert read_mesh_key(str(key)) == b"\xab" * 32
    key.write_text("secret-not-hex")
    with pytest.raises(ConfigError) as err:
        read_mesh_key(str(key))
    assert "secret" not in str(err.value)  # the message names the file, never the content
