"""``tailnet serve`` as a real process: banner, endpoints, SIGTERM, restart, token create."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import urllib.request
from pathlib import Path

from tailnet.cli import main
from tailnet.config import OPTIONS
from tailnet.rpc.tailnet_client import TailnetClient

T = 20.0
ROOT = Path(__file__).resolve().parents[2]


async def _start(data_dir: Path) -> tuple[asyncio.subprocess.Process, dict[str, str]]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tailnet", "serve",
        "--http-addr", "127.0.0.1:0", "--grpc-addr", "127.0.0.1:0", "--stun-addr", "127.0.0.1:0",
        "--data-dir", str(data_dir), "--log-level", "WARNING",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env, cwd=ROOT,
    )
    assert proc.stdout is not None
    banner: dict[str, str] = {}

    async def read_banner() -> None:
        assert proc.stdout is not None
        while True:
            line = (await proc.stdout.readline()).decode()
            if not line:
                raise AssertionError("tailnet serve exited before printing its banner")
            key, sep, value = line.strip().partition(":")
            if sep:
                banner[key.strip()] = value.strip()
            if line.strip().startswith("try:"):
                return

    await asyncio.wait_for(read_banner(), T)
    return proc, banner


async def _stop(proc: asyncio.subprocess.Process) -> tuple[int, str]:
    proc.send_signal(signal.SIGTERM)
    out, err = await asyncio.wait_for(proc.communicate(), T)
    assert proc.returncode is not None
    return proc.returncode, out.decode() + err.decode()


def _main_output(argv: list[str]) -> tuple[int, str]:
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(argv)
    return code, buf.getvalue()


def _get(url: str, token: str) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers={"Coder-Session-Token": token})
    with urllib.request.urlopen(req, timeout=T) as resp:
        return resp.status, resp.read()


async def test_serve_sigterm_restart_and_token_create(tmp_path: Path) -> None:
    proc, banner = await _start(tmp_path)
    try:
        api = banner["API"]
        admin = banner["admin token"]
        assert api.startswith("http://127.0.0.1:") and not api.endswith(":0")
        assert banner["DERP relay"].startswith(api + "/derp")
        assert banner["gRPC"].startswith("127.0.0.1:") and not banner["gRPC"].endswith(":0")
        status, body = await asyncio.to_thread(_get, api + "/api/v2/debug/health", admin)
        assert status == 200 and json.loads(body)["derp"]["regions"]["999"]["healthy"] is True
        # a token minted by another process is accepted by the running server at once
        code, out = await asyncio.to_thread(
            _main_output, ["token", "create", "--agent", "--data-dir", str(tmp_path)])
        assert code == 0
        printed = dict(line.split("=", 1) for line in out.splitlines())
        ws = "ws" + api[len("http"):]
        c = await TailnetClient.connect(ws + "/api/v2/workspaceagents/me/rpc", printed["token"])
        assert c.peer_id == printed["agent_id"]
        await c.close()
        # the file holds only the token's hash
        assert printed["token"] not in (tmp_path / "tokens.json").read_text()
    finally:
        rc, output = await _stop(proc)
    assert rc == 0, output
    assert "tailnet-core stopped" in output
    key_before = (tmp_path / "derp-server.key").read_text()

    proc, banner = await _start(tmp_path)
    try:
        assert banner["admin token"].startswith("created at first start")  # not printed again
        assert (tmp_path / "derp-server.key").read_text() == key_before
        status, _ = await asyncio.to_thread(_get, banner["API"] + "/api/v2/debug/coordinator", admin)
        assert status == 200
    finally:
        proc.send_signal(signal.SIGINT)
        await asyncio.wait_for(proc.communicate(), T)
    assert proc.returncode == 0


def test_help_explains_every_flag(capsys: object) -> None:
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.suppress(SystemExit):
        main(["serve", "--help"])
    text = " ".join(buf.getvalue().split())
    for opt in OPTIONS:
        assert "--" + opt.name.replace("_", "-") in text
        assert "TAILNET_" + opt.name.upper() in text


def test_bad_config_exits_1(tmp_path: Path, capsys: object) -> None:
    assert main(["serve", "--http-addr", "bogus", "--data-dir", str(tmp_path)]) == 1


async def test_port_in_use_exits_1(tmp_path: Path) -> None:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tailnet", "serve", "--http-addr", f"127.0.0.1:{port}",
            "--grpc-addr", "off", "--stun-addr", "off", "--data-dir", str(tmp_path),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env, cwd=ROOT,
        )
        _, err = await asyncio.wait_for(proc.communicate(), T)
        assert proc.returncode == 1
        assert b"cannot listen" in err
    finally:
        server.close()
