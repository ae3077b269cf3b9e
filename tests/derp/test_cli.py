"""Tests for the ``derper`` CLI (derp.cli, ``python -m derp``).

Argument handling is tested in-process; serving is tested with a real
``python -m derp`` process on an ephemeral port, driven by two DerpClients.
Every wait on the process is bounded; the process is always reaped.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from derp.cli import build_parser, default_key_path, main, parse_addr
from derp.client import DerpClient
from derp.events import KeepAliveReceived, PacketReceived
from derp.keys import PrivateKey, PublicKey

WAIT = 20.0
_LISTEN_RE = re.compile(r"listening on (http://\S+/derp) server key (nodekey:[0-9a-f]{64})")


# --------------------------------------------------------------------------- in-process


@pytest.mark.parametrize(
    ("addr", "want"),
    [
        (":443", ("", 443)),
        ("127.0.0.1:3340", ("127.0.0.1", 3340)),
        ("[::1]:0", ("::1", 0)),
        ("localhost:80", ("localhost", 80)),
    ],
)
def test_parse_addr(addr: str, want: tuple[str, int]) -> None:
    assert parse_addr(addr) == want


@pytest.mark.parametrize("addr", ["443", "host:", "host:x", ":70000", "::1:80"])
def test_parse_addr_rejects(addr: str) -> None:
    with pytest.raises(ValueError):
        parse_addr(addr)


def test_default_key_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert default_key_path() == Path("/var/lib/derper/derper.key")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    assert default_key_path() == tmp_path / "derper" / "derper.key"
    monkeypatch.delenv("XDG_CONFIG_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_key_path() == tmp_path / ".config" / "derper" / "derper.key"


def test_parser_defaults() -> None:
    args = build_parser().parse_args([])
    assert args.addr is None and args.dev is False and args.stats_interval == 60.0
    args = build_parser().parse_args(["--dev", "-v", "-a", "127.0.0.1:0", "--log-level", "debug"])
    assert args.dev and args.verbose and args.addr == "127.0.0.1:0" and args.log_level == "DEBUG"


@pytest.mark.parametrize(
    "content",
    ['{"PrivateKey": "bogus"}', "not json", '{"Other": 1}', '{"PrivateKey": 5}'],
)
def test_bad_key_file_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str
) -> None:
    keyfile = tmp_path / "derper.key"
    keyfile.write_text(content)
    assert main(["-c", str(keyfile), "-a", "127.0.0.1:0"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("derper: ") and str(keyfile) in err[-1]
    assert keyfile.read_text() == content  # never overwritten


def test_bad_addr_and_mesh_key_exit_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--dev", "-a", "127.0.0.1:nope"]) == 1
    assert "bad port" in capsys.readouterr().err
    psk = tmp_path / "psk"
    psk.write_text("abcd\n")
    assert main(["--dev", "--mesh-psk-file", str(psk)]) == 1
    assert "64 hex digits" in capsys.readouterr().err


# --------------------------------------------------------------------------- real process


def _server_available() -> bool:
    try:
        from derp.server import DerpServer  # noqa: F401
    except ImportError:
        return False
    return True


needs_server = pytest.mark.skipif(not _server_available(), reason="derp.server not available yet")


class Derper:
    """A ``python -m derp`` child process; stderr is collected in the background."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.stderr = bytearray()
        self._more = asyncio.Event()
        assert proc.stderr is not None
        self._drain = asyncio.create_task(self._collect(proc.stderr))

    async def _collect(self, stream: asyncio.StreamReader) -> None:
        while chunk := await stream.read(65536):
            self.stderr += chunk
            self._more.set()
        self._more.set()

    async def wait_stderr(self, needle: bytes) -> None:
        """Wait (bounded) until ``needle`` shows up on stderr."""

        async def loop() -> None:
            while needle not in self.stderr:
                assert not self._drain.done(), f"derper exited: {self.stderr.decode()}"
                self._more.clear()
                await self._more.wait()

        await asyncio.wait_for(loop(), WAIT)

    async def listening(self) -> tuple[str, PublicKey]:
        assert self.proc.stdout is not None
        while True:
            line = await asyncio.wait_for(self.proc.stdout.readline(), WAIT)
            if not line:
                await asyncio.wait_for(self.proc.wait(), WAIT)
                raise AssertionError(f"derper exited early: {self.stderr.decode()}")
            m = _LISTEN_RE.search(line.decode())
            if m:
                return m.group(1), PublicKey.from_text(m.group(2))

    async def terminate(self) -> int:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        rc = await asyncio.wait_for(self.proc.wait(), WAIT)
        await asyncio.wait_for(self._drain, WAIT)
        return rc

    def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()


#: ``--workers`` for every derper a test starts unless it names its own: the
#: ``derpers`` fixture runs each of its tests with 1 (one process) and with 2 (a
#: supervisor and two workers), so the CLI suite also runs with ``--workers 2``.
_WORKERS = ["1"]


async def start_derper(*args: str) -> Derper:
    if "--workers" not in args:
        args = (*args, "--workers", _WORKERS[0])
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "derp",
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    return Derper(proc)


@pytest.fixture(params=["1", "2"], ids=["workers1", "workers2"])
async def derpers(request: pytest.FixtureRequest) -> AsyncIterator[list[Derper]]:
    started: list[Derper] = []
    _WORKERS[0] = request.param
    try:
        yield started
    finally:
        _WORKERS[0] = "1"
        for d in started:
            d.kill()  # with --workers 2 the workers follow (PR_SET_PDEATHSIG)
            await asyncio.wait_for(d.proc.wait(), WAIT)


async def _next_packet(client: DerpClient) -> PacketReceived:
    while True:
        ev = await asyncio.wait_for(client.recv(), WAIT)
        if isinstance(ev, PacketReceived):
            return ev
        assert isinstance(ev, KeepAliveReceived), ev


async def _deliver(src: DerpClient, dst: DerpClient, dst_key: PublicKey, data: bytes) -> PacketReceived:
    """Send ``data`` until ``dst`` receives it (within WAIT); the packet ``dst`` got.

    With ``--workers 2`` the two clients may sit on different workers, and the
    sender's worker learns of a just-connected receiver one link message later:
    a packet sent in that window is dropped as unknown, as across a mesh (DERP
    is best effort; real clients resend). So each attempt waits one second."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT
    while True:
        await src.send(dst_key, data)
        try:
            return await asyncio.wait_for(_next_packet(dst), min(1.0, deadline - loop.time()))
        except TimeoutError:
            if loop.time() >= deadline:
                raise AssertionError(f"{data!r} not delivered within {WAIT} s") from None


@needs_server
async def test_dev_server_relays_and_exits_0_on_sigterm(derpers: list[Derper]) -> None:
    d = await start_derper("--dev", "-a", "127.0.0.1:0", "--stats-interval", "0")
    derpers.append(d)
    url, server_key = await d.listening()
    a_key, b_key = PrivateKey.generate(), PrivateKey.generate()
    try:
        async with DerpClient(url, a_key) as a, DerpClient(url, b_key) as b:
            assert a.server_key == server_key
            got = await _deliver(a, b, b_key.public, b"ping from a")
            assert got == PacketReceived(a_key.public, b"ping from a")
            got = await _deliver(b, a, a_key.public, b"pong from b")
            assert got == PacketReceived(b_key.public, b"pong from b")
            assert await d.terminate() == 0
    except Exception as exc:
        d.kill()
        await d.terminate()
        raise AssertionError(f"{exc!r}; derper stderr:\n{d.stderr.decode()}") from exc
    assert b"Traceback" not in d.stderr


@needs_server
async def test_stats_logged_and_sigint_exits_0(derpers: list[Derper]) -> None:
    d = await start_derper("--dev", "-a", "127.0.0.1:0", "--stats-interval", "0.05")
    derpers.append(d)
    await d.listening()
    await d.wait_stderr(b"INFO derper: stats: ")
    d.proc.send_signal(signal.SIGINT)
    assert await asyncio.wait_for(d.proc.wait(), WAIT) == 0


@needs_server
async def test_verbose_logs_connections(derpers: list[Derper]) -> None:
    d = await start_derper("--dev", "-v", "-a", "127.0.0.1:0", "--stats-interval", "0")
    derpers.append(d)
    url, _ = await d.listening()
    async with DerpClient(url, PrivateKey.generate()) as c:
        await c.ping()
    # The server logs one DEBUG line per connect and per disconnect.
    await d.wait_stderr(b"DEBUG derp.server")
    await d.wait_stderr(b"disconnected")
    assert await d.terminate() == 0


@needs_server
async def test_key_file_created_and_stable(tmp_path: Path, derpers: list[Derper]) -> None:
    keyfile = tmp_path / "state" / "derper.key"
    keys = []
    for _ in range(2):
        d = await start_derper("-c", str(keyfile), "-a", "127.0.0.1:0", "--log-level", "warning")
        derpers.append(d)
        _url, key = await d.listening()
        keys.append(key)
        assert await d.terminate() == 0
        # Without --dev the server warns that it speaks plain HTTP.
        assert b"serving plain HTTP" in d.stderr
    assert keys[0] == keys[1]
    stored = PrivateKey.from_text(json.loads(keyfile.read_text())["PrivateKey"])
    assert stored.public == keys[0]
    assert keyfile.stat().st_mode & 0o077 == 0


@needs_server
async def test_port_in_use_exits_1(derpers: list[Derper]) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        d = await start_derper("--dev", "-a", f"127.0.0.1:{port}")
        derpers.append(d)
        rc = await asyncio.wait_for(d.proc.wait(), WAIT)
        await asyncio.wait_for(d._drain, WAIT)
    assert rc == 1
    err = d.stderr.decode()
    assert "Traceback" not in err
    assert f"derper: cannot listen on 127.0.0.1:{port}" in err
